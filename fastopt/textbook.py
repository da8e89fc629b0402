"""The chapter's optimizer classes, with the chapter's names, defaults, state and statements.

    from fastopt.textbook import SGD, Momentum, Nesterov, AdaGrad, RMSprop, Adam

    opt = Adam(lr=0.001, beta1=0.9, beta2=0.999)
    opt.update(params, grads)      # dicts key -> array (or number); same call as the chapter's

"Deep Learning from Scratch" (O'Reilly Japan) writes six small optimizer classes in its
``common/optimizer.py``, each with an ``update(params, grads)`` method over dicts. These classes
keep its constructor signatures and defaults, its state attributes (``v`` for Momentum and
Nesterov, ``h`` for AdaGrad and RMSprop, ``m``, ``v`` and ``iter`` for Adam: dicts keyed like
``params``, created on the first update) and its update statements, in its order (each class's
docstring quotes them). Those are not ``torch.optim``'s formulas: for those, use
``fastopt.Adam`` and the other top-level classes.

How it runs: each class's ``_rule()`` is the body of the chapter's ``for key in params`` loop
for one element, statement by statement (``p = p + s`` for ``params[key] += s``), with the
chapter's constants as host scalars. It is compiled as one fused pass per parameter by the loop
generators every rule uses, through the backends' ``element_runner``: on the host Numba's
(``numba_backend.python_loop``: a ``prange`` loop from 2^15 elements), on a GPU numba-cuda's
grid-stride kernel (``numba_cuda_backend.kernel_source``) for any device array (CuPy's
included). The scalars take the types NumPy gives
the chapter's expressions (NumPy 2's promotion rules): a Python float next to a float32 array is
rounded to float32 and the math stays float32, except Adam's ``lr_t``, a ``np.float64`` (from
``np.sqrt``), which makes its parameter step float64 math rounded once into a float32 array, as
the chapter's ``params[key] -= lr_t * m / ...`` does. Compiled without ``fastmath``, the host
results equal the chapter's NumPy code bit for bit on float32 and float64 arrays and Python
floats; a GPU compiler may contract a multiply and an add into one fused multiply-add (one
rounding instead of two), so there they agree to rounding.

``params`` values may be:

* arrays (NumPy, or device arrays such as CuPy's): float32 or float64, updated in place, so
  the network layers that hold references to them see the new values. Arrays that are not
  C-contiguous are stepped through a contiguous copy that is written back. ``np.matrix`` and
  masked arrays are refused (the chapter's ``*`` is a matrix product on the one and skips masked
  elements on the other); other ``ndarray`` subclasses are stepped through a plain view.
* numbers (Python floats and ints, NumPy scalars): replaced in the dict by the new value, as the
  chapter's ``params[key] -= ...`` does; Python numbers are stepped in float64.

``grads`` values may be arrays or numbers; they are broadcast to the parameter's shape and cast
to its dtype (where a grad's dtype differs from its parameter's, the chapter's NumPy computes in
the wider one: pass grads of the parameter's dtype to match it bit for bit). Hyperparameters are
Python numbers (converted with ``float``), as the chapter's defaults are.

Everything is checked before anything is written: every parameter, grad and state array of every
key (kind, dtype, shape, device, writability, overlap), the hyperparameters and the host scalars
(Adam's ``lr_t``, computed before ``iter`` advances). A refused call raises ``TypeError``,
``ValueError`` or ``KeyError`` and leaves ``params``, the state and ``iter`` as they were.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from ._arrays import array_module, as_xp_array
from ._validate import check_array, residence
from .backends import BACKENDS, get_backend

__all__ = ["EPS", "SGD", "AdaGrad", "Adam", "Momentum", "Nesterov", "RMSprop"]

#: the chapter's epsilon, added outside the square root (AdaGrad, RMSprop, Adam)
EPS = 1e-7

#: the backends the chapter's statements compile for: host arrays, device arrays
HOST, DEVICE = "numba", "numba-cuda"


def _number(name: str, value: object) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    return float(value)


def _is_number(a: object) -> bool:
    return isinstance(a, (numbers.Number, np.generic)) and not isinstance(a, np.ndarray)


def _plain(what: str, a: Any) -> Any:
    """``a`` without an ``ndarray`` subclass: ``np.matrix`` and masked arrays are refused (their
    arithmetic is not the chapter's elementwise NumPy), any other subclass becomes a plain
    ``ndarray`` view of the same memory (so the flat view the kernel walks is the array's)."""
    if isinstance(a, np.ndarray) and type(a) is not np.ndarray:
        if isinstance(a, (np.matrix, np.ma.MaskedArray)):
            raise TypeError(
                f"{what} is a {type(a).__module__}.{type(a).__name__}; expected a plain "
                "ndarray (np.matrix multiplies as matrices and masked arrays skip masked "
                "elements: convert it with np.asarray first)"
            )
        return a.view(np.ndarray)
    return a


# -- the compiled passes ------------------------------------------------------------------------
def _run(
    be: ModuleType,
    cls: type[_Textbook],
    param: Any,
    grad: Any,
    states: tuple[Any, ...],
    k: tuple[Any, ...],
) -> None:
    """One fused pass of ``cls._rule()`` over flat arrays: the backend's ``element_runner``
    (``numba_backend`` on the host, ``numba_cuda_backend`` on a GPU; compiled once per class)."""
    run = be.element_runner(f"textbook.{cls.__name__}", cls._rule, len(cls._state))
    run(param, grad, states, k)


class _Entry:
    """One parameter of one update: its arrays, checked; flattened just before its launch."""

    __slots__ = (
        "array",
        "be",
        "dtype",
        "grad",
        "key",
        "python",
        "scalar",
        "shape",
        "states",
        "xp",
    )

    key: Any
    states: tuple[Any, ...]
    scalar: bool
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    xp: Any
    array: Any
    grad: Any
    python: bool
    be: ModuleType

    def __init__(self, key: Any, p: Any, g: Any) -> None:
        self.key = key
        self.states = ()
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
            self.array = np.array([p], dtype=dt)
        else:
            p = as_xp_array(_plain(f"parameter {key!r}", p))
            check_array(key, "param", p)
            if isinstance(p, np.ndarray) and not p.flags.writeable:
                raise ValueError(
                    f"parameter {key!r} ({p.dtype}{list(p.shape)}) is read-only; "
                    "it is updated in place"
                )
            self.shape, self.dtype, self.xp = tuple(p.shape), np.dtype(p.dtype), array_module(p)
            self.array = p
        self.grad = self._grad(g)
        # Python numbers both: the chapter's arithmetic without an array stays a Python float
        self.python = all(
            isinstance(x, numbers.Real) and not isinstance(x, np.generic) for x in (p, g)
        )

    def _grad(self, g: Any) -> Any:
        """The grad as an array of the caller's memory, checked: real, broadcastable."""
        key, xp = self.key, self.xp
        if g is None or isinstance(g, (bool, np.bool_, str, bytes)):
            raise TypeError(f"grad of parameter {key!r} is {g!r}; expected a number or an array")
        g = as_xp_array(_plain(f"grad of parameter {key!r}", g))
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
            return xp.broadcast_to(g, self.shape)
        except ValueError:
            raise ValueError(
                f"grad of parameter {key!r} has shape {tuple(g.shape)}, which does "
                f"not broadcast to the parameter's shape {list(self.shape)}"
            ) from None

    def check_state(self, name: str, table: Any, others: list[tuple[str, Any]]) -> Any:
        """``table[key]`` (the state dict ``name``) is an array the kernel may write: the
        parameter's shape, dtype and device, writable, sharing memory with neither the
        parameter, nor the grad, nor ``others`` (this key's state arrays checked before it)."""
        what = f"state {name}[{self.key!r}]"
        if not isinstance(table, dict):
            raise TypeError(
                f"state {name} is a {type(table).__name__}; expected the dict key -> array "
                "that the first update created"
            )
        s = table.get(self.key)
        if s is None:
            raise KeyError(
                f"no state {name}[{self.key!r}]: the state is created on the first "
                "update for the keys of that update's params; create a new "
                "optimizer to step other keys"
            )
        if _is_number(s) or not hasattr(s, "shape") or not hasattr(s, "dtype"):
            raise TypeError(f"{what} is a {type(s).__name__}; expected an array")
        s = _plain(what, s)
        if tuple(s.shape) != self.shape or np.dtype(s.dtype) != self.dtype:
            raise ValueError(
                f"{what} is {np.dtype(s.dtype)}{list(s.shape)} but the parameter is "
                f"{self.dtype}{list(self.shape)}; create a new optimizer"
            )
        if residence(s) != residence(self.array):
            raise ValueError(
                f"{what} is on the {residence(s)} but the parameter is on the "
                f"{residence(self.array)}"
            )
        if isinstance(s, np.ndarray) and not s.flags.writeable:
            raise ValueError(
                f"{what} ({s.dtype}{list(s.shape)}) is read-only; it is updated in place"
            )
        for role, other in (("the parameter", self.array), ("the grad", self.grad), *others):
            if self.xp.may_share_memory(s, other):
                raise ValueError(
                    f"{what} shares memory with {role}; each state array must be memory of "
                    "its own (the chapter's np.zeros_like)"
                )
        return s

    def zeros(self) -> Any:
        return self.xp.zeros(self.shape, dtype=self.dtype)

    def launch(self, cls: type[_Textbook], params: dict[Any, Any], k: tuple[Any, ...]) -> None:
        """Flatten (contiguous copies where needed, made now: after the launches of the keys
        before this one, as the chapter's loop reads them), run, write back."""
        xp, back = self.xp, []

        def flat(a: Any) -> Any:
            if a.flags.c_contiguous:
                return a.reshape(-1)
            c = xp.ascontiguousarray(a)
            back.append((a, c))
            return c.reshape(-1)

        param = flat(self.array)
        grad = xp.ascontiguousarray(self.grad, dtype=self.dtype).reshape(-1)
        if xp.may_share_memory(grad, param):
            grad = grad.copy()  # the kernel writes the param while it reads the grad
        _run(self.be, cls, param, grad, tuple(flat(s) for s in self.states), k)
        for orig, copy in back:
            orig[...] = copy
        if self.scalar:  # a new value in the dict, of the type the chapter's expression gives
            new = self.dtype.type(self.array[0])
            params[self.key] = float(new) if self.python and not cls._state else new


class _Textbook:
    """The chapter's ``update(params, grads)``: one fused pass per parameter of ``_rule()``."""

    #: names of the attributes that hold per-key state dicts (None until the first update)
    _state: ClassVar[tuple[str, ...]] = ()
    #: names of the numeric hyperparameters, checked at every update
    _hyper: ClassVar[tuple[str, ...]] = ()
    #: indices of the scalars that are ``np.float64`` in the chapter's expressions (not Python
    #: floats): they stay float64 next to float32 arrays, as NumPy's promotion keeps them
    _wide: ClassVar[tuple[int, ...]] = ()

    def __init__(self, backend: str) -> None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend not in BACKENDS and backend != "auto":
            get_backend(backend)  # an unknown name: its own message
        if backend not in ("auto", HOST, DEVICE):
            numpy = " ('numpy' runs torch.optim's formulas, fastopt.reference)"
            raise ValueError(
                f"backend {backend!r}: fastopt.textbook compiles the chapter's statements "
                f"with Numba, '{HOST}' for host arrays and '{DEVICE}' for device arrays "
                f"(CuPy's included): use 'auto' (it picks by the arrays), '{HOST}' or "
                f"'{DEVICE}'{numpy if backend == 'numpy' else ''}"
            )
        if backend != "auto":
            get_backend(backend)  # unavailable: raise now, not at the first update
        self.backend = backend
        for h in self._hyper:
            _number(h, getattr(self, h))
        for name in self._state:
            setattr(self, name, None)

    def update(self, params: dict[Any, Any], grads: Mapping[Any, Any]) -> None:
        """Step every key of ``params`` with ``grads[key]``, by the chapter's statements."""
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
        for e in entries:
            e.be = self._backend_for(e)
        k = self._scalars(hp)  # before anything changes: a refused scalar writes nothing
        with np.errstate(over="ignore"):  # a scalar beyond float32 is inf, as in NumPy
            typed = {
                dt: tuple(np.float64(x) if i in self._wide else dt.type(x) for i, x in enumerate(k))
                for dt in {e.dtype for e in entries}
            }
        fresh = bool(self._state) and getattr(self, self._state[0]) is None
        tables = {
            name: {e.key: e.zeros() for e in entries} if fresh else getattr(self, name)
            for name in self._state
        }
        for e in entries:  # every key's state, checked before the first launch
            checked: list[tuple[str, Any]] = []
            for name in self._state:
                s = e.check_state(name, tables[name], checked)
                checked.append((f"state {name}[{e.key!r}]", s))
            e.states = tuple(s for _, s in checked)
        # everything is checked: from here on nothing is refused
        if fresh:
            for name in self._state:  # the chapter's `if self.v is None: ...`
                setattr(self, name, tables[name])
        self._begin()
        for e in entries:
            e.launch(type(self), params, typed[e.dtype])

    def _backend_for(self, e: _Entry) -> ModuleType:
        """The backend module that runs an entry (numba for host arrays, numba-cuda for device
        arrays), after checking that it can run and reaches them."""
        name = self.backend
        if name == "auto":
            name = DEVICE if residence(e.array) == "device" else HOST
        try:
            be = get_backend(name)
        except RuntimeError as exc:
            raise RuntimeError(
                f"fastopt.textbook runs the chapter's statements compiled by Numba ({name!r} "
                f"for parameter {e.key!r}), which cannot run here: {exc}"
            ) from None
        if (be.DEVICE == "cpu") != (residence(e.array) == "host"):
            raise ValueError(
                f"backend {be.NAME!r} runs on the {be.DEVICE} but parameter {e.key!r} is on "
                f"the {residence(e.array)}; pass arrays where the backend runs or use "
                "backend='auto'"
            )
        return be

    def _scalars(self, hp: dict[str, float]) -> tuple[Any, ...]:
        """The host scalars of one update (Python floats), in ``_rule()``'s order."""
        raise NotImplementedError

    def _begin(self) -> None:
        """Per-update counters (Adam's ``iter``), once everything is checked."""

    @staticmethod
    def _rule() -> Callable[..., Any]:
        """``rule(p, g, *state, k) -> (p, *state)``: the chapter's statements for one element."""
        raise NotImplementedError

    def __repr__(self) -> str:
        hp = ", ".join(f"{h}={getattr(self, h)!r}" for h in self._hyper)
        be = "" if self.backend == "auto" else f", backend={self.backend!r}"
        return f"{type(self).__name__}({hp}{be})"


class SGD(_Textbook):
    """Stochastic gradient descent, the chapter's ``SGD(lr=0.01)``::

    for key in params.keys():
        params[key] -= self.lr * grads[key]
    """

    _hyper = ("lr",)

    def __init__(self, lr: float = 0.01, *, backend: str = "auto") -> None:
        self.lr = lr
        super().__init__(backend)

    def _scalars(self, hp: dict[str, float]) -> tuple[Any, ...]:
        return (hp["lr"],)

    @staticmethod
    def _rule() -> Callable[..., Any]:
        def sgd(p, g, k):
            (lr,) = k
            p = p - lr * g
            return (p,)

        return sgd


class Momentum(_Textbook):
    """Momentum SGD, the chapter's ``Momentum(lr=0.01, momentum=0.9)``; state ``v``::

    for key in params.keys():
        self.v[key] = self.momentum*self.v[key] - self.lr*grads[key]
        params[key] += self.v[key]
    """

    _hyper = ("lr", "momentum")
    _state = ("v",)

    def __init__(self, lr: float = 0.01, momentum: float = 0.9, *, backend: str = "auto") -> None:
        self.lr, self.momentum = lr, momentum
        super().__init__(backend)

    def _scalars(self, hp: dict[str, float]) -> tuple[Any, ...]:
        return (hp["momentum"], hp["lr"])

    @staticmethod
    def _rule() -> Callable[..., Any]:
        def momentum(p, g, v, k):
            mu, lr = k
            v = mu * v - lr * g
            p = p + v
            return p, v

        return momentum


class Nesterov(_Textbook):
    """Nesterov's accelerated gradient as the chapter writes it, ``Nesterov(lr=0.01,
    momentum=0.9)``; state ``v``. The parameter moves with the *previous* velocity, then the
    velocity is updated::

        for key in params.keys():
            params[key] += self.momentum * self.momentum * self.v[key]
            params[key] -= (1 + self.momentum) * self.lr * grads[key]
            self.v[key] *= self.momentum
            self.v[key] -= self.lr * grads[key]

    that is ``p += μ²·v − (1 + μ)·lr·g``, then ``v = μ·v − lr·g``: one pass (``μ²`` and
    ``(1 + μ)·lr`` are the chapter's Python-float products, the host scalars).
    """

    _hyper = ("lr", "momentum")
    _state = ("v",)

    def __init__(self, lr: float = 0.01, momentum: float = 0.9, *, backend: str = "auto") -> None:
        self.lr, self.momentum = lr, momentum
        super().__init__(backend)

    def _scalars(self, hp: dict[str, float]) -> tuple[Any, ...]:
        mu, lr = hp["momentum"], hp["lr"]
        return (mu * mu, (1 + mu) * lr, mu, lr)

    @staticmethod
    def _rule() -> Callable[..., Any]:
        def nesterov(p, g, v, k):
            mu_mu, c, mu, lr = k
            p = p + mu_mu * v
            p = p - c * g
            v = v * mu
            v = v - lr * g
            return p, v

        return nesterov


class AdaGrad(_Textbook):
    """AdaGrad, the chapter's ``AdaGrad(lr=0.01)``; state ``h``::

    for key in params.keys():
        self.h[key] += grads[key] * grads[key]
        params[key] -= self.lr * grads[key] / (np.sqrt(self.h[key]) + 1e-7)
    """

    _hyper = ("lr",)
    _state = ("h",)

    def __init__(self, lr: float = 0.01, *, backend: str = "auto") -> None:
        self.lr = lr
        super().__init__(backend)

    def _scalars(self, hp: dict[str, float]) -> tuple[Any, ...]:
        return (hp["lr"], EPS)

    @staticmethod
    def _rule() -> Callable[..., Any]:
        def adagrad(p, g, h, k):
            lr, eps = k
            h = h + g * g
            p = p - lr * g / (math.sqrt(h) + eps)
            return p, h

        return adagrad


class RMSprop(_Textbook):
    """RMSprop, the chapter's ``RMSprop(lr=0.01, decay_rate=0.99)``; state ``h``::

    for key in params.keys():
        self.h[key] *= self.decay_rate
        self.h[key] += (1 - self.decay_rate) * grads[key] * grads[key]
        params[key] -= self.lr * grads[key] / (np.sqrt(self.h[key]) + 1e-7)
    """

    _hyper = ("lr", "decay_rate")
    _state = ("h",)

    def __init__(
        self, lr: float = 0.01, decay_rate: float = 0.99, *, backend: str = "auto"
    ) -> None:
        self.lr, self.decay_rate = lr, decay_rate
        super().__init__(backend)

    def _scalars(self, hp: dict[str, float]) -> tuple[Any, ...]:
        dr = hp["decay_rate"]
        return (dr, 1 - dr, hp["lr"], EPS)

    @staticmethod
    def _rule() -> Callable[..., Any]:
        def rmsprop(p, g, h, k):
            dr, omd, lr, eps = k
            h = h * dr
            h = h + omd * g * g
            p = p - lr * g / (math.sqrt(h) + eps)
            return p, h

        return rmsprop


class Adam(_Textbook):
    """Adam as the chapter writes it, ``Adam(lr=0.001, beta1=0.9, beta2=0.999)``; state ``m``,
    ``v`` and the update counter ``iter``::

        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.iter) / (1.0 - self.beta1**self.iter)
        for key in params.keys():
            self.m[key] += (1 - self.beta1) * (grads[key] - self.m[key])
            self.v[key] += (1 - self.beta2) * (grads[key]**2 - self.v[key])
            params[key] -= lr_t * self.m[key] / (np.sqrt(self.v[key]) + 1e-7)

    ``lr_t`` is computed with that very expression (a ``np.float64``) before ``iter`` advances:
    betas whose powers overflow (``beta1=1e200``) are refused with ``iter`` and everything else
    unchanged.
    """

    _hyper = ("lr", "beta1", "beta2")
    _state = ("m", "v")
    _wide = (3,)  # lr_t

    def __init__(
        self, lr: float = 0.001, beta1: float = 0.9, beta2: float = 0.999, *, backend: str = "auto"
    ) -> None:
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.iter = 0
        super().__init__(backend)

    def _scalars(self, hp: dict[str, float]) -> tuple[Any, ...]:
        lr, b1, b2, it = hp["lr"], hp["beta1"], hp["beta2"], self.iter
        if isinstance(it, (bool, np.bool_)) or not isinstance(it, numbers.Integral) or it < 0:
            raise TypeError(f"iter must be an integer >= 0 (updates so far), got {it!r}")
        t = int(it) + 1
        try:
            lr_t = lr * np.sqrt(1.0 - b2**t) / (1.0 - b1**t)
        except (ArithmeticError, TypeError, ValueError) as exc:
            raise ValueError(
                f"Adam(lr={lr!r}, beta1={b1!r}, beta2={b2!r}): lr_t at iter {t} cannot be "
                f"computed ({type(exc).__name__}: {exc}); nothing was updated"
            ) from None
        if not isinstance(lr_t, (float, np.floating)):
            raise ValueError(
                f"Adam(lr={lr!r}, beta1={b1!r}, beta2={b2!r}): lr_t at iter {t} is {lr_t!r}, "
                "not a real number; nothing was updated"
            )
        return (1 - b1, 1 - b2, EPS, lr_t)

    def _begin(self) -> None:
        self.iter += 1

    @staticmethod
    def _rule() -> Callable[..., Any]:
        def adam(p, g, m, v, k):
            omb1, omb2, eps, lr_t = k
            m = m + omb1 * (g - m)
            v = v + omb2 * (g * g - v)
            p = p - lr_t * m / (math.sqrt(v) + eps)
            return p, m, v

        return adam
