"""``fastopt bench`` on tiny sizes: the table, the JSON schema, the traffic model, bad options.

Timings are never asserted (they depend on the machine); what is checked is that every number
the command reports is derived correctly from the raw timings it recorded.
"""

import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest

from fastopt import cli
from fastopt.backends import BACKENDS, available_backends
from fastopt.bench import measure as _bench
from fastopt.bench.measure import CASES, bytes_per_step, transformer_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--sizes", "4096", "--dtypes", "float32", "--reps", "3"]
RECORD_KEYS = {
    "optimizer",
    "backend",
    "dtype",
    "n",
    "median_s",
    "bytes",
    "gbps",
    "ceiling_gbps",
    "copy_gbps",
    "times_s",
    "device",
    "layout",
    "pct_of_ceiling",
    "speedup_vs_numpy",
}

#: bytes per element in float32 as the README documents them (ARCHITECTURE.md, byte model)
DOCUMENTED_BYTES_F32 = {
    "sgd": 12,
    "momentum": 20,
    "nesterov": 20,
    "adagrad": 20,
    "rmsprop": 20,
    "rmsprop-centered-momentum": 36,
    "adam": 28,
    "adam-amsgrad": 36,
    "adamw": 28,
    "lion": 20,
    "asgd": 16,  # before its averaging starts (t0): ax = p, written without being read
}


def test_traffic_model_is_design_table():
    """bytes/elem = (3 + states written + states read)·itemsize reproduces the documented table
    and scales with the dtype; every case's state count is its class's state buffers (from the
    rule spec), and every one is read but ASGD's ax before its averaging starts."""
    import fastopt

    assert set(DOCUMENTED_BYTES_F32) <= set(CASES)
    for case in CASES.values():
        cls = getattr(fastopt, case.cls)
        assert case.n_state == len(cls.slots_for(**case.fastopt_kwargs)), case.name
        assert case.n_read == (0 if case.name == "asgd" else case.n_state), case.name
    for name, case in ((n, CASES[n]) for n in DOCUMENTED_BYTES_F32):
        b = DOCUMENTED_BYTES_F32[name]
        assert bytes_per_step(case.n_state, 1, np.float32, n_read=case.n_read) == b, name
        assert bytes_per_step(case.n_state, 1000, np.float64, n_read=case.n_read) == 2000 * b


def test_slots_a_rule_does_not_read_are_not_read_by_its_kernel():
    """``Rule.slots_read`` (derived by probing the rule in Python) against the compiled CPU
    loop: a slot it calls unread leaves every output the same whether it holds NaN, 0, -3 or 3;
    a slot it calls read changes an output with one of them (each rule's variant with every flag on,
    and every variant with an unread slot: one compile each)."""
    from fastopt.kernels import RULES

    from fastopt.backends import numba_backend as nb

    unread = 0
    for name, spec in RULES.items():
        variants = spec.variants()
        for flags in variants:
            used, read = spec.slots_used(flags), spec.slots_read(flags)
            assert all(u or not r for u, r in zip(used, read)), (name, flags)
            if read == used and flags != variants[-1]:
                continue
            _, k = spec.plan(spec.validate(spec.defaults), 3)
            kc = tuple(np.float32(v) for v in k)
            for j in (j for j, u in enumerate(used) if u):
                if read[j] and j != 0:
                    continue  # the first read slot of each variant is enough to see reads
                outs = []
                for fill in (np.nan, 0.0, -3.0, 3.0):
                    arrs = [np.full(8, 0.5, np.float32), np.full(8, 0.25, np.float32)]
                    arrs += [
                        np.full(8, fill if i == j else 0.5, np.float32) for i in range(len(used))
                    ]
                    fn = nb.kernel(name, flags, used, False)
                    fn(*arrs, kc)
                    outs.append([a.copy() for i, a in enumerate(arrs) if i != 1])
                same = all(
                    np.array_equal(a, b, equal_nan=True)
                    for other in outs[1:]
                    for a, b in zip(outs[0], other)
                )
                assert same == (not read[j]), (name, flags, spec.state[j])
                unread += not read[j]
    # every unread slot was checked, and there are some: ASGD's variants that do not average,
    # Adan's first-step variants (no previous gradient)
    expected = sum(
        u and not r
        for spec in RULES.values()
        for flags in spec.variants()
        for u, r in zip(spec.slots_used(flags), spec.slots_read(flags))
    )
    assert unread == expected >= 4


@pytest.mark.parametrize("n", [4096, 1 << 20, 10**7 + 3, 1 << 24])
def test_transformer_shapes_add_up(n):
    shapes = transformer_shapes(n)
    assert sum(math.prod(s) for s in shapes) == n
    assert 190 <= len(shapes) <= 200
    assert all(math.prod(s) > 0 for s in shapes)


def test_transformer_shapes_too_small():
    assert transformer_shapes(100) is None


