"""Same-traffic and copy kernels for the ``numba-cuda`` backend (imported only when measured).

Like ``_bench_cpu``'s loops: one multiply-add per buffer over param, grad and ``n_state``
state buffers, written as grid-stride loops so that any launch covers any ``n``.
"""

from __future__ import annotations

from typing import Any

from numba import cuda

__all__ = ["KERNELS", "launcher"]


@cuda.jit
def _traffic0(p, g, c):
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < p.shape[0]:
        p[i] = p[i] + c * g[i]
        i += step


@cuda.jit
def _traffic1(p, g, s0, c):
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < p.shape[0]:
        gi = g[i]
        p[i] = p[i] + c * gi
        s0[i] = s0[i] + c * gi
        i += step


@cuda.jit
def _traffic2(p, g, s0, s1, c):
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < p.shape[0]:
        gi = g[i]
        p[i] = p[i] + c * gi
        s0[i] = s0[i] + c * gi
        s1[i] = s1[i] + c * gi
        i += step


@cuda.jit
def _traffic3(p, g, s0, s1, s2, c):
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < p.shape[0]:
        gi = g[i]
        p[i] = p[i] + c * gi
        s0[i] = s0[i] + c * gi
        s1[i] = s1[i] + c * gi
        s2[i] = s2[i] + c * gi
        i += step


@cuda.jit
def _copy(dst, src):
    i, step = cuda.grid(1), cuda.gridsize(1)
    while i < src.shape[0]:
        dst[i] = src[i]
        i += step


#: number of state buffers (or "copy") -> kernel
KERNELS = {0: _traffic0, 1: _traffic1, 2: _traffic2, 3: _traffic3, "copy": _copy}


def launcher(kind: int | str, n: int, *args: Any) -> Any:
    """A zero-argument call launching ``KERNELS[kind]`` over ``n`` elements: 256 threads a
    block, at most 32 blocks per SM (the grid-stride loop covers the rest)."""
    # (the CUDA simulator's device has no SM count: one SM then)
    sms = getattr(cuda.get_current_device(), "MULTIPROCESSOR_COUNT", 1)
    blocks = max(1, min(-(-n // 256), 32 * sms))
    kern = KERNELS[kind]
    return lambda: kern[blocks, 256](*args)
