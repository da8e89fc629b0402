"""The CuPy launch of a step over quantized state slots: the CUDA C kernel of
``kernels/quant_cuda.py`` (one CUDA block of ``quant_cuda.threads(fmt)`` threads per block of
codes: one per element, or per byte of a packed format; its docstring says how) as a
``cupy.RawKernel``, built once per (rule, variant, storage format).

The packed tables and the block table are copied to the device once per table and device
(cached); a step is one launch on the param's producer stream, no host synchronisation.

A list of tensors steps in one launch (``launch_table``, what ``cupy_backend.launch_table``
runs for a table whose storage format quantizes: ``quant_cuda.table_source``'s kernel over a
``_launch.TensorTable`` of the tensors, one chunk entry per block of codes).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..kernels import RULES, quant, quant_cuda
from ..kernels.storage import IO
from . import _launch
from . import cupy_backend as cb

__all__ = [
    "launch_quant",
    "launch_table",
    "quant_arguments",
    "quant_kernel",
    "table_arguments",
    "table_kernel",
]

_kernels: dict[Any, Any] = {}
#: (kernel key, device id) -> its grid of one wave (``_wave``)
_grids: dict[Any, int] = {}
#: (id of a host table, device id) -> (the host table, its device copy)
_uploads: dict[Any, Any] = {}


def quant_kernel(rule: str, flags: Mapping[str, bool], io: IO) -> Any:
    """The ``cupy.RawKernel`` of one variant under ``io`` (built once)."""
    key = (rule, tuple(sorted(flags.items())), io)
    k = _kernels.get(key)
    if k is None:
        src = quant_cuda.quant_source(rule, flags, io)
        k = _kernels[key] = cb.cupy.RawKernel(src, quant_cuda.kernel_name(rule))
    return k


def table_kernel(rule: str, flags: Mapping[str, bool], io: IO, clip: bool = False) -> Any:
    """The ``cupy.RawKernel`` of one variant's multi-tensor kernel under ``io`` (built once)."""
    key = ("table", rule, tuple(sorted(flags.items())), io, bool(clip))
    k = _kernels.get(key)
    if k is None:
        src = quant_cuda.table_source(rule, flags, io, clip)
        k = _kernels[key] = cb.cupy.RawKernel(src, quant_cuda.table_kernel_name(rule))
    return k


def table_arguments(
    rule: str,
    flags: Mapping[str, bool],
    io: IO,
    table: Any,
    qtab: Any,
    k: Sequence[float],
    extras: Mapping[str, Any],
    clip: Any = None,
) -> list[Any]:
    """The multi-tensor kernel's arguments (``quant_cuda.table_arguments``): the device table
    and chunk entries of ``table`` (``_launch.TensorTable``), their count, ``qtab``, the
    scalars and extras typed as declared, then ``clip``. Built without a GPU (the device
    arrays are passed through)."""
    _, scalars = quant_cuda.quant_args(rule, flags, io)
    args = [table.device_rows, table.device_chunks, np.int64(table.nchunks), qtab]
    args += cb._scalar_arguments(rule, quant_cuda.plain_io(io), scalars, k, extras)
    return args + ([] if clip is None else [clip])


def launch_table(
    rule: str,
    flags: Mapping[str, bool],
    io: IO,
    table: Any,
    k: Sequence[float],
    extras: Mapping[str, Any],
    clip: Any = None,
) -> None:
    """One launch over every tensor of ``table`` on the current device and stream, its device
    copy up to date (``cupy_backend.launch_table`` checks and calls it): one CUDA block of
    ``quant_cuda.threads(io.quant)`` threads per block of codes, a grid of one wave
    grid-striding over them."""
    assert io.quant is not None
    qtab = _on_device(quant_cuda.tables(io.quant, quant_cuda.maps(rule, flags)))
    args = table_arguments(rule, flags, io, table, qtab, k, extras, clip)
    kern = table_kernel(rule, flags, io, clip is not None)
    key = ("table", rule, tuple(sorted(flags.items())), io, clip is not None)
    nt = quant_cuda.threads(io.quant)
    grid = max(1, min(table.nchunks, _wave(key, kern, nt)))
    kern((grid,), (nt,), tuple(args))