@pytest.mark.parametrize(
    "text, n",
    [
        ("1048576", 1 << 20),
        ("2^20", 1 << 20),
        ("1<<20", 1 << 20),
        ("1e7", 10**7),
        ("10_000", 10000),
    ],
)
def test_size_syntax(text, n):
    from fastopt.bench.cli import _size

    assert _size(text) == n
    assert _bench.fmt_n(1 << 20) == "2^20" and _bench.fmt_n(10**7) == "10^7"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny sweep through the public entry point (``fastopt bench ...``)."""
    path = tmp_path_factory.mktemp("bench") / "run.json"
    argv = ["bench", "--optimizers", "sgd,adam-amsgrad,lion", *TINY, "--json", str(path)]
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    with open(path) as f:
        doc = json.load(f)
    return rc, out.getvalue(), err.getvalue(), doc


def test_tiny_run_prints_table(tiny_run):
    rc, out, err, _doc = tiny_run
    assert rc == 0
    header = out.splitlines()[0].split()
    assert header == [
        "optimizer",
        "backend",
        "n",
        "dtype",
        "ms/step",
        "GB/s",
        "%",
        "ceil",
        "x",
        "numpy",
        "x",
        "torch",
    ]
    for name in ("sgd", "adam-amsgrad", "lion"):
        assert any(line.split()[:2] == [name, "numba"] for line in out.splitlines()), name
    assert "[1/3]" in err and "[3/3]" in err  # progress went to stderr
    assert "[1/3]" not in out


def test_tiny_run_json_schema(tiny_run):
    _, _, _, doc = tiny_run
    assert {"device", "versions", "records"} <= set(doc)
    assert doc["device"]["cores"] == os.cpu_count() and doc["device"]["cpu"]
    assert {"python", "numpy", "numba", "fastopt"} <= set(doc["versions"])
    recs = doc["records"]
    backends = {r["backend"] for r in recs}
    assert {"numpy", "numba"} <= backends
    for r in recs:
        assert set(r) >= RECORD_KEYS, r["backend"]
        assert r["n"] == 4096 and r["dtype"] == "float32"
        case = CASES[r["optimizer"]]
        assert r["bytes"] == bytes_per_step(case.n_state, 4096, np.float32, n_read=case.n_read)
        assert len(r["times_s"]) == r["reps"] >= 3
        assert r["median_s"] == pytest.approx(statistics.median(r["times_s"]))
        assert r["gbps"] == pytest.approx(r["bytes"] / r["median_s"] / 1e9)
        assert r["ceiling_gbps"] > 0 and r["copy_gbps"] > 0 and r["ceiling_backend"] == "numba"
        assert r["pct_of_ceiling"] == pytest.approx(100 * r["gbps"] / r["ceiling_gbps"])
    by = {(r["optimizer"], r["backend"], r["layout"]): r for r in recs}
    for name in ("sgd", "adam-amsgrad", "lion"):
        fast, oracle = by[(name, "numba", "flat")], by[(name, "numpy", "flat")]
        assert fast["speedup_vs_numpy"] == pytest.approx(oracle["median_s"] / fast["median_s"])


def test_tiny_run_torch_peers(tiny_run):
    pytest.importorskip("torch")
    _, _, _, doc = tiny_run
    recs = doc["records"]
    peers = [r for r in recs if r["backend"].startswith("torch-")]
    assert {r["optimizer"] for r in peers} == {"sgd", "adam-amsgrad"}  # torch has no Lion
    assert {r["layout"] for r in peers} == {"flat", "list"}
    assert all(r["n_tensors"] > 150 for r in peers if r["layout"] == "list")
    for r in recs:
        if r["backend"] == "numba" and r["optimizer"] != "lion":
            best = min(p["median_s"] for p in peers if p["optimizer"] == r["optimizer"])
            assert r["speedup_vs_torch"] == pytest.approx(best / r["median_s"])
    assert "torch" in doc["versions"]


def test_every_optimizer_torch_has_gets_a_torch_peer():
    """Each case whose class torch.optim has (by name) makes a working torch peer on the CPU:
    its keywords are ones torch's class takes (AdamW's pinned ``decoupled_weight_decay`` is
    torch's AdamW itself, and torch's AdamW refuses the keyword)."""
    pytest.importorskip("torch")
    from fastopt.bench import torch_peers

    named = [c for c in CASES.values() if c.torch_cls is not None]
    assert {c.name for c in named} >= {"sgd", "momentum", "adam", "adamw", "asgd"}
    for case in named:
        assert torch_peers.modes(case, "cpu"), f"no torch peer for {case.name}"


def test_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bars.png"
    assert (
        cli.main(
            ["bench", "--optimizers", "sgd", "--backends", "numba", *TINY, "--plot", str(path)]
        )
        == 0
    )
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli.main(["bench", "--optimizers", "sgd", *TINY, "--plot", "x.png"]) == 2
    assert "matplotlib" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--optimizers", "adamm"], "unknown optimizer 'adamm'"),
        (["--backends", "cuda"], "unknown backend 'cuda'"),
        (["--sizes", "big"], "invalid size 'big'"),
        (["--sizes", "0"], "sizes must be >= 1"),
        (["--dtypes", "float16"], "unknown dtype 'float16'"),
        (["--reps", "0"], "must be > 0"),
        (["--frobnicate"], "unrecognized arguments"),
    ],
)
def test_bad_options_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2
    assert words in capsys.readouterr().err


def test_unavailable_backend_exit_2(capsys):
    missing = [b for b in BACKENDS if b not in available_backends()]
    if not missing:
        pytest.skip("every backend can run here")
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--backends", missing[0], *TINY])
    assert exc.value.code == 2
    assert f"backend {missing[0]!r} is not available" in capsys.readouterr().err


def test_console_entry_point_runs():
    """``python -m fastopt bench`` in a fresh process: table on stdout, progress on stderr."""
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastopt",
            "bench",
            "--optimizers",
            "momentum",
            "--backends",
            "numpy,numba",
            *TINY,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert ["momentum", "numba", "2^12", "float32"] in [r[:4] for r in rows]
    assert "[1/1] momentum" in proc.stderr


def test_cpu_ceiling_kernels_touch_every_buffer():
    """The same-traffic kernels read and write param and every state buffer (else the ceiling
    would be measured on less traffic than the optimizer moves)."""
    from fastopt.bench.ceilings_cpu import TRAFFIC, copy_runner, traffic_runner

    p0, g0 = _bench.host_data(1001, np.float32)
    for n_state in TRAFFIC:
        runner = traffic_runner(n_state, p0, g0)
        runner.fn()
        p, _g, states = runner.keep
        c = np.float32(1e-3)
        np.testing.assert_array_equal(p, p0 + c * g0)
        for s in states:
            np.testing.assert_array_equal(s, c * g0)
        assert runner.bytes == bytes_per_step(n_state, 1001, np.float32)
    runner = copy_runner(p0)
    runner.fn()
    np.testing.assert_array_equal(runner.keep[1], p0)


SIM_CHECK = """
import numpy as np
from fastopt.bench.ceilings_numba_cuda import KERNELS, launcher
rng = np.random.default_rng(3)
n = 1000
p0 = rng.standard_normal(n).astype(np.float32); g = rng.standard_normal(n).astype(np.float32)
c = np.float32(0.5)
for k in range(4):
    p = p0.copy(); s = [rng.standard_normal(n).astype(np.float32) for _ in range(k)]
    s0 = [x.copy() for x in s]
    launcher(k, n, p, g, *s, c)()
    np.testing.assert_array_equal(p, p0 + c * g)
    for a, b in zip(s, s0):
        np.testing.assert_array_equal(a, b + c * g)
