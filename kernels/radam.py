"""RAdam (PyTorch's form: Adam whose adaptive step is switched on, rectified, once the
variance of the adaptive learning rate is tractable, rho_t > 5).

g = -g if maximize
decoupled: p = p * decay  (decay = 1 - lr*wd)    else g = g + wd*p
m = m + omb1*(g - m);  v = beta2*v + omb2*g*g       (torch's lerp for m)
rectify (rho_t > 5): p = p - step_size*m / (sqrt(v) + eps)   (step_size = lr*rect*sqrt(bc2)/bc1)
otherwise:           p = p - step_size*m                      (step_size = lr/bc1)
(rho_inf = 2/(1 - beta2) - 1, rho_t = rho_inf - 2t*beta2^t/bc2,
rect = sqrt((rho_t - 4)(rho_t - 2)rho_inf / ((rho_inf - 4)(rho_inf - 2)rho_t)); whether a step
rectifies is a flag from the host, so each step runs a branch-free variant. torch multiplies
m/bc1, lr, sqrt(bc2)/(sqrt(v) + eps) and rect element by element; the host folds them into one
step size, as Adam's rule does, which leaves one division per element: float64 divisions are
long instruction sequences, and three of them cost the double kernels registers beyond the
64-register budget.)
"""

import math

from .spec import Hyper, Rule, Slot


def make_rule(maximize=False, decay=False, decoupled=False, rectify=False):
    def radam_elem(p, g, m, v, k):
        wd, decay_f, omb1, beta2, omb2, step_size, eps = k
        if maximize:
            g = -g
        if decay:
            if decoupled:
                p = p * decay_f
            else:
                g = g + wd * p
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
        "maximize": hp["maximize"],
        "decay": hp["weight_decay"] != 0,
        "decoupled": hp["decoupled_weight_decay"],
        "rectify": _rho(hp, step)[1] > 5.0,
    }


def _scalars_of(hp, step, hs):
    beta1, beta2 = hp["betas"]
    bc1, bc2 = 1.0 - beta1**step, 1.0 - beta2**step
    rho_inf, rho_t = _rho(hp, step)
    step_size = hp["lr"] / bc1
    if rho_t > 5.0:
        rect = (
            (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
        ) ** 0.5
        step_size = hp["lr"] * rect * bc2**0.5 / bc1
    return {
        "wd": hp["weight_decay"],
        "decay_f": 1.0 - hp["lr"] * hp["weight_decay"],
        "omb1": 1.0 - beta1,
        "beta2": beta2,
        "omb2": 1.0 - beta2,
        "step_size": step_size,
        "eps": hp["eps"],
    }


RULE = Rule(
    name="radam",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999), "betas"),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0.0, probe=0.1),
        Hyper("decoupled_weight_decay", False, "bool", fixed=True),
        Hyper("maximize", False, "bool", fixed=True),
    ),
    slots=(Slot("exp_avg"), Slot("exp_avg_sq")),
    scalars=("wd", "decay_f", "omb1", "beta2", "omb2", "step_size", "eps"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
)
