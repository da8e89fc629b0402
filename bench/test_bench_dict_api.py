"""The dict API's host cost under pytest-benchmark (``pytest bench/test_bench_dict_api.py``).

The contenders of ``bench/dict_api_vs_torch.py``: Adam in float32 over 2,000 arrays of 256
values (``many``) and over the 10 arrays of a 784-41-41-41-41-10 MLP (``mlp``): fastopt's
``update()`` with the same and with new grad arrays every step, ``step(buf)`` (``mlp``), the
textbook NumPy Adam (``mlp``) and ``torch.optim.Adam(fused=True)`` when torch is installed.
Compare the medians within one benchmark group; the side-by-side script interleaves them.
"""

import pytest
from dict_api_vs_torch import contenders

POINTS = [(case, name) for case in ("many", "mlp") for name in contenders(case)]


@pytest.mark.parametrize("case, name", POINTS, ids=[f"{c}-{n}" for c, n in POINTS])
def test_dict_api_step(benchmark, case, name):
    fn = contenders(case)[name]
    for _ in range(3):  # compile or load the kernels, create the state
        fn()
    benchmark.group = f"dict API, {case}"
    benchmark.extra_info.update(case=case, contender=name)
    benchmark(fn)
