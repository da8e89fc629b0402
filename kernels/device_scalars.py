"""The host scalars of a step computed on the device: what makes a step CUDA-graph capturable.

A capturable optimizer keeps its step count, its numeric hyperparameters and its host state in
one small float64 device array ``ctl = [step, hyperparameters..., host state...]``. Before the
update kernels of a step, a one-thread *scalar kernel* advances the step (unless the device
found-inf flag is set), computes the rule's host scalars from ``ctl`` exactly as
``Rule.scalars_of`` does on the host (in float64), writes them to ``k32``/``k64`` (the update
kernels read them there) with the step's rounding key (``keyp``), and advances the host state.
Nothing is read back to the host, so the whole step can be captured in a CUDA graph and
replayed; a new lr written into ``ctl`` between replays reaches the next replay.

The scalar kernel is not written by hand: ``trace`` runs the rule's ``scalars_of`` (and
``advance``) once on symbols that record their arithmetic (``+ - * / **``, comparisons,
``spec.sqrt``, ``spec.where``, ``spec.f32``), giving a straight-line ``Program``, which
``python_source`` (numba-cuda, and the simulator) and ``c_source`` (CuPy) emit. Boolean
hyperparameters are constants of the program (they select the compiled variant anyway); a rule
whose ``scalars_of`` branches with Python's ``if`` on the step or a numeric hyperparameter, or
whose ``flags_of`` depends on the step or the host state, cannot be recorded: ``trace`` raises
``NotCapturable`` naming the rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import RULES
from .spec import TUPLES

__all__ = [
    "NotCapturable",
    "Program",
    "c_source",
    "capturable",
    "ctl_values",
    "python_source",
    "trace",
]


class NotCapturable(TypeError):
    """A rule whose host scalars cannot be computed on the device (see the module docstring)."""


@dataclass
class Program:
    """A straight-line float64 program: ``inputs`` name the entries of ``ctl`` after the step
    (``ctl[1 + j]``), ``ops`` are ``(dst, op, args)``, ``outputs`` the rule's scalars and
    ``hs_out`` the host state after the step, each an operand (a variable or a constant)."""

    rule: str
    inputs: list[str] = field(default_factory=list)
    ops: list[tuple[str, str, tuple[Any, ...]]] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
    hs_out: dict[str, Any] = field(default_factory=dict)
    hs_index: dict[str, int] = field(default_factory=dict)
    #: the variant the update kernels run with these scalars (``Rule.device_flags`` where the
    #: rule's host variant depends on the step, else ``flags_of``'s)
    flags: dict[str, bool] = field(default_factory=dict)


class _Sym:
    """A value of the program being recorded."""

    __slots__ = ("name", "prog")

    def __init__(self, prog, name):
        self.prog, self.name = prog, name

    def _op(self, op, *args):
        dst = f"t{len(self.prog.ops)}"
        self.prog.ops.append((dst, op, tuple(_operand(a) for a in args)))
        return _Sym(self.prog, dst)

    def __add__(self, o):
        return self._op("+", self, o)

    def __radd__(self, o):
        return self._op("+", o, self)

    def __sub__(self, o):
        return self._op("-", self, o)

    def __rsub__(self, o):
        return self._op("-", o, self)

    def __mul__(self, o):
        return self._op("*", self, o)

    def __rmul__(self, o):
        return self._op("*", o, self)

    def __truediv__(self, o):
        return self._op("/", self, o)

    def __rtruediv__(self, o):
        return self._op("/", o, self)

    def __pow__(self, o):
        return self._op("**", self, o)

    def __rpow__(self, o):
        return self._op("**", o, self)

    def __neg__(self):
        return self._op("neg", self)

    def __lt__(self, o):
        return self._op("<", self, o)

    def __le__(self, o):
        return self._op("<=", self, o)

    def __gt__(self, o):
        return self._op(">", self, o)

    def __ge__(self, o):
        return self._op(">=", self, o)

    def __eq__(self, o):
        return self._op("==", self, o)

    def __ne__(self, o):
        return self._op("!=", self, o)

    __hash__ = None  # type: ignore[assignment]

    def __fastopt_sqrt__(self):
        return self._op("sqrt", self)

    def __fastopt_where__(self, a, b):
        return self._op("where", self, a, b)

    def __fastopt_f32__(self):
        return self._op("f32", self)

    def __bool__(self):
        raise NotCapturable(
            "a branch on the step or a numeric hyperparameter (write it with kernels.spec.where)"
        )

    def __float__(self):
        raise NotCapturable("a conversion to float of a device value")


def _operand(a):
    if isinstance(a, _Sym):
        return a.name
    if isinstance(a, bool):
        return bool(a)
    if isinstance(a, (int, float)) and math.isfinite(a):
        return float(a)
    raise NotCapturable(f"an operand {a!r} of type {type(a).__name__}")


def _inputs(spec, prog):
    """Symbols of the numeric hyperparameters (a tuple as its entries) and host state, in ctl
    order."""
    hp: dict[str, Any] = {}
    for h in spec.hyper:
        if h.domain == "bool":
            continue
        if h.domain in TUPLES:
            names = [f"{h.name}[{i}]" for i in range(h.size)]
            prog.inputs += names
            hp[h.name] = tuple(_Sym(prog, _var(n)) for n in names)
        else:
            prog.inputs.append(h.name)
            hp[h.name] = _Sym(prog, _var(h.name))
    hs = {}
    for n, _ in spec.host_state:
        prog.hs_index[n] = 1 + len(prog.inputs)
        prog.inputs.append(f"hs:{n}")
        hs[n] = _Sym(prog, _var(f"hs:{n}"))
    return hp, hs


def _var(name):
    """The variable of an input: ``in_<name>`` with brackets and colons spelled out."""
    return "in_" + name.replace("[", "_").replace("]", "").replace(":", "_")


def trace(rule: str, hp: Mapping[str, Any], select: bool = False) -> Program:
    """The ``Program`` of ``rule``'s host scalars with the boolean hyperparameters of ``hp``
    (any numeric values: they are inputs). With ``select``, a rule whose variant depends on the
    step but that declares ``device_flags`` is recorded too, for that one variant (its caller
    launches ``Program.flags``). Raises ``NotCapturable``."""
    spec = RULES[rule]
    prog = Program(rule)
    sym_hp, sym_hs = _inputs(spec, prog)
    bools = {h.name: hp[h.name] for h in spec.hyper if h.domain == "bool"}
    step = _Sym(prog, "step")
    try:
        # the variant must not depend on the step or the host state (RAdam's rectification,
        # ASGD's averaging switch variants per step: the device cannot pick a compiled one)
        flags = spec.flags_of({**hp, **bools}, step, sym_hs)
        if not all(isinstance(v, bool) for v in flags.values()):
            if not (select and spec.device_flags is not None):
                raise NotCapturable("a variant that depends on the step or the host state")
            flags = spec.device_flags({**hp, **bools})
        prog.flags = {n: bool(v) for n, v in flags.items()}
        full = {**sym_hp, **bools}
        values = spec.scalars_of(full, step, sym_hs or None)
        prog.outputs = {n: _operand(values[n]) for n in spec.scalars}
        if spec.host_state:
            after = spec.advance(full, step, sym_hs)
            prog.hs_out = {n: _operand(after[n]) for n, _ in spec.host_state}
    except NotCapturable as exc:
        raise NotCapturable(
            f"rule {rule!r} cannot compute its host scalars on the device: {exc}"
        ) from None
    except TypeError as exc:
        raise NotCapturable(
            f"rule {rule!r} cannot compute its host scalars on the device: {exc}"
        ) from None
    return prog


def capturable(rule: str, hp: Mapping[str, Any], select: bool = False) -> bool:
    """Can the device compute ``rule``'s host scalars with the flags of ``hp``? (``select``: as
    ``trace`` takes it.)"""
    try:
        trace(rule, hp, select)
    except NotCapturable:
        return False
    return True


def ctl_values(
    rule: str, hp: Mapping[str, Any], step: int, hs: Mapping[str, float] | None = None
) -> list[float]:
    """The host values of ``ctl``: the steps taken, the numeric hyperparameters (pairs as two),
    the host state (None: its initial values)."""
    spec = RULES[rule]
    out = [float(step)]
    for h in spec.hyper:
        if h.domain == "bool":
            continue
        v = hp[h.name]
        out += [float(x) for x in v] if isinstance(v, (tuple, list)) else [float(v)]
    if spec.host_state:
        hs = hs or spec.initial_host_state(hp)
        out += [float(hs[n]) for n, _ in spec.host_state]
    return out


_PY = {"+": "{} + {}", "-": "{} - {}", "*": "{} * {}", "/": "{} / {}", "**": "{} ** {}"}
_PY.update({op: "{} " + op + " {}" for op in ("<", "<=", ">", ">=", "==", "!=")})
_PY.update({"neg": "-{}", "sqrt": "math.sqrt({})", "where": "{1} if {0} else {2}"})
_PY["f32"] = "np.float64(np.float32({}))"
_C = dict(_PY, **{"**": "pow({}, {})", "sqrt": "sqrt({})", "where": "({0} ? {1} : {2})"})
_C["f32"] = "(double)(float)({})"


def _lit(a, c=False):
    if isinstance(a, bool):
        return ("true" if a else "false") if c else repr(a)
    if isinstance(a, float):
        return repr(a)
    return a


def python_source(prog: Program, name: str = "fastopt_scalars") -> str:
    """Python source of ``factory(mix32)`` returning the scalar kernel
    ``name(ctl, k32, k64, keyp, fi, seed)`` (numba-cuda; plain Python under the simulator)."""
    lines = [
        "import numpy as np",  # spec.f32's rounding
        "",
        "def factory(mix32):",
        f"    def {name}(ctl, k32, k64, keyp, fi, seed):",
        "        if cuda.grid(1) != 0:",
        "            return",
        "        if fi[0] != 0:",
        "            return",
        "        step = ctl[0] + 1.0",
        "        ctl[0] = step",
    ]
    lines += [f"        {_var(n)} = ctl[{1 + j}]" for j, n in enumerate(prog.inputs)]
    for dst, op, args in prog.ops:
        lines.append(f"        {dst} = {_PY[op].format(*[_lit(a) for a in args])}")
    for j, n in enumerate(RULES[prog.rule].scalars):
        v = _lit(prog.outputs[n])
        lines += [f"        k64[{j}] = {v}", f"        k32[{j}] = {v}"]
    lines += [f"        ctl[{prog.hs_index[n]}] = {_lit(v)}" for n, v in prog.hs_out.items()]
    lines += [
        "        keyp[0] = mix32((int(seed) & 0xFFFFFFFF) ^ mix32(int(step)))",
        f"    return {name}",
    ]
    return "\n".join(lines) + "\n"


def c_source(prog: Program, name: str = "fastopt_scalars") -> str:
    """CUDA C of the scalar kernel ``name(ctl, k32, k64, keyp, fi, seed)`` (one thread; the
    conversions of ``kernels/storage.cuh`` pasted in for the rounding key)."""
    from pathlib import Path

    out = [Path(__file__).with_name("storage.cuh").read_text()]
    out += [
        f'extern "C" __global__ void {name}(double *__restrict__ ctl, float *__restrict__ k32, '
        "double *__restrict__ k64, unsigned int *__restrict__ keyp, "
        "const float *__restrict__ fi, const unsigned int seed)",
        "{",
        "    if (blockIdx.x != 0 || threadIdx.x != 0) return;",
        "    if (*fi != 0.0f) return;  // a skipped step: the count and scalars stay",
        "    const double step = ctl[0] + 1.0;",
        "    ctl[0] = step;",
    ]
    out += [f"    const double {_var(n)} = ctl[{1 + j}];" for j, n in enumerate(prog.inputs)]
    for dst, op, args in prog.ops:
        t = "bool" if op in ("<", "<=", ">", ">=", "==", "!=") else "double"
        out.append(f"    const {t} {dst} = {_C[op].format(*[_lit(a, True) for a in args])};")
    for j, n in enumerate(RULES[prog.rule].scalars):
        v = _lit(prog.outputs[n], True)
        out += [f"    k64[{j}] = {v};", f"    k32[{j}] = (float)({v});"]
    out += [f"    ctl[{prog.hs_index[n]}] = {_lit(v, True)};" for n, v in prog.hs_out.items()]
    out += ["    keyp[0] = fastopt_mix32(seed ^ fastopt_mix32((unsigned int)step));", "}"]
    return "\n".join(out) + "\n"
