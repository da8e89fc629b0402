"""The numba-cuda kernel of a step over quantized state slots (``kernels/quant.py``).

The same kernel as the CuPy backend's (``kernels/quant_cuda.py``, whose docstring describes
it), generated as Python source and compiled by ``numba.cuda.jit``: one CUDA block of
``quant_cuda.threads(fmt)`` threads per block of codes (a table of ``(first, stop)`` rows,
grid-strided), each thread on one element (a byte format) or on one byte, both its elements (a
packed one: ``"int4"``, the high nibble element ``first + 2t``, so that no two threads write
one byte); the quantized slots decoded from tables in shared memory, the rule's own
per-element function (``Rule.element``) with the storage format's loads and stores (the
converters of ``kernels/storage.py``), the new absmax reduced over the block in shared memory
(a maximum of bit patterns), thread 0 storing it, every thread encoding its value by a binary
search over the slot's thresholds (``q_encode``: the CPU's code of every value), or for int4
by the CPU loops' own encode (``quant.FAST_ENCODE``: fifteen comparisons, ``int4_encode``).

Under the simulator (``NUMBA_ENABLE_CUDASIM=1``) host NumPy arrays run as they are; on a GPU
the tables and the block table are copied to the device once (cached per device and table),
and a step launches one kernel on the param's producer stream, no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from types import FunctionType
from typing import Any

import numpy as np

from ..kernels import RULES, quant, storage
from ..kernels.quant_cuda import QBLOCK, constants, maps, qslots, tables, threads
from ..kernels.storage import bits_f32, f32_bits
from . import _launch
from . import numba_cuda_backend as ncb

__all__ = [
    "int4_encode",
    "kernel",
    "launch_quant",
    "launch_table",
    "python_kernel",
    "q_encode",
    "quant_kernel_source",
    "signature",
    "table_kernel_source",
    "table_signature",
]


def q_encode(y: Any, thr: Any, r: Any, signmag: Any) -> Any:
    """The code of ``y`` in row ``r`` of ``thr`` (ascending thresholds, +inf last): ``#{k :
    thr[r, k] < y}`` by a binary search over its 256 entries (NaN: 0); a float8 code
    (``signmag``) from ``|y|``, with ``y``'s sign bit."""
    u = f32_bits(y)
    a = bits_f32(u & 0x7FFFFFFF) if signmag else y
    c = 0
    s = 128
    while s > 0:
        if thr[r, c + s - 1] < a:
            c += s
        s >>= 1
    return (c | ((u >> 24) & 0x80)) if signmag else c


def int4_encode(name: str, jit: Any) -> Any:
    """The CPU loops' int4 encode of table ``name`` (``quant.FAST_ENCODE``: ``(y, *unread) ->
    (code, False)``, fifteen comparisons with the table's thresholds) compiled by ``jit``: the
    same function, its ``quant.pick`` bound to ``jit(quant.pick)`` (the CPU backend lowers
    ``pick`` by an intrinsic of its own, for the CPU only)."""
    fn = quant.FAST_ENCODE[name]
    glb = dict(fn.__globals__, pick=jit(quant.pick))
    return jit(FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__))


def _factory_line(nq: int, packed: bool, table: bool) -> str:
    """The factory's ``def`` line: the converters and codecs it binds, then ``view`` (the
    multi-tensor kernel) and ``enc4_0..`` (a packed format's encode per quantized slot)."""
    extra = (", view" if table else "") + "".join(f", enc4_{r}" for r in range(nq if packed else 0))
    return f"def factory(elem, lp, lg, ls, sp, sg, ss, CT, enc, F32, U32, SIGNMAG{extra}):"


