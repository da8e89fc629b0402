"""NAdam (Dozat 2016, "Incorporating Nesterov Momentum into Adam"): Adam with Nesterov
momentum through a warming-up momentum schedule μ_t.

    g = grad + wd·p   (decoupled_weight_decay: p = p·(1 − lr·wd) instead)
    m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²;  d = √(v / (1−β2^t)) + eps
    μ_t = β1·(1 − 0.96^(t·ψ)/2);  Π_t = Π_{t−1}·μ_t   (``mu_product``, float32 as torch)
    p = p − lr·(1−μ_t)/(1−Π_t) · g/d − lr·μ_{t+1}/(1−Π_t·μ_{t+1}) · m/d

ψ is ``momentum_decay`` (``torch.optim.NAdam``).
"""

import math

from .shared import (
    MAXIMIZE,
    WEIGHT_DECAY,
    adam_scalars,
    prologue,
    prologue_flags,
    prologue_scalars,
)
from .spec import Elem, Hyper, Rule, Slot, host_round


def make_rule(maximize: bool = False, decay: bool = False, decoupled: bool = False) -> Elem:
    """Per element, after the prologue (maximize, L2 or decoupled decay), with
    ``bc2 = 1 - beta2^t`` and the two step sizes from the host:

    m = m + omb1*(g - m);  v = beta2*v + omb2*g*g       (torch's lerp for m)
    d = sqrt(v / bc2) + eps
    p = p - c_g*g / d;  p = p - c_m*m / d
    (mu_t = beta1*(1 - 0.96^(t*psi)/2), P_t = P_{t-1}*mu_t kept in float32 as torch's
    ``mu_product``; c_g = lr*(1 - mu_t)/(1 - P_t), c_m = lr*mu_{t+1}/(1 - P_t*mu_{t+1}))
    """

    def nadam_elem(p, g, m, v, k):
        wd, decay_f, omb1, beta2, omb2, bc2, eps, c_g, c_m = k
        p, g = prologue(p, g, wd, decay_f, maximize, decay, decoupled)
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
    return {**prologue_flags(hp), "decoupled": hp["decoupled_weight_decay"]}


def _scalars_of(hp, step, hs):
    lr = hp["lr"]
    mu, mu_next = _mu(hp, step), _mu(hp, step + 1)
    mu_product = _mu_product(hp, step, hs)
    out = adam_scalars(lr, hp["betas"], step)
    out.update(
        prologue_scalars(hp),
        eps=hp["eps"],
        c_g=lr * (1.0 - mu) / (1.0 - mu_product),
        c_m=lr * mu_next / (1.0 - mu_product * mu_next),
    )
    return out


def _advance(hp, step, hs):
    return {"mu_product": _mu_product(hp, step, hs)}


RULE = Rule(
    name="nadam",
    class_name="NAdam",
    hyper=(
        Hyper("lr", 2e-3),
        Hyper("betas", (0.9, 0.999), "betas"),
        Hyper("eps", 1e-8),
        WEIGHT_DECAY,
        Hyper("momentum_decay", 4e-3),
        Hyper("decoupled_weight_decay", False, "bool", fixed=True),
        MAXIMIZE,
    ),
    slots=(Slot("exp_avg"), Slot("exp_avg_sq", even=True)),
    scalars=("wd", "decay_f", "omb1", "beta2", "omb2", "bc2", "eps", "c_g", "c_m"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    host_state=(("mu_product", 1.0),),
    advance=_advance,
    test_hp=dict(lr=0.01, betas=(0.8, 0.95), momentum_decay=0.05),
)
