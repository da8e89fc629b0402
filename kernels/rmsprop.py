"""RMSProp (PyTorch's form: eps outside the square root, optional centering and momentum).

    g = -g if maximize;  g = g + wd*p
    v = alpha*v + oma*g*g                       (oma = 1 - alpha)
    centered: ga = ga + oma*(g - ga);  d = sqrt(v - ga*ga) + eps   else d = sqrt(v) + eps
    momentum: b = mu*b + g/d;  p = p - lr*b     else p = p - lr*(g/d)

``v - ga*ga`` is one fused multiply-add, ``fma(-ga, ga, v)``, as torch's
``addcmul(v, ga, ga, value=-1)`` is on FMA hardware: where ``ga*ga`` overflows, ``v = inf``
gives ``d = inf`` (the param stays finite), not ``inf - inf = NaN``.
"""

import math

from .fma import fma
from .spec import Hyper, Rule, Slot


def make_rule(maximize=False, decay=False, centered=False, momentum=False):
    def rmsprop_elem(p, g, v, ga, b, k):
        wd, alpha, oma, eps, mu, lr = k
        if maximize:
            g = -g
        if decay:
            g = g + wd * p
        v = alpha * v + oma * g * g
        if centered:
            ga = ga + oma * (g - ga)
            d = math.sqrt(fma(-ga, ga, v)) + eps
        else:
            d = math.sqrt(v) + eps
        if momentum:
            b = mu * b + g / d
            p = p - lr * b
        else:
            p = p - lr * (g / d)
        return p, v, ga, b

    return rmsprop_elem


def _flags_of(hp, step, hs):
    return {
        "maximize": hp["maximize"],
        "decay": hp["weight_decay"] != 0,
        "centered": hp["centered"],
        "momentum": hp["momentum"] > 0,
    }


def _scalars_of(hp, step, hs):
    return {
        "wd": hp["weight_decay"],
        "alpha": hp["alpha"],
        "oma": 1.0 - hp["alpha"],
        "eps": hp["eps"],
        "mu": hp["momentum"],
        "lr": hp["lr"],
    }


RULE = Rule(
    name="rmsprop",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("alpha", 0.99, "unit"),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0.0, probe=0.1),
        Hyper("momentum", 0.0, probe=0.8),
        Hyper("centered", False, "bool", fixed=True),
        Hyper("maximize", False, "bool", fixed=True),
    ),
    slots=(
        Slot("square_avg"),
        Slot("grad_avg", when="centered"),
        Slot("momentum_buffer", when="momentum"),
    ),
    scalars=("wd", "alpha", "oma", "eps", "mu", "lr"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
)
