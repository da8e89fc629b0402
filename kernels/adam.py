"""Adam (Kingma & Ba 2015): momentum plus RMSProp, with bias correction; AMSGrad optional.

    g = grad + wd·p   (decoupled_weight_decay, AdamW: p = p·(1 − lr·wd) instead)
    m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²
    amsgrad: v̂ = max(v̂, v)  (of the raw v)
    p = p − (lr / (1−β1^t)) · m / (√(v̂ or v) / √(1−β2^t) + eps)

``torch.optim.Adam``: eps is added after the bias correction, outside the root.
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
    maximize: bool = False, decay: bool = False, decoupled: bool = False, amsgrad: bool = False
) -> Elem:
    """Per element, after the prologue (maximize, L2 or decoupled decay), with
    ``step_size = lr / (1 - beta1^t)`` and ``inv_sqrt_bc2 = 1/sqrt(1 - beta2^t)`` from the host:

    m = beta1*m + omb1*g;  v = beta2*v + omb2*g*g
    amsgrad: vmax = max(vmax, v) (NaN if either is);  d = sqrt(vmax or v) * inv_sqrt_bc2 + eps
    p = p - step_size*m / d
    """

    def adam_elem(p, g, m, v, vmax, k):
        wd, decay_f, beta1, omb1, beta2, omb2, step_size, inv_sqrt_bc2, eps = k
        p, g = prologue(p, g, wd, decay_f, maximize, decay, decoupled)
        m = beta1 * m + omb1 * g
        v = beta2 * v + omb2 * g * g
        if amsgrad:
            # torch.maximum: NaN in either operand gives NaN (Python's max and CUDA's fmax
            # would return the other operand)
            if v > vmax or math.isnan(v):
                vmax = v
            d = math.sqrt(vmax) * inv_sqrt_bc2 + eps
        else:
            d = math.sqrt(v) * inv_sqrt_bc2 + eps
        p = p - step_size * m / d
        return p, m, v, vmax

    return adam_elem


def _flags_of(hp, step, hs):
    return {
        **prologue_flags(hp),
        "decoupled": hp["decoupled_weight_decay"],
        "amsgrad": hp["amsgrad"],
    }


def _scalars_of(hp, step, hs):
    out = adam_scalars(hp["lr"], hp["betas"], step)
    out.update(prologue_scalars(hp), eps=hp["eps"])
    return out


RULE = Rule(
    name="adam",
    class_name="Adam",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999), "betas"),
        Hyper("eps", 1e-8),
        WEIGHT_DECAY,
        Hyper("amsgrad", False, "bool", fixed=True),
        MAXIMIZE,
        Hyper("decoupled_weight_decay", False, "bool", fixed=True, keyword_only=True),
    ),
    slots=(
        Slot("exp_avg"),
        Slot("exp_avg_sq", even=True),
        Slot("max_exp_avg_sq", when="amsgrad", even=True),
    ),
    scalars=("wd", "decay_f", "beta1", "omb1", "beta2", "omb2", "step_size", "inv_sqrt_bc2", "eps"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    test_hp=dict(lr=0.01, betas=(0.8, 0.95)),
)
