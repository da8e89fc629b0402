"""Averaged SGD (Polyak & Juditsky 1992): SGD with a decaying step and an average of the
iterates, kept as state ``ax``.

    g = grad + wd·p;  p = p·(1 − λ·η_t) − η_t·g
    ax = ax + μ_t·(p − ax)   (ax = p while μ_t = 1)
    η_{t+1} = lr / (1 + λ·lr·t)^α;  μ_{t+1} = 1 / max(1, t − t0)

η (``eta``, lr before the first step) and μ (``mu``, 1) are float32 host state, as
``torch.optim.ASGD`` keeps them.
"""

from .shared import MAXIMIZE, WEIGHT_DECAY, prologue, prologue_flags
from .spec import Elem, Hyper, Rule, Slot, f32


def make_rule(maximize: bool = False, decay: bool = False, average: bool = False) -> Elem:
    """Per element, after the prologue (maximize, L2 decay), with ``eta``, ``mu`` (the host
    state) and ``decay_f = 1 - lambd*eta`` from the host:

    p = p * decay_f;  p = p - eta*g
    average (mu != 1): ax = ax + (p - ax)*mu    else ax = p

    Whether a step averages is a flag from the host, so each step runs a branch-free variant.
    """

    def asgd_elem(p, g, ax, k):
        wd, decay_f, eta, mu = k
        p, g = prologue(p, g, wd, wd, maximize, decay, False)
        p = p * decay_f
        p = p - eta * g
        if average:
            ax = ax + (p - ax) * mu
        else:
            ax = p
        return p, ax

    return asgd_elem


def _flags_of(hp, step, hs):
    return {**prologue_flags(hp), "average": hs["mu"] != 1.0}


def _scalars_of(hp, step, hs):
    return {
        "wd": hp["weight_decay"],
        "decay_f": 1.0 - hp["lambd"] * hs["eta"],
        "eta": hs["eta"],
        "mu": hs["mu"],
    }


def _advance(hp, step, hs):
    lr, lambd = hp["lr"], hp["lambd"]
    # torch.as_tensor of Python floats: float32, whatever dtype the state tensors hold
    return {
        "eta": f32(lr / ((1.0 + lambd * lr * step) ** hp["alpha"])),
        "mu": f32(1.0 / max(1.0, step - hp["t0"])),
    }


RULE = Rule(
    name="asgd",
    class_name="ASGD",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("lambd", 1e-4),
        Hyper("alpha", 0.75, "real"),
        # t0 = 0 (the probe) averages from step 3 on: every variant within a few steps
        Hyper("t0", 1e6, "real", probe=0.0),
        WEIGHT_DECAY,
        MAXIMIZE,
    ),
    slots=(Slot("ax", quantize=False),),
    scalars=("wd", "decay_f", "eta", "mu"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    host_state=(("eta", "lr"), ("mu", 1.0)),
    advance=_advance,
    test_hp=dict(lr=0.05, lambd=0.1, alpha=0.6),
)
