"""Shared fixtures: the backend parametrization, seeded inputs and a float64 oracle runner.

``backend_params()`` lists the host backends by default: these tests feed NumPy arrays, which a
GPU backend rightly refuses. ``backend_params(names)`` with CUDA backends named (as ``tests/gpu/``
does, on device arrays) marks them ``gpu`` and skips them cleanly when they cannot run here.

The oracle runner, the tolerance table and the optimizer matrix live in ``tests/support/``
(``from support.matrix import MATRIX``): this directory is on ``sys.path``, put there below so
that every test module, the GPU tests and the simulator's child process import them alike.
"""

import importlib
import os
import sys
import zlib
from pathlib import Path

# numba's parallel loops and torch each run their own OpenMP runtime; with both spinning while
# they wait (OpenMP's default), every switch between a numba launch and a torch op on 2 cores
# waits out the other runtime's spin (fastopt.torch's training tests took 7 s instead of 0.1 s
# once a numba parallel loop had run in the process). Passive waiting, set before either
# runtime starts, keeps the suite's time to its work.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest

if str(Path(__file__).parent) not in sys.path:  # tests/: the ``support`` package
    sys.path.insert(0, str(Path(__file__).parent))

from support.oracle import run_oracle

import fastopt
from fastopt import backends as _backends

#: "numpy" is the oracle itself: in float32 it is still checked against the float64 oracle.


def _device(name):
    try:
        return getattr(importlib.import_module(_backends.BACKENDS[name]), "DEVICE", "cpu")
    except ImportError:
        return "cuda" if name in ("numba-cuda", "cupy") else "cpu"


def backend_params(names=None):
    """``pytest.param`` per backend (default: the host ones); CUDA backends get the ``gpu`` mark
    and a skip when absent."""
    avail = set(fastopt.available_backends())
    out = []
    if names is None:
        names = [b for b in _backends.BACKENDS if _device(b) == "cpu"]
    for name in names:
        marks = []
        if _device(name) == "cuda":
            marks.append(pytest.mark.gpu)
        if name not in avail:
            marks.append(pytest.mark.skip(reason=f"backend {name!r} is not available here"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def kernel_backend_params():
    """The backends that run the per-element rules (everything but the NumPy oracle)."""
    return backend_params([b for b in _backends.BACKENDS if b != "numpy" and _device(b) == "cpu"])


@pytest.fixture(params=backend_params())
def backend(request):
    return request.param


@pytest.fixture
def rng(request):
    # a fixed seed per test (its node id), so failures reproduce and tests stay independent
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# --- the float64 oracle (tests/support/oracle.py) -------------------------------------------


@pytest.fixture
def oracle():
    return run_oracle


def pytest_collection_modifyitems(config, items):
    """Tests marked ``distributed`` (process groups spawned on the CPU, tens of seconds) run
    only when ``-m`` names them: ``python -m pytest -q -m distributed``."""
    if "distributed" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="distributed: run with -m distributed")
    for item in items:
        if "distributed" in item.keywords:
            item.add_marker(skip)
