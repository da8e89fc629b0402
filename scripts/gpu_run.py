"""The one prepared GPU run: facts, the rows of the targets, the GPU tests, the older benchmarks.

A GPU machine is lent rarely and briefly (15 minutes of device time, its start of about 2
minutes included; one command at most 10 minutes), so everything worth knowing is planned here,
on the CPU, as steps ordered by value. Each step runs in its own process with its own time
limit, and a step whose estimate no longer fits the remaining budget is skipped (and says so),
so a run never loses what it already measured: ``gpu_run.json`` (facts, every step's status and
results) and ``bench-gpu.json`` (benchmark records in the ``bench/results`` schema) are
rewritten after every step and every benchmark group.

Rows for code that may not exist yet (a ``fastopt.torch`` step captured in a CUDA graph,
clipping inside the step, quantized state) are guarded: ``fastopt.bench.torch_rows.features``
probes for each on the GPU machine, the facts step records what it found, and a row whose code
is missing is left out of its group (its peers still run).

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

#: the device window: 15 minutes, of which the machine's start takes about 2
WINDOW_S, START_S = 900, 120
#: seconds of command time the plan may take: one command (at most 600 s), leaving room in
#: the window for a rerun of what failed after a fix (360 s)
BUDGET_S = 420
#: output files the device tool brings back at most
MAX_FILES = 8
GPU_BACKENDS = ("cupy", "numba-cuda")
HEADLINE = ("adam", "adamw", "adam-amsgrad")
HEADLINE_N = 1 << 28
SIZES = (1 << 20, 1 << 24, 1 << 28)
#: the storage formats of the list rows (``fastopt.bench.measure.PRECISIONS``)
LIST_PRECISIONS = ("float32", "bfloat16", "bfloat16+master")
#: seconds of timed rounds one benchmark group may take
GROUP_BUDGET_S = 4.0


def _step(name, est_s, limit_s, what, files=()):
    return {"name": name, "est_s": est_s, "limit_s": limit_s, "what": what, "files": files}


#: The plan, by value. Estimates are about 1.5x the command time each step took on the H200
#: run of 2026-11-26 (bench/results/gpu-run-h200-2026-11-26-run3.json: facts 14 s, headline
#: 14 s, latency 11 s, parity 27 s, sweep 26 s, ncu 5 s; the gpu tests 44 s in run 4); the new
#: steps' (torch-list, amp-sync, graph, clip, lowbit) are sized from their groups' step times
#: at those sizes in the same run, plus process start and kernel compilation, unmeasured;
#: interop's 5 s more and lowbit's second backend (5 s) for the quantized kernels, unmeasured;
#: lowbit's int4 rows (one more state dtype per backend: 5 s) and interop's int4 cases (six:
#: 15 s, their kernels' compiles), unmeasured, for which the budget grew from 400 s to 420 s;
#: interop's 11 s more for fastopt.torch with quantized state (a 196-tensor list at 2^18, three
#: compiles per backend), unmeasured, taken from parity, sweep and ncu, whose estimates are
#: brought to 1.5x their measured times.
PLAN = [
    _step(
        "facts",
        25,
        90,
        "device, driver, versions, backends and why not, the commit, the rated bandwidth, "
        "which guarded rows the code here can run; a probe step of every optimizer on both "
        "GPU backends against the oracle",
    ),
    _step(
        "torch-list",
        70,
        150,
        "fastopt.torch Adam over the transformer's 195/196-tensor list at 2^28, 2^24, 2^20 in "
        "float32, bf16 and bf16 + fp32 master, beside torch fused on the same list, fastopt's "
        "flat step and torch fused on one flat tensor; x torch on the same list, % of the flat "
        "step's GB/s, the group's same-traffic kernel, memcpy and rated bandwidth",
        files=("bench-gpu.json",),
    ),
    _step(
        "amp-sync",
        15,
        60,
        "host synchronisations per steady step with GradScaler (torch's sync debug mode, "
        "'warn' counted, then 'error'): fastopt.torch and torch fused over the list at 2^20",
    ),
    _step(
        "graph",
        20,
        60,
        "at 2^20: a capturable fastopt.torch step over the list replayed from a CUDA graph "
        "[guard: capturable], the flat capturable step replayed, torch's capturable fused Adam "
        "over the same list replayed (its peer)",
        files=("bench-gpu.json",),
    ),
    _step(
        "clip",
        20,
        60,
        "over the list at 2^24 and 2^28: fastopt.torch with max_grad_norm [guard: "
        "max_grad_norm] against unclipped, and against torch's clip_grad_norm_ + fused step",
        files=("bench-gpu.json",),
    ),
    _step(
        "interop",
        106,
        200,
        "pytest -m gpu: every GPU test but the parity matrix (interop, streams, "
        "nn.Parameter, 2^31+7 elements, fastopt.torch, textbook, mixed precision on both "
        "backends, a whole capturable step in a CUDA graph, multi-tensor launches over a "
        "196-tensor list and clipping inside the step against torch, quantized state on both "
        "backends against the oracle (int8, float8_e4m3, int4) and bitsandbytes' Adam8bit when "
        "it imports, and in fastopt.torch: one launch per step over the list, a CUDA graph of a "
        "quantized step)",
        files=("pytest-interop.xml",),
    ),
    _step(
        "headline",
        30,
        120,
        f"{', '.join(HEADLINE)} at 2^28 float32 on both backends against the group's "
        "same-traffic kernel, memcpy and rated bandwidth; torch fused and foreach on one flat "
        "tensor; for Adam the older reference kernels (CuPy ElementwiseKernel and numba-cuda "
        "scalar same-traffic kernels, cupy.copyto) and CuPy's ElementwiseKernel form of Adam",
        files=("bench-gpu.json",),
    ),
    _step(
        "lowbit",
        30,
        60,
        "Adam at 2^28 with int8, float8_e4m3 and int4 state [guards: state_dtype:int8, "
        "state_dtype:float8_e4m3, state_dtype:int4] on both GPU backends (the quantized "
        "kernels: one CUDA block per block of codes, int4 a thread per byte) against float32 "
        "state and each plan's same-traffic kernel (the "
        "param and grad, each slot's codes and block scales read and written), bytes of state "
        "per parameter; bitsandbytes' Adam8bit over the 196-tensor list when installed",
        files=("bench-gpu.json",),
    ),
    _step(
        "latency",
        15,
        60,
        "2^20 Adam step vs an empty kernel launch in interleaved rounds: event time, "
        "back-to-back time, host issue time (cupy, numba-cuda, torch fused, a CuPy step "
        "captured in a CUDA graph, the dict API)",
    ),
    _step(
        "parity",
        41,
        200,
        "pytest -m gpu: the parity matrix on both backends, parallel workers, --tb=line, "
        "capped failures",
        files=("pytest-parity.xml",),
    ),
    _step(
        "sweep",
        40,
        150,
        "every optimizer at 2^20, 2^24, 2^28 float32 on both backends against each group's "
        "same-traffic kernel and memcpy, torch peers on one flat tensor (at 2^28, and Adam at "
        "every size)",
        files=("bench-gpu.json",),
    ),
    _step(
        "ncu",
        8,
        60,
        "Nsight Compute on one Adam step (2^24, cupy): DRAM throughput and achieved "
        "occupancy, if ncu can read the counters",
        files=("ncu.txt",),
    ),
]
ALWAYS_FILES = ("gpu_run.json", "run.log", "summary.txt")

#: The rows of the targets, per step, by value: the groups each step measures. ``guard``: the
#: feature (``torch_rows.features``) a row needs; its group's other rows run without it.
TORCH_ROWS = {
    "torch-list": [
        dict(case="adam", n=n, precision=pr)
        for n, pr in (
            (1 << 28, "float32"),
            (1 << 28, "bfloat16"),
            (1 << 24, "float32"),
            (1 << 24, "bfloat16"),
            (1 << 28, "bfloat16+master"),
            (1 << 24, "bfloat16+master"),
            (1 << 20, "float32"),
            (1 << 20, "bfloat16"),
            (1 << 20, "bfloat16+master"),
        )
    ],
    "amp-sync": [dict(case="adam", n=1 << 20, precision="float32", guard="sync_debug_mode")],
    "graph": [dict(case="adam", n=1 << 20, precision="float32", guard="capturable")],
    "clip": [
        dict(case="adam", n=n, precision="float32", guard="max_grad_norm")
        for n in (1 << 28, 1 << 24)
    ],
    "lowbit": [
        dict(case="adam", n=1 << 28, precision="float32", guard=f"state_dtype:{sd}", state=sd)
        for sd in ("int8", "float8_e4m3", "int4")
    ],
}


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
    if BUDGET_S > 600 or START_S + BUDGET_S > WINDOW_S:
        problems.append(f"budget {BUDGET_S} s does not fit one command and the window")
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
    from fastopt.bench.measure import CASES, PRECISIONS

    for group in bench_groups("headline") + bench_groups("sweep"):
        case, n, backends = group["case"], group["n"], group["backends"]
        if case not in CASES:
            problems.append(f"unknown optimizer case {case!r}")
        bad = [b for b in backends if b not in GPU_BACKENDS]
        if bad:
            problems.append(f"{case} n={n}: CPU backends {bad} in a GPU group")
        if n < 1 << 20:
            problems.append(f"{case} n={n}: below 2^20, launch-bound")
    guards = set(_feature_names())
    for step, rows in TORCH_ROWS.items():
        if step not in names:
            problems.append(f"rows of {step!r} belong to no step of the plan")
        for row in rows:
            if row["case"] not in CASES:
                problems.append(f"{step}: unknown optimizer case {row['case']!r}")
            if row["precision"] not in PRECISIONS:
                problems.append(f"{step}: unknown precision {row['precision']!r}")
            if row.get("guard") and row["guard"] not in guards:
                problems.append(f"{step}: guard {row['guard']!r} is no feature {sorted(guards)}")
            if row["n"] < 1 << 20:
                problems.append(f"{step} n={row['n']}: below 2^20")
    for path in (
        "tests/gpu/test_gpu_parity.py",
        "tests/gpu/test_gpu_interop.py",
        "tests/gpu/test_gpu_huge.py",
    ):
        if not (ROOT / path).is_file():
            problems.append(f"missing {path}")
    return problems


def _feature_names():
    """The names of the guards (``torch_rows.FEATURES``; nothing is probed here)."""
    from fastopt.bench.torch_rows import FEATURES

    return FEATURES


def bench_groups(step):
    """The benchmark groups of a step: dicts case, n, backends, torch, form, layouts,
    references."""
    if step == "headline":
        out = [
            dict(
                case=c,
                n=HEADLINE_N,
                backends=list(GPU_BACKENDS),
                torch=True,
                form="raw",
                layouts=("flat",),
                references=c == "adam",
            )
            for c in HEADLINE
        ]
        out.append(
            dict(
                case="adam",
                n=HEADLINE_N,
                backends=["cupy"],
                torch=False,
                form="elementwise",
                layouts=("flat",),
                references=False,
            )
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
                layouts=("flat",),
                references=False,
            )
            for n in SIZES
            for c in CASE_NAMES
            if not (n == HEADLINE_N and c in HEADLINE)
        ]
    return []


def print_plan():
    t = 0
    print(
        f"gpu_run plan (budget {BUDGET_S} s of command time, {MAX_FILES} output files; the "
        f"window: {WINDOW_S} s with about {START_S} s of machine start):"
    )
    for s in PLAN:
        t += s["est_s"]
        print(
            f"  {s['name']:<10} ~{s['est_s']:>3} s (limit {s['limit_s']:>3} s, cumulative "
            f"{t:>3} s)  {s['what']}"
        )
        for row in TORCH_ROWS.get(s["name"], ()):
            extra = f" state {row['state']}" if "state" in row else ""
            guard = f"  [guard: {row['guard']}]" if row.get("guard") else ""
            print(
                f"      row: {row['case']} n=2^{row['n'].bit_length() - 1} "
                f"{row['precision']}{extra}{guard}"
            )
    groups = bench_groups("headline") + bench_groups("sweep")
    rows = sum(len(v) for v in TORCH_ROWS.values())
    print(
        f"  benchmark groups: {len(groups)} older + {rows} rows of the targets; estimated "
        f"{t} s of command time, {START_S + t} s of the {WINDOW_S} s window with the start; "
        f"output files: {', '.join(_out_files())}"
    )


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
    res["commit"] = _commit()
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
    from fastopt.bench.gpu import gpu_name, rated_bandwidth

    rated, source = rated_bandwidth(gpu_name())
    res["rated_gbps"] = None if rated is None else rated / 1e9
    res["rated_source"] = source
    try:  # which guarded rows the code here can run, on the GPU when there is one
        from fastopt.bench.torch_rows import features

        res["features"] = features("cuda" if res.get("gpu") else "cpu")
    except Exception as exc:
        res["features"] = f"{type(exc).__name__}: {exc}"
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
    feats = res["features"] if isinstance(res["features"], dict) else {}
    res["summary"] = [
        "guarded rows: "
        + ", ".join(f"{k} {'yes' if v['available'] else 'no'}" for k, v in feats.items()),
    ] + [
        f"{b}: "
        + ", ".join(f"{k} {v:.1e}" if isinstance(v, float) else f"{k} FAILED" for k, v in e.items())
        for b, e in probe.items()
    ]
    _save_result(out, "facts", res)
    print(json.dumps({k: v for k, v in res.items() if k != "summary"}, indent=1, default=str))


def _commit():
    """The checkout's commit (None when it is no git checkout)."""
    try:
        proc = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
        return proc.stdout.strip() or None
    except Exception:
        return None


