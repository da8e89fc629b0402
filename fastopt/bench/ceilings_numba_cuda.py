"""Same-traffic and copy kernels for the ``numba-cuda`` backend (imported only when measured).

Like ``ceilings_cpu``'s loops: one multiply-add per buffer over param, grad and ``n_state``
state buffers, written as grid-stride loops so that any launch covers any ``n``.
"""

from __future__ import annotations

from typing import Any

from numba import cuda

from ..kernels import RULES

__all__ = ["KERNELS", "launcher"]


def _traffic_source(n_state):
    """Python source of the grid-stride same-traffic kernel over ``n_state`` state buffers."""
    slots = "".join(f"s{j}, " for j in range(n_state))
    lines = [
        f"def traffic(p, g, {slots}c):",
        "    i, step = cuda.grid(1), cuda.gridsize(1)",
        "    while i < p.shape[0]:",
        "        gi = g[i]",
        "        p[i] = p[i] + c * gi",
        *(f"        s{j}[i] = s{j}[i] + c * gi" for j in range(n_state)),
        "        i += step",
    ]
    return "\n".join(lines) + "\n"


def _traffic_kernel(n_state):
    # ``cuda`` is a global of the kernel, not a cell: the simulator swaps a kernel's globals
    ns = {"__name__": __name__, "cuda": cuda}
    exec(compile(_traffic_source(n_state), __file__, "exec"), ns)
    return cuda.jit(ns["traffic"])


@cuda.jit
def _copy(dst, src):
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < src.shape[0]:
        dst[i] = src[i]
        i += step


#: number of state buffers (every count a rule has), or "copy" -> kernel
KERNELS: dict = {
    n: _traffic_kernel(n) for n in range(1 + max(len(r.slots) for r in RULES.values()))
}
KERNELS["copy"] = _copy


def launcher(kind: int | str, n: int, *args: Any) -> Any:
    """A zero-argument call launching ``KERNELS[kind]`` over ``n`` elements: 256 threads a
    block, at most 32 blocks per SM (the grid-stride loop covers the rest)."""
    # (the CUDA simulator's device has no SM count: one SM then)
    sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)
    blocks = max(1, min(-(-n // 256), 32 * sms))
    kern = KERNELS[kind]
    return lambda: kern[blocks, 256](*args)
