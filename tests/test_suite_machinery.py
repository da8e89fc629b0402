"""The test suite's own machinery: the pairwise covers of the default run, the modules kept on
one xdist worker, and the guard on numba's disk cache shared by the workers (tests/conftest.py,
tests/support/cover.py, tests/support/numba_cache.py)."""

import itertools
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import _CUDA_TOOLS, GPU_PROOFS, ONE_WORKER, _selects_gpu_proofs
from support.cover import pairwise, pairwise_by

HERE = Path(__file__).resolve().parent


def _pairs(option):
    items = sorted(option.items())
    return set(itertools.combinations(items, 2))


def test_pairwise_holds_every_pair_of_settings_found_together():
    # four flags, one combination refused (as SGD refuses nesterov without momentum)
    options = [
        dict(zip("abcd", bits))
        for bits in itertools.product((False, True), repeat=4)
        if not (bits[3] and not bits[2])
    ]
    picked = pairwise(options)
    assert picked == sorted(set(picked)) and picked == pairwise(options)  # ordered, repeatable
    every = set().union(*map(_pairs, options))
    held = set().union(*(_pairs(options[i]) for i in picked))
    assert held == every
    assert 0 in picked and options.index(dict.fromkeys("abcd", True)) in picked
    assert len(picked) < len(options)
    assert (("c", False), ("d", True)) not in every  # a refused pair is not asked for


def test_pairwise_by_covers_each_group_on_its_own():
    items = [("x", dict(f=f, g=g)) for f in (0, 1) for g in (0, 1)] + [("y", dict(f=0, g=0))]
    keep = pairwise_by(items, lambda it: it[0], lambda it: it[1])
    assert 4 in keep  # a group of one keeps its one item
    assert {items[i][0] for i in keep} == {"x", "y"}


def test_one_worker_modules_exist():
    assert all((HERE / f"{name}.py").is_file() for name in ONE_WORKER)
    assert all((HERE / f"{name}.py").is_file() for name in GPU_PROOFS)
    assert set(ONE_WORKER) <= set(GPU_PROOFS)  # the compile checks are GPU proofs


class _Config:
    def __init__(self, markexpr):
        self.markexpr = markexpr

    def getoption(self, name):
        assert name == "markexpr"
        return self.markexpr


@pytest.mark.parametrize(
    "markexpr, imported",
    [
        ("not exhaustive and not gpu_proofs", False),  # the README's command (pyproject addopts)
        ("gpu_proofs", True),
        ("exhaustive", True),
        ("torch and not exhaustive", True),  # the simulator's run of fastopt.torch's GPU path
        ("gpu", False),  # the device run
        ("distributed", False),
        ("", True),
    ],
)
def test_gpu_proof_modules_are_imported_only_when_selectable(markexpr, imported):
    assert _selects_gpu_proofs(_Config(markexpr)) is imported


def test_a_skip_for_want_of_the_cuda_tools_is_recognised():
    for reason in (
        "could not import 'cupy': No module named 'cupy'",
        "could not import 'cuda.bindings.nvrtc': No module named 'cuda'",
        "no Numba CUDA simulator: pip install numba-cuda",
        "CuPy is not installed",
    ):
        assert _CUDA_TOOLS.search(reason), reason
    assert not _CUDA_TOOLS.search("could not import 'torch': No module named 'torch'")


_SAVER = r"""
import sys
sys.path.insert(0, sys.argv[4])
if sys.argv[3] == "guarded":
    from support.numba_cache import serialize_cache_saves

    serialize_cache_saves()
from numba.core import caching
index = caching.IndexDataCacheFile(sys.argv[1], "probe", "stamp")
who = int(sys.argv[2])
for i in range(150):
    index.save((who, i), ("data", who, i))
"""


def _race(tmp_path, mode):
    """Two processes save 150 distinct entries each into one cache index at once; returns
    (entries that load another key's data, entries missing)."""
    procs = [
        subprocess.Popen([sys.executable, "-c", _SAVER, str(tmp_path), str(w), mode, str(HERE)])
        for w in (0, 1)
    ]
    assert all(p.wait(timeout=300) == 0 for p in procs)
    from numba.core import caching

    index = caching.IndexDataCacheFile(str(tmp_path), "probe", "stamp")
    got = {(w, i): index.load((w, i)) for w in (0, 1) for i in range(150)}
    wrong = sum(v is not None and v != ("data", *k) for k, v in got.items())
    return wrong, sum(v is None for v in got.values())


def test_numba_cache_saves_from_two_workers_keep_every_entry(tmp_path):
    """Numba's own save, unguarded, loses entries and points keys at other entries' data when
    two processes save at once (as two xdist workers compiling two variants do); the guard in
    tests/support/numba_cache.py keeps every entry with its own data."""
    assert _race(tmp_path, "guarded") == (0, 0)
