"""One fused ``opt.step(buf)`` per optimizer case × backend × size × dtype (see conftest.py).

``extra_info`` holds the bytes moved per step, the effective GB/s and the fraction of the
same-traffic ceiling measured on the same backend. The only assertion is a sanity check that
the step ran and moved the parameters; correctness is tested in ``tests/``.
"""

import numpy as np

from fastopt._arrays import to_numpy
from fastopt.bench.groups import device_of, fastopt_runner
from fastopt.bench.measure import CASES, host_data, timed_call


def test_step(benchmark, record, point):
    case, backend, n, dtype = point
    p0, g0 = host_data(n, dtype)
    runner = fastopt_runner(CASES[case], backend, p0, g0)
    buf, opt = runner.keep
    benchmark.group = f"{case} {dtype} n={n}"
    benchmark(timed_call(runner))
    record(runner, case, backend, device_of(backend), n, dtype, layout="flat")
    assert opt.step_count > 3
    assert not np.array_equal(to_numpy(buf.data[:n]), p0)
