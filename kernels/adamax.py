"""Adamax (Kingma & Ba 2015, §7.1): Adam with the infinity norm in place of the second moment.

    g = grad + wd·p;  m = β1·m + (1−β1)·g
    u = max(β2·u, |g| + eps)
    p = p − (lr / (1−β1^t)) · m / u

``torch.optim.Adamax``.
"""

import math

from .shared import (
    MAXIMIZE,
    WEIGHT_DECAY,
    adam_scalars,
    prologue,
    prologue_flags,
    prologue_scalars,
)
from .spec import Elem, Hyper, Rule, Slot


def make_rule(maximize: bool = False, decay: bool = False) -> Elem:
    """Per element, after the prologue (maximize, L2 decay), with
    ``step_size = lr / (1 - beta1^t)`` from the host:

    m = m + omb1*(g - m)               (torch's lerp: an inf moment meets a finite g as NaN)
    u = max(beta2*u, |g| + eps)        (NaN if either is, as torch.maximum)
    p = p - step_size*m / u
    """

    def adamax_elem(p, g, m, u, k):
        wd, omb1, beta2, eps, step_size = k
        p, g = prologue(p, g, wd, wd, maximize, decay, False)
        m = m + omb1 * (g - m)
        a = beta2 * u
        b = abs(g) + eps
        # torch.maximum: NaN in either operand gives NaN (Python's max and CUDA's fmax would
        # return the other operand)
        if b > a or math.isnan(b):
            u = b
        else:
            u = a
        p = p - step_size * m / u
        return p, m, u

    return adamax_elem


def _flags_of(hp, step, hs):
    return prologue_flags(hp)


def _scalars_of(hp, step, hs):
    out = adam_scalars(hp["lr"], hp["betas"], step)
    out.update(prologue_scalars(hp), eps=hp["eps"])
    return out


RULE = Rule(
    name="adamax",
    class_name="Adamax",
    hyper=(
        Hyper("lr", 2e-3),
        Hyper("betas", (0.9, 0.999), "betas"),
        Hyper("eps", 1e-8),
        WEIGHT_DECAY,
        MAXIMIZE,
    ),
    slots=(Slot("exp_avg"), Slot("exp_inf", even=True)),
    scalars=("wd", "omb1", "beta2", "eps", "step_size"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    test_hp=dict(lr=0.01, betas=(0.8, 0.95)),
)
