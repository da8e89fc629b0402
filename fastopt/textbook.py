"""The chapter's optimizer classes, with the chapter's names, defaults, state and formulas.

    from fastopt.textbook import SGD, Momentum, Nesterov, AdaGrad, RMSprop, Adam

    opt = Adam(lr=0.001, beta1=0.9, beta2=0.999)
    opt.update(params, grads)      # dicts key -> array (or number); same call as the chapter's

The classic "Deep Learning from Scratch" chapter on optimizers writes six small classes with an
``update(params, grads)`` method over dicts. These classes keep its constructor signatures and
defaults, its state attributes (``v`` for Momentum and Nesterov, ``h`` for AdaGrad and RMSprop,
``m``, ``v`` and ``iter`` for Adam: dicts keyed like ``params``, created on the first update) and
its formulas (eps = 1e-7, outside the square root; Adam's ``lr_t``; Momentum's velocity;
Nesterov as the chapter writes it), which are not ``torch.optim``'s: for those, use
``fastopt.Adam`` and the other top-level classes.

Every update runs on fastopt's fused kernels: each formula is an existing per-element rule
(``kernels/``) with host scalars chosen so that the rule computes the chapter's expression
(see each class). ``backend="auto"`` runs Numba on NumPy arrays and CuPy on device arrays.

``params`` values may be:

* arrays (NumPy, or device arrays such as CuPy's): float32 or float64, updated in place, so
  the network layers that hold references to them see the new values. Arrays that are not
  C-contiguous are stepped through a contiguous copy that is written back.
* numbers (Python floats and ints, NumPy scalars): replaced in the dict by the new value, as the
  chapter's ``params[key] -= ...`` does; Python numbers are stepped in float64.

``grads`` values may be arrays or numbers; they are broadcast to the parameter's shape and cast
to its dtype, as the chapter's NumPy expressions do. Everything is checked before anything is
written: a refused call leaves ``params`` and the state as they were.
"""

import math
import numbers

import numpy as np

from ._arrays import array_module, as_xp_array
from ._validate import check_array, where
from .backends import get_backend, resolve
from .kernels import RULES

__all__ = ["EPS", "SGD", "AdaGrad", "Adam", "Momentum", "Nesterov", "RMSprop"]

#: the chapter's epsilon, added outside the square root (AdaGrad, RMSprop, Adam)
EPS = 1e-7


def _scalars(rule, **values):
    """The host scalars of ``rule`` in the order its module declares (``SCALARS``)."""
    names = RULES[rule].SCALARS
    if set(values) != set(names):
        raise AssertionError(f"rule {rule!r} takes scalars {names}, got {sorted(values)}")
    return tuple(float(values[n]) for n in names)


def _launch(backend, rule, flags, param, grad, states, k):
    """One fused pass of ``rule`` over flat arrays with explicit host scalars ``k``."""
    be = resolve(backend, param)
    if be.NAME == "numpy":  # "auto" falls back to the oracle only when numba cannot run
        raise RuntimeError(
            "fastopt.textbook runs on the per-element kernels, and no kernel "
            f"backend can run here: {get_backend('numba').why_unavailable()}"
        )
    if (be.DEVICE == "cpu") != (where(param) == "host"):
        raise ValueError(
            f"backend {be.NAME!r} runs on the {be.DEVICE} but the parameter is on "
            f"the {where(param)}; pass arrays where the backend runs or use "
            "backend='auto'"
        )
    be.launch(rule, flags, param, grad, states, k)


