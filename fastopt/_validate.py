"""Checks that run before a step, a state load or a checkpoint load changes anything.

Every public entry point validates *all* of its inputs with these helpers first and only then
writes, so a refused call leaves every parameter and every state buffer byte-for-byte as it was.
Errors are ``TypeError`` (wrong kind of object or dtype), ``ValueError`` (wrong shape, layout,
memory, value) or ``KeyError`` (wrong names); each names the parameter, what it got and what
was expected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ._arrays import _span, backing_error
from .backends import is_device_array

__all__ = [
    "SUPPORTED_DTYPES",
    "NonFiniteGradientError",
    "all_finite",
    "check_array",
    "check_backed",
    "check_like",
    "check_names",
    "check_no_overlap",
    "check_number",
    "check_param_arrays",
    "check_reach",
    "check_state_arrays",
    "check_step",
    "check_str_names",
    "check_writable",
    "describe",
    "dtype_name",
    "dtype_of",
    "is_array",
    "normalise_hyper",
    "residence",
]

#: param dtypes every backend steps (a backend module may narrow this with ``DTYPES``); the math
#: runs in float32 for the 16-bit ones (``fastopt.precision``)
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: what ``check_array`` accepts unless told otherwise (callers without mixed precision)
#: ``(label, array, written)``: one buffer of a step, for ``check_no_overlap``
Overlap = tuple[str, Any, bool]

FULL_PRECISION = ("float32", "float64")


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient holds NaN or ±inf and the optimizer was built with ``nonfinite="raise"``.

    Both a ``FloatingPointError`` (what it is) and a ``ValueError`` (bad input), so either
    ``except`` clause catches it.
    """


def is_array(a: object) -> bool:
    return isinstance(a, np.ndarray) or is_device_array(a)


def residence(a: Any) -> str:
    """``"host"`` or ``"device"``: where an array's memory resides (the address space its
    pointer lives in; ``kernels.spec.where`` is another thing, the recordable select)."""
    return "device" if is_device_array(a) and not isinstance(a, np.ndarray) else "host"


def dtype_of(a: Any) -> np.dtype[Any]:
    try:
        return np.dtype(a.dtype)
    except (TypeError, AttributeError):  # e.g. a framework dtype object: use the interface
        return np.dtype(a.__cuda_array_interface__["typestr"])


def _is_float(dt):
    """A floating dtype: NumPy's, or ml_dtypes' bfloat16 (a NumPy "void" kind)."""
    return dt.kind == "f" or (dt.name == "bfloat16" and dt.itemsize == 2)


def dtype_name(dt: Any) -> str:
    """``float32``; a non-native byte order is spelled out: ``>f4 (big-endian float32)``."""
    dt = np.dtype(dt)
    if dt.isnative:
        return dt.name
    order = "big-endian" if dt.byteorder == ">" else "little-endian"
    return f"{dt.str} ({order} {dt.name})"


def describe(a: Any) -> str:
    """``float32[3, 4] on host``: what an error message says an array is."""
    if not is_array(a):
        return f"a {type(a).__name__}"
    return f"{dtype_name(dtype_of(a))}{list(a.shape)} on {residence(a)}"


_KIND = {
    "i": "integer",
    "u": "unsigned integer",
    "c": "complex",
    "b": "boolean",
    "O": "object",
    "U": "string",
    "S": "bytes",
    "V": "void",
    "M": "datetime",
    "m": "timedelta",
    "f": "floating",
}


def _who(name, who):
    return f"parameter {name!r}" if who is None else who


def _check_plain(role, who, a):
    """Not an ndarray subclass: ``np.matrix`` stays 2-D under ``reshape(-1)``, a masked array
    carries a mask the kernels cannot see, any other may index differently. The doors hand
    their inputs through ``fastopt._arrays.as_xp_array`` first, which views such an array as a
    plain ndarray (and refuses a masked one); what reaches a check unconverted (a state buffer
    rebound by the user, say) is refused here."""
    if isinstance(a, np.ndarray) and type(a) is not np.ndarray:
        kind = f"{type(a).__module__}.{type(a).__name__}"
        raise TypeError(
            f"{role} of {who} is a {kind} (an ndarray subclass); expected a plain "
            "numpy.ndarray: a subclass may index differently (np.matrix stays 2-D) or carry a "
            "mask the kernels would ignore (pass a.view(np.ndarray), or a.filled(...) for a "
            "masked array)"
        )


