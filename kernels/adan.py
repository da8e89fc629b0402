"""Adan (Xie et al. 2022, "Adan: Adaptive Nesterov Momentum Algorithm for Faster Optimizing
Deep Models"): Nesterov momentum estimated from the gradient difference, in three moments.

    Δ = g − g_prev  (0 on the first step);  m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·Δ
    n = β3·n + (1−β3)·(g + (1−β2)·Δ)²
    u = (m/(1−β1^t) + (1−β2)·v/(1−β2^t)) / (√(n/(1−β3^t) + eps_root) + eps)
    p = p − lr·(u + wd·p)

``optax.adan`` (0.2.8), its defaults under torch-style names: ``betas`` is optax's
``(b1, b2, b3)``, and ``lr`` (which optax leaves to the caller) defaults to 1e-3. The weight
decay is optax's ``add_decayed_weights`` after the scaling: decoupled from the moments, scaled
by lr. State ``exp_avg``, ``exp_avg_diff``, ``exp_avg_sq`` and ``prev_grad`` are optax's ``m``,
``v``, ``n`` and ``g``.
"""

import math

from .shared import MAXIMIZE, WEIGHT_DECAY, adam_scalars, prologue_flags
from .spec import Elem, Hyper, Rule, Slot, where


def make_rule(
    maximize: bool = False, decay: bool = False, first: bool = False, select: bool = False
) -> Elem:
    """Per element, with ``inv_bc1 = 1/(1 - beta1^t)``, ``c_v = (1 - beta2)/(1 - beta2^t)`` and
    ``inv_bc3 = 1/(1 - beta3^t)`` from the host:

    g = -g if maximize
    m = beta1*m + omb1*g
    first step: v = beta2*v;  sq = g      (no previous gradient: optax takes no difference)
    later:      diff = g - prev;  v = beta2*v + omb2*diff;  sq = g + omb2*diff
    n = beta3*n + omb3*(sq*sq)
    u = (m*inv_bc1 + c_v*v) / (sqrt(n*inv_bc3 + eps_root) + eps);  u = u + wd*p with decay
    p = p - lr*u;  prev = g

    Whether a step is the first is a flag from the host, as RAdam's rectification is: each step
    runs a branch-free variant, and the first never reads ``prev_grad``. The device's variant
    (``select``, ``Rule.device_flags``: the scalars computed on the device, where no host picks
    a variant per step) computes both forms and keeps the later one where ``later > first_f``
    (later = 1, first_f = 0 after the first step), the same values as either host variant.
    The decay is optax's, added to the update before lr scales it, not the prologue's
    ``p*(1 - lr*wd)``: in float32, ``1 - lr*wd`` rounds to the spacing of floats near 1
    (6e-8), a visible share of a small ``lr*wd``.
    """

    def adan_elem(p, g, m, v, n, prev, k):
        (beta1, omb1, beta2, omb2, beta3, omb3,
         inv_bc1, c_v, inv_bc3, eps_root, eps, wd, lr, later, first_f) = k  # fmt: skip
        if maximize:
            g = -g
        m = beta1 * m + omb1 * g
        if select:  # the step's scalars choose (one value for every element)
            diff = g - prev
            v_later = beta2 * v + omb2 * diff
            sq_later = g + omb2 * diff
            v_first = beta2 * v
            v = v_later if later > first_f else v_first
            sq = sq_later if later > first_f else g
        elif first:
            v = beta2 * v
            sq = g
        else:
            diff = g - prev
            v = beta2 * v + omb2 * diff
            sq = g + omb2 * diff
        n = beta3 * n + omb3 * (sq * sq)
        u = (m * inv_bc1 + c_v * v) / (math.sqrt(n * inv_bc3 + eps_root) + eps)
        if decay:
            u = u + wd * p
        p = p - lr * u
        prev = g
        return p, m, v, n, prev

    return adan_elem


def _flags_of(hp, step, hs):
    return {**prologue_flags(hp), "first": step == 1, "select": False}


def _device_flags(hp):
    """The device's variant: the first step's form kept where ``later <= first_f``."""
    return {**prologue_flags(hp), "first": False, "select": True}


def _scalars_of(hp, step, hs):
    out = adam_scalars(hp["lr"], hp["betas"], step)
    out.update(
        inv_bc1=1.0 / out["bc1"],
        c_v=out["omb2"] / out["bc2"],
        inv_bc3=1.0 / out["bc3"],
        eps_root=hp["eps_root"],
        eps=hp["eps"],
        wd=hp["weight_decay"],
        lr=hp["lr"],
        later=where(step == 1, 0.0, 1.0),
        first_f=where(step == 1, 1.0, 0.0),
    )
    return out


RULE = Rule(
    name="adan",
    class_name="Adan",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("betas", (0.98, 0.92, 0.99), "betas"),
        Hyper("eps", 1e-8),
        Hyper("eps_root", 1e-8),
        WEIGHT_DECAY,
        MAXIMIZE,
    ),
    slots=(
        Slot("exp_avg"),
        Slot("exp_avg_diff"),
        Slot("exp_avg_sq", even=True),
        Slot("prev_grad", quantize=False),
    ),
    scalars=(
        "beta1",
        "omb1",
        "beta2",
        "omb2",
        "beta3",
        "omb3",
        "inv_bc1",
        "c_v",
        "inv_bc3",
        "eps_root",
        "eps",
        "wd",
        "lr",
        "later",
        "first_f",
    ),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    excluded=((("first", True), ("select", True)),),
    device_flags=_device_flags,
    # betas small enough that all three moments move; eps and eps_root large enough to show
    test_hp=dict(lr=0.01, betas=(0.8, 0.7, 0.9), eps=1e-3, eps_root=1e-3),
)