def _bench_doc(out):
    """bench-gpu.json as it stands (a fresh document on the step that starts it)."""
    from fastopt.bench import measure as _bench
    from fastopt.bench.gpu import gpu_name

    path = Path(out) / "bench-gpu.json"
    if path.exists():
        return path, json.loads(path.read_text())
    return path, {
        "schema": "fastopt-bench/2",
        "created": _utc(),
        "command": "scripts/gpu_run.sh",
        "commit": _commit(),
        "device": _bench.device_info(gpu_name()),
        "versions": _bench.versions(),
        "config": {
            "timing": "interleaved rounds (fastopt.bench.measure.measure_rounds)",
            "group_budget_s": GROUP_BUDGET_S,
        },
        "records": [],
    }


def _save_records(path, doc, recs, step):
    from fastopt.bench.cli import write_json_atomic
    from fastopt.bench.groups import finalize

    for r in recs:
        r["step"] = step
    doc["records"] += recs
    finalize(doc["records"])
    write_json_atomic(path, doc)


def _range(spread, scale=1.0, fmt=".2f"):
    if not spread:
        return ""
    return f" ({spread['min'] * scale:{fmt}}-{spread['max'] * scale:{fmt}})"


def _line(r):
    """One record in a summary line: GB/s with the range of its timed calls, its ratios."""
    sp = r.get("spread") or {}
    gb = r["bytes"] / 1e9
    text = f"{r['backend']}[{r['layout']}{', ' + r['variant'] if r.get('variant') else ''}] "
    text += f"{r['median_s'] * 1e3:.3f} ms"
    if r["bytes"]:
        text += f" {r['gbps']:.0f} GB/s"
        if sp:
            text += f" ({gb / sp['max_s']:.0f}-{gb / sp['min_s']:.0f})"
    if r.get("pct_of_ceiling") is not None:
        text += f", {r['pct_of_ceiling']:.0f}% of same-traffic"
    for key, label in (
        ("speedup_vs_torch", "x torch"),
        ("pct_of_flat", "% of flat"),
        ("x_flat_graph", "x flat graph"),
        ("x_unclipped", "x unclipped"),
        ("speedup_vs_float32_state", "x fp32 state"),
        ("speedup_vs_bitsandbytes", "x bitsandbytes"),
    ):
        if r.get(key) is not None:
            fmt = ".0f" if key == "pct_of_flat" else ".2f"
            text += f", {label} {r[key]:{fmt}}{_range(r.get(key + '_spread'), fmt=fmt)}"
    return text


