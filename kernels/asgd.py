"""Averaged SGD (Polyak & Juditsky 1992): SGD with a decaying step and an average of the
iterates, kept as state ``ax``.

    g = grad + wd·p;  p = p·(1 − λ·η_t) − η_t·g
    ax = ax + μ_t·(p − ax)   (ax = p while μ_t = 1)
    η_{t+1} = lr / (1 + λ·lr·t)^α;  μ_{t+1} = 1 / max(1, t − t0)

η (``eta``, lr before the first step) and μ (``mu``, 1) are float32 host state, as
``torch.optim.ASGD`` keeps them.
"""

from .shared import MAXIMIZE, WEIGHT_DECAY, prologue, prologue_flags
from .spec import Elem, Hyper, Rule, Slot, f32, maximum, where


def make_rule(
    maximize: bool = False, decay: bool = False, average: bool = False, select: bool = False
) -> Elem:
    """Per element, after the prologue (maximize, L2 decay), with ``eta``, ``mu`` (the host
    state) and ``decay_f = 1 - lambd*eta`` from the host:

    p = p * decay_f;  p = p - eta*g
    average (mu != 1): ax = ax + (p - ax)*mu    else ax = p

    Whether a step averages is a flag from the host, so each step runs a branch-free variant.
    The device's variant (``select``, ``Rule.device_flags``: eta and mu advanced on the device,
    where no host picks a variant per step) computes both and keeps the average where the
    step's scalars say so (``avg > avg0``: avg = 1, avg0 = 0 while mu != 1), the same values
    as either host variant.
    """

    def asgd_elem(p, g, ax, k):
        wd, decay_f, eta, mu, avg, avg0 = k
        p, g = prologue(p, g, wd, wd, maximize, decay, False)
        p = p * decay_f
        p = p - eta * g
        if select:  # the step's scalars choose (one value for every element)
            mean = ax + (p - ax) * mu
            ax = mean if avg > avg0 else p
        elif average:
            ax = ax + (p - ax) * mu
        else:
            ax = p
        return p, ax

    return asgd_elem


def _flags_of(hp, step, hs):
    return {**prologue_flags(hp), "average": hs["mu"] != 1.0, "select": False}


def _device_flags(hp):
    """The device's variant: the average kept where ``avg > avg0``."""
    return {**prologue_flags(hp), "average": False, "select": True}


def _scalars_of(hp, step, hs):
    on = hs["mu"] != 1.0
    return {
        "wd": hp["weight_decay"],
        "decay_f": 1.0 - hp["lambd"] * hs["eta"],
        "eta": hs["eta"],
        "mu": hs["mu"],
        "avg": where(on, 1.0, 0.0),
        "avg0": where(on, 0.0, 1.0),
    }


def _advance(hp, step, hs):
    lr, lambd = hp["lr"], hp["lambd"]
    # torch.as_tensor of Python floats: float32, whatever dtype the state tensors hold
    return {
        "eta": f32(lr / ((1.0 + lambd * lr * step) ** hp["alpha"])),
        "mu": f32(1.0 / maximum(1.0, step - hp["t0"])),
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
    slots=(Slot("ax"),),
    scalars=("wd", "decay_f", "eta", "mu", "avg", "avg0"),
    excluded=((("average", True), ("select", True)),),
    device_flags=_device_flags,
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    host_state=(("eta", "lr"), ("mu", 1.0)),
    advance=_advance,
    test_hp=dict(lr=0.05, lambd=0.1, alpha=0.6),
)
