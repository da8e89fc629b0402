"""ASGD (PyTorch's form: SGD with a decaying step eta and a running average ax of the iterates).

g = -g if maximize;  g = g + wd*p
p = p * decay  (decay = 1 - lambd*eta);  p = p - eta*g
average (mu != 1): ax = ax + (p - ax)*mu    else ax = p
(eta and mu are torch's float32 host state: eta = lr before step 1, then
lr / (1 + lambd*lr*t)^alpha; mu = 1, then 1 / max(1, t - t0); whether a step averages is a
flag from the host, so each step runs a branch-free variant)
"""

from .spec import Hyper, Rule, Slot, f32


def make_rule(maximize=False, decay=False, average=False):
    def asgd_elem(p, g, ax, k):
        wd, decay_f, eta, mu = k
        if maximize:
            g = -g
        if decay:
            g = g + wd * p
        p = p * decay_f
        p = p - eta * g
        if average:
            ax = ax + (p - ax) * mu
        else:
            ax = p
        return p, ax

    return asgd_elem


def _flags_of(hp, step, hs):
    return {
        "maximize": hp["maximize"],
        "decay": hp["weight_decay"] != 0,
        "average": hs["mu"] != 1.0,
    }


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
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("lambd", 1e-4),
        Hyper("alpha", 0.75, "real"),
        # t0 = 0 (the probe) averages from step 3 on: every variant within a few steps
        Hyper("t0", 1e6, "real", probe=0.0),
        Hyper("weight_decay", 0.0, probe=0.1),
        Hyper("maximize", False, "bool", fixed=True),
    ),
    slots=(Slot("ax"),),
    scalars=("wd", "decay_f", "eta", "mu"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    host_state=(("eta", "lr"), ("mu", 1.0)),
    advance=_advance,
)
