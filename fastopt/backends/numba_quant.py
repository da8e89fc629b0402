"""The CPU loop of a step with quantized state slots (``kernels/quant.py``).

One loop per (rule, variant, slots present, quantized slots, storage format, parallel), generated
as Python source like ``numba_codegen``'s and compiled once (cached on disk). It walks a table
of blocks (``blocks[b] = (first, stop)`` element indices; block ``b``'s scale is ``absmax[b]``
of every quantized slot), in chunks of ``CHUNK_BLOCKS`` blocks per thread (``prange`` from
``numba_backend.PARALLEL_MIN`` elements). Per block, over views of the block's elements (so
that every index is provably non-negative and the loops vectorise), one loop decodes each
quantized slot's code (``dec(code) * (absmax / top)``: a lookup in a table frozen into the
code for the int8 maps, arithmetic for float8, ``kernels.quant.CODECS``), runs the rule (the
param and the float32 slots loaded and stored as the storage format says), writes each
quantized slot's new value into a per-thread scratch row and keeps the row's absmax (an
integer maximum of the magnitudes' bit patterns); then, per quantized slot, one loop encodes
the row, its two halves side by side (two independent chains per iteration), by arithmetic
(``kernels.quant.FAST_ENCODE``; an int8 row holding a value it flags, one near an interior
threshold, is encoded again by the lookup, ``CODECS``) after its new absmax is stored: one
pass over memory (codes read once and written once), the float32 values in cache.

A quantized slot arrives as ``(codes, absmax)`` (a parameter's: its blocks start at 0, every
``BLOCK`` elements) or ``(codes, absmax, blocks)`` (a ``FlatBuffer`` group's, whose blocks start
at each parameter's offset). Unchecked, like ``numba_backend.prepare``: the callers validate
lengths, dtypes and writability first.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numba
import numpy as np
from numba.extending import register_jitable

from .._numba_cache import njit_cached
from ..kernels import RULES, quant, storage
from .numba_codegen import IO_CELLS, io_cells, jitable_rule
from .numba_intrinsics import FP8_LOWERED
from .protocol import Runner

#: blocks per chunk of the loop (one scratch allocation per chunk)
CHUNK_BLOCKS = 64

for _fn in {f for pair in quant.CODECS.values() for f in pair} | {
    *quant.FAST_ENCODE.values(),
    *quant.LOOKUP_ENCODE.values(),
    quant._dynamic_u,
    quant.encode,
    quant.encode_signmag,
    quant._dynamic_value,
    quant._linspace_at,
    *quant.ARITHMETIC_DECODE.values(),
} - set(FP8_LOWERED):
    register_jitable(_fn)

_compiled: dict[Any, Any] = {}


def quant_loop_source(
    nslots: int,
    writes: tuple[bool, ...],
    qslots: tuple[bool, ...],
    io: storage.IO,
    packed: tuple[bool, ...] = (),
    flagging: tuple[bool, ...] = (),
) -> str:
    """Python source of the factory of the loop over blocks (see the module docstring):
    ``loop(p, g, s0.., a0.., d0.., d0b.., t0.., tops, luts, m, k, x, blocks)`` where ``s{j}``
    is slot ``j``'s array (codes when ``qslots[j]``), ``a{j}`` its absmax, ``d{j}`` its value
    table, ``d{j}b``/``t{j}`` its encoding lookup (``kernels.quant.Table``'s ``base``/``bthr``;
    placeholders for a slot that is not quantized), ``tops`` the tables' largest values,
    ``luts`` their ``(e_lo, e_hi, mb)`` (arguments, not constants of the source: the disk
    cache tells loops apart by their code and cells), ``m`` the master copy (the param when
    none). A slot of ``packed`` (a packed format, ``kernels.quant.PACKED``) has two codes per
    byte: the block's bytes from ``lo // 2`` (``lo`` even), unpacked into a scratch row of
    codes (one per element) that the loop decodes, encoded into that row, then packed. A
    slot of ``flagging`` has an encode that can flag a value (``kernels.quant.may_flag``):
    its block is then encoded again by the lookup; the others' loops carry no flag and no
    lookup encode."""
    packed = packed or (False,) * nslots
    flagging = flagging or (True,) * nslots
    q = [j for j in range(nslots) if qslots[j]]
    row = {j: r for r, j in enumerate(q)}
    args = ["p", "g"]
    args += [f"s{j}" for j in range(nslots)]
    args += [f"a{j}" for j in range(nslots)]
    args += [f"d{j}" for j in range(nslots)]
    args += [f"d{j}b" for j in range(nslots)]
    args += [f"t{j}" for j in range(nslots)]
    args += ["tops", "tinys", "luts", "m", "k", "x", "blocks"]
    cells = list(IO_CELLS)
    cells += [f"dec{j}" for j in range(nslots)] + [f"enc{j}" for j in range(nslots)]
    cells += [f"fenc{j}" for j in range(nslots)]

    def lut(j: int) -> str:
        return f"d{j}b, t{j}, luts[{j}, 0], luts[{j}, 1], luts[{j}, 2]"

    L = [
        f"def factory(elem, rng, {', '.join(cells)}):",
        f"    def loop({', '.join(args)}):",
        "        nb = blocks.shape[0]",
        f"        for c in rng((nb + {CHUNK_BLOCKS - 1}) // {CHUNK_BLOCKS}):",
        f"            buf = np.empty(({max(len(q), 1)}, {quant.BLOCK}), np.float32)",
        f"            for b in range(c * {CHUNK_BLOCKS}, min(nb, (c + 1) * {CHUNK_BLOCKS})):",
        "                lo = blocks[b, 0]",
        "                hi = blocks[b, 1]",
    ]
    # rows of the scratch, one per quantized slot
    L[5:5] = [f"            r{j} = buf[{row[j]}]" for j in q]
    if any(packed[j] for j in q):  # a packed slot's codes before they are packed
        L[5:5] = [f"            qb = np.empty(({len(q)}, {quant.BLOCK}), np.uint8)"]
        L[6:6] = [f"            q{j} = qb[{row[j]}]" for j in q if packed[j]]
    pad = " " * 16
    # each block's arrays as views starting at 0: indices the loops can prove non-negative
    # (no wraparound select), so they vectorise like the one-array loops
    L.append(f"{pad}cnt = hi - lo")
    L.append(f"{pad}pb = p[lo:hi]")
    L.append(f"{pad}gb = g[lo:hi]")
    if io.master:
        L.append(f"{pad}mb_ = m[lo:hi]")
    for j in range(nslots):
        if writes[j] and qslots[j] and packed[j]:
            L.append(f"{pad}sb{j} = s{j}[lo >> 1 : (hi + 1) >> 1]")
        elif writes[j]:
            L.append(f"{pad}sb{j} = s{j}[lo:hi]")
    for j in q:
        L.append(f"{pad}f{j} = a{j}[b] / tops[{j}]")
        L.append(f"{pad}h{j} = np.int32(0)")
        if packed[j]:  # the block's nibbles into the row of codes first: one code per element
            L += [
                f"{pad}for i in range(cnt >> 1):",
                f"{pad}    q{j}[2 * i] = sb{j}[i] >> 4",
                f"{pad}    q{j}[2 * i + 1] = sb{j}[i] & 15",
                f"{pad}if cnt & 1:",
                f"{pad}    q{j}[cnt - 1] = sb{j}[cnt >> 1] >> 4",
            ]
    # one loop: decode, the rule, the new values into the scratch rows and their absmax (an
    # integer maximum of the magnitudes' bit patterns: the same order for non-negative floats,
    # NaN above every number, so a NaN wins, and a reduction LLVM vectorises without fast-math)
    L.append(f"{pad}for i in range(cnt):")
    pad2 = pad + "    "
    pv = "lm(pb[i], mb_[i])" if io.remainder else "mb_[i]" if io.master else "lp(pb[i])"
    L.append(f"{pad2}pv = {pv}")
    L.append(f"{pad2}gv = lg(gb[i]){' * x[0]' if io.scale else ''}")
    if io.write_grad:
        L.append(f"{pad2}gb[i] = sg(gv)")
    for j in range(nslots):
        if not writes[j]:
            L.append(f"{pad2}v{j} = pv")
        elif qslots[j]:
            code = f"q{j}[i]" if packed[j] else f"sb{j}[i]"
            L.append(f"{pad2}v{j} = dec{j}({code}, d{j}) * f{j}")
        else:
            L.append(f"{pad2}v{j} = ls(sb{j}[i])")
    outs = ", ".join(["pi"] + [f"o{j}" for j in range(nslots)])
    L.append(
        f"{pad2}{outs}{',' if nslots == 0 else ''} = elem("
        f"pv, gv, {''.join(f'v{j}, ' for j in range(nslots))}k)"
    )
    if io.master:
        L.append(f"{pad2}mb_[i] = {'sm(pi)' if io.remainder else 'pi'}")
    L.append(f"{pad2}pb[i] = sp(pi, lo + i, x[1], x[2])")
    for j in range(nslots):
        if not writes[j]:
            continue
        if qslots[j]:
            L.append(f"{pad2}r{j}[i] = o{j}")
            L.append(f"{pad2}h{j} = max(h{j}, np.int32(f32_bits(o{j}) & 0x7FFFFFFF))")
        else:
            L.append(f"{pad2}sb{j}[i] = ss(o{j})")
    for j in q:
        out = f"q{j}" if packed[j] else f"sb{j}"  # where the codes go, one per element
        enc = f"fenc{j}(r{j}[i] * e{j}, {lut(j)})"
        enc_b = f"fenc{j}(r{j}[i + hh] * e{j}, {lut(j)})"
        fl = flagging[j]
        L += [
            f"{pad}n{j} = bits_f32(h{j})",
            f"{pad}a{j}[b] = n{j}",
            f"{pad}e{j} = tops[{j}] / n{j} if n{j} >= tinys[{j}] else np.float32(0)",
            *([f"{pad}z{j} = False"] if fl else []),
            # the row's two halves side by side: two independent chains of the long encode
            f"{pad}hh = cnt >> 1",
            f"{pad}for i in range(hh):",
            f"{pad}    c{j}, w{j} = {enc}",
            f"{pad}    cb{j}, wb{j} = {enc_b}",
            f"{pad}    {out}[i] = c{j}",
            f"{pad}    {out}[i + hh] = cb{j}",
            *([f"{pad}    z{j} |= w{j} | wb{j}"] if fl else []),
            f"{pad}for i in range(2 * hh, cnt):",
            f"{pad}    c{j}, w{j} = {enc}",
            f"{pad}    {out}[i] = c{j}",
            *([f"{pad}    z{j} |= w{j}"] if fl else []),
        ]
        if fl:  # a value the arithmetic encode flags (near a threshold): the block by the lookup
            L += [
                f"{pad}if z{j}:",
                f"{pad}    for i in range(cnt):",
                f"{pad}        {out}[i] = enc{j}(r{j}[i] * e{j}, {lut(j)})",
            ]
        if packed[j]:  # two codes per byte: element 2i the high nibble
            L += [
                f"{pad}for i in range(cnt >> 1):",
                f"{pad}    sb{j}[i] = (q{j}[2 * i] << 4) | q{j}[2 * i + 1]",
                f"{pad}if cnt & 1:",
                f"{pad}    sb{j}[cnt >> 1] = q{j}[cnt - 1] << 4",
            ]
    L.append("    return loop")
    return "\n".join(L) + "\n"


def quant_kernel(
    rule: str,
    flags: Mapping[str, Any],
    writes: tuple[bool, ...],
    qslots: tuple[bool, ...],
    codecs: tuple[str, ...],
    io: storage.IO,
    parallel: bool,
) -> Any:
    """The compiled loop (compiled, or loaded from the disk cache, once); ``codecs``: each
    slot's table name (``kernels.quant.CODECS``: its decode and encode)."""
    key = (rule, tuple(sorted(flags.items())), writes, qslots, codecs, io, parallel)
    fn = _compiled.get(key)
    if fn is None:
        py = python_quant_loop(rule, flags, writes, qslots, codecs, io, parallel)
        fn = _compiled[key] = njit_cached(parallel=parallel, nogil=True, error_model="numpy")(py)
    return fn


