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
            _, k = spec.variant_and_scalars(spec.validate(spec.defaults), 3)
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


@pytest.mark.gpu_proofs  # needs the cuda13 extra
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
    """``bench/cpu_loop_cost.py`` (quoted in the README) runs every storage format's loop and
    prints one positive cost per plan."""
    pytest.importorskip("numba")
    import runpy

    mod = runpy.run_path(os.path.join(ROOT, "bench", "cpu_loop_cost.py"))
    mod["main"](["--optimizer", "adam", "--n", "256", "--reps", "3", "--rounds", "1"])
    out = capsys.readouterr().out
    for plan in mod["PLANS"]:
        (line,) = [ln for ln in out.splitlines() if ln.strip().startswith(plan + " ")]
        assert float(line.split(" ns/element")[0].split()[-1]) > 0, line


@pytest.mark.exhaustive  # compiles the word loop twice more
def test_cpu_loop_cost_bounds_time_inexact_word_loops_and_restore_the_rounding(capsys):
    """``bench/cpu_loop_cost.py --bounds`` times the word loop truncating and rounding without
    the NaN case beside every plan, and the exact rounding is back for what compiles after."""
    pytest.importorskip("numba")
    import runpy

    from fastopt.backends import numba_intrinsics

    exact = numba_intrinsics._bf16_round_ir
    mod = runpy.run_path(os.path.join(ROOT, "bench", "cpu_loop_cost.py"))
    res = mod["main"](["--n", "256", "--reps", "2", "--rounds", "1", "--bounds"])
    assert set(res) == set(mod["PLANS"]) | set(mod["BOUNDS"])
    assert numba_intrinsics._bf16_round_ir is exact
    out = capsys.readouterr().out
    for plan in mod["BOUNDS"]:
        (line,) = [ln for ln in out.splitlines() if ln.startswith("  " + plan + " ")]
        assert float(line.split(" ns/element")[0].split()[-1]) > 0, line


@pytest.mark.exhaustive  # compiles five quantized loops
def test_quant_loop_cost_script_times_every_plan(capsys):
    """``bench/quant_loop_cost.py`` (quoted in the README) takes ``cpu_loop_cost``'s command line
    and timing and prints one positive cost per plan, float32's ratio 1."""
    import runpy

    mod = runpy.run_path(os.path.join(ROOT, "bench", "quant_loop_cost.py"))
    res = mod["main"](["--optimizer", "adam", "--n", "512", "--reps", "2", "--rounds", "1"])
    assert set(res) == set(mod["PLANS"])
    out = capsys.readouterr().out
    rows = {}
    for ln in out.splitlines():
        if " ns/element" in ln:
            name, cost = ln.split(" ns/element")[0].rsplit(None, 1)
            rows[name.strip()] = (float(cost), ln)
    assert set(rows) == set(mod["PLANS"])
    assert all(cost > 0 for cost, _ in rows.values()), rows
    assert "(1.00x float32's time)" in rows["float32"][1]


# -- GPU measurement: timing in rounds, spreads, ceilings per group (all on the CPU) -------------


def test_spread_and_per_round_ratios():
    """``spread`` is NumPy's quartiles and the statistics median; ``ratio_spread`` divides
    round by round and refuses rounds that do not pair up."""
    from fastopt.bench.measure import ratio_spread, spread

    t = np.random.default_rng(5).uniform(1, 2, 11).tolist()
    s = spread(t)
    assert [s["min_s"], s["q1_s"], s["median_s"], s["q3_s"], s["max_s"]] == pytest.approx(
        [min(t), *np.quantile(t, [0.25, 0.5, 0.75]), max(t)]
    )
    assert s["median_s"] == pytest.approx(statistics.median(t))
    r = ratio_spread([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])
    assert r == {"min": 1.0, "median": 2.0, "max": 3.0, "rounds": 3}
    assert ratio_spread([1.0, 2.0], [1.0]) is None and ratio_spread([], []) is None


class _Clock:
    """A fake ``time`` module: every ``perf_counter`` call advances 10 s after the first."""

    def __init__(self):
        self.t = -10.0

    def perf_counter(self):
        self.t += 10.0
        return self.t


