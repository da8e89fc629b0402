"""NAdam (PyTorch's form: Dozat's momentum schedule mu_t, its running product on the host).

g = -g if maximize
decoupled: p = p * decay  (decay = 1 - lr*wd)    else g = g + wd*p
m = m + omb1*(g - m);  v = beta2*v + omb2*g*g       (torch's lerp for m)
d = sqrt(v / bc2) + eps
p = p - c_g*g / d;  p = p - c_m*m / d
(mu_t = beta1*(1 - 0.96^(t*psi)/2), P_t = P_{t-1}*mu_t kept in float32 as torch's
``mu_product``; c_g = lr*(1 - mu_t)/(1 - P_t), c_m = lr*mu_{t+1}/(1 - P_t*mu_{t+1}))
"""

import math

from .spec import Hyper, Rule, Slot, host_round


def make_rule(maximize=False, decay=False, decoupled=False):
    def nadam_elem(p, g, m, v, k):
        wd, decay_f, omb1, beta2, omb2, bc2, eps, c_g, c_m = k
        if maximize:
            g = -g
        if decay:
            if decoupled:
                p = p * decay_f
            else:
                g = g + wd * p
        m = m + omb1 * (g - m)
        v = beta2 * v + omb2 * g * g
        d = math.sqrt(v / bc2) + eps
        p = p - c_g * g / d
        p = p - c_m * m / d
        return p, m, v

    return nadam_elem


def _mu(hp, step):
    return hp["betas"][0] * (1.0 - 0.5 * 0.96 ** (step * hp["momentum_decay"]))


def _mu_product(hp, step, hs):
    """``mu_product`` after step ``step``: torch's ``mu_product *= mu`` in the host state's
    dtype (float32, or float64 where torch's load widened it: ``spec.host_round``)."""
    return host_round(host_round(hs["mu_product"]) * host_round(_mu(hp, step)))


def _flags_of(hp, step, hs):
    return {
        "maximize": hp["maximize"],
        "decay": hp["weight_decay"] != 0,
        "decoupled": hp["decoupled_weight_decay"],
    }


def _scalars_of(hp, step, hs):
    beta1, beta2 = hp["betas"]
    lr = hp["lr"]
    mu, mu_next = _mu(hp, step), _mu(hp, step + 1)
    mu_product = _mu_product(hp, step, hs)
    return {
        "wd": hp["weight_decay"],
        "decay_f": 1.0 - lr * hp["weight_decay"],
        "omb1": 1.0 - beta1,
        "beta2": beta2,
        "omb2": 1.0 - beta2,
        "bc2": 1.0 - beta2**step,
        "eps": hp["eps"],
        "c_g": lr * (1.0 - mu) / (1.0 - mu_product),
        "c_m": lr * mu_next / (1.0 - mu_product * mu_next),
    }


def _advance(hp, step, hs):
    return {"mu_product": _mu_product(hp, step, hs)}


RULE = Rule(
    name="nadam",
    hyper=(
        Hyper("lr", 2e-3),
        Hyper("betas", (0.9, 0.999), "betas"),
        Hyper("eps", 1e-8),
        Hyper("weight_decay", 0.0, probe=0.1),
        Hyper("momentum_decay", 4e-3),
        Hyper("decoupled_weight_decay", False, "bool", fixed=True),
        Hyper("maximize", False, "bool", fixed=True),
    ),
    slots=(Slot("exp_avg"), Slot("exp_avg_sq")),
    scalars=("wd", "decay_f", "omb1", "beta2", "omb2", "bc2", "eps", "c_g", "c_m"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    host_state=(("mu_product", 1.0),),
    advance=_advance,
)