def _number(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _is_number(a):
    return isinstance(a, (numbers.Number, np.generic)) and not isinstance(a, np.ndarray)


class _Entry:
    """One parameter of one update, checked and flattened: what the kernel reads and writes."""

    __slots__ = ("back", "dtype", "grad", "key", "param", "scalar", "shape", "xp")

    def __init__(self, key, p, g):
        self.key = key
        self.back = []  # (original array, contiguous copy) pairs to write back after the step
        self.scalar = _is_number(p)
        if self.scalar:
            if (
                isinstance(p, (bool, np.bool_))
                or not isinstance(p, (numbers.Real, np.number))
                or isinstance(p, np.complexfloating)
            ):
                raise TypeError(
                    f"parameter {key!r} is {p!r} ({type(p).__name__}); expected a "
                    "real number or a float32/float64 array"
                )
            dt = np.dtype(p.dtype) if isinstance(p, np.floating) else np.dtype(np.float64)
            if dt.name not in ("float32", "float64"):
                raise TypeError(
                    f"parameter {key!r} is a {dt.name} scalar; fastopt.textbook "
                    "steps float32 and float64 (pass float(x) or an array)"
                )
            self.shape, self.dtype, self.xp = (), dt, np
            self.param = np.array([p], dtype=dt)
        else:
            p = as_xp_array(p)
            check_array(key, "param", p)
            if isinstance(p, np.ndarray) and not p.flags.writeable:
                raise ValueError(
                    f"parameter {key!r} ({p.dtype}{list(p.shape)}) is read-only; "
                    "it is updated in place"
                )
            self.shape, self.dtype, self.xp = tuple(p.shape), np.dtype(p.dtype), array_module(p)
            self.param = self.flat(p)
        self.grad = self._grad(g)

    def _grad(self, g):
        key, xp = self.key, self.xp
        if g is None or isinstance(g, (bool, np.bool_, str, bytes)):
            raise TypeError(f"grad of parameter {key!r} is {g!r}; expected a number or an array")
        g = as_xp_array(g)
        try:
            g = xp.asarray(g)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"grad of parameter {key!r} is a {type(g).__name__} that cannot be "
                f"read as an array: {exc}"
            ) from exc
        if g.dtype.kind not in "fiu":
            raise TypeError(f"grad of parameter {key!r} has dtype {g.dtype}; expected real numbers")
        if self.scalar:
            if g.size != 1:
                raise ValueError(
                    f"parameter {key!r} is a number but its grad has shape "
                    f"{tuple(g.shape)}; expected a number"
                )
            g = g.reshape(())
        try:
            g = xp.broadcast_to(g, self.shape)
        except ValueError:
            raise ValueError(
                f"grad of parameter {key!r} has shape {tuple(g.shape)}, which does "
                f"not broadcast to the parameter's shape {list(self.shape)}"
            ) from None
        g = xp.ascontiguousarray(g, dtype=self.dtype).reshape(-1)
        if g is self.param or xp.may_share_memory(g, self.param):
            g = g.copy()  # the kernel writes the param while it reads the grad
        return g

    def flat(self, a):
        """A 1-D view of ``a``, or of a contiguous copy that ``write_back`` copies back."""
        if a.flags.c_contiguous:
            return a.reshape(-1)
        c = self.xp.ascontiguousarray(a)
        self.back.append((a, c))
        return c.reshape(-1)

    def check_state(self, name, s):
        if s is None:
            raise KeyError(
                f"no state {name}[{self.key!r}]: the state is created on the first "
                "update for the keys of that update's params; create a new "
                "optimizer to step other keys"
            )
        if tuple(s.shape) != self.shape or np.dtype(s.dtype) != self.dtype:
            raise ValueError(
                f"state {name}[{self.key!r}] is {np.dtype(s.dtype)}"
                f"{list(s.shape)} but the parameter is {self.dtype}"
                f"{list(self.shape)}; create a new optimizer"
            )
        if where(s) != where(self.param):
            raise ValueError(
                f"state {name}[{self.key!r}] is on the {where(s)} but the "
                f"parameter is on the {where(self.param)}"
            )

    def zeros(self):
        return self.xp.zeros(self.shape, dtype=self.dtype)

    def write_back(self, params):
        for orig, copy in self.back:
            orig[...] = copy
        if self.scalar:
            params[self.key] = self.dtype.type(self.param[0])


