"""CPU ceilings on the ``numba`` backend: a parallel copy and the same-traffic kernels.

The same-traffic kernel for an optimizer with ``n_state`` state buffers reads param, grad and
every state buffer and writes param and every state buffer, exactly like the optimizer's loop,
but its math is one multiply-add per buffer: whatever the optimizer costs beyond that kernel is
arithmetic, not memory. Both use ``prange`` like the backend, and are cached on disk per user
(``fastopt._numba_cache``).
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np

from .._numba_cache import njit_cached
from ..kernels import RULES
from .measure import HostTimer, Runner, bytes_per_step

__all__ = ["TRAFFIC", "copy_runner", "mixed_traffic_runner", "traffic_runner"]


@njit_cached(parallel=True, nogil=True)
def _copy(dst, src):
    for i in numba.prange(src.shape[0]):
        dst[i] = src[i]


def _traffic_source(n_state):
    """Python source of the same-traffic loop over param, grad and ``n_state`` state buffers."""
    slots = "".join(f"s{j}, " for j in range(n_state))
    lines = [
        "def factory():",
        f"    def traffic(p, g, {slots}c):",
        "        for i in numba.prange(p.shape[0]):",
        "            gi = g[i]",
        "            p[i] = p[i] + c * gi",
        *(f"            s{j}[i] = s{j}[i] + c * gi" for j in range(n_state)),
        "    return traffic",
    ]
    return "\n".join(lines) + "\n"


def _traffic_kernel(n_state):
    ns = {"__name__": __name__, "numba": numba}
    exec(compile(_traffic_source(n_state), __file__, "exec"), ns)
    return njit_cached(parallel=True, nogil=True)(ns["factory"]())


#: number of state buffers -> same-traffic kernel, for every count a rule has (compiled, or
#: loaded from the disk cache, at its first call)
TRAFFIC = {n: _traffic_kernel(n) for n in range(1 + max(len(r.slots) for r in RULES.values()))}


def traffic_runner(n_state: int, p0: Any, g0: Any) -> Runner:
    """The same-traffic kernel over copies of ``p0``/``g0`` and ``n_state`` zeroed state buffers."""
    p, g = p0.copy(), g0.copy()
    states = [np.zeros_like(p) for _ in range(n_state)]
    c = p.dtype.type(1e-3)  # in the buffer dtype: no float64 math in a float32 loop
    kern = TRAFFIC[n_state]
    return Runner(
        "ceiling:numba",
        lambda: kern(p, g, *states, c),
        HostTimer(),
        bytes_per_step(n_state, p.size, p.dtype),
        keep=(p, g, states),
    )


def copy_runner(p0: Any) -> Runner:
    """A parallel copy of ``p0`` into another buffer (bytes = read + written)."""
    src, dst = p0.copy(), np.zeros_like(p0)
    return Runner(
        "copy:numba", lambda: _copy(dst, src), HostTimer(), 2 * src.nbytes, keep=(src, dst)
    )


# -- mixed precision: the same traffic in each array's storage dtype -----------------------------


def _same(x):
    return x


def _to_u16(x):
    return np.uint16(np.int32(x))


def _to_f32(x):
    return np.float32(x)


def _to_f64(x):
    return np.float64(x)


for _f in (_same, _to_u16, _to_f32, _to_f64):
    numba.extending.register_jitable(inline="always")(_f)


def _cvt(src, dst):
    """A trivial conversion of a grad value (storage ``src``) into storage ``dst``: the
    ceiling's math is one add per buffer, whatever the types."""
    small = ("float16", "bfloat16")
    if (src in small) == (dst in small) and (src == dst or src in small):
        return _same
    return {"float32": _to_f32, "float64": _to_f64}.get(dst, _to_u16)


_mixed: dict[Any, Any] = {}


def _mixed_source(n_state, master, remainder=False):
    slots = "".join(f"s{j}, " for j in range(n_state))
    lines = [
        "def factory(cp, cs, cm):",
        f"    def traffic(p, g, {slots}m):",
        "        for i in numba.prange(p.shape[0]):",
        "            gi = g[i]",
    ]
    if remainder:  # the param and its int16 remainder both read and written (as the optimizer)
        lines += [
            "            p[i] = p[i] + cp(gi)",
            "            m[i] = m[i] + cp(gi)",
        ]
    elif master:  # the master read and written, the param written only (as the optimizer)
        lines += [
            "            mi = m[i] + cm(gi)",
            "            m[i] = mi",
            "            p[i] = cp(mi)",
        ]
    else:
        lines.append("            p[i] = p[i] + cp(gi)")
    lines += [f"            s{j}[i] = s{j}[i] + cs(gi)" for j in range(n_state)]
    lines.append("    return traffic")
    return "\n".join(lines) + "\n"


