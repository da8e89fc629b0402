"""What the numba CPU loops cost per element when memory is not the limit.

    python bench/cpu_loop_cost.py [--optimizer adam] [--n 65536] [--reps 400] [--rounds 5]
                                  [--cpu znver2] [--bounds]

The serial loop of one optimizer (its default hyperparameters, step 2) in each storage format,
over ``n`` elements that stay in the L2 cache, called ``reps`` times per round; the rounds
interleave the plans (so a busy minute hits them all) and the figure is the median over rounds
of each round's median, in ns per element and core. Plans: float32; bfloat16 params, grads and
state through the element loop and through the word loop (two elements per 32-bit word, what
an aligned all-bfloat16 step runs); float16; bfloat16 with float32 state. A plan whose cost is
above its bytes' time at the machine's bandwidth per core is compute-bound on this CPU.

``--cpu NAME`` compiles the loops for the LLVM CPU ``NAME`` with that CPU's own instruction set
instead of the host's (``NUMBA_CPU_NAME=NAME NUMBA_CPU_FEATURES=""``, then the script runs
again): ``--cpu znver2`` or ``--cpu haswell`` on an AVX-512 host times the AVX2 code an AVX2
machine would run, on this machine's cores (``tests/test_cpu_codegen.py`` checks that such a
build holds no 512-bit register and that its conversions stay packed). The code generator is
printed with the figures.

``--bounds`` adds two word loops that give wrong bits, timed only to show what the exact rounding
costs: one that truncates each result to bfloat16 (no rounding: the word loop's loads, math,
joins and stores alone) and one that rounds to nearest even without the NaN case
(``storage.bf16_store`` less its NaN select). Each is compiled here, never cached.
"""

import argparse
import contextlib
import os
import sys
import time

import numpy as np
from fastopt.kernels import RULES
from fastopt.kernels.storage import IO

from fastopt.backends import numba_backend as nb
from fastopt.backends import numba_codegen, numba_intrinsics

#: plan name -> (storage format or None for plain float32, word loop?)
PLANS = {
    "float32": (None, False),
    "bfloat16 (element loop)": (IO(param="bfloat16", grad="bfloat16", state="bfloat16"), False),
    "bfloat16 (word loop)": (IO(param="bfloat16", grad="bfloat16", state="bfloat16"), True),
    "float16": (IO(param="float16", grad="float16", state="float16"), False),
    "bfloat16, float32 state": (IO(param="bfloat16", grad="bfloat16", state="float32"), False),
}


def _truncated(builder, x):
    # the float32's bits as they are: their high half, truncated, is stored
    return builder.bitcast(x, numba_intrinsics._I32)


def _nearest_even_no_nan(builder, x):
    # numba_intrinsics._bf16_round_ir without the NaN select
    return numba_intrinsics._bf16_nearest_ir(builder, builder.bitcast(x, numba_intrinsics._I32))


#: ``--bounds`` plans (inexact word loops, their names indented under the word loop's row in the
#: table) -> the rounding (``numba_intrinsics._bf16_round_ir``'s signature) compiled into them
BOUNDS = {
    "  word loop, truncated": _truncated,
    "  word loop, no NaN case": _nearest_even_no_nan,
}


@contextlib.contextmanager
def _rounding(ir):
    """``numba_intrinsics._bf16_round_ir`` replaced by ``ir`` (for the loops compiled inside)."""
    real = numba_intrinsics._bf16_round_ir
    numba_intrinsics._bf16_round_ir = ir
    try:
        yield
    finally:
        numba_intrinsics._bf16_round_ir = real


def bound_runner(optimizer, plan, n):
    """``runner`` for a ``--bounds`` plan: the word loop with ``BOUNDS[plan]``'s rounding,
    compiled afresh (no disk cache) and called once."""
    import numba

    rule = RULES[optimizer]
    flags, _ = rule.variant_and_scalars(rule.validate(rule.defaults), 2)
    writes = rule.slots_used(flags)
    io = PLANS["bfloat16 (word loop)"][0]
    py = numba_codegen.python_loop(rule.make_rule(**flags), writes, False, io, pairs=True)
    fn = numba.njit(error_model="numpy")(py)
    with _rounding(BOUNDS[plan]):
        call = runner(optimizer, "bfloat16 (word loop)", n, fn=fn)
        call()
    return call


def _bits(kind, values):
    if kind == "float32":
        return values.astype(np.float32)
    if kind == "float16":
        return values.astype(np.float16).view(np.uint16)
    return ((values.astype(np.float32).view(np.uint32) + 0x8000) >> 16).astype(np.uint16)