def check_array(
    name: Any,
    role: str,
    a: Any,
    supported: tuple[str, ...] = FULL_PRECISION,
    who: str | None = None,
) -> np.dtype[Any]:
    """``a`` is a plain NumPy or a device array of a supported float dtype in native byte
    order (``role``: param/grad/...; ``who``: what the message names, by default the
    parameter)."""
    who = _who(name, who)
    if not is_array(a):
        raise TypeError(
            f"{role} of {who} is a {type(a).__name__}; expected a NumPy array or a "
            "device (__cuda_array_interface__) array"
        )
    _check_plain(role, who, a)
    dt = dtype_of(a)
    if not _is_float(dt):
        raise TypeError(
            f"{role} of {who} is {describe(a)} "
            f"({_KIND.get(dt.kind, dt.kind)} dtype); expected a floating dtype "
            f"({' or '.join(supported)})"
        )
    if not dt.isnative:
        raise TypeError(
            f"{role} of {who} is {describe(a)}: non-native byte order; the kernels "
            f"read native-endian {' and '.join(supported)} (convert it first, e.g. "
            "a.astype(a.dtype.newbyteorder('=')))"
        )
    if dt.name not in supported:
        raise TypeError(
            f"{role} of {who} is {describe(a)}; this backend steps {' and '.join(supported)} only"
        )
    return dt


def _c_contiguous(a):
    if isinstance(a, np.ndarray) or hasattr(a, "flags"):
        return bool(a.flags.c_contiguous)
    cai = a.__cuda_array_interface__
    return cai.get("strides") is None or tuple(cai["strides"]) == _c_strides(
        cai["shape"], np.dtype(cai["typestr"]).itemsize
    )


def check_backed(name: Any, role: str, a: Any, who: str | None = None) -> None:
    """Every byte host array ``a`` reaches lies in live memory (``_arrays.backing_error``): not
    a view of an array resized or freed since, nor of a torch tensor whose storage shrank."""
    if isinstance(a, np.ndarray):
        why = backing_error(a)
        if why is not None:
            raise ValueError(f"{role} of {_who(name, who)} ({describe(a)}) {why}")


def check_writable(name: Any, role: str, a: Any, who: str | None = None) -> None:
    """``a`` can be updated in place by a flat kernel: C-contiguous, writeable, and backed by
    live memory (``check_backed``)."""
    who = _who(name, who)
    check_backed(name, role, a, who)
    if not _c_contiguous(a):
        raise ValueError(
            f"{role} of {who} ({describe(a)}) is not C-contiguous; "
            "a fused step updates flat contiguous memory in place (pass a "
            "contiguous array, or pack the parameters into a fastopt.FlatBuffer)"
        )
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        raise ValueError(
            f"{role} of {who} ({describe(a)}) is read-only; expected a writeable array"
        )


def check_like(
    name: Any,
    role: str,
    a: Any,
    param: Any,
    who: str | None = None,
    exc: type[Exception] = ValueError,
    dtype: Any = None,
) -> None:
    """``a`` (a state buffer) has its parameter's shape and dtype (byte order included), or
    the storage dtype ``dtype`` when one is given."""
    want = dtype_of(param) if dtype is None else np.dtype(dtype)
    if is_array(a):
        _check_plain(role, _who(name, who), a)
    if not is_array(a) or tuple(a.shape) != tuple(param.shape) or dtype_of(a) != want:
        expected = describe(param) if dtype is None else f"{dtype_name(want)}{list(param.shape)}"
        raise exc(
            f"{role} of {_who(name, who)} is {describe(a)}; expected "
            f"{expected}, like the parameter it belongs to"
            + ("" if dtype is None else f" (its state is stored in {dtype_name(want)})")
        )


