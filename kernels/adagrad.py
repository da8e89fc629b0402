"""AdaGrad (Duchi et al. 2011): per-coordinate steps that shrink with the squared history.

    g = grad + wd·p;  clr = lr / (1 + (t−1)·lr_decay)
    s = s + g²
    p = p − clr · g / (√s + eps)

``torch.optim.Adagrad``: eps outside the square root, and the first step takes the full lr.
"""

import math

from .shared import MAXIMIZE, WEIGHT_DECAY, prologue, prologue_flags, prologue_scalars
from .spec import Elem, Hyper, Rule, Slot


def make_rule(maximize: bool = False, decay: bool = False) -> Elem:
    """Per element, after the prologue (maximize, L2 decay), with ``clr`` from the host:

    s = s + g*g
    p = p - clr * (g / (sqrt(s) + eps))
    """

    def adagrad_elem(p, g, s, k):
        wd, clr, eps = k
        p, g = prologue(p, g, wd, wd, maximize, decay, False)
        s = s + g * g
        d = math.sqrt(s) + eps
        p = p - clr * (g / d)
        return p, s

    return adagrad_elem


def _flags_of(hp, step, hs):
    return prologue_flags(hp)


def _scalars_of(hp, step, hs):
    return {
        **prologue_scalars(hp),
        "clr": hp["lr"] / (1.0 + (step - 1) * hp["lr_decay"]),
        "eps": hp["eps"],
    }


RULE = Rule(
    name="adagrad",
    class_name="AdaGrad",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("lr_decay", 0.0, probe=0.3),
        WEIGHT_DECAY,
        Hyper("initial_accumulator_value", 0.0, fixed=True, probe=0.2),
        Hyper("eps", 1e-10),
        MAXIMIZE,
    ),
    slots=(Slot("sum", init="initial_accumulator_value", even=True),),
    scalars=("wd", "clr", "eps"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    test_hp=dict(lr=0.05),
)
