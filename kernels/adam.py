"""Adam / AdamW / AMSGrad (PyTorch's form: eps added after the bias correction, outside the root).

g = -g if maximize
decoupled (AdamW): p = p * decay  (decay = 1 - lr*wd)    else g = g + wd*p
m = beta1*m + omb1*g;  v = beta2*v + omb2*g*g
amsgrad: vmax = max(vmax, v) (NaN if either is);  d = sqrt(vmax or v) * inv_sqrt_bc2 + eps
p = p - step_size*m / d
(step_size = lr / (1 - beta1^t), inv_sqrt_bc2 = 1/sqrt(1 - beta2^t))
"""

import math

from .spec import Hyper, Rule, Slot, sqrt


def make_rule(maximize=False, decay=False, decoupled=False, amsgrad=False):
    def adam_elem(p, g, m, v, vmax, k):
        wd, decay_f, beta1, omb1, beta2, omb2, step_size, inv_sqrt_bc2, eps = k
        if maximize:
            g = -g
        if decay:
            if decoupled:
                p = p * decay_f
            else:
                g = g + wd * p
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
        "maximize": hp["maximize"],
        "decay": hp["weight_decay"] != 0,
        "decoupled": hp["decoupled_weight_decay"],
        "amsgrad": hp["amsgrad"],
    }


def _scalars_of(hp, step, hs):
    beta1, beta2 = hp["betas"]
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return {
        "wd": hp["weight_decay"],
        "decay_f": 1.0 - hp["lr"] * hp["weight_decay"],
        "beta1": beta1,
        "omb1": 1.0 - beta1,
        "beta2": beta2,
        "omb2": 1.0 - beta2,
        "step_size": hp["lr"] / bc1,
        "inv_sqrt_bc2": 1.0 / sqrt(bc2),
        "eps": hp["eps"],
    }


RULE = Rule(
    name="adam",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999), "betas"),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0.0, probe=0.1),
        Hyper("amsgrad", False, "bool", fixed=True),
        Hyper("maximize", False, "bool", fixed=True),
        Hyper("decoupled_weight_decay", False, "bool", fixed=True),
    ),
    slots=(Slot("exp_avg"), Slot("exp_avg_sq"), Slot("max_exp_avg_sq", when="amsgrad")),
    scalars=("wd", "decay_f", "beta1", "omb1", "beta2", "omb2", "step_size", "inv_sqrt_bc2", "eps"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
)
