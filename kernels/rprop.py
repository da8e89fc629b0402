"""Rprop (Riedmiller & Braun 1993): per-element step sizes driven by gradient signs only.

    s = sign(g·prev):  η = η+ (s > 0), η− (s < 0), 1 (s = 0)
    step_size = clamp(step_size·η, step_size_min, step_size_max);  g = 0 where s < 0
    p = p − sign(g)·step_size;  prev = g

lr is every step size's first value (``torch.optim.Rprop``).
"""

from .shared import MAXIMIZE
from .spec import Elem, Hyper, Rule, Slot


def make_rule(maximize: bool = False) -> Elem:
    """Per element (``zero`` from the host: a literal in the rule would be a float64):

    g = -g if maximize
    s = g*prev
    s > 0: size = size*etaplus;  s < 0: size = size*etaminus, g = 0;  s = 0: size unchanged
    size = clamp(size, step_size_min, step_size_max)
    p = p - sign(g)*size;  prev = g

    torch's sign(NaN) is 0: a NaN product leaves the step size, a NaN gradient leaves p, and
    prev keeps the NaN.
    """

    def rprop_elem(p, g, prev, size, k):
        etaminus, etaplus, step_size_min, step_size_max, zero = k
        if maximize:
            g = -g
        s = g * prev
        if s > 0:
            size = size * etaplus
        elif s < 0:
            size = size * etaminus
            g = zero  # torch zeroes the gradient where its sign flipped
        if size < step_size_min:
            size = step_size_min
        if size > step_size_max:
            size = step_size_max
        # p - sign(g)*size: no step where g is 0 or NaN (torch's sign of both is 0)
        if g > 0:
            p = p - size
        elif g < 0:
            p = p + size
        prev = g
        return p, prev, size

    return rprop_elem


def _flags_of(hp, step, hs):
    return {"maximize": hp["maximize"]}


def _scalars_of(hp, step, hs):
    etaminus, etaplus = hp["etas"]
    lo, hi = hp["step_sizes"]
    return {
        "etaminus": etaminus,
        "etaplus": etaplus,
        "step_size_min": lo,
        "step_size_max": hi,
        "zero": 0.0,  # a literal in the rule would be a float64
    }


RULE = Rule(
    name="rprop",
    class_name="Rprop",
    hyper=(
        Hyper("lr", 1e-2),
        Hyper("etas", (0.5, 1.2), "etas"),
        Hyper("step_sizes", (1e-6, 50.0), "range"),
        MAXIMIZE,
    ),
    # every step size starts at lr (torch fills it when it creates the state, at the first step)
    slots=(
        Slot("prev", quantize=False),
        Slot("step_size", init="lr", even=True, quantize=False),
    ),
    scalars=("etaminus", "etaplus", "step_size_min", "step_size_max", "zero"),
    make_rule=make_rule,
    flags_of=_flags_of,
    scalars_of=_scalars_of,
    test_hp=dict(lr=0.05, etas=(0.4, 1.3), step_sizes=(0.005, 0.08)),
)
