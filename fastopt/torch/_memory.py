"""The memory behind the tensors a ``fastopt.torch`` step touches, checked before any launch.

The kernels reach torch's tensors through their addresses (the CPU address table of
``numba_backend.launch_many``, the 0-d step counts and host state written by ``add_at`` and
``fill_at``, the GPU launches' views), so an address that no storage backs is a write into freed
or foreign memory. Before anything is written, every tensor of a step is held to what backs it:

- it is a plain ``torch.Tensor`` or ``torch.nn.Parameter``: a subclass (a fake or functional
  tensor, any ``__torch_dispatch__`` wrapper) may keep its data anywhere but behind its own
  address, so it is refused (a DTensor is checked through its local shard, ``_dtensor``); a
  meta tensor has no memory at all: refused too;
- it is strided and its storage is addressable (sparse, MKL-DNN and other opaque tensors are
  refused), not a lazily negated view (``is_neg``: its bytes hold the values un-negated);
- its address is not null (unless it has no element), and its storage holds every byte the
  tensor can reach: ``untyped_storage().nbytes() >= (storage_offset + extent)·itemsize`` with
  ``extent = 1 + Σ_d (size_d − 1)·stride_d`` (a storage shrunk by ``resize_`` is refused);
- a tensor the step writes has no internal overlap (an expanded tensor: torch's in-place ops
  refuse it too) and is not an inference tensor (torch refuses in-place updates of those);
- a tensor the step writes shares no byte with any other tensor of the step, across every
  param group (``check_no_overlap``): the same tensor twice, a gradient that is a parameter,
  a state tensor that is its parameter would race in the parallel loop. Reads may overlap reads
  (two gradients viewing the same memory are harmless).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numba
import numpy as np
import torch

from .._numba_cache import njit_cached
from ..backends.numba_intrinsics import address_as

__all__ = [
    "address_table",
    "byte_span",
    "check_backed",
    "check_no_overlap",
    "check_written",
    "float32_scalars",
    "name_of",
    "plain_type",
    "read_at",
    "set_scalars",
]

#: the tensor types whose data lies at ``data_ptr()`` as the strides say
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def plain_type(t):
    """Is ``t`` a plain ``torch.Tensor`` or ``torch.nn.Parameter`` (no subclass)?"""
    return type(t) in _PLAIN


def name_of(label):
    """An error's name for a tensor: ``label`` itself, or ``base: what`` for a pair (labels
    are pairs where they are made for every tensor of a step and shown only on an error)."""
    return label if isinstance(label, str) else f"{label[0]}: {label[1]}"


def _extent(t):
    """The elements a strided tensor can reach from its first one (0 when it has none)."""
    if t.is_contiguous():
        return t.numel()
    if t.numel() == 0:
        return 0
    return 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))


def byte_span(t):
    """``(lo, hi)``: the half-open byte range a strided, addressable tensor can touch, or None
    when it touches none (no element, or the meta device)."""
    if t.is_meta:
        return None
    n = _extent(t)
    if n == 0:
        return None
    lo = t.data_ptr()
    return lo, lo + n * t.element_size()


def check_backed(t, label, read_only=False):
    """Refuse ``t`` (named by ``label``, see ``name_of``) unless its data lies at its address,
    backed by its storage (see the module docstring); returns its byte span (``byte_span``).
    A tensor only read (``read_only``: a gradient, read through a resolved copy) may be a
    lazily negated view."""
    return _check(t, label, False, read_only)


def check_written(t, label):
    """``check_backed`` (its span returned), and what a tensor the step writes must also be:
    no inference tensor, no two elements at one address."""
    return _check(t, label, True, False)


def _check(t, label, written, read_only):
    if type(t) not in _PLAIN:
        raise TypeError(
            f"{name_of(label)} is a {type(t).__module__}.{type(t).__qualname__}; fastopt.torch "
            "steps plain torch.Tensor/nn.Parameter data in place through its address, and "
            "DTensors through their local shards (any other subclass may keep its data "
            "elsewhere: use torch.optim)"
        )
    if t.layout is not torch.strided:
        raise TypeError(
            f"{name_of(label)} has layout {t.layout}; fastopt.torch steps strided (dense) "
            "tensors only"
        )
    if t.is_meta:
        raise TypeError(
            f"{name_of(label)} is a meta tensor: it has no memory to step (torch.optim steps "
            "nothing either; materialise the parameters, e.g. with to_empty(), before a step)"
        )
    if not read_only and (t.is_neg() or t.is_conj()):
        raise TypeError(
            f"{name_of(label)} is a lazily negated or conjugated view (its memory holds other "
            "values); pass t.resolve_neg() / t.resolve_conj()"
        )
    if written and t.is_inference():
        raise RuntimeError(
            f"{name_of(label)} is an inference tensor (made under torch.inference_mode()); it "
            "cannot be updated in place outside inference mode (torch.optim refuses it too)"
        )
    try:
        nbytes = t.untyped_storage().nbytes()
    except (NotImplementedError, RuntimeError) as exc:
        raise TypeError(
            f"{name_of(label)} has no addressable storage ({exc}); fastopt.torch steps tensors "
            "in place through their addresses"
        ) from None
    if t.is_contiguous():
        n = t.numel()
    else:
        n = _extent(t)
        # 1: YES (an expanded tensor); 2: too hard to tell, which torch's in-place ops accept
        if written and torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(
                f"{name_of(label)} ({t.dtype}{list(t.shape)}, strides {t.stride()}) has "
                "elements that share memory (an expanded tensor?); a step writes it in place "
                "(torch's in-place ops refuse it too): pass a tensor with its own memory "
                "(.clone())"
            )
    if n == 0:
        return None
    size = t.element_size()
    need = (t.storage_offset() + n) * size
    ptr = t.data_ptr()
    if ptr == 0 or nbytes < need:
        raise ValueError(
            f"{name_of(label)} ({t.dtype}{list(t.shape)} on {t.device}) reaches {need} bytes "
            f"of its storage, which holds {nbytes} (address {ptr:#x}): its storage was freed "
            "or shrunk (untyped_storage().resize_()); nothing was stepped"
        )
    return ptr, ptr + n * size


def _numpy_view(t):
    """A NumPy view of a CPU tensor's memory with its strides (bit patterns), or None."""
    if t.device.type != "cpu":
        return None
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    try:
        return t.detach().view(ints[t.element_size()]).numpy()
    except (KeyError, RuntimeError, TypeError):
        return None


