"""The host path of a step alone (no kernel: the null backend of ``fastopt.bench.host``).

``opt.step(buf)`` over one FlatBuffer and ``opt.update()`` over dicts of 1, 100 and 2,000
small arrays: what a GPU step costs the host before its kernel launches, and what the textbook
interface costs per parameter.
"""

import pytest

from fastopt.bench.host import host_runner, null_backend
from fastopt.bench.measure import CASES


@pytest.mark.parametrize("case", ["sgd", "adam"])
@pytest.mark.parametrize(
    "api,n_params", [("step", 1), ("update", 1), ("update", 100), ("update", 2000)]
)
def test_host_path(benchmark, case, api, n_params):
    with null_backend():
        runner = host_runner(CASES[case], n_params=n_params, api=api)
        for _ in range(3):
            runner.fn()
        benchmark.group = f"host path {api} x{n_params}"
        benchmark(runner.fn)
        opt = runner.keep[-1]
        assert opt.step_count > 3
