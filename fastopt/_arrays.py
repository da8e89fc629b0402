"""Array normalisation: NumPy on the host, CuPy views for device arrays from anywhere.

fastopt updates arrays in place, so nothing here ever copies data. A device array from any
producer (CuPy, Numba device arrays, PyTorch CUDA tensors, anything with
``__cuda_array_interface__`` or a CUDA DLPack capsule) becomes a zero-copy ``cupy.ndarray`` view
of the same memory; a host object that exports DLPack (e.g. a PyTorch CPU tensor) becomes a
zero-copy NumPy view. CuPy is imported only when a device array is met.

A view is only as good as the memory behind it: every array that comes through here is checked
against what backs it (``check_backing``): a torch tensor's storage must hold every byte its
offset, shape and strides reach (a storage freed or shrunk with ``resize_`` is refused, as is a
meta tensor, which has none), and a NumPy view must lie inside the buffer of the array that owns
its memory (a view of an array since resized with ``refcheck=False`` points at freed memory).
``Pins`` lets a cached launch re-check the same in O(1) per array.
"""

import contextlib
import ctypes
import operator
import sys
from collections.abc import Mapping

import numpy as np

from .backends import is_device_array

__all__ = [
    "Pins",
    "address",
    "array_module",
    "as_xp_array",
    "as_xp_dicts",
    "backing_error",
    "check_backing",
    "check_one_device",
    "check_torch_storage",
    "device_id",
    "is_device_array",
    "on_device",
    "owner",
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
    """A host copy of ``a`` (NumPy, CuPy or any __cuda_array_interface__ array); a plain
    ndarray, once ``check_backing`` has found its memory alive (a view of freed memory is a
    ``ValueError``, not a copy of whatever lies there)."""
    if isinstance(a, np.ndarray):
        check_backing(a)
        return a.view(np.ndarray).copy()
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

    NumPy arrays come back as they are, once ``check_backing`` has found their memory alive; an
    ndarray subclass comes back as a plain ``ndarray`` view of the same memory (``np.matrix``
    would stay 2-D under ``reshape(-1)``, a ``np.memmap`` still writes its file), except a
    masked array, refused with a ``TypeError`` (the kernels would step the masked elements
    too). CuPy arrays come back as they are. A PyTorch tensor is detached first (a view of
    the same memory without autograd: a parameter that requires grad is updated in place
    under no-grad semantics, as ``torch.optim`` does); one of another dtype than float16,
    bfloat16, float32 or float64 is refused with a ``TypeError`` naming ``label`` (e.g.
    ``"parameter 'w'"``). A bfloat16 tensor becomes an ``ml_dtypes.bfloat16`` view of its
    memory (through its int16 view: no copy). Other
    device arrays become CuPy views: through DLPack when the producer speaks it
    (stream-ordered: the producer's pending work is ordered before CuPy's current stream
    without a host sync), else through ``__cuda_array_interface__``. Host DLPack producers
    become NumPy views. Anything else comes back unchanged, for the caller's validation to
    reject with a message naming it. A tensor whose storage does not hold the bytes it
    spans, a sparse or meta tensor, and a NumPy view of freed memory are refused
    (``ValueError``/``TypeError``) before any view is made.
    """
    if type(a) is np.ndarray:
        if a.base is not None:  # an array that owns its memory needs no check
            check_backing(a, label)
        return a
    if isinstance(a, np.ndarray):
        return _plain(a, label)
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
        check_torch_storage(a, label)
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


def _plain(a, label):
    """An ndarray subclass as a plain ``ndarray`` view of its memory (a masked array refused)."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(
            f"{label or 'an array'} is a numpy.ma.MaskedArray; fastopt steps every element of "
            "an array in place and would ignore the mask: pass a plain array (a.filled(...), "
            "or a.data to step the masked elements too)"
        )
    v = a.view(np.ndarray)
    check_backing(v, label)
    return v


# -- the memory behind an array -------------------------------------------------------------------


