"""CPU ceilings on the ``numba`` backend: a parallel copy and the same-traffic kernels.

The same-traffic kernel for an optimizer with ``n_state`` state buffers reads param, grad and
every state buffer and writes param and every state buffer, exactly like the optimizer's loop,
but its math is one multiply-add per buffer: whatever the optimizer costs beyond that kernel is
arithmetic, not memory. Both use ``prange`` like the backend, and are cached on disk per user
(``fastopt._numba_cache``).
"""

import numba
import numpy as np

from .._numba_cache import njit_cached
from .measure import HostTimer, Runner, bytes_per_step

__all__ = ["TRAFFIC", "copy_runner", "traffic_runner"]


@njit_cached(parallel=True, nogil=True)
def _copy(dst, src):
    for i in numba.prange(src.shape[0]):
        dst[i] = src[i]


@njit_cached(parallel=True, nogil=True)
def _traffic0(p, g, c):
    for i in numba.prange(p.shape[0]):
        p[i] = p[i] + c * g[i]


@njit_cached(parallel=True, nogil=True)
def _traffic1(p, g, s0, c):
    for i in numba.prange(p.shape[0]):
        gi = g[i]
        p[i] = p[i] + c * gi
        s0[i] = s0[i] + c * gi


@njit_cached(parallel=True, nogil=True)
def _traffic2(p, g, s0, s1, c):
    for i in numba.prange(p.shape[0]):
        gi = g[i]
        p[i] = p[i] + c * gi
        s0[i] = s0[i] + c * gi
        s1[i] = s1[i] + c * gi


@njit_cached(parallel=True, nogil=True)
def _traffic3(p, g, s0, s1, s2, c):
    for i in numba.prange(p.shape[0]):
        gi = g[i]
        p[i] = p[i] + c * gi
        s0[i] = s0[i] + c * gi
        s1[i] = s1[i] + c * gi
        s2[i] = s2[i] + c * gi


#: number of state buffers -> same-traffic kernel
TRAFFIC = {0: _traffic0, 1: _traffic1, 2: _traffic2, 3: _traffic3}


def traffic_runner(n_state, p0, g0):
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


def copy_runner(p0):
    """A parallel copy of ``p0`` into another buffer (bytes = read + written)."""
    src, dst = p0.copy(), np.zeros_like(p0)
    return Runner(
        "copy:numba", lambda: _copy(dst, src), HostTimer(), 2 * src.nbytes, keep=(src, dst)
    )
