"""The CUDA C bodies (``<rule>.cu``) and the pieces of a CuPy ``ElementwiseKernel`` built from them.

Each ``<rule>.cu`` defines ``template <typename T> <rule>_elem(T &p, T g, T &s0.., scalars..)``,
the statements of the Python rule in the same order, with every flag a 0/1 macro. A compiled
variant is the body behind one ``#define`` per flag; its kernel reads each array once into a
local, calls the rule, and writes param and the used state slots back once:

    in_params  = "T grad, T <scalar>, ..."          (the rule's scalars, in the buffer type)
    out_params = "T param, T <slot>, ..."           (only the slots this variant touches)

A slot the variant never touches (the momentum buffer of plain SGD, ``max_exp_avg_sq`` without
AMSGRAD, ...) is not a kernel parameter at all, so it costs no memory traffic. Nothing here
imports CuPy: the CPU harness and the compile checks build the same text.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import RULES

if TYPE_CHECKING:
    from .storage import IO

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
    "mixed_args",
    "mixed_lane",
    "mixed_prologue",
    "mixed_source",
    "mixed_width",
    "operation",
    "out_params",
    "preamble",
    "raw_args",
    "raw_source",
    "slots_used",
    "storage_source",
    "variants",
    "vector_loads",
    "vector_stores",
]


def flag_names(rule: str) -> tuple[str, ...]:
    """The variant flags of ``rule`` (its spec's ``flags``)."""
    return RULES[rule].flags


def variants(rule: str) -> list[dict[str, bool]]:
    """Every flag combination of ``rule`` that can be launched, each its own kernel."""
    return RULES[rule].variants()


def slots_used(rule: str, flags: Mapping[str, bool]) -> tuple[bool, ...]:
    """One bool per state slot of ``rule``: does the ``flags`` variant read and write it?"""
    return RULES[rule].slots_used(flags)


#: ``#include "<name>.cuh"`` of a header beside the bodies (``shared.cuh``: the gradient prologue)
_INCLUDE = re.compile(r'^#include "(\w+\.cuh)"\n', flags=re.M)


def body(rule: str) -> str:
    """The text of ``kernels/<rule>.cu``, each ``#include`` of a header beside it replaced by
    the header's text (CuPy and NVRTC compile the text, not the file)."""
    here = Path(__file__)
    text = here.with_name(f"{rule}.cu").read_text()
    return _INCLUDE.sub(lambda m: here.with_name(m.group(1)).read_text(), text)


def body_signature(rule: str) -> tuple[list[str], list[str]]:
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


def defines(rule: str, flags: Mapping[str, bool]) -> dict[str, int]:
    """``{MACRO: 0 or 1}`` for every flag of ``rule`` (unknown flags are an error)."""
    names = flag_names(rule)
    unknown = set(flags) - set(names)
    if unknown:
        raise ValueError(f"rule {rule!r} has no flag {sorted(unknown)}; expected {list(names)}")
    return {n.upper(): int(bool(flags.get(n, False))) for n in names}


def preamble(rule: str, flags: Mapping[str, bool]) -> str:
    """The ``ElementwiseKernel`` preamble of one variant: its ``#define``s, then the body."""
    lines = [f"#define {k} {v}" for k, v in defines(rule, flags).items()]
    return "\n".join(lines) + "\n" + body(rule)


def in_params(rule: str) -> str:
    """``"T grad, T wd, ..."``: the gradient, then the host scalars of the rule."""
    return ", ".join(f"T {n}" for n in ("grad",) + tuple(RULES[rule].scalars))


def out_params(rule: str, used: Sequence[bool]) -> str:
    """``"T param, T exp_avg, ..."``: param and the state slots marked in ``used``."""
    slots = [s for s, u in zip(RULES[rule].state, used) if u]
    return ", ".join(f"T {n}" for n in ["param"] + slots)


def operation(rule: str, used: Sequence[bool]) -> str:
    """The per-element code: one load per array into a local, the rule, one store per output.

    Locals rather than the kernel's references to global memory: a store through one reference
    could alias a later load through another, which would force extra memory traffic."""
    state = RULES[rule].state
    lines = ["T p_ = param;"]
    for i, (s, u) in enumerate(zip(state, used)):
        # an unused slot is a dead local: the variant's body never reads or writes it
        lines.append(f"T s{i}_ = {s};" if u else f"T s{i}_ = T(0);")
    args = ["p_", "grad"] + [f"s{i}_" for i in range(len(state))] + list(RULES[rule].scalars)
    lines.append(f"{rule}_elem<T>({', '.join(args)});")
    lines.append("param = p_;")
    lines += [f"{s} = s{i}_;" for i, (s, u) in enumerate(zip(state, used)) if u]
    return "\n".join(lines)


def kernel_name(rule: str) -> str:
    """``fastopt_<rule>``."""
    return f"fastopt_{rule}"


def elementwise_args(rule: str, flags: Mapping[str, bool]) -> tuple[str, str, str, str, str]:
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


def grid_stride_kernel(
    name: str | None,
    ctype: str,
    width: int,
    arrays: Sequence[tuple[str, bool]],
    scalars: Sequence[str],
    lane: Callable[..., list[str]],
) -> str:
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


def raw_args(
    rule: str, flags: Mapping[str, bool]
) -> tuple[list[tuple[str, bool]], tuple[str, ...]]:
    """``(arrays, scalars)`` of the raw kernel of one variant: ``[(name, written)]`` for grad,
    param and the state slots it uses, then the host scalars (all of type ``T``), then ``n``."""
    used = slots_used(rule, flags)
    arrays = [("grad", False), ("param", True)]
    arrays += [(s, True) for s, u in zip(RULES[rule].state, used) if u]
    return arrays, tuple(RULES[rule].scalars)


def raw_source(
    rule: str, flags: Mapping[str, bool], ctype: str, width: int, name: str | None = None
) -> str:
    """The complete CUDA C translation unit of one variant, element type and vector width:
    ``typedef`` of ``T``, the flag ``#define``s, the rule's body, and the kernel ``name``
    (default ``fastopt_<rule>``) with arguments ``raw_args(rule, flags)`` and ``n``."""
    used = slots_used(rule, flags)
    state = RULES[rule].state
    arrays, scalars = raw_args(rule, flags)

    def lane(ref: Callable[[str], str]) -> list[str]:
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


# -- mixed precision: per-array storage dtypes (kernels.storage.IO) -------------------------------
#
# A launch whose arrays are not all in the compute dtype, or that carries a master copy,
# stochastic rounding, a loss scale, a found-inf flag, device-held scalars or a grad write-back,
# runs this kernel: each array has its own element type (16-bit floats as ``unsigned short``,
# converted by kernels/storage.cuh), every element is widened to the compute type ``C`` on load
# and rounded to its storage type on store, the rule runs in ``C`` (float32; float64 for float64
# params, the only case with double math). The vector loop moves W elements per trip, W = 16
# bytes / the narrowest element (8 with a 16-bit array, else 4, or 2 for all-double): every
# array is read as W * itemsize / 16 aligned 16-byte loads into a local array.

#: storage dtype -> element type of the array in the kernel
STORAGE_CTYPES = {
    "float64": "double",
    "float32": "float",
    "float16": "unsigned short",
    "bfloat16": "unsigned short",
    "int16": "short",  # a master kept as a remainder beside its bfloat16 param
}


def storage_source() -> str:
    """The text of ``kernels/storage.cuh`` (pasted into each mixed kernel)."""
    return Path(__file__).with_name("storage.cuh").read_text()


def _ld(kind: str, compute: str, ref: str) -> str:
    if kind == "bfloat16":
        return f"fastopt_bf16_load({ref})"
    if kind == "float16":
        return f"fastopt_f16_load({ref})"
    return ref if kind == compute else f"(C)({ref})"


def _st(kind: str, compute: str, value: str, sr: str | None = None) -> str:
    if kind == "bfloat16":
        return f"fastopt_bf16_store_sr({value}, {sr})" if sr else f"fastopt_bf16_store({value})"
    if kind == "float16":
        return f"fastopt_f16_store({value})"
    return value if kind == compute else f"({STORAGE_CTYPES[kind]})({value})"


def mixed_args(
    rule: str, flags: Mapping[str, bool], io: IO
) -> tuple[list[tuple[str, str, bool]], list[tuple[str, str]]]:
    """``(arrays, scalars)`` of the mixed kernel of one variant and storage format ``io``:
    ``arrays`` is ``[(name, storage dtype, written)]`` (grad, param, the used state slots, the
    master), ``scalars`` is ``[(C type, name)]`` in argument order (the rule's host scalars or
    the device buffer ``kbuf`` holding them; ``inv_scale`` or the device ``gscale``; the device
    ``found_inf``; ``salt`` and ``key`` or the device ``keyp``), then ``n``."""
    used = slots_used(rule, flags)
    c = "C"
    arrays = [("grad", io.grad, io.write_grad), ("param", io.param, True)]
    arrays += [(s, io.state, True) for s, u in zip(RULES[rule].state, used) if u]
    if io.master:
        arrays.append(("master", io.kind("master"), True))
    scalars = []
    if io.kbuf:
        scalars.append(("const C *__restrict__", "kbuf"))
    else:
        scalars += [(f"const {c}", n) for n in RULES[rule].scalars]
    if io.scale == "host":
        scalars.append((f"const {c}", "inv_scale"))
    elif io.scale == "device":
        scalars.append(("const float *__restrict__", "gscale"))
    if io.found_inf:
        scalars.append(("const float *__restrict__", "found_inf"))
    if io.sr:
        scalars.append(("const unsigned int", "salt"))
        if io.kbuf:
            scalars.append(("const unsigned int *__restrict__", "keyp"))
        else:
            scalars.append(("const unsigned int", "key"))
    return arrays, scalars


def mixed_width(io: IO, rule: str, flags: Mapping[str, bool]) -> int:
    """Elements per trip of the vector loop: 16 bytes over the narrowest array's element."""
    from .storage import ITEMSIZE

    arrays, _ = mixed_args(rule, flags, io)
    return 16 // min(ITEMSIZE[k] for _, k, _ in arrays)


def mixed_prologue(rule: str, io: IO) -> list[str]:
    """The statements a mixed kernel of ``io`` runs once, before its loops (unindented): a set
    found-inf flag returns before anything is written; the scalars come out of ``kbuf``
    (``<scalar>_``), the loss scale becomes ``inv_scale_`` and the rounding key ``key_``."""
    out = []
    if io.found_inf:
        out.append("if (*found_inf != 0.0f) return;  // a skipped step changes nothing")
    if io.kbuf:
        out += [f"const C {x}_ = kbuf[{j}];" for j, x in enumerate(RULES[rule].scalars)]
    if io.scale == "device":
        out.append("const C inv_scale_ = C(1) / (C)(*gscale);")
    elif io.scale == "host":
        out.append("const C inv_scale_ = inv_scale;")
    if io.sr:
        out.append(f"const unsigned int key_ = {'*keyp' if io.kbuf else 'key'};")
    return out


def mixed_lane(
    rule: str,
    flags: Mapping[str, bool],
    io: IO,
    ref: Callable[[str], str],
    index: str,
    grad_factors: Sequence[str] = (),
) -> list[str]:
    """The statements updating one element under ``io`` (unindented): each array loaded once
    into a ``C`` local (widened from its storage type), the rule, each result stored once
    (rounded to its storage type). ``ref(name)`` is the expression of that array's element,
    ``index`` the element's index in its array (hashed by stochastic rounding);
    ``grad_factors`` multiply the gradient after the loss scale, left to right (a multi-tensor
    launch's clip coefficient)."""
    used = slots_used(rule, flags)
    state = RULES[rule].state
    compute = io.compute
    sr_ref = "fastopt_sr_bits(i_, salt, key_)" if io.sr else None
    if io.remainder:  # the master joined from the bfloat16 param and its remainder
        p_src = f"fastopt_rem_join({ref('param')}, {ref('master')})"
    else:
        p_src = ref("master") if io.master else _ld(io.param, compute, ref("param"))
    g_src = _ld(io.grad, compute, ref("grad")) + (" * inv_scale_" if io.scale else "")
    g_src += "".join(f" * {f}" for f in grad_factors)
    lines = [f"const long long i_ = {index};"] if io.sr else []
    lines += [f"C p_ = {p_src};", f"C g_ = {g_src};"]
    if io.write_grad:
        lines.append(f"{ref('grad')} = {_st(io.grad, compute, 'g_')};")
    for j, (s, u) in enumerate(zip(state, used)):
        lines.append(f"C s{j}_ = {_ld(io.state, compute, ref(s))};" if u else f"C s{j}_ = C(0);")
    args = ["p_", "g_"] + [f"s{j}_" for j in range(len(state))]
    args += [f"{x}_" if io.kbuf else x for x in RULES[rule].scalars]
    lines.append(f"{rule}_elem<C>({', '.join(args)});")
    if io.remainder:
        lines.append(f"{ref('master')} = fastopt_rem_lo(p_);")
        lines.append(f"{ref('param')} = fastopt_rem_hi(p_);")
    else:
        if io.master:
            lines.append(f"{ref('master')} = p_;")
        lines.append(f"{ref('param')} = {_st(io.param, compute, 'p_', sr_ref)};")
    lines += [
        f"{ref(s)} = {_st(io.state, compute, f's{j}_')};"
        for j, (s, u) in enumerate(zip(state, used))
        if u
    ]
    return lines


def vector_loads(arrays: Sequence[tuple[Any, ...]], width: int, v: str) -> list[str]:
    """Unindented statements loading vector ``v`` (``width`` elements) of each of ``arrays``
    (``[(name, storage dtype, written)]``) into ``<name>_v[width]`` as aligned 16-byte loads."""
    from .storage import ITEMSIZE

    out = []
    for a, k, _ in arrays:
        q = ITEMSIZE[k] * width // 16
        out += [
            f"alignas(16) {STORAGE_CTYPES[k]} {a}_v[{width}];",
            "FASTOPT_UNROLL",
            f"for (int q = 0; q < {q}; ++q) {{",
            f"    reinterpret_cast<uint4 *>({a}_v)[q] = "
            f"reinterpret_cast<const uint4 *>({a})[{v} * {q} + q];",
            "}",
        ]
    return out


def vector_stores(arrays: Sequence[tuple[Any, ...]], width: int, v: str) -> list[str]:
    """Unindented statements storing ``<name>_v`` back as vector ``v`` of each written array."""
    from .storage import ITEMSIZE

    out = []
    for a, k, w in arrays:
        if not w:
            continue
        q = ITEMSIZE[k] * width // 16
        out += [
            "FASTOPT_UNROLL",
            f"for (int q = 0; q < {q}; ++q) {{",
            f"    reinterpret_cast<uint4 *>({a})[{v} * {q} + q] = "
            f"reinterpret_cast<const uint4 *>({a}_v)[q];",
            "}",
        ]
    return out


def mixed_source(
    rule: str, flags: Mapping[str, bool], io: IO, vector: bool = True, name: str | None = None
) -> str:
    """The complete CUDA C translation unit of one variant under storage format ``io``: the
    compute type ``C``, the flag ``#define``s, the rule's body, the storage conversions and the
    kernel ``name`` (default ``fastopt_<rule>``) with arguments ``mixed_args``; ``vector``:
    with the 16-byte vector loop (every array 16-byte aligned), else the scalar loop alone."""
    compute = io.compute
    arrays, scalars = mixed_args(rule, flags, io)
    params = [f"{'' if w else 'const '}{STORAGE_CTYPES[k]} *__restrict__ {a}" for a, k, w in arrays]
    params += [f"{t} {n}" for t, n in scalars] + ["const long long n"]
    width = mixed_width(io, rule, flags) if vector else 1

    def lane(ref: Callable[[str], str], index: str) -> list[str]:
        return mixed_lane(rule, flags, io, ref, index)

    out = [
        f'extern "C" __global__ void {name or kernel_name(rule)}({", ".join(params)})',
        "{",
    ]
    out += [f"    {ln}" for ln in mixed_prologue(rule, io)]
    out += [
        "    const long long stride = (long long)gridDim.x * blockDim.x;",
        "    const long long first = (long long)blockIdx.x * blockDim.x + threadIdx.x;",
        "    long long tail = 0;",
    ]
    if width > 1:
        out += [
            f"    const long long nv = n / {width};",
            "    for (long long v = first; v < nv; v += stride) {",
        ]
        out += [f"        {ln}" for ln in vector_loads(arrays, width, "v")]
        out += ["        FASTOPT_UNROLL", f"        for (int l = 0; l < {width}; ++l) {{"]
        out += [f"            {ln}" for ln in lane(lambda a: f"{a}_v[l]", f"v * {width} + l")]
        out.append("        }")
        out += [f"        {ln}" for ln in vector_stores(arrays, width, "v")]
        out += ["    }", f"    tail = nv * {width};"]
    out.append("    for (long long i = tail + first; i < n; i += stride) {")
    out += [f"        {ln}" for ln in lane(lambda a: f"{a}[i]", "i")]
    out += ["    }", "}"]
    head = f"typedef {'double' if compute == 'float64' else 'float'} C;\n"
    return head + preamble(rule, flags) + "\n" + storage_source() + "\n" + "\n".join(out) + "\n"
