"""The pieces several rules share, declared once.

**The gradient prologue** (torch.optim's first lines of nearly every optimizer), per element:

    g = -g                  with maximize
    p = p * decay_f         with decay, decoupled   (decay_f = 1 - lr*weight_decay: AdamW's form)
    g = g + wd*p            with decay, otherwise    (wd = weight_decay: L2, into the gradient)

``prologue`` is that per-element helper (its CUDA C counterpart, the same statements, is
``kernels/shared.cuh``); ``prologue_flags`` and ``prologue_scalars`` are its flags
(``maximize``, and ``decay`` when ``weight_decay != 0``; a rule with both forms adds
``decoupled``, from its ``decoupled_weight_decay``) and host scalars (``wd``, ``decay_f``). A
rule with one form passes it as a constant: ``decoupled=False`` with ``wd`` twice (L2 only:
SGD, AdaGrad, ...), ``decoupled=True`` with ``decay_f`` twice (Lion); the argument a form
never reads is a placeholder, as an absent slot's is.

**The Adam family's host scalars** (``adam_scalars``): for each beta, ``beta<i>``,
``omb<i> = 1 - beta<i>`` and ``bc<i> = 1 - beta<i>^t``; ``step_size = lr / bc1`` and
``inv_sqrt_bc2 = 1 / sqrt(bc2)``, in float64 on the host (``betas_scalars``: the first two
alone, for a rule without bias correction).

**The hyperparameters every rule spells alike**: ``MAXIMIZE`` (keyword-only, as torch's) and
``WEIGHT_DECAY``.
"""

from collections.abc import Sequence

from .spec import Hyper, Hyperparams, Real, helper, sqrt

__all__ = [
    "MAXIMIZE",
    "WEIGHT_DECAY",
    "adam_scalars",
    "betas_scalars",
    "prologue",
    "prologue_flags",
    "prologue_scalars",
]

#: ``maximize``: the gradient negated first (a flag; keyword-only, as in torch.optim)
MAXIMIZE = Hyper("maximize", False, "bool", fixed=True, keyword_only=True)
#: ``weight_decay``: L2 or decoupled decay, by the rule (probe 0.1 brings the term into play)
WEIGHT_DECAY = Hyper("weight_decay", 0.0, probe=0.1)


@helper
def prologue(
    p: Real, g: Real, wd: Real, decay_f: Real, maximize: bool, decay: bool, decoupled: bool
) -> tuple[Real, Real]:
    """``(p, g)`` after the gradient prologue (see the module docstring); the flags are the
    variant's constants, so each variant compiles branch-free."""
    if maximize:
        g = -g
    if decay:
        if decoupled:
            p = p * decay_f
        else:
            g = g + wd * p
    return p, g


def prologue_flags(hp: Hyperparams) -> dict[str, bool]:
    """The prologue's flags of the hyperparameters ``hp``: ``maximize`` and ``decay``."""
    return {"maximize": hp["maximize"], "decay": hp["weight_decay"] != 0}


def prologue_scalars(hp: Hyperparams) -> dict[str, Real]:
    """The prologue's host scalars: ``wd`` (L2) and ``decay_f = 1 - lr*weight_decay``
    (decoupled); a rule's ``scalars`` name the ones its kernels take."""
    return {"wd": hp["weight_decay"], "decay_f": 1.0 - hp["lr"] * hp["weight_decay"]}


def betas_scalars(betas: Sequence[Real]) -> dict[str, Real]:
    """``beta<i>`` and ``omb<i> = 1 - beta<i>`` for each of ``betas`` (a pair or a triple)."""
    beta1, beta2 = betas[0], betas[1]
    out = {"beta1": beta1, "omb1": 1.0 - beta1, "beta2": beta2, "omb2": 1.0 - beta2}
    if len(betas) > 2:
        out["beta3"] = betas[2]
        out["omb3"] = 1.0 - betas[2]
    return out


def adam_scalars(lr: Real, betas: Sequence[Real], step: Real) -> dict[str, Real]:
    """The Adam family's host scalars of step ``step`` (see the module docstring), as a new
    dict the rule adds its own to. Written out rather than built from ``betas_scalars``: it
    runs on every step's host path."""
    beta1, beta2 = betas[0], betas[1]
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    out = {
        "beta1": beta1,
        "omb1": 1.0 - beta1,
        "beta2": beta2,
        "omb2": 1.0 - beta2,
        "bc1": bc1,
        "bc2": bc2,
        "step_size": lr / bc1,
        "inv_sqrt_bc2": 1.0 / sqrt(bc2),
    }
    if len(betas) > 2:
        beta3 = betas[2]
        out["beta3"] = beta3
        out["omb3"] = 1.0 - beta3
        out["bc3"] = 1.0 - beta3**step
    return out