class _LogTimer:
    device = "cuda"

    def __init__(self, log, key, seconds):
        self.log, self.key, self.seconds = log, key, seconds

    def sync(self):
        pass

    def time(self, fn):
        fn()
        self.log.append(("timed", self.key))
        return self.seconds


def _fake_factories(log, keys=("a", "b", "c")):
    def make(k, s):
        return lambda: _bench.Runner(k, lambda: log.append(("call", k)), _LogTimer(log, k, s), 100)

    return {k: make(k, 1.0 + i) for i, k in enumerate(keys)}


def test_measure_rounds_interleaves_every_runner_every_round(monkeypatch):
    """Warm-up calls first; then each round visits every runner (forward in even rounds,
    backward in odd ones), one untimed call before its timed calls; the budget (on a fake clock:
    10 s a round) stops the rounds once the next would end past it, never before min_rounds."""
    from fastopt.bench import measure as m

    log = []
    res = m.measure_rounds(_fake_factories(log), rounds=4, per_round=2, warmup=1)
    order = "abc" + "cba" + "abc" + "cba"
    # a visit: one untimed call, then two timed ones (a timed call runs the runner too)
    visit = ["call", "call", "timed", "call", "timed"]
    assert log == [("call", k) for k in "abc"] + [(what, k) for k in order for what in visit]
    for i, k in enumerate("abc"):
        runner, times, rounds = res[k]
        assert times == [1.0 + i] * 8 and rounds == [[1.0 + i] * 2] * 4
        assert runner.fn is None and runner.keep is None  # released after the group
    monkeypatch.setattr(m, "time", _Clock())
    res = m.measure_rounds(_fake_factories([]), rounds=7, per_round=1, budget_s=15, min_rounds=3)
    assert [len(r[2]) for r in res.values()] == [3, 3, 3]


def test_measure_rounds_leaves_out_a_runner_that_fails():
    """A runner that cannot be built or warmed up is left out with its error (``errors``);
    without ``errors`` the failure propagates."""
    from fastopt.bench.measure import measure_rounds

    facs = _fake_factories([], keys=("a",))

    def broken():
        raise RuntimeError("no such kernel")

    facs["bad"] = broken
    errors = {}
    res = measure_rounds(facs, rounds=2, per_round=1, warmup=0, errors=errors)
    assert set(res) == {"a"} and errors == {"bad": "RuntimeError: no such kernel"}
    with pytest.raises(RuntimeError, match="no such kernel"):
        measure_rounds(facs, rounds=2, per_round=1, warmup=0)


def test_traffic_arrays_are_the_byte_model():
    """The arrays the same-traffic kernel moves are the byte model's: for every case, bytes
    times reads and writes add up to ``bytes_per_step``; a state the step does not read (ASGD's
    ax before t0) is written only."""
    from fastopt.bench.measure import traffic_arrays

    for case in CASES.values():
        for dt in (np.float32, np.float64):
            arrays = traffic_arrays(1000, case.n_state, dt, n_read=case.n_read)
            assert sum(b * len(m) for _, b, m in arrays) == bytes_per_step(
                case.n_state, 1000, dt, n_read=case.n_read
            ), case.name
            modes = [m for name, _, m in arrays if name.startswith("state")]
            assert modes.count("w") == case.n_state - case.n_read, case.name
    assert [m for _, _, m in traffic_arrays(10, 1, np.float32, n_read=0)] == ["rw", "r", "w"]


def test_rated_bandwidth_by_device_name():
    from fastopt.bench.gpu import rated_bandwidth

    assert rated_bandwidth("NVIDIA H200")[0] == 4.8e12
    assert rated_bandwidth("NVIDIA H200 NVL")[0] == 4.8e12
    assert rated_bandwidth("NVIDIA H100 80GB HBM3")[0] == 3.35e12  # the SXM5 part
    assert rated_bandwidth("NVIDIA H100 PCIe")[0] == 2.0e12
    assert rated_bandwidth("NVIDIA H100 NVL")[0] == 3.9e12
    for unknown in ("NVIDIA A100-SXM4-80GB", "", None):
        assert rated_bandwidth(unknown) == (None, None)


