"""The one prepared GPU run: facts, the headline benchmarks, latency, the GPU test suite.

A GPU machine is lent rarely and briefly (15 minutes of device time, its start included; one
command at most 10 minutes), so everything worth knowing is planned here, on the CPU, as steps
ordered by value. Each step runs in its own process with its own time limit, and a step whose
estimate no longer fits the remaining budget is skipped (and says so), so a run never loses what
it already measured: ``gpu_run.json`` (facts, every step's status and results) and
``bench-gpu.json`` (benchmark records in the ``bench/results`` schema) are rewritten after every
step and every benchmark group.

    python3 scripts/gpu_run.py --out DIR            # on a GPU machine (scripts/gpu_run.sh)
    python3 scripts/gpu_run.py --dry-run            # anywhere: the plan, checked

Output (at most 8 files, all small): gpu_run.json, bench-gpu.json, pytest-interop.xml,
pytest-parity.xml, ncu.txt, run.log, summary.txt.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

#: seconds of command time the plan may take (the window: 10 min per command, 15 min in all
#: with the machine's start and a possible rerun after a fix)
BUDGET_S = 400
#: output files the device tool brings back at most
MAX_FILES = 8
GPU_BACKENDS = ("cupy", "numba-cuda")
HEADLINE = ("adam", "adamw", "adam-amsgrad")
HEADLINE_N = 1 << 28
SIZES = (1 << 20, 1 << 24, 1 << 28)


def _step(name, est_s, limit_s, what, files=()):
    return {"name": name, "est_s": est_s, "limit_s": limit_s, "what": what, "files": files}


#: the plan, by value: what a first GPU run must not come back without comes first
PLAN = [
    _step(
        "facts",
        35,
        90,
        "device, driver, versions, backends and why not; a probe step of "
        "every optimizer on both GPU backends against the oracle",
    ),
    _step(
        "headline",
        45,
        120,
        f"{', '.join(HEADLINE)} at 2^28 float32 on both backends, each "
        "with its own same-traffic ceiling (CuPy also vectorised) and copy; torch fused and "
        "foreach on one flat tensor and on a ~200-tensor list; CuPy's ElementwiseKernel form "
        "of Adam beside its vectorised form",
        files=("bench-gpu.json",),
    ),
    _step(
        "latency",
        15,
        60,
        "2^20 Adam step vs an empty kernel launch: event time, "
        "back-to-back time, host issue time (cupy, numba-cuda, torch fused, a CuPy step "
        "captured in a CUDA graph)",
    ),
    _step(
        "interop",
        65,
        150,
        "pytest -m gpu: every GPU test but the parity matrix (interop, streams, "
        "nn.Parameter, 2^31+7 elements, fastopt.torch, textbook, mixed precision on both "
        "backends, a whole capturable step in a CUDA graph, multi-tensor launches over a "
        "196-tensor list and clipping inside the step against torch)",
        files=("pytest-interop.xml",),
    ),
    _step(
        "parity",
        110,
        200,
        "pytest -m gpu: the parity matrix on both backends, parallel "
        "workers, --tb=line, capped failures",
        files=("pytest-parity.xml",),
    ),
    _step(
        "sweep",
        100,
        150,
        "every optimizer at 2^20, 2^24, 2^28 float32 on both backends "
        "with ceilings and torch peers",
        files=("bench-gpu.json",),
    ),
    _step(
        "ncu",
        30,
        60,
        "Nsight Compute on one Adam step (2^24, cupy): DRAM throughput and "
        "achieved occupancy, if ncu can read the counters",
        files=("ncu.txt",),
    ),
]
ALWAYS_FILES = ("gpu_run.json", "run.log", "summary.txt")


# -- the parent: runs the plan --------------------------------------------------------------------


def _out_files():
    files = set(ALWAYS_FILES)
    for s in PLAN:
        files.update(s["files"])
    return sorted(files)


def check_plan():
    """Problems with the plan itself (empty list: fine). The dry run fails on any."""
    problems = []
    total = sum(s["est_s"] for s in PLAN)
    if total > BUDGET_S:
        problems.append(f"estimated {total} s > budget {BUDGET_S} s")
    files = _out_files()
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} output files > {MAX_FILES}: {files}")
    names = [s["name"] for s in PLAN]
    if len(set(names)) != len(names):
        problems.append(f"duplicate step names: {names}")
    for s in PLAN:
        if s["name"] not in CHILDREN:
            problems.append(f"step {s['name']!r} has no child function")
        if s["limit_s"] < s["est_s"]:
            problems.append(f"step {s['name']!r}: limit {s['limit_s']} s < estimate")
    # nothing CPU-only or undersized in the benchmark groups
    from fastopt.backends import BACKENDS, get_backend  # noqa: F401  (importable here)
    from fastopt.bench.measure import CASES

    for group in bench_groups("headline") + bench_groups("sweep"):
        case, n, backends = group["case"], group["n"], group["backends"]
        if case not in CASES:
            problems.append(f"unknown optimizer case {case!r}")
        bad = [b for b in backends if b not in GPU_BACKENDS]
        if bad:
            problems.append(f"{case} n={n}: CPU backends {bad} in a GPU group")
        if n < 1 << 20:
            problems.append(f"{case} n={n}: below 2^20, launch-bound")
    for path in (
        "tests/gpu/test_gpu_parity.py",
        "tests/gpu/test_gpu_interop.py",
        "tests/gpu/test_gpu_huge.py",
    ):
        if not (ROOT / path).is_file():
            problems.append(f"missing {path}")
    return problems


def bench_groups(step):
    """The benchmark groups of a step: dicts case, n, backends, torch, form."""
    if step == "headline":
        out = [
            dict(case=c, n=HEADLINE_N, backends=list(GPU_BACKENDS), torch=True, form="raw")
            for c in HEADLINE
        ]
        out.append(
            dict(case="adam", n=HEADLINE_N, backends=["cupy"], torch=False, form="elementwise")
        )
        return out
    if step == "sweep":
        from fastopt.bench.measure import CASE_NAMES

        return [
            dict(
                case=c,
                n=n,
                backends=list(GPU_BACKENDS),
                torch=n == SIZES[-1] or c == "adam",
                form="raw",
            )
            for n in SIZES
            for c in CASE_NAMES
            if not (n == HEADLINE_N and c in HEADLINE)
        ]
    return []


def print_plan():
    t = 0
    print(f"gpu_run plan (budget {BUDGET_S} s of command time, {MAX_FILES} output files):")
    for s in PLAN:
        t += s["est_s"]
        print(
            f"  {s['name']:<9} ~{s['est_s']:>3} s (limit {s['limit_s']:>3} s, cumulative "
            f"{t:>3} s)  {s['what']}"
        )
    groups = bench_groups("headline") + bench_groups("sweep")
    print(f"  benchmark groups: {len(groups)}; output files: {', '.join(_out_files())}")


class Run:
    def __init__(self, out, budget):
        self.out, self.budget, self.t0 = Path(out), budget, time.monotonic()
        self.out.mkdir(parents=True, exist_ok=True)
        self.doc = {
            "schema": "fastopt-gpu-run/1",
            "started": _utc(),
            "budget_s": budget,
            "steps": {},
            "plan": [{k: v for k, v in s.items() if k != "files"} for s in PLAN],
        }
        self.log = open(self.out / "run.log", "a")  # noqa: SIM115 - open for the whole run

    def left(self):
        return self.budget - (time.monotonic() - self.t0)

    def save(self):
        self.doc["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        _write_json(self.out / "gpu_run.json", self.doc)

    def run_step(self, step):
        name = step["name"]
        if step["est_s"] > self.left():
            self.doc["steps"][name] = {
                "status": "skipped",
                "why": f"{self.left():.0f} s left, estimate {step['est_s']} s",
            }
            self.save()
            print(f"== {name}: skipped ({self.left():.0f} s left)", flush=True)
            return
        limit = min(step["limit_s"], max(10, self.left()))
        print(f"== {name} (limit {limit:.0f} s): {step['what']}", flush=True)
        t = time.monotonic()
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            name,
            "--out",
            str(self.out),
        ]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
            rc, text = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc = "timeout"
            text = (
                (exc.stdout or b"").decode(errors="replace")
                if isinstance(exc.stdout, bytes)
                else (exc.stdout or "")
            ) + (
                (exc.stderr or b"").decode(errors="replace")
                if isinstance(exc.stderr, bytes)
                else (exc.stderr or "")
            )
        wall = time.monotonic() - t
        self.log.write(f"\n===== {name} rc={rc} {wall:.1f} s\n{text}\n")
        self.log.flush()
        result = {}
        res_file = self.out / f".{name}.json"
        if res_file.exists():
            result = json.loads(res_file.read_text())
            res_file.unlink()
        self.doc["steps"][name] = {
            "status": "ok" if rc == 0 else "failed",
            "rc": rc,
            "wall_s": round(wall, 1),
            "result": result,
            "tail": text[-3000:],
        }
        self.save()
        tail = "\n".join(text.strip().splitlines()[-12:])
        print(f"   rc={rc} in {wall:.1f} s\n{_indent(tail)}", flush=True)


def _indent(text, pre="   | "):
    return "\n".join(pre + ln for ln in text.splitlines())


def _utc():
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_json(path, doc):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def summary(doc):
    lines = [f"fastopt GPU run, {doc.get('elapsed_s')} s of {doc['budget_s']} s"]
    facts = doc["steps"].get("facts", {}).get("result", {})
    if facts:
        lines.append(
            f"device: {facts.get('gpu')} | driver {facts.get('driver')} | "
            f"backends {facts.get('backends')}"
        )
        for b, why in (facts.get("unavailable") or {}).items():
            lines.append(f"  {b} unavailable: {why}")
        for b, errs in (facts.get("probe") or {}).items():
            worst = max((e for e in errs.values() if isinstance(e, float)), default=None)
            bad = {k: v for k, v in errs.items() if not isinstance(v, float)}
            lines.append(
                f"  probe {b}: worst rel. error {worst}" + (f"; failed {bad}" if bad else "")
            )
    for name, st in doc["steps"].items():
        lines.append(f"{name:<9} {st['status']:<8} {st.get('wall_s', '')}")
        res = st.get("result") or {}
        for ln in res.get("summary", []):
            lines.append(f"   {ln}")
    return "\n".join(lines)


def parent(args):
    run = Run(args.out, args.budget)
    problems = check_plan()
    if problems:
        run.doc["plan_problems"] = problems
    for step in PLAN:
        if args.only and step["name"] not in args.only:
            continue
        run.run_step(step)
    run.doc["finished"] = _utc()
    run.save()
    text = summary(run.doc)
    (Path(args.out) / "summary.txt").write_text(text + "\n")
    print("\n" + text)
    return 0


# -- the children: one per step, each writes .<step>.json ------------------------------------------


def _save_result(out, name, result):
    _write_json(Path(out) / f".{name}.json", result)


def child_facts(out):
    import importlib
    import platform

    import numpy as np

    import fastopt
    from fastopt import backends as B

    res = {"python": platform.python_version(), "platform": platform.platform()}
    try:
        smi = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,"
                "clocks.max.sm,clocks.max.memory,power.limit",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        res["nvidia_smi"] = smi.stdout.strip()
        res["gpu"], res["driver"] = [x.strip() for x in smi.stdout.split(",")[:2]]
    except Exception as exc:
        res["nvidia_smi"] = f"failed: {exc}"
    versions = {}
    for m in ("numpy", "numba", "numba_cuda", "cupy", "torch", "pytest", "xdist"):
        try:
            versions[m] = getattr(importlib.import_module(m), "__version__", "?")
        except Exception as exc:
            versions[m] = f"missing ({type(exc).__name__})"
    res["versions"] = versions
    res["cuda_home"] = os.environ.get("CUDA_HOME")
    res["backends"] = fastopt.available_backends()
    res["unavailable"] = {}
    for b in B.BACKENDS:
        if b not in res["backends"]:
            mod = B._module(b)
            res["unavailable"][b] = (
                str(mod) if isinstance(mod, ImportError) else mod.why_unavailable()
            )
    try:
        import cupy

        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        res["device"] = {
            "name": props["name"].decode(),
            "cc": dev.compute_capability,
            "sms": props["multiProcessorCount"],
            "l2_bytes": props["l2CacheSize"],
            "memory_bytes": props["totalGlobalMem"],
            "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
            "cuda_driver": cupy.cuda.runtime.driverGetVersion(),
        }
    except Exception as exc:
        res["device"] = f"cupy sees no GPU: {exc}"
    # probe: one optimizer of each rule and its main flags, both backends, vs the oracle
    from fastopt.bench.measure import CASES

    probe = {}
    rng = np.random.default_rng(0)
    n = (1 << 20) + 3
    p0 = rng.standard_normal(n).astype(np.float32)
    g0 = (rng.standard_normal(n) * 0.1).astype(np.float32)
    for b in GPU_BACKENDS:
        if b not in res["backends"]:
            continue
        import cupy

        errs = {}
        for name, case in CASES.items():
            try:
                ref = getattr(fastopt, case.cls)(**case.fastopt_kwargs, backend="numpy")
                opt = getattr(fastopt, case.cls)(**case.fastopt_kwargs, backend=b)
                pr, pd = {"w": p0.astype(np.float64)}, {"w": cupy.asarray(p0)}
                for t in range(3):
                    ref.update(pr, {"w": g0.astype(np.float64) * (1 + t)})
                    opt.update(pd, {"w": cupy.asarray(g0 * (1 + t))})
                got = cupy.asnumpy(pd["w"]).astype(np.float64)
                err = float(np.abs(got - pr["w"]).max() / np.abs(pr["w"]).max())
                errs[name] = err if np.isfinite(err) else f"non-finite: {err}"
            except Exception as exc:
                errs[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
        probe[b] = errs
    res["probe"] = probe
    res["summary"] = [
        f"{b}: "
        + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} FAILED" for k, v in e.items())
        for b, e in probe.items()
    ]
    _save_result(out, "facts", res)
    print(json.dumps({k: v for k, v in res.items() if k != "summary"}, indent=1, default=str))


def _bench_child(out, step):
    """Run the benchmark groups of ``step``, appending records to bench-gpu.json after each."""
    from fastopt.backends import available_backends, cupy_backend
    from fastopt.bench import measure as _bench
    from fastopt.bench.cli import write_json_atomic
    from fastopt.bench.gpu import gpu_name
    from fastopt.bench.groups import finalize, run_group
    from fastopt.bench.measure import CASES
    from fastopt.bench.torch_peers import modes

    path = Path(out) / "bench-gpu.json"
    if path.exists():
        doc = json.loads(path.read_text())
    else:
        doc = {
            "schema": "fastopt-bench/1",
            "created": _utc(),
            "command": "scripts/gpu_run.sh",
            "device": _bench.device_info(gpu_name()),
            "versions": _bench.versions(),
            "config": {"reps": 20},
            "records": [],
        }
    avail = available_backends()
    summary = []
    for g in bench_groups(step):
        case = CASES[g["case"]]
        backends = [b for b in g["backends"] if b in avail]
        if not backends:
            continue
        torch_modes = modes(case, "cuda") if g["torch"] else []
        cupy_backend.KERNEL_FORM = g["form"]
        t = time.monotonic()
        try:
            recs = run_group(
                case,
                "cuda",
                g["n"],
                "float32",
                backends,
                torch_modes,
                reps=20,
                warmup=3,
                budget_s=4.0,
            )
        except Exception as exc:
            print(f"group {g['case']} n={g['n']}: {type(exc).__name__}: {exc}", flush=True)
            doc.setdefault("errors", []).append(f"{g['case']} n={g['n']}: {exc}")
            continue
        finally:
            cupy_backend.KERNEL_FORM = "raw"
        for r in recs:
            r["step"] = step
            if g["form"] != "raw" and r["backend"] == "cupy":
                r["backend"] = f"cupy-{g['form']}"
        doc["records"] += recs
        finalize(doc["records"])
        write_json_atomic(path, doc)
        line = f"{g['case']} 2^{g['n'].bit_length() - 1}: " + ", ".join(
            f"{r['backend']}{'' if r['layout'] == 'flat' else '[list]'} {r['gbps']:.0f} GB/s"
            + (f" ({r['pct_of_ceiling']:.0f}% ceil" if r.get("pct_of_ceiling") else " (")
            + (f", {r['pct_of_vec_ceiling']:.0f}% vec" if r.get("pct_of_vec_ceiling") else "")
            + (f", {r['pct_of_copy']:.0f}% copy)" if r.get("pct_of_copy") else ")")
            for r in recs
        )
        ceil = {
            r["ceiling_backend"]: (r["ceiling_gbps"], r.get("ceiling_vec_gbps"), r["copy_gbps"])
            for r in recs
            if r.get("ceiling_backend")
        }
        line += " | ceilings " + ", ".join(
            f"{b}: same {c[0]:.0f}" + (f" vec {c[1]:.0f}" if c[1] else "") + f" copy {c[2]:.0f}"
            for b, c in ceil.items()
            if c[0]
        )
        summary.append(line)
        print(line + f"  [{time.monotonic() - t:.1f} s]", flush=True)
    _save_result(out, step, {"summary": summary})


def child_headline(out):
    _bench_child(out, "headline")


def child_sweep(out):
    _bench_child(out, "sweep")


def child_latency(out):
    import numpy as np

    import fastopt
    from fastopt.backends import available_backends
    from fastopt.bench.gpu import device_data, empty_runner, graph_runner, latency, timer_for
    from fastopt.bench.groups import fastopt_runner
    from fastopt.bench.measure import CASES
    from fastopt.bench.torch_peers import torch_runner

    n = 1 << 20
    p0, g0 = device_data(n, "float32")
    runners = {"empty-launch": empty_runner()}
    for b in GPU_BACKENDS:
        if b in available_backends():
            runners[f"adam-{b}"] = fastopt_runner(CASES["adam"], b, p0, g0)
    try:
        runners["adam-torch-fused"] = torch_runner(CASES["adam"], "fused", "cuda", p0, g0)
    except Exception as exc:
        print(f"torch fused: {exc}")
    if "cupy" in available_backends():  # the whole step captured in a CUDA graph, replayed
        try:
            runners["adam-cupy-graph"] = graph_runner(CASES["adam"], p0, g0)
        except Exception as exc:
            print(f"graph capture: {type(exc).__name__}: {exc}", flush=True)
    if "cupy" in available_backends():  # the dict API: one parameter, update()
        import cupy

        opt = fastopt.Adam(backend="cupy")
        pd, gd = {"w": cupy.array(p0)}, {"w": cupy.array(g0)}
        from fastopt.bench.measure import Runner

        runners["adam-cupy-update"] = Runner(
            "update", lambda: opt.update(pd, gd), timer_for("cupy"), 28 * n, keep=(opt, pd, gd)
        )
    res = latency(runners)
    empty = res["empty-launch"]
    summary = []
    for label, r in res.items():
        summary.append(
            f"{label}: event {r['event_s'] * 1e6:.1f} us, back-to-back "
            f"{r['pipelined_s'] * 1e6:.1f} us, host issue {r['host_issue_s'] * 1e6:.1f}"
            f" us"
            + (
                ""
                if label == "empty-launch"
                else f"; x empty (event) {r['event_s'] / empty['event_s']:.2f}"
            )
        )
        print(summary[-1], flush=True)
    slim = {k: dict(v.items()) for k, v in res.items()}
    _save_result(
        out,
        "latency",
        {"n": n, "runs": slim, "summary": summary, "floor_s": float(np.float64(28 * n) / 3.0e12)},
    )


def _pytest(out, name, args, xml):
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-q",
        "-p",
        "no:cacheprovider",
        "-rfE",
        "--tb=line",
        f"--junitxml={Path(out) / xml}",
    ] + args
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    text = proc.stdout + proc.stderr
    print(text[-20000:], flush=True)
    last = [ln for ln in text.splitlines() if " passed" in ln or " failed" in ln or " error" in ln]
    _save_result(out, name, {"rc": proc.returncode, "summary": last[-1:] or [text[-300:]]})
    return proc.returncode


def child_interop(out):
    # every GPU test file but the parity matrix (its own step): interop, streams, 2^31 + 7
    # elements, fastopt.torch, the textbook classes, and whatever tests/gpu gains
    rc = _pytest(
        out,
        "interop",
        ["tests/gpu", "--ignore=tests/gpu/test_gpu_parity.py", "--maxfail=30"],
        "pytest-interop.xml",
    )
    sys.exit(rc)


def child_parity(out):
    try:
        import xdist  # noqa: F401

        par = ["-n", str(min(12, os.cpu_count() or 2)), "--dist", "loadgroup"]
    except ImportError:
        par = []
    rc = _pytest(
        out, "parity", ["tests/gpu/test_gpu_parity.py", "--maxfail=50"] + par, "pytest-parity.xml"
    )
    sys.exit(rc)


NCU_SCRIPT = """
import cupy, numpy as np, fastopt
n = 1 << 24
buf = fastopt.FlatBuffer({"w": cupy.random.standard_normal(n, dtype=cupy.float32)})
buf.grad[...] = cupy.random.standard_normal(buf.grad.size, dtype=cupy.float32) * 0.01
opt = fastopt.Adam(backend="cupy")
for _ in range(3):
    opt.step(buf)
