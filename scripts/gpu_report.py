"""Markdown tables from a recorded GPU run (``bench/results/gpu-*.json``), for the README and
``bench/GPU_NOTES.md``: every figure is read from the recorded JSON (or derived from it by the
arithmetic shown beside it), none is typed by hand.

    python3 scripts/gpu_report.py bench/results/gpu-h200-2026-11-26-run3.json \
        [--run bench/results/gpu-run-h200-2026-11-26-run3.json] [--n 2^28]

Every percentage is of a ceiling measured in the same group as the row (never a median pooled
over groups), every ratio compares the same work (the same tensors, the same bytes), and every
figure carries its spread: the range of its timed calls, and for a ratio of two rows timed in
the same interleaved rounds the range of its per-round values. Runs recorded before the
measurement moved to interleaved rounds (schema ``fastopt-bench/1``) timed each runner's
repetitions back to back, one runner after another: their ranges are those repetitions', and a
ratio's range is the bounds the two rows' ranges allow (slowest over fastest each way). In
those runs the CuPy rows' same-traffic kernel is the float-typed vectorised one
(``ceiling_vec_gbps``), which read every state buffer, and the copy is ``cupy.copyto`` (a copy
kernel, not a memcpy); their "own" ceilings (a CuPy ElementwiseKernel and numba-cuda's scalar
loop) are shown as references only: the optimizers beat them.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

#: the fastopt rows of the throughput table (one flat buffer)
FLAT_BACKENDS = ("cupy", "numba-cuda", "cupy-elementwise")


def _n(text):
    return int(text.split("^")[0]) ** int(text.split("^")[1]) if "^" in text else int(text)


def _fmt_n(n):
    return f"2^{n.bit_length() - 1}" if n & (n - 1) == 0 else str(n)


def _pct(x, digits=0):
    return "-" if x is None else f"{x:.{digits}f}"


def interleaved(doc):
    """Whether the run timed its groups in interleaved rounds (schema 2 on)."""
    return doc.get("schema", "fastopt-bench/1") != "fastopt-bench/1"


def _times(r):
    """(min, max) seconds of a record's timed calls."""
    if r.get("spread"):
        return r["spread"]["min_s"], r["spread"]["max_s"]
    t = r.get("times_s") or [r["median_s"]]
    return min(t), max(t)


def gbps_range(r):
    """``"3925 (3895-3944)"``: GB/s of the median, and of the slowest and fastest call."""
    lo, hi = _times(r)
    gb = r["bytes"] / 1e9
    return f"{r['gbps']:.0f} ({gb / hi:.0f}-{gb / lo:.0f})"


def ratio_text(value, spread, digits=2):
    if value is None:
        return "-"
    text = f"{value:.{digits}f}"
    if spread:
        text += f" ({spread['min']:.{digits}f}-{spread['max']:.{digits}f})"
    return text


def _group_key(r):
    """The group a record was measured in: its id (schema 2), else (step, optimizer, n, dtype)
    (schema 1: one group per optimizer, size and step)."""
    return r.get("group") or (r.get("step"), r["optimizer"], r["n"], r["dtype"])


def _groups(doc):
    out = {}
    for r in doc["records"]:
        out.setdefault(_group_key(r), []).append(r)
    return out


def group_ceiling(r, group):
    """(same-traffic GB/s, its bytes, copy GB/s, copy label) of the group ``r`` was measured
    in. Schema 1: the CuPy row's vectorised kernel and ``cupy.copyto`` of that group serve every
    row of the group (the numba-cuda rows' own were scalar kernels, no ceilings)."""
    if r.get("ceiling_kind"):
        copy = r.get("memcpy_gbps")
        return r["ceiling_gbps"], r.get("ceiling_bytes"), copy, r.get("copy_kind")
    cupy = next((x for x in group if x["backend"] == "cupy" and x.get("ceiling_vec_gbps")), None)
    if cupy is None:
        return None, None, None, None
    return cupy["ceiling_vec_gbps"], None, cupy.get("copy_gbps"), "cupy.copyto kernel"


def _rated(doc):
    from fastopt.bench.gpu import rated_bandwidth

    bw, source = rated_bandwidth((doc.get("device") or {}).get("gpu"))
    return (None if bw is None else bw / 1e9), source


def _model_bytes(r):
    """Bytes per element the byte model counts today for the record's optimizer (float32 flat
    rows), or None when the optimizer is not a case any more."""
    from fastopt.bench.measure import CASES, bytes_per_step

    case = CASES.get(r["optimizer"])
    if case is None or r["dtype"] not in ("float32", "float64"):
        return None
    return bytes_per_step(case.n_state, 1, r["dtype"], n_read=case.n_read)


