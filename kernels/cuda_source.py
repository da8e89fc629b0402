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

import re
from pathlib import Path

from . import RULES

__all__ = [
    "CTYPES",
    "VECTOR_WIDTH",
    "body",
    "body_signature",
    "defines",
    "elementwise_args",
    "flag_names",
    "grid_stride_kernel",
    "in_params",
    "kernel_name",
    "operation",
    "out_params",
    "preamble",
    "raw_args",
    "raw_source",
    "slots_used",
    "variants",
]


def flag_names(rule):
    """The variant flags of ``rule`` (its spec's ``flags``)."""
    return RULES[rule].flags


def variants(rule):
    """Every flag combination of ``rule`` that can be launched, each its own kernel."""
    return RULES[rule].variants()


def slots_used(rule, flags):
    """One bool per state slot of ``rule``: does the ``flags`` variant read and write it?"""
    return RULES[rule].slots_used(flags)


def body(rule):
    """The text of ``kernels/<rule>.cu``."""
    return Path(__file__).with_name(f"{rule}.cu").read_text()


def body_signature(rule):
    """``(state slot parameters, scalar parameters)`` of ``<rule>_elem`` in ``<rule>.cu``, as
    written: the names a test holds to the spec's ``slots`` (count) and ``scalars`` (names,
    order)."""
    text = re.sub(r"//[^\n]*", "", body(rule))
    m = re.search(rf"void\s+{rule}_elem\s*\(([^)]*)\)", text)
    if m is None:
        raise ValueError(f"kernels/{rule}.cu defines no {rule}_elem(...)")
    params = [" ".join(a.split()) for a in m.group(1).split(",")]
    slots = [a.split("&")[1].strip() for a in params[2:] if "&" in a]
    scalars = [a.split()[-1] for a in params[2:] if "&" not in a]
    return slots, scalars


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
    return (
        in_params(rule),
        out_params(rule, used),
        operation(rule, used),
        kernel_name(rule),
        preamble(rule, flags),
    )


# -- the vectorised raw kernel ------------------------------------------------------------------
#
# The same body, launched as a plain ``__global__`` kernel instead of an ElementwiseKernel: a
# grid-stride loop over 16-byte vectors (4 x float32, 2 x float64) with a scalar tail, so every
# thread issues one 128-bit load per buffer and as many independent element updates as lanes.
# Chosen by the CuPy backend when every buffer is 16-byte aligned (FlatBuffer segments always
# are); a width of 1 is the plain scalar form of the same kernel.

#: NumPy dtype name -> CUDA C element type
CTYPES = {"float32": "float", "float64": "double"}
#: CUDA C element type -> lanes of one 16-byte vector
VECTOR_WIDTH = {"float": 4, "double": 2}
_VECTOR_TYPE = {("float", 4): "float4", ("double", 2): "double2"}
_LANES = ("x", "y", "z", "w")


def grid_stride_kernel(name, ctype, width, arrays, scalars, lane):
    """CUDA C text of ``extern "C" __global__ void name(...)``: a grid-stride loop over ``n``
    elements, ``width`` at a time through vector loads, then a scalar tail.

    ``arrays``: ``[(arg name, written)]``; ``scalars``: argument names of type ``T``;
    ``lane(ref)`` returns the statements updating one element, where ``ref(arg)`` is the
    expression for that argument's element (a vector lane or ``arg[i]``). Every array is read
    once into a local first and written back once after the lane code, so a store through one
    pointer can never force a reload through another."""
    if width > 1 and (ctype, width) not in _VECTOR_TYPE:
        raise ValueError(f"no {width}-wide vector of {ctype}; widths: {VECTOR_WIDTH}")
    params = [f"{'' if w else 'const '}T *__restrict__ {a}" for a, w in arrays]
    params += [f"const T {s}" for s in scalars] + ["const long long n"]
    out = [
        f'extern "C" __global__ void {name}({", ".join(params)})',
        "{",
        "    const long long stride = (long long)gridDim.x * blockDim.x;",
        "    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
        "    long long tail = 0;",
    ]
    if width > 1:
        vt = _VECTOR_TYPE[(ctype, width)]
        out += [
            f"    const long long nv = n / {width};",
            "    for (long long i = first; i < nv; i += stride) {",
        ]
        for a, w in arrays:
            q = "" if w else "const "
            out.append(f"        {q}{vt} {a}_v = reinterpret_cast<{q}{vt} *>({a})[i];")
        for c in _LANES[:width]:
            out += ["        {"] + [f"            {ln}" for ln in lane(lambda a, c=c: f"{a}_v.{c}")]
            out.append("        }")
        out += [f"        reinterpret_cast<{vt} *>({a})[i] = {a}_v;" for a, w in arrays if w]
        out += ["    }", f"    tail = nv * {width};"]
    out += ["    for (long long i = tail + first; i < n; i += stride) {"]
    out += [f"        {ln}" for ln in lane(lambda a: f"{a}[i]")]
    out += ["    }", "}"]
    return "\n".join(out)


def raw_args(rule, flags):
    """``(arrays, scalars)`` of the raw kernel of one variant: ``[(name, written)]`` for grad,
    param and the state slots it uses, then the host scalars (all of type ``T``), then ``n``."""
    used = slots_used(rule, flags)
    arrays = [("grad", False), ("param", True)]
    arrays += [(s, True) for s, u in zip(RULES[rule].STATE, used) if u]
    return arrays, tuple(RULES[rule].SCALARS)


def raw_source(rule, flags, ctype, width, name=None):
    """The complete CUDA C translation unit of one variant, element type and vector width:
    ``typedef`` of ``T``, the flag ``#define``s, the rule's body, and the kernel ``name``
    (default ``fastopt_<rule>``) with arguments ``raw_args(rule, flags)`` and ``n``."""
    used = slots_used(rule, flags)
    state = RULES[rule].STATE
    arrays, scalars = raw_args(rule, flags)

    def lane(ref):
        lines = [f"T p_ = {ref('param')};"]
        for i, (s, u) in enumerate(zip(state, used)):
            # an unused slot is a dead local: the variant's body never reads or writes it
            lines.append(f"T s{i}_ = {ref(s)};" if u else f"T s{i}_ = T(0);")
        args = ["p_", ref("grad")] + [f"s{i}_" for i in range(len(state))] + list(scalars)
        lines.append(f"{rule}_elem<T>({', '.join(args)});")
        lines.append(f"{ref('param')} = p_;")
        lines += [f"{ref(s)} = s{i}_;" for i, (s, u) in enumerate(zip(state, used)) if u]
        return lines

    kernel = grid_stride_kernel(name or kernel_name(rule), ctype, width, arrays, scalars, lane)
    return f"typedef {ctype} T;\n{preamble(rule, flags)}\n{kernel}\n"
