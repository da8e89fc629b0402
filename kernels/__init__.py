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

from . import adagrad, adam, lion, rmsprop, sgd

#: rule name -> its spec (``spec.Rule``)
RULES = {m.RULE.name: m.RULE for m in (sgd, adagrad, rmsprop, adam, lion)}

__all__ = ["RULES"]
