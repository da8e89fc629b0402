"""RMSProp (Hinton 2012): AdaGrad that forgets, with optional centering and momentum.

    g = grad + wd·p;  v = α·v + (1−α)·g²
    centered: ḡ = ḡ + (1−α)(g − ḡ);  d = √(v − ḡ²) + eps    else d = √v + eps
    μ > 0: b = μ·b + g/d; p = p − lr·b                     else p = p − lr·g/d

``torch.optim.RMSprop``: eps outside the square root.
"""

import math

from .fma import fma
from .shared import MAXIMIZE, WEIGHT_DECAY, prologue, prologue_flags, prologue_scalars
from .spec import Elem, Hyper, Rule, Slot


def make_rule(
    maximize: bool = False, decay: bool = False, centered: bool = False, momentum: bool = False
) -> Elem:
    """Per element, after the prologue (maximize, L2 decay):

    v = alpha*v + oma*g*g                       (oma = 1 - alpha)
    centered: ga = ga + oma*(g - ga);  d = sqrt(v - ga*ga) + eps   else d = sqrt(v) + eps
    momentum: b = mu*b + g/d;  p = p - lr*b     else p = p - lr*(g/d)

    ``v - ga*ga`` is one fused multiply-add, ``fma(-ga, ga, v)``, as torch's
    ``addcmul(v, ga, ga, value=-1)`` is on FMA hardware: where ``ga*ga`` overflows, ``v = inf``
    gives ``d = inf`` (the param stays finite), not ``inf - inf = NaN``.
    """

    def rmsprop_elem(p, g, v, ga, b, k):
        wd, alpha, oma, eps, mu, lr = k
        p, g = prologue(p, g, wd, wd, maximize, decay, False)
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
    return {**prologue_flags(hp), "centered": hp["centered"], "momentum": hp["momentum"] > 0}


def _scalars_of(hp, step, hs):
    return {
        **prologue_scalars(hp),
        "alpha": hp["alpha"],
        "oma": 1.0 - hp["alpha"],
        "eps": hp["eps"],
        "mu": hp["momentum"],
        "lr": hp["lr"],
    }


RULE = Rule(
    name="rmsprop",
    class_name="RMSProp",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("alpha", 0.99, "unit"),
        Hyper("eps", 1e-8),
        WEIGHT_DECAY,
        Hyper("momentum", 0.0, probe=0.8),
        Hyper("centered", False, "bool", fixed=True),
        MAXIMIZE,
    ),
    slots=(
        Slot("square_avg", even=True),
        Slot("grad_avg", when="centered"),
        Slot("momentum_buffer", when="momentum"),
    ),
    scalars=("wd", "alpha", "oma", "eps", "mu", "lr"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    test_hp=dict(lr=0.01, alpha=0.9),
)
