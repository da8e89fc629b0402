"""The prepared GPU run (``scripts/gpu_run.sh``), checked on the CPU.

``--dry-run`` prints the plan with a time estimate per step and fails when the plan does not fit
the device window (estimated command time, output files), names a step with no code behind it,
or puts a CPU backend or a launch-bound size into a GPU benchmark group. The parent/child
machinery runs for real on the steps that need no GPU, and must leave its JSON behind.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_run.sh"
#: the script runs this interpreter (the one running the tests, where fastopt is installed)
ENV = dict(os.environ, PYTHON=sys.executable)
sys.path.insert(0, str(ROOT / "scripts"))

import gpu_run  # noqa: E402


def test_dry_run_passes_and_fits_the_window():
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "dry run: ok" in proc.stdout
    for step in gpu_run.PLAN:
        assert step["name"] in proc.stdout
    # 420 s of command time: 360 s of the 900 s window left for a rerun after the start
    assert sum(s["est_s"] for s in gpu_run.PLAN) <= gpu_run.BUDGET_S == 420
    assert len(gpu_run._out_files()) <= 8


@pytest.mark.parametrize(
    "mutate,problem",
    [
        (lambda plan: plan[0].update(est_s=500), "budget"),
        (lambda plan: plan.append(gpu_run._step("bogus", 1, 2, "x")), "no child function"),
        (lambda plan: plan.append(gpu_run._step("facts", 1, 2, "x")), "duplicate"),
        (
            lambda plan: [
                plan.append(gpu_run._step(f"x{i}", 0, 1, "x", files=(f"f{i}.txt",)))
                for i in range(3)
            ],
            "output files",
        ),
    ],
)
def test_plan_problems_are_caught(monkeypatch, mutate, problem):
    plan = [dict(s) for s in gpu_run.PLAN]
    mutate(plan)
    monkeypatch.setattr(gpu_run, "PLAN", plan)
    assert any(problem in p for p in gpu_run.check_plan())


def test_cpu_backends_in_gpu_groups_are_caught(monkeypatch):
    real = gpu_run.bench_groups
    monkeypatch.setattr(
        gpu_run,
        "bench_groups",
        lambda step: (
            real(step) + [dict(case="adam", n=1 << 10, backends=["numba"], torch=False, form="raw")]
        ),
    )
    problems = gpu_run.check_plan()
    assert any("CPU backends ['numba']" in p for p in problems)
    assert any("below 2^20" in p for p in problems)


def test_the_run_leaves_json_after_each_step(tmp_path):
    """The parent runs a child per step and rewrites gpu_run.json after each one; a step that
    needs a GPU fails (or skips its groups) here without ending the run."""
    proc = subprocess.run(
        ["bash", str(SCRIPT), "--out", str(tmp_path), "--only", "facts", "latency"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=ENV,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "gpu_run.json").read_text())
    assert set(doc["steps"]) == {"facts", "latency"}
    facts = doc["steps"]["facts"]
    assert facts["status"] == "ok", facts["tail"]
    assert "numpy" in facts["result"]["backends"] and facts["result"]["versions"]["numpy"]
    assert doc["steps"]["latency"]["status"] in ("ok", "failed")
    assert (tmp_path / "summary.txt").read_text().startswith("fastopt GPU run")
    assert len(list(tmp_path.iterdir())) <= 8


# -- the rows of the targets: planned, guarded, and their machinery on the CPU ------------------


def test_the_targets_rows_are_planned_with_their_guards():
    """fastopt.torch over the list at 2^20, 2^24 and 2^28 in float32, bf16 and bf16 + master;
    a graph-replayed step at 2^20; host syncs with GradScaler; clipping at 2^24 and 2^28; the
    low-bit states: each in a step of the plan, each row that needs new code guarded by a
    feature ``torch_rows.features`` reports, and the dry run prints them."""
    from fastopt.bench.torch_rows import FEATURES

    rows = gpu_run.TORCH_ROWS
    listed = {(r["n"], r["precision"]) for r in rows["torch-list"]}
    assert listed == {(n, p) for n in gpu_run.SIZES for p in gpu_run.LIST_PRECISIONS}
    assert [(r["n"], r.get("guard")) for r in rows["graph"]] == [(1 << 20, "capturable")]
    assert {(r["n"], r["guard"]) for r in rows["clip"]} == {
        (1 << 24, "max_grad_norm"),
        (1 << 28, "max_grad_norm"),
    }
    assert {r["guard"] for r in rows["lowbit"]} == {
        "state_dtype:int8",
        "state_dtype:float8_e4m3",
        "state_dtype:int4",
    }
    assert rows["amp-sync"][0]["guard"] == "sync_debug_mode"
    names = [s["name"] for s in gpu_run.PLAN]
    for step, step_rows in rows.items():
        assert step in names and step in gpu_run.CHILDREN
        assert all(r.get("guard") in (None, *FEATURES) for r in step_rows)
    # by value: the targets' rows before the older benchmarks they refine
    assert names.index("torch-list") < names.index("headline") < names.index("sweep")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gpu_run.print_plan()
    text = out.getvalue()
    assert "row: adam n=2^28 bfloat16+master" in text
    assert "[guard: capturable]" in text and "[guard: state_dtype:float8_e4m3]" in text
    assert "[guard: state_dtype:int4]" in text
    assert sum(s["est_s"] for s in gpu_run.PLAN) + gpu_run.START_S <= gpu_run.WINDOW_S


def test_a_guard_that_is_no_feature_is_caught(monkeypatch):
    rows = {k: [dict(r) for r in v] for k, v in gpu_run.TORCH_ROWS.items()}
    rows["graph"][0]["guard"] = "capturable_v2"
    rows["clip"][0]["precision"] = "int3"
    monkeypatch.setattr(gpu_run, "TORCH_ROWS", rows)
    problems = gpu_run.check_plan()
    assert any("'capturable_v2' is no feature" in p for p in problems)
    assert any("unknown precision 'int3'" in p for p in problems)


def _tr():
    pytest.importorskip("torch")
    from fastopt.bench import torch_rows

    return torch_rows


def test_features_probe_the_code_and_follow_it(monkeypatch):
    """Every guard is reported, with a reason when the code refuses it; a constructor that
    takes the keyword turns its guard on (what happens when the code lands)."""
    tr = _tr()
    import fastopt.torch as fot

    feats = tr.features("cpu")
    assert tuple(feats) == tr.FEATURES
    for name, f in feats.items():
        assert isinstance(f["available"], bool) and (f["available"] or f["why"]), name
    for kw in ("capturable", "max_grad_norm"):
        try:
            fot.Adam([torch_param()], **{kw: True if kw == "capturable" else 1.0}).step()
            works = True
        except Exception:
            works = False
        assert feats[kw]["available"] == works, feats[kw]

    class Adam(fot.Adam):  # a class that takes (and ignores) both keywords
        def __init__(self, params, capturable=False, max_grad_norm=None, **kw):
            super().__init__(params, **kw)

    monkeypatch.setattr(fot, "Adam", Adam)
    feats = tr.features("cpu")
    assert feats["capturable"]["available"] and feats["max_grad_norm"]["available"]


def torch_param():
    import torch

    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.ones(4)
    return p


def test_graph_group_wiring_with_fakes(monkeypatch):
    """The graph group's rows and ratios, with eager stand-ins for the CUDA-graph runners (no
    GPU here): the list row's time over the flat graph step's, and torch's over the list
    row's, each with one value per round."""
    tr = _tr()
    import types

    import torch

    import fastopt.torch as fot
    from fastopt.bench import gpu
    from fastopt.bench.groups import fastopt_runner
    from fastopt.bench.measure import CASES, HostTimer, Runner

    def eager(label, step, nbytes, warmup=3, keep=None, info=None):
        return Runner(label, step, HostTimer(), nbytes, info=dict(info or {}), keep=keep)

    monkeypatch.setattr(gpu, "torch_graph_runner", eager)
    monkeypatch.setattr(
        gpu, "graph_runner", lambda case, p0, g0, backend: fastopt_runner(case, backend, p0, g0)
    )
    feats = {k: {"available": True, "why": ""} for k in tr.FEATURES}
    monkeypatch.setattr(tr, "features", lambda *a, **k: feats)
    fake = types.SimpleNamespace(Adam=lambda params, capturable, **kw: fot.Adam(params, **kw))
    monkeypatch.setattr(tr, "_fot", lambda: fake)
    real = torch.optim.Adam
    monkeypatch.setattr(torch.optim, "Adam", lambda params, capturable, **kw: real(params, **kw))
    recs = tr.graph_group(CASES["adam"], 4096, device="cpu", rounds=2, per_round=1, warmup=1)
    by = {(r["backend"], r["layout"]): r for r in recs}
    assert set(by) == {("fastopt.torch", "list"), ("numba", "flat"), ("torch-fused", "list")}
    lst = by["fastopt.torch", "list"]
    assert all(r["variant"] == "graph" and r["step"] == "graph" for r in recs)
    assert lst["x_flat_graph"] == pytest.approx(lst["median_s"] / by["numba", "flat"]["median_s"])
    assert lst["speedup_vs_torch"] == pytest.approx(
        by["torch-fused", "list"]["median_s"] / lst["median_s"]
    )
    assert lst["x_flat_graph_spread"]["rounds"] == 2
    assert "capturable=True" in by["torch-fused", "list"]["peer"]


