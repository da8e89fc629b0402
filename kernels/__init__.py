"""Per-element update rules: the math of every optimizer, once, in plain Python.

Each rule module declares ``RULE`` (a ``spec.Rule``: hyperparameters, state slots, flags, host
scalars and the per-element function ``make_rule(**flags)``), and its CUDA C body lives beside
it (``<name>.cu``), the same statements with the same names in the same order. The per-element
function

    rule(p, g, s0, .., s{k-1}, k) -> (p, s0, .., s{k-1})

works on *scalars* of one element; ``k`` is the tuple of host scalars in the buffer dtype. Flags
are closure constants, so every flag combination compiles to its own branch-free variant; the
same function is compiled by ``numba.njit`` (inlined) for the CPU loop and by
``numba.cuda.jit(device=True)`` for the GPU kernel. Rules hold no float literals: a Python float
is float64 and would promote float32 math.

``RULES`` maps each rule's name to its ``Rule``; a new rule module needs one line here.
"""

from . import (  # noqa: F401 (one line per rule module: RULES reads them all)
    adadelta,
    adagrad,
    adam,
    adamax,
    asgd,
    lion,
    nadam,
    radam,
    rmsprop,
    rprop,
    sgd,
)
from .spec import Rule

#: rule name -> its spec (``spec.Rule``): the ``RULE`` of every module imported above
RULES = {
    m.RULE.name: m.RULE
    for m in tuple(globals().values())
    if isinstance(getattr(m, "RULE", None), Rule)
}

__all__ = ["RULES"]