def quant_kernel_source(
    name: str, nslots: int, writes: Sequence[bool], q: Sequence[bool], io: storage.IO, nsc: int
) -> str:
    """Python source of the kernel factory: ``kernel(p, g, s0.., a0.., m, qtab, blocks, tq, k,
    x, kb, gs, fi, kp)`` where ``s{j}`` is slot ``j``'s array (uint8 codes when ``q[j]``, two
    per byte for a packed format), ``a{j}`` its absmax (a placeholder when not quantized),
    ``qtab`` the packed tables (``quant_cuda.tables``), ``tq`` per quantized slot ``(top,
    tiny)``, and the rest as in ``numba_cuda_backend.mixed_kernel_source``."""
    packed = io.quant in quant.PACKED
    slots = "".join(f"s{j}, " for j in range(nslots)) + "".join(f"a{j}, " for j in range(nslots))
    head = [
        _factory_line(sum(map(bool, q)), packed, False),
        f"    def {name}(p, g, {slots}m, qtab, blocks, tq, k, x, kb, gs, fi, kp):",
        *ncb.prologue_source(io, nsc),
    ]
    loop = [
        "        nb = blocks.shape[0]",
        "        b = cuda.blockIdx.x",
        "        while b < nb:",
    ]
    if packed:  # the thread's byte and its two elements
        loop += [
            "            y = (blocks[b, 0] >> 1) + t",
            "            i0 = blocks[b, 0] + 2 * t",
            "            stop = blocks[b, 1]",
        ]
    else:
        loop += ["            i = blocks[b, 0] + t", "            act = i < blocks[b, 1]"]
    tail = ["            b += cuda.gridDim.x", f"    return {name}"]
    return _source(nslots, writes, q, io, head, loop, tail, "i", "b")


def table_kernel_source(
    name: str, rule: str, flags: dict[str, bool], io: storage.IO, clip: bool = False
) -> str:
    """Python source of the multi-tensor kernel factory of one variant (``quant_cuda.
    table_source``'s kernel): ``kernel(table, chunks, nchunks, pl, gl, sl, ml, cl8, al, qtab,
    tq, k, x, kb, gs, fi, kp, cl)``: the table (``quant_cuda.table_columns``) and its chunk
    entries (one block of codes each), one-element arrays of the types each view is made as
    (param, grad, float state, master, codes, scales), ``qtab`` and ``tq`` as
    ``quant_kernel_source`` takes them, the scalars and device arrays as
    ``numba_cuda_backend.table_kernel_source`` takes them (``cl`` the device ``[norm,
    clip_coef]``, read when ``clip``). Per chunk every array is viewed from the tensor's row at
    the block's first element (a packed slot's codes at its byte, half that; its scale at the
    block's number): the one-buffer kernel's block body over those views; the
    stochastic-rounding index is counted from the tensor's start."""
    from ..kernels.quant_cuda import table_columns
    from ..kernels.storage import ITEMSIZE

    spec = RULES[rule]
    writes, q = spec.slots_used(flags), qslots(rule, flags)
    nslots = len(writes)
    col = {c: j for j, c in enumerate(table_columns(rule, io.master))}
    assert io.quant is not None
    block, packed = quant.BLOCKS[io.quant], io.quant in quant.PACKED

    def at(column: str, size: int) -> str:  # the address of the block's first element
        return f"table[r, {col[column]}] + base * {size}"

    head = [
        _factory_line(sum(q), packed, True),
        f"    def {name}(table, chunks, nchunks, pl, gl, sl, ml, cl8, al, qtab, tq, k, x, kb, "
        "gs, fi, kp, cl):",
        *ncb.prologue_source(io, len(spec.scalars)),
    ]
    if clip:
        head.append("        cf = cl[1]")
    loop = [
        "        c = cuda.blockIdx.x",
        "        while c < nchunks:",
        "            e = chunks[c]",
        "            r = e >> 32",
        "            nblk = e & 0xFFFFFFFF",
        f"            base = nblk * {block}",
        f"            cnt = min(base + {block}, table[r, 0]) - base",
        f"            p = view({at('param', ITEMSIZE[io.param])}, cnt, pl)",
        f"            g = view({at('grad', ITEMSIZE[io.grad])}, cnt, gl)",
    ]
    for j, (s, w) in enumerate(zip(spec.state, writes)):
        if q[j] and packed:  # the block's bytes from its first (base is even)
            loop += [
                f"            s{j} = view(table[r, {col[s]}] + (base >> 1), (cnt + 1) >> 1, cl8)",
                f"            a{j} = view(table[r, {col[f'{s}_absmax']}] + nblk * 4, 1, al)",
            ]
        elif q[j]:
            loop += [
                f"            s{j} = view({at(s, 1)}, cnt, cl8)",
                f"            a{j} = view(table[r, {col[f'{s}_absmax']}] + nblk * 4, 1, al)",
            ]
        else:
            loop.append(
                f"            s{j} = view({at(s, ITEMSIZE[io.state])}, cnt, sl)"
                if w
                else f"            s{j} = p"
            )
            loop.append(f"            a{j} = p")
    loop.append(
        f"            m = view({at('master', ITEMSIZE[io.kind('master')])}, cnt, ml)"
        if io.master
        else "            m = p"
    )
    if packed:  # the thread's byte of the views and its two elements
        loop += ["            y = t", "            i0 = base + 2 * t"]
        loop.append("            stop = base + cnt")
        ix = "i - base"
    else:
        loop += ["            i = base + t", "            act = t < cnt"]
        ix = "t"
    tail = ["            c += cuda.gridDim.x", f"    return {name}"]
    return _source(nslots, writes, q, io, head, loop, tail, ix, "0", clip)


