"""The prepared GPU run (``scripts/gpu_run.sh``), checked on the CPU.

``--dry-run`` prints the plan with a time estimate per step and fails when the plan does not fit
the device window (estimated command time, output files), names a step with no code behind it,
or puts a CPU backend or a launch-bound size into a GPU benchmark group. The parent/child
machinery runs for real on the steps that need no GPU, and must leave its JSON behind.
"""

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
    assert sum(s["est_s"] for s in gpu_run.PLAN) <= 400
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
