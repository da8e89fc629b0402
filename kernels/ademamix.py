"""AdEMAMix (Pagliardini et al. 2024, "The AdEMAMix Optimizer: Better, Faster, Older"): Adam
with a mixture of two moving averages of the gradient, a fast one (β1, bias-corrected) and a
slow one (β3, not corrected: it fills slowly) weighted by α.

    m1 = β1·m1 + (1−β1)·g;  m2 = β3·m2 + (1−β3)·g;  ν = β2·ν + (1−β2)·g²
    u = (m1/(1−β1^t) + α·m2) / (√(ν/(1−β2^t) + eps_root) + eps)
    p = p − lr·(u + wd·p)

``optax.contrib.ademamix`` (0.2.8) with constant ``b3`` and ``alpha`` (optax also takes
schedules for them), its defaults under torch-style names: ``betas`` is optax's
``(b1, b2, b3)``, and ``lr`` (which optax leaves to the caller) defaults to 1e-3. The weight
decay is optax's ``add_decayed_weights`` after the scaling: decoupled from the moments, scaled
by lr. State ``exp_avg_fast``, ``exp_avg_slow`` and ``exp_avg_sq`` are optax's ``m1``, ``m2``
and ``nu``.
"""

import math

from .shared import MAXIMIZE, WEIGHT_DECAY, adam_scalars, prologue_flags
from .spec import Elem, Hyper, Rule, Slot


def make_rule(maximize: bool = False, decay: bool = False) -> Elem:
    """Per element, with ``inv_bc1 = 1/(1 - beta1^t)`` and ``inv_bc2 = 1/(1 - beta2^t)`` from
    the host:

    g = -g if maximize
    m1 = beta1*m1 + omb1*g;  m2 = beta3*m2 + omb3*g;  nu = beta2*nu + omb2*(g*g)
    u = (m1*inv_bc1 + alpha*m2) / (sqrt(nu*inv_bc2 + eps_root) + eps);  u = u + wd*p with decay
    p = p - lr*u

    The decay is optax's, added to the update before lr scales it (as Adan's: see there).
    """

    def ademamix_elem(p, g, m1, m2, nu, k):
        (beta1, omb1, beta2, omb2, beta3, omb3,
         inv_bc1, alpha, inv_bc2, eps_root, eps, wd, lr) = k  # fmt: skip
        if maximize:
            g = -g
        m1 = beta1 * m1 + omb1 * g
        m2 = beta3 * m2 + omb3 * g
        nu = beta2 * nu + omb2 * (g * g)
        u = (m1 * inv_bc1 + alpha * m2) / (math.sqrt(nu * inv_bc2 + eps_root) + eps)
        if decay:
            u = u + wd * p
        p = p - lr * u
        return p, m1, m2, nu

    return ademamix_elem


def _flags_of(hp, step, hs):
    return prologue_flags(hp)


def _scalars_of(hp, step, hs):
    out = adam_scalars(hp["lr"], hp["betas"], step)
    out.update(
        inv_bc1=1.0 / out["bc1"],
        alpha=hp["alpha"],
        inv_bc2=1.0 / out["bc2"],
        eps_root=hp["eps_root"],
        eps=hp["eps"],
        wd=hp["weight_decay"],
        lr=hp["lr"],
    )
    return out


RULE = Rule(
    name="ademamix",
    class_name="AdEMAMix",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.9, 0.999, 0.9999), "betas"),
        Hyper("alpha", 5.0),
        Hyper("eps", 1e-8),
        Hyper("eps_root", 0.0),
        WEIGHT_DECAY,
        MAXIMIZE,
    ),
    slots=(Slot("exp_avg_fast"), Slot("exp_avg_slow"), Slot("exp_avg_sq", even=True)),
    scalars=(
        "beta1",
        "omb1",
        "beta2",
        "omb2",
        "beta3",
        "omb3",
        "inv_bc1",
        "alpha",
        "inv_bc2",
        "eps_root",
        "eps",
        "wd",
        "lr",
    ),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    # betas small enough that all three averages move; eps and eps_root large enough to show
    test_hp=dict(lr=0.01, betas=(0.8, 0.95, 0.9), eps=1e-3, eps_root=1e-3),
)
