"""Checks that run before a step, a state load or a checkpoint load changes anything.

Every public entry point validates *all* of its inputs with these helpers first and only then
writes, so a refused call leaves every parameter and every state buffer byte-for-byte as it was.
Errors are ``TypeError`` (wrong kind of object or dtype), ``ValueError`` (wrong shape, layout,
memory, value) or ``KeyError`` (wrong names); each names the parameter, what it got and what
was expected.
"""
import math

import numpy as np

from .backends import is_device_array

__all__ = ["NonFiniteGradientError", "SUPPORTED_DTYPES", "is_array", "where", "dtype_of",
           "describe", "check_array", "check_writable", "check_no_overlap", "all_finite",
           "check_names", "check_number"]

#: dtypes every backend steps (a backend module may narrow or widen this with ``DTYPES``)
SUPPORTED_DTYPES = ("float32", "float64")


class NonFiniteGradientError(FloatingPointError, ValueError):
    """A gradient holds NaN or ±inf and the optimizer was built with ``nonfinite="raise"``.

    Both a ``FloatingPointError`` (what it is) and a ``ValueError`` (bad input), so either
    ``except`` clause catches it.
    """


def is_array(a):
    return isinstance(a, np.ndarray) or is_device_array(a)


def where(a):
    """``"host"`` or ``"device"``: the address space an array's pointer lives in."""
    return "device" if is_device_array(a) and not isinstance(a, np.ndarray) else "host"


def dtype_of(a):
    try:
        return np.dtype(a.dtype)
    except (TypeError, AttributeError):  # e.g. a framework dtype object: use the interface
        return np.dtype(a.__cuda_array_interface__["typestr"])


def describe(a):
    """``float32[3, 4] on host``: what an error message says an array is."""
    if not is_array(a):
        return f"a {type(a).__name__}"
    return f"{dtype_of(a)}{list(a.shape)} on {where(a)}"


_KIND = {"i": "integer", "u": "unsigned integer", "c": "complex", "b": "boolean",
         "O": "object", "U": "string", "S": "bytes", "V": "void", "M": "datetime",
         "m": "timedelta", "f": "floating"}


def check_array(name, role, a, supported=SUPPORTED_DTYPES):
    """``a`` is a NumPy or device array of a supported float dtype (``role``: param/grad/...)."""
    if not is_array(a):
        raise TypeError(f"{role} of parameter {name!r} is a {type(a).__name__}; expected a "
                        "NumPy array or a device (__cuda_array_interface__) array")
    dt = dtype_of(a)
    if dt.kind != "f":
        raise TypeError(f"{role} of parameter {name!r} is {describe(a)} "
                        f"({_KIND.get(dt.kind, dt.kind)} dtype); expected a floating dtype "
                        f"({' or '.join(supported)})")
    if dt.name not in supported:
        raise TypeError(f"{role} of parameter {name!r} is {describe(a)}; this backend steps "
                        f"{' and '.join(supported)} only")
    return dt


def _c_contiguous(a):
    if isinstance(a, np.ndarray) or hasattr(a, "flags"):
        return bool(a.flags.c_contiguous)
    cai = a.__cuda_array_interface__
    return cai.get("strides") is None or tuple(cai["strides"]) == _c_strides(
        cai["shape"], np.dtype(cai["typestr"]).itemsize)


def check_writable(name, role, a):
    """``a`` can be updated in place by a flat kernel: C-contiguous and writeable."""
    if not _c_contiguous(a):
        raise ValueError(f"{role} of parameter {name!r} ({describe(a)}) is not C-contiguous; "
                         "a fused step updates flat contiguous memory in place (pass a "
                         "contiguous array, or pack the parameters into a fastopt.FlatBuffer)")
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        raise ValueError(f"{role} of parameter {name!r} ({describe(a)}) is read-only; "
                         "expected a writeable array")


def _c_strides(shape, itemsize):
    strides, acc = [], itemsize
    for n in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(n), 1)
    return tuple(reversed(strides))


def _extent(a):
    """``(lo, hi)``: the half-open byte range ``a`` can touch, or None when it is empty."""
    if isinstance(a, np.ndarray):
        if a.size == 0:
            return None
        return tuple(int(x) for x in np.lib.array_utils.byte_bounds(a))
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


def check_no_overlap(entries):
    """Refuse when a buffer that the step writes shares memory with any other buffer of it.

    ``entries``: ``(label, array, written)``. Reads may overlap reads (two grads viewing the same
    memory are harmless); a written buffer (param, state) must overlap nothing. A sweep over the
    byte ranges sorted by start finds the candidates in O(n log n); a candidate is confirmed
    exactly with ``np.shares_memory`` on the host.
    """
    spans = []
    for label, a, written in entries:
        ext = _extent(a)
        if ext is not None:
            spans.append((where(a), ext[0], ext[1], label, a, written))
    spans.sort(key=lambda s: (s[0], s[1]))
    active = []
    for span in spans:
        space, lo, hi, label, a, written = span
        active = [s for s in active if s[0] == space and s[2] > lo]
        for other in active:
            if (written or other[5]) and _shares(a, other[4]):
                raise ValueError(f"{other[3]} and {label} share memory; a step writes "
                                 f"{other[3] if other[5] else label} in place, so every "
                                 "parameter, gradient and state buffer must be a separate "
                                 "array (copy the gradient first)")
        active.append(span)


def all_finite(a):
    """One fused reduction: True when ``a`` holds no NaN and no ±inf."""
    if where(a) == "host":
        return bool(np.isfinite(a).all())
    import cupy  # device arrays are reduced on the device; only the boolean comes back

    return bool(cupy.isfinite(cupy.asarray(a)).all())


def check_names(got, expected, what, where_):
    """Same names, or a ``KeyError`` listing the missing and the unexpected ones."""
    got, expected = set(got), set(expected)
    if got != expected:
        raise KeyError(f"{what} differ from {where_}: missing {sorted(expected - got)}, "
                       f"unexpected {sorted(got - expected)}")


def check_number(name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    """A real, non-NaN number inside the given bounds, as a float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer,
                                                                      np.floating)):
        raise TypeError(f"invalid {name}: {value!r} is a {type(value).__name__}; expected a "
                        "real number")
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
        raise ValueError(f"invalid {name}: {value!r}; expected {' and '.join(rng)}"
                         + ("" if math.isfinite(v) else " (NaN and inf are not valid values)"))
    return v
