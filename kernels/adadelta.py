"""Adadelta (Zeiler 2012): steps scaled by the ratio of two running RMS, no tuned lr needed.

    g = grad + wd·p;  v = ρ·v + (1−ρ)·g²
    Δ = √(a + eps) / √(v + eps) · g
    a = ρ·a + (1−ρ)·Δ²;  p = p − lr·Δ

``torch.optim.Adadelta`` (eps inside both roots, lr scaling the step); state ``square_avg`` = v,
``acc_delta`` = a.
"""

import math

from .shared import MAXIMIZE, WEIGHT_DECAY, prologue, prologue_flags, prologue_scalars
from .spec import Elem, Hyper, Rule, Slot


def make_rule(maximize: bool = False, decay: bool = False) -> Elem:
    """Per element, after the prologue (maximize, L2 decay):

    v = rho*v + omr*g*g                      (omr = 1 - rho)
    delta = sqrt(acc + eps) / sqrt(v + eps) * g
    acc = rho*acc + omr*delta*delta
    p = p - lr*delta
    """

    def adadelta_elem(p, g, v, acc, k):
        wd, rho, omr, eps, lr = k
        p, g = prologue(p, g, wd, wd, maximize, decay, False)
        v = rho * v + omr * g * g
        denom = math.sqrt(v + eps)
        delta = math.sqrt(acc + eps) / denom * g
        acc = rho * acc + omr * delta * delta
        p = p - lr * delta
        return p, v, acc

    return adadelta_elem


def _flags_of(hp, step, hs):
    return prologue_flags(hp)


def _scalars_of(hp, step, hs):
    return {
        **prologue_scalars(hp),
        "rho": hp["rho"],
        "omr": 1.0 - hp["rho"],
        "eps": hp["eps"],
        "lr": hp["lr"],
    }


RULE = Rule(
    name="adadelta",
    class_name="Adadelta",
    hyper=(
        Hyper("lr", 1.0),
        Hyper("rho", 0.9, "closed_unit"),
        Hyper("eps", 1e-6),
        WEIGHT_DECAY,
        MAXIMIZE,
    ),
    slots=(Slot("square_avg", even=True), Slot("acc_delta", even=True)),
    scalars=("wd", "rho", "omr", "eps", "lr"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    test_hp=dict(lr=0.5, rho=0.8),
)
