"""AdaBelief (Zhuang et al. 2020, "AdaBelief Optimizer: Adapting Stepsizes by the Belief in
Observed Gradients"): Adam whose second moment tracks how far the gradient strays from its
running mean, its "belief", rather than the gradient's square.

    m = β1·m + (1−β1)·g;  s = β2·s + (1−β2)·(g − m)² + eps_root
    m̂ = m / (1−β1^t)     (nesterov: β1·m / (1−β1^(t+1)) + (1−β1)·g / (1−β1^t))
    p = p − lr · m̂ / (√(s / (1−β2^t)) + eps)

``optax.adabelief`` (0.2.8), its defaults under torch-style names: ``betas`` is optax's
``(b1, b2)``, and ``lr`` (which optax leaves to the caller) defaults to the paper's 1e-3. The
difference ``g − m`` takes the updated mean, and eps_root is added to s, which keeps it. State
``exp_avg`` is optax's ``mu``, ``exp_avg_var`` its ``nu``.
"""

import math

from .shared import MAXIMIZE, adam_scalars
from .spec import Elem, Hyper, Rule, Slot


def make_rule(maximize: bool = False, nesterov: bool = False) -> Elem:
    """Per element, with ``inv_sqrt_bc2 = 1/sqrt(1 - beta2^t)`` and the step sizes from the
    host (``c_m = lr/(1 - beta1^t)``; with nesterov ``c_m = lr*beta1/(1 - beta1^(t+1))`` and
    ``c_g = lr*(1 - beta1)/(1 - beta1^t)``):

    g = -g if maximize
    m = beta1*m + omb1*g;  e = g - m;  s = beta2*s + omb2*(e*e) + eps_root
    d = sqrt(s)*inv_sqrt_bc2 + eps
    p = p - (c_m*m + c_g*g) / d   with nesterov,   else p = p - c_m*m / d
    """

    def adabelief_elem(p, g, m, s, k):
        beta1, omb1, beta2, omb2, eps_root, inv_sqrt_bc2, eps, c_m, c_g = k
        if maximize:
            g = -g
        m = beta1 * m + omb1 * g
        e = g - m
        s = beta2 * s + omb2 * (e * e) + eps_root
        d = math.sqrt(s) * inv_sqrt_bc2 + eps
        if nesterov:
            p = p - (c_m * m + c_g * g) / d
        else:
            p = p - c_m * m / d
        return p, m, s

    return adabelief_elem


def _flags_of(hp, step, hs):
    return {"maximize": hp["maximize"], "nesterov": hp["nesterov"]}


def _scalars_of(hp, step, hs):
    lr, beta1 = hp["lr"], hp["betas"][0]
    out = adam_scalars(lr, hp["betas"], step)
    out.update(eps_root=hp["eps_root"], eps=hp["eps"], c_m=out["step_size"], c_g=0.0)
    if hp["nesterov"]:
        out["c_m"] = lr * beta1 / (1.0 - beta1 ** (step + 1))
        out["c_g"] = lr * out["omb1"] / out["bc1"]
    return out


RULE = Rule(
    name="adabelief",
    class_name="AdaBelief",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999), "betas"),
        Hyper("eps", 1e-16),
        Hyper("eps_root", 1e-16),
        Hyper("nesterov", False, "bool", fixed=True, keyword_only=True),
        MAXIMIZE,
    ),
    slots=(Slot("exp_avg"), Slot("exp_avg_var", even=True)),
    scalars=("beta1", "omb1", "beta2", "omb2", "eps_root", "inv_sqrt_bc2", "eps", "c_m", "c_g"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    # eps and eps_root large enough to show where each enters
    test_hp=dict(lr=0.01, betas=(0.8, 0.95), eps=1e-3, eps_root=1e-3),
)