class _CtypesField:
    """``.value``: the data pointer of one ndarray through ``ctypes.data`` (the slow reading,
    where the direct one is not proven)."""

    __slots__ = ("a",)

    def __init__(self, a):
        self.a = a

    @property
    def value(self):
        return self.a.ctypes.data


def _address_readers():
    """``(address, field)``. ``address(a)``: the data pointer of an ndarray; ``field(a)``: an
    object whose ``.value`` reads it again at every access (a ``ctypes.c_void_p`` over the
    pointer's slot in ``a``'s object: valid while ``a`` lives, so its holder keeps ``a``).
    ``a.ctypes.data`` takes microseconds, too slow for a check per array per step; NumPy's
    ``PyArrayObject`` holds the pointer as its first field after the object header, read here
    directly — once that read has been proven to agree with ``ctypes.data`` on owners, offset
    views, subclasses and an array resized in place, else through ``ctypes.data`` (another
    interpreter, another layout)."""
    read, off = ctypes.c_void_p.from_address, object.__basicsize__

    def fast(a):
        return read(id(a) + off).value or 0

    def fast_field(a):
        return read(id(a) + off)

    try:
        base = np.arange(16, dtype=np.float64)
        probes = (base, base[3:], base[::2][1:], np.zeros((2, 3), "f4")[1], base.view(np.matrix))
        ok = all(fast(p) == p.ctypes.data for p in probes)
        moved = np.zeros(8)
        f = fast_field(moved)
        moved.resize(1 << 16, refcheck=False)
        if ok and f.value == moved.ctypes.data:
            return fast, fast_field
    except (ValueError, OverflowError, TypeError):  # pragma: no cover - an unknown layout
        pass
    return (lambda a: a.ctypes.data), _CtypesField  # pragma: no cover


#: ``address(a)``: the data pointer of ndarray ``a`` (an int), in about 0.1 us;
#: ``_field(a)``: its live reading (``.value``), in about 0.04 us
address, _field = _address_readers()


def _span(a):
    """``(lo, hi)``: the half-open byte range ndarray ``a`` reaches, or None when it is empty."""
    if a.size == 0:
        return None
    lo = hi = address(a)
    if a.flags.c_contiguous:
        return lo, lo + a.nbytes
    for n, st in zip(a.shape, a.strides):
        if st < 0:
            lo += (n - 1) * st
        else:
            hi += (n - 1) * st
    return lo, hi + a.itemsize


def owner(a):
    """The ndarray at the end of ``a``'s chain of bases: the one that owns its memory (or wraps
    a foreign buffer: ``owner(a).base`` is then not an ndarray); ``a`` itself when it owns it."""
    b = a.base
    while isinstance(b, np.ndarray):
        a, b = b, b.base
    return a


def _torch_span(t):
    """``(storage bytes, bytes needed)`` of a strided torch tensor: the storage's size and the
    end of the last byte the tensor's offset, shape and strides reach (0 when it is empty)."""
    if t.numel() == 0:
        return t.untyped_storage().nbytes(), 0
    last = t.storage_offset() + sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return t.untyped_storage().nbytes(), (last + 1) * t.element_size()


def check_torch_storage(t, label=None):
    """A strided tensor with memory behind every element it reaches: a meta tensor (no memory:
    its address is 0) or a sparse one is a ``TypeError``, a storage freed or shrunk
    (``untyped_storage().resize_``: what a sharded model does to a gathered parameter) a
    ``ValueError``."""
    what = label or "a tensor"
    if t.layout is not sys.modules["torch"].strided:
        raise TypeError(
            f"{what} is a {t.layout} tensor; fastopt steps dense (strided) tensors in place"
        )
    if t.device.type == "meta":
        raise TypeError(
            f"{what} is a meta tensor (shape {list(t.shape)}): it has no memory to update; "
            "materialise it first (e.g. module.to_empty(device=...))"
        )
    have, need = _torch_span(t)
    if need > have:
        raise ValueError(
            f"{what} (shape {list(t.shape)}, strides {list(t.stride())}, storage offset "
            f"{t.storage_offset()}) reaches {need} bytes of its storage, which holds {have}; "
            "its storage was freed or shrunk (untyped_storage().resize_): restore it before "
            "stepping"
        )


