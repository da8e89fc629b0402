"""One huge buffer: SGD over n = 2^31 + 7 float32 elements (16 GiB for param and grad).

A kernel indexing with 32-bit integers would wrap at 2^31 and never reach the tail (or write
before the buffer); here every element must be stepped exactly once: the first and last
elements and those around 2^31 get their own gradients and are checked one by one, and a count
over the whole buffer checks that every other element moved by exactly lr·g.
"""

import numpy as np
import pytest
from gpu_common import gpu_backend_params, needs_gpu

import fastopt

pytestmark = needs_gpu

N = 2**31 + 7
LR = 0.25
#: index -> gradient: the ends and both sides of the 2^31 boundary
SPECIAL = {0: 4.0, 2**31 - 1: -2.0, 2**31: 6.0, 2**31 + 1: -6.0, N - 2: 8.0, N - 1: -4.0}


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_sgd_on_more_than_2_31_elements(backend):
    import cupy

    need = 2 * N * 4 + N  # param and grad, and the bool mask of the final count
    free, _ = cupy.cuda.runtime.memGetInfo()
    if free < need + (1 << 30):
        pytest.skip(f"needs {need / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} free")
    pool = cupy.get_default_memory_pool()
    try:
        p = cupy.ones(N, dtype=cupy.float32)
        g = cupy.full(N, 2.0, dtype=cupy.float32)
        idx = cupy.asarray(list(SPECIAL), dtype=cupy.int64)
        g[idx] = cupy.asarray(list(SPECIAL.values()), dtype=cupy.float32)
        opt = fastopt.SGD(lr=LR, backend=backend)
        opt.update({"w": p}, {"w": g})
        got = cupy.asnumpy(p[idx])
        want = np.float32(1.0) - np.float32(LR) * np.array(list(SPECIAL.values()), np.float32)
        np.testing.assert_array_equal(got, want)
        # everything else: 1 - 0.25*2 = 0.5, exactly; so exactly len(SPECIAL) elements differ
        assert int(cupy.count_nonzero(p != cupy.float32(0.5))) == len(SPECIAL)
    finally:
        p = g = None
        pool.free_all_blocks()
