"""The CUDA kernel of a step over quantized state slots (``kernels/quant.py``): its CUDA C text
(the CuPy backend, the C++ harness, the compile checks) and the pieces the numba-cuda kernel
shares (the slots it quantizes, their packed tables and constants).

One CUDA block of ``threads(fmt)`` threads per block of codes, grid-striding over a table of
blocks (``blocks[b] = (first, stop)``: a block never straddles two tensors, the last of a tensor
may be short). A byte format (``quant.FORMATS``: ``QBLOCK`` = ``quant.BLOCK`` threads) puts
thread ``t`` on element ``first + t``; a packed one (``quant.PACKED``: ``"int4"``, blocks of
``BLOCKS["int4"]`` = 128, half as many threads) puts thread ``t`` on byte ``first / 2 + t``,
both its nibbles, elements ``first + 2t`` (high nibble) and ``first + 2t + 1`` (low), so that
no two threads write one byte (``first`` is even: a tensor's blocks start at its first element,
a ``FlatBuffer`` group's tensors at even offsets). Each quantized slot is decoded
(``dec[code] · (absmax / top)``), the rule runs in float32 on the element (the storage format's
loads and stores for param, grad, master and the float32 slots: ``cuda_source.mixed_lane``, the
rule's own body), the new values' absmax is reduced over the block in shared memory
(``kernels/quant.cuh``), thread 0 stores it, and every thread encodes its value (nearest code,
the CPU's thresholds: ties to the lower code for int8, to even for float8, by a binary search
over them; int4 by the CPU's fifteen comparisons, ``encode4_source``, ties up; an odd tensor's
last byte gets a low nibble of 0). One pass over
memory, no host synchronisation; the same float32 operations as the CPU loop
(``backends/numba_quant.py``) on every value but the rule's, which a GPU compiler may contract
into fused multiply-adds as it does in the float32-state kernels.

Kernel arguments (``quant_args``): grad, param, per used slot its array (``unsigned char``
codes for a quantized slot, then its float32 ``<slot>_absmax``), the master, ``qtab`` (float32,
per quantized slot 256 decoded values then 256 thresholds: ``tables``; a packed format's 16
values padded), ``blocks`` (int64 pairs), ``nb``, then the scalars of ``cuda_source.mixed_args``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import RULES, cuda_source, quant

if TYPE_CHECKING:
    from .storage import IO

__all__ = [
    "QBLOCK",
    "constants",
    "encode4_source",
    "header",
    "kernel_name",
    "maps",
    "plain_io",
    "qslots",
    "quant_args",
    "quant_source",
    "table_arguments",
    "table_columns",
    "table_kernel_name",
    "table_source",
    "tables",
    "threads",
]

#: threads per CUDA block of a byte format: one per element of a block of codes (the most any
#: format takes: ``threads``)
QBLOCK = quant.BLOCK


def threads(fmt: str) -> int:
    """Threads per CUDA block of format ``fmt``: one per element of a block of codes (byte
    formats), one per byte of it, two elements, for a packed format (64 for int4)."""
    return quant.BLOCKS[fmt] // (2 if fmt in quant.PACKED else 1)


def qslots(rule: str, flags: Mapping[str, bool]) -> tuple[bool, ...]:
    """Per slot of ``rule``: is it quantized in the ``flags`` variant (used and
    ``Slot.quantize``)?"""
    used = RULES[rule].slots_used(flags)
    return tuple(bool(u and s.quantize) for s, u in zip(RULES[rule].slots, used))


def maps(rule: str, flags: Mapping[str, bool]) -> tuple[str, ...]:
    """The maps of the ``flags`` variant's quantized slots, in slot order (what ``tables``
    packs)."""
    return tuple(s.quant_map for s, q in zip(RULES[rule].slots, qslots(rule, flags)) if q)


def plain_io(io: IO) -> IO:
    """``io`` without its quantized state: the storage format of the rest of the arrays."""
    return dataclasses.replace(io, quant=None)


@cache
def tables(fmt: str, maps: tuple[str, ...]) -> np.ndarray:
    """The packed tables of the quantized slots whose maps are ``maps``: float32 ``(len(maps),
    512)``, per slot its 256 decoded values (a packed format's 16, then +inf), then its 255
    thresholds and +inf (read-only)."""
    out = np.empty((max(len(maps), 1), 2 * QBLOCK), np.float32)
    out[:] = np.inf
    for j, m in enumerate(maps):
        t = quant.table(fmt, m)
        out[j, : t.dec.size] = t.dec
        out[j, QBLOCK : QBLOCK + t.thr.size] = t.thr
    out.setflags(write=False)
    return out


def constants(fmt: str, quant_map: str) -> tuple[np.float32, np.float32, bool]:
    """``(top, tiny, signmag)`` of a slot's table (``quant.Table``)."""
    t = quant.table(fmt, quant_map)
    return np.float32(t.top), np.float32(t.tiny), bool(t.signmag)


def encode4_name(quant_map: str) -> str:
    """The CUDA C function of ``encode4_source``."""
    return f"fastopt_q4_encode_{quant.table('int4', quant_map).name}"


def encode4_source(quant_map: str) -> str:
    """The int4 encode of ``quant_map``'s table as a CUDA C function ``unsigned int f(float
    y)``: the CPU loops' comparisons (``quant.FAST_ENCODE``), built from the same constants
    (``quant.int4_encode_constants``): ``code = #{k : y > thr[k]}``, 0 where ``|y|`` is at or
    above ``lim`` or NaN, the lookup's code of every float32."""
    thr, lim = quant.int4_encode_constants(quant_map)
    out = [
        f"__device__ __forceinline__ unsigned int {encode4_name(quant_map)}(const float y)",
        "{",
        "    unsigned int c = 0u;",
    ]
    out += [f"    c += y > {_f32(k)} ? 1u : 0u;" for k in thr]
    out += [f"    return fabsf(y) < {_f32(lim)} ? c : 0u;  // NaN, +-inf, |y| >= lim: 0", "}"]
    return "\n".join(out) + "\n"


def kernel_name(rule: str) -> str:
    return f"fastopt_{rule}_quant"


def header() -> str:
    """The text of ``kernels/quant.cuh``."""
    return Path(__file__).with_name("quant.cuh").read_text()


def quant_args(
    rule: str, flags: Mapping[str, bool], io: IO
) -> tuple[list[tuple[str, str, bool]], list[tuple[str, str]]]:
    """``(arrays, scalars)`` of the kernel (see the module docstring): ``arrays`` as
    ``[(name, C element type, written)]`` in argument order, ``scalars`` as ``[(C type,
    name)]`` after ``qtab``, ``blocks`` and ``nb``."""
    plain = plain_io(io)
    arrays, scalars = cuda_source.mixed_args(rule, flags, plain)
    q = dict(zip(RULES[rule].state, qslots(rule, flags)))
    out: list[tuple[str, str, bool]] = []
    for a, kind, w in arrays:
        if q.get(a):
            out += [(a, "unsigned char", True), (f"{a}_absmax", "float", True)]
        else:
            out.append((a, cuda_source.STORAGE_CTYPES[kind], w))
    return out, scalars


def _f32(x: np.float32) -> str:
    """A float32 constant, exactly: its bit pattern."""
    return f"__uint_as_float({int(np.float32(x).view(np.uint32)):#x}u)"


def quant_source(rule: str, flags: Mapping[str, bool], io: IO, name: str | None = None) -> str:
    """The complete CUDA C translation unit of one variant under storage format ``io``
    (``io.quant`` set): compute type ``C`` (float32), the flag ``#define``s, the rule's body,
    the storage conversions, the codec (``quant.cuh``) and the kernel ``name`` (default
    ``fastopt_<rule>_quant``)."""
    arrays, scalars = quant_args(rule, flags, io)
    params = [f"{'' if w else 'const '}{t} *__restrict__ {a}" for a, t, w in arrays]
    params += [
        "const float *__restrict__ qtab",
        "const long long *__restrict__ blocks",
        "const long long nb",
    ]
    params += [f"{t} {n}" for t, n in scalars]
    head = ["    for (long long b = blockIdx.x; b < nb; b += gridDim.x) {"]
    if io.quant in quant.PACKED:  # the thread's byte (of codes, if any) and its two elements
        if any(qslots(rule, flags)):
            head.append("        const long long y_ = (blocks[2 * b] >> 1) + t;")
        head += [
            "        const long long i0_ = blocks[2 * b] + 2 * t;",
            "        const long long stop_ = blocks[2 * b + 1];",
        ]
    else:
        head += [
            "        const long long i = blocks[2 * b] + t;",
            "        const bool act = i < blocks[2 * b + 1];",
        ]
    kernel = name or kernel_name(rule)
    return _source(rule, flags, io, kernel, params, head, "i", "b")


def table_columns(rule: str, master: bool) -> tuple[str, ...]:
    """The columns of a quantized multi-tensor table: ``multi_tensor.columns`` (a quantized
    slot's column holds its codes' address), then ``<slot>_absmax`` for every state slot (its
    block scales' address; 0 where the slot is not quantized)."""
    from . import multi_tensor

    state = RULES[rule].state
    return multi_tensor.columns(rule, master) + tuple(f"{s}_absmax" for s in state)


def table_kernel_name(rule: str) -> str:
    return f"fastopt_mt_{rule}_quant"


def table_arguments(
    rule: str, flags: Mapping[str, bool], io: IO, clip: bool = False
) -> list[tuple[str, str]]:
    """``[(C type, name)]`` of the multi-tensor kernel: ``multi_tensor.arguments`` with
    ``qtab`` in the place of the chunk size (the chunk is one block of codes): the
    table (``table_columns``), the chunk entries and their count, ``qtab``, the scalars of
    ``quant_args``, then ``clip`` (the device ``[norm, clip_coef]``) when ``clip``."""
    from . import multi_tensor

    out = multi_tensor.arguments(rule, flags, plain_io(io), clip)  # the chunk size is QBLOCK
    return [("const float *__restrict__", "qtab") if n == "chunk" else (t, n) for t, n in out]


def table_source(
    rule: str, flags: Mapping[str, bool], io: IO, clip: bool = False, name: str | None = None
) -> str:
    """The CUDA C translation unit of the multi-tensor kernel of one variant under ``io``
    (``io.quant`` set): the one-buffer kernel's block (``quant_source``) over a table of
    tensors, one CUDA block per entry of the chunk table (a block of codes of one tensor:
    ``multi_tensor.cuh``'s ``fastopt_mt_chunk`` with chunk ``quant.BLOCKS[io.quant]``), each
    array addressed from the tensor's row at the block's first element (a packed slot's codes
    at its byte, half that), its scales at the block's number; the
    stochastic-rounding index counted from the tensor's start, the gradient times the clip
    coefficient when ``clip``."""
    from . import multi_tensor

    arrays, _ = quant_args(rule, flags, io)
    col = {c: j for j, c in enumerate(table_columns(rule, io.master))}
    params = [f"{t} {n}" for t, n in table_arguments(rule, flags, io, clip)]
    assert io.quant is not None
    block, packed = quant.BLOCKS[io.quant], io.quant in quant.PACKED
    head = [
        "    for (long long b = blockIdx.x; b < nchunks; b += gridDim.x) {",
        "        long long lo_, hi_;",
        f"        const long long *const row_ = fastopt_mt_chunk(table, {len(col)}, chunks[b], "
        f"{block}, &lo_, &hi_);",
    ]
    scales = {f"{s}_absmax" for s in RULES[rule].state}
    codes = {s for s, q in zip(RULES[rule].state, qslots(rule, flags)) if q}
    for a, t, w in arrays:
        t = t if w else f"const {t}"
        # a block's scale, a packed slot's byte (lo_ is even), an element
        at = f"lo_ / {block}" if a in scales else "lo_ / 2" if packed and a in codes else "lo_"
        head.append(f"        {t} *const {a} = fastopt_mt_ptr<{t}>(row_[{col[a]}], {at});")
    if packed:  # the thread's byte of the block's codes (if any) and its two elements
        head += ["        const long long y_ = t;"] if codes else []
        head += [
            "        const long long i0_ = lo_ + 2 * t;",
            "        const long long stop_ = hi_;",
        ]
    else:
        head += [
            "        const long long i = lo_ + t;",
            "        const bool act = i < hi_;",
        ]
    factors = ("clip_",) if clip else ()
    kernel = name or table_kernel_name(rule)
    lib = multi_tensor.header() + "\n"
    at = "(i - lo_)" if packed else "t"
    return _source(rule, flags, io, kernel, params, head, at, "0", factors, clip, lib)


def _source(
    rule: str,
    flags: Mapping[str, bool],
    io: IO,
    kernel: str,
    params: list[str],
    head: list[str],
    at: str,
    blk: str,
    factors: tuple[str, ...] = (),
    clip: bool = False,
    lib: str = "",
) -> str:
    """The translation unit of a quantized kernel ``kernel(params)``: ``head`` opens the loop
    over blocks of codes (declaring ``i``, the element's index in its tensor, and ``act``; for
    a packed format ``y_``, the thread's byte of the codes, ``i0_``, its first element's index
    in its tensor, and ``stop_``, the block's end), ``at`` indexes the element in its arrays
    and ``blk`` the block in its scales; ``factors`` multiply the gradient
    (``cuda_source.mixed_lane``), ``clip`` reads ``clip_`` from the argument ``clip``, ``lib``
    is pasted before the kernel."""
    if io.quant is None or io.compute != "float32":
        raise ValueError(f"quantized state needs float32 compute and io.quant; got {io}")
    out = [f'extern "C" __global__ void {kernel}({", ".join(params)})', "{"]
    out += [f"    {ln}" for ln in cuda_source.mixed_prologue(rule, plain_io(io))]
    if clip:
        out.append("    const C clip_ = clip[1];")
    out.append("    const int t = threadIdx.x;")
    if io.quant in quant.PACKED:
        out += _packed_block(rule, flags, io, head, at, blk, factors)
        lib += "".join(encode4_source(m) for m in dict.fromkeys(maps(rule, flags)))
    else:
        out += _byte_block(rule, flags, io, head, at, blk, factors)
    out.append("}")
    return (
        "typedef float C;\n"
        + cuda_source.preamble(rule, flags)
        + "\n"
        + cuda_source.storage_source()
        + "\n"
        + header()
        + "\n"
        + lib
        + "\n".join(out)
        + "\n"
    )


def _reduce(qs: list[int], nt: int) -> list[str]:
    """The block's absmax of every quantized slot (``qred_`` rows, one per slot, ``nt``
    entries each): a tree of maxima of bit patterns in shared memory, the result in entry 0."""
    if not qs:
        return []
    out = [
        f"        for (int s = {nt // 2}; s > 0; s >>= 1) {{",
        "            __syncthreads();",
        "            if (t < s) {",
    ]
    for r in range(len(qs)):
        out.append(
            f"                qred_[{r}][t] = qred_[{r}][t] > qred_[{r}][t + s] ? "
            f"qred_[{r}][t] : qred_[{r}][t + s];"
        )
    return out + ["            }", "        }", "        __syncthreads();"]


def _byte_block(
    rule: str,
    flags: Mapping[str, bool],
    io: IO,
    head: list[str],
    at: str,
    blk: str,
    factors: tuple[str, ...],
) -> list[str]:
    """The kernel's lines after its prologue for a byte format: thread ``t`` on element ``i``
    (``at`` its index in the arrays)."""
    assert io.quant is not None
    spec = RULES[rule]
    qs = [j for j, q in enumerate(qslots(rule, flags)) if q]
    row = {j: r for r, j in enumerate(qs)}
    nq = max(len(qs), 1)
    state = spec.state
    qname = {state[j]: f"q{j}_" for j in qs}

    def ref(a: str) -> str:
        return qname.get(a, f"{a}[{at}]")

    lane: Callable[..., list[str]] = cuda_source.mixed_lane
    body = lane(rule, flags, plain_io(io), ref, "i", factors)
    consts = {j: constants(io.quant, spec.slots[j].quant_map) for j in qs}
    out: list[str] = []
    if qs:  # (a variant that uses no quantized slot keeps only the element loop)
        out += [
            f"    __shared__ float qdec_[{nq}][{QBLOCK}];",
            f"    __shared__ float qthr_[{nq}][{QBLOCK}];",
            f"    __shared__ unsigned int qred_[{nq}][{QBLOCK}];",
            f"    for (int j = 0; j < {len(qs)}; ++j) {{",
            f"        qdec_[j][t] = qtab[j * {2 * QBLOCK} + t];",
            f"        qthr_[j][t] = qtab[j * {2 * QBLOCK} + {QBLOCK} + t];",
            "    }",
            "    __syncthreads();",
        ]
    out += head
    out += [f"        C q{j}_ = C(0);" for j in qs]
    out.append("        if (act) {")
    for j in qs:
        s = state[j]
        out.append(
            f"            q{j}_ = qdec_[{row[j]}][{s}[{at}]] * ({s}_absmax[{blk}] / "
            f"{_f32(consts[j][0])});"
        )
    out += [f"            {ln}" for ln in body]
    out.append("        }")
    for j in qs:
        out.append(f"        qred_[{row[j]}][t] = act ? fastopt_q_magnitude(q{j}_) : 0u;")
    out += _reduce(qs, QBLOCK)

    def store(j: int, s: str, r: int) -> list[str]:
        return [
            "        if (act) {",
            f"            {s}[{at}] = (unsigned char)fastopt_q_encode(q{j}_ * e{j}_, "
            f"qthr_[{r}], {int(consts[j][2])});",
            "        }",
        ]

    return out + _encode_tail(rule, io, blk, qs, store)


def _encode_tail(
    rule: str, io: IO, blk: str, qs: list[int], store: Callable[[int, str, int], list[str]]
) -> list[str]:
    """The end of the loop's body: per quantized slot ``j`` (row ``r``) the block's absmax
    ``n{j}_`` (the reduction's result), the factor ``e{j}_ = top / n{j}_`` (0 below ``tiny``),
    the codes stored by ``store(j, slot, r)``'s lines, the absmax by thread 0; then the
    barrier before ``qred_`` is reused and the loop's closing brace."""
    assert io.quant is not None
    spec = RULES[rule]
    out: list[str] = []
    for r, j in enumerate(qs):
        top, tiny, _ = constants(io.quant, spec.slots[j].quant_map)
        s = spec.state[j]
        out += [
            f"        const float n{j}_ = __uint_as_float(qred_[{r}][0]);",
            f"        const float e{j}_ = n{j}_ >= {_f32(tiny)} ? {_f32(top)} / n{j}_ : 0.0f;",
            *store(j, s, r),
            "        if (t == 0) {",
            f"            {s}_absmax[{blk}] = n{j}_;",
            "        }",
        ]
    if qs:
        out.append("        __syncthreads();  // qred_ is read by every thread before it is reused")
    return out + ["    }"]


def _packed_block(
    rule: str,
    flags: Mapping[str, bool],
    io: IO,
    head: list[str],
    at: str,
    blk: str,
    factors: tuple[str, ...],
) -> list[str]:
    """The kernel's lines after its prologue for a packed format: thread ``t`` owns byte
    ``y_`` of each quantized slot's codes, elements ``i0_`` (its high nibble) and ``i0_ + 1``
    (its low one). It reads the byte once, runs the rule on each of its elements in turn
    (``i``, the element's index in its tensor, declared per element; ``at`` its index in the
    arrays), reduces the larger magnitude of the two over the block, and writes the byte once:
    ``code(i0_) << 4 | code(i0_ + 1)``, a low nibble of 0 past the block's end (an odd
    tensor's last byte), as the CPU loop packs it."""
    assert io.quant is not None
    spec = RULES[rule]
    state = spec.state
    qs = [j for j, q in enumerate(qslots(rule, flags)) if q]
    row = {j: r for r, j in enumerate(qs)}
    nq = max(len(qs), 1)
    nt = threads(io.quant)
    nd = max(quant.table(io.quant, m).dec.size for m in ("signed", "unsigned"))  # 16 values
    out: list[str] = []
    if qs:
        out += [
            f"    __shared__ float qdec_[{nq}][{nd}];",
            f"    __shared__ unsigned int qred_[{nq}][{nt}];",
            f"    for (int e = t; e < {len(qs) * nd}; e += {nt}) {{",
            f"        qdec_[e / {nd}][e % {nd}] = qtab[(e / {nd}) * {2 * QBLOCK} + e % {nd}];",
            "    }",
            "    __syncthreads();",
        ]
    out += head
    out += [
        "        const bool act0_ = i0_ < stop_;",
        "        const bool act1_ = i0_ + 1 < stop_;",
    ]
    for j in qs:
        out.append(f"        const unsigned int b{j}_ = act0_ ? {state[j]}[y_] : 0u;")
    for h in (0, 1):
        qname = {state[j]: f"q{j}_{h}" for j in qs}

        def ref(a: str, qname: dict[str, str] = qname) -> str:
            return qname.get(a, f"{a}[{at}]")

        body = cuda_source.mixed_lane(rule, flags, plain_io(io), ref, "i", factors)
        out += [f"        C q{j}_{h} = C(0);" for j in qs]
        out += [f"        if (act{h}_) {{", f"            const long long i = i0_ + {h};"]
        for j in qs:
            top = constants(io.quant, spec.slots[j].quant_map)[0]
            out.append(
                f"            q{j}_{h} = qdec_[{row[j]}][(b{j}_ >> {4 - 4 * h}) & 15u] * "
                f"({state[j]}_absmax[{blk}] / {_f32(top)});"
            )
        out += [f"            {ln}" for ln in body]
        out.append("        }")
    for j in qs:
        out += [
            f"        const unsigned int m{j}_ = act0_ ? fastopt_q_magnitude(q{j}_0) : 0u;",
            f"        const unsigned int w{j}_ = act1_ ? fastopt_q_magnitude(q{j}_1) : 0u;",
            f"        qred_[{row[j]}][t] = m{j}_ > w{j}_ ? m{j}_ : w{j}_;",
        ]
    out += _reduce(qs, nt)

    def store(j: int, s: str, r: int) -> list[str]:
        enc = encode4_name(spec.slots[j].quant_map)
        return [
            "        if (act0_) {",
            f"            const unsigned int c{j}_ = {enc}(q{j}_0 * e{j}_) << 4;",
            f"            const unsigned int d{j}_ = act1_ ? {enc}(q{j}_1 * e{j}_) : 0u;",
            f"            {s}[y_] = (unsigned char)(c{j}_ | d{j}_);",
            "        }",
        ]

    return out + _encode_tail(rule, io, blk, qs, store)