def _bench_child(out, step):
    """Run the benchmark groups of ``step``, appending records to bench-gpu.json after each."""
    from fastopt.backends import available_backends, cupy_backend
    from fastopt.bench.gpu import release_memory
    from fastopt.bench.groups import run_group
    from fastopt.bench.measure import CASES, fmt_n
    from fastopt.bench.torch_peers import modes

    path, doc = _bench_doc(out)
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
                layouts=g["layouts"],
                warmup=3,
                budget_s=GROUP_BUDGET_S,
                references=g["references"],
            )
        except Exception as exc:
            print(f"group {g['case']} n={g['n']}: {type(exc).__name__}: {exc}", flush=True)
            doc.setdefault("errors", []).append(f"{step} {g['case']} n={g['n']}: {exc}")
            continue
        finally:
            cupy_backend.KERNEL_FORM = "raw"
            release_memory()
        for r in recs:
            if g["form"] != "raw" and r["backend"] == "cupy":
                r["backend"] = f"cupy-{g['form']}"
        _save_records(path, doc, recs, step)
        head = recs[0] if recs else {}
        line = f"{g['case']} {fmt_n(g['n'])}: " + "; ".join(_line(r) for r in recs)
        if head.get("ceiling_gbps"):
            line += (
                f" | same-traffic {head['ceiling_gbps']:.0f}, memcpy "
                f"{head.get('memcpy_gbps') or 0:.0f}, rated {head.get('rated_gbps') or '-'} GB/s"
            )
        summary.append(line)
        print(line + f"  [{time.monotonic() - t:.1f} s]", flush=True)
    _save_result(out, step, {"summary": summary})


