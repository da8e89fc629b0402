"""The pytest-benchmark suite's matrix and shared fixtures (``pytest bench/``).

Not collected by a plain ``pytest`` (``testpaths = ["tests"]``). Every point is optimizer case
× backend × size × dtype: CPU backends at 2^20 and 10^7 elements in float32 and float64, GPU
backends at 2^20, 2^24 and 2^28 in float32. Points of a backend that cannot run here are
skipped with the backend's own reason, so a GPU machine picks them up with no flag. The
measurement code is fastopt's own (``fastopt.bench.measure*``), shared with ``fastopt bench``.
"""

import pytest

from fastopt.backends import BACKENDS, available_backends, get_backend
from fastopt.bench.groups import ceiling_backend, ceiling_runner, copy_runner
from fastopt.bench.measure import CASE_NAMES, CASES, GRID, host_data, measure_group, median

GPU_BACKENDS = ("cupy", "numba-cuda")
WARMUP = 3

_AVAILABLE = available_backends()


def _why(backend):
    try:
        get_backend(backend)
    except (RuntimeError, ValueError) as exc:
        return str(exc)
    return ""


def points():
    """Every (case, backend, n, dtype) of the suite, unavailable backends marked skip."""
    out = []
    for backend in BACKENDS:
        device = "cuda" if backend in GPU_BACKENDS else "cpu"
        marks = () if backend in _AVAILABLE else (pytest.mark.skip(reason=_why(backend)),)
        sizes, dtypes = GRID[device]
        for n in sizes:
            for dtype in dtypes:
                for case in CASE_NAMES:
                    out.append(
                        pytest.param(
                            (case, backend, n, dtype),
                            marks=marks,
                            id=f"{case}-{backend}-{n}-{dtype}",
                        )
                    )
    return out


def pytest_generate_tests(metafunc):
    if "point" in metafunc.fixturenames:
        metafunc.parametrize("point", points())


@pytest.fixture(scope="session")
def ceilings():
    """``get(device, n_state, n, dtype)`` -> (backend, same-traffic GB/s, copy GB/s), measured
    once per session with the shared code, on the backend that measures that device."""
    cache = {}

    def get(device, n_state, n, dtype):
        backend = ceiling_backend(device, _AVAILABLE)
        key = (backend, n_state, n, dtype)
        if key not in cache:
            p0, g0 = host_data(n, dtype)
            res = measure_group(
                {
                    "ceiling": lambda: ceiling_runner(backend, n_state, p0, g0),
                    "copy": lambda: copy_runner(backend, p0),
                },
                reps=20,
                warmup=WARMUP,
                budget_s=4.0,
                together=device == "cpu",
            )
            cache[key] = (backend,) + tuple(
                r.bytes / median(t) / 1e9 for r, t in (res["ceiling"], res["copy"])
            )
        return cache[key]

    return get


@pytest.fixture
def record(benchmark, ceilings):
    """``record(runner, case, backend, device, n, dtype, **extra)`` fills
    ``benchmark.extra_info`` with what ``bench/run_suite.py`` turns into a record; call it after
    the benchmark ran."""
    return lambda *args, **kw: _record(benchmark, ceilings, *args, **kw)


def _record(benchmark, ceilings, runner, case, backend, device, n, dtype, **extra):
    ceil_backend, ceil_gbps, copy_gbps = ceilings(device, CASES[case].n_state, n, dtype)
    info = benchmark.extra_info
    info.update(
        optimizer=case,
        backend=backend,
        device=device,
        dtype=dtype,
        n=n,
        bytes=runner.bytes,
        ceiling_backend=ceil_backend,
        ceiling_gbps=ceil_gbps,
        copy_gbps=copy_gbps,
        **extra,
    )
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        med = stats.stats.median
        info["gbps"] = runner.bytes / med / 1e9
        info["fraction_of_ceiling"] = info["gbps"] / ceil_gbps