class _Textbook:
    """The chapter's ``update(params, grads)`` around one fused launch per parameter."""

    #: names of the attributes that hold per-key state dicts (None until the first update)
    _state = ()
    #: names of the numeric hyperparameters, checked at every update
    _hyper = ()

    def __init__(self, backend):
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend == "numpy":
            raise ValueError(
                "backend 'numpy' runs torch.optim's formulas (fastopt.reference); "
                "fastopt.textbook runs the chapter's formulas on the kernels: use "
                "'auto', 'numba', 'cupy' or 'numba-cuda'"
            )
        if backend != "auto":
            get_backend(backend)  # unknown or unavailable: raise now, not at the first update
        self.backend = backend
        for h in self._hyper:
            _number(h, getattr(self, h))
        for name in self._state:
            setattr(self, name, None)

    def update(self, params, grads):
        """Step every key of ``params`` with ``grads[key]``, by the chapter's formula."""
        if not isinstance(params, dict) or not hasattr(grads, "__getitem__"):
            raise TypeError(
                "update() expects dicts key -> array or number (params, grads), "
                f"got {type(params).__name__} and {type(grads).__name__}"
            )
        hp = {h: _number(h, getattr(self, h)) for h in self._hyper}
        entries = []
        for key, p in params.items():
            try:
                g = grads[key]
            except KeyError:
                raise KeyError(f"grads has no entry for parameter {key!r}") from None
            entries.append(_Entry(key, p, g))
        if self._state and getattr(self, self._state[0]) is None:
            for name in self._state:  # the chapter's `if self.v is None: ...`
                setattr(self, name, {e.key: e.zeros() for e in entries})
        states = []
        for e in entries:
            row = []
            for name in self._state:
                s = getattr(self, name).get(e.key)
                e.check_state(name, s)
                row.append(e.flat(s))
            states.append(row)
        self._begin()
        launches = self._launches(hp)
        for e, row in zip(entries, states):
            for rule, flags, slots, k in launches:
                _launch(
                    self.backend,
                    rule,
                    flags,
                    e.param,
                    e.grad,
                    tuple(None if i is None else row[i] for i in slots),
                    k,
                )
            e.write_back(params)

    def _begin(self):
        """Per-update counters (Adam's ``iter``), once all inputs are checked."""

    def _launches(self, hp):
        """``[(rule, flags, slots, k), ...]``: the launches of one parameter's step.

        ``slots`` maps each state slot of the rule to an index into this class's ``_state``
        (or None: a slot the variant never touches)."""
        raise NotImplementedError

    def __repr__(self):
        hp = ", ".join(f"{h}={getattr(self, h)!r}" for h in self._hyper)
        be = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"{type(self).__name__}({hp}{be})"


_SGD = {"maximize": False, "decay": False, "momentum": False, "nesterov": False}
_MOMENTUM = dict(_SGD, momentum=True)
_NESTEROV = dict(_SGD, momentum=True, nesterov=True)
_ADAGRAD = {"maximize": False, "decay": False}
_RMSPROP = {"maximize": False, "decay": False, "centered": False, "momentum": False}
_ADAM = {"maximize": False, "decay": False, "decoupled": False, "amsgrad": False}


class SGD(_Textbook):
    """Stochastic gradient descent, the chapter's ``SGD(lr=0.01)``.

        p -= lr·g

    Kernel: the ``sgd`` rule without momentum, ``lr`` as its lr (exactly the chapter's
    arithmetic).
    """

    _hyper = ("lr",)

    def __init__(self, lr=0.01, *, backend="auto"):
        self.lr = lr
        super().__init__(backend)

    def _launches(self, hp):
        k = _scalars("sgd", wd=0, mu_b=0, omd_b=0, mu=0, lr=hp["lr"])
        return [("sgd", _SGD, (None,), k)]


class Momentum(_Textbook):
    """Momentum SGD, the chapter's ``Momentum(lr=0.01, momentum=0.9)``; state ``v``.

        v = momentum·v − lr·g
        p += v

    Kernel: the ``sgd`` rule with momentum, whose buffer ``b = mu_b·b + omd_b·g`` *is* the
    velocity (``mu_b = momentum``, ``omd_b = −lr``), then ``p = p − lr_k·b`` with
    ``lr_k = −1``: exactly the chapter's arithmetic.
    """

    _hyper = ("lr", "momentum")
    _state = ("v",)

    def __init__(self, lr=0.01, momentum=0.9, *, backend="auto"):
        self.lr, self.momentum = lr, momentum
        super().__init__(backend)

    def _launches(self, hp):
        k = _scalars("sgd", wd=0, mu_b=hp["momentum"], omd_b=-hp["lr"], mu=0, lr=-1)
        return [("sgd", _MOMENTUM, (0,), k)]