def _shares(a, b):
    """Do two tensors whose byte spans overlap share a byte? Exact on the CPU (strided views
    may interleave without sharing); on a device the spans are all there is to go on."""
    x, y = _numpy_view(a), _numpy_view(b)
    if x is None or y is None:
        return True
    return bool(np.shares_memory(x, y))


def check_no_overlap(entries):
    """Refuse when a tensor that the step writes shares memory with another tensor of it.

    ``entries``: ``(label, tensor, written, span)``, ``span`` the tensor's byte span (None:
    it touches no memory). The spans of each device, sorted by start, show in one vectorised
    pass whether any two overlap at all (a span starting before the furthest end of those
    before it); only then does a sweep look at the candidates, each confirmed exactly on the
    CPU. The error names both tensors."""
    by_device: dict[Any, Any] = {}
    for e in entries:
        if e[3] is not None:
            by_device.setdefault(e[1].device, []).append(e)
    for group in by_device.values():
        if len(group) < 2:
            continue
        lo = np.fromiter((e[3][0] for e in group), np.int64, len(group))
        hi = np.fromiter((e[3][1] for e in group), np.int64, len(group))
        order = np.argsort(lo, kind="stable")
        if not (lo[order][1:] < np.maximum.accumulate(hi[order])[:-1]).any():
            continue
        _sweep([group[i] for i in order])


def _sweep(spans):
    """The exact check of ``check_no_overlap`` over entries sorted by start."""
    active: list[Any] = []
    for label, t, written, (lo, hi) in spans:
        active = [s for s in active if s[3][1] > lo]
        for other in active:
            if (written or other[2]) and _shares(t, other[1]):
                first, second = name_of(other[0]), name_of(label)
                raise ValueError(
                    f"{first} and {second} share memory; a step writes "
                    f"{first if other[2] else second} in place, so every parameter, gradient "
                    "and state tensor must have its own memory (the same tensor twice, a "
                    "gradient that is a parameter, a state tensor that is its parameter?): "
                    "nothing was stepped"
                )
        active.append((label, t, written, (lo, hi)))


def _read_float32_at(addresses, like, out):
    for i in range(addresses.shape[0]):
        out[i] = numba.carray(address_as(addresses[i], like), 1)[0]


_compiled: dict[Any, Any] = {}


def read_at(addresses):
    """The float32 scalars at each int64 address of ``addresses`` (the 0-d step counts and host
    state of a cached step, read back in one call). Unchecked, like ``numba_backend.add_at``:
    the caller guarantees float32 scalars, alive (``Steady.check`` has just re-checked each)."""
    fn = _compiled.get("read_at")
    if fn is None:
        fn = _compiled["read_at"] = njit_cached(nogil=True)(_read_float32_at)
    out = np.empty(addresses.shape[0], np.float32)
    fn(addresses, np.empty(1, np.float32), out)
    return out


def address_table(tensors: Any, nslots: int, master: bool = False) -> np.ndarray | None:
    """int64 rows ``(n, param, grad, slot...)`` of the tensors' lengths and addresses (0 for an
    absent slot), with ``master`` the fp32 master copy's last, or None when one of them is not
    contiguous (the per-tensor path takes it)."""
    rows = []
    for p, g, slots, m in tensors:
        if not (p.is_contiguous() and g.is_contiguous()):
            return None
        row = [p.numel(), p.data_ptr(), g.data_ptr()]
        for a in (*slots, m) if master else slots:
            a = a[0] if isinstance(a, tuple) else a  # a quantized slot's codes (checked)
            if a is None:
                row.append(0)
            elif a.is_contiguous():
                row.append(a.data_ptr())
            else:
                return None
        rows.append(row)
    return np.array(rows, dtype=np.int64).reshape(len(tensors), 3 + nslots + master)


def float32_scalars(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Are ``tensors`` all float32 CPU scalars (torch's format of step counts and host state,
    and what a state dict loads as), which Numba may write through their addresses?"""
    return all(
        t is not None
        and plain_type(t)
        and t.dtype is torch.float32
        and t.is_cpu
        and t.numel() == 1
        and not t.requires_grad
        for t in tensors
    )


def set_scalars(tensors: Any, value: float, add: bool = False) -> None:
    """``t += value`` (``add``) or ``t.fill_(value)`` for each of torch's 0-d tensors (step
    counts, host state): float32 CPU ones through their addresses in one Numba call, others one
    by one."""
    if len(tensors) > 1 and float32_scalars(tensors):
        from ..backends.numba_backend import add_at, fill_at

        addresses = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
        (add_at if add else fill_at)(addresses, value)
        return
    for t in tensors:
        if add:
            t += value
        else:
            t.fill_(value)