def python_quant_loop(
    rule: str,
    flags: Mapping[str, Any],
    writes: tuple[bool, ...],
    qslots: tuple[bool, ...],
    codecs: tuple[str, ...],
    io: storage.IO,
    parallel: bool,
) -> Any:
    """The uncompiled loop of ``quant_kernel`` (the many-tensor loop of
    ``numba_quant_many`` calls the serial one per chunk of blocks)."""
    ns: dict[str, Any] = {
        "__name__": __name__,
        "np": np,
        "f32_bits": storage.f32_bits,
        "bits_f32": storage.bits_f32,
    }
    packed = tuple(c in quant.PACKED_TABLES for c in codecs)
    flagging = tuple(quant.may_flag(c) for c in codecs)
    src = quant_loop_source(len(writes), writes, qslots, io, packed, flagging)
    exec(compile(src, __file__, "exec"), ns)
    return ns["factory"](
        jitable_rule(RULES[rule].make_rule(**flags), False),
        numba.prange if parallel else range,
        *io_cells(io),
        *[quant.CODECS[c][0] for c in codecs],
        *[quant.CODECS[c][1] for c in codecs],
        *[quant.FAST_ENCODE[c] for c in codecs],
    )


@functools.lru_cache(maxsize=256)
def blocks_for(n: int, block: int = quant.BLOCK) -> np.ndarray:
    """The block table of one tensor of ``n`` elements in blocks of ``block``: ``(first,
    stop)`` rows (read-only)."""
    lo = np.arange(0, n, block, dtype=np.int64)
    out = np.stack([lo, np.minimum(lo + block, n)], axis=1).reshape(-1, 2)
    out.setflags(write=False)
    return out