def _emulate_traffic(modes, arrays, nvec, c):
    """What the same-traffic kernel does, in NumPy (uint32 words, 4 to a vector)."""
    out = [a.copy() for a in arrays]
    for i in range(max(nvec)):
        x = np.uint32(c)
        for a, m, n in zip(out, modes, nvec):
            if m == "r" and i < n:
                x ^= np.bitwise_xor.reduce(a[4 * i : 4 * i + 4])
        for a, m, n in zip(out, modes, nvec):
            if m == "rw" and i < n:
                x ^= np.bitwise_xor.reduce(a[4 * i : 4 * i + 4])
                a[4 * i : 4 * i + 4] += x
        for a, m, n in zip(out, modes, nvec):
            if m == "w" and i < n:
                a[4 * i : 4 * i + 4] = x + np.arange(4, dtype=np.uint32)
    return out


def test_same_traffic_kernel_through_gxx():
    """The GPU's same-traffic kernel (``gpu.traffic_source``), compiled by g++ as plain C++
    (``tests/harness/grid.cpp``) and run over every block and thread of a grid smaller than the
    data, over arrays of different sizes and every mode: each array is read and/or written
    exactly as its mode says, vector by vector (bit for bit against NumPy), and not one word
    past its length is touched."""
    import ctypes
    import shutil
    import tempfile
    from pathlib import Path

    from fastopt.bench.gpu import traffic_source

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ is not installed")
    modes = ("rw", "r", "w", "rw", "r")
    name, src = traffic_source(modes, name="fastopt_traffic_test")
    args = ", ".join(f"(uint4 *)a[{j}], n[{j}]" for j in range(len(modes)))
    driver = (
        f'{src}\nextern "C" void run(unsigned int c, long long nmax, void *const *a, '
        "const long long *n) {\n"
        f"    fastopt_grid_serial(3, 32, [&] {{ {name}(c, nmax, {args}); }});\n}}\n"
    )
    harness = Path(ROOT) / "tests" / "harness" / "grid.cpp"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "kernels.inc").write_text(driver.replace("const uint4", "uint4"))
        so = Path(tmp) / "traffic.so"
        cmd = [gxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-Wall", "-Werror"]
        cmd += ['-DFASTOPT_KERNELS="kernels.inc"', f"-I{tmp}", str(harness), "-o", str(so)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        lib = ctypes.CDLL(str(so))
    rng = np.random.default_rng(11)
    nvec = [301, 97, 300, 1, 0]  # vectors each array's kernel argument says it has
    spare = 5  # vectors past each length, which must stay untouched
    arrays = [rng.integers(0, 2**32, 4 * (n + spare), dtype=np.uint32) for n in nvec]
    want = _emulate_traffic(modes, arrays, nvec, 0x9E3779B9)
    ptrs = (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])
    lens = (ctypes.c_longlong * len(nvec))(*nvec)
    lib.run(ctypes.c_uint(0x9E3779B9), ctypes.c_longlong(max(nvec)), ptrs, lens)
    for a, w, m, n in zip(arrays, want, modes, nvec):
        np.testing.assert_array_equal(a, w, err_msg=f"mode {m}, {n} vectors")
    assert not np.array_equal(arrays[0][:4], want[0][:4] - want[0][:4])  # changed at all


@pytest.mark.gpu_proofs  # needs the cuda13 extra
def test_same_traffic_kernel_compiles_with_16_byte_accesses():
    """NVRTC compiles the same-traffic kernel for sm_90 with 16-byte loads and stores only
    (``ld.global.v4`` / ``st.global.v4``): the access width of the optimizers' vector kernels."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    import re

    from fastopt.bench.gpu import traffic_source

    _, src = traffic_source(("rw", "r", "w"), name="fastopt_traffic_ptx")
    err, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"traffic.cu", 0, [], [])
    assert err == nvrtc.nvrtcResult.NVRTC_SUCCESS
    (err,) = nvrtc.nvrtcCompileProgram(prog, 1, [b"-arch=compute_90"])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        pytest.fail(log.decode())
    _, size = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * size
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(prog)
    ptx = ptx.decode()
    loads = re.findall(r"ld\.global(?:\.nc)?(\.v\d)?\.[us]32", ptx)
    stores = re.findall(r"st\.global(\.v\d)?\.[us]32", ptx)
    assert loads and set(loads) == {".v4"}, loads
    assert stores and set(stores) == {".v4"}, stores


def _rec(backend, layout, rounds, nbytes=2800, group="g1", **kw):
    med = statistics.median(rounds)
    return dict(
        optimizer="adam",
        backend=backend,
        layout=layout,
        device="cuda",
        dtype="float32",
        n=100,
        median_s=med,
        round_median_s=rounds,
        bytes=nbytes,
        gbps=nbytes / med / 1e9,
        group=group,
        **kw,
    )


def test_gpu_group_is_scored_against_its_own_ceilings():
    """Each record of a GPU group gets the group's same-traffic kernel and memcpy, each with
    the per-round percentage (bytes over bytes, time over time), and the rated bandwidth of the
    device by name."""
    from fastopt.bench.groups import score_gpu_group
    from fastopt.bench.measure import Runner

    traffic = Runner("t", None, None, 2800, info={"kind": "same-traffic kernel"})
    memcpy = Runner("m", None, None, 800, info={"kind": "cudaMemcpyAsync, device to device"})
    ceilings = {
        "traffic": (traffic, [1e-6] * 3, [[1e-6], [1e-6], [1e-6]]),
        "memcpy": (memcpy, [2e-7] * 3, [[2e-7]] * 3),
    }
    rec = _rec("cupy", "flat", [1e-6, 2e-6, 1.25e-6])
    (got,) = score_gpu_group([rec], ceilings, "NVIDIA H200")
    assert got["ceiling_gbps"] == pytest.approx(2800 / 1e-6 / 1e9)
    assert got["pct_of_ceiling"] == pytest.approx(100 * 1e-6 / 1.25e-6)
    assert got["pct_of_ceiling_spread"] == pytest.approx(
        {"min": 50.0, "median": 80.0, "max": 100.0, "rounds": 3}
    )
    assert got["memcpy_gbps"] == pytest.approx(800 / 2e-7 / 1e9) == got["copy_gbps"]
    assert got["copy_kind"].startswith("cudaMemcpyAsync")
    assert got["rated_gbps"] == 4800.0 and "H200" in got["rated_source"]
    assert got["pct_of_rated"] == pytest.approx(100 * got["gbps"] / 4800)
    (unknown,) = score_gpu_group([_rec("cupy", "flat", [1e-6])], {}, "Some GPU")
    assert unknown["pct_of_ceiling"] is None and unknown["pct_of_rated"] is None


def test_fastopt_rows_are_compared_with_torch_on_the_same_layout():
    """``speedup_vs_torch``: fastopt's flat step against torch on one flat tensor and
    fastopt.torch on the list against torch on that list, never across layouts; rows timed in
    the same rounds get one ratio per round."""
    from fastopt.bench.groups import finalize

    recs = [
        _rec("cupy", "flat", [1.0, 1.0, 1.0]),
        _rec("torch-fused", "flat", [1.2, 1.1, 1.3]),
        _rec("torch-fused", "list", [3.0, 3.0, 3.0]),
        _rec("fastopt.torch", "list", [2.0, 1.5, 3.0]),
        _rec("numba-cuda", "flat", [1.0], group="g2"),
    ]
    finalize(recs)
    flat, _, _, lst, other = recs
    assert flat["speedup_vs_torch"] == pytest.approx(1.2) and flat["torch_peer"].endswith("(flat)")
    assert flat["speedup_vs_torch_spread"] == pytest.approx(
        {"min": 1.1, "median": 1.2, "max": 1.3, "rounds": 3}
    )
    assert lst["speedup_vs_torch"] == pytest.approx(1.5) and lst["torch_peer"].endswith("(list)")
    assert lst["speedup_vs_torch_spread"]["min"] == pytest.approx(1.0)
    assert other["speedup_vs_torch"] == pytest.approx(1.2)  # another group: no per-round pairs
    assert other["speedup_vs_torch_spread"] is None


def _fake_cupy(monkeypatch, calls):
    """A stand-in for CuPy with what ``gpu.memcpy_runner`` and ``gpu.bytes_traffic_runner``
    touch, recording the driver calls and kernel launches."""
    import types

    class Arr:
        def __init__(self, nbytes, ptr, dtype=np.uint8):
            self.nbytes, self.data, self.dtype = nbytes, types.SimpleNamespace(ptr=ptr), dtype

        def view(self, dtype):
            return Arr(self.nbytes, self.data.ptr, dtype)

    class Kernel:
        num_regs = 16

        def __init__(self, src, name):
            self.src, self.name = src, name

        def __call__(self, grid, block, args):
            calls.append(("launch", self.name, grid, block, args))

    ptrs = iter(range(1 << 20, 1 << 30, 1 << 20))
    rng = types.SimpleNamespace(random=lambda size, dtype: Arr(4 * size, next(ptrs), dtype))
    cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(
            memcpyAsync=lambda *a: calls.append(("memcpy", *a)), memcpyDeviceToDevice=3
        ),
        get_current_stream=lambda: types.SimpleNamespace(ptr=77),
        Event=object,
        get_elapsed_time=None,
        Device=lambda: types.SimpleNamespace(
            synchronize=None, attributes={"MultiProcessorCount": 2}
        ),
    )
    fake = types.SimpleNamespace(
        cuda=cuda,
        array=lambda a, copy: Arr(a.nbytes, next(ptrs)),
        empty_like=lambda a: Arr(a.nbytes, next(ptrs)),
        random=types.SimpleNamespace(default_rng=lambda seed: rng),
        RawKernel=Kernel,
        uint32=np.uint32,
        float32=np.float32,
    )
    monkeypatch.setitem(sys.modules, "cupy", fake)
    from fastopt.bench import gpu

    monkeypatch.setattr(gpu, "_cupy_kernels", {})
    return fake


def test_memcpy_runner_is_a_device_to_device_memcpy(monkeypatch):
    """The GPU's copy is one ``cudaMemcpyAsync`` device to device of the param's bytes, from a
    copy of it into a fresh buffer, on CuPy's current stream; it moves twice those bytes."""
    from fastopt.bench.gpu import memcpy_runner

    calls = []
    _fake_cupy(monkeypatch, calls)
    p0 = np.zeros(1000, np.float32)
    r = memcpy_runner(p0)
    src, dst = r.keep
    r.fn()
    assert calls == [("memcpy", dst.data.ptr, src.data.ptr, 4000, 3, 77)]
    assert r.bytes == 8000 and "device to device" in r.info["kind"]


def test_same_traffic_runner_binds_what_the_kernel_declares(monkeypatch):
    """The same-traffic runner launches the kernel of its arrays' modes with (c, nmax, then
    each array and its length in 16-byte vectors), in the order the kernel declares them; each
    array is rounded up to whole vectors and its bytes count once per read and per write."""
    import re

    from fastopt.bench.gpu import bytes_traffic_runner, traffic_source

    calls = []
    _fake_cupy(monkeypatch, calls)
    arrays = [("param", 4000, "rw"), ("grad", 4000, "r"), ("state0", 1001, "w")]
    r = bytes_traffic_runner(arrays)
    r.fn()
    ((_, name, grid, block, args),) = calls
    modes = ("rw", "r", "w")
    want_name, src = traffic_source(modes)
    assert name == want_name
    params = re.findall(r"(uint4 \*__restrict__ a\d|long long n\d|long long nmax|int c)", src)
    assert params == ["int c", "long long nmax"] + [
        x for j in range(3) for x in (f"uint4 *__restrict__ a{j}", f"long long n{j}")
    ]
    nvec = [250, 250, 63]  # 1001 bytes: 63 vectors
    assert isinstance(args[0], np.uint32) and args[1] == np.int64(250)
    for j, n in enumerate(nvec):
        buf, length = args[2 + 2 * j], args[3 + 2 * j]
        assert isinstance(length, np.int64) and length == n and buf.nbytes == 16 * n
    assert r.bytes == 16 * (2 * 250 + 250 + 63)
    assert block == (256,) and grid[0] >= 1