class Nesterov(_Textbook):
    """Nesterov momentum as the chapter writes it, ``Nesterov(lr=0.01, momentum=0.9)``; state
    ``v``.

        v = momentum·v − lr·g
        p += momentum²·v − (1 + momentum)·lr·g

    Kernel: the ``sgd`` rule with Nesterov momentum, ``b = mu_b·b + omd_b·g`` (the velocity, as
    in ``Momentum``), ``p = p − c·(g + mu_k·b)`` with ``c = (1 + momentum)·lr`` and
    ``mu_k = −momentum²/c``: the chapter's update, rounded once differently. When ``c`` is 0
    (or ``mu_k`` overflows), the step takes two launches instead: the momentum variant with
    ``lr_k = −momentum²`` (``p += momentum²·v``), then plain SGD with lr ``c``.
    """

    _hyper = ("lr", "momentum")
    _state = ("v",)

    def __init__(self, lr=0.01, momentum=0.9, *, backend="auto"):
        self.lr, self.momentum = lr, momentum
        super().__init__(backend)

    def _launches(self, hp):
        lr, mu = hp["lr"], hp["momentum"]
        c = (1 + mu) * lr
        mu_k = -(mu * mu) / c if c != 0 else math.inf
        if math.isfinite(mu_k):
            return [
                ("sgd", _NESTEROV, (0,), _scalars("sgd", wd=0, mu_b=mu, omd_b=-lr, mu=mu_k, lr=c))
            ]
        return [
            (
                "sgd",
                _MOMENTUM,
                (0,),
                _scalars("sgd", wd=0, mu_b=mu, omd_b=-lr, mu=0, lr=-(mu * mu)),
            ),
            ("sgd", _SGD, (None,), _scalars("sgd", wd=0, mu_b=0, omd_b=0, mu=0, lr=c)),
        ]


class AdaGrad(_Textbook):
    """AdaGrad, the chapter's ``AdaGrad(lr=0.01)``; state ``h``.

        h += g·g
        p −= lr·g / (√h + 1e-7)

    Kernel: the ``adagrad`` rule with ``clr = lr`` and ``eps = 1e-7`` (it rounds
    ``lr·(g/d)`` where the chapter rounds ``(lr·g)/d``).
    """

    _hyper = ("lr",)
    _state = ("h",)

    def __init__(self, lr=0.01, *, backend="auto"):
        self.lr = lr
        super().__init__(backend)

    def _launches(self, hp):
        k = _scalars("adagrad", wd=0, clr=hp["lr"], eps=EPS)
        return [("adagrad", _ADAGRAD, (0,), k)]


class RMSprop(_Textbook):
    """RMSprop, the chapter's ``RMSprop(lr=0.01, decay_rate=0.99)``; state ``h``.

        h = decay_rate·h + (1 − decay_rate)·g·g
        p −= lr·g / (√h + 1e-7)

    Kernel: the ``rmsprop`` rule (not centered, no momentum) with ``alpha = decay_rate``,
    ``oma = 1 − decay_rate`` and ``eps = 1e-7``; ``h`` is the chapter's arithmetic, the step
    rounds ``lr·(g/d)`` where the chapter rounds ``(lr·g)/d``.
    """

    _hyper = ("lr", "decay_rate")
    _state = ("h",)

    def __init__(self, lr=0.01, decay_rate=0.99, *, backend="auto"):
        self.lr, self.decay_rate = lr, decay_rate
        super().__init__(backend)

    def _launches(self, hp):
        dr = hp["decay_rate"]
        k = _scalars("rmsprop", wd=0, alpha=dr, oma=1 - dr, eps=EPS, mu=0, lr=hp["lr"])
        return [("rmsprop", _RMSPROP, (0, None, None), k)]


class Adam(_Textbook):
    """Adam as the chapter writes it, ``Adam(lr=0.001, beta1=0.9, beta2=0.999)``; state ``m``,
    ``v`` and the update counter ``iter``.

        iter += 1;  lr_t = lr·√(1 − beta2^iter) / (1 − beta1^iter)
        m += (1 − beta1)·(g − m);  v += (1 − beta2)·(g² − v)
        p −= lr_t·m / (√v + 1e-7)

    Kernel: the ``adam`` rule with ``step_size = lr_t``, ``inv_sqrt_bc2 = 1`` and
    ``eps = 1e-7``, so the step is the chapter's arithmetic; its moments
    ``m = beta1·m + (1 − beta1)·g`` equal the chapter's up to rounding.
    """

    _hyper = ("lr", "beta1", "beta2")
    _state = ("m", "v")

    def __init__(self, lr=0.001, beta1=0.9, beta2=0.999, *, backend="auto"):
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.iter = 0
        super().__init__(backend)

    def _begin(self):
        self.iter += 1

    def _launches(self, hp):
        lr, b1, b2, t = hp["lr"], hp["beta1"], hp["beta2"], self.iter
        lr_t = lr * np.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        k = _scalars(
            "adam",
            wd=0,
            decay_f=1,
            beta1=b1,
            omb1=1 - b1,
            beta2=b2,
            omb2=1 - b2,
            step_size=lr_t,
            inv_sqrt_bc2=1,
            eps=EPS,
        )
        return [("adam", _ADAM, (0, 1, None), k)]