@pytest.mark.torch  # torch is imported by the code under test
def test_clip_group_without_the_feature_keeps_its_peers(monkeypatch):
    """Without the ``max_grad_norm`` feature the clip group still measures its peers
    (torch's clip_grad_norm_ + fused step against its fused step alone); with it, fastopt.torch's
    clipped step is measured too, against its unclipped step and torch's clip + step."""
    tr = _tr()
    from fastopt.bench.measure import CASES

    kw = dict(device="cpu", rounds=2, per_round=1, warmup=1)
    monkeypatch.setattr(
        tr, "features", lambda *a, **k: {"max_grad_norm": {"available": False, "why": "x"}}
    )
    recs = tr.clip_group(CASES["adam"], 4096, **kw)
    rows = {(r["backend"], r["variant"]) for r in recs}
    assert rows == {("fastopt.torch", None), ("torch-fused", None), ("torch-fused", "clip")}
    clip = next(r for r in recs if r["variant"] == "clip")
    base = next(r for r in recs if r["backend"] == "torch-fused" and r["variant"] is None)
    assert clip["x_unclipped"] == pytest.approx(clip["median_s"] / base["median_s"])
    assert clip["clip"] > 0 and "clip_grad_norm_" in clip["peer"]
    monkeypatch.setattr(
        tr, "features", lambda *a, **k: {"max_grad_norm": {"available": True, "why": ""}}
    )
    recs = tr.clip_group(CASES["adam"], 4096, **kw)
    # fastopt.torch has max_grad_norm: its clipped row is measured beside the others
    by = {(r["backend"], r["variant"]): r for r in recs}
    assert set(by) == rows | {("fastopt.torch", "clip")}
    ours = by["fastopt.torch", "clip"]
    assert ours["clip"] > 0 and ours["x_unclipped"] > 0 and ours["speedup_vs_torch"] > 0


