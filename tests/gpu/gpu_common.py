"""Shared by the GPU tests (``-m gpu``): the skip marks and host<->device helpers.

Imported by name from ``tests/gpu``; it is no test module (pytest collects ``test_*.py`` only).
"""

import numpy as np
import pytest

import fastopt

GPU_BACKENDS = ("cupy", "numba-cuda")
_AVAIL = set(fastopt.available_backends())

#: the whole GPU suite: marked ``gpu`` and skipped unless CuPy sees a GPU
needs_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif("cupy" not in _AVAIL, reason="no CUDA GPU usable through CuPy here"),
]


def gpu_backend_params():
    """Both GPU backends, each skipped when it cannot run here."""
    return [
        pytest.param(
            b,
            id=b,
            marks=pytest.mark.skipif(
                b not in _AVAIL, reason=f"backend {b!r} is not available here"
            ),
        )
        for b in GPU_BACKENDS
    ]


def to_device(a):
    import cupy

    return cupy.asarray(np.ascontiguousarray(a))


def to_host(a):
    import cupy

    return cupy.asnumpy(cupy.asarray(a))
