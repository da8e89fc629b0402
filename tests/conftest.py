"""Shared fixtures: the backend parametrization, seeded inputs and a float64 oracle runner.

``backend_params()`` lists the host backends by default: these tests feed NumPy arrays, which a
GPU backend rightly refuses. ``backend_params(names)`` with CUDA backends named (as ``tests/gpu/``
does, on device arrays) marks them ``gpu`` and skips them when they cannot run here.

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
- ``gpu``: the test needs a real GPU; where its skip is decided at collection (no GPU usable) it
  is deselected instead, not skipped test by test.
- ``gpu_proofs``: the GPU kernels proved on the CPU (``GPU_PROOFS``: NVRTC and NVVM compile
  checks, the g++ harness of the CUDA C bodies, the numba-cuda simulator; the ``cuda13`` extra
  brings the compilers). Deselected by default (``pyproject.toml``), run by
  ``pytest -m gpu_proofs``: these compiles are most of the suite's time, so the README's test
  command leaves them to a group of their own, which CI runs in its own step.

A test of a sweep's ``exhaustive`` cases runs only when ``-m`` names ``exhaustive`` (or ``gpu``:
the device run keeps every case): ``-m torch`` or ``-m gpu_proofs`` selects the group's default
cases, not its sweeps.

Under pytest-xdist (``-n``, no ``--dist``) the tests go to the workers in units
(``pytest_xdist_make_scheduler``): each module of ``ONE_WORKER`` whole (each compiles all its
kernels once for all its tests: the NVRTC, NVVM and g++ checks), every other test function in
runs of consecutive cases with the same first parameter (they share compiled kernels).
"""

import functools
import importlib
import inspect
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

from support.numba_cache import serialize_cache_saves
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


# --- numba's disk cache, shared by the xdist workers (tests/support/numba_cache.py) ---------------

serialize_cache_saves()


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


#: modules that prove the GPU kernels on the CPU, every test of them in the ``gpu_proofs`` group
#: (tests elsewhere that need the CUDA compilers or the simulator carry the marker themselves)
GPU_PROOFS = (
    "test_cuda_compile",
    "test_numba_cuda_compile",
    "test_cuda_harness",
    "test_cuda_mixed",
    "test_cudasim",
    "test_multi_tensor_cuda",
    "test_cuda_quant",
    "test_cuda_quant_compile",
)


def _selects_gpu_proofs(config):
    """Could ``-m`` select a test of ``GPU_PROOFS`` (marked ``gpu_proofs``, and perhaps
    ``exhaustive`` or ``torch``)? If not, those modules are not even imported: their imports
    (CuPy, NVRTC) would otherwise turn into module skips in a run without the cuda13 extra."""
    from _pytest.mark.expression import Expression

    markexpr = config.getoption("markexpr") or ""
    if not markexpr:
        return True
    expr = Expression.compile(markexpr)
    extra = ({"exhaustive"}, {"torch"}, {"exhaustive", "torch"}, set())
    return any(expr.evaluate(lambda name, m=m: name in {"gpu_proofs", *m}) for m in extra)


def pytest_ignore_collect(collection_path, config):
    if collection_path.stem in GPU_PROOFS and not _selects_gpu_proofs(config):
        return True
    return None


#: modules that compile every kernel they check at once, for all their tests (NVRTC, NVVM, g++):
#: under pytest-xdist each runs whole on one worker, so that one worker compiles, not each
ONE_WORKER = (
    "test_cuda_compile",
    "test_numba_cuda_compile",
    "test_cuda_harness",
    "test_cuda_mixed",
)


#: at most this many consecutive tests go to a worker as one unit
UNIT = 64


def _units(nodeids):
    """nodeid -> its unit of work: its module for an ``ONE_WORKER`` module, else its run of
    consecutive tests (at most ``UNIT``) of one test function with the same first parameter
    (a configuration, a rule, a class: the cases that share compiled kernels, which two workers
    running them side by side would each compile)."""
    out, current, count, run = {}, None, 0, 0
    for nodeid in nodeids:
        path = nodeid.split("::", 1)[0]
        if Path(path).stem in ONE_WORKER:
            out[nodeid] = path
            continue
        function, _, params = nodeid.partition("[")
        key = (function, params.split("-", 1)[0])
        if key != current or count == UNIT:
            current, count, run = key, 0, run + 1
        out[nodeid] = f"{function}#{run}"
        count += 1
    return out


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``-n`` without ``--dist``: xdist's scope scheduling over the units of ``_units`` (the
    largest first: the ``ONE_WORKER`` modules)."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):
        unit = {}

        def schedule(self):
            if self.collection is None and self.collection_is_completed:
                self.unit = _units(next(iter(self.registered_collections.values())))
            super().schedule()

        def _split_scope(self, nodeid):
            return self.unit.get(nodeid, nodeid)

    return Scheduling(config, log)


def _skipped_here(item):
    """Whether the item carries a skip decided at collection (a ``skip`` marker, or a
    ``skipif`` whose condition is True)."""
    return any(
        m.name == "skip" or (m.name == "skipif" and m.args and m.args[0] is True)
        for m in item.iter_markers()
    )


@pytest.hookimpl(tryfirst=True)  # before -m selects by the markers
def pytest_collection_modifyitems(config, items):
    """Tests that import torch get the ``torch`` marker, the tests of ``GPU_PROOFS`` the
    ``gpu_proofs`` marker. Tests marked ``distributed`` (process groups spawned on the CPU, tens
    of seconds) run only when ``-m`` names them: ``python -m pytest -q -m distributed``; the
    ``exhaustive`` cases only when ``-m`` names ``exhaustive``."""
    markexpr = config.getoption("markexpr") or ""
    distributed = "distributed" in markexpr
    skip = pytest.mark.skip(reason="distributed: run with -m distributed")
    for item in items:
        if _needs_torch(item):
            item.add_marker(pytest.mark.torch)
        if Path(str(item.fspath)).stem in GPU_PROOFS:
            item.add_marker(pytest.mark.gpu_proofs)
        if not distributed and "distributed" in item.keywords:
            item.add_marker(skip)
    # a group's sweeps run only when -m names them (the device run, -m gpu, keeps every case)
    if not {"exhaustive", "gpu"} & set(re.findall(r"\w+", markexpr)):
        _deselect(config, items, lambda item: item.get_closest_marker("exhaustive"))
    # GPU tests that cannot run here are left out rather than skipped one by one (thousands of
    # parity cases: their reports alone cost more than many real tests)
    _deselect(config, items, lambda item: item.get_closest_marker("gpu") and _skipped_here(item))


def _deselect(config, items, drop):
    """Leave out (deselect, as ``-m`` does) the items for which ``drop`` is true."""
    out = [item for item in items if drop(item)]
    if out:
        config.hook.pytest_deselected(items=out)
        left = set(map(id, out))
        items[:] = [item for item in items if id(item) not in left]


#: what a skip for want of the cuda13 extra's packages says (``importorskip`` or the tests' own)
_CUDA_TOOLS = re.compile(r"cupy|numba.cuda|numba_cuda|cuda\.bindings|simulator|nvrtc|nvvm", re.I)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if (
        report.skipped
        and call.excinfo is not None
        and _CUDA_TOOLS.search(str(call.excinfo.value))
        and item.get_closest_marker("gpu_proofs") is None
        and item.get_closest_marker("gpu") is None
    ):
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} skips without the CUDA compilers or the simulator but does not carry "
            "the gpu_proofs marker, so no CI step would run it: mark it (tests/conftest.py)"
        )
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