def throughput_table(doc, n, steps=("headline", "sweep")):
    """One row per (optimizer, fastopt backend) on one flat buffer at size ``n``: GB/s with
    its range, the same-traffic kernel and the copy of the row's own group, % of each, % of
    the rated bandwidth, and × torch fused on one flat tensor of the same group (the same
    work). Returns (markdown, notes)."""
    rated, _ = _rated(doc)
    groups = _groups(doc)
    new = interleaved(doc)
    copy_head = "memcpy D2D" if new else "copy (cupy.copyto)"
    rows = [
        f"| optimizer | backend | B/elem | GB/s (range) | same-traffic kernel, its group, GB/s "
        f"| % of it | {copy_head}, GB/s | % of it | % of rated | x torch fused, 1 tensor |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    seen = set()
    for r in doc["records"]:
        if (
            r["n"] != n
            or r.get("step", "sweep") not in steps
            or r["backend"] not in FLAT_BACKENDS
            or r.get("layout", "flat") != "flat"
            or (r["optimizer"], r["backend"]) in seen
        ):
            continue
        seen.add((r["optimizer"], r["backend"]))
        group = groups[_group_key(r)]
        ceil, _ceil_bytes, copy, _ = group_ceiling(r, group)
        torch = next(
            (x for x in group if x["backend"] == "torch-fused" and x["layout"] == "flat"), None
        )
        x_torch = None if torch is None else torch["median_s"] / r["median_s"]
        if new:
            spread = r.get("speedup_vs_torch_spread")
        elif torch is not None:  # not paired by round: the bounds of the two rows' ranges
            (tlo, thi), (olo, ohi) = _times(torch), _times(r)
            spread = {"min": tlo / ohi, "max": thi / olo}
        else:
            spread = None
        per = r["bytes"] // r["n"]
        rows.append(
            f"| {r['optimizer']} | {r['backend']} | {per} | {gbps_range(r)} | "
            f"{_pct(ceil)} | {_pct(None if not ceil else 100 * r['gbps'] / ceil, 1)} | "
            f"{_pct(copy)} | {_pct(None if not copy else 100 * r['gbps'] / copy)} | "
            f"{_pct(None if not rated else 100 * r['gbps'] / rated)} | "
            f"{ratio_text(x_torch, spread)} |"
        )
        model = _model_bytes(r)
        if model is not None and model != per:
            gbps = model * r["n"] / r["median_s"] / 1e9
            notes.append(
                f"{r['optimizer']} ({r['backend']}): recorded at {per} B/element; the byte "
                f"model now counts {model} B/element for it (the rule spec says which state a "
                f"step reads), so the same time is {gbps:.0f} GB/s"
                + (
                    f", {100 * gbps / ceil:.1f} % of a same-traffic kernel that moved "
                    f"{per} B/element (not the same traffic)"
                    if ceil and not new
                    else ""
                )
            )
    return "\n".join(rows), notes


def pct_summary(doc, n, backend="cupy", steps=("headline", "sweep")):
    """The range of % of the group's same-traffic kernel over the optimizers at their
    defaults (the registry's classes) on ``backend`` at ``n``: (lo, hi, {optimizer: %})."""
    from fastopt.optimizers import CLASSES

    defaults = {c.lower() for c in CLASSES}
    groups = _groups(doc)
    pct = {}
    for r in doc["records"]:
        if (
            r["n"] == n
            and r["backend"] == backend
            and r["optimizer"] in defaults
            and r.get("step", "sweep") in steps
        ):
            ceil = group_ceiling(r, groups[_group_key(r)])[0]
            if ceil:
                pct.setdefault(r["optimizer"], 100 * r["gbps"] / ceil)
    if not pct:
        return None
    return min(pct.values()), max(pct.values()), pct


def reference_lines(doc, n):
    """The kernels that were measured as ceilings once and are references only: what they
    reached and how far the optimizers' rows went past them."""
    lines = []
    if interleaved(doc):
        for r in doc["records"]:
            if r["n"] == n and r.get("role") == "reference":
                lines.append(
                    f"- {r['reference_kind']} ({r['backend']}, {r['optimizer']}'s traffic): "
                    f"{gbps_range(r)} GB/s, {_pct(r.get('pct_of_ceiling'))} % of the group's "
                    "same-traffic kernel"
                )
        return "\n".join(lines)
    copies = {}
    for r in doc["records"]:
        if r["n"] == n and r["backend"] in ("cupy", "numba-cuda") and r.get("copy_gbps"):
            copies.setdefault(r["backend"], []).append(r["copy_gbps"])
    if copies:
        what = {
            "cupy": "cupy.copyto (a copy kernel)",
            "numba-cuda": "numba-cuda's scalar copy loop",
        }
        lines.append(
            "- copies measured in each group: "
            + "; ".join(
                f"{what[b]} {min(v):.0f}-{max(v):.0f} GB/s across {len(v)} groups"
                for b, v in copies.items()
            )
        )
    label = {
        "cupy": "CuPy ElementwiseKernel same-traffic kernel (one multiply-add per buffer)",
        "numba-cuda": "numba-cuda scalar same-traffic loop",
    }
    for backend, what in label.items():
        pct = {
            r["optimizer"]: r["pct_of_ceiling"]
            for r in doc["records"]
            if r["n"] == n
            and r["backend"] == backend
            and r.get("ceiling_backend") == backend
            and r.get("pct_of_ceiling")
        }
        if pct:
            top = max(pct, key=pct.get)
            lines.append(
                f"- {what}, measured in each group as {backend}'s 'own ceiling': the "
                f"{backend} rows reach {min(pct.values()):.0f}-{max(pct.values()):.0f} % of it "
                f"(most: {top}): no ceiling"
            )
    return "\n".join(lines)


def torch_list_penalty(doc, mode="torch-fused"):
    """torch's own step on the transformer's list against its step on one flat tensor of the
    same size, in the same group (the same bytes in both)."""
    rows = [
        "| n | tensors | one tensor, ms (range) | the list, ms (range) | list over one tensor |",
        "|---|---:|---:|---:|---:|",
    ]
    pairs = []
    for group in _groups(doc).values():
        flat = next((r for r in group if r["backend"] == mode and r["layout"] == "flat"), None)
        lst = next((r for r in group if r["backend"] == mode and r["layout"] == "list"), None)
        if flat is None or lst is None or flat["optimizer"] != "adam":
            continue
        if flat["dtype"] == "float32":
            pairs.append((flat["n"], flat, lst))
    for _, flat, lst in sorted(pairs, key=lambda x: x[0]):
        fr, lr = _times(flat), _times(lst)
        rows.append(
            f"| {_fmt_n(flat['n'])} | {lst['n_tensors']} | {flat['median_s'] * 1e3:.3f} "
            f"({fr[0] * 1e3:.3f}-{fr[1] * 1e3:.3f}) | {lst['median_s'] * 1e3:.3f} "
            f"({lr[0] * 1e3:.3f}-{lr[1] * 1e3:.3f}) | {lst['median_s'] / flat['median_s']:.2f} |"
        )
    found = bool(pairs)
    return "\n".join(rows) if found else ""


def torch_list_table(doc):
    """The ``fastopt.torch`` rows over the list (step torch-list): against torch fused on the
    same list and fastopt's flat step in the same group."""
    recs = [
        r
        for r in doc["records"]
        if r.get("step") == "torch-list" and r["backend"] == "fastopt.torch"
    ]
    if not recs:
        return ""
    rows = [
        "| n | storage | tensors | GB/s (range) | x torch fused, same list | % of the flat "
        "step's GB/s | % of same-traffic kernel |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in recs:
        rows.append(
            f"| {_fmt_n(r['n'])} | {r['dtype']} | {r['n_tensors']} | {gbps_range(r)} | "
            f"{ratio_text(r.get('speedup_vs_torch'), r.get('speedup_vs_torch_spread'))} | "
            f"{ratio_text(r.get('pct_of_flat'), r.get('pct_of_flat_spread'), 0)} | "
            f"{_pct(r.get('pct_of_ceiling'))} |"
        )
    return "\n".join(rows)


def step_table(doc, step, fields):
    """Every record of ``step`` with its time and the ratios ``fields`` ([(key, label)])."""
    recs = [r for r in doc["records"] if r.get("step") == step]
    if not recs:
        return ""
    head = "| n | row | tensors | ms (range) | " + " | ".join(lab for _, lab in fields) + " |"
    rows = [head, "|---|---|---:|---:|" + "---:|" * len(fields)]
    for r in recs:
        lo, hi = _times(r)
        name = r["backend"] + (f", {r['variant']}" if r.get("variant") else "")
        rows.append(
            f"| {_fmt_n(r['n'])} | {name} | {r['n_tensors']} | {r['median_s'] * 1e3:.3f} "
            f"({lo * 1e3:.3f}-{hi * 1e3:.3f}) | "
            + " | ".join(ratio_text(r.get(k), r.get(k + "_spread")) for k, _ in fields)
            + " |"
        )
    return "\n".join(rows)


def sync_lines(doc):
    return "\n".join(
        f"- {r['backend']} over {r['n_tensors']} tensors, GradScaler: {r['per_step']} host "
        f"synchronisations per steady step; sync debug mode 'error': {r['error_mode']}"
        for r in doc.get("syncs", [])
    )


def latency_table(run):
    lat = run["steps"].get("latency", {}).get("result", {}).get("runs")
    if not lat:
        return ""
    from fastopt.bench.measure import spread

    empty = lat["empty-launch"]["event_s"]
    calls = len(lat["empty-launch"]["event_times_s"])
    rows = [
        f"| 2^20 float32 | event time, us (IQR of {calls} calls) | x empty launch | back to "
        "back, us (range) | host issue, us |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, r in lat.items():
        ev = r.get("event_spread") or spread(r["event_times_s"])
        pp = r.get("pipelined_spread") or spread(r["pipelined_times_s"])
        rows.append(
            f"| {label} | {ev['median_s'] * 1e6:.1f} "
            f"({ev['q1_s'] * 1e6:.1f}-{ev['q3_s'] * 1e6:.1f}) | {r['event_s'] / empty:.1f} | "
            f"{pp['median_s'] * 1e6:.1f} ({pp['min_s'] * 1e6:.1f}-{pp['max_s'] * 1e6:.1f}) | "
            f"{r['host_issue_s'] * 1e6:.1f} |"
        )
    return "\n".join(rows)


def report(doc, n, run=None, source=None):
    """The whole report as markdown text."""
    dev = doc["device"]
    v = doc["versions"]
    cupy = v.get("cupy-cuda13x") or v.get("cupy-cuda12x") or v.get("cupy")
    rated, rated_source = _rated(doc)
    how = (
        "timed in interleaved rounds (every figure: median, and the range of its timed calls)"
        if interleaved(doc)
        else f"medians of {doc['config'].get('reps')} repetitions timed back to back, one "
        "runner after another (not interleaved); ranges: those repetitions' fastest and slowest"
    )
    facts = ((run or {}).get("steps", {}).get("facts") or {}).get("result") or {}
    driver = f", driver {facts['driver']}" if facts.get("driver") else ""
    out = [
        f"{dev.get('gpu')}{driver}, n = {n:,} float32; CuPy {cupy}, numba-cuda "
        f"{v.get('numba-cuda')}, torch {v.get('torch')}; {how}."
        + (f" Source: `{source}`." if source else ""),
        "",
    ]
    if rated:
        out += [f"Rated bandwidth: {rated:.0f} GB/s ({rated_source}; not measured).", ""]
    table, notes = throughput_table(doc, n)
    out.append(table)
    summ = pct_summary(doc, n)
    if summ:
        lo, hi, pct = summ
        below = ", ".join(f"{k} {v:.1f}" for k, v in sorted(pct.items(), key=lambda x: x[1]))
        out += [
            "",
            f"CuPy, the {len(pct)} optimizers at their defaults: {lo:.1f}-{hi:.1f} % of their "
            f"group's same-traffic kernel ({below}).",
        ]
    if notes:
        out += ["", "Byte counts:", ""] + [f"- {x}" for x in notes]
    refs = reference_lines(doc, n)
    if refs:
        out += ["", "References measured in the same groups (not ceilings):", "", refs]
    pen = torch_list_penalty(doc)
    if pen:
        out += [
            "",
            "torch's fused Adam on the transformer's list against one flat tensor of the same "
            "size (torch against itself: the same bytes):",
            "",
            pen,
        ]
    for title, text in (
        ("fastopt.torch over the list", torch_list_table(doc)),
        (
            "Graph-replayed steps at 2^20",
            step_table(
                doc,
                "graph",
                [("x_flat_graph", "x the flat graph step"), ("speedup_vs_torch", "x torch")],
            ),
        ),
        (
            "Clipping inside the step",
            step_table(
                doc,
                "clip",
                [("x_unclipped", "x unclipped"), ("speedup_vs_torch", "x torch clip + fused")],
            ),
        ),
        (
            "Low-bit state",
            step_table(
                doc,
                "lowbit",
                [
                    ("speedup_vs_float32_state", "x float32 state"),
                    ("speedup_vs_bitsandbytes", "x bitsandbytes"),
                ],
            ),
        ),
        ("Host synchronisations with GradScaler", sync_lines(doc)),
    ):
        if text:
            out += ["", f"{title}:", "", text]
    if run is not None:
        table = latency_table(run)
        if table:
            out += ["", table]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bench")
    ap.add_argument("--run", help="the gpu_run JSON of the same run (latency, facts)")
    ap.add_argument("--n", type=_n, default=1 << 28)
    args = ap.parse_args(argv)
    with open(args.bench) as f:
        doc = json.load(f)
    run = None
    if args.run:
        with open(args.run) as f:
            run = json.load(f)
    print(report(doc, args.n, run, source=args.bench))
    return 0


if __name__ == "__main__":
    sys.exit(main())
