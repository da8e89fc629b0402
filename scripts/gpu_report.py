"""Markdown tables from a recorded GPU run (``bench/results/gpu-*.json``), for the README and
``bench/GPU_NOTES.md``: every figure is read from the recorded JSON, none is typed by hand.

    python3 scripts/gpu_report.py bench/results/gpu-h200-2026-11-26.json \
        [--run bench/results/gpu-run-h200-2026-11-26.json] [--n 2^28]
"""

import argparse
import json
import sys


def _n(text):
    return int(text.split("^")[0]) ** int(text.split("^")[1]) if "^" in text else int(text)


def _pct(x):
    return "-" if x is None else f"{x:.0f}"


def throughput_table(doc, n, steps=("headline", "sweep")):
    """One row per (optimizer, fastopt backend) at size ``n``: GB/s, % of the vectorised
    same-traffic ceiling, of the backend's own same-traffic ceiling and of its copy, and the
    speed-up over torch fused on one flat tensor and on the ~200-tensor list."""
    recs = [r for r in doc["records"] if r["n"] == n and r.get("step", "sweep") in steps]
    torch = {}
    for r in recs:
        if r["backend"] == "torch-fused":
            torch[(r["optimizer"], r["layout"])] = r["median_s"]
    rows = [
        "| optimizer | backend | GB/s | % vec ceiling | % own ceiling | % copy | "
        "x torch fused | x torch fused, ~200 tensors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    seen = set()
    for r in recs:
        if r["backend"].startswith("torch") or (r["optimizer"], r["backend"]) in seen:
            continue
        seen.add((r["optimizer"], r["backend"]))
        t = r["median_s"]
        x_flat, x_list = (
            ("-" if peer is None else f"{peer / t:.2f}")
            for peer in (torch.get((r["optimizer"], "flat")), torch.get((r["optimizer"], "list")))
        )
        rows.append(
            f"| {r['optimizer']} | {r['backend']} | {r['gbps']:.0f} | "
            f"{_pct(r.get('pct_of_vec_ceiling'))} | {_pct(r.get('pct_of_ceiling'))} | "
            f"{_pct(r.get('pct_of_copy'))} | {x_flat} | {x_list} |"
        )
    return "\n".join(rows)


def ceiling_lines(doc, n):
    out = {}
    for r in doc["records"]:
        if r["n"] == n and r.get("ceiling_backend") and not r["backend"].startswith("torch"):
            out.setdefault(r["ceiling_backend"], []).append(
                (r.get("copy_gbps"), r.get("ceiling_vec_gbps"))
            )
    lines = []
    for b, vals in out.items():
        copies = sorted(v[0] for v in vals if v[0])
        vecs = sorted(v[1] for v in vals if v[1])
        line = f"- {b}: device copy {copies[len(copies) // 2]:.0f} GB/s (median of {len(copies)})"
        if vecs:
            line += f", vectorised same-traffic kernel {vecs[len(vecs) // 2]:.0f} GB/s"
        lines.append(line)
    return "\n".join(lines)


def latency_table(run):
    lat = run["steps"].get("latency", {}).get("result", {}).get("runs")
    if not lat:
        return ""
    empty = lat["empty-launch"]["event_s"]
    rows = [
        "| 2^20 float32 | event time (us) | x empty launch | back to back (us) | host issue (us) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in lat.items():
        rows.append(
            f"| {label} | {r['event_s'] * 1e6:.1f} | {r['event_s'] / empty:.1f} | "
            f"{r['pipelined_s'] * 1e6:.1f} | {r['host_issue_s'] * 1e6:.1f} |"
        )
    return "\n".join(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench")
    ap.add_argument("--run", help="the gpu_run JSON of the same run (latency, facts)")
    ap.add_argument("--n", type=_n, default=1 << 28)
    args = ap.parse_args(argv)
    with open(args.bench) as f:
        doc = json.load(f)
    dev = doc["device"]
    v = doc["versions"]
    cupy = v.get("cupy-cuda13x") or v.get("cupy-cuda12x") or v.get("cupy")
    print(
        f"{dev.get('gpu')}, n = {args.n:,} float32; CuPy {cupy}"
        f", numba-cuda {v.get('numba-cuda')}, torch {v.get('torch')}; medians of "
        f"{doc['config'].get('reps')} repetitions\n"
    )
    print(throughput_table(doc, args.n))
    print("\nCeilings measured in the same run:\n")
    print(ceiling_lines(doc, args.n))
    if args.run:
        with open(args.run) as f:
            run = json.load(f)
        table = latency_table(run)
        if table:
            print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
