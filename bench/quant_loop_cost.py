"""What the numba CPU loop of a step with quantized state costs per element, beside float32.

    python bench/quant_loop_cost.py [--optimizer adam] [--n 65536] [--reps 200] [--rounds 5]
                                    [--cpu znver2]

As ``bench/cpu_loop_cost.py``, whose command line and timing it takes (serial loops over ``n``
elements in the L2 cache, rounds that interleave the plans, the median over rounds of each
round's median, ns per element and core; ``--cpu`` compiles for an LLVM CPU with its own
instruction set, e.g. AVX2 on an AVX-512 host). Plans: float32 state; int8 state as the loops
run it (decode by lookup, ``kernels.quant.CODECS``; encode by arithmetic, ``FAST_ENCODE``);
int8 state encoded by the lookup (``LOOKUP_ENCODE``: the loops before the arithmetic encode);
int8 state decoded by arithmetic (``ARITHMETIC_DECODE``); float8 state (arithmetic both ways);
int4 state as the loops run it (decode by lookup, encode by comparisons, ``FAST_ENCODE``) and
encoded by the lookup (``LOOKUP_ENCODE``: the loops before the comparisons).
"""

import sys
from pathlib import Path

import numpy as np
from fastopt.kernels import RULES, quant
from fastopt.kernels.storage import IO

from fastopt import _quantized as Q
from fastopt.backends import numba_backend as nb
from fastopt.backends import numba_quant as nq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_loop_cost import arguments, time_plans  # this directory's script

PLANS = (
    "float32",
    "int8",
    "int8 (encode by lookup)",
    "int8 (decode by arithmetic)",
    "float8_e4m3",
    "int4",
    "int4 (encode by lookup)",
)


def runner(optimizer, plan, n, seed=0):
    """A no-argument call of the serial loop of ``optimizer`` in ``plan`` over ``n`` elements."""
    rule = RULES[optimizer]
    flags, k = rule.variant_and_scalars(rule.validate(rule.defaults), 2)
    writes = rule.slots_used(flags)
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    states = [(np.abs(rng.standard_normal(n)) * 1e-3).astype(np.float32) for _ in writes]
    kc = tuple(np.float32(x) for x in k)
    if plan == "float32":
        fn = nb.kernel(optimizer, flags, writes, False)
        st = [s if w else p for s, w in zip(states, writes)]
        return lambda: fn(p, g, *st, kc)
    fmt = plan.split(" ")[0]
    saved, saved_fast = dict(quant.CODECS), dict(quant.FAST_ENCODE)
    if plan == "int8 (decode by arithmetic)":
        for name, dec in quant.ARITHMETIC_DECODE.items():
            quant.CODECS[name] = (dec, quant.CODECS[name][1])
    if plan.endswith("(encode by lookup)"):
        quant.FAST_ENCODE.update(quant.LOOKUP_ENCODE)
    try:
        io = IO(quant=fmt)
        run = nq.prepare_quant(optimizer, flags, writes, kc, io, None)
        st = [
            Q.quantize(s, fmt, sl.quant_map) if w and sl.quantize else (s if w else None)
            for s, sl, w in zip(states, rule.slots, writes)
        ]
        run(p, g, st)  # compiles with the codecs of this plan
    finally:
        quant.CODECS.clear()
        quant.CODECS.update(saved)
        quant.FAST_ENCODE.clear()
        quant.FAST_ENCODE.update(saved_fast)
    nq._compiled.clear()  # the next plan compiles its own loop
    return lambda: run(p, g, st)


def main(argv=None):
    args = arguments(__doc__, argv, reps=200)
    nb.PARALLEL_MIN = 1 << 62  # the serial loops, as the float32 plan's (one core each)
    calls = {plan: runner(args.optimizer, plan, args.n) for plan in PLANS}
    return time_plans(calls, args)


if __name__ == "__main__":
    main()