def mixed_traffic_kernel(io: Any, n_state: int) -> Any:
    """The compiled same-traffic loop of a storage format: the buffers the optimizer touches, in
    their storage dtypes (16-bit ones as uint16), read and written as the optimizer does."""
    key = (io.param, io.grad, io.state, io.master, io.remainder, n_state)
    fn = _mixed.get(key)
    if fn is None:
        from .._numba_cache import njit_cached

        ns: dict[str, Any] = {"__name__": __name__, "numba": numba}
        exec(compile(_mixed_source(n_state, io.master, io.remainder), __file__, "exec"), ns)
        master_src = "float32"
        py = ns["factory"](
            _cvt(master_src if io.master else io.grad, io.param),
            _cvt(io.grad, io.state),
            _cvt(io.grad, "float32"),
        )
        fn = _mixed[key] = njit_cached(parallel=True, nogil=True)(py)
    return fn


def _quant_source(n_state, master, packed=False):
    """A quantized format's same-traffic loop: param (or master and param) and grad as
    ``_mixed_source`` moves them, each slot's byte of code read and written per element (a
    packed format's half a byte: its bytes in a loop of their own), then each slot's block
    scales read and written."""
    codes = "".join(f"c{j}, " for j in range(n_state))
    scales = "".join(f"a{j}, " for j in range(n_state))
    lines = [
        "def factory(cp, cm):",
        f"    def traffic(p, g, {codes}{scales}m):",
        "        for i in numba.prange(p.shape[0]):",
        "            gi = g[i]",
    ]
    if master:
        lines += [
            "            mi = m[i] + cm(gi)",
            "            m[i] = mi",
            "            p[i] = cp(mi)",
        ]
    else:
        lines.append("            p[i] = p[i] + cp(gi)")
    if not packed:
        lines += [f"            c{j}[i] = c{j}[i] ^ (gi > 0)" for j in range(n_state)]
    for j in range(n_state if packed else 0):
        lines += [
            f"        for k in numba.prange(c{j}.shape[0]):",
            f"            c{j}[k] = c{j}[k] ^ 1",
        ]
    for j in range(n_state):
        lines += [
            f"        for b in numba.prange(a{j}.shape[0]):",
            f"            a{j}[b] = a{j}[b] * 2",
        ]
    lines.append("    return traffic")
    return "\n".join(lines) + "\n"


def quant_traffic_kernel(io: Any, n_state: int) -> Any:
    """The compiled same-traffic loop of a quantized storage format (``io.quant``): the
    param, grad and master as the optimizer moves them, each slot's uint8 codes and float32
    block scales read and written."""
    from ..kernels.quant import PACKED

    packed = io.quant in PACKED
    key = ("quant", io.param, io.grad, io.master, n_state, packed)
    fn = _mixed.get(key)
    if fn is None:
        ns: dict[str, Any] = {"__name__": __name__, "numba": numba}
        exec(compile(_quant_source(n_state, io.master, packed), __file__, "exec"), ns)
        py = ns["factory"](
            _cvt("float32" if io.master else io.grad, io.param), _cvt(io.grad, "float32")
        )
        fn = _mixed[key] = njit_cached(parallel=True, nogil=True)(py)
    return fn


def mixed_traffic_runner(io: Any, n_state: int, n: int) -> Any:
    """The same-traffic kernel of storage format ``io`` over fresh buffers of ``n`` elements
    (a quantized format's: ``quant_traffic_kernel``, its bytes ``measure.traffic_arrays``')."""

    def buf(kind, fill=0):
        dt = np.uint16 if kind in ("float16", "bfloat16") else np.dtype(kind)
        return np.full(n, fill, dtype=dt)

    p, g = buf(io.param, 0 if io.master and not io.remainder else 1), buf(io.grad, 1)
    m = buf(io.kind("master")) if io.master else p
    if io.quant:
        from ..kernels.quant import code_bytes, nblocks
        from .measure import traffic_arrays

        codes = [np.full(code_bytes(n, io.quant), 7, np.uint8) for _ in range(n_state)]
        scales = [np.ones(nblocks(n, io.quant), np.float32) for _ in range(n_state)]
        qkern = quant_traffic_kernel(io, n_state)
        return Runner(
            "ceiling:numba",
            lambda: qkern(p, g, *codes, *scales, m),
            HostTimer(),
            sum(b * len(mode) for _, b, mode in traffic_arrays(n, n_state, io=io)),
            keep=(p, g, codes, scales, m),
        )
    states = [buf(io.state) for _ in range(n_state)]
    kern = mixed_traffic_kernel(io, n_state)
    return Runner(
        "ceiling:numba",
        lambda: kern(p, g, *states, m),
        HostTimer(),
        bytes_per_step(n_state, n, io=io),
        keep=(p, g, states, m),
    )
