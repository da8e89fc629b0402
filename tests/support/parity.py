"""Inputs and oracle results of the parity matrix, shared by the CPU, GPU and simulator tests.

Each case is one configuration of ``support.matrix.MATRIX`` at one dtype, size and step count:
seeded random parameters and gradients bounded away from zero (``inputs``), and the float64
oracle's result on the very same (dtype-rounded) values. The oracle runs once per case
(``case`` is cached), however many backends and APIs compare against it.
"""

import functools

import numpy as np

from .matrix import MATRIX, STEPS
from .oracle import run_oracle

__all__ = ["DTYPES", "SIZES_STEPS", "case", "inputs"]

DTYPES = (np.float32, np.float64)
#: (n, steps): one element and 1001 (a serial loop, every tail), each for one step and for
#: ``STEPS``; 278,011 elements reach the numba backend's parallel loop, for ``STEPS`` only
SIZES_STEPS = ((1, 1), (1, STEPS), (1001, 1), (1001, STEPS), (278011, STEPS))


def inputs(rng, name, n, steps):
    """Parameters and a gradient per step, random and bounded away from zero.

    Why bounded: at step 1 the normalising optimizers move by about ±lr·g/|g| (Adam, AdaGrad,
    RMSProp, Adamax) or ±lr (Lion, Rprop), so where g = ±grad + wd·p cancels to a few ulps the
    float32 and float64 results legitimately step in different directions. |grad| >= 0.6 >
    |wd·p| (wd <= 0.1, |p| <= 3 plus a small drift) rules that out, and keeps Rprop's
    sign(g·prev) off zero. Lion's gradients also keep one sign per element across steps, so
    sign(β1·m + (1−β1)·g) never sits on a rounding tie in later steps either.
    """
    p0 = rng.uniform(-3.0, 3.0, n)

    def sign():
        return np.where(rng.random(n) < 0.5, -1.0, 1.0)

    fixed = sign()
    return p0, [
        (fixed if name == "Lion" else sign()) * rng.uniform(0.6, 2.0, n) for _ in range(steps)
    ]


@functools.lru_cache(maxsize=1)
def case(cfg_index, dtype, n, steps):
    """``(kwargs, p0, grads, (p_ref, state_ref, host_ref))`` of one case (the tests vary
    backend and API fastest, so one cached case serves them all)."""
    name, kwargs = MATRIX[cfg_index]
    rng = np.random.default_rng([cfg_index, np.dtype(dtype).itemsize, n, steps])
    p0, grads = inputs(rng, name, n, steps)
    # the oracle sees the inputs the backend sees: rounded to dtype, then widened
    p0, grads = p0.astype(dtype), [g.astype(dtype) for g in grads]
    return kwargs, p0, grads, run_oracle(name, kwargs, p0, grads, host=True)