def child_headline(out):
    _bench_child(out, "headline")


def child_sweep(out):
    _bench_child(out, "sweep")


def _rows_child(out, step, run):
    """The rows of ``step`` (``TORCH_ROWS``): ``run(row)`` measures one group and returns its
    records; they are written after each group."""
    from fastopt.bench.gpu import release_memory
    from fastopt.bench.measure import fmt_n

    path, doc = _bench_doc(out)
    summary = []
    for row in TORCH_ROWS[step]:
        t = time.monotonic()
        what = f"{step} {row['case']} {fmt_n(row['n'])} {row['precision']}"
        try:
            recs = run(row)
        except Exception as exc:
            print(f"{what}: {type(exc).__name__}: {exc}", flush=True)
            doc.setdefault("errors", []).append(f"{what}: {type(exc).__name__}: {exc}")
            _save_records(path, doc, [], step)
            continue
        finally:
            release_memory()
        if recs is None:
            continue
        _save_records(path, doc, recs, step)
        line = f"{what}: " + "; ".join(_line(r) for r in recs)
        if recs and recs[0].get("group_errors"):
            line += f" | left out: {recs[0]['group_errors']}"
        summary.append(line)
        print(line + f"  [{time.monotonic() - t:.1f} s]", flush=True)
    _save_result(out, step, {"summary": summary})


