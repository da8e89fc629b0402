"""Run the pytest-benchmark suite and write its results in fastopt's result schema.

    python bench/run_suite.py                # whole suite -> bench/results/suite-<date>.json
    python bench/run_suite.py --out r.json -- -k "adam and float32"   # args after -- go to pytest

pytest-benchmark's own JSON (kept next to the output as ``*.pytest-benchmark.json``) becomes
``{"device", "versions", "records"}`` like ``fastopt bench --json``: one record per benchmark
with optimizer, backend, dtype, n, median_s, bytes, gbps, ceiling_gbps, copy_gbps, the raw
per-round timings and the × NumPy / × torch ratios.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

__all__ = ["convert", "main"]


def convert(raw):
    """pytest-benchmark JSON (a dict) -> fastopt's result schema (a dict)."""
    from fastopt.bench.groups import finalize
    from fastopt.bench.measure import device_info, percent, versions

    records = []
    for b in raw["benchmarks"]:
        info, stats = b["extra_info"], b["stats"]
        med = stats["median"]
        rec = {
            "optimizer": info["optimizer"],
            "backend": info["backend"],
            "device": info["device"],
            "layout": info.get("layout", "flat"),
            "n_tensors": info.get("n_tensors", 1),
            "dtype": info["dtype"],
            "n": info["n"],
            "reps": stats["rounds"],
            "median_s": med,
            "min_s": stats["min"],
            "times_s": stats.get("data", []),
            "bytes": info["bytes"],
            "gbps": info["bytes"] / med / 1e9,
            "ceiling_backend": info["ceiling_backend"],
            "ceiling_gbps": info["ceiling_gbps"],
            "copy_gbps": info["copy_gbps"],
            "test": b["fullname"],
        }
        rec["pct_of_ceiling"] = percent(rec["gbps"], rec["ceiling_gbps"])
        if "peer" in info:
            rec["peer"] = info["peer"]
        records.append(rec)
    gpu = None
    if any(r["device"] == "cuda" for r in records):
        from fastopt.bench.gpu import gpu_name

        gpu = gpu_name()
    return {
        "schema": "fastopt-bench/1",
        "created": raw.get("datetime"),
        "command": "python bench/run_suite.py",
        "source": "pytest-benchmark " + str(raw.get("version")),
        "device": device_info(gpu),
        "versions": versions(),
        "records": finalize(records),
    }


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    command = " ".join(["python", "bench/run_suite.py", *argv])
    extra = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    date = datetime.date.today().isoformat()
    ap.add_argument(
        "--out",
        default=os.path.join(HERE, "results", f"suite-{date}.json"),
        help="where to write the converted results (default: %(default)s)",
    )
    args = ap.parse_args(argv)
    raw_path = os.path.splitext(args.out)[0] + ".pytest-benchmark.json"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        os.path.join(HERE),
        "-q",
        f"--benchmark-json={raw_path}",
        *extra,
    ]
    print("+", " ".join(cmd), file=sys.stderr)
    rc = subprocess.call(cmd, cwd=ROOT)
    if not os.path.exists(raw_path):
        print("run_suite: pytest wrote no benchmark JSON", file=sys.stderr)
        return rc or 1
    with open(raw_path) as f:
        doc = convert(json.load(f))
    doc["command"] = command
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(f"run_suite: {len(doc['records'])} records -> {args.out}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
