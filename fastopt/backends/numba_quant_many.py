"""The CPU many-tensor loop of a step with quantized state slots (``kernels/quant.py``): one
fused pass over every tensor of a param group (``fastopt.torch``), as ``numba_backend``'s
``launch_many_io`` is for full-precision state.

A quantized slot of a tensor is its codes (uint8, one per element; two per byte for a packed
format) and its block scales (float32, one per ``quant.BLOCKS[fmt]`` elements from the
tensor's first element: a block never straddles two tensors). The table holds per tensor
``(n, param, grad, slot..., master, absmax...)``: its length, the addresses of its param,
grad, each slot (the codes of a quantized one), the master (the fp32 copy, or a bfloat16
param's int16 remainder, ``IO.remainder``; 0 where none) and each
slot's absmax (0 where the slot is not quantized). The loop walks chunks ``(tensor, first
block, stop block)`` of at most ``numba_quant.CHUNK_BLOCKS`` blocks
(``numba_backend.chunks_for`` over the tensors' block counts) in parallel; each chunk views
its tensor's arrays through their addresses and runs the serial one-buffer loop of
``numba_quant`` over its blocks (compiled into this loop, not called through Python): the
same per-block pass, the same bits as a step of each tensor alone (the dict API's), and the
index stochastic rounding hashes counted from each tensor's start.

Unchecked, like ``launch_many_io``: the caller (``fastopt.torch``) guarantees every address
(checked tensors of the dtypes and lengths the format says, contiguous, alive for the call).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import numba
import numpy as np
from numba.extending import register_jitable

from .._numba_cache import njit_cached
from ..kernels import RULES, quant, storage
from .numba_intrinsics import address_as
from .numba_quant import CHUNK_BLOCKS, python_quant_loop

__all__ = ["block_chunks", "launch_many_quant", "many_quant_source"]

_compiled: dict[Any, Any] = {}
_inner: dict[Any, Any] = {}


def many_quant_source(
    nslots: int,
    writes: Sequence[bool],
    qslots: Sequence[bool],
    master: bool,
    block: int = quant.BLOCK,
    packed: bool = False,
) -> str:
    """Python source of the many-tensor loop's factory (see the module docstring):
    ``loop(table, chunks, p_like, g_like, s_like, c_like, m_like, d0.., d0b.., t0.., tops,
    tinys, luts, k, x)``, ``inner`` the one-buffer loop (``numba_quant.quant_loop_source``);
    blocks of ``block`` elements, ``packed`` codes ``ceil(n / 2)`` bytes."""
    tabs = [f"d{j}" for j in range(nslots)]
    tabs += [f"d{j}b" for j in range(nslots)]
    tabs += [f"t{j}" for j in range(nslots)]
    pad = " " * 12
    L = [
        "def factory(inner, rng):",
        "    def loop(table, chunks, p_like, g_like, s_like, c_like, m_like, "
        f"{''.join(a + ', ' for a in tabs)}tops, tinys, luts, k, x):",
        "        for c in rng(chunks.shape[0]):",
        f"{pad}j = chunks[c, 0]",
        f"{pad}b0 = chunks[c, 1]",
        f"{pad}nb = chunks[c, 2] - b0",
        f"{pad}n = table[j, 0]",
        f"{pad}p = carray(address_as(table[j, 1], p_like), n)",
        f"{pad}g = carray(address_as(table[j, 2], g_like), n)",
    ]
    for j in range(nslots):
        if not writes[j]:
            L.append(f"{pad}s{j} = p")
        else:
            like = "c_like" if qslots[j] else "s_like"
            size = "(n + 1) >> 1" if qslots[j] and packed else "n"
            L.append(f"{pad}s{j} = carray(address_as(table[j, {3 + j}], {like}), {size})")
        if qslots[j]:
            col = 4 + nslots + j
            L.append(f"{pad}a{j} = carray(address_as(table[j, {col}] + b0 * 4, tinys), nb)")
        else:
            L.append(f"{pad}a{j} = tinys")
    L.append(
        f"{pad}m = " + (f"carray(address_as(table[j, {3 + nslots}], m_like), n)" if master else "p")
    )
    # the chunk's blocks as in-tensor (first, stop) rows: the one-buffer loop's table
    L += [
        f"{pad}blocks = np.empty((nb, 2), np.int64)",
        f"{pad}for b in range(nb):",
        f"{pad}    lo = (b0 + b) * {block}",
        f"{pad}    blocks[b, 0] = lo",
        f"{pad}    blocks[b, 1] = min(lo + {block}, n)",
        f"{pad}inner(p, g, {''.join(f's{j}, ' for j in range(nslots))}"
        f"{''.join(f'a{j}, ' for j in range(nslots))}{''.join(a + ', ' for a in tabs)}"
        "tops, tinys, luts, m, k, x, blocks)",
        "    return loop",
    ]
    return "\n".join(L) + "\n"


def _kernel(
    rule: str,
    flags: Mapping[str, Any],
    writes: tuple[bool, ...],
    qslots: tuple[bool, ...],
    codecs: tuple[str, ...],
    io: storage.IO,
    parallel: bool,
) -> Any:
    key = (rule, tuple(sorted(flags.items())), writes, qslots, codecs, io, parallel)
    fn = _compiled.get(key)
    if fn is None:
        ikey = key[:-1]
        inner = _inner.get(ikey)
        if inner is None:
            # the serial one-buffer loop, compiled inside this one (numpy's error model: x/0 is
            # inf, as in every loop of the backend)
            py = python_quant_loop(rule, flags, writes, qslots, codecs, io, False)
            # a name of its own per variant: numba's parallel lowering of the calling loop
            # tells the functions it calls apart by name (two variants named alike, Adam's
            # and AdamW's, ran the first one compiled in both)
            tag = hashlib.sha256(repr(ikey).encode()).hexdigest()[:16]
            py.__name__ = py.__qualname__ = f"quant_loop_{tag}"
            inner = _inner[ikey] = register_jitable(error_model="numpy")(py)
        ns: dict[str, Any] = {
            "__name__": __name__,
            "np": np,
            "carray": numba.carray,
            "address_as": address_as,
        }
        fmt = str(io.quant)
        src = many_quant_source(
            len(writes), writes, qslots, io.master, quant.BLOCKS[fmt], fmt in quant.PACKED
        )
        exec(compile(src, __file__, "exec"), ns)
        py = ns["factory"](inner, numba.prange if parallel else range)
        fn = _compiled[key] = njit_cached(parallel=parallel, nogil=True, error_model="numpy")(py)
    return fn


def block_chunks(lengths: Sequence[int], fmt: str | None = None) -> np.ndarray:
    """``(tensor, first block, stop block)`` rows covering every block (of format ``fmt``'s
    size) of tensors of ``lengths`` elements, at most ``CHUNK_BLOCKS`` blocks each."""
    from .numba_backend import chunks_for

    return chunks_for([quant.nblocks(n, fmt) for n in lengths], CHUNK_BLOCKS)


def _like(kind: str) -> np.ndarray:
    return np.empty(1, np.uint16 if kind in storage.BITS16 else np.dtype(kind))


def launch_many_quant(
    rule: str,
    flags: Mapping[str, bool],
    writes: Sequence[bool],
    io: storage.IO,
    table: np.ndarray,
    chunks: np.ndarray,
    k: Sequence[float],
    inv_scale: float = 1.0,
    key: int = 0,
    salt: int = 0,
) -> None:
    """One fused pass of one variant over every tensor of ``table`` (int64 rows ``(n, param,
    grad, slot..., master, absmax...)``, see the module docstring) in ``chunks`` (from
    ``block_chunks``), with the storage format ``io`` (``io.quant`` set); ``inv_scale``,
    ``key`` and ``salt`` as ``launch_many_io``'s. Unchecked (see the module docstring)."""
    from .numba_backend import PARALLEL_MIN

    if chunks.shape[0] == 0:
        return
    spec = RULES[rule]
    writes = tuple(bool(w) for w in writes)
    qslots = tuple(bool(w and s.quantize) for s, w in zip(spec.slots, writes))
    tabs = [quant.table(str(io.quant), s.quant_map) for s in spec.slots]
    codecs = tuple(t.name for t in tabs)
    total = int(table[:, 0].sum())
    fn = _kernel(rule, flags, writes, qslots, codecs, io, total >= PARALLEL_MIN)
    ct = np.dtype(io.compute).type
    fn(
        table,
        chunks,
        _like(io.param),
        _like(io.grad),
        _like(io.state),
        np.empty(1, np.uint8),
        _like(io.kind("master")),  # float32, or a remainder's int16
        *[t.dec for t in tabs],
        *[t.base for t in tabs],
        *[t.bthr for t in tabs],
        tuple(np.float32(t.top) for t in tabs),
        np.array([t.tiny for t in tabs], np.float32).reshape(-1),
        np.array([(t.e_lo, t.e_hi, t.mb) for t in tabs], np.int64).reshape(-1, 3),
        tuple(ct(v) for v in k),
        (ct(inv_scale), np.int64(salt), np.int64(key)),
    )
