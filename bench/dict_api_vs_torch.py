"""The dict API's host cost, side by side: ``update()`` against torch.optim and textbook NumPy.

Two cases, Adam (lr=1e-3) in float32, each timed in interleaved repetitions in one process
(so machine noise hits every contender alike); the report gives median milliseconds per step.

``many``: ``opt.update(params, grads)`` over 2,000 arrays of 256 values (fastopt, numba backend)
against ``torch.optim.Adam(fused=True).step()`` over the same 2,000 tensors (``.grad`` set once).
fastopt is timed twice: with the same grad arrays every step (as torch's ``.grad``), and with a
new set of grad arrays every step (what a backward pass that returns fresh arrays gives).

``mlp``: the 10 arrays of a 784-41-41-41-41-10 MLP (W1 784x41, b1, W2..W4 41x41, b2..b4,
W5 41x10, b5: 37,771 weights): ``update()``, ``step(buf)`` on the same arrays packed in a
``FlatBuffer``, the textbook NumPy Adam (``m += (1-b1)*(g-m); v += (1-b2)*(g*g-v);
p -= lr_t*m/(sqrt(v)+eps)`` over the dict) and torch's fused Adam.

    python bench/dict_api_vs_torch.py --reps 201 --json bench/results/dict_api.json

``bench/test_bench_dict_api.py`` runs the same contenders under pytest-benchmark.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import fastopt

__all__ = ["MLP_SHAPES", "TextbookAdam", "case_arrays", "contenders", "main", "measure"]

LR = 1e-3

#: a 784-41-41-41-41-10 MLP: 10 arrays, 37,771 weights
MLP_SHAPES = {
    "W1": (784, 41),
    "b1": (41,),
    "W2": (41, 41),
    "b2": (41,),
    "W3": (41, 41),
    "b3": (41,),
    "W4": (41, 41),
    "b4": (41,),
    "W5": (41, 10),
    "b5": (10,),
}


class TextbookAdam:
    """The textbook chapter's Adam, verbatim in NumPy (the code the dict API replaces)."""

    def __init__(self, lr=LR, beta1=0.9, beta2=0.999):
        self.lr, self.beta1, self.beta2 = lr, beta1, beta2
        self.iter, self.m, self.v = 0, None, None

    def update(self, params, grads):
        if self.m is None:
            self.m = {k: np.zeros_like(v) for k, v in params.items()}
            self.v = {k: np.zeros_like(v) for k, v in params.items()}
        self.iter += 1
        lr_t = self.lr * np.sqrt(1.0 - self.beta2**self.iter) / (1.0 - self.beta1**self.iter)
        for key in params:
            self.m[key] += (1 - self.beta1) * (grads[key] - self.m[key])
            self.v[key] += (1 - self.beta2) * (grads[key] ** 2 - self.v[key])
            params[key] -= lr_t * self.m[key] / (np.sqrt(self.v[key]) + 1e-7)


def case_arrays(case, seed=0):
    """``(params, [grads, grads])`` of a case: two sets of grad arrays, to alternate."""
    rng = np.random.default_rng(seed)
    shapes = {f"p{i}": (256,) for i in range(2000)} if case == "many" else MLP_SHAPES
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    grads = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()} for _ in range(2)
    ]
    return params, grads


def contenders(case, with_torch=True):
    """name -> a zero-argument callable that makes one optimizer step of ``case``."""
    params, grads = case_arrays(case)
    out = {}
    p_same = {k: v.copy() for k, v in params.items()}
    opt_same = fastopt.Adam(lr=LR, backend="numba")
    out["fastopt update (same grads)"] = lambda: opt_same.update(p_same, grads[0])
    p_new = {k: v.copy() for k, v in params.items()}
    opt_new = fastopt.Adam(lr=LR, backend="numba")
    flip = [0]

    def update_new_grads():
        flip[0] ^= 1
        opt_new.update(p_new, grads[flip[0]])

    out["fastopt update (new grads)"] = update_new_grads
    if case == "mlp":
        buf = fastopt.FlatBuffer(params)
        for k, g in grads[0].items():
            buf.grads[k][...] = g
        opt_flat = fastopt.Adam(lr=LR, backend="numba")
        out["fastopt step(buf)"] = lambda: opt_flat.step(buf)
        p_book = {k: v.copy() for k, v in params.items()}
        book = TextbookAdam()
        out["textbook NumPy Adam"] = lambda: book.update(p_book, grads[0])
    if with_torch:
        try:
            import torch
        except ImportError:
            return out
        tps = [torch.nn.Parameter(torch.from_numpy(v.copy())) for v in params.values()]
        for t, g in zip(tps, grads[0].values()):
            t.grad = torch.from_numpy(g.copy())
        topt = torch.optim.Adam(tps, lr=LR, fused=True)
        out["torch.optim.Adam(fused=True)"] = topt.step
    return out


def measure(fns, reps, warmup=5):
    """Interleaved repetitions (the order alternates); returns name -> list of seconds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for r in range(reps):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=101, help="timed repetitions per contender")
    ap.add_argument("--cases", default="many,mlp", help="comma-separated: many, mlp")
    ap.add_argument("--no-torch", action="store_true", help="leave torch.optim out")
    ap.add_argument("--json", metavar="PATH", help="also write the raw timings here")
    args = ap.parse_args(argv)
    load = os.getloadavg()
    print(
        f"# Adam float32, reps={args.reps}, cores={os.cpu_count()}, numpy {np.__version__}, "
        f"fastopt {fastopt.__version__}, load average {load[0]:.2f} {load[1]:.2f} "
        f"{load[2]:.2f}"
    )
    results = {}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        times = measure(contenders(case, not args.no_torch), args.reps)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        results[case] = {"median_ms": med, "times_s": times}
        title = (
            "2,000 arrays x 256"
            if case == "many"
            else "784-41-41-41-41-10 MLP, 10 arrays, 37,771 weights"
        )
        print(f"\n{case}: {title}")
        for name, ms in med.items():
            print(f"  {name:32} {ms:9.3f} ms")
    after = os.getloadavg()
    print(f"\n# load average after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(
                {
                    "loadavg_before": load,
                    "loadavg_after": after,
                    "reps": args.reps,
                    "results": results,
                },
                f,
                indent=1,
            )
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
