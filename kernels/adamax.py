"""Adamax (PyTorch's form: the infinity norm of the gradients instead of Adam's second moment).

g = -g if maximize;  g = g + wd*p
m = m + omb1*(g - m)               (torch's lerp: an inf moment meets a finite g as NaN)
u = max(beta2*u, |g| + eps)        (NaN if either is, as torch.maximum)
p = p - clr*m / u                  (clr = lr / (1 - beta1^t))
"""

import math

from .spec import Hyper, Rule, Slot


def make_rule(maximize=False, decay=False):
    def adamax_elem(p, g, m, u, k):
        wd, omb1, beta2, eps, clr = k
        if maximize:
            g = -g
        if decay:
            g = g + wd * p
        m = m + omb1 * (g - m)
        a = beta2 * u
        b = abs(g) + eps
        # torch.maximum: NaN in either operand gives NaN (Python's max and CUDA's fmax would
        # return the other operand)
        if b > a or math.isnan(b):
            u = b
        else:
            u = a
        p = p - clr * m / u
        return p, m, u

    return adamax_elem


def _flags_of(hp, step, hs):
    return {"maximize": hp["maximize"], "decay": hp["weight_decay"] != 0}


def _scalars_of(hp, step, hs):
    beta1, beta2 = hp["betas"]
    return {
        "wd": hp["weight_decay"],
        "omb1": 1.0 - beta1,
        "beta2": beta2,
        "eps": hp["eps"],
        "clr": hp["lr"] / (1.0 - beta1**step),
    }


RULE = Rule(
    name="adamax",
    hyper=(
        Hyper("lr", 2e-3),
        Hyper("betas", (0.9, 0.999), "betas"),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0.0, probe=0.1),
        Hyper("maximize", False, "bool", fixed=True),
    ),
    slots=(Slot("exp_avg"), Slot("exp_inf")),
    scalars=("wd", "omb1", "beta2", "eps", "clr"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
)