@pytest.mark.torch  # torch is imported by the code under test
def test_sync_rows_count_with_torchs_protocol():
    """Host syncs of a steady GradScaler step, counted through a stand-in for torch's sync
    debug mode (the CPU has none): GradScaler drives fastopt.torch and torch fused alike, the
    mode is set to 'warn' for the counted steps, 'error' for the last, and reset."""
    tr = _tr()
    modes = []
    rows = tr.sync_rows("adam", 4096, device="cpu", steps=2, set_mode=modes.append)
    assert [r["backend"] for r in rows] == [
        "fastopt.torch",
        "fastopt.torch-capturable",
        "torch-fused",
    ]
    for r in rows:
        assert r["per_step"] == [0, 0] and r["syncs_per_step"] == 0
        assert r["error_mode"] == "passed" and r["n_tensors"] > 100
    assert modes == ["warn", "default", "error", "default"] * 3


@pytest.mark.torch  # torch is imported by the code under test
def test_count_syncs_counts_torchs_warnings():
    tr = _tr()
    import warnings

    modes = []

    def step():
        if modes[-1:] == ["warn"]:
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
            warnings.warn("something else", stacklevel=1)
        if modes[-1:] == ["error"]:
            raise RuntimeError("called a synchronizing CUDA operation")

    got = tr.count_syncs(step, steps=3, warmup=1, set_mode=modes.append)
    assert got["per_step"] == [1, 1, 1] and got["error_mode"].startswith("raised")
    assert modes[-1] == "default"


