"""The CUDA C bodies (``<rule>.cu``) and the pieces of a CuPy ``ElementwiseKernel`` built from them.

Each ``<rule>.cu`` defines ``template <typename T> <rule>_elem(T &p, T g, T &s0.., scalars..)``,
the statements of the Python rule in the same order, with every flag a 0/1 macro. A compiled
variant is the body behind one ``#define`` per flag; its kernel reads each array once into a
local, calls the rule, and writes param and the used state slots back once:

    in_params  = "T grad, T <scalar>, ..."          (SCALARS of the rule, in the buffer type)
    out_params = "T param, T <slot>, ..."           (only the slots this variant touches)

A slot the variant never touches (the momentum buffer of plain SGD, ``max_exp_avg_sq`` without
AMSGRAD, ...) is not a kernel parameter at all, so it costs no memory traffic. Nothing here
imports CuPy: the CPU harness and the compile checks build the same text.
"""
import inspect
import itertools
from pathlib import Path

from . import RULES

__all__ = ["OPTIONAL", "flag_names", "variants", "slots_used", "body", "defines", "preamble",
           "in_params", "out_params", "operation", "kernel_name", "elementwise_args"]

#: optional state slot -> the flag whose variants read and write it; other slots always are
OPTIONAL = {
    "sgd": {"momentum_buffer": "momentum"},
    "rmsprop": {"grad_avg": "centered", "momentum_buffer": "momentum"},
    "adam": {"max_exp_avg_sq": "amsgrad"},
}


def flag_names(rule):
    """The variant flags of ``rule``: the keyword arguments of its ``make_rule``."""
    return tuple(inspect.signature(RULES[rule].make_rule).parameters)


def variants(rule):
    """Every flag combination of ``rule`` (dicts), each of which compiles to its own kernel."""
    names = flag_names(rule)
    return [dict(zip(names, bits)) for bits in itertools.product((False, True), repeat=len(names))]


def slots_used(rule, flags):
    """One bool per state slot of ``rule``: does the ``flags`` variant read and write it?"""
    opt = OPTIONAL.get(rule, {})
    return tuple(bool(flags.get(opt[s], False)) if s in opt else True for s in RULES[rule].STATE)


def body(rule):
    """The text of ``kernels/<rule>.cu``."""
    return Path(__file__).with_name(f"{rule}.cu").read_text()


def defines(rule, flags):
    """``{MACRO: 0 or 1}`` for every flag of ``rule`` (unknown flags are an error)."""
    names = flag_names(rule)
    unknown = set(flags) - set(names)
    if unknown:
        raise ValueError(f"rule {rule!r} has no flag {sorted(unknown)}; expected {list(names)}")
    return {n.upper(): int(bool(flags.get(n, False))) for n in names}


def preamble(rule, flags):
    """The ``ElementwiseKernel`` preamble of one variant: its ``#define``s, then the body."""
    lines = [f"#define {k} {v}" for k, v in defines(rule, flags).items()]
    return "\n".join(lines) + "\n" + body(rule)


def in_params(rule):
    """``"T grad, T wd, ..."``: the gradient, then the host scalars of the rule."""
    return ", ".join(f"T {n}" for n in ("grad",) + tuple(RULES[rule].SCALARS))


def out_params(rule, used):
    """``"T param, T exp_avg, ..."``: param and the state slots marked in ``used``."""
    slots = [s for s, u in zip(RULES[rule].STATE, used) if u]
    return ", ".join(f"T {n}" for n in ["param"] + slots)


def operation(rule, used):
    """The per-element code: one load per array into a local, the rule, one store per output.

    Locals rather than the kernel's references to global memory: a store through one reference
    could alias a later load through another, which would force extra memory traffic."""
    state = RULES[rule].STATE
    lines = ["T p_ = param;"]
    for i, (s, u) in enumerate(zip(state, used)):
        # an unused slot is a dead local: the variant's body never reads or writes it
        lines.append(f"T s{i}_ = {s};" if u else f"T s{i}_ = T(0);")
    args = ["p_", "grad"] + [f"s{i}_" for i in range(len(state))] + list(RULES[rule].SCALARS)
    lines.append(f"{rule}_elem<T>({', '.join(args)});")
    lines.append("param = p_;")
    lines += [f"{s} = s{i}_;" for i, (s, u) in enumerate(zip(state, used)) if u]
    return "\n".join(lines)


def kernel_name(rule):
    """``fastopt_<rule>``."""
    return f"fastopt_{rule}"


def elementwise_args(rule, flags):
    """``(in_params, out_params, operation, name, preamble)`` for ``cupy.ElementwiseKernel``."""
    used = slots_used(rule, flags)
    return (in_params(rule), out_params(rule, used), operation(rule, used), kernel_name(rule),
            preamble(rule, flags))