def _source(
    nslots: int,
    writes: Sequence[bool],
    q: Sequence[bool],
    io: storage.IO,
    head: list[str],
    loop: list[str],
    tail: list[str],
    at: str,
    blk: str,
    clip: bool = False,
) -> str:
    """A quantized kernel's source: ``head`` (the factory and kernel lines, the prologue),
    ``loop`` (opening the loop over blocks of codes, setting ``i``, the element's index in its
    tensor, and ``act``; for a packed format ``y``, the thread's byte of the codes, ``i0``, its
    first element's index in its tensor, and ``stop``, the block's end), the block's body
    (``at`` indexes the element in its arrays, ``blk`` the block in its scales; the gradient
    times ``cf`` when ``clip``), then ``tail``."""
    if io.quant in quant.PACKED:
        return _packed_source(nslots, writes, q, io, head, loop, tail, at, blk, clip)
    qs = [j for j in range(nslots) if q[j]]
    row = {j: r for r, j in enumerate(qs)}
    nq = max(len(qs), 1)
    L = list(head)
    L.append("        t = cuda.threadIdx.x")
    if qs:  # (a variant that uses no quantized slot keeps only the element loop)
        L += [
            f"        dec = cuda.shared.array(({nq}, {QBLOCK}), F32)",
            f"        thr = cuda.shared.array(({nq}, {QBLOCK}), F32)",
            f"        red = cuda.shared.array(({nq}, {QBLOCK}), U32)",
        ]
    for r in range(len(qs)):
        L += [
            f"        dec[{r}, t] = qtab[{r}, t]",
            f"        thr[{r}, t] = qtab[{r}, {QBLOCK} + t]",
        ]
    if qs:
        L.append("        cuda.syncthreads()")
    L += loop
    L += [f"            q{j} = CT(0)" for j in qs]
    L.append("            if act:")
    pad = " " * 16
    for j in qs:
        L.append(f"{pad}q{j} = dec[{row[j]}, s{j}[{at}]] * (a{j}[{blk}] / tq[{2 * row[j]}])")
    L += _element_lines(nslots, writes, q, io, at, [f"q{j}" for j in qs], clip, pad)
    for j in qs:
        L.append(f"            red[{row[j]}, t] = (f32_bits(q{j}) & 0x7FFFFFFF) if act else 0")

    def store(j: int, r: int) -> list[str]:
        return [
            "            if act:",
            f"                s{j}[{at}] = enc(q{j} * e{j}, thr, {r}, SIGNMAG[{r}])",
        ]

    L += _reduce_and_store(qs, QBLOCK, blk, store)
    L += tail
    return "\n".join(L) + "\n"