d = np.zeros(n, np.float32)
launcher("copy", n, d, g)()
np.testing.assert_array_equal(d, g)
print("sim-ok")
"""


def test_numba_cuda_ceiling_kernels_in_simulator():
    """The Numba CUDA ceiling kernels' indexing, under the CUDA simulator (no GPU needed)."""
    pytest.importorskip("numba.cuda")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-c", SIM_CHECK],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "sim-ok" in proc.stdout, proc.stderr


def test_host_path_rows_use_the_null_backend():
    """The host-path measurement runs the real optimizer code on a backend that launches
    nothing, and the null backend exists only inside its block."""
    from fastopt import backends
    from fastopt.bench.cli import measure_host_path
    from fastopt.bench.host import NAME, host_runner, null_backend
    from fastopt.bench.measure import CASES

    rows = measure_host_path([CASES["adam"]], reps=5)
    assert [(r["optimizer"], r["api"]) for r in rows] == [("adam", "step"), ("adam", "update")]
    assert all(0 < r["median_s"] < 0.1 and len(r["times_s"]) == 5 for r in rows)
    assert NAME not in backends.BACKENDS
    with pytest.raises(ValueError, match="unknown backend"):
        backends.get_backend(NAME)
    with null_backend():
        runner = host_runner(CASES["sgd"], n_params=3, api="update")
        params = runner.keep[0]
        before = {k: v.copy() for k, v in params.items()}
        runner.fn()
        assert runner.keep[-1].step_count == 1
        assert all((params[k] == before[k]).all() for k in params)  # nothing launched


def test_cpu_loop_cost_script_times_every_plan(capsys):
    """``bench/cpu_loop_cost.py`` (quoted in the README) runs every storage plan's loop and
    prints one positive cost per plan."""
    pytest.importorskip("numba")
    import runpy

    mod = runpy.run_path(os.path.join(ROOT, "bench", "cpu_loop_cost.py"))
    mod["main"](["--optimizer", "adam", "--n", "256", "--reps", "3", "--rounds", "1"])
    out = capsys.readouterr().out
    for plan in mod["PLANS"]:
        (line,) = [ln for ln in out.splitlines() if ln.strip().startswith(plan + " ")]
        assert float(line.split(" ns/element")[0].split()[-1]) > 0, line
