"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

g = -g if maximize
p = p * decay                      (decay = 1 - lr*wd)
c = beta1*m + omb1*g;  p = p - lr*sign(c)
m = beta2*m + omb2*g
"""

from .spec import Hyper, Rule, Slot


def make_rule(maximize=False, decay=False):
    def lion_elem(p, g, m, k):
        decay_f, beta1, omb1, beta2, omb2, lr = k
        if maximize:
            g = -g
        if decay:
            p = p * decay_f
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
    return {"maximize": hp["maximize"], "decay": hp["weight_decay"] != 0}


def _scalars_of(hp, step, hs):
    beta1, beta2 = hp["betas"]
    return {
        "decay_f": 1.0 - hp["lr"] * hp["weight_decay"],
        "beta1": beta1,
        "omb1": 1.0 - beta1,
        "beta2": beta2,
        "omb2": 1.0 - beta2,
        "lr": hp["lr"],
    }


RULE = Rule(
    name="lion",
    hyper=(
        Hyper("lr", 1e-4),
        Hyper("betas", (0.9, 0.99), "betas"),
        Hyper("weight_decay", 0.0, probe=0.1),
        Hyper("maximize", False, "bool", fixed=True),
    ),
    slots=(Slot("exp_avg"),),
    scalars=("decay_f", "beta1", "omb1", "beta2", "omb2", "lr"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
)