def _reduce_and_store(
    qs: Sequence[int], nt: int, blk: str, store: Callable[[int, int], list[str]]
) -> list[str]:
    """The end of a block's body: the absmax of every quantized slot ``j`` (row ``r`` of
    ``red``, ``nt`` entries) by a tree of maxima, ``n{j}``, the factor ``e{j} = top / n{j}``
    (0 below ``tiny``), the codes stored by ``store(j, r)``'s lines, the absmax by thread 0,
    then a barrier before ``red`` is reused."""
    L: list[str] = []
    if not qs:
        return L
    L += [
        f"            h = {nt // 2}",
        "            while h > 0:",
        "                cuda.syncthreads()",
        "                if t < h:",
    ]
    L += [
        f"                    red[{r}, t] = max(red[{r}, t], red[{r}, t + h])"
        for r in range(len(qs))
    ]
    L += ["                h //= 2", "            cuda.syncthreads()"]
    for r, j in enumerate(qs):
        L += [
            f"            n{j} = bits_f32(red[{r}, 0])",
            f"            e{j} = tq[{2 * r}] / n{j} if n{j} >= tq[{2 * r + 1}] else CT(0)",
            *store(j, r),
            "            if t == 0:",
            f"                a{j}[{blk}] = n{j}",
        ]
    return L + ["            cuda.syncthreads()"]


def _element_lines(
    nslots: int,
    writes: Sequence[bool],
    q: Sequence[bool],
    io: storage.IO,
    at: str,
    qv: Sequence[str],
    clip: bool,
    pad: str,
) -> list[str]:
    """The rule on one element (``at`` its index in the arrays, ``i`` in its tensor): the
    quantized slots' decoded values in the variables ``qv`` (slot order), which take the new
    ones."""
    qi = dict(zip([j for j in range(nslots) if q[j]], qv))
    L = [f"{pad}pv = {f'm[{at}]' if io.master else f'lp(p[{at}])'}"]
    L.append(f"{pad}gv = lg(g[{at}]){' * inv' if io.scale else ''}{' * cf' if clip else ''}")
    if io.write_grad:
        L.append(f"{pad}g[{at}] = sg(gv)")
    for j in range(nslots):
        v = qi[j] if q[j] else f"ls(s{j}[{at}])" if writes[j] else "pv"
        L.append(f"{pad}v{j} = {v}")
    outs = ", ".join(["pi"] + [f"o{j}" for j in range(nslots)])
    L.append(
        f"{pad}{outs}{',' if nslots == 0 else ''} = elem(pv, gv, "
        f"{''.join(f'v{j}, ' for j in range(nslots))}k)"
    )
    if io.master:
        L.append(f"{pad}m[{at}] = pi")
    L.append(f"{pad}p[{at}] = sp(pi, i, x[1], key)")
    for j in range(nslots):
        if q[j]:
            L.append(f"{pad}{qi[j]} = o{j}")
        elif writes[j]:
            L.append(f"{pad}s{j}[{at}] = ss(o{j})")
    return L