def blocks_of_segments(segments: Iterable[tuple[int, int]], block: int = quant.BLOCK) -> np.ndarray:
    """The block table of ``(offset, size)`` segments of one buffer (a ``FlatBuffer`` group's
    parameters, in order): each segment's blocks start at its offset."""
    parts = [blocks_for(size, block) + off for off, size in segments if size > 0]
    if not parts:
        return np.zeros((0, 2), np.int64)
    return np.ascontiguousarray(np.concatenate(parts))


def _bits(a: Any) -> Any:
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def prepare_quant(
    rule: str,
    flags: Mapping[str, Any],
    writes: Sequence[bool],
    k: Sequence[Any],
    io: storage.IO,
    extras: tuple[Any, Any] | None,
) -> Runner:
    """``run(param, grad, states, master=None, salt=0)`` of one step over quantized state
    (``io.quant``): a quantized slot's entry in ``states`` is ``(codes, absmax)`` or
    ``(codes, absmax, blocks)``, any other present slot an array of ``io.state``."""
    from .numba_backend import PARALLEL_MIN

    spec = RULES[rule]
    writes = tuple(writes)
    qslots = tuple(bool(w and s.quantize) for s, w in zip(spec.slots, writes))
    tabs = [quant.table(io.quant, s.quant_map) for s in spec.slots]
    codecs = tuple(t.name for t in tabs)
    ct = np.dtype(io.compute).type
    kc = tuple(ct(v) for v in k)
    inv_scale, key = extras if extras is not None else (1.0, 0)
    tops = tuple(np.float32(t.top) for t in tabs)
    tinys = tuple(t.tiny for t in tabs)
    luts = np.array([(t.e_lo, t.e_hi, t.mb) for t in tabs], np.int64).reshape(-1, 3)
    fns: list[Any] = [None, None]

    def run(
        param: Any, grad: Any, states: Sequence[Any], master: Any = None, salt: int = 0
    ) -> None:
        n = param.shape[0]
        if n == 0:
            return
        p = _bits(param)
        arrs, absm, blocks = [], [], None
        for s, qd in zip(states, qslots):
            if qd:
                arrs.append(s[0].reshape(-1))
                absm.append(s[1])
                if len(s) > 2:
                    blocks = s[2]
            else:
                arrs.append(p if s is None else _bits(s))
                absm.append(tops_placeholder)
        if blocks is None:
            blocks = blocks_for(n, quant.BLOCKS[io.quant])
        par = n >= PARALLEL_MIN
        fn = fns[par]
        if fn is None:
            fn = fns[par] = quant_kernel(rule, flags, writes, qslots, codecs, io, par)
        fn(
            p,
            _bits(grad),
            *arrs,
            *absm,
            *[t.dec for t in tabs],
            *[t.base for t in tabs],
            *[t.bthr for t in tabs],
            tops,
            tinys,
            luts,
            p if master is None else master,
            kc,
            (ct(inv_scale), np.int64(salt), np.int64(key)),
            blocks,
        )

    return run


#: the absmax argument of a slot that is not quantized (never read)
tops_placeholder = np.zeros(1, np.float32)
