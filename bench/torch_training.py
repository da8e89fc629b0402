"""fastopt.torch in a PyTorch training loop on the CPU, against torch.optim's fused step.

Two measurements, each timed side by side in one process (interleaved blocks, medians):

- **training iteration**: forward, backward and the optimizer step of an MLP of about 3.7M
  parameters (512-2048-1280-10, batch 128), with ``fastopt.torch.Adam`` and with
  ``torch.optim.Adam(fused=True)``: what a training loop sees, Numba's and torch's thread pools
  both at work;
- **the step alone** over the ~200 parameter tensors of a small transformer of the same size
  (``fastopt.bench.measure.transformer_shapes``), in float32 and in bfloat16 (``--step-dtypes``:
  parameters, gradients and state in that dtype, as torch's fused Adam keeps a bf16 model), and
  for NAdam and ASGD in float32 (``--step-optimizers``; torch's fused version where it has
  one, else foreach).

    python bench/torch_training.py --reps 21 --json bench/results/torch_training.json
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import itertools

import torch

import fastopt.torch as fot
from fastopt.bench import torch_peers
from fastopt.bench.measure import CASES, device_info, transformer_shapes, versions

SIZES = (512, 2048, 1280, 10)
BATCH = 128


def _mlp(seed):
    torch.manual_seed(seed)
    layers = []
    for a, b in itertools.pairwise(SIZES):
        layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _iteration(model, opt, x, y):
    def run():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return run


def _step_only(params, opt):
    return opt.step


def _time(fns, reps, block=3):
    """Interleaved blocks of ``block`` calls per runner; returns seconds per call."""
    times = {k: [] for k in fns}
    for r in range(reps):
        order = list(fns) if r % 2 == 0 else list(reversed(list(fns)))
        for k in order:
            for _ in range(block):
                t0 = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t0)
    return times


def _torch_best(name, ps):
    """``(mode, optimizer)``: torch.optim's ``name`` over ``ps``, fused where this torch has a
    fused CPU version of it, else foreach (the benchmark's own choice of torch peer,
    ``torch_peers.modes``)."""
    (mode,) = torch_peers.modes(CASES[name.lower()], "cpu")
    return mode, getattr(torch.optim, name)(ps, lr=1e-3, **{mode: True})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument(
        "--step-dtypes",
        default="float32,bfloat16",
        help="dtypes of Adam's step-alone lists (comma-separated; default float32,bfloat16)",
    )
    ap.add_argument(
        "--step-optimizers",
        default="NAdam,ASGD",
        help="more optimizers (torch.optim names) timed alone over the float32 list, each "
        "against torch's fused version where it has one, else foreach (default NAdam,ASGD)",
    )
    args = ap.parse_args(argv)
    step_dtypes = [getattr(torch, d.strip()) for d in args.step_dtypes.split(",") if d.strip()]
    step_optimizers = [o.strip() for o in args.step_optimizers.split(",") if o.strip()]
    load0 = os.getloadavg()[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, SIZES[0], generator=g)
    y = torch.randint(0, SIZES[-1], (BATCH,), generator=g)

    models = {"fastopt.torch.Adam": _mlp(1), "torch.optim.Adam(fused=True)": _mlp(1)}
    n_params = sum(p.numel() for p in next(iter(models.values())).parameters())
    opts = {
        "fastopt.torch.Adam": fot.Adam(models["fastopt.torch.Adam"].parameters(), lr=1e-3),
        "torch.optim.Adam(fused=True)": torch.optim.Adam(
            models["torch.optim.Adam(fused=True)"].parameters(), lr=1e-3, fused=True
        ),
    }
    train = {k: _iteration(models[k], opts[k], x, y) for k in models}
    for fn in train.values():  # warm-up: compile / load the kernels, allocate state
        for _ in range(3):
            fn()

    shapes = transformer_shapes(n_params)

    def params(dtype):
        torch.manual_seed(2)
        ps = [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p) * 1e-2
        return ps

    steps = {}  # name -> {label: step}, fastopt.torch's first
    # "step" is Adam's in float32 (the key earlier results used), "step-<dtype>" another
    # dtype's, "step-<optimizer>" another optimizer's in float32
    for dtype in step_dtypes:
        name = "step" if dtype is torch.float32 else f"step-{str(dtype).split('.')[-1]}"
        steps[name] = {
            "fastopt.torch.Adam": fot.Adam(params(dtype), lr=1e-3).step,
            "torch.optim.Adam(fused=True)": torch.optim.Adam(
                params(dtype), lr=1e-3, fused=True
            ).step,
        }
    for opt_name in step_optimizers:
        mode, peer = _torch_best(opt_name, params(torch.float32))
        steps[f"step-{opt_name}"] = {
            f"fastopt.torch.{opt_name}": getattr(fot, opt_name)(
                params(torch.float32), lr=1e-3
            ).step,
            f"torch.optim.{opt_name}({mode}=True)": peer.step,
        }
    for fns in steps.values():
        for fn in fns.values():
            for _ in range(3):
                fn()

    t_train = _time(train, args.reps)
    t_steps = {name: _time(fns, args.reps) for name, fns in steps.items()}
    med = {"iteration": {k: statistics.median(v) for k, v in t_train.items()}}
    for name, t in t_steps.items():
        med[name] = {k: statistics.median(v) for k, v in t.items()}
    load1 = os.getloadavg()[0]
    print(
        f"# MLP {'-'.join(map(str, SIZES))} ({n_params:,} params), batch {BATCH}; step-only list "
        f"of {len(shapes)} tensors; torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads); load {load0:.2f} -> {load1:.2f}"
    )
    for what, m in med.items():
        (fl, f), (tl, t) = m.items()
        print(
            f"{what:<14} {fl} {f * 1e3:8.2f} ms  {tl} {t * 1e3:8.2f} ms  "
            f"torch/fastopt {t / f:5.2f}x"
        )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "device": device_info(),
                    "versions": versions(),
                    "n_params": n_params,
                    "n_tensors_step": len(shapes),
                    "batch": BATCH,
                    "reps": args.reps,
                    "loadavg": [load0, load1],
                    "median_s": med,
                    "times_s": {"iteration": t_train, **t_steps},
                },
                fh,
                indent=1,
            )
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
