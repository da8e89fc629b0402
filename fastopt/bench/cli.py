"""``fastopt bench``: measure every optimizer on every backend here against the memory roofline.

For each optimizer, dtype and size it times one fused step (``opt.step(buf)`` on a FlatBuffer),
the NumPy oracle, ``torch.optim`` when torch is installed, and two ceilings on the same backend:
a copy and a same-traffic kernel. On the CPU it adds mixed-precision rows: Adam (of the chosen
optimizers, those in ``--precision-optimizers``) in each storage format of ``--precisions``
(float32; bfloat16 params, grads and state; bfloat16 with float32 state; with float32 state and
an fp32 master), timed side by side in one group, each against the same-traffic kernel of its
own byte count, with its speed-up and bytes relative to float32. It prints a table (ms/step,
GB/s, % of the same-traffic ceiling, speed-up over the NumPy oracle and over torch) and can write
the raw timings as JSON and a bar chart as PNG. Progress goes to stderr, the table to stdout.

    fastopt bench --quick
    fastopt bench --optimizers adam,adamw --sizes 2^24 --json bench/results/run.json
    fastopt bench --optimizers adam --sizes 1e7 --dtypes float32 --backends numba --reps 40
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from ..backends import BACKENDS, get_backend
from . import measure
from .measure import CASE_NAMES, CASES, GRID, PRECISIONS, Case, fmt_n

__all__ = ["build_parser", "format_table", "main", "write_json_atomic"]

#: --quick: one size per device, float32 only
QUICK = {"cpu": (1 << 20,), "cuda": (1 << 24,)}
DTYPES = ("float32", "float64")
PEER = "torch"
#: the mixed-precision rows by default: these optimizers, these storage formats (CPU)
PRECISION_OPTIMIZERS = ("adam",)
DEFAULT_PRECISIONS = (
    "float32",
    "bfloat16",
    "bfloat16+fp32-state",
    "bfloat16+master",
    "bfloat16+remainder",
    "int8-state",
    "float8-state",
    "int4-state",
)


def _csv(choices, what):
    def parse(text):
        items = [s.strip() for s in text.split(",") if s.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"empty {what} list")
        if items == ["all"]:
            return list(choices)
        bad = [s for s in items if s not in choices]
        if bad:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, bad))}; choose from {', '.join(choices)}"
                " (or 'all')"
            )
        return list(dict.fromkeys(items))

    return parse


def _size(text):
    t = text.strip().replace("_", "")
    try:
        if "^" in t:
            base, exp = t.split("^")
            n = int(base) ** int(exp)
        elif "<<" in t:
            a, b = t.split("<<")
            n = int(a) << int(b)
        elif "e" in t.lower():
            n = float(t)
            if n != int(n):
                raise ValueError
            n = int(n)
        else:
            n = int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid size {text!r}; expected an integer such as 1048576, 2^20, 1<<20 or 1e7"
        ) from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"invalid size {text!r}; sizes must be >= 1")
    return n


def _sizes(text):
    items = [s for s in text.split(",") if s.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty size list")
    return list(dict.fromkeys(_size(s) for s in items))


def _positive(kind):
    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"invalid value {text!r}; expected a positive {kind.__name__}"
            ) from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"invalid value {text!r}; must be > 0")
        return v

    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fastopt bench",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog="Sizes accept 1048576, 2^20, 1<<20 or 1e7. The ceiling is the same-traffic "
        "kernel on the same backend (numba on the CPU); 'x numpy' is the NumPy oracle's "
        "time over this row's; 'x torch' the fastest torch.optim peer's time over it.",
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a short sweep (float32, CPU n=2^20, GPU n=2^24, few repetitions)",
    )
    ap.add_argument(
        "--optimizers",
        type=_csv(CASE_NAMES, "optimizer"),
        metavar="LIST",
        help=f"comma-separated, from: {', '.join(CASE_NAMES)} (default: all)",
    )
    ap.add_argument(
        "--backends",
        type=_csv(tuple(BACKENDS) + (PEER,), "backend"),
        metavar="LIST",
        help=f"comma-separated, from: {', '.join(BACKENDS)}, {PEER} (default: all "
        "that can run here; 'torch' adds the torch.optim peers)",
    )
    ap.add_argument(
        "--sizes",
        type=_sizes,
        metavar="LIST",
        help="elements per buffer, comma-separated (default: CPU 2^20,10^7; GPU 2^20,2^24,2^28)",
    )
    ap.add_argument(
        "--dtypes",
        type=_csv(DTYPES, "dtype"),
        metavar="LIST",
        help="float32 and/or float64 (default: both on the CPU, float32 on a GPU)",
    )
    ap.add_argument(
        "--precisions",
        type=_csv(tuple(PRECISIONS) + ("none",), "precision"),
        metavar="LIST",
        help="storage formats of the CPU mixed-precision rows, from: "
        f"{', '.join(PRECISIONS)}; 'none' for no such rows (default: "
        f"{','.join(DEFAULT_PRECISIONS)})",
    )
    ap.add_argument(
        "--precision-optimizers",
        type=_csv(CASE_NAMES, "optimizer"),
        metavar="LIST",
        help="optimizers with mixed-precision rows (default: adam, when selected)",
    )
    ap.add_argument(
        "--reps",
        type=_positive(int),
        metavar="N",
        help="timed repetitions per measurement (default 30, 10 with --quick)",
    )
    ap.add_argument(
        "--budget",
        type=_positive(float),
        metavar="SECONDS",
        help="time budget of one group's timed repetitions; slow runners (the NumPy "
        "oracle) get fewer, never fewer than 5 (default 6, 1 with --quick)",
    )
    ap.add_argument(
        "--json",
        metavar="PATH",
        help="write device, versions and every record (with raw timings) as JSON",
    )
    ap.add_argument(
        "--plot",
        metavar="PATH",
        help="write a PNG bar chart of GB/s against the "
        "ceiling (needs matplotlib: pip install "
        "'fastopt[plot]')",
    )
    return ap


def _schedule(args, ap):
    """[(device, case, dtype, n, fastopt backends, torch modes)], after checking availability."""
    from ..backends import available_backends
    from . import torch_peers

    avail = available_backends()
    torch_ok = torch_peers.available()
    if args.backends is None:
        chosen = list(avail) + ([PEER] if torch_ok else [])
    else:
        chosen = args.backends
        for b in chosen:
            if b == PEER:
                if not torch_ok:
                    ap.error(
                        "backend 'torch' needs PyTorch installed (for example "
                        "pip install torch==2.13.0); it is only a peer, never required"
                    )
            elif b not in avail:
                try:
                    get_backend(b)
                except RuntimeError as exc:
                    ap.error(str(exc))
    fast = [b for b in chosen if b != PEER]
    devices: dict[Any, Any] = {}
    for b in fast:
        devices.setdefault(get_backend(b).DEVICE, []).append(b)
    if PEER in chosen and torch_peers.cuda_available():
        devices.setdefault("cuda", [])
    if PEER in chosen:
        devices.setdefault("cpu", [])
    if devices.get("cuda") and importlib.util.find_spec("cupy") is None:
        ap.error(
            "the GPU benchmarks allocate their buffers with CuPy, which is not installed: "
            "pip install 'fastopt[cuda12]' (or [cuda13])"
        )
    cases = [CASES[c] for c in (args.optimizers or CASE_NAMES)]
    schedule = []
    for device in ("cpu", "cuda"):
        if device not in devices:
            continue
        sizes = args.sizes or (QUICK[device] if args.quick else GRID[device][0])
        dtypes = args.dtypes or (["float32"] if args.quick else GRID[device][1])
        for n in sizes:
            for dtype in dtypes:
                for case in cases:
                    modes = torch_peers.modes(case, device) if PEER in chosen else []
                    if devices[device] or modes:
                        schedule.append((device, case, dtype, n, devices[device], modes))
    return schedule


def _precision_schedule(args, schedule):
    """[(case, n, precisions)] of the CPU mixed-precision groups (after the main schedule's)."""
    if not any(device == "cpu" and backends for device, _, _, _, backends, _ in schedule):
        return []
    if args.precisions == ["none"]:
        return []
    precisions = [p for p in (args.precisions or DEFAULT_PRECISIONS) if p != "none"]
    if importlib.util.find_spec("ml_dtypes") is None:  # bfloat16 arrays need it
        skipped = [p for p in precisions if "bfloat16" in p]
        if skipped and args.precisions:
            print(
                f"fastopt bench: {', '.join(skipped)} skipped: bfloat16 needs ml_dtypes "
                "(pip install 'fastopt[bf16]')",
                file=sys.stderr,
            )
        precisions = [p for p in precisions if "bfloat16" not in p]
        if precisions == ["float32"]:
            return []
    chosen = args.optimizers or CASE_NAMES
    names = args.precision_optimizers or [c for c in PRECISION_OPTIMIZERS if c in chosen]
    sizes = args.sizes or (QUICK["cpu"] if args.quick else GRID["cpu"][0])
    if args.backends is not None and "numba" not in args.backends:
        return []
    return [(CASES[c], n, precisions) for c in names for n in sizes]


def _precision_lines(records):
    """One line per mixed-precision row: bytes and time against float32, % of its ceiling."""
    out = []
    for r in records:
        if "precision" not in r:
            continue
        vs = ""
        if r.get("speedup_vs_float32") is not None and r["dtype"] != "float32":
            vs = (
                f", {r['bytes_vs_float32']:.2f}x float32's bytes, "
                f"{r['speedup_vs_float32']:.2f}x float32's speed"
            )
        state = r.get("state_bytes_per_param")
        out.append(
            f"  {r['optimizer']} n={fmt_n(r['n'])} {r['dtype']}: {r['bytes'] // r['n']} B/elem "
            f"moved, {_fmt(state, '.5g')} B/param of state, "
            f"{r['median_s'] * 1e3:.3f} ms ({r['reps']} reps){vs}; "
            f"{_fmt(r.get('pct_of_ceiling'), '.0f')} % of its same-traffic ceiling "
            f"({_fmt(r.get('ceiling_gbps'), '.1f')} GB/s)"
        )
    return out


def _fmt(x, spec, none="-"):
    return none if x is None else format(x, spec)


def format_table(records: list[dict[str, Any]]) -> str:
    """The human-readable table: one row per record, grouped by device, size and dtype."""
    cols = ("optimizer", "backend", "n", "dtype", "ms/step", "GB/s", "% ceil", "x numpy", "x torch")
    rows = []
    for r in records:
        backend = r["backend"] if r["layout"] == "flat" else f"{r['backend']}[{r['n_tensors']}]"
        rows.append(
            (
                r["optimizer"],
                backend,
                fmt_n(r["n"]),
                r["dtype"],
                f"{r['median_s'] * 1e3:.3f}",
                f"{r['gbps']:.1f}",
                _fmt(r.get("pct_of_ceiling"), ".0f"),
                _fmt(r.get("speedup_vs_numpy"), ".1f"),
                _fmt(r.get("speedup_vs_torch"), ".2f"),
            )
        )
    width = [
        max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)
    ]
    left = {0, 1, 3}

    def line(vals):
        return "  ".join(
            v.ljust(w) if i in left else v.rjust(w) for i, (v, w) in enumerate(zip(vals, width))
        ).rstrip()

    out = [line(cols), line(["-" * w for w in width])]
    prev = None
    for r, row in zip(records, rows):
        block = (r["device"], r["n"], r["dtype"])
        if prev is not None and block != prev:
            out.append("")
        prev = block
        out.append(line(row))
    return "\n".join(out)


