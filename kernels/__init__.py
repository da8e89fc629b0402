"""Per-element update rules: the math of every optimizer, once, in plain Python.

Each module defines ``make_rule(**flags)`` returning a function

    rule(p, g, s0[, s1, s2], k) -> (p, s0[, s1, s2])

over *scalars* of one element. ``k`` is a tuple of host-computed scalars in the buffer dtype
(see ``fastopt.functional``); flags are closure constants, so every flag combination compiles to
its own branch-free variant. The same function is compiled by ``numba.njit(inline="always")``
for the CPU loop and by ``numba.cuda.jit(device=True)`` for the GPU kernel. Rules hold no float
literals: a Python float is float64 and would promote float32 math.

The CUDA C bodies of the CuPy kernels live beside them (``<name>.cu``) and use the same
statements, names and order.
"""
from . import adagrad, adam, lion, rmsprop, sgd

#: rule name -> module; each module has ``make_rule``, ``STATE`` (slot names) and ``SCALARS``.
RULES = {"sgd": sgd, "adagrad": adagrad, "rmsprop": rmsprop, "adam": adam, "lion": lion}

__all__ = ["RULES", "adagrad", "adam", "lion", "rmsprop", "sgd"]
