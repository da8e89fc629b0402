"""RAdam (Liu et al. 2020, "On the Variance of the Adaptive Learning Rate and Beyond"): Adam
whose adaptive step is rectified, and used only once its variance is tractable.

    g = grad + wd·p   (decoupled_weight_decay: p = p·(1 − lr·wd) instead)
    m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;  ρ_t = ρ∞ − 2t·β2^t/(1−β2^t)
    ρ_t > 5: p = p − lr · m/(1−β1^t) · r_t · √(1−β2^t) / (√v + eps)
    else:    p = p − lr · m/(1−β1^t)

with ρ∞ = 2/(1−β2) − 1 and r_t = √((ρ_t−4)(ρ_t−2)ρ∞ / ((ρ∞−4)(ρ∞−2)ρ_t)) (``torch.optim.RAdam``).
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


def make_rule(
    maximize: bool = False, decay: bool = False, decoupled: bool = False, rectify: bool = False
) -> Elem:
    """Per element, after the prologue (maximize, L2 or decoupled decay):

    m = m + omb1*(g - m);  v = beta2*v + omb2*g*g       (torch's lerp for m)
    rectify (rho_t > 5): p = p - step_size*m / (sqrt(v) + eps)   (step_size = lr*rect*sqrt(bc2)/bc1)
    otherwise:           p = p - step_size*m                      (step_size = lr/bc1)

    Whether a step rectifies is a flag from the host, so each step runs a branch-free variant.
    torch multiplies m/bc1, lr, sqrt(bc2)/(sqrt(v) + eps) and rect element by element; the host
    folds them into one step size, as Adam's rule does, which leaves one division per element:
    float64 divisions are long instruction sequences, and three of them cost the double
    kernels registers beyond the 64-register budget.
    """

    def radam_elem(p, g, m, v, k):
        wd, decay_f, omb1, beta2, omb2, step_size, eps = k
        p, g = prologue(p, g, wd, decay_f, maximize, decay, decoupled)
        m = m + omb1 * (g - m)
        v = beta2 * v + omb2 * g * g
        if rectify:
            p = p - step_size * m / (math.sqrt(v) + eps)
        else:
            p = p - step_size * m
        return p, m, v

    return radam_elem


def _rho(hp, step):
    """``(rho_inf, rho_t)`` in float64, as torch computes them on the host."""
    beta2 = hp["betas"][1]
    rho_inf = 2.0 / (1.0 - beta2) - 1.0
    return rho_inf, rho_inf - 2.0 * step * beta2**step / (1.0 - beta2**step)


def _flags_of(hp, step, hs):
    return {
        **prologue_flags(hp),
        "decoupled": hp["decoupled_weight_decay"],
        "rectify": _rho(hp, step)[1] > 5.0,
    }


def _scalars_of(hp, step, hs):
    out = adam_scalars(hp["lr"], hp["betas"], step)
    out.update(prologue_scalars(hp), eps=hp["eps"])
    rho_inf, rho_t = _rho(hp, step)
    if rho_t > 5.0:
        rect = (
            (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        ) ** 0.5
        out["step_size"] = hp["lr"] * rect * out["bc2"] ** 0.5 / out["bc1"]
    return out


RULE = Rule(
    name="radam",
    class_name="RAdam",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999), "betas"),
        Hyper("eps", 1e-8),
        WEIGHT_DECAY,
        Hyper("decoupled_weight_decay", False, "bool", fixed=True),
        MAXIMIZE,
    ),
    slots=(Slot("exp_avg"), Slot("exp_avg_sq", even=True)),
    scalars=("wd", "decay_f", "omb1", "beta2", "omb2", "step_size", "eps"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    test_hp=dict(lr=0.01, betas=(0.8, 0.95)),
)