def _packed_source(
    nslots: int,
    writes: Sequence[bool],
    q: Sequence[bool],
    io: storage.IO,
    head: list[str],
    loop: list[str],
    tail: list[str],
    at: str,
    blk: str,
    clip: bool,
) -> str:
    """``_source`` for a packed format: thread ``t`` owns byte ``y`` of each quantized slot's
    codes, elements ``i0`` (its high nibble) and ``i0 + 1`` (its low one), as the CUDA C
    kernel (``quant_cuda._packed_block``): the byte read once, the rule on each element in
    turn, the larger magnitude of the two into the block's reduction, the byte written once
    (a low nibble of 0 past the block's end), the encode ``enc4_{r}``."""
    assert io.quant is not None
    qs = [j for j in range(nslots) if q[j]]
    row = {j: r for r, j in enumerate(qs)}
    nq = max(len(qs), 1)
    nt = threads(io.quant)
    nd = max(quant.table(io.quant, m).dec.size for m in ("signed", "unsigned"))  # 16 values
    L = list(head)
    L.append("        t = cuda.threadIdx.x")
    if qs:
        L += [
            f"        dec = cuda.shared.array(({nq}, {nd}), F32)",
            f"        red = cuda.shared.array(({nq}, {nt}), U32)",
            "        e = t",
            f"        while e < {len(qs) * nd}:",
            f"            dec[e // {nd}, e % {nd}] = qtab[e // {nd}, e % {nd}]",
            f"            e += {nt}",
            "        cuda.syncthreads()",
        ]
    L += loop
    L += ["            act0 = i0 < stop", "            act1 = i0 + 1 < stop"]
    L += [f"            b{j} = s{j}[y] if act0 else 0" for j in qs]
    pad = " " * 16
    for h in (0, 1):
        L += [f"            q{j}_{h} = CT(0)" for j in qs]
        L += [f"            i = i0 + {h}", f"            if act{h}:"]
        for j in qs:
            L.append(
                f"{pad}q{j}_{h} = dec[{row[j]}, (b{j} >> {4 - 4 * h}) & 15] * "
                f"(a{j}[{blk}] / tq[{2 * row[j]}])"
            )
        L += _element_lines(nslots, writes, q, io, at, [f"q{j}_{h}" for j in qs], clip, pad)
    for j in qs:
        L += [
            f"            m{j} = (f32_bits(q{j}_0) & 0x7FFFFFFF) if act0 else 0",
            f"            w{j} = (f32_bits(q{j}_1) & 0x7FFFFFFF) if act1 else 0",
            f"            red[{row[j]}, t] = max(m{j}, w{j})",
        ]

    def store(j: int, r: int) -> list[str]:
        return [
            "            if act0:",
            f"                c{j} = enc4_{r}(q{j}_0 * e{j}, 0, 0, 0, 0, 0)[0] << 4",
            "                if act1:",
            f"                    c{j} |= enc4_{r}(q{j}_1 * e{j}, 0, 0, 0, 0, 0)[0]",
            f"                s{j}[y] = c{j}",
        ]

    L += _reduce_and_store(qs, nt, blk, store)
    L += tail
    return "\n".join(L) + "\n"


_compiled: dict[Any, Any] = {}


def python_kernel(
    rule: str, flags: dict[str, bool], io: storage.IO, table: bool = False, clip: bool = False
) -> Any:
    """The uncompiled kernel of one variant under ``io`` (``io.quant`` set): the one-buffer
    kernel, or with ``table`` the multi-tensor one (``table_kernel_source``)."""
    cuda = ncb.cuda
    spec = RULES[rule]
    writes = spec.slots_used(flags)
    q = qslots(rule, flags)
    jit = cuda.jit(device=True, inline="always")
    elem = jit(spec.element(flags, jit))
    ns = {"__name__": __name__, "cuda": cuda, "f32_bits": f32_bits, "bits_f32": bits_f32}
    if table:
        name = f"fastopt_mt_{rule}_quant"
        src = table_kernel_source(name, rule, flags, io, clip)
    else:
        name = f"fastopt_{rule}_quant"
        src = quant_kernel_source(name, len(writes), writes, q, io, len(spec.scalars))
    exec(compile(src, __file__, "exec"), ns)
    conv = storage.make_converters(lambda f: cuda.jit(device=True, inline="always")(f), "float32")
    param = "bfloat16-sr" if io.sr else io.param
    assert io.quant is not None
    signmag = tuple(
        int(constants(io.quant, s.quant_map)[2]) for s, qd in zip(spec.slots, q) if qd
    ) or (0,)
    enc4 = (
        [int4_encode(quant.table(io.quant, m).name, jit) for m in maps(rule, flags)]
        if io.quant in quant.PACKED
        else []
    )
    return ns["factory"](
        elem,
        conv["load"][io.param],
        conv["load"][io.grad],
        conv["load"][io.state],
        conv["param"][param],
        conv["store"][io.grad],
        conv["store"][io.state],
        np.float32,
        jit(q_encode),
        np.float32,
        np.uint32,
        signmag,
        *((ncb._view_fn(),) if table else ()),
        *enc4,
    )


