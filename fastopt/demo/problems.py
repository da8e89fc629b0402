"""The demo's two problems, written with the array library alone (NumPy or CuPy).

* **The valley** ``f(x, y) = x²/20 + y²``: an ill-conditioned bowl (curvature 1/10 along x, 2
  along y) with its minimum at the origin. Every optimizer starts at (−7, 2) and takes 30 steps
  with the analytic gradient ``(x/10, 2y)``; the update goes through fastopt's kernels
  (``FlatBuffer`` + ``opt.step``).
* **The MLP** 64-100-10 with ReLU and softmax cross-entropy on the 8×8 digits:

      h = X·W1 + b1;  a = max(h, 0);  z = a·W2 + b2
      L = mean_i( logsumexp(z_i) − z_i[y_i] )
      ∂L/∂z = (softmax(z) − onehot(y)) / N;  ∂L/∂W2 = aᵀ·∂z;  ∂L/∂a = ∂z·W2ᵀ
      ∂L/∂h = ∂L/∂a · [h > 0];  ∂L/∂W1 = Xᵀ·∂h

  All four weight arrays live in one ``FlatBuffer``, so each step is one fused kernel call.

Nothing here imports matplotlib or scikit-learn; ``fastopt.demo`` loads the data and draws.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import optimizers
from .._arrays import array_module, to_numpy
from ..base import Optimizer
from ..flat import FlatBuffer

__all__ = [
    "CHOSEN",
    "TEXTBOOK_VALLEY",
    "VALLEY_START",
    "Spec",
    "TrainResult",
    "auto_spec",
    "init_mlp",
    "mlp_accuracy",
    "mlp_loss",
    "mlp_loss_and_grad",
    "specs",
    "textbook_valley_path",
    "train_mlp",
    "valley",
    "valley_grad",
    "valley_path",
]

#: where every valley path starts, as in the textbook figure
VALLEY_START = (-7.0, 2.0)


@dataclass(frozen=True)
class Spec:
    """One optimizer in the demo: its class name and the settings on each problem."""

    name: str
    #: keyword arguments on the valley (lr first); the chapter's lr where it gives one
    valley: dict
    #: keyword arguments for the MLP on digits
    mlp: dict
    #: where the valley lr comes from: "chapter", "tuned" (chosen by hand) or "searched"
    source: str = "tuned"

    def make(self, problem: str, backend: str) -> Optimizer:
        cls = getattr(optimizers, self.name)
        return cls(**(self.valley if problem == "valley" else self.mlp), backend=backend)


#: Settings chosen by hand for the optimizers the chapter discusses. Valley lrs: the chapter's
#: (SGD 0.95, Momentum 0.1, AdaGrad 1.5, Adam 0.3) and, for the others, values chosen so that 30
#: steps show the method's character without diverging. MLP lrs: the usual defaults of each
#: method's family, checked on digits. Every other optimizer of the registry gets ``auto_spec``.
CHOSEN = {
    "SGD": Spec("SGD", dict(lr=0.95), dict(lr=0.1), "chapter"),
    "Momentum": Spec(
        "Momentum", dict(lr=0.1, momentum=0.9), dict(lr=0.02, momentum=0.9), "chapter"
    ),
    "Nesterov": Spec("Nesterov", dict(lr=0.08, momentum=0.9), dict(lr=0.02, momentum=0.9)),
    "AdaGrad": Spec("AdaGrad", dict(lr=1.5), dict(lr=0.05), "chapter"),
    "RMSProp": Spec("RMSProp", dict(lr=0.2, alpha=0.99), dict(lr=1e-3, alpha=0.99)),
    "Adam": Spec("Adam", dict(lr=0.3), dict(lr=1e-3), "chapter"),
    "AdamW": Spec("AdamW", dict(lr=0.3, weight_decay=0.1), dict(lr=1e-3, weight_decay=1e-2)),
    "Lion": Spec(
        "Lion",
        dict(lr=0.25, betas=(0.9, 0.99)),
        dict(lr=3e-4, betas=(0.9, 0.99), weight_decay=3e-2),
    ),
}

#: the learning rates ``auto_spec`` tries on the valley
VALLEY_LRS = tuple(float(f"{x:.3g}") for x in np.geomspace(1e-3, 3.0, 22))


def auto_spec(name: str, steps: int = 30) -> Spec:
    """Settings for an optimizer nobody chose them for: on the valley, the lr of ``VALLEY_LRS``
    that ends closest to the minimum after ``steps`` steps (the NumPy oracle runs the search);
    on the MLP, the class's own default lr (``torch.optim``'s)."""
    import inspect

    cls = getattr(optimizers, name)
    best = None
    for lr in VALLEY_LRS:
        spec = Spec(name, dict(lr=lr), {}, "searched")
        with np.errstate(all="ignore"):
            end = valley_path(spec, steps, backend="numpy")[-1]
        dist = float(np.hypot(*end))
        if np.isfinite(dist) and (best is None or dist < best[0]):
            best = (dist, lr)
    lr_default = inspect.signature(cls.__init__).parameters["lr"].default
    return Spec(name, dict(lr=best[1] if best else VALLEY_LRS[0]), dict(lr=lr_default), "searched")


def specs() -> tuple[Spec, ...]:
    """The demo's optimizers: every class of the registry, in its order; chosen settings where
    they exist, searched ones (``auto_spec``) elsewhere."""
    return tuple(CHOSEN.get(name) or auto_spec(name) for name in optimizers.CLASSES)


# -- the valley ---------------------------------------------------------------------------------
def valley(x: Any, y: Any) -> Any:
    """f(x, y) = x²/20 + y² (works on scalars and arrays)."""
    return x * x / 20.0 + y * y


def valley_grad(xy: Any, out: Any) -> Any:
    """Write ∇f = (x/10, 2y) of the point ``xy`` (shape (2,)) into ``out``."""
    out[0] = xy[0] / 10.0
    out[1] = 2.0 * xy[1]


def valley_path(
    spec: Spec, steps: int = 30, backend: str = "auto", xp: Any = np, dtype: Any = np.float64
) -> npt.NDArray[np.float64]:
    """The ``steps + 1`` points (host array, shape (steps + 1, 2)) of ``spec`` on the valley.

    The point is a 2-element parameter in a ``FlatBuffer`` on ``xp``'s device; each step writes
    the analytic gradient into ``buf.grads`` and calls ``opt.step(buf)``.
    """
    buf = FlatBuffer({"xy": xp.asarray(VALLEY_START, dtype=dtype)})
    opt = spec.make("valley", backend)
    xy, g = buf.params["xy"], buf.grads["xy"]
    path = [to_numpy(xy)]
    for _ in range(steps):
        valley_grad(xy, g)
        opt.step(buf)
        path.append(to_numpy(xy))
    return np.stack(path)


#: the chapter's figure, drawn with ``fastopt.textbook``: class name -> keyword arguments. The
#: chapter's learning rates for SGD, Momentum, AdaGrad and Adam; Nesterov and RMSprop (not in
#: the chapter's figure) at values that show their character in 30 steps.
TEXTBOOK_VALLEY = {
    "SGD": {"lr": 0.95},
    "Momentum": {"lr": 0.1},
    "Nesterov": {"lr": 0.1},
    "AdaGrad": {"lr": 1.5},
    "RMSprop": {"lr": 0.15},
    "Adam": {"lr": 0.3},
}


def textbook_valley_path(
    name: str, steps: int = 30, backend: str = "auto", xp: Any = np
) -> npt.NDArray[np.float64]:
    """The chapter's script with ``fastopt.textbook.<name>``: the ``steps + 1`` points (shape
    (steps + 1, 2)) from (−7, 2).

    On the host, ``params["x"]`` and ``params["y"]`` are Python floats, replaced in the dict at
    every update as in the chapter; on a GPU (``xp`` CuPy) they are 1-element device arrays.
    """
    from .. import textbook

    opt = getattr(textbook, name)(**TEXTBOOK_VALLEY[name], backend=backend)
    x0, y0 = VALLEY_START
    params = {"x": x0, "y": y0} if xp is np else {"x": xp.asarray([x0]), "y": xp.asarray([y0])}
    path: list[tuple[float, ...]] = [(x0, y0)]
    for _ in range(steps):
        opt.update(params, {"x": params["x"] / 10.0, "y": 2.0 * params["y"]})
        path.append(
            tuple(float(to_numpy(xp.asarray(params[k])).reshape(-1)[0]) for k in ("x", "y"))
        )
    return np.array(path)


# -- the MLP ------------------------------------------------------------------------------------
def init_mlp(
    sizes: tuple[int, int, int] = (64, 100, 10),
    seed: int = 0,
    xp: Any = np,
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """He-initialised weights (``W1, b1, W2, b2``), the same for every optimizer."""
    rng = np.random.default_rng(seed)
    params = {}
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes), start=1):
        params[f"W{i}"] = xp.asarray(
            rng.standard_normal((n_in, n_out)) * np.sqrt(2.0 / n_in), dtype=dtype
        )
        params[f"b{i}"] = xp.zeros(n_out, dtype=dtype)
    return params


def _logits(params, X):
    h = X @ params["W1"] + params["b1"]
    a = array_module(h).maximum(h, 0)
    return h, a, a @ params["W2"] + params["b2"]


def _cross_entropy(z, y):
    xp = array_module(z)
    z = z - z.max(axis=1, keepdims=True)  # shift: exp cannot overflow, the loss is unchanged
    lse = xp.log(xp.exp(z).sum(axis=1))
    return z, lse, (lse - z[xp.arange(z.shape[0]), y]).mean()


def mlp_loss(params: Mapping[str, Any], X: Any, y: Any) -> Any:
    """Mean softmax cross-entropy (a 0-d array on ``X``'s device)."""
    return _cross_entropy(_logits(params, X)[2], y)[2]


def mlp_loss_and_grad(params: Mapping[str, Any], X: Any, y: Any, grads: Mapping[str, Any]) -> Any:
    """The loss, with the gradient of every weight written into ``grads`` (same names)."""
    xp = array_module(X)
    h, a, z = _logits(params, X)
    zs, lse, loss = _cross_entropy(z, y)
    dz = xp.exp(zs - lse[:, None])  # softmax
    dz[xp.arange(X.shape[0]), y] -= 1
    dz /= X.shape[0]
    grads["W2"][...] = a.T @ dz
    grads["b2"][...] = dz.sum(axis=0)
    dh = dz @ params["W2"].T
    dh *= h > 0
    grads["W1"][...] = X.T @ dh
    grads["b1"][...] = dh.sum(axis=0)
    return loss


def mlp_accuracy(params: Mapping[str, Any], X: Any, y: Any) -> float:
    """Fraction of ``X`` classified correctly (a Python float)."""
    return float((_logits(params, X)[2].argmax(axis=1) == y).mean())


def _sync(xp):
    if xp is not np:
        xp.cuda.Device().synchronize()


@dataclass
class TrainResult:
    name: str
    losses: np.ndarray  # training loss of every iteration's mini-batch
    train_loss: float  # on the whole training set, after the last step
    test_accuracy: float
    ms_per_step: float  # median time of one opt.step(buf): the fused update alone
    ms_per_iter: float  # median time of forward + backward + step


def train_mlp(
    spec: Spec,
    data: Sequence[Any],
    iters: int = 1000,
    batch: int = 128,
    backend: str = "auto",
    xp: Any = np,
    dtype: Any = np.float32,
    seed: int = 0,
    progress: Callable[..., None] | None = None,
) -> TrainResult:
    """Train the MLP on ``data = (X_train, y_train, X_test, y_test)`` with ``spec``.

    Every optimizer gets the same initial weights and the same sequence of mini-batches.
    ``progress(i, loss)`` is called now and then.
    """
    X_tr, y_tr, X_te, y_te = (xp.asarray(a) for a in data)
    X_tr, X_te = X_tr.astype(dtype), X_te.astype(dtype)
    buf = FlatBuffer(init_mlp(seed=seed, xp=xp, dtype=dtype))
    opt = spec.make("mlp", backend)
    rng = np.random.default_rng(seed + 1)
    n = X_tr.shape[0]
    losses, t_step, t_iter = [], [], []
    order, pos = rng.permutation(n), 0
    for i in range(iters):
        if pos + batch > n:
            order, pos = rng.permutation(n), 0
        idx = xp.asarray(order[pos : pos + batch])
        pos += batch
        _sync(xp)
        t0 = time.perf_counter()
        loss = mlp_loss_and_grad(buf.params, X_tr[idx], y_tr[idx], buf.grads)
        _sync(xp)
        t1 = time.perf_counter()
        opt.step(buf)
        _sync(xp)
        t2 = time.perf_counter()
        t_step.append(t2 - t1)
        t_iter.append(t2 - t0)
        losses.append(loss)
        if progress is not None and (i + 1) % max(1, iters // 10) == 0:
            progress(i + 1, float(loss))
    loss_curve = to_numpy(xp.stack(losses)).astype(np.float64)
    # the first step compiles (or loads) the kernel: leave it out of the timings
    step_ms, iter_ms = (np.array(t[1:] or t) * 1e3 for t in (t_step, t_iter))
    return TrainResult(
        spec.name,
        loss_curve,
        float(mlp_loss(buf.params, X_tr, y_tr)),
        mlp_accuracy(buf.params, X_te, y_te),
        float(np.median(step_ms)),
        float(np.median(iter_ms)),
    )
