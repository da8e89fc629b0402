"""Quantized state slots: the 8-bit formats, their value tables and the per-element codec.

A quantized slot keeps, per parameter, one byte per element (``codes``, shaped like the
parameter) and one float32 scale per block of ``BLOCK`` elements (``absmax``, one-dimensional,
``ceil(n / BLOCK)`` entries). Blocks start at each tensor's first element, so a block never
straddles two tensors; the last block of a tensor may be short. A value is

    value = table[code] * (absmax / top)

with the format's 256-entry ``table`` and its largest finite value ``top``. A step dequantizes
a block, runs the rule in float32, takes the new block's absmax (the largest magnitude of the
new float32 values, NaN if any is NaN) and requantizes every new value ``x`` as the code of the
table value nearest to ``x * (top / absmax)`` (0 when the absmax is 0): two passes over the
block in registers and cache, one over memory.

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

The maps are built here from their definition, in float32 as bitsandbytes builds them with
torch on the CPU: ``linspace(0.1, 1, n)`` (``step = (1 - 0.1) / (n - 1)``, ``start + step·i``
for the first half, ``end - step·(n - 1 - i)`` for the second, one rounding each), the
midpoints of neighbours (``(a + b) / 2``) scaled by ``10^(i - 6)`` for exponent ``i`` of
0..6, negated for the signed map, then 0 and 1.

Encoding is a search over 255 float32 thresholds (``Table.thr``, ascending): ``code = #{k :
y > thr[k]}``. ``thr[k]`` is the exact midpoint of values ``k`` and ``k+1`` rounded down to
float32 (ties then go to the lower code: for a float32 ``y``, ``y > m`` exactly iff ``y >
round_down(m)``), or, where a tie goes up (float8's round-to-even), the float32 just below the
midpoint. float8 encodes ``|y|`` over its positive codes and sets the sign bit from ``y``'s
(thresholds past the largest finite value are +inf). The per-element functions ``encode`` and
``encode_signmag`` are plain Python over scalars, compiled by the backends like the rules.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .storage import f32_bits

__all__ = [
    "BLOCK",
    "FORMATS",
    "Table",
    "dynamic_map",
    "encode",
    "encode_signmag",
    "fp8_values",
    "nblocks",
    "table",
]

#: elements per block (one float32 scale each): bitsandbytes' blocksize for 8-bit optimizers
BLOCK = 256
#: the quantized state formats ``state_dtype=`` accepts
FORMATS = ("int8", "float8_e4m3")
#: the value table of each (format, slot map): "signed" or "unsigned"
TABLES = {
    ("int8", "signed"): "dynamic_signed",
    ("int8", "unsigned"): "dynamic_unsigned",
    ("float8_e4m3", "signed"): "float8_e4m3fn",
    ("float8_e4m3", "unsigned"): "float8_e5m2",
}
#: float8 layouts: (exponent bits, mantissa bits, bias, "fn" (no inf, one NaN) or "ieee")
_FP8 = {"float8_e4m3fn": (4, 3, 7, "fn"), "float8_e5m2": (5, 2, 15, "ieee")}


def nblocks(n: int) -> int:
    """Blocks (scales) of a tensor of ``n`` elements."""
    return -(-int(n) // BLOCK)


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
    if extra > 0:  # not reached with 7 exponent bits of 8
        raise NotImplementedError("maps with a linear region are not used")
    data += [0.0, 1.0]
    if len(data) != 2**total_bits:
        raise ValueError(f"dynamic map of {len(data)} values; expected {2**total_bits}")
    return np.sort(np.array(data, dtype=np.float32))


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
    """One format's codec: ``dec`` (256 float32: the value of each code), ``thr`` (255
    float32 thresholds of the search), ``top`` (the largest finite value), ``signmag`` (the
    code is a float8 byte: sign bit and the magnitude's search)."""

    name: str
    dec: np.ndarray
    thr: np.ndarray
    top: np.float32
    signmag: bool


@functools.cache
def table(fmt: str, quant_map: str) -> Table:
    """The codec of format ``fmt`` (``FORMATS``) for a slot of map ``quant_map``."""
    name = TABLES[(fmt, quant_map)]
    if fmt == "int8":
        vals = dynamic_map(quant_map == "signed")
        thr = _thresholds(vals, np.zeros(255, bool))
        t = Table(name, vals, thr, np.float32(1.0), False)
    else:
        dec = fp8_values(name)
        pos = dec[:128]
        pos = pos[np.isfinite(pos)]  # the positive codes are the ascending values 0..k
        codes = np.arange(pos.size)
        # round half to even: a tie goes up when the upper code is even
        thr = _thresholds(pos, (codes[1:] & 1) == 0)
        t = Table(name, dec, thr, np.float32(pos[-1]), True)
    for a in (t.dec, t.thr):
        a.setflags(write=False)
    return t


# -- per-element codec (compiled by the backends) ---------------------------------------------


def encode(y: Any, thr: Any) -> Any:
    """The code of float32 ``y`` in a sorted table: the number of thresholds below it (an
    unrolled binary search over the 255 ascending ``thr``; NaN gives 0)."""
    i = 0
    if y > thr[i + 127]:
        i += 128
    if y > thr[i + 63]:
        i += 64
    if y > thr[i + 31]:
        i += 32
    if y > thr[i + 15]:
        i += 16
    if y > thr[i + 7]:
        i += 8
    if y > thr[i + 3]:
        i += 4
    if y > thr[i + 1]:
        i += 2
    if y > thr[i]:
        i += 1
    return i


def encode_signmag(y: Any, thr: Any) -> Any:
    """The float8 byte of float32 ``y``: ``encode(|y|)`` over the positive codes, with ``y``'s
    sign bit (``-0.0`` gives the byte of -0)."""
    return encode(abs(y), thr) | ((f32_bits(y) >> 24) & 0x80)