def check_param_arrays(
    name: Any,
    param: Any,
    grad: Any,
    states: Iterable[tuple[str, Any]],
    supported: tuple[str, ...] = SUPPORTED_DTYPES,
    who: str | None = None,
    state_dtype: Any = None,
    grad_written: bool = False,
) -> tuple[np.dtype[Any], list[Overlap]]:
    """Everything one parameter's fused launch needs of its arrays, before anything runs.

    ``param`` and every present state buffer (``states``: ``(state name, array or None)``) are
    of a supported native float dtype, C-contiguous and writeable, shaped like the param; the
    state buffers typed ``state_dtype`` (default: the param's dtype); ``grad`` has the param's
    shape, and its dtype or float32 (any strides; C-contiguous and writeable when
    ``grad_written``). Returns the param's dtype and the ``check_no_overlap`` entries of the
    arrays (the caller checks them all at once). The one place both the optimizer classes and
    ``fastopt.functional`` check a launch's arrays.
    """
    pd = check_array(name, "param", param, supported, who)
    gd = check_array(name, "grad", grad, supported + ("float32",), who)
    who = _who(name, who)
    if gd != pd and gd != np.dtype(np.float32):
        raise TypeError(
            f"{who} is {describe(param)} but its grad is {describe(grad)}; expected "
            f"{dtype_name(pd)}"
            + ("" if pd == np.float32 else " or float32")
            + " (cast the gradient explicitly: a silent cast would hide a precision loss)"
        )
    if tuple(grad.shape) != tuple(param.shape):
        raise ValueError(
            f"{who} is {describe(param)} but its grad is {describe(grad)}; "
            "expected the grad shaped like the param"
        )
    check_writable(name, "param", param, who)
    if grad_written:
        check_writable(name, "grad", grad, who)
    else:
        check_backed(name, "grad", grad, who)
    entries = [(who, param, True), (f"grad of {who}", grad, grad_written)]
    return pd, entries + check_state_arrays(name, param, states, who, state_dtype)


def check_state_arrays(
    name: Any,
    param: Any,
    states: Iterable[tuple[str, Any]],
    who: str | None = None,
    state_dtype: Any = None,
) -> list[Overlap]:
    """Each present state buffer (``(state name, array or None)``) shaped like its (already
    checked) param and typed ``state_dtype`` (default: the param's dtype; the fp32 master copy
    ``"master_param"`` always float32, a remainder ``"master_remainder"`` int16), C-contiguous
    and writeable; returns their overlap entries."""
    who = _who(name, who)
    entries: list[Overlap] = []
    for s, a in states:
        if a is None:
            continue
        role = f"state {s!r}"
        dt = {"master_param": np.float32, "master_remainder": np.int16}.get(s, state_dtype)
        check_like(name, role, a, param, who, dtype=dt)
        check_writable(name, role, a, who)
        entries.append((f"{role} of {who}", a, True))
    return entries


def check_reach(
    be: Any, arrays: Sequence[tuple[str, Any]], what: str, exc: type[Exception] = ValueError
) -> None:
    """All of ``arrays`` (``(label, array)``) live in one address space that backend module
    ``be`` can reach (host arrays for a CPU backend, device arrays for a GPU one)."""
    spaces: dict[str, str] = {}
    for label, a in arrays:
        spaces.setdefault(residence(a), label)
    if len(spaces) > 1:
        raise exc(
            f"{spaces['host']} is a host array but {spaces['device']} is a device array; "
            f"{what} must all live on one device"
        )
    if arrays:
        device = getattr(be, "DEVICE", "cpu")
        label, first = arrays[0]
        if (device == "cpu") != (residence(first) == "host"):
            raise exc(
                f"backend {be.NAME!r} runs on the {device} but {label} is "
                f"{describe(first)}; pass arrays where the backend runs or use "
                "backend='auto'"
            )


def _c_strides(shape, itemsize):
    strides, acc = [], itemsize
    for n in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


def _extent(a):
    """``(lo, hi)``: the half-open byte range ``a`` can touch, or None when it is empty."""
    if isinstance(a, np.ndarray):
        return _span(a)
    cai = a.__cuda_array_interface__
    shape = tuple(int(n) for n in cai["shape"])
    if math.prod(shape) == 0:
        return None
    itemsize = np.dtype(cai["typestr"]).itemsize
    strides = cai.get("strides") or _c_strides(shape, itemsize)
    lo = hi = int(cai["data"][0])
    for n, s in zip(shape, strides):
        if s < 0:
            lo += (n - 1) * s
        else:
            hi += (n - 1) * s
    return lo, hi + itemsize


def _shares(a, b):
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        # exact answer for host arrays (bounds may overlap without sharing for strided grads);
        # only reached when the bounds overlap, which well-formed inputs never do
        return np.shares_memory(a, b)
    return True  # device arrays: bounds are all we can know without touching the device