def runner(optimizer, plan, n, seed=0, fn=None):
    """A no-argument call of the serial loop of ``optimizer`` in ``plan`` over ``n`` elements
    (``fn``: that loop compiled otherwise)."""
    rule = RULES[optimizer]
    flags, k = rule.variant_and_scalars(rule.validate(rule.defaults), 2)
    writes = rule.slots_used(flags)
    io, pairs = PLANS[plan]
    rng = np.random.default_rng(seed)
    p, g = rng.standard_normal(n), rng.standard_normal(n) * 1e-2
    states = [np.abs(rng.standard_normal(n)) * 1e-3 for _ in writes]
    if io is None:
        fn = nb.kernel(optimizer, flags, writes, False)
        p, g = p.astype(np.float32), g.astype(np.float32)
        st = [s.astype(np.float32) if w else p for s, w in zip(states, writes)]
        kc = tuple(np.float32(x) for x in k)
        return lambda: fn(p, g, *st, kc)
    if fn is None:
        fn = nb.kernel(optimizer, flags, writes, False, io, pairs=pairs)
    p, g = _bits(io.param, p), _bits(io.grad, g)
    st = [_bits(io.state, s) if w else p for s, w in zip(states, writes)]
    kc = tuple(np.float32(x) for x in k)
    x = (np.float32(1), np.int64(0), np.int64(0))
    if pairs:
        p, g = p.view(np.uint32), g.view(np.uint32)
        st = [s.view(np.uint32) if w else p for s, w in zip(st, writes)]
        return lambda: fn(p, g, *st, kc, x)
    return lambda: fn(p, g, *st, p, kc, x)


def codegen():
    """What the loops were compiled for: numba's target CPU and its features."""
    from numba.core import config

    if config.CPU_NAME is None:
        return "compiled for this host's CPU"
    if config.CPU_FEATURES is None:
        return f"compiled for {config.CPU_NAME} with this host's features"
    return f"compiled for {config.CPU_NAME} ({config.CPU_FEATURES or 'its own features'})"


def arguments(doc, argv, reps, bounds=False):
    """The command line both loop-cost scripts take (``bounds``: and ``--bounds``); with ``--cpu``
    the calling script runs again under that code generator (numba reads its target when it is
    imported)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--optimizer", default="adam", choices=sorted(RULES))
    ap.add_argument("--n", type=int, default=1 << 16, help="elements (even; default 65536)")
    ap.add_argument("--reps", type=int, default=reps, help="calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--cpu",
        help="compile for this LLVM CPU (e.g. znver2, haswell: AVX2) with its own features",
    )
    if bounds:
        ap.add_argument(
            "--bounds",
            action="store_true",
            help="also time the word loop truncating, and rounding without the NaN case (inexact)",
        )
    args = ap.parse_args(argv)
    if args.cpu and os.environ.get("NUMBA_CPU_NAME") != args.cpu:
        env = dict(os.environ, NUMBA_CPU_NAME=args.cpu, NUMBA_CPU_FEATURES="")
        args_in = sys.argv[1:] if argv is None else list(argv)
        os.execve(sys.executable, [sys.executable, os.path.abspath(sys.argv[0]), *args_in], env)
    return args


def time_plans(calls, args):
    """Each plan's calls timed in rounds that interleave the plans; prints the table: the
    median over rounds of each round's median, ns per element, and the ratio to float32."""
    res = {plan: [] for plan in calls}
    for r in range(args.rounds):
        for plan, call in calls.items():
            ts = []
            for _ in range(args.reps):
                t = time.perf_counter()
                call()
                ts.append(time.perf_counter() - t)
            res[plan].append(float(np.median(ts)))
        print(f"round {r + 1}/{args.rounds}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n{args.optimizer}, serial loop, n={args.n}, load average {load:.2f}, {codegen()}")
    base = np.median(res["float32"])
    for plan, v in res.items():
        t = np.median(v)
        print(f"  {plan:26s} {t * 1e9 / args.n:6.3f} ns/element  ({t / base:.2f}x float32's time)")
    return res


def main(argv=None):
    args = arguments(__doc__, argv, reps=400, bounds=True)
    calls = {}
    for plan in PLANS:
        print(f"compiling {plan} ...", flush=True)
        calls[plan] = runner(args.optimizer, plan, args.n)
        calls[plan]()
        if plan == "bfloat16 (word loop)" and args.bounds:
            for bound in BOUNDS:
                print(f"compiling {bound.strip()} (inexact) ...", flush=True)
                calls[bound] = bound_runner(args.optimizer, bound, args.n)
    return time_plans(calls, args)


if __name__ == "__main__":
    main()
