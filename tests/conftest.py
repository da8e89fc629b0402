"""Shared fixtures: the backend parametrization, seeded inputs and a float64 oracle runner.

``backend_params()`` lists the host backends by default: these tests feed NumPy arrays, which a
GPU backend rightly refuses. ``backend_params(names)`` with CUDA backends named (as ``tests/gpu/``
does, on device arrays) marks them ``gpu`` and skips them cleanly when they cannot run here.

The oracle runner, the tolerance table and the optimizer matrix live in ``tests/support/``
(``from support.matrix import MATRIX``): this directory is on ``sys.path``, put there below so
that every test module, the GPU tests and the simulator's child process import them alike.

Test groups (markers declared in ``pyproject.toml``; README, "Two commands"):

- ``torch``: the test needs PyTorch (it imports ``torch`` or ``fastopt.torch``, in its body or
  at its module's top). The marker is set here, from the test's source, so that no test can
  forget it: ``pytest -m torch`` runs exactly the comparisons that skip without torch, and a test
  that skips for want of torch without carrying the marker fails instead (it would run in
  neither CI step).
- ``exhaustive``: the full cross-products of a sweep beyond the pairwise cover the default run
  keeps (``support.cover``); deselected by default, run by ``pytest -m exhaustive``.

Under pytest-xdist (``-n``, no ``--dist``) the tests are balanced one at a time, as xdist's
``load`` does, except the modules of ``ONE_WORKER``: each compiles all its kernels once for all
its tests (the NVRTC, NVVM and g++ checks), so each runs whole on one worker.
"""

import functools
import importlib
import inspect
import itertools
import os
import re
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


@functools.cache
def _device(name):
    try:
        return getattr(importlib.import_module(_backends.BACKENDS[name]), "DEVICE", "cpu")
    except ImportError:
        return "cuda" if name in ("numba-cuda", "cupy") else "cpu"


@functools.cache
def _available():
    return frozenset(fastopt.available_backends())


def backend_params(names=None):
    """``pytest.param`` per backend (default: the host ones); CUDA backends get the ``gpu`` mark
    and a skip when absent."""
    avail = _available()
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


# --- numba's disk cache, shared by the xdist workers -----------------------------------------


def _serialize_numba_cache_saves():
    """Make numba's cache saves safe across the processes that share one cache directory.

    Every generated loop of the numba backend is one function to numba's cache (one source
    file, one qualified name), so all variants share one index file, and numba's
    ``IndexDataCacheFile.save`` reads the index, picks the first free data file number, writes
    the index, then the data, with no lock: two workers saving two variants at once both pick
    the same number, and one variant's key ends up pointing at the other's machine code (a
    later load runs the wrong variant, or fails to unbox its arguments). Here a save holds an
    exclusive ``flock`` on a file beside the index, and writes the data before the index entry
    that names it. A test-suite guard only: the library's own use of the cache across processes
    is not changed by it."""
    try:
        import fcntl

        from numba.core import caching
    except ImportError:
        return
    cls = getattr(caching, "IndexDataCacheFile", None)
    needed = ("_load_index", "_save_index", "_save_data", "_data_name")
    if cls is None or getattr(cls.save, "_serialized", False):
        return
    if not all(hasattr(cls, n) for n in needed):
        return

    def save(self, key, data):
        with open(self._index_path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                overloads = self._load_index()
                name = overloads.get(key)
                if name is None:
                    used = set(overloads.values())
                    name = next(
                        self._data_name(i)
                        for i in itertools.count(1)
                        if self._data_name(i) not in used
                    )
                self._save_data(name, data)
                if overloads.get(key) != name:
                    overloads[key] = name
                    self._save_index(overloads)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    save._serialized = True
    cls.save = save


_serialize_numba_cache_saves()


# --- test groups: the torch marker, the distribution mode ---------------------------------------

#: an import of torch (or of fastopt's torch adapter) in a test's source
_NEEDS_TORCH = re.compile(
    r"""importorskip\(\s*["']torch["']|^\s*(import|from)\s+(fastopt\.)?torch\b"""
    r"|^\s*from\s+fastopt\s+import\s+torch\b",
    re.M,
)


@functools.cache
def _imports_torch(fn):
    try:
        return bool(_NEEDS_TORCH.search(inspect.getsource(fn)))
    except (OSError, TypeError):
        return False


def _needs_torch(item):
    top = getattr(getattr(item, "module", None), "torch", None)
    if getattr(top, "__name__", "") == "torch":  # torch = pytest.importorskip("torch")
        return True
    fn = getattr(item, "function", None)
    return fn is not None and _imports_torch(fn)


#: modules that compile every kernel they check at once, for all their tests (NVRTC, NVVM, g++):
#: under pytest-xdist each runs whole on one worker, so that one worker compiles, not each
ONE_WORKER = (
    "test_cuda_compile",
    "test_numba_cuda_compile",
    "test_cuda_harness",
    "test_cuda_mixed",
)


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n`` without ``--dist``: xdist's load balancing, one test at a time, except that the
    tests of an ``ONE_WORKER`` module go to one worker together (first, as the largest units)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return path if Path(path).stem in ONE_WORKER else nodeid

    return Scheduling(config, log)


@pytest.hookimpl(tryfirst=True)  # before -m selects by the markers
def pytest_collection_modifyitems(config, items):
    """Tests that import torch get the ``torch`` marker. Tests marked ``distributed`` (process
    groups spawned on the CPU, tens of seconds) run only when ``-m`` names them:
    ``python -m pytest -q -m distributed``."""
    distributed = "distributed" in (config.getoption("markexpr") or "")
    skip = pytest.mark.skip(reason="distributed: run with -m distributed")
    for item in items:
        if _needs_torch(item):
            item.add_marker(pytest.mark.torch)
        if not distributed and "distributed" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and call.excinfo is not None
        and "could not import 'torch'" in str(call.excinfo.value)
        and item.get_closest_marker("torch") is None
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skips without torch but does not carry the torch marker, so no CI "
            "step would run it: import torch in the test itself (tests/conftest.py marks it)"
        )