def _ceiling_lines(records):
    """One line per (ceiling backend, dtype, n): the median over the run's groups of the copy,
    and of the same-traffic ceiling per traffic (bytes per element): each group measured its
    own, next to its rows, and groups of different traffic are never pooled."""
    import statistics

    seen: dict[Any, Any] = {}
    for r in records:
        if r.get("copy_gbps") is None or r["backend"].startswith("torch-"):
            continue
        v = seen.setdefault((r["ceiling_backend"], r["dtype"], r["n"]), {"copy": [], "traffic": {}})
        v["copy"].append(r["copy_gbps"])
        moved = r.get("ceiling_bytes") or r["bytes"]
        v["traffic"].setdefault(moved // r["n"], []).append(r["ceiling_gbps"])
    out = []
    for (backend, dtype, n), v in seen.items():
        traffic = ", ".join(
            f"{b} B/elem {statistics.median(g):.1f}" for b, g in sorted(v["traffic"].items())
        )
        out.append(
            f"  {backend} {dtype} n={fmt_n(n)}: copy {statistics.median(v['copy']):.1f} "
            f"GB/s; same-traffic {traffic} GB/s"
        )
    return out


def _plot(records, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks: dict[Any, Any] = {}
    for r in records:
        blocks.setdefault((r["device"], r["dtype"], r["n"]), []).append(r)
    fig, axes = plt.subplots(
        len(blocks),
        1,
        squeeze=False,
        figsize=(max(8, 0.45 * max(len(v) for v in blocks.values())), 3.6 * len(blocks)),
    )
    for ax, ((device, dtype, n), recs) in zip(axes[:, 0], blocks.items()):
        x = np.arange(len(recs))
        colors = [
            "tab:blue"
            if r["backend"] in BACKENDS and r["backend"] != "numpy"
            else "tab:gray"
            if r["backend"] == "numpy"
            else "tab:orange"
            for r in recs
        ]
        ax.bar(x, [r["gbps"] for r in recs], color=colors)
        ceil = [(i, r["ceiling_gbps"]) for i, r in enumerate(recs) if r.get("ceiling_gbps")]
        if ceil:
            ax.scatter(
                *zip(*ceil),
                marker="_",
                s=300,
                color="black",
                zorder=3,
                label="same-traffic ceiling",
            )
            ax.legend(loc="upper right", fontsize=8)
        ax.set_xticks(x)
        ax.set_xticklabels(
            [
                f"{r['optimizer']}\n{r['backend']}"
                + ("" if r["layout"] == "flat" else f"[{r['n_tensors']}]")
                for r in recs
            ],
            rotation=90,
            fontsize=7,
        )
        ax.set_ylabel("GB/s")
        ax.set_title(
            f"{device} {dtype} n={fmt_n(n)}: fastopt (blue), NumPy oracle (gray), torch (orange)",
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _progress(i, total, device, case, dtype, n):
    print(
        f"[{i:>{len(str(total))}}/{total}] {case.name:<25} {device:<4} {dtype:<7} n={fmt_n(n):<8}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def measure_host_path(cases: Iterable[Case], reps: int = 300) -> list[dict[str, Any]]:
    """Host time of ``opt.step(buf)`` (one parameter) and ``opt.update()`` (one array) for each
    case on the null backend (``_bench_host``): the Python path alone. Returns records."""
    from .host import host_runner, null_backend
    from .measure import measure, median

    out = []
    with null_backend():
        for case in cases:
            for api in ("step", "update"):
                times = measure(host_runner(case, api=api), reps=reps, warmup=20)
                out.append(
                    {
                        "optimizer": case.name,
                        "api": api,
                        "n_params": 1,
                        "size": 256,
                        "median_s": median(times),
                        "times_s": times,
                    }
                )
    return out


def write_json_atomic(path: str, doc: Any) -> None:
    """Write ``doc`` as JSON to ``path`` through a temporary file and a rename, so a reader (or a
    run killed mid-write) never sees half a file."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def _loadavg():
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print(
                "fastopt bench: --plot needs matplotlib; install it with "
                "pip install 'fastopt[plot]'",
                file=sys.stderr,
            )
            return 2
    schedule = _schedule(args, ap)
    mixed = _precision_schedule(args, schedule)
    if not schedule and not mixed:
        ap.error("nothing to measure: no selected backend can run these optimizers here")
    reps = args.reps or (10 if args.quick else 30)
    budget = args.budget or (1.0 if args.quick else 6.0)
    gpu_name = None
    if any(device == "cuda" for device, *_ in schedule):
        from .gpu import gpu_name as _gpu_name

        gpu_name = _gpu_name()
    print(
        f"fastopt bench: {len(schedule)} groups on {measure.cpu_model()}"
        + (f" + {gpu_name}" if gpu_name else "")
        + f", {reps} reps",
        file=sys.stderr,
    )
    from .groups import finalize, run_group, run_precision_group

    load_start = _loadavg()
    records: list[Any] = []
    host_path: list[Any] = []
    t_start = time.perf_counter()
    command = "fastopt bench " + " ".join(argv if argv is not None else sys.argv[1:])

    def write_json(complete):
        doc = {
            "schema": "fastopt-bench/1",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command,
            "complete": complete,
            "device": measure.device_info(gpu_name),
            "versions": measure.versions(),
            "config": {
                "reps": reps,
                "budget_s": budget,
                "quick": args.quick,
                # other work on the machine shows here (1-minute load averages)
                "loadavg_start": load_start,
                "loadavg_end": _loadavg(),
            },
            "records": records,
            "host_path": host_path,
        }
        write_json_atomic(args.json, doc)

    for i, (device, case, dtype, n, backends, modes) in enumerate(schedule, 1):
        _progress(i, len(schedule) + len(mixed), device, case, dtype, n)
        t0 = time.perf_counter()
        recs = run_group(case, device, n, dtype, backends, modes, reps=reps, budget_s=budget)
        summary = "  ".join(
            f"{r['backend']}{'' if r['layout'] == 'flat' else '[list]'} "
            f"{r['median_s'] * 1e3:.3g} ms"
            for r in recs
        )
        print(f" {summary}  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        records += recs
        if args.json:  # after every group: a run cut short still leaves what it measured
            finalize(records)
            write_json(complete=i == len(schedule) + len(mixed))
    for i, (case, n, precisions) in enumerate(mixed, len(schedule) + 1):
        _progress(i, len(schedule) + len(mixed), "cpu", case, "mixed", n)
        t0 = time.perf_counter()
        # side by side in one group, twice the repetitions: the ratios are the point
        recs = run_precision_group(case, n, precisions, reps=2 * reps, budget_s=2 * budget)
        summary = "  ".join(f"{r['dtype']} {r['median_s'] * 1e3:.3g} ms" for r in recs)
        print(f" {summary}  ({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
        records += recs
        if args.json:
            finalize(records)
            write_json(complete=i == len(schedule) + len(mixed))
    finalize(records)
    if any(device == "cpu" for device, *_ in schedule):
        host_path += measure_host_path(dict.fromkeys(case for _, case, *_ in schedule))
    print(format_table(records))
    lines = _ceiling_lines(records)
    if lines:
        print(
            "\nceilings (median over the groups of the same traffic; each measured beside its "
            "rows: numba's kernels on the CPU, one CuPy kernel and a memcpy on a GPU):"
        )
        print("\n".join(lines))
    lines = _precision_lines(records)
    if lines:
        print(
            "\nmixed precision (numba, one group per optimizer and size, timed side by side; "
            f"load average {load_start} at the start, {_loadavg()} at the end):"
        )
        print("\n".join(lines))
    if host_path:
        print(
            "\nhost path of one step, no kernel (null backend; what a GPU step costs the host "
            "before its launch):"
        )
        print(
            "  "
            + ", ".join(
                f"{h['optimizer']} {h['api']}() {h['median_s'] * 1e6:.1f} us" for h in host_path
            )
        )
    print(f"\n{len(records)} records in {time.perf_counter() - t_start:.0f} s", file=sys.stderr)
    if args.json:
        write_json(complete=True)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
        _plot(records, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