def kernel(
    rule: str, flags: dict[str, bool], io: storage.IO, table: bool = False, clip: bool = False
) -> Any:
    """The cached ``cuda.jit`` kernel of one variant under ``io`` (``table``: the multi-tensor
    one, reading the clip coefficient when ``clip``)."""
    key = (rule, tuple(sorted(flags.items())), io, table, clip)
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = ncb.cuda.jit(python_kernel(rule, flags, io, table, clip))
    return fn


def _tq(fmt: str, maps: tuple[str, ...]) -> tuple[np.float32, ...]:
    out: list[np.float32] = []
    for m in maps:
        top, tiny, _ = constants(fmt, m)
        out += [top, tiny]
    return tuple(out) or (np.float32(1), np.float32(1))


def _host_inputs(
    rule: str, flags: dict[str, bool], io: storage.IO, k: Sequence[float], extras: dict[str, Any]
) -> tuple[np.ndarray, tuple[Any, ...], tuple[Any, ...], tuple[Any, ...]]:
    """``(qtab, tq, k, x)`` of a launch: the packed tables and ``(top, tiny)`` of the variant's
    quantized slots, the host scalars in float32, ``x = (1/grad_scale, salt, step key)``."""
    qm = maps(rule, flags)
    assert io.quant is not None
    inv = extras.get("inv_scale")
    x = (
        np.float32(1.0 if inv is None else inv),
        np.int64(extras.get("salt", 0)),
        np.int64(extras.get("key", 0)),
    )
    return tables(io.quant, qm), _tq(io.quant, qm), tuple(np.float32(v) for v in k), x


def signature(rule: str, flags: dict[str, bool], io: storage.IO) -> tuple[Any, ...]:
    """The numba argument types of the kernel (placeholders typed as the param), for
    ``cuda.compile_ptx`` without a GPU."""
    from numba import types

    def arr(kind: str) -> Any:
        return types.uint16[::1] if kind in storage.BITS16 else getattr(types, kind)[::1]

    spec = RULES[rule]
    writes, q = spec.slots_used(flags), qslots(rule, flags)
    p = arr(io.param)
    c = types.float32
    sig: tuple[Any, ...] = (p, arr(io.grad))
    sig += tuple(types.uint8[::1] if qd else arr(io.state) if w else p for w, qd in zip(writes, q))
    sig += tuple(types.float32[::1] if qd else p for qd in q)
    sig += (types.float32[::1] if io.master else p,)
    sig += (types.float32[:, ::1], types.int64[:, ::1])
    sig += (types.UniTuple(c, 2 * max(1, sum(q))),)
    sig += (types.UniTuple(c, len(spec.scalars)), types.Tuple((c, types.int64, types.int64)))
    sig += (c[::1] if io.kbuf else p, types.float32[::1] if io.scale == "device" else p)
    sig += (types.float32[::1] if io.found_inf else p, types.uint32[::1] if io.kbuf else p)
    return sig


def table_signature(
    rule: str, flags: dict[str, bool], io: storage.IO, clip: bool = False
) -> tuple[Any, ...]:
    """The numba argument types of the multi-tensor kernel (``table_kernel_source``), for
    ``cuda.compile_ptx`` without a GPU."""
    from numba import types

    def arr(kind: str) -> Any:
        return getattr(types, ncb._like_dtype(kind).name)[::1]

    q = qslots(rule, flags)
    c = types.float32
    p = arr(io.param)
    sig: tuple[Any, ...] = (types.int64[:, ::1], types.int64[::1], types.int64)
    sig += (p, arr(io.grad), arr(io.state), arr(io.kind("master")))
    sig += (types.uint8[::1], types.float32[::1], types.float32[:, ::1])
    sig += (types.UniTuple(c, 2 * max(1, sum(q))),)
    sig += (types.UniTuple(c, len(RULES[rule].scalars)), types.Tuple((c, types.int64, types.int64)))
    sig += (c[::1] if io.kbuf else p, types.float32[::1] if io.scale == "device" else p)
    sig += (types.float32[::1] if io.found_inf else p, types.uint32[::1] if io.kbuf else p)
    return sig + (c[::1] if clip else p,)


