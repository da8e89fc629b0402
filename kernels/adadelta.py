"""Adadelta (PyTorch's form: eps inside both square roots, lr scaling the step).

g = -g if maximize;  g = g + wd*p
v = rho*v + omr*g*g                      (omr = 1 - rho)
delta = sqrt(acc + eps) / sqrt(v + eps) * g
acc = rho*acc + omr*delta*delta
p = p - lr*delta
"""

import math

from .spec import Hyper, Rule, Slot


def make_rule(maximize=False, decay=False):
    def adadelta_elem(p, g, v, acc, k):
        wd, rho, omr, eps, lr = k
        if maximize:
            g = -g
        if decay:
            g = g + wd * p
        v = rho * v + omr * g * g
        denom = math.sqrt(v + eps)
        delta = math.sqrt(acc + eps) / denom * g
        acc = rho * acc + omr * delta * delta
        p = p - lr * delta
        return p, v, acc

    return adadelta_elem


def _flags_of(hp, step, hs):
    return {"maximize": hp["maximize"], "decay": hp["weight_decay"] != 0}


def _scalars_of(hp, step, hs):
    return {
        "wd": hp["weight_decay"],
        "rho": hp["rho"],
        "omr": 1.0 - hp["rho"],
        "eps": hp["eps"],
        "lr": hp["lr"],
    }


RULE = Rule(
    name="adadelta",
    hyper=(
        Hyper("lr", 1.0),
        Hyper("rho", 0.9, "closed_unit"),
        Hyper("eps", 1e-6),
        Hyper("weight_decay", 0.0, probe=0.1),
        Hyper("maximize", False, "bool", fixed=True),
    ),
    slots=(Slot("square_avg"), Slot("acc_delta")),
    scalars=("wd", "rho", "omr", "eps", "lr"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
)
