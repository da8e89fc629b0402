"""Numba lowerings the CPU loops call: fused multiply-add, the 16-bit float conversions and
the float8 codec.

``kernels/fma.py`` and ``kernels/storage.py`` define these operations in plain Python (the
oracle's and the simulator's); here each gets an LLVM lowering for numba (``llvm.fma``, bit
casts, rounding a float32 to bfloat16 nearest-even, ``fptrunc``/``fpext`` for float16,
``kernels/quant.py``'s float8 bit arithmetic in 32-bit lanes) and the per-storage-kind loads
and stores that ``numba_codegen`` closes its loops over (``loader``, ``storer``,
``param_storer``), plus ``address_as`` (an int64 address as a typed pointer) for the
many-tensor loops.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import ir as _ir
from numba.core import types
from numba.extending import intrinsic, overload, register_jitable

from ..kernels import quant, storage
from ..kernels.fma import fma
from ..kernels.spec import HELPERS
from ..kernels.storage import BITS16, bits_f32, f32_bits


def _cpu_has(flag):
    """Does this CPU report ``flag`` (Linux /proc/cpuinfo; False where unknown)?"""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


@intrinsic
def _llvm_fma(typingctx, a, b, c):
    if isinstance(a, types.Float) and a == b == c:

        def codegen(context, builder, sig, args):
            return builder.fma(*args)

        return a(a, b, c), codegen
    return None


@overload(fma, target="cpu", inline="always")
def _fma_cpu(a, b, c):
    # the rules' fused multiply-add (kernels/fma.py): llvm.fma, one rounding
    if isinstance(a, types.Float) and a == b == c:
        return lambda a, b, c: _llvm_fma(a, b, c)
    return None


@intrinsic
def _f32_to_bits(typingctx, x):
    if x == types.float32:

        def codegen(context, builder, sig, args):
            i32 = builder.bitcast(args[0], context.get_value_type(types.int32))
            return builder.zext(i32, context.get_value_type(types.int64))

        return types.int64(x), codegen
    return None


@intrinsic
def _bits_to_f32(typingctx, u):
    if isinstance(u, types.Integer):

        def codegen(context, builder, sig, args):
            v = context.cast(builder, args[0], sig.args[0], types.int64)
            i32 = builder.trunc(v, context.get_value_type(types.int32))
            return builder.bitcast(i32, context.get_value_type(types.float32))

        return types.float32(u), codegen
    return None


@overload(f32_bits, target="cpu", inline="always")
def _f32_bits_cpu(x):
    # kernels/storage.py's bit casts: no instruction, the register read as the other type
    if x == types.float32:
        return lambda x: _f32_to_bits(x)
    return None


@overload(bits_f32, target="cpu", inline="always")
def _bits_f32_cpu(u):
    if isinstance(u, types.Integer):
        return lambda u: _bits_to_f32(u)
    return None


def _same(x):
    return x


def _to_f32(x):
    return np.float32(x)


def _to_f64(x):
    return np.float64(x)


def _p_same(x, i, salt, key):
    return x


def _p_f32(x, i, salt, key):
    return np.float32(x)


def _p_bf16(x, i, salt, key):
    return storage.bf16_store(x)


def _p_bf16_sr(x, i, salt, key):
    return storage.bf16_store_sr(x, storage.sr_bits(i, salt, key))


def _p_rem(x, i, salt, key):
    return storage.rem_hi(x)


def _p_f16(x, i, salt, key):
    return storage.f16_store(x)


_I16, _I32, _F32, _F16 = _ir.IntType(16), _ir.IntType(32), _ir.FloatType(), _ir.HalfType()


@intrinsic
def _bf16_load_ir(typingctx, h):
    # zero-extend, shift up 16, reinterpret: what storage.bf16_load computes, in 32 bits
    if isinstance(h, types.Integer) and h.bitwidth == 16:

        def codegen(context, builder, sig, args):
            u = builder.shl(builder.zext(args[0], _I32), _ir.Constant(_I32, 16))
            return builder.bitcast(u, _F32)

        return types.float32(h), codegen
    return None


def _bf16_nearest_ir(builder, u):
    # storage.bf16_store's rounding of a float32 that is not a NaN (its bits ``u``), left in
    # place: plus 0x7FFF and its bit 16, the high 16 bits the bfloat16 (round half to even)
    lsb = builder.and_(builder.lshr(u, _ir.Constant(_I32, 16)), _ir.Constant(_I32, 1))
    return builder.add(builder.add(u, _ir.Constant(_I32, 0x7FFF)), lsb)


def _bf16_round_ir(builder, x):
    # storage.bf16_store's rounding left in place: the result's high 16 bits are the
    # bfloat16 (round half to even; a NaN gets its quiet bit, payload kept). Vectorised,
    # this is a shift, an and and two adds, and the NaN select: a compare into a mask
    # register and a masked or with AVX-512, a compare, an or and a blend (vcmpunordps,
    # vblendvps) with AVX2; packed on both (tests/test_cpu_codegen.py)
    u = builder.bitcast(x, _I32)
    nan = builder.fcmp_unordered("uno", x, x)
    up = _bf16_nearest_ir(builder, u)
    return builder.select(nan, builder.or_(u, _ir.Constant(_I32, 0x400000)), up)


@intrinsic
def _bf16_store_ir(typingctx, x):
    # storage.bf16_store in 32-bit lanes: round half to even on the bits, NaN made quiet
    if x == types.float32:

        def codegen(context, builder, sig, args):
            r = _bf16_round_ir(builder, args[0])
            return builder.trunc(builder.lshr(r, _ir.Constant(_I32, 16)), _I16)

        return types.uint16(x), codegen
    return None


def _is32(w):
    return isinstance(w, types.Integer) and w.bitwidth == 32


def _word_half(take):
    """An intrinsic ``uint32 word -> float32``: ``take(builder, word)``, then a bit cast."""

    @intrinsic
    def half_ir(typingctx, w):
        if _is32(w):

            def codegen(context, builder, sig, args):
                return builder.bitcast(take(builder, args[0]), _F32)

            return types.float32(w), codegen
        return None

    return half_ir


# storage.bf16_lo: the low half shifted up; storage.bf16_hi: the high half in place, the
# low half cleared
_bf16_lo_ir = _word_half(lambda b, w: b.shl(w, _ir.Constant(_I32, 16)))
_bf16_hi_ir = _word_half(lambda b, w: b.and_(w, _ir.Constant(_I32, 0xFFFF0000)))


@intrinsic
def _bf16_pair_store_ir(typingctx, a, b):
    # storage.bf16_pair_store: both rounded in 32-bit lanes, the high halves joined
    if a == b == types.float32:

        def codegen(context, builder, sig, args):
            lo = builder.lshr(_bf16_round_ir(builder, args[0]), _ir.Constant(_I32, 16))
            hi = builder.and_(_bf16_round_ir(builder, args[1]), _ir.Constant(_I32, 0xFFFF0000))
            return builder.or_(lo, hi)

        return types.uint32(a, b), codegen
    return None


@intrinsic
def _f16_load_ir(typingctx, h):
    # the hardware conversion (F16C: vcvtph2ps), exact like storage.f16_load
    if isinstance(h, types.Integer) and h.bitwidth == 16:

        def codegen(context, builder, sig, args):
            return builder.fpext(builder.bitcast(args[0], _F16), _F32)

        return types.float32(h), codegen
    return None


@intrinsic
def _f16_store_ir(typingctx, x):
    # the hardware conversion (F16C: vcvtps2ph), round to nearest even like storage.f16_store
    if x == types.float32:

        def codegen(context, builder, sig, args):
            return builder.bitcast(builder.fptrunc(args[0], _F16), _I16)

        return types.uint16(x), codegen
    return None


@intrinsic
def _select_ir(typingctx, c, a, b):
    # kernels.quant.pick: one select, no branch
    if isinstance(c, types.Boolean) and a == b and isinstance(a, (types.Float, types.Integer)):

        def codegen(context, builder, sig, args):
            return builder.select(args[0], args[1], args[2])

        return a(c, a, b), codegen
    return None


@overload(quant.pick, target="cpu", inline="always")
def _pick_cpu(c, a, b):
    if isinstance(c, types.Boolean) and a == b:
        return lambda c, a, b: _select_ir(c, a, b)
    return None


def _overload_with(fn, impl, arg_ok):
    @overload(fn, target="cpu", inline="always")
    def _ov(a):
        if arg_ok(a):
            return lambda a: impl(a)
        return None


def _is16(a):
    return isinstance(a, types.Integer) and a.bitwidth == 16


_overload_with(storage.bf16_load, _bf16_load_ir, _is16)
_overload_with(storage.bf16_lo, _bf16_lo_ir, _is32)
_overload_with(storage.bf16_hi, _bf16_hi_ir, _is32)


# -- float8 codec in 32-bit lanes (kernels/quant.py's e4m3/e5m2 functions) --------------------
#
# The same bit arithmetic as the Python definitions, each operation on i32: numba types every
# integer operation of theirs as int64, which LLVM keeps, so the loops' vectors held four
# 64-bit lanes (and an int64 -> float32 conversion AVX2 has no instruction for) instead of
# eight 32-bit ones. (exponent bits, mantissa bits, bias offset of the bits, smallest normal
# bits, subnormal spacing, magic addend) per format; tests hold both equal to the tables.


def _c32(v):
    return _ir.Constant(_I32, v)


def _fp8_encode_ir(builder, y, mbits, off, norm_lo, magic):
    # storage of float32 y as a float8 byte (quant.e4m3_encode / e5m2_encode)
    u = builder.bitcast(y, _I32)
    a = builder.and_(u, _c32(0x7FFFFFFF))
    sh = _c32(23 - mbits)
    odd = builder.and_(builder.lshr(a, sh), _c32(1))
    rnd = builder.add(builder.add(a, _c32((1 << (23 - mbits - 1)) - 1)), odd)
    norm = builder.sub(builder.lshr(rnd, sh), _c32(off))
    mg = _ir.Constant(_F32, float(magic))
    sub = builder.sub(
        builder.bitcast(builder.fadd(builder.bitcast(a, _F32), mg), _I32),
        _c32(int(np.float32(magic).view(np.uint32))),
    )
    # a is non-negative as a signed i32: signed comparisons, one instruction each on AVX2
    # (which has no unsigned one)
    code = builder.select(builder.icmp_signed("<", a, _c32(norm_lo)), sub, norm)
    code = builder.select(builder.icmp_signed(">", a, _c32(0x7F800000)), _c32(0), code)
    return builder.or_(code, builder.and_(builder.lshr(u, _c32(24)), _c32(0x80)))


def _fp8_decode_ir(builder, c, mbits, rebias, first_norm, spacing, special):
    # the float32 of float8 byte c (quant.e4m3_decode / e5m2_decode)
    w = builder.zext(c, _I32) if c.type.width < 32 else builder.trunc(c, _I32)
    em = builder.and_(w, _c32(0x7F))
    sign = builder.shl(builder.and_(w, _c32(0x80)), _c32(24))
    norm = builder.or_(sign, builder.add(builder.shl(em, _c32(23 - mbits)), _c32(rebias)))
    sp = builder.fmul(builder.sitofp(em, _F32), _ir.Constant(_F32, float(spacing)))
    sub = builder.or_(builder.bitcast(sp, _I32), sign)
    out = builder.select(builder.icmp_unsigned(">=", em, _c32(first_norm)), norm, sub)
    out = builder.bitcast(out, _F32)
    nan = _ir.Constant(_F32, float("nan"))
    if special == "fn":  # e4m3fn: 0x7F is NaN, no infinity
        return builder.select(builder.icmp_unsigned("==", em, _c32(0x7F)), nan, out)
    inf = builder.bitcast(builder.or_(sign, _c32(0x7F800000)), _F32)  # e5m2: 0x7C is inf
    spec = builder.select(builder.icmp_unsigned("==", em, _c32(0x7C)), inf, nan)
    return builder.select(builder.icmp_unsigned(">=", em, _c32(0x7C)), spec, out)


def _fp8_intrinsics(encode_args, decode_args):
    @intrinsic
    def enc_ir(typingctx, y):
        if y == types.float32:

            def codegen(context, builder, sig, args):
                return _fp8_encode_ir(builder, args[0], *encode_args)

            return types.int32(y), codegen
        return None

    @intrinsic
    def dec_ir(typingctx, c):
        if isinstance(c, types.Integer):

            def codegen(context, builder, sig, args):
                return _fp8_decode_ir(builder, args[0], *decode_args)

            return types.float32(c), codegen
        return None

    return enc_ir, dec_ir


_e4m3_ir = _fp8_intrinsics((3, 960, 0x3C800000, 2.0**14), (3, 0x3C000000, 8, 2.0**-9, "fn"))
_e5m2_ir = _fp8_intrinsics((2, 448, 0x38800000, 2.0**7), (2, 0x38000000, 4, 2.0**-16, "ieee"))


def _python_copy(fn):
    """``fn`` as a distinct function object (numba compiles it as plain Python, not through
    the overload that ``fn`` itself has)."""
    import types as pytypes

    return pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__)


def _overload_fp8(encode, decode, irs):
    enc_ir, dec_ir = irs
    enc_py, dec_py = _python_copy(encode), _python_copy(decode)

    @overload(encode, target="cpu", inline="always")
    def _enc(y, b, th, lo, hi, mb):
        if y == types.float32:
            return lambda y, b, th, lo, hi, mb: enc_ir(y)
        return enc_py

    @overload(decode, target="cpu", inline="always")
    def _dec(c, d):
        if isinstance(c, types.Integer):
            return lambda c, d: dec_ir(c)
        return dec_py


#: the float8 codec functions lowered here (``numba_quant`` registers every other one)
FP8_LOWERED = (quant.e4m3_encode, quant.e4m3_decode, quant.e5m2_encode, quant.e5m2_decode)
_overload_fp8(quant.e4m3_encode, quant.e4m3_decode, _e4m3_ir)
_overload_fp8(quant.e5m2_encode, quant.e5m2_decode, _e5m2_ir)


@overload(storage.bf16_pair_store, target="cpu", inline="always")
def _bf16_pair_store_cpu(a, b):
    if a == b == types.float32:
        return lambda a, b: _bf16_pair_store_ir(a, b)
    return None


_overload_with(storage.bf16_store, _bf16_store_ir, lambda a: a == types.float32)
#: x86 CPUs with F16C convert float16 in hardware (exactly, round to nearest even); others
#: run kernels/storage.py's bit form
F16C = _cpu_has("f16c")
if F16C:
    _overload_with(storage.f16_load, _f16_load_ir, _is16)
    _overload_with(storage.f16_store, _f16_store_ir, lambda a: a == types.float32)
for _f in (
    storage.bf16_store_sr,
    storage.mix32,
    storage.sr_bits,
    _same,
    _to_f32,
    _to_f64,
    _p_same,
    _p_f32,
    _p_bf16,
    _p_bf16_sr,
    _p_f16,
    _p_rem,
    storage.rem_join,
    storage.rem_hi,
    storage.rem_lo,
    *HELPERS,  # the rules' shared per-element pieces (kernels/shared.py)
):
    # compiled once per signature and process, inlined by LLVM: numba's IR inlining would
    # re-type each of them at every call site of every loop (numba_codegen.jitable_rule)
    register_jitable(_f)
if not F16C:
    register_jitable(inline="always")(storage.f16_load)
    register_jitable(inline="always")(storage.f16_store)


def loader(kind: str, compute: str) -> Callable[..., Any]:
    """The jitable load of one element of storage ``kind`` as a compute-dtype scalar."""
    if kind == compute:
        return _same
    return {
        "bfloat16": storage.bf16_load,
        "float16": storage.f16_load,
        "float32": _to_f32,
        "float64": _to_f64,
    }[kind if kind in BITS16 else compute]


def storer(kind: str, compute: str) -> Callable[..., Any]:
    """The jitable store of a compute-dtype scalar as storage ``kind``."""
    if kind == compute:
        return _same
    return {"bfloat16": storage.bf16_store, "float16": storage.f16_store, "float32": _to_f32}[kind]


def param_storer(kind: str, compute: str, sr: bool, remainder: bool = False) -> Callable[..., Any]:
    """The jitable store of a param element as storage ``kind`` (``sr``: bfloat16 rounded
    stochastically; ``remainder``: the bfloat16 beside a remainder, ``storage.rem_hi``),
    taking ``(x, i, salt, key)``."""
    if kind == compute:
        return _p_same
    if remainder:
        return _p_rem
    if sr:
        return _p_bf16_sr
    return {"bfloat16": _p_bf16, "float16": _p_f16, "float32": _p_f32}[kind]


@intrinsic
def address_as(typingctx: Any, address: Any, like: Any) -> Any:
    # an int64 address as a typed pointer to ``like``'s element type
    if not isinstance(like, types.Array) or not isinstance(address, types.Integer):
        return None
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


def master_cells(remainder: bool) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The jitable load ``(param bits, master element) -> float32`` and store ``float32 ->
    master element`` of a master kept as a remainder (``storage.rem_join``, ``rem_lo``); a
    float32 master is read and written as it is and never calls them (placeholders)."""
    return (storage.rem_join, storage.rem_lo) if remainder else (_same, _same)
