"""AdaGrad (PyTorch's form: eps outside the square root, clr = lr / (1 + (t-1)*lr_decay)).

g = -g if maximize;  g = g + wd*p
s = s + g*g
p = p - clr * (g / (sqrt(s) + eps))
"""

import math

from .spec import Hyper, Rule, Slot


def make_rule(maximize=False, decay=False):
    def adagrad_elem(p, g, s, k):
        wd, clr, eps = k
        if maximize:
            g = -g
        if decay:
            g = g + wd * p
        s = s + g * g
        d = math.sqrt(s) + eps
        p = p - clr * (g / d)
        return p, s

    return adagrad_elem


def _flags_of(hp, step, hs):
    return {"maximize": hp["maximize"], "decay": hp["weight_decay"] != 0}


def _scalars_of(hp, step, hs):
    return {
        "wd": hp["weight_decay"],
        "clr": hp["lr"] / (1.0 + (step - 1) * hp["lr_decay"]),
        "eps": hp["eps"],
    }


RULE = Rule(
    name="adagrad",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("lr_decay", 0.0, probe=0.3),
        Hyper("weight_decay", 0.0, probe=0.1),
        Hyper("initial_accumulator_value", 0.0, fixed=True, probe=0.2),
        Hyper("eps", 1e-10),
        Hyper("maximize", False, "bool", fixed=True),
    ),
    slots=(Slot("sum", init="initial_accumulator_value"),),
    scalars=("wd", "clr", "eps"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
)