cupy.cuda.Device().synchronize()
"""


def child_ncu(out):
    import shutil

    ncu = shutil.which("ncu") or next(
        (str(p) for p in Path("/opt/nvidia").glob("nsight-compute/*/ncu")), None
    )
    if ncu is None:
        _save_result(out, "ncu", {"summary": ["ncu not found"]})
        return
    script = Path(out) / ".ncu_step.py"
    script.write_text(NCU_SCRIPT)
    cmd = [
        ncu,
        "--clock-control",
        "none",
        "-k",
        "regex:fastopt_adam",
        "-c",
        "2",
        "--section",
        "SpeedOfLight",
        "--section",
        "Occupancy",
        "--section",
        "LaunchStats",
        sys.executable,
        str(script),
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT))
    )
    script.unlink()
    text = proc.stdout + proc.stderr
    (Path(out) / "ncu.txt").write_text(text[-60000:])
    keys = (
        "DRAM Throughput",
        "Memory Throughput",
        "Achieved Occupancy",
        "Registers Per Thread",
        "Duration",
        "Grid Size",
        "Theoretical Occupancy",
    )
    lines = [ln.strip() for ln in text.splitlines() if any(k in ln for k in keys)]
    _save_result(out, "ncu", {"rc": proc.returncode, "summary": lines[:14] or [text[-300:]]})
    print(text[-4000:])


CHILDREN = {
    "facts": child_facts,
    "headline": child_headline,
    "latency": child_latency,
    "interop": child_interop,
    "parity": child_parity,
    "sweep": child_sweep,
    "ncu": child_ncu,
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "gpu-results"))
    ap.add_argument(
        "--budget",
        type=float,
        default=BUDGET_S,
        help=f"seconds of command time (default {BUDGET_S})",
    )
    ap.add_argument("--dry-run", action="store_true", help="print and check the plan")
    ap.add_argument("--only", nargs="*", help="run only these steps")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        CHILDREN[args.child](args.out)
        return 0
    if args.dry_run:
        print_plan()
        problems = check_plan()
        for p in problems:
            print(f"PLAN PROBLEM: {p}")
        print("dry run: " + ("FAILED" if problems else "ok"))
        return 1 if problems else 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