#: (id of a host table, device id) -> (the host table, its device copy)
_uploads: dict[Any, Any] = {}


def _on_device(host: np.ndarray, dev: int) -> Any:
    """The device copy of a small read-only host table (made once per table and device; the
    entry keeps the host array alive, so its id is not reused)."""
    key = (id(host), dev)
    hit = _uploads.get(key)
    if hit is None or hit[0] is not host:
        if len(_uploads) > 256:
            _uploads.clear()
        hit = _uploads[key] = (host, ncb.cuda.to_device(np.ascontiguousarray(host)))
    return hit[1]


def launch_quant(
    rule: str,
    flags: dict[str, bool],
    param: Any,
    grad: Any,
    states: Sequence[Any],
    k: Sequence[float],
    io: storage.IO,
    master: Any = None,
    extras: dict[str, Any] | None = None,
) -> None:
    """One step over quantized state: a quantized slot's entry of ``states`` is ``(codes,
    absmax)`` (one tensor) or ``(codes, absmax, blocks)`` (a ``FlatBuffer`` group's block
    table); ``extras`` as ``numba_cuda_backend.launch_mixed`` takes them. Unchecked."""
    from .numba_quant import blocks_for

    n = int(param.shape[0])
    if n == 0:
        return
    assert io.quant is not None
    extras = extras or {}
    cuda = ncb.cuda
    q = qslots(rule, flags)
    param, grad = _launch.plain_view(param), _launch.plain_view(grad)
    arrs: list[Any] = []
    absm: list[Any] = []
    blocks = None
    for s, qd in zip(states, q):
        if qd:
            arrs.append(_launch.plain_view(s[0]).reshape(-1))
            absm.append(_launch.plain_view(s[1]))
            if len(s) > 2:
                blocks = s[2]
        else:
            arrs.append(None if s is None else _launch.plain_view(s))
            absm.append(None)
    if blocks is None:
        blocks = blocks_for(n, quant.BLOCKS[io.quant])
    nb = int(blocks.shape[0])
    if nb == 0:
        return
    qtab, tq, scalars, x = _host_inputs(rule, flags, io, k, extras)
    dev = [extras.get(d) for d in ("kbuf", "scale", "found_inf", "keyp")]
    fn = kernel(rule, flags, io)
    p = ncb._bits16(param)
    if ncb.SIMULATOR and isinstance(param, np.ndarray):
        # the simulator copies each host argument in and back out: holes are empty views, the
        # read-only tables copies
        hole = p[:0]
        args = [p, ncb._bits16(grad)]
        args += [hole if a is None else ncb._bits16(a) for a in arrs]
        args += [hole if a is None else a for a in absm]
        args += [hole if master is None else master, qtab.copy(), np.array(blocks, np.int64)]
        args += [tq, scalars, x, *[hole if d is None else d for d in dev]]
        grid = max(1, min(nb, 4))
        fn[grid, threads(io.quant)](*args)
        return
    devi = ncb._device_index(param)
    if isinstance(devi, int) and devi != cuda.get_current_device().id:
        with cuda.gpus[devi]:
            _launch_device(
                fn, nb, p, grad, arrs, absm, master, qtab, blocks, tq, scalars, x, dev, param, io
            )
    else:
        _launch_device(
            fn, nb, p, grad, arrs, absm, master, qtab, blocks, tq, scalars, x, dev, param, io
        )


