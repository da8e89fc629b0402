"""``fma(a, b, c)``: ``a*b + c`` rounded once, wherever a per-element rule runs.

torch.optim computes centered RMSProp's ``v - ga*ga`` as ``v.addcmul(ga, ga, value=-1)``, which
is one fused multiply-add on CPUs with FMA units (AVX2, AVX-512: what torch dispatches to) and
on CUDA. Rounded once, ``inf - ga*ga`` stays ``inf`` where ``ga*ga`` overflows (two roundings
give ``inf - inf = NaN``), and ``v - ga*ga`` keeps the digits that cancel. The rules call this
function; the Numba CPU backend compiles it to ``llvm.fma``, the Numba CUDA backend to CUDA's
``fma`` (each registers it when imported), and the CUDA C bodies call ``fma`` directly. Run as
plain Python (the CUDA simulator, tests) it computes the exact value with ``fractions`` and
rounds it to the arguments' dtype (float32 via float64: within the one rounding except at
float32 ties).
"""

from fractions import Fraction
from math import isfinite
from typing import Any

import numpy as np

__all__ = ["fma"]


def fma(a: Any, b: Any, c: Any) -> Any:
    """``a*b + c`` with a single rounding, in the dtype of the arguments."""
    to = np.result_type(a, b, c).type
    if not (isfinite(a) and isfinite(b)):
        with np.errstate(invalid="ignore"):  # inf/NaN factors: fused and plain results agree
            return to(to(a) * to(b) + to(c))
    if not isfinite(c):
        return to(c)  # a finite product never cancels an infinite or NaN addend
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    try:
        return to(float(exact))
    except OverflowError:
        return to(np.inf if exact > 0 else -np.inf)
