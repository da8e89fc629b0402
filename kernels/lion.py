"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): the sign of
interpolated momentum; one state buffer.

    p = p · (1 − lr·wd)
    p = p − lr · sign(β1·m + (1−β1)·g)
    m = β2·m + (1−β2)·g
"""

from .shared import (
    MAXIMIZE,
    WEIGHT_DECAY,
    betas_scalars,
    prologue,
    prologue_flags,
    prologue_scalars,
)
from .spec import Elem, Hyper, Rule, Slot


def make_rule(maximize: bool = False, decay: bool = False) -> Elem:
    """Per element, after the prologue (maximize, decoupled decay):

    c = beta1*m + omb1*g;  p = p - lr*sign(c)
    m = beta2*m + omb2*g
    """

    def lion_elem(p, g, m, k):
        decay_f, beta1, omb1, beta2, omb2, lr = k
        p, g = prologue(p, g, decay_f, decay_f, maximize, decay, True)
        c = beta1 * m + omb1 * g
        # sign(c) without a literal: +-lr, and lr*c (0 or NaN, like sign) when c is 0 or NaN
        if c > 0:
            p = p - lr
        elif c < 0:
            p = p + lr
        else:
            p = p - lr * c
        m = beta2 * m + omb2 * g
        return p, m

    return lion_elem


def _flags_of(hp, step, hs):
    return prologue_flags(hp)


def _scalars_of(hp, step, hs):
    out = betas_scalars(hp["betas"])
    out.update(prologue_scalars(hp), lr=hp["lr"])
    return out


RULE = Rule(
    name="lion",
    class_name="Lion",
    hyper=(
        Hyper("lr", 1e-4),
        Hyper("betas", (0.9, 0.99), "betas"),
        WEIGHT_DECAY,
        MAXIMIZE,
    ),
    slots=(Slot("exp_avg"),),
    scalars=("decay_f", "beta1", "omb1", "beta2", "omb2", "lr"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    test_hp=dict(lr=0.01, betas=(0.8, 0.95)),
)
