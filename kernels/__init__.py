"""Per-element update rules: the math of every optimizer, once, in plain Python.

Each rule module declares ``RULE`` (a ``spec.Rule``: hyperparameters, state slots, flags, host
scalars, the per-element function ``make_rule(**flags)`` and its optimizer class's name), and
its CUDA C body lives beside it (``<name>.cu``), the same statements with the same names in the
same order. The per-element function

    rule(p, g, s0, .., s{k-1}, k) -> (p, s0, .., s{k-1})

works on *scalars* of one element; ``k`` is the tuple of host scalars in the buffer dtype. Flags
are closure constants, so every flag combination compiles to its own branch-free variant; the
same function is compiled by ``numba.njit`` (inlined) for the CPU loop and by
``numba.cuda.jit(device=True)`` for the GPU kernel. Rules hold no float literals: a Python float
is float64 and would promote float32 math. The pieces several rules share (the gradient
prologue, the Adam family's scalars) live in ``shared.py`` and ``shared.cuh``.

``RULES`` maps each rule's name to its ``Rule``, in the order of ``MODULES``: a new rule module
needs one line there.
"""

import importlib

from .spec import Rule

#: the rule modules, in the order their optimizers are listed (the chapter's first, then as
#: they were added): one line per rule
MODULES = (
    "sgd",
    "adagrad",
    "rmsprop",
    "adam",
    "lion",
    "adamax",
    "nadam",
    "radam",
    "adadelta",
    "rprop",
    "asgd",
    "adabelief",
    "adan",
    "ademamix",
)


def _rules():
    out = {}
    for module in MODULES:
        rule = importlib.import_module(f".{module}", __name__).RULE
        if not isinstance(rule, Rule) or rule.name != module:
            raise TypeError(f"kernels/{module}.py must declare RULE = Rule(name={module!r}, ...)")
        out[rule.name] = rule
    return out


#: rule name -> its spec (``spec.Rule``), in the order of ``MODULES``
RULES = _rules()

__all__ = ["MODULES", "RULES"]
