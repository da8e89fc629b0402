"""The numba-cuda kernel of a step over quantized state slots (``kernels/quant.py``).

The same kernel as the CuPy backend's (``kernels/quant_cuda.py``, whose docstring describes
it), generated as Python source and compiled by ``numba.cuda.jit``: one CUDA block of
``QBLOCK`` threads per block of codes (a table of ``(first, stop)`` rows, grid-strided), each
thread on one element; the quantized slots decoded from tables in shared memory, the rule's
own per-element function (``Rule.element``) with the storage format's loads and stores (the
converters of ``kernels/storage.py``), the new absmax reduced over the block in shared memory
(a maximum of bit patterns), thread 0 storing it, every thread encoding its value by a binary
search over the slot's thresholds (``q_encode``: the CPU's code of every value).

Under the simulator (``NUMBA_ENABLE_CUDASIM=1``) host NumPy arrays run as they are; on a GPU
the tables and the block table are copied to the device once (cached per device and table),
and a step launches one kernel on the param's producer stream, no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ..kernels import RULES, quant, storage
from ..kernels.quant_cuda import QBLOCK, constants, qslots, tables
from ..kernels.storage import bits_f32, f32_bits
from . import _launch
from . import numba_cuda_backend as ncb

__all__ = [
    "kernel",
    "launch_quant",
    "python_kernel",
    "q_encode",
    "quant_kernel_source",
    "signature",
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


def quant_kernel_source(
    name: str, nslots: int, writes: Sequence[bool], q: Sequence[bool], io: storage.IO, nsc: int
) -> str:
    """Python source of the kernel factory: ``kernel(p, g, s0.., a0.., m, qtab, blocks, tq, k,
    x, kb, gs, fi, kp)`` where ``s{j}`` is slot ``j``'s array (uint8 codes when ``q[j]``),
    ``a{j}`` its absmax (a placeholder when not quantized), ``qtab`` the packed tables
    (``quant_cuda.tables``), ``tq`` per quantized slot ``(top, tiny)``, and the rest as in
    ``numba_cuda_backend.mixed_kernel_source``."""
    qs = [j for j in range(nslots) if q[j]]
    row = {j: r for r, j in enumerate(qs)}
    nq = max(len(qs), 1)
    slots = "".join(f"s{j}, " for j in range(nslots)) + "".join(f"a{j}, " for j in range(nslots))
    L = [
        "def factory(elem, lp, lg, ls, sp, sg, ss, CT, enc, F32, U32, SIGNMAG):",
        f"    def {name}(p, g, {slots}m, qtab, blocks, tq, k, x, kb, gs, fi, kp):",
    ]
    L += ncb.prologue_source(io, nsc)
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
    L += [
        "        nb = blocks.shape[0]",
        "        b = cuda.blockIdx.x",
        "        while b < nb:",
        "            i = blocks[b, 0] + t",
        "            act = i < blocks[b, 1]",
    ]
    L += [f"            q{j} = CT(0)" for j in qs]
    L.append("            if act:")
    pad = " " * 16
    for j in qs:
        L.append(f"{pad}q{j} = dec[{row[j]}, s{j}[i]] * (a{j}[b] / tq[{2 * row[j]}])")
    L.append(f"{pad}pv = {'m[i]' if io.master else 'lp(p[i])'}")
    L.append(f"{pad}gv = lg(g[i]){' * inv' if io.scale else ''}")
    if io.write_grad:
        L.append(f"{pad}g[i] = sg(gv)")
    for j in range(nslots):
        v = f"q{j}" if q[j] else f"ls(s{j}[i])" if writes[j] else "pv"
        L.append(f"{pad}v{j} = {v}")
    outs = ", ".join(["pi"] + [f"o{j}" for j in range(nslots)])
    L.append(
        f"{pad}{outs}{',' if nslots == 0 else ''} = elem(pv, gv, "
        f"{''.join(f'v{j}, ' for j in range(nslots))}k)"
    )
    if io.master:
        L.append(f"{pad}m[i] = pi")
    L.append(f"{pad}p[i] = sp(pi, i, x[1], key)")
    for j in range(nslots):
        if q[j]:
            L.append(f"{pad}q{j} = o{j}")
        elif writes[j]:
            L.append(f"{pad}s{j}[i] = ss(o{j})")
    for j in qs:
        L.append(f"            red[{row[j]}, t] = (f32_bits(q{j}) & 0x7FFFFFFF) if act else 0")
    if qs:
        L += [
            f"            h = {QBLOCK // 2}",
            "            while h > 0:",
            "                cuda.syncthreads()",
            "                if t < h:",
        ]
        L += [
            f"                    red[{row[j]}, t] = max(red[{row[j]}, t], red[{row[j]}, t + h])"
            for j in qs
        ]
        L += ["                h //= 2", "            cuda.syncthreads()"]
    for j in qs:
        r = row[j]
        L += [
            f"            n{j} = bits_f32(red[{r}, 0])",
            f"            e{j} = tq[{2 * r}] / n{j} if n{j} >= tq[{2 * r + 1}] else CT(0)",
            "            if act:",
            f"                s{j}[i] = enc(q{j} * e{j}, thr, {r}, SIGNMAG[{r}])",
            "            if t == 0:",
            f"                a{j}[b] = n{j}",
        ]
    if qs:
        L.append("            cuda.syncthreads()")
    L += ["            b += cuda.gridDim.x", f"    return {name}"]
    return "\n".join(L) + "\n"


_compiled: dict[Any, Any] = {}


def python_kernel(rule: str, flags: dict[str, bool], io: storage.IO) -> Any:
    """The uncompiled kernel of one variant under ``io`` (``io.quant`` set)."""
    cuda = ncb.cuda
    spec = RULES[rule]
    writes = spec.slots_used(flags)
    q = qslots(rule, flags)
    jit = cuda.jit(device=True, inline="always")
    elem = jit(spec.element(flags, jit))
    ns = {"__name__": __name__, "cuda": cuda, "f32_bits": f32_bits, "bits_f32": bits_f32}
    name = f"fastopt_{rule}_quant"
    src = quant_kernel_source(name, len(writes), writes, q, io, len(spec.scalars))
    exec(compile(src, __file__, "exec"), ns)
    conv = storage.make_converters(lambda f: cuda.jit(device=True, inline="always")(f), "float32")
    param = "bfloat16-sr" if io.sr else io.param
    assert io.quant is not None
    signmag = tuple(
        int(constants(io.quant, s.quant_map)[2]) for s, qd in zip(spec.slots, q) if qd
    ) or (0,)
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
    )


def kernel(rule: str, flags: dict[str, bool], io: storage.IO) -> Any:
    """The cached ``cuda.jit`` kernel of one variant under ``io``."""
    key = (rule, tuple(sorted(flags.items())), io)
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = ncb.cuda.jit(python_kernel(rule, flags, io))
    return fn


def _maps(rule: str, flags: dict[str, bool]) -> tuple[str, ...]:
    return tuple(s.quant_map for s, q in zip(RULES[rule].slots, qslots(rule, flags)) if q)


def _tq(fmt: str, maps: tuple[str, ...]) -> tuple[np.float32, ...]:
    out: list[np.float32] = []
    for m in maps:
        top, tiny, _ = constants(fmt, m)
        out += [top, tiny]
    return tuple(out) or (np.float32(1), np.float32(1))


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
        blocks = blocks_for(n)
    nb = int(blocks.shape[0])
    if nb == 0:
        return
    qtab = tables(io.quant, _maps(rule, flags))
    tq = _tq(io.quant, _maps(rule, flags))
    scalars = tuple(np.float32(v) for v in k)
    inv = extras.get("inv_scale")
    x = (
        np.float32(1.0 if inv is None else inv),
        np.int64(extras.get("salt", 0)),
        np.int64(extras.get("key", 0)),
    )
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
        fn[grid, QBLOCK](*args)
        return
    devi = ncb._device_index(param)
    if isinstance(devi, int) and devi != cuda.get_current_device().id:
        with cuda.gpus[devi]:
            _launch_device(
                fn, nb, p, grad, arrs, absm, master, qtab, blocks, tq, scalars, x, dev, param
            )
    else:
        _launch_device(
            fn, nb, p, grad, arrs, absm, master, qtab, blocks, tq, scalars, x, dev, param
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
    blocks_n, _ = ncb.launch_config(nb * QBLOCK)
    ncb._configured(fn, min(blocks_n, nb), QBLOCK, ptr, d)(*args)


#: the BLOCK the kernels assume (one thread per element of a block of codes)
assert quant.BLOCK == QBLOCK