def child_torch_list(out):
    from fastopt.bench.torch_rows import features, list_group

    feats = features("cuda")
    if not feats["fastopt.torch"]["available"]:
        _save_result(out, "torch-list", {"summary": ["fastopt.torch does not import"]})
        return

    def run(row):
        if "bfloat16" in row["precision"] and not feats["bfloat16"]["available"]:
            return None
        return list_group(row["case"], row["n"], row["precision"], budget_s=GROUP_BUDGET_S)

    _rows_child(out, "torch-list", run)


def child_graph(out):
    from fastopt.bench.torch_rows import graph_group

    _rows_child(out, "graph", lambda row: graph_group(row["case"], row["n"], budget_s=2.0))


def child_clip(out):
    from fastopt.bench.torch_rows import clip_group

    _rows_child(out, "clip", lambda row: clip_group(row["case"], row["n"], budget_s=GROUP_BUDGET_S))


def child_lowbit(out):
    from fastopt.bench.torch_rows import features, lowbit_group

    feats = features("cuda")
    states = tuple(r["state"] for r in TORCH_ROWS["lowbit"] if feats[r["guard"]]["available"])
    if not states:
        why = {r["guard"]: feats[r["guard"]]["why"] for r in TORCH_ROWS["lowbit"]}
        _save_result(out, "lowbit", {"summary": [f"no low-bit state here: {why}"]})
        return
    row = TORCH_ROWS["lowbit"][0]
    _rows_child(
        out,
        "lowbit",
        lambda r: (
            lowbit_group(r["case"], r["n"], states, backend=GPU_BACKENDS, budget_s=GROUP_BUDGET_S)
            if r is row
            else None
        ),
    )


def child_amp_sync(out):
    from fastopt.bench.torch_rows import features, sync_rows

    feats = features("cuda")
    row = TORCH_ROWS["amp-sync"][0]
    if not feats[row["guard"]]["available"]:
        _save_result(out, "amp-sync", {"summary": [feats[row["guard"]]["why"]]})
        return
    rows = sync_rows(row["case"], row["n"])
    path, doc = _bench_doc(out)
    doc.setdefault("syncs", []).extend(rows)
    _save_records(path, doc, [], "amp-sync")
    summary = [
        f"{r['backend']} over {r['n_tensors']} tensors, GradScaler: {r['per_step']} host syncs "
        f"per steady step; sync debug mode 'error': {r['error_mode']}"
        for r in rows
    ]
    print("\n".join(summary), flush=True)
    _save_result(out, "amp-sync", {"syncs": rows, "summary": summary})


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
        ev = r["event_spread"]
        summary.append(
            f"{label}: event {r['event_s'] * 1e6:.1f} us (IQR {ev['q1_s'] * 1e6:.1f}-"
            f"{ev['q3_s'] * 1e6:.1f}), back-to-back {r['pipelined_s'] * 1e6:.1f} us, host "
            f"issue {r['host_issue_s'] * 1e6:.1f} us"
            + (
                ""
                if label == "empty-launch"
                else f"; x empty (event) {r['event_s'] / empty['event_s']:.2f}"
            )
        )
        print(summary[-1], flush=True)
    from fastopt.bench.gpu import gpu_name, rated_bandwidth

    rated, source = rated_bandwidth(gpu_name())
    _save_result(
        out,
        "latency",
        {
            "n": n,
            "runs": res,
            "summary": summary,
            # the device time of Adam's 28 B/element at the rated bandwidth (a data-sheet figure)
            "rated_floor_s": None if rated is None else float(np.float64(28 * n) / rated),
            "rated_source": source,
        },
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
    "torch-list": child_torch_list,
    "amp-sync": child_amp_sync,
    "graph": child_graph,
    "clip": child_clip,
    "lowbit": child_lowbit,
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
