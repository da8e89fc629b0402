"""``torch.optim`` peers on the same data (skipped cleanly when torch is not installed).

CPU: fused where torch has it, else foreach; CUDA (when torch sees a GPU): fused and foreach.
Each on one flat tensor and on a small transformer's ~200 parameter tensors of the same total
size. Same sizes, dtypes, extra_info and sanity check as ``test_bench_optimizers.py``.
"""

import pytest

from fastopt.bench.measure import CASE_NAMES, CASES, GRID, host_data, timed_call

torch = pytest.importorskip("torch")

from fastopt.bench.torch_peers import modes, torch_runner  # noqa: E402


def _points():
    out = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        sizes, dtypes = GRID[device]
        for n in sizes:
            for dtype in dtypes:
                for case in CASE_NAMES:
                    for mode in modes(CASES[case], device):
                        for layout in ("flat", "list"):
                            out.append(
                                pytest.param(
                                    case,
                                    device,
                                    mode,
                                    layout,
                                    n,
                                    dtype,
                                    id=f"{case}-torch-{mode}-{device}-{layout}-{n}-{dtype}",
                                )
                            )
    return out


@pytest.mark.parametrize("case, device, mode, layout, n, dtype", _points())
def test_torch_step(benchmark, record, case, device, mode, layout, n, dtype):
    p0, g0 = host_data(n, dtype)
    runner = torch_runner(CASES[case], mode, device, p0, g0, layout)
    params, _ = runner.keep
    first = params[0].detach().clone()
    benchmark.group = f"{case} {dtype} n={n}"
    benchmark(timed_call(runner))
    record(
        runner,
        case,
        f"torch-{mode}",
        device,
        n,
        dtype,
        layout=layout,
        n_tensors=len(params),
        peer=runner.info["peer"],
    )
    assert not torch.equal(params[0].detach(), first)
