"""Quantized state slots: the 8-bit formats, their value tables and the per-element codec.

A quantized slot keeps, per parameter, one byte per element (``codes``, shaped like the
parameter) and one float32 scale per block of ``BLOCK`` elements (``absmax``, one-dimensional,
``ceil(n / BLOCK)`` entries). Blocks start at each tensor's first element, so a block never
straddles two tensors; the last block of a tensor may be short. A value is

    value = table[code] * (absmax / top)

with the format's 256-entry ``table`` and its largest finite value ``top``. A step dequantizes
a block, runs the rule in float32, takes the new block's absmax (the largest magnitude of the
new float32 values, NaN if any is NaN) and requantizes every new value ``x`` as the code of the
table value nearest to ``x * (top / absmax)`` (the code of 0 when the absmax is below
``Table.tiny = top·2^-126``, where the quotient could overflow: such a block holds zeros): two
passes over the block in registers and cache, one over memory.

Formats (``state_dtype=``), per slot by the slot's sign (``Slot.quant_map``):

- ``"int8"``: bitsandbytes' blockwise 8-bit state: the dynamic maps of
  ``bitsandbytes.functional.create_dynamic_map(signed=...)`` (8 bits, 7 exponent bits: the
  code is the index of the value in the sorted map), ``top = 1``. The signed map for signed
  slots (first moments), the unsigned map for non-negative ones (second moments). Nearest
  value, ties to the lower code (bitsandbytes' CPU ``quantize_block``: ``dist_right <
  dist_left``).
- ``"float8_e4m3"``: the codes are float8 bit patterns, round to nearest even: e4m3fn (top
  448) for signed slots, e5m2 (top 57344) for non-negative ones, whose range is that of a
  square.
- ``"int4"``: torchao's 4-bit optimizer state (``torchao.optim``, after Li et al., "Memory
  Efficient Optimizers with 4-bit States"): blocks of ``BLOCKS["int4"]`` = 128 elements, two
  codes per byte (``PACKED``), ``top = 1``. Signed slots take the dynamic map of 3 exponent
  bits in 4 (``dynamic_map(True, 3, 4)``: 7 negative values, 0, 8 positive, the largest 1);
  non-negative ones the linear map without zero, ``k / 16`` for ``k = 1..16`` (code ``k - 1``:
  a value below a block's ``absmax / 32`` is stored as ``absmax / 16``, never as zero, which
  keeps a second moment's square root away from zero). Nearest value, ties to the upper code
  (torchao's ``quantize_4bit_with_qmap``: ``residual >= gap / 2``). Element ``i`` of a
  tensor is the high nibble of byte ``i // 2`` when ``i`` is even, the low one when odd
  (torchao's packing ``codes[::2] << 4 | codes[1::2]``); the codes of ``n`` elements are
  ``ceil(n / 2)`` bytes, the unused low nibble of an odd tensor's last byte never read
  (a step and the conversions write it 0; a fresh state holds the fill byte there).

The maps are built here from their definition, in float32 as bitsandbytes builds them with
torch on the CPU: ``linspace(0.1, 1, n)`` (``step = (1 - 0.1) / (n - 1)``, ``start + step·i``
for the first half, ``end - step·(n - 1 - i)`` for the second, one rounding each), the
midpoints of neighbours (``(a + b) / 2``) scaled by ``10^(i - 6)`` for exponent ``i`` of
0..6, negated for the signed map, then 0 and 1.

Encoding counts the float32 thresholds below a value (``Table.thr``, ascending): ``code = #{k :
y > thr[k]}``, found by one lookup and one comparison (``encode``: the value's float32 bit
pattern picks a bucket that holds at most one threshold). ``thr[k]`` is the exact midpoint
of values ``k`` and ``k+1`` rounded down to float32 (ties then go to the lower code: for a
float32 ``y``, ``y > m`` exactly iff ``y > round_down(m)``), or, where a tie goes up (float8's
round-to-even), the float32 just below the midpoint. float8 encodes ``|y|`` over its positive
codes and sets the sign bit from ``y``'s (thresholds past the largest finite value are +inf).
The per-element functions ``encode`` and ``encode_signmag`` are plain Python over scalars,
compiled by the backends like the rules.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .fma import fma
from .storage import bits_f32, f32_bits

__all__ = [
    "ALL_FORMATS",
    "BLOCK",
    "BLOCKS",
    "CODECS",
    "FAST_ENCODE",
    "FORMATS",
    "LOOKUP_ENCODE",
    "PACKED",
    "Table",
    "code_bytes",
    "dynamic_map",
    "encode",
    "encode_signmag",
    "fp8_values",
    "int4_encode_constants",
    "linear4_map",
    "nblocks",
    "pick",
    "table",
]

#: elements per block (one float32 scale each) of the byte formats: bitsandbytes' blocksize
#: for 8-bit optimizers, and the largest block of any format (the loops' scratch rows)
BLOCK = 256
#: the quantized formats of one code per byte (every backend that steps quantized state)
FORMATS = ("int8", "float8_e4m3")
#: the formats of two 4-bit codes per byte (a backend declaring ``QUANT_PACKED`` steps them:
#: ``_quantized.check_backend``)
PACKED = ("int4",)
#: every quantized state format ``state_dtype=`` accepts
ALL_FORMATS = FORMATS + PACKED
#: elements per block of each format: torchao's block size for its 4-bit optimizers
BLOCKS = {"int8": BLOCK, "float8_e4m3": BLOCK, "int4": 128}
#: the value table of each (format, slot map): "signed" or "unsigned"
TABLES = {
    ("int8", "signed"): "dynamic_signed",
    ("int8", "unsigned"): "dynamic_unsigned",
    ("float8_e4m3", "signed"): "float8_e4m3fn",
    ("float8_e4m3", "unsigned"): "float8_e5m2",
    ("int4", "signed"): "dynamic4_signed",
    ("int4", "unsigned"): "linear4_unsigned",
}
#: the tables of the packed formats (their codes are nibbles)
PACKED_TABLES = frozenset(TABLES[(f, m)] for f in PACKED for m in ("signed", "unsigned"))
#: float8 layouts: (exponent bits, mantissa bits, bias, "fn" (no inf, one NaN) or "ieee")
_FP8 = {"float8_e4m3fn": (4, 3, 7, "fn"), "float8_e5m2": (5, 2, 15, "ieee")}


def nblocks(n: int, fmt: str | None = None) -> int:
    """Blocks (scales) of a tensor of ``n`` elements in format ``fmt`` (the byte formats'
    ``BLOCK`` when None)."""
    return -(-int(n) // (BLOCK if fmt is None else BLOCKS[fmt]))


def code_bytes(n: int, fmt: str) -> int:
    """Bytes of codes of a tensor of ``n`` elements in format ``fmt``: ``n``, or ``ceil(n /
    2)`` for a packed format."""
    return -(-int(n) // 2) if fmt in PACKED else int(n)


def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps)`` in float32 as torch's CPU kernel computes it: with
    ``step = (end - start) / (steps - 1)`` in float32, element ``i`` is ``start + step·i`` for
    the first half and ``end - step·(steps - 1 - i)`` for the second, each with one rounding
    (a fused multiply-add; the float64 product and sum below are exact)."""
    f = np.float32
    s, e = f(start), f(end)
    step = np.float64(f(f(e - s) / f(steps - 1)))
    i = np.arange(steps, dtype=np.float64)
    first = i < steps // 2
    out = np.where(first, np.float64(s) + step * i, np.float64(e) - step * (steps - 1 - i))
    return out.astype(np.float32)