def check_no_overlap(entries: Sequence[Overlap]) -> None:
    """Refuse when a buffer that the step writes shares memory with any other buffer of it.

    ``entries``: ``(label, array, written)``. Reads may overlap reads (two grads viewing the same
    memory are harmless); a written buffer (param, state) must overlap nothing. A sweep over the
    byte ranges sorted by start finds the candidates in O(n log n); a candidate is confirmed
    exactly with ``np.shares_memory`` on the host.
    """
    if len(entries) <= 8 and all(isinstance(a, np.ndarray) for _, a, _ in entries):
        # a few host arrays (one functional call): pairwise bounds checks beat sorting extents
        for i, (label, a, written) in enumerate(entries):
            for other, b, other_written in entries[:i]:
                if (
                    (written or other_written)
                    and np.may_share_memory(a, b)
                    and np.shares_memory(a, b)
                ):
                    _overlap_error(other, other_written, label)
        return
    spans = []
    for label, a, written in entries:
        ext = _extent(a)
        if ext is not None:
            spans.append((residence(a), ext[0], ext[1], label, a, written))
    spans.sort(key=lambda s: (s[0], s[1]))
    active: list[tuple[Any, ...]] = []
    for span in spans:
        space, lo, _, label, a, written = span
        active = [s for s in active if s[0] == space and s[2] > lo]
        for prev in active:
            if (written or prev[5]) and _shares(a, prev[4]):
                _overlap_error(prev[3], prev[5], label)
        active.append(span)


def _overlap_error(first, first_written, second):
    raise ValueError(
        f"{first} and {second} share memory; a step writes "
        f"{first if first_written else second} in place, so every parameter, "
        "gradient and state buffer must be a separate array (copy the gradient "
        "first)"
    )


def all_finite(a: Any) -> bool:
    """One fused reduction: True when ``a`` holds no NaN and no ±inf."""
    if residence(a) == "host":
        return bool(np.isfinite(a).all())
    import cupy  # device arrays are reduced on the device; only the boolean comes back

    return bool(cupy.isfinite(cupy.asarray(a)).all())


def check_names(got: Iterable[Any], expected: Iterable[Any], what: str, where_: str) -> None:
    """Same names, or a ``KeyError`` listing the missing and the unexpected ones."""
    got, expected = set(got), set(expected)
    if got != expected:
        raise KeyError(
            f"{what} differ from {where_}: missing {sorted(expected - got, key=str)}, "
            f"unexpected {sorted(got - expected, key=str)}"
        )


def check_str_names(names: Iterable[Any], what: str) -> None:
    """Every parameter name is a ``str`` (state dicts and checkpoints are keyed by them)."""
    for n in names:
        if not isinstance(n, str):
            raise TypeError(
                f"{what} must be strings, got {n!r} ({type(n).__name__}); name "
                "every parameter with a str (state_dict and checkpoints key on it)"
            )


def check_number(
    name: str,
    value: object,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """A real, non-NaN number inside the given bounds, as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(
        value, (int, float, np.integer, np.floating)
    ):
        raise TypeError(
            f"invalid {name}: {value!r} is a {type(value).__name__}; expected a real number"
        )
    v = float(value)
    ok = math.isfinite(v)
    if ok and lo is not None:
        ok = v > lo if lo_open else v >= lo
    if ok and hi is not None:
        ok = v < hi if hi_open else v <= hi
    if not ok:
        rng = []
        if lo is not None:
            rng.append(f"{lo} {'<' if lo_open else '<='} {name}")
        if hi is not None:
            rng.append(f"{name} {'<' if hi_open else '<='} {hi}")
        raise ValueError(
            f"invalid {name}: {value!r}; expected {' and '.join(rng)}"
            + ("" if math.isfinite(v) else " (NaN and inf are not valid values)")
        )
    return v


def check_step(step: object) -> int:
    """The 1-based step count of a functional call, as an int."""
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, (int, np.integer)):
        raise TypeError(
            f"invalid step: {step!r} is a {type(step).__name__}; expected an integer "
            ">= 1 (the 1-based step count)"
        )
    if step < 1:
        raise ValueError(
            f"invalid step: {step!r}; expected an integer >= 1 (the 1-based step "
            "count, incremented before use as in torch.optim)"
        )
    return int(step)


def normalise_hyper(value: Any) -> Any:
    """A hyperparameter as a host value: real numbers (NumPy scalars too) become Python floats,
    a sequence of them (betas) a tuple of floats; anything else is returned unchanged for the
    validation to refuse with a message."""
    if isinstance(value, (float, int, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    ):
        return float(value)
    if isinstance(value, (tuple, list)) and all(
        isinstance(v, (float, int, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))
        for v in value
    ):
        return tuple(float(v) for v in value)
    return value
