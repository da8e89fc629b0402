"""fastopt's fused Numba CPU step against PyTorch's fused (or foreach) CPU optimizers.

For each optimizer: one float32 FlatBuffer of ``--n`` elements with random params and grads, the
same data copied into a torch tensor with ``.grad`` set, and a second FlatBuffer stepped by the
NumPy oracle. After a warm-up (compilation excluded), the three are timed in interleaved
repetitions in this one process (so machine noise hits them alike); the report gives median
milliseconds per step and the ratios ``torch / numba`` (>1: fastopt is faster) and
``numpy / numba``. torch is only a measuring stick here, never a fastopt dependency.

    python bench/cpu_vs_torch.py --n 10000000 --reps 21 --json bench/results/cpu_vs_torch.json

The optimizers are the benchmark's cases (``fastopt.bench.measure.CASES``, derived from the
registry). torch is run ``fused=True`` where its CPU build has it (Adam, AdamW, SGD, Adagrad),
else ``foreach=True``; an optimizer with no torch counterpart (Lion) reports the oracle ratio
only.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastopt
from fastopt.bench.measure import CASES as BENCH_CASES
from fastopt.bench.torch_peers import modes

__all__ = ["CASES", "main", "run_case"]

#: the benchmark's cases (every optimizer of the registry, and the variants that add traffic;
#: ``fastopt.bench.measure.CASES``): name -> (fastopt class, fastopt kwargs, torch.optim class
#: name or None, torch kwargs); torch's mode (fused where it has it, else foreach) is found at
#: run time
CASES = {
    name: (c.cls, c.fastopt_kwargs, c.torch_cls, dict(c.torch_kwargs))
    for name, c in BENCH_CASES.items()
}
DEFAULT = ("adam", "adamw", "momentum", "adagrad", "rmsprop")


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_case(name, n, reps, numpy_every=3, warmup=3, seed=0):
    """Time one optimizer; returns a dict of raw timings (seconds) and medians (ms)."""
    cls, kw, tcls, tkw = CASES[name]
    usable = modes(BENCH_CASES[name], "cpu") if tcls is not None else []
    if not usable:
        tcls = None
    mode = usable[0] if usable else None
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(n, dtype=np.float32)
    g0 = rng.standard_normal(n, dtype=np.float32)

    bufs, opts = {}, {}
    for backend in ("numba", "numpy"):
        buf = fastopt.FlatBuffer({"w": p0})
        buf.grad[:] = g0
        bufs[backend] = buf
        opts[backend] = getattr(fastopt, cls)(backend=backend, **kw)
    runners = {b: (lambda b=b: opts[b].step(bufs[b])) for b in bufs}

    torch_label = None
    if tcls is not None:
        import torch

        tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
        tp.grad = torch.from_numpy(g0.copy())
        topt = getattr(torch.optim, tcls)([tp], **tkw, **{mode: True})
        runners["torch"] = topt.step
        torch_label = f"torch.optim.{tcls}({mode}=True)"

    for _ in range(warmup):  # compile / load from cache, allocate state
        for b, fn in runners.items():
            if b != "numpy":
                fn()
    runners["numpy"]()

    times = {b: [] for b in runners}
    for r in range(reps):
        order = [b for b in runners if b != "numpy" or r % numpy_every == 0]
        if r % 2:  # alternate who goes first
            order.reverse()
        for b in order:
            times[b].append(_timed(runners[b]))

    med = {b: statistics.median(t) * 1e3 for b, t in times.items()}
    out = {
        "optimizer": name,
        "fastopt": f"fastopt.{cls}({kw})",
        "torch": torch_label,
        "n": n,
        "dtype": "float32",
        "median_ms": med,
        "times_s": times,
        "speedup_vs_numpy": med["numpy"] / med["numba"],
    }
    if "torch" in med:
        out["speedup_vs_torch"] = med["torch"] / med["numba"]
    return out


def _env():
    import numba

    env = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "numba_threads": numba.get_num_threads(),
        "fastopt": fastopt.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0],
    }
    try:
        with open("/proc/cpuinfo") as f:
            env["cpu"] = next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
    except ImportError:
        env["torch"] = None
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10_000_000, help="elements (float32)")
    ap.add_argument("--reps", type=int, default=21, help="timed repetitions (numba and torch)")
    ap.add_argument(
        "--numpy-every",
        type=int,
        default=3,
        help="time the (slow) NumPy oracle on every k-th repetition only",
    )
    ap.add_argument(
        "--optimizers", default=",".join(DEFAULT), help=f"comma-separated, from {','.join(CASES)}"
    )
    ap.add_argument("--json", metavar="PATH", help="also write the raw timings here")
    args = ap.parse_args(argv)
    names = [s.strip() for s in args.optimizers.split(",") if s.strip()]
    bad = [s for s in names if s not in CASES]
    if bad:
        ap.error(f"unknown optimizer(s) {bad}; choose from {list(CASES)}")
    try:
        import torch  # noqa: F401
    except ImportError:
        print(
            "torch is not installed: only the NumPy oracle ratios are reported "
            "(pip install torch==2.13.0 for the comparison)",
            file=sys.stderr,
        )
        names_t = []
    else:
        names_t = names
    env = _env()
    print(
        f"# n={args.n} float32, reps={args.reps}, cpu={env['cpu']}, cores={env['cores']}, "
        f"numba {env['numba']} ({env['numba_threads']} threads), torch {env['torch']}, "
        f"load {env['loadavg_1min']:.2f} (other work on these cores inflates every time)"
    )
    hdr = (
        f"{'optimizer':10} {'numba ms':>9} {'torch ms':>9} {'numpy ms':>9} "
        f"{'torch/numba':>11} {'numpy/numba':>11}  torch variant"
    )
    print(hdr)
    results = []
    for name in names:
        if name not in names_t:
            saved = CASES[name]
            CASES[name] = saved[:2] + (None, None)
        res = run_case(name, args.n, args.reps, args.numpy_every)
        results.append(res)
        m = res["median_ms"]
        tm = f"{m['torch']:9.2f}" if "torch" in m else f"{'-':>9}"
        tr = f"{res['speedup_vs_torch']:10.2f}x" if "torch" in m else f"{'-':>11}"
        print(
            f"{name:10} {m['numba']:9.2f} {tm} {m['numpy']:9.2f} {tr} "
            f"{res['speedup_vs_numpy']:10.1f}x  {res['torch'] or '-'}",
            flush=True,
        )
    env["loadavg_1min_after"] = os.getloadavg()[0]
    print(f"# load after: {env['loadavg_1min_after']:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"env": env, "argv": sys.argv, "results": results}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
