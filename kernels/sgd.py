"""Stochastic gradient descent, with optional momentum and Nesterov momentum.

    g = grad + wd·p
    b = g (first step);  b = μ·b + (1−τ)·g (later)
    g = g + μ·b (nesterov)  or  g = b
    p = p − lr·g

``torch.optim.SGD``; the Nesterov form of Sutskever et al. 2013 as PyTorch writes it.
"""

from .shared import MAXIMIZE, WEIGHT_DECAY, prologue, prologue_flags, prologue_scalars
from .spec import Elem, Hyper, Rule, Slot, where


def make_rule(
    maximize: bool = False, decay: bool = False, momentum: bool = False, nesterov: bool = False
) -> Elem:
    """Per element, after the prologue (maximize, L2 decay):

    b = mu_b*b + omd_b*g          (mu_b = 0, omd_b = 1 on the first step: b = g)
    g = g + mu*b if nesterov else b
    p = p - lr*g
    """

    def sgd_elem(p, g, b, k):
        wd, mu_b, omd_b, mu, lr = k
        p, g = prologue(p, g, wd, wd, maximize, decay, False)
        if momentum:
            b = mu_b * b + omd_b * g
            if nesterov:
                g = g + mu * b
            else:
                g = b
        p = p - lr * g
        return p, b

    return sgd_elem


def _flags_of(hp, step, hs):
    return {**prologue_flags(hp), "momentum": hp["momentum"] != 0, "nesterov": hp["nesterov"]}


def _scalars_of(hp, step, hs):
    first = step == 1  # torch's first momentum step copies the gradient: no dampening
    return {
        **prologue_scalars(hp),
        "mu_b": where(first, 0.0, hp["momentum"]),
        "omd_b": where(first, 1.0, 1.0 - hp["dampening"]),
        "mu": hp["momentum"],
        "lr": hp["lr"],
    }


def _check(hp):
    if hp.get("nesterov") and (hp.get("momentum", 0.0) <= 0 or hp.get("dampening", 0.0) != 0):
        raise ValueError(
            f"invalid nesterov=True with momentum={hp.get('momentum')!r} and "
            f"dampening={hp.get('dampening')!r}; Nesterov momentum requires "
            "momentum > 0 and dampening = 0"
        )


RULE = Rule(
    name="sgd",
    class_name="SGD",
    hyper=(
        Hyper("lr", 1e-3),
        Hyper("momentum", 0.0, probe=0.9),
        Hyper("dampening", 0.0, probe=0.3),
        WEIGHT_DECAY,
        Hyper("nesterov", False, "bool", fixed=True),
        MAXIMIZE,
    ),
    # b = 0*b + g on step 1: the buffer is reset first, so whatever it held (NaN) cannot leak
    slots=(Slot("momentum_buffer", when="momentum", fresh=True),),
    scalars=("wd", "mu_b", "omd_b", "mu", "lr"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    check=_check,
    excluded=((("nesterov", True), ("momentum", False)),),
    test_hp=dict(lr=0.05),
)
