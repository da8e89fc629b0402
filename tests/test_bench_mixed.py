"""The mixed-precision rows of ``fastopt bench``: the per-array bytes model, the same-traffic
kernels of each storage plan, and the side-by-side group (timings never asserted)."""

import contextlib
import io
import json
import statistics

import numpy as np
import pytest
from fastopt.kernels.storage import IO

from fastopt import cli
from fastopt.bench import cli as bench_cli
from fastopt.bench.ceilings_cpu import mixed_traffic_runner
from fastopt.bench.measure import CASES, PRECISIONS, bytes_per_step

pytest.importorskip("ml_dtypes")


def test_bytes_per_element_of_each_storage_plan():
    adam = CASES["adam"].n_state
    assert {name: bytes_per_step(adam, 1, io=p.io()) for name, p in PRECISIONS.items()} == {
        "float32": 28,  # the float32 table: (3 + 2*2) * 4
        "bfloat16": 14,  # half of it
        "bfloat16+fp32-state": 2 + 2 + 2 + 16,
        "bfloat16+master": 2 + 2 + 16 + 8,  # the param written only, the master read and written
        "float16": 14,
        "float16+master": 28,
    }
    assert bytes_per_step(adam, 10, io=IO("float32")) == bytes_per_step(adam, 10, np.float32)
    both = IO("bfloat16", "float32", "float32", scale="host", write_grad=True)
    assert bytes_per_step(0, 1, io=both) == 2 + 2 + 4 + 4  # the grad read and written back
    assert bytes_per_step(0, 1, io=IO("float64", "float32", "float32")) == 8 + 8 + 4


@pytest.mark.parametrize("name", [n for n in PRECISIONS if n != "float32"])
def test_mixed_traffic_kernels_touch_every_buffer(name):
    io_ = PRECISIONS[name].io()
    r = mixed_traffic_runner(io_, 2, 1000)
    p, g, states, m = r.keep
    before = [a.copy() for a in (p, g, *states, m)]
    r.fn()
    p2, g2, s2, m2 = r.keep
    assert not np.array_equal(p2, before[0]), "param not written"
    assert np.array_equal(g2, before[1]), "grad written"
    for s, b in zip(s2, before[2:4]):
        assert not np.array_equal(s, b), "state not written"
    if io_.master:
        assert not np.array_equal(m2, before[4]), "master not written"
    assert r.bytes == bytes_per_step(2, 1000, io=io_)


def test_mixed_precision_rows_in_fastopt_bench(tmp_path):
    path = tmp_path / "mixed.json"
    argv = ["bench", "--optimizers", "adam", "--sizes", "4096", "--dtypes", "float32"]
    argv += ["--backends", "numba", "--reps", "3", "--json", str(path)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0
    recs = [r for r in json.loads(path.read_text())["records"] if "precision" in r]
    assert [r["dtype"] for r in recs] == list(bench_cli.DEFAULT_PRECISIONS)
    base = recs[0]
    for r in recs:
        io_ = PRECISIONS[r["dtype"]].io()
        assert r["bytes"] == bytes_per_step(CASES["adam"].n_state, 4096, io=io_)
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["speedup_vs_float32"] == pytest.approx(base["median_s"] / r["median_s"])
        assert r["bytes_vs_float32"] == pytest.approx(r["bytes"] / base["bytes"])
        assert r["pct_of_ceiling"] == pytest.approx(100 * r["gbps"] / r["ceiling_gbps"])
    text = out.getvalue()
    assert "mixed precision" in text and "bfloat16+master" in text and "load average" in text
