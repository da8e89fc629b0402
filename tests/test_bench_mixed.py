"""The mixed-precision rows of ``fastopt bench``: the per-array bytes model, the same-traffic
kernels of each storage format, and the side-by-side group (timings never asserted)."""

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
from fastopt.bench.measure import (
    CASES,
    PRECISIONS,
    bytes_per_step,
    traffic_arrays,
    transformer_shapes,
)

pytest.importorskip("ml_dtypes")


def test_bytes_per_element_of_each_storage_plan():
    adam = CASES["adam"].n_state
    assert {name: bytes_per_step(adam, 1, io=p.io()) for name, p in PRECISIONS.items()} == {
        "float32": 28,  # the float32 table: (3 + 2*2) * 4
        "bfloat16": 14,  # half of it
        "bfloat16+fp32-state": 2 + 2 + 2 + 16,
        "bfloat16+master": 2 + 2 + 16 + 8,  # the param written only, the master read and written
        # the param read and written (the master's high half), the int16 remainder too
        "bfloat16+remainder": 2 + 2 + 2 + 16 + 2 + 2,
        "float16": 14,
        "float16+master": 28,
        # float32 param and grad, 2 slots read and written as a byte each (+ 4 B per 256)
        "int8-state": 4 + 4 + 4 + 4,
        "float8-state": 4 + 4 + 4 + 4,
        # half a byte of code each (+ 4 B per 128)
        "int4-state": 4 + 4 + 4 + 2,
    }
    quant = PRECISIONS["int8-state"].io()
    assert bytes_per_step(adam, 256, io=quant) == 256 * (4 + 4 + 4) + 4 * (4 + 256)
    int4 = PRECISIONS["int4-state"].io()
    assert bytes_per_step(adam, 256, io=int4) == 256 * (4 + 4 + 4) + 4 * (8 + 128)
    assert sum(b * len(m) for _, b, m in traffic_arrays(256, adam, io=int4)) == bytes_per_step(
        adam, 256, io=int4
    )
    assert bytes_per_step(adam, 10, io=IO("float32")) == bytes_per_step(adam, 10, np.float32)
    both = IO("bfloat16", "float32", "float32", scale="host", write_grad=True)
    assert bytes_per_step(0, 1, io=both) == 2 + 2 + 4 + 4  # the grad read and written back
    assert bytes_per_step(0, 1, io=IO("float64", "float32", "float32")) == 8 + 8 + 4


@pytest.mark.parametrize(
    "name", [n for n in PRECISIONS if n != "float32" and not PRECISIONS[n].io().quant]
)
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


#: the rows the default run asks for by name: the float32 base, a master copy, the packed
#: quantized format (each row's step loop and same-traffic kernel are compiles of their own);
#: every default row, by asking for none, under -m exhaustive
SOME_ROWS = ("float32", "bfloat16+master", "int4-state")


@pytest.mark.parametrize(
    "rows",
    [
        pytest.param(SOME_ROWS, id="some"),
        pytest.param(None, id="defaults", marks=pytest.mark.exhaustive),
    ],
)
def test_mixed_precision_rows_in_fastopt_bench(rows, tmp_path):
    path = tmp_path / "mixed.json"
    argv = ["bench", "--optimizers", "adam", "--sizes", "4096", "--dtypes", "float32"]
    argv += ["--backends", "numba", "--reps", "3", "--json", str(path)]
    argv += ["--precisions", ",".join(rows)] if rows else []
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        assert cli.main(argv) == 0
    recs = [r for r in json.loads(path.read_text())["records"] if "precision" in r]
    assert [r["dtype"] for r in recs] == list(rows or bench_cli.DEFAULT_PRECISIONS)
    base = recs[0]
    for r in recs:
        io_ = PRECISIONS[r["dtype"]].io()
        assert r["bytes"] == bytes_per_step(CASES["adam"].n_state, 4096, io=io_)
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["speedup_vs_float32"] == pytest.approx(base["median_s"] / r["median_s"])
        assert r["bytes_vs_float32"] == pytest.approx(r["bytes"] / base["bytes"])
        # every format has its same-traffic ceiling (a quantized one's moves codes and scales)
        assert r["pct_of_ceiling"] == pytest.approx(100 * r["gbps"] / r["ceiling_gbps"])
        want = {"float32": 8, "bfloat16+master": 12, "int8-state": 2.03125, "int4-state": 1.0625}
        want = want.get(r["dtype"])
        assert want is None or r["state_bytes_per_param"] == want
    text = out.getvalue()
    assert "mixed precision" in text and "bfloat16+master" in text and "load average" in text


