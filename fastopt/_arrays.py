"""Array normalisation: NumPy on the host, CuPy views for device arrays from anywhere.

fastopt updates arrays in place, so nothing here ever copies data. A device array from any
producer (CuPy, Numba device arrays, PyTorch CUDA tensors, anything with
``__cuda_array_interface__`` or a CUDA DLPack capsule) becomes a zero-copy ``cupy.ndarray`` view
of the same memory; a host object that exports DLPack (e.g. a PyTorch CPU tensor) becomes a
zero-copy NumPy view. CuPy is imported only when a device array is met.
"""

import contextlib
import sys
from collections.abc import Mapping

import numpy as np

from .backends import is_device_array

__all__ = [
    "array_module",
    "as_xp_array",
    "as_xp_dicts",
    "check_one_device",
    "device_id",
    "is_device_array",
    "on_device",
    "to_numpy",
]

# DLPack device types (dlpack.h): kDLCPU, kDLCUDA, kDLCUDAHost, kDLCUDAManaged
_DL_CPU, _DL_CUDA, _DL_CUDA_HOST, _DL_CUDA_MANAGED = 1, 2, 3, 13


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise ImportError(
            "a device array needs CuPy to be stepped through the optimizer classes "
            "(install fastopt[cuda12] or fastopt[cuda13] for your CUDA major "
            f"version): {exc}"
        ) from exc
    return cupy


def array_module(a):
    """``numpy`` for host arrays, ``cupy`` for device arrays."""
    if is_device_array(a) and not isinstance(a, np.ndarray):
        return _cupy()
    return np


def to_numpy(a):
    """A host copy of ``a`` (NumPy, CuPy or any __cuda_array_interface__ array)."""
    if isinstance(a, np.ndarray):
        return a.copy()
    xp = array_module(a)
    return xp.asnumpy(xp.asarray(a))


def _dlpack_device(a):
    try:
        return tuple(a.__dlpack_device__())
    except Exception:
        return None


def _is_torch(a):
    return type(a).__module__.startswith("torch") and hasattr(a, "detach")


#: the torch dtypes fastopt can view; any other tensor is refused before DLPack is tried
_TORCH_FLOATS = ("torch.float32", "torch.float64", "torch.float16", "torch.bfloat16")


def as_xp_array(a, label=None):
    """``a`` as a NumPy array (host) or a CuPy array (device) sharing its memory.

    NumPy and CuPy arrays come back as they are. A PyTorch tensor is detached first (a view of
    the same memory without autograd: a parameter that requires grad is updated in place
    under no-grad semantics, as ``torch.optim`` does); one of another dtype than float16,
    bfloat16, float32 or float64 is refused with a ``TypeError`` naming ``label`` (e.g.
    ``"parameter 'w'"``). A bfloat16 tensor becomes an ``ml_dtypes.bfloat16`` view of its
    memory (through its int16 view: no copy). Other
    device arrays become CuPy views: through DLPack when the producer speaks it
    (stream-ordered: the producer's pending work is ordered before CuPy's current stream
    without a host sync), else through ``__cuda_array_interface__``. Host DLPack producers
    become NumPy views. Anything else comes back unchanged, for the caller's validation to
    reject with a message naming it.
    """
    if isinstance(a, np.ndarray):
        return a
    cp = sys.modules.get("cupy")  # a CuPy array exists only once CuPy is imported
    if cp is not None and isinstance(a, cp.ndarray):
        return a
    if _is_torch(a):
        if str(a.dtype) not in _TORCH_FLOATS:
            raise TypeError(
                f"{label or 'a tensor'} is a torch.Tensor of dtype {a.dtype} "
                f"(shape {list(a.shape)}, device {a.device}); fastopt steps float16, "
                "bfloat16, float32 and float64 (cast explicitly)"
            )
        a = a.detach()
        if str(a.dtype) == "torch.bfloat16":
            return _torch_bf16(a, label)
        if a.device.type == "cpu":
            return a.numpy()  # a view of the tensor's memory (the fast path to DLPack's view)
    try:
        return _view(a)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        raise TypeError(
            f"{label or 'an array'} ({type(a).__name__}, dtype "
            f"{getattr(a, 'dtype', '?')}) cannot be viewed in place as a NumPy or "
            f"CuPy array: {exc}"
        ) from exc


def _torch_bf16(a, label):
    """A bfloat16 tensor as a NumPy (host) or CuPy (device) array of ``ml_dtypes.bfloat16``
    sharing its memory: its int16 view, viewed again as bfloat16 (neither NumPy nor every
    DLPack consumer knows torch's bfloat16)."""
    from .precision import bfloat16

    try:
        bf16 = bfloat16()
    except ImportError as exc:
        raise TypeError(f"{label or 'a tensor'} is a bfloat16 tensor: {exc}") from None
    bits = a.view(sys.modules["torch"].int16)
    if a.device.type == "cpu":
        return bits.numpy().view(bf16)
    return _view(bits).view(bf16)


def _view(a):
    dev = _dlpack_device(a)
    if dev is not None and int(dev[0]) in (_DL_CUDA, _DL_CUDA_MANAGED):
        return _cupy().from_dlpack(a)
    if hasattr(a, "__cuda_array_interface__"):
        return _cupy().asarray(a)  # a view: asarray never copies a CUDA-array-interface array
    if dev is not None and int(dev[0]) in (_DL_CPU, _DL_CUDA_HOST):
        return np.from_dlpack(a)
    return a


def device_id(a):
    """The CUDA device ordinal of a CuPy array, or None for host arrays and other objects."""
    if isinstance(a, np.ndarray) or not is_device_array(a):
        return None
    return getattr(getattr(a, "device", None), "id", None)


def as_xp_dicts(params, grads):
    """``(params, grads)`` with every array normalised by ``as_xp_array`` (no copies).

    Raises ``ValueError`` when the arrays live on more than one GPU, naming one array on each;
    host/device mixing is left to the caller's validation. Non-dict inputs come back unchanged.
    """
    if not isinstance(params, Mapping) or not isinstance(grads, Mapping):
        return params, grads
    params = {n: as_xp_array(a, f"parameter {n!r}") for n, a in params.items()}
    grads = {n: as_xp_array(a, f"grad of parameter {n!r}") for n, a in grads.items()}
    check_one_device(
        [(f"parameter {n!r}", a) for n, a in params.items()]
        + [(f"grad of parameter {n!r}", a) for n, a in grads.items()]
    )
    return params, grads


def check_one_device(labelled):
    """Raise ``ValueError`` if the device arrays of ``[(label, array), ...]`` span two GPUs."""
    seen = {}
    for label, a in labelled:
        dev = device_id(a)
        if dev is not None:
            seen.setdefault(dev, label)
    if len(seen) > 1:
        (d0, l0), (d1, l1) = list(seen.items())[:2]
        raise ValueError(
            f"{l0} is on cuda:{d0} but {l1} is on cuda:{d1}; all params and "
            "grads of one optimizer must live on one device"
        )


def on_device(a):
    """A context that makes ``a``'s GPU current (CuPy allocations and launches go there);
    a no-op for host arrays."""
    dev = device_id(a)
    if dev is None:
        return contextlib.nullcontext()
    return _cupy().cuda.Device(dev)