def dynamic_map(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic quantization map (``create_dynamic_map``), sorted, float32: for
    exponent ``i`` of ``0..max_exponent_bits-1``, the midpoints of ``linspace(0.1, 1,
    2^(i + 7 - max_exponent_bits) + 1)`` (signed; ``2^(i + 8 - max_exponent_bits) + 1``
    unsigned) times ``10^(i - max_exponent_bits + 1)``, each negated too for the signed map,
    then 0 and 1 (bitsandbytes counts 7 non-sign bits in both maps)."""
    f = np.float32
    non_sign = total_bits - 1
    data: list[float] = []
    for i in range(max_exponent_bits):
        n = 2 ** (i + non_sign - max_exponent_bits + (0 if signed else 1)) + 1
        b = _linspace_f32(0.1, 1.0, n)
        means = ((b[:-1] + b[1:]) / f(2)).astype(np.float32)
        scale = f(10.0 ** (-(max_exponent_bits - 1) + i))
        data += (scale * means).astype(np.float32).tolist()
        if signed:
            data += (-scale * means).astype(np.float32).tolist()
    extra = 2 ** (non_sign - max_exponent_bits) - 1
    if extra > 0:  # not reached with 7 exponent bits of 8, nor 3 of 4
        raise NotImplementedError("maps with a linear region are not used")
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"dynamic map of {len(data)} values; expected {2**total_bits}")
    return np.sort(np.array(data, dtype=np.float32))


def linear4_map() -> np.ndarray:
    """torchao's 4-bit map of non-negative slots: ``linspace(0, 1, 17)[1:]`` (``k / 16`` for
    ``k = 1..16``, exact in float32: no zero)."""
    return (np.arange(1, 17, dtype=np.float32) / np.float32(16)).astype(np.float32)


def fp8_values(name: str) -> np.ndarray:
    """The float32 value of every float8 byte of format ``name`` (``float8_e4m3fn``,
    ``float8_e5m2``), from the bit layout: NaN where the byte is a NaN."""
    ebits, mbits, bias, kind = _FP8[name]
    out = np.empty(256, np.float64)
    for c in range(256):
        sign = -1.0 if c & 0x80 else 1.0
        e = (c >> mbits) & ((1 << ebits) - 1)
        m = c & ((1 << mbits) - 1)
        emax = (1 << ebits) - 1
        if kind == "fn" and e == emax and m == (1 << mbits) - 1:
            v = float("nan")
        elif kind == "ieee" and e == emax:
            v = float("inf") if m == 0 else float("nan")
        elif e == 0:
            v = m / (1 << mbits) * 2.0 ** (1 - bias)
        else:
            v = (1 + m / (1 << mbits)) * 2.0 ** (e - bias)
        out[c] = sign * v
    return out.astype(np.float32)


def _round_down_f32(x: np.ndarray) -> np.ndarray:
    """float64 ``x`` rounded toward -inf to float32."""
    r = x.astype(np.float32)
    hi = r.astype(np.float64) > x
    r[hi] = np.nextafter(r[hi], np.float32(-np.inf))
    return r


def _thresholds(values: np.ndarray, ties_up: np.ndarray) -> np.ndarray:
    """The 255 float32 thresholds of ascending float32 ``values`` (padded with +inf when fewer
    than 256): ``y > thr[k]`` iff ``y`` is nearer value ``k+1`` than value ``k`` or, at a tie,
    ``ties_up[k]``."""
    v = values.astype(np.float64)
    mid = (v[:-1] + v[1:]) / 2  # exact: neighbours' exponents differ by far less than 29
    t = _round_down_f32(mid)
    exact = t.astype(np.float64) == mid
    up = exact & ties_up
    t[up] = np.nextafter(t[up], np.float32(-np.inf))
    out = np.full(255, np.inf, np.float32)
    out[: t.size] = t
    return out


@dataclass(frozen=True)
class Table:
    """One format's codec: ``dec`` (256 float32, 16 for a packed format: the value of each
    code), ``thr`` (255 float32 thresholds, ascending, +inf past the last code's: ``code =
    #{k : y > thr[k]}``), ``top`` (the largest finite
    value), ``signmag`` (the code is a float8 byte: sign bit and the magnitude's code), and
    the lookup of ``encode``: ``base``/``bthr`` (per bucket of float32 bit patterns: the code
    of its smallest value and the one threshold inside it, +inf where none), ``e_lo``/``e_hi``
    (the exponent fields clamped to: every value below ``2^(e_lo - 126)`` shares a code; a
    value at or above ``2^(e_hi - 127)`` is never encoded but NaN, which takes code 0) and
    ``mb`` (mantissa bits of a bucket)."""

    name: str
    dec: np.ndarray
    thr: np.ndarray
    top: np.float32
    signmag: bool
    base: np.ndarray
    bthr: np.ndarray
    e_lo: int
    e_hi: int
    mb: int

    @property
    def tiny(self) -> np.float32:
        """The smallest absmax a block is encoded under (``top · 2^-126``): below it,
        ``top / absmax`` could overflow, and the block's values are stored as zero."""
        return np.float32(self.top * np.float32(2.0**-126))


def _exp_field(x: float) -> int:
    return int((np.array(x, np.float32).view(np.uint32) >> 23) & 0xFF)


def _lookup(thr: np.ndarray, top: float) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    """The bucket tables of ``encode`` for the ascending thresholds ``thr`` (+inf padding
    ignored): the fewest mantissa bits with at most one threshold per bucket."""
    t = thr[np.isfinite(thr)].astype(np.float32)
    e_lo = _exp_field(np.abs(t[t != 0]).min()) - 1  # below 2^(e_lo-126): no threshold
    e_hi = _exp_field(top) + 1  # reached by NaN only
    ne = e_hi - e_lo + 1
    for mb in range(12):
        nb = 2 * ne << mb
        idx = np.arange(nb, dtype=np.int64)
        sign = idx >= (ne << mb)
        e = ((idx >> mb) % ne) + e_lo
        m = idx & ((1 << mb) - 1)
        lo_bits = (e << 23) | (m << (23 - mb))
        hi_bits = lo_bits + (1 << (23 - mb)) - 1
        lo_bits = np.where(e == e_lo, 0, lo_bits)  # the lowest bucket holds every smaller value
        a = lo_bits.astype(np.uint32).view(np.float32).astype(np.float64)
        b = hi_bits.astype(np.uint32).view(np.float32).astype(np.float64)
        ymin = np.where(sign, -b, a)
        ymax = np.where(sign, -a, b)
        c_lo = np.searchsorted(t, ymin, side="left")  # #thr < ymin
        c_hi = np.searchsorted(t, ymax, side="left")
        inside = c_hi - c_lo
        top_bucket = e == e_hi
        if np.all(inside[~top_bucket] <= 1):
            base = np.where(top_bucket, 0, c_lo).astype(np.uint8)
            cut = np.full(nb, np.inf, np.float32)
            one = (inside == 1) & ~top_bucket
            cut[one] = t[c_lo[one]]
            return base, cut, e_lo, e_hi, mb
    raise ValueError("no bucket width holds at most one threshold")


@functools.cache
def table(fmt: str, quant_map: str) -> Table:
    """The codec of format ``fmt`` (``FORMATS``) for a slot of map ``quant_map``."""
    name = TABLES[(fmt, quant_map)]
    if fmt == "int8":
        dec = dynamic_map(quant_map == "signed")
        thr = _thresholds(dec, np.zeros(255, bool))
        top, signmag = np.float32(1.0), False
    elif fmt == "int4":  # 16 values, ties to the upper code (torchao's rounding)
        dec = dynamic_map(True, 3, 4) if quant_map == "signed" else linear4_map()
        thr = _thresholds(dec, np.ones(15, bool))
        top, signmag = np.float32(1.0), False
    else:
        dec = fp8_values(name)
        pos = dec[:128]
        pos = pos[np.isfinite(pos)]  # the positive codes are the ascending values 0..k
        codes = np.arange(pos.size)
        # round half to even: a tie goes up when the upper code is even
        thr = _thresholds(pos, (codes[1:] & 1) == 0)
        top, signmag = np.float32(pos[-1]), True
    t = Table(name, dec, thr, top, signmag, *_lookup(thr, float(top)))
    for a in (t.dec, t.thr, t.base, t.bthr):
        a.setflags(write=False)
    return t


# -- per-element codec (compiled by the backends) ---------------------------------------------


def encode(y: Any, base: Any, bthr: Any, e_lo: Any, e_hi: Any, mb: Any) -> Any:
    """The code of float32 ``y`` in a sorted table (``Table``'s lookup): its bucket, from the
    sign, the exponent field clamped to ``[e_lo, e_hi]`` and the top ``mb`` mantissa bits,
    gives the code of the bucket's smallest value and the one threshold inside it; one
    comparison finishes. No branch on the value (the loop vectorises, loads as gathers); NaN
    gives 0."""
    u = f32_bits(y)
    e = min(max((u >> 23) & 0xFF, e_lo), e_hi) - e_lo
    i = ((((u >> 31) * (e_hi - e_lo + 1)) + e) << mb) | ((u >> (23 - mb)) & ((1 << mb) - 1))
    return base[i] + (y > bthr[i])


def encode_signmag(y: Any, base: Any, bthr: Any, e_lo: Any, e_hi: Any, mb: Any) -> Any:
    """The float8 byte of float32 ``y``: ``encode(|y|)`` over the positive codes, with ``y``'s
    sign bit (``-0.0`` gives the byte of -0)."""
    return encode(abs(y), base, bthr, e_lo, e_hi, mb) | ((f32_bits(y) >> 24) & 0x80)


# -- float8 by arithmetic (no table: the loops that use them vectorise) -------------------------
#
# The same bytes as the lookup above (``encode_signmag`` over the float8 tables; a test holds
# them equal on every byte and around every threshold): round to nearest even on the float32
# bits for normal results, one float addition for subnormal ones (the sum's rounding is the
# hardware's round-to-nearest-even at the float8 subnormal spacing, as ``storage.f16_store``
# does for float16); NaN gives the byte 0 with its sign, as the lookup does.
# The CPU loops run these as written but in 32-bit lanes (``backends/numba_intrinsics.py``
# lowers each one's bit arithmetic on i32: numba types it as int64).

#: float32 constants of the float8 conversions (NumPy scalars: float32 in compiled code)
_E4M3_SUB = np.float32(2.0**-9)  # e4m3fn subnormal spacing
_E4M3_MAGIC = np.float32(2.0**14)  # ulp 2^-9: adding it rounds to the subnormal spacing
_E4M3_MAGIC_BITS = 0x46800000
_E5M2_SUB = np.float32(2.0**-16)
_E5M2_MAGIC = np.float32(2.0**7)  # ulp 2^-16
_E5M2_MAGIC_BITS = 0x43000000
_NAN = np.float32(np.nan)
_INF = np.float32(np.inf)


def e4m3_decode(c: Any, dec: Any) -> Any:
    """The float32 value of float8 e4m3fn byte ``c`` (``dec``, the table, is not read)."""
    c = np.int64(c)
    em = c & 0x7F
    sign = (c & 0x80) << 24
    norm = bits_f32(sign | ((em << 20) + 0x3C000000))  # exponent rebiased 7 -> 127
    sub = bits_f32(f32_bits(np.float32(em) * _E4M3_SUB) | sign)
    out = norm if em >= 8 else sub
    return _NAN if em == 0x7F else out


def e4m3_encode(y: Any, base: Any, bthr: Any, e_lo: Any, e_hi: Any, mb: Any) -> Any:
    """The e4m3fn byte of float32 ``y``, ``|y| <= 448`` (the lookup's arguments unread)."""
    u = f32_bits(y)
    a = u & 0x7FFFFFFF
    norm = ((a + 0x7FFFF + ((a >> 20) & 1)) >> 20) - 960  # 3 mantissa bits, RNE; bias 7
    sub = f32_bits(bits_f32(a) + _E4M3_MAGIC) - _E4M3_MAGIC_BITS
    code = sub if a < 0x3C800000 else norm  # below 2^-6: subnormal
    code = 0 if a > 0x7F800000 else code
    return code | ((u >> 24) & 0x80)


def e5m2_decode(c: Any, dec: Any) -> Any:
    """The float32 value of float8 e5m2 byte ``c``."""
    c = np.int64(c)
    em = c & 0x7F
    sign = (c & 0x80) << 24
    norm = bits_f32(sign | ((em << 21) + 0x38000000))  # exponent rebiased 15 -> 127
    sub = bits_f32(f32_bits(np.float32(em) * _E5M2_SUB) | sign)
    out = norm if em >= 4 else sub
    special = bits_f32(f32_bits(_INF) | sign) if em == 0x7C else _NAN
    return special if em >= 0x7C else out


def e5m2_encode(y: Any, base: Any, bthr: Any, e_lo: Any, e_hi: Any, mb: Any) -> Any:
    """The e5m2 byte of float32 ``y``, ``|y| <= 57344``."""
    u = f32_bits(y)
    a = u & 0x7FFFFFFF
    norm = ((a + 0xFFFFF + ((a >> 21) & 1)) >> 21) - 448  # 2 mantissa bits, RNE; bias 15
    sub = f32_bits(bits_f32(a) + _E5M2_MAGIC) - _E5M2_MAGIC_BITS
    code = sub if a < 0x38800000 else norm  # below 2^-14: subnormal
    code = 0 if a > 0x7F800000 else code
    return code | ((u >> 24) & 0x80)


# -- the dynamic maps by arithmetic (``ARITHMETIC_DECODE``) --------------------------------------
#
# ``dynamic_map``'s values computed from the code instead of looked up (a lookup is a gather,
# slow on AVX2): the same float32 operations ``dynamic_map`` and ``_linspace_f32`` perform, in
# the same order, so each value is bit for bit the table's (a test holds all 256 codes of
# both maps). For a positive value of exponent ``i``: ``G`` means of ``linspace(0.1, 1, G +
# 1)`` (``G = 2^i`` signed, ``2^(i+1)`` unsigned); the ``m``-th positive value (from 1) has
# ``g = floor(log2 m)`` (``m`` counted from 2 in the unsigned map, which has no exponent of
# ``G = 1``), ``G = 2^g`` and index ``j = m - G`` among its exponent's means; ``b_j`` is the
# ``fma`` of ``step = (1 - 0.1) / G`` (exact: ``G`` a power of two) as ``torch.linspace``
# rounds it, the mean ``(b_j + b_{j+1}) / 2`` and the value ``10^(i-6) · mean``.

_ONE = np.float32(1.0)
_TENTH = np.float32(0.1)
_HALF = np.float32(0.5)
_SPAN = np.float32(_ONE - _TENTH)  # linspace's (end - start), rounded as torch rounds it
#: 10^(i-6) in float32 for the exponents i = 0..6 of the dynamic maps
_DECADES = tuple(np.float32(10.0 ** (i - 6)) for i in range(7))


def _linspace_at(step: Any, j: Any, big: Any) -> Any:
    """``torch.linspace(0.1, 1, big + 1)[j]`` in float32 (``step`` its spacing): ``start +
    step·j`` in its first half (``j < (big + 1) // 2``, that is ``j < big / 2`` for an integer
    ``j``, ``big`` a power of two), ``end - step·(big - j)`` in its second, rounded once."""
    lo = fma(step, j, _TENTH)
    hi = fma(-step, big - j, _ONE)
    return lo if j < big * _HALF else hi


def _dynamic_value(m: Any, unsigned: bool) -> Any:
    """The ``m``-th positive value of a dynamic map (``m``, a float32 integer, from 1 signed,
    from 2 unsigned), as ``dynamic_map`` computes it. Every integer here is a float32 (exact:
    below 2^24), so that the loops stay packed on AVX2 (no 64-bit integer conversions)."""
    big = bits_f32(f32_bits(m) & 0x7F800000)  # 2^floor(log2 m)
    j = m - big
    step = _SPAN * bits_f32(0x7F000000 - f32_bits(big))  # / big, exact (a power of two)
    mean = (_linspace_at(step, j, big) + _linspace_at(step, j + _ONE, big)) * _HALF
    e = big * _HALF if unsigned else big  # 2^i for the exponent i of 10^(i-6)
    d = _DECADES
    scale = d[0]
    scale = d[1] if e == np.float32(2) else scale
    scale = d[2] if e == np.float32(4) else scale
    scale = d[3] if e == np.float32(8) else scale
    scale = d[4] if e == np.float32(16) else scale
    scale = d[5] if e == np.float32(32) else scale
    scale = d[6] if e == np.float32(64) else scale
    return scale * mean


def dynamic_signed_decode(c: Any, dec: Any) -> Any:
    """The value of code ``c`` in the signed dynamic map (``dec``, the table, is not read):
    codes 0..126 the negatives (most negative first), 127 zero, 128..254 the positives, 255
    one."""
    cf = np.float32(c)
    k = cf - np.float32(128) if cf >= np.float32(128) else np.float32(126) - cf
    v = _dynamic_value(k + _ONE, False)
    v = -v if cf < np.float32(127) else v
    v = np.float32(0) if cf == np.float32(127) else v
    return _ONE if cf == np.float32(255) else v


def dynamic_unsigned_decode(c: Any, dec: Any) -> Any:
    """The value of code ``c`` in the unsigned dynamic map: 0 zero, 1..254 the positives, 255
    one."""
    cf = np.float32(c)
    v = _dynamic_value(cf + _ONE, True)
    v = np.float32(0) if cf == np.float32(0) else v
    return _ONE if cf == np.float32(255) else v


def table_decode(c: Any, dec: Any) -> Any:
    """The value of code ``c`` in the table ``dec`` (the int8 maps)."""
    return dec[c]


def _frozen_lookup(fmt: str, quant_map: str) -> tuple[Any, Any]:
    """``(decode, encode)`` of a table whose arrays are closure constants: a compiler freezes
    them into the code as read-only data, which no store can alias, so the loops that look
    them up may vectorise (as gathers) where loads from argument arrays may not."""
    t = table(fmt, quant_map)
    dec, base, bthr = t.dec, t.base, t.bthr
    e_lo, e_hi, mb = t.e_lo, t.e_hi, t.mb

    def frozen_decode(c: Any, d: Any) -> Any:
        return dec[c]

    def frozen_encode(y: Any, b: Any, th: Any, lo: Any, hi: Any, m: Any) -> Any:
        return encode(y, base, bthr, e_lo, e_hi, mb)

    return frozen_decode, frozen_encode


# -- the dynamic maps' encode by arithmetic (``FAST_ENCODE``) ------------------------------------
#
# The code ``#{thr < y}`` without a lookup (a lookup is a gather: scalar on AVX2, and the one
# above gathers bytes, scalar everywhere), from the maps' decade structure: the positive values
# of exponent ``i`` are ``10^(i-6)`` times the ``G`` means of ``linspace(0.1, 1, G + 1)``, so
# the threshold between means ``j - 1`` and ``j`` of a decade sits at ``u = j`` (up to
# rounding) for ``u = (|y|·10^(6-i) − 0.1)·G/0.9``. The decade is the piece ``|y|`` falls in
# between the thresholds that cross from one decade into the next (exact float32 comparisons,
# so no estimate there), the offset in it is ``floor(u)``. ``u`` is a monotone float32 function
# of ``|y|`` within a piece, so ``u`` above (below) the ``u`` of a threshold puts ``y`` above
# (below) that threshold: every interior threshold's ``u`` lies within ``_AMB`` of its integer
# (``dynamic_encode_margins``, checked by a test), and a value whose ``u`` lies that close to one
# of ``1..G-1`` is flagged instead: the loops encode a block holding a flagged value by the
# lookup. ``u`` is clamped to ``[1/2, G - 1/2]`` first: the decade's ends are its piece's exact
# comparisons, not integers of ``u``, so a value at a decade's edge (a block's largest
# magnitude, ``|y| = 1``, among them: half the blocks of a signed slot) is never flagged, and
# few blocks are (``u`` within ``_AMB`` of an interior integer: about 1.2·10^-4 of uniform or
# normal values, some 3 % of 256-element blocks). The result is the lookup's code (a test
# holds the two equal on a dense sweep of float32; the exhaustive one runs every float32).

#: half-width of the band of ``u`` around an integer where the arithmetic encode defers to the
#: lookup (the thresholds' ``u`` lie within 2^-17 of their integers)
_AMB = np.float32(2.0**-14)
_ZERO = np.float32(0.0)
_TWO = np.float32(2.0)
_NINTH = np.float32(1.0 / 0.9)  # G/0.9 = G·_NINTH exactly (G a power of two)


def _decade_starts(signed: bool) -> list[int]:
    """The magnitude index (positive values counted from 1 up) of each decade's first value,
    and of 1.0 (decade 7)."""
    return [2**i if signed else 2 ** (i + 1) - 1 for i in range(8)]


def _dynamic_pieces(signed: bool) -> tuple[list[np.float32], list[np.float32]]:
    """The float32 boundaries of the decade pieces of ``|y|``, for positive and for negative
    ``y``: ``|y| > b[i]`` iff ``y`` is past the threshold that enters decade ``i`` (``i = 7``:
    the value 1.0; +inf where none). Negative ``y`` counts thresholds ``<= |y|`` (a threshold
    ``t`` below zero is passed by ``-|y| > t``), hence the float below ``-t``."""
    thr = table("int8", "signed" if signed else "unsigned").thr
    pos = thr[127:] if signed else thr
    starts = _decade_starts(signed)
    bp = [np.float32(pos[c - 1]) for c in starts]
    if not signed:
        return bp, bp
    neg = -thr[:127][::-1]  # the negative half's thresholds, negated, ascending
    bn = [np.nextafter(np.float32(neg[c - 1]), np.float32(0)) for c in starts[:7]]
    return bp, [*bn, np.float32(np.inf)]


def pick(c: Any, a: Any, b: Any) -> Any:
    """``a if c else b``, lowered by the CPU backend to one select (a ternary compiles to
    branches, which a chain of them leaves in place and the loop does not vectorise)."""
    return a if c else b


def _dynamic_u(a: Any, g: Any, s: Any) -> Any:
    """``u`` of ``|y| = a`` in the decade of ``G = g`` and ``10^(6-i) = s`` (float32)."""
    return (a * s - _TENTH) * (g * _NINTH)


def _make_dynamic_encode(signed: bool) -> Any:
    """``encode(y, *lookup args) -> (code, flagged)`` of a dynamic map by arithmetic (see
    above; the lookup's arguments unread): ``code`` (an int32) is the lookup's code where
    ``flagged`` is false."""
    bp, bn = _dynamic_pieces(signed)
    p0, p1, p2, p3, p4, p5, p6, p7 = bp
    # a negative y compares with the same boundaries but for ``|y|`` equal to one whose
    # negative twin is a float below it (a midpoint exactly representable): flagged
    ties = [x for x, xn in zip(bp[:7], bn[:7]) if xn != x]
    if len(ties) > 2:
        raise ValueError(f"{len(ties)} decade boundaries tie; the encode checks two")
    t0, t1 = (*ties, _NAN, _NAN)[:2]  # NaN: equal to nothing
    inf = np.float32(np.inf)
    s0, s1, s2, s3, s4, s5, s6 = (np.float32(10.0 ** (6 - i)) for i in range(7))
    # values in decade i: 2^i (signed), 2^(i+1) (unsigned)
    g0, g1, g2, g3, g4, g5, g6 = (np.float32(2.0 ** (i if signed else i + 1)) for i in range(7))
    first = np.float32(0.0 if signed else -1.0)  # the first's magnitude index, less G
    mid = np.float32(127.0 if signed else 0.0)  # the code of zero
    top = np.float32(128.0 if signed else 255.0)  # magnitude index of 1.0
    two = _TWO

    def dynamic_encode(y: Any, b: Any, th: Any, lo: Any, hi: Any, mb: Any) -> Any:
        a = abs(y) if signed else y
        ng = y < _ZERO if signed else False
        # the piece: past the threshold into decade i (the comparisons nest)
        b0 = a > p0
        b1 = a > p1
        b2 = a > p2
        b3 = a > p3
        b4 = a > p4
        b5 = a > p5
        b6 = a > p6
        b7 = a > pick(ng, inf, p7)  # the negative half has no -1
        g = pick(b1, g1, g0)
        s = pick(b1, s1, s0)
        g = pick(b2, g2, g)
        s = pick(b2, s2, s)
        g = pick(b3, g3, g)
        s = pick(b3, s3, s)
        g = pick(b4, g4, g)
        s = pick(b4, s4, s)
        g = pick(b5, g5, g)
        s = pick(b5, s5, s)
        g = pick(b6, g6, g)
        s = pick(b6, s6, s)
        # u clamped to [1/2, G - 1/2]: a u below 1/2 (above G - 1/2) is below (above) the
        # decade's first (last) interior threshold, whose u lies near 1 (G - 1), and gets the
        # decade's first (last) value either way; the decade's ends are the exact comparisons
        # above, so only a u near one of 1..G-1 is flagged (NaN gives 1/2, masked below)
        u = _dynamic_u(a, g, s)
        u = pick(u > _HALF, u, _HALF)
        gh = g - _HALF
        u = pick(u < gh, u, gh)
        fl = np.floor(u)
        frac = u - fl
        m = g + first + fl
        m = pick(b0, m, _ZERO)
        m = pick(b7, top, m)
        code = pick(ng, mid - m, mid + m)
        inside = a < two
        code = pick(inside, code, _ZERO)  # NaN, ±inf, |y| >= 2: code 0, as the lookup
        near = (frac < _AMB) | (frac > _ONE - _AMB)
        return np.int32(code), near | (a == t0) | (a == t1)

    dynamic_encode.may_flag = True  # type: ignore[attr-defined]
    return dynamic_encode


def dynamic_encode_margins(signed: bool) -> np.ndarray:
    """How far each interior threshold's ``u`` lies from its integer (both signs): the band
    ``_AMB`` must hold every one of them."""
    thr = table("int8", "signed" if signed else "unsigned").thr
    starts = _decade_starts(signed)
    halves = [thr[127:], -thr[:127][::-1]] if signed else [thr]
    out = []
    for th in halves:
        for i in range(7):
            g = np.float32(2.0 ** (i if signed else i + 1))
            lo, hi = starts[i], min(starts[i + 1] - 1, th.size)
            t = th[lo:hi].astype(np.float32)
            u = _dynamic_u(t, g, np.float32(10.0 ** (6 - i)))
            out.append(np.abs(u.astype(np.float64) - np.arange(1, 1 + t.size)))
    return np.concatenate(out)


# -- the 4-bit maps' encode by comparisons (``FAST_ENCODE``) ------------------------------------
#
# Sixteen codes leave fifteen thresholds: ``code = #{k : y > thr[k]}`` is the sum of fifteen
# comparisons against float32 constants frozen into the code (the table's thresholds, whose
# ties already go to the upper code), each a select of 1 or 0, summed in float32 (exact) as a
# tree; no lookup, so the loop vectorises (the lookup gathers bytes: scalar everywhere). The
# lookup's edges are kept: ``|y|`` at or above ``2^(e_hi - 127)`` (2), ±inf and NaN give code 0
# (NaN passes no comparison either). A test holds it equal to the lookup around every
# threshold and on random and special values; the exhaustive one runs every float32.


def int4_encode_constants(quant_map: str) -> tuple[tuple[np.float32, ...], np.float32]:
    """``(thr, lim)`` of the int4 encode by comparisons of ``quant_map``'s table: its 15
    finite thresholds (ascending; ``code = #{k : y > thr[k]}``) and the magnitude at or above
    which a value takes code 0 as in the lookup (``2^(e_hi - 127)``). The CPU loops' encode
    (``FAST_ENCODE``) and the CUDA kernels' (``quant_cuda``) are built from these."""
    t = table("int4", quant_map)
    thr = t.thr[np.isfinite(t.thr)]
    if thr.size != 15:
        raise ValueError(f"{thr.size} finite thresholds; the encode sums 15")
    return tuple(np.float32(x) for x in thr), np.float32(2.0 ** (t.e_hi - 127))


def _make_int4_encode(quant_map: str) -> Any:
    """``encode(y, *lookup args) -> (code, False)`` of the int4 table of ``quant_map`` by
    comparisons (see above; the lookup's arguments unread): the lookup's code of every
    float32, never flagged."""
    thr, lim = int4_encode_constants(quant_map)  # lim: |y| at or above it gives code 0
    k0, k1, k2, k3, k4, k5, k6, k7, k8, k9, k10, k11, k12, k13, k14 = thr

    def int4_encode(y: Any, b: Any, th: Any, lo: Any, hi: Any, mb: Any) -> Any:
        c0 = pick(y > k0, _ONE, _ZERO) + pick(y > k1, _ONE, _ZERO)
        c1 = pick(y > k2, _ONE, _ZERO) + pick(y > k3, _ONE, _ZERO)
        c2 = pick(y > k4, _ONE, _ZERO) + pick(y > k5, _ONE, _ZERO)
        c3 = pick(y > k6, _ONE, _ZERO) + pick(y > k7, _ONE, _ZERO)
        c4 = pick(y > k8, _ONE, _ZERO) + pick(y > k9, _ONE, _ZERO)
        c5 = pick(y > k10, _ONE, _ZERO) + pick(y > k11, _ONE, _ZERO)
        c6 = pick(y > k12, _ONE, _ZERO) + pick(y > k13, _ONE, _ZERO)
        c7 = pick(y > k14, _ONE, _ZERO)
        code = ((c0 + c1) + (c2 + c3)) + ((c4 + c5) + (c6 + c7))
        code = pick(abs(y) < lim, code, _ZERO)  # NaN, ±inf, |y| >= 2: code 0
        return np.int32(code), False

    int4_encode.may_flag = False  # type: ignore[attr-defined]
    return int4_encode


def _flag_none(enc: Any) -> Any:
    """``encode``'s arguments, ``(code, False)``: a codec whose encode needs no lookup."""

    def never_flagged(y: Any, b: Any, th: Any, lo: Any, hi: Any, m: Any) -> Any:
        return enc(y, b, th, lo, hi, m), False

    never_flagged.may_flag = False  # type: ignore[attr-defined]
    return never_flagged


#: per table: (decode, encode) as the loops call them (a packed table's of one nibble: the
#: loops unpack and pack)
CODECS = {
    "dynamic_signed": _frozen_lookup("int8", "signed"),
    "dynamic_unsigned": _frozen_lookup("int8", "unsigned"),
    "dynamic4_signed": _frozen_lookup("int4", "signed"),
    "linear4_unsigned": _frozen_lookup("int4", "unsigned"),
    "float8_e4m3fn": (e4m3_decode, e4m3_encode),
    "float8_e5m2": (e5m2_decode, e5m2_encode),
}

#: the dynamic maps' decode by arithmetic (bit for bit the table's): packed on AVX2 and AVX-512
#: but not faster than the lookup's gather on the host measured (``bench/quant_loop_cost.py``:
#: AVX2 code 0.74 against 0.26 ns/element for a loop that only decodes), so the loops look up
ARITHMETIC_DECODE = {
    "dynamic_signed": dynamic_signed_decode,
    "dynamic_unsigned": dynamic_unsigned_decode,
}

#: per table: the loops' first encode, ``(y, *lookup args) -> (code, flagged)``: by arithmetic
#: (the int8 maps: a block with a flagged value is encoded again by ``CODECS``' lookup), by
#: comparisons (the int4 maps, never flagged) or the ``CODECS`` encode itself, never flagged
#: (float8)
FAST_ENCODE = {
    "dynamic_signed": _make_dynamic_encode(True),
    "dynamic_unsigned": _make_dynamic_encode(False),
    "float8_e4m3fn": _flag_none(e4m3_encode),
    "float8_e5m2": _flag_none(e5m2_encode),
    "dynamic4_signed": _make_int4_encode("signed"),
    "linear4_unsigned": _make_int4_encode("unsigned"),
}


def may_flag(table_name: str) -> bool:
    """Whether ``FAST_ENCODE[table_name]`` can flag a value (then a loop keeps the lookup to
    encode a flagged block again; a codec never flagged needs none)."""
    return bool(FAST_ENCODE[table_name].may_flag)


#: the dynamic and 4-bit maps' lookup in ``FAST_ENCODE``'s form (never flagged): the encode the
#: loops ran before the arithmetic one and the comparisons, kept for ``bench/quant_loop_cost.py``
#: to time beside them
LOOKUP_ENCODE = {name: _flag_none(CODECS[name][1]) for name in (*ARITHMETIC_DECODE, *PACKED_TABLES)}