# -- fastopt.torch over a model's list, beside torch and the flat step (CPU run of the GPU rows) --


def _tr():
    pytest.importorskip("torch")
    from fastopt.bench import torch_rows

    return torch_rows


@pytest.mark.torch  # torch is imported by the code under test
@pytest.mark.parametrize("precision", ["float32", "bfloat16+master"])
def test_list_group_compares_the_same_work(precision):
    """The list group of the GPU run, on the CPU: fastopt.torch over the transformer's list,
    fastopt's flat step, torch fused on the same list and on one tensor (only where torch keeps
    the same bytes: no master copy), each moving the plan's bytes; the list row's x torch and %
    of the flat step are the group's own medians' ratios, with one value per round."""
    tr = _tr()
    n, rounds = 4096, 2
    recs = tr.list_group("adam", n, precision, device="cpu", rounds=rounds, per_round=1, warmup=1)
    by = {(r["backend"], r["layout"]): r for r in recs}
    same_work = precision == "float32"
    want = {("fastopt.torch", "list"), ("numba", "flat")}
    if same_work:
        want |= {("torch-fused", "list"), ("torch-fused", "flat")}
    assert set(by) == want
    io_ = PRECISIONS[precision].io()
    lst, flat = by["fastopt.torch", "list"], by["numba", "flat"]
    assert lst["n_tensors"] == len(transformer_shapes(n))
    for r in recs:
        assert r["bytes"] == bytes_per_step(CASES["adam"].n_state, n, io=io_)
        assert r["dtype"] == precision and r["step"] == "torch-list"
        assert len(r["round_median_s"]) == rounds and len(r["times_s"]) == rounds
        assert r["spread"]["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["group"] == lst["group"]
    assert lst["pct_of_flat"] == pytest.approx(100 * flat["median_s"] / lst["median_s"])
    assert lst["pct_of_flat_spread"]["rounds"] == rounds
    assert lst["pct_of_ceiling"] == pytest.approx(100 * lst["gbps"] / lst["ceiling_gbps"])
    if same_work:
        peer = by["torch-fused", "list"]
        assert lst["speedup_vs_torch"] == pytest.approx(peer["median_s"] / lst["median_s"])
        assert lst["speedup_vs_torch_vs"] == "torch-fused (list)"
        assert peer["peer"] == "torch.optim.Adam(fused=True)"
        assert flat["speedup_vs_torch"] == pytest.approx(
            by["torch-fused", "flat"]["median_s"] / flat["median_s"]
        )
    else:
        assert "speedup_vs_torch" not in lst  # torch.optim keeps no master copy: no peer


def test_quantized_traffic_is_the_byte_model():
    """A quantized format's same-traffic arrays (each slot's codes and block scales) add up to
    ``bytes_per_step`` where the length is whole blocks, and the CPU ceiling moves them."""
    from fastopt.bench.ceilings_cpu import mixed_traffic_runner
    from fastopt.bench.measure import traffic_arrays

    io_ = PRECISIONS["int8-state"].io()
    assert io_.quant == "int8"
    arrays = traffic_arrays(4096, 2, io=io_)
    assert sum(b * len(m) for _, b, m in arrays) == bytes_per_step(2, 4096, io=io_)
    assert [(a, b) for a, b, _ in arrays if a.startswith("state0")] == [
        ("state0.codes", 4096),
        ("state0.absmax", 4 * 16),
    ]
    r = mixed_traffic_runner(io_, 2, 4096)
    codes = r.keep[2][0].copy()
    r.fn()
    assert r.bytes == bytes_per_step(2, 4096, io=io_) and not np.array_equal(r.keep[2][0], codes)