@pytest.mark.torch  # torch is imported by the code under test
def test_lowbit_group_reads_its_bytes_from_the_state(monkeypatch):
    """On the CPU the group is the float32-state step and a step with each low-bit state the
    CPU backend steps (``features``); each row's bytes and bytes of state per parameter come
    from the optimizer's state arrays (Adam: two float32 moments, 8 B; int8 and float8: two
    byte codes and a float32 scale per 256 elements, 2.03125 B; int4: two half-byte codes and
    a float32 scale per 128 elements, 1.0625 B; what ``fastopt.memory`` derives from the
    spec)."""
    tr = _tr()
    from fastopt.bench.measure import CASES, bytes_per_step
    from fastopt.memory import state_bytes_per_param

    n = 4096
    recs = tr.lowbit_group("adam", n, device="cpu", rounds=2, per_round=1, warmup=1)
    assert [r["state_dtype"] for r in recs] == ["float32", *tr.LOWBIT_STATES]
    r = recs[0]
    assert r["variant"] == "float32"
    assert r["state_bytes_per_param"] == CASES["adam"].n_state * 4
    assert r["bytes"] == bytes_per_step(CASES["adam"].n_state, n, "float32")
    per = {"int8": 2.03125, "float8_e4m3": 2.03125, "int4": 1.0625}
    for r in recs[1:]:
        want = state_bytes_per_param("adam", state_dtype=r["state_dtype"])
        assert r["state_bytes_per_param"] == want == per[r["state_dtype"]]
        assert r["bytes"] == 3 * 4 * n + 2 * want * n


# -- the report: what the README and GPU_NOTES quote ---------------------------------------------

RUN3 = ROOT / "bench" / "results" / "gpu-h200-2026-11-26-run3.json"
RUN3_RUN = ROOT / "bench" / "results" / "gpu-run-h200-2026-11-26-run3.json"


def _report(bench, run=None):
    import gpu_report

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        gpu_report.main([str(bench)] + (["--run", str(run)] if run else []))
    return out.getvalue()


def test_report_holds_rows_against_their_own_group():
    """The recorded run's report: each row's percentage is of the same-traffic kernel of its
    own group (recomputed here from the JSON), the former 'own ceilings' appear only as
    references that the optimizers beat, the list appears only in torch-against-torch rows,
    and ASGD's recorded byte count is flagged against today's model."""
    doc = json.loads(RUN3.read_text())
    text = _report(RUN3, RUN3_RUN)
    assert "own ceiling" not in text.split("References")[0]
    assert "~200 tensors" not in text
    rows = [ln for ln in text.splitlines() if ln.startswith("| sgd | cupy |")]
    (sgd,) = rows
    rec = next(
        r
        for r in doc["records"]
        if r["optimizer"] == "sgd" and r["n"] == 1 << 28 and r["backend"] == "cupy"
    )
    assert f"| {100 * rec['gbps'] / rec['ceiling_vec_gbps']:.1f} |" in sgd
    assert "| 4025 |" in sgd  # the sgd group's own kernel, not a median over groups
    assert "recorded at 20 B/element" in text and "16 B/element" in text
    assert "91.5-119.1 %" in text
    assert "no ceiling" in text and "151 %" in text
    assert "| 2^28 | 196 |" in text  # torch on its list against torch on one tensor