def _launch_device(
    fn: Any,
    nb: int,
    p: Any,
    grad: Any,
    arrs: list[Any],
    absm: list[Any],
    master: Any,
    qtab: np.ndarray,
    blocks: np.ndarray,
    tq: tuple[Any, ...],
    scalars: tuple[Any, ...],
    x: tuple[Any, ...],
    dev: list[Any],
    param: Any,
    io: storage.IO,
) -> None:
    ptr = ncb._stream_ptr(param)  # the producer's stream, as the other launches take it
    pv = ncb._device_view(p, "param")
    args = [pv, ncb._device_view(ncb._bits16(grad), "grad")]
    args += [
        pv if a is None else ncb._device_view(ncb._bits16(a), f"state slot {j}")
        for j, a in enumerate(arrs)
    ]
    args += [pv if a is None else ncb._device_view(a, f"absmax {j}") for j, a in enumerate(absm)]
    args.append(pv if master is None else ncb._device_view(master, "master"))
    d = ncb.cuda.get_current_device().id
    args += [_on_device(qtab, d), _on_device(np.asarray(blocks, np.int64), d)]
    args += [tq, scalars, x]
    args += [pv if a is None else ncb._device_view(a, "device scalar") for a in dev]
    assert io.quant is not None
    nt = threads(io.quant)
    ncb._configured(fn, min(_wave(nb * nt, nt), nb), nt, ptr, d)(*args)


def _wave(n: int, nt: int) -> int:
    """CUDA blocks of ``nt`` threads in one wave over ``n`` threads' work on the current
    device (``numba_cuda_backend.launch_config`` counts blocks of ``QBLOCK``; a block of fewer
    threads is that many times more of them)."""
    blocks, _ = ncb.launch_config(n)
    return int(blocks) * (QBLOCK // nt)


def launch_table(
    rule: str,
    flags: dict[str, bool],
    io: storage.IO,
    table: Any,
    k: Sequence[float],
    extras: dict[str, Any],
    clip: Any = None,
    stream: int | None = None,
) -> None:
    """One launch over every tensor of ``table`` (``_launch.TensorTable`` of quantized state),
    checked by ``numba_cuda_backend.launch_table``, which calls it: one CUDA block of
    ``quant_cuda.threads(io.quant)`` threads per block of codes, a grid of one wave
    grid-striding over them, on
    ``stream`` (a handle; None: the default stream). Under the simulator the tensors are host
    arrays."""
    assert io.quant is not None
    qtab, tq, scalars, x = _host_inputs(rule, flags, io, k, extras)
    fn = kernel(rule, flags, io, True, clip is not None)

    def run() -> None:
        sim = ncb.SIMULATOR
        dev = None if sim else ncb.cuda.get_current_device().id
        ptr = 0 if stream is None else stream
        ncb._upload(table, ptr)
        kinds = [ncb._like_dtype(kd) for kd in (io.param, io.grad, io.state)]
        kinds += [np.dtype(io.kind("master")), np.dtype(np.uint8), np.dtype(np.float32)]
        likes = [ncb._small(kd, dev) for kd in kinds]
        hole = likes[0]
        devs = [
            hole if extras.get(n) is None else ncb._arg(extras[n], dev, n)
            for n in ("kbuf", "scale", "found_inf", "keyp")
        ]
        cl = hole if clip is None else ncb._arg(clip, dev, "clip")
        q = qtab.copy() if dev is None else _on_device(qtab, dev)
        args = (table.device_rows, table.device_chunks, np.int64(table.nchunks), *likes, q)
        args += (tq, scalars, x, *devs, cl)
        nt = threads(io.quant)
        if sim:
            fn[max(1, min(table.nchunks, 4)), nt](*args)
        else:
            grid = min(_wave(table.nchunks * nt, nt), table.nchunks)
            ncb._configured(fn, grid, nt, ptr, dev)(*args)

    ncb._on_table_device(table, run)


#: the BLOCK the kernels assume (one thread per element of a block of codes)
assert quant.BLOCK == QBLOCK