def _wave(key: Any, kern: Any, nt: int) -> int:
    """CUDA blocks of ``nt`` threads of ``kern`` the current device holds at once (one wave:
    ``cupy_backend._waves`` for blocks of ``_launch.THREADS``; made once per key and device)."""
    if nt == _launch.THREADS:
        return int(cb._waves(key, kern))
    dev = cb.cupy.cuda.Device()
    slot = (key, dev.id)
    grid = _grids.get(slot)
    if grid is None:
        sms = dev.attributes["MultiProcessorCount"]
        grid = _grids[slot] = sms * _launch.blocks_per_sm(kern.num_regs, nt)
    return grid


def quant_arguments(
    rule: str,
    flags: Mapping[str, bool],
    io: IO,
    named: Mapping[str, Any],
    tables: tuple[Any, Any, int],
    k: Sequence[float],
    extras: Mapping[str, Any],
) -> list[Any]:
    """The kernel's arguments: the arrays of ``named`` in ``quant_cuda.quant_args`` order
    (a quantized slot's codes under its name, its scales under ``<slot>_absmax``), ``tables``
    (``qtab``, ``blocks``, ``nb``), then the scalars and extras typed as declared
    (``cupy_backend._scalar_arguments``). Built without a GPU (arrays passed through)."""
    arrays, scalars = quant_cuda.quant_args(rule, flags, io)
    args = []
    for a, _, _ in arrays:
        if named.get(a) is None:
            raise ValueError(f"{a}: required by {rule} with {flags} and {io}, got None")
        args.append(named[a])
    qtab, blocks, nb = tables
    args += [qtab, blocks, np.int64(nb)]
    return args + cb._scalar_arguments(rule, quant_cuda.plain_io(io), scalars, k, extras)


def _on_device(host: np.ndarray) -> Any:
    """The device copy of a small read-only host table on the current device (made once per
    table and device; the entry keeps the host array alive, so its id is not reused)."""
    key = (id(host), cb.cupy.cuda.Device().id)
    hit = _uploads.get(key)
    if hit is None or hit[0] is not host:
        if len(_uploads) > 256:
            _uploads.clear()
        hit = _uploads[key] = (host, cb.cupy.asarray(host))
    return hit[1]


def launch_quant(
    rule: str,
    flags: Mapping[str, bool],
    param: Any,
    grad: Any,
    states: Sequence[Any],
    k: Sequence[float],
    io: IO,
    master: Any = None,
    extras: Mapping[str, Any] | None = None,
) -> None:
    """One step over quantized state: a quantized slot's entry of ``states`` is ``(codes,
    absmax)`` or ``(codes, absmax, blocks)`` (a ``FlatBuffer`` group's block table);
    ``extras`` as ``cupy_backend.launch_mixed`` takes them. Unchecked."""
    from .numba_quant import blocks_for

    assert io.quant is not None
    p = cb._as_cupy(param, "param")
    if p.size == 0:
        return
    q = quant_cuda.qslots(rule, flags)
    named: dict[str, Any] = {"param": p, "grad": cb._as_cupy(grad, "grad")}
    named["master"] = None if master is None else cb._as_cupy(master, "master")
    blocks = None
    for s, a, qd in zip(RULES[rule].slots, states, q):
        if qd:
            named[s.name] = cb._as_cupy(a[0], s.name).reshape(-1)
            named[f"{s.name}_absmax"] = cb._as_cupy(a[1], f"{s.name} absmax")
            if len(a) > 2:
                blocks = a[2]
        else:
            named[s.name] = None if a is None else cb._as_cupy(a, s.name)
    if blocks is None:
        blocks = blocks_for(int(p.size), quant.BLOCKS[io.quant])
    nb = int(blocks.shape[0])
    if nb == 0:
        return
    ex = dict(extras or {})
    for d in ("kbuf", "scale", "found_inf", "keyp"):
        if ex.get(d) is not None:
            ex[d] = cb._as_cupy(ex[d], d)
    stream = cb._stream_for(_launch.producer_stream(param))
    with p.device:
        qtab = _on_device(quant_cuda.tables(io.quant, quant_cuda.maps(rule, flags)))
        dblocks = _on_device(np.asarray(blocks, np.int64))
        args = quant_arguments(rule, flags, io, named, (qtab, dblocks, nb), k, ex)
        kern = quant_kernel(rule, flags, io)
        key = (rule, tuple(sorted(flags.items())), io)
        nt = quant_cuda.threads(io.quant)
        grid = max(1, min(nb, _wave(key, kern, nt)))
        if stream is not None:
            with stream:
                kern((grid,), (nt,), tuple(args))
        else:
            kern((grid,), (nt,), tuple(args))