def backing_error(a):
    """None when every byte ndarray ``a`` reaches lies in live memory, else why not: a view
    outside the buffer of the array that owns its memory (that array resized since, with
    ``refcheck=False``), or a view of a torch tensor whose storage no longer holds it. An array
    that owns its memory, or wraps a foreign buffer that cannot be resized while exported (a
    ``bytearray``, an ``mmap``), is always backed. O(depth of the chain of bases)."""
    if a.base is None:
        return None
    span = _span(a)
    if span is None:
        return None
    root = owner(a)
    if root is not a:
        have = _span(root)
        if have is None or span[0] < have[0] or span[1] > have[1]:
            return (
                f"lies outside the memory of the array it is a view of (bytes "
                f"[{span[0]:#x}, {span[1]:#x}) of {_range(have)}): that array was resized or "
                "freed since the view was made"
            )
    t = root.base
    if _is_torch(t):  # a CPU tensor's memory seen through NumPy (Tensor.numpy())
        st = t.untyped_storage()
        lo = st.data_ptr()
        if span[0] < lo or span[1] > lo + st.nbytes():
            return (
                f"is a view of a torch tensor whose storage now holds bytes "
                f"[{lo:#x}, {lo + st.nbytes():#x}), not [{span[0]:#x}, {span[1]:#x}): its "
                "storage was freed or shrunk (untyped_storage().resize_)"
            )
    return None


def _range(span):
    return "no bytes" if span is None else f"[{span[0]:#x}, {span[1]:#x})"


def check_backing(a, label=None):
    """Raise ``ValueError`` (naming ``label``) when ndarray ``a`` reaches memory that no longer
    backs it (``backing_error``)."""
    why = backing_error(a)
    if why is not None:
        raise ValueError(
            f"{label or 'an array'} ({a.dtype.name}{list(a.shape)}) {why}; refused before "
            "anything was read or written"
        )


_VALUE, _NBYTES = operator.attrgetter("value"), operator.attrgetter("nbytes")


class Pins:
    """The memory behind a set of host arrays, as it is now, to re-check in O(1) per array:
    for each array that owns some of their memory (``owner``, once per owner), a live reading
    of its data pointer (``_field``), that pointer and its size; for one seen through a torch
    tensor, also the tensor's storage address and size. A cached launch keeps flat views of
    the arrays: if an owner is resized in place (``refcheck=False``), they point at freed
    memory, and ``unmoved()`` says so. Holding the owners keeps the readings valid."""

    __slots__ = ("addrs", "fields", "roots", "sizes", "torch")

    def __init__(self, arrays):
        roots, seen = [], set()
        for a in arrays:
            root = owner(a)
            if id(root) not in seen:
                seen.add(id(root))
                roots.append(root)
        self.roots = tuple(roots)
        self.fields = tuple(_field(r) for r in roots)
        self.addrs = tuple(map(_VALUE, self.fields))
        self.sizes = tuple(map(_NBYTES, roots))
        self.torch = tuple(
            (r.base, st.data_ptr(), st.nbytes())
            for r in roots
            if _is_torch(r.base) and (st := r.base.untyped_storage()) is not None
        )

    def unmoved(self):
        """Is every owner's memory still where it was, as large as it was? (Two C-level passes
        over the readings; a torch storage is read through torch.)"""
        if tuple(map(_VALUE, self.fields)) != self.addrs:
            return False
        if tuple(map(_NBYTES, self.roots)) != self.sizes:
            return False
        for t, ptr, nbytes in self.torch:
            st = t.untyped_storage()
            if st.data_ptr() != ptr or st.nbytes() != nbytes:
                return False
        return True


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