def test_readme_gpu_figures_are_the_reports():
    """Every table row of the README's recorded GPU section is a line the report prints from
    the JSON files the section cites, and every figure of its prose (a decimal, a range, a
    number of three digits or more) is printed by the report too: nothing typed by hand."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Recorded GPU results")[1].split("\n## ")[0]
    assert str(RUN3.relative_to(ROOT)) in section and str(RUN3_RUN.relative_to(ROOT)) in section
    report = _report(RUN3, RUN3_RUN)
    lines = report.splitlines()
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "---" not in ln]
    assert len(rows) >= 8
    for ln in rows:
        assert ln in lines, ln
    prose = re.sub(r"```.*?```", "", section, flags=re.S)
    prose = "\n".join(ln for ln in prose.splitlines() if not ln.startswith("|"))
    figures = re.findall(r"\d+(?:\.\d+)+(?:-\d+(?:\.\d+)?)?|\d{3,}(?:-\d+(?:\.\d+)?)?", prose)
    assert len(figures) >= 10
    for fig in figures:
        assert fig in report, fig


@pytest.mark.torch  # torch is imported by the code under test
def test_report_of_an_interleaved_run():
    """A run in the new schema (records from the list and clip groups run here on the CPU,
    and one flat row scored as a GPU group would be): the report prints the list rows with x
    torch on the same list and % of the flat step, each with its per-round range, the
    clipping rows, the host syncs, and the device's rated bandwidth by its name."""
    tr = _tr()
    import gpu_report

    from fastopt.bench.groups import score_gpu_group
    from fastopt.bench.measure import CASES, Runner

    kw = dict(device="cpu", rounds=2, per_round=1, warmup=1)
    recs = tr.list_group("adam", 4096, "float32", **kw) + tr.clip_group("adam", 4096, **kw)
    flat = dict(next(r for r in recs if r["backend"] == "numba"), backend="cupy", step="headline")
    flat.update(n=1 << 12, optimizer="adam", device="cuda")
    traffic = Runner("t", None, None, flat["bytes"], info={"kind": "same-traffic kernel"})
    score_gpu_group([flat], {"traffic": (traffic, [1e-4], [[1e-4], [1e-4]])}, "H100 80GB HBM3")
    doc = {
        "schema": "fastopt-bench/2",
        "device": {"gpu": "NVIDIA H100 80GB HBM3"},
        "versions": {},
        "config": {},
        "records": recs + [flat],
        "syncs": tr.sync_rows(CASES["adam"], 4096, device="cpu", steps=1, set_mode=lambda m: None),
    }
    text = gpu_report.report(doc, 1 << 12)
    assert "interleaved rounds" in text and "Rated bandwidth: 3350 GB/s" in text
    lst = next(r for r in recs if r["backend"] == "fastopt.torch" and r["step"] == "torch-list")
    sp = lst["speedup_vs_torch_spread"]
    assert f"{lst['speedup_vs_torch']:.2f} ({sp['min']:.2f}-{sp['max']:.2f})" in text
    assert f"{lst['pct_of_flat']:.0f} (" in text
    assert "| adam | cupy | 28 |" in text and "fastopt.torch over the list:" in text
    assert "Clipping inside the step:" in text and "torch-fused, clip" in text
    assert "Host synchronisations with GradScaler:" in text and "[0] host" in text
