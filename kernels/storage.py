"""Storage dtypes: how one fused pass loads and stores each array, and the bit conversions.

The per-element rules compute in one *compute dtype*: float32, or float64 for float64 params.
The arrays of a step may be stored narrower or wider than that; the backends' generated loads
widen each value to the compute dtype before the rule sees it and their stores round the rule's
result back to the array's storage dtype, so every rule gets mixed precision without an edit.

``IO`` is the storage format of one launch: the storage dtype of the param, the grad and the
state slots, whether an fp32 master copy of the param is kept (``master``), whether the param
store rounds stochastically (``sr``), and the extras a launch may carry: the gradient's loss scale
(``scale``: a host scalar, or a device scalar read in the kernel), a device ``found_inf`` flag
read in the kernel, host scalars read from a device buffer (``kbuf``, capturable steps), and a
write-back of the unscaled gradient (``write_grad``). ``IO()`` with every array in the compute
dtype and no extra is ``plain``: the backends run their original kernels for it.

Neither the CPU compiler nor Python has float16/bfloat16 arithmetic, so the conversions below
work on bit patterns (the backends hand 16-bit arrays to them as ``uint16``), exactly:

- bfloat16 -> float32: the 16 bits shifted up (exact, NaN payloads kept);
- float32 -> bfloat16: round to nearest even on the bits; NaN stays NaN, made quiet;
- two neighbouring bfloat16 as one 32-bit word (``bf16_lo``/``bf16_hi``/``bf16_pair_store``):
  the same conversions, for the CPU loop that walks all-bfloat16 arrays a word at a time;
- float16 <-> float32: exact both ways on every value (subnormals, ±0, ±inf), round to nearest
  even, NaN kept quiet (F. Giesen's branch-light forms);
- a float32 master as a bfloat16 param and a 16-bit remainder (``rem_hi``/``rem_lo``, joined by
  ``rem_join``; Transformer Engine's ``store_param_remainders``): the remainder is the low 16
  bits as an int16, the param the high 16 bits plus one where the remainder is negative (low
  bits >= 0x8000: half away from zero in magnitude, ties included), all modulo 2**16; the join
  undoes it, so (param, remainder) <-> master is a bijection of 32-bit patterns and the master
  comes back bit for bit. The param differs from ``bf16_store``'s (nearest even) only where the
  low bits are exactly 0x8000 and bit 16 is clear (a tie with an even lower neighbour: one unit
  further from zero here), and on NaN (kept as bits, not made quiet);
- stochastic rounding to bfloat16: 16 random bits added below the kept bits, then truncated
  (unbiased: a value rounds up with probability equal to its distance from the lower
  neighbour); the random bits are a counter-based hash of (seed, step, element index), so no
  RNG state exists anywhere and a run is reproducible from its seed.

They are plain Python over integers and NumPy float32 scalars: ``numba.njit`` (CPU) and
``numba.cuda.jit`` (GPU) compile them, the CUDA simulator and the tests run them as they are.
``f32_bits``/``bits_f32`` (bit casts) are the two primitives each compiler lowers itself (like
``fma``). ``kernels/storage.cuh`` holds the same functions in CUDA C, operation for operation.
Integers are int64 holding unsigned 32-bit values (the compilers promote small integers to 64
bits anyway); every product of the hash stays below 2**63.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "COMPUTE",
    "IO",
    "ITEMSIZE",
    "KINDS",
    "REMAINDER",
    "bf16_hi",
    "bf16_lo",
    "bf16_load",
    "bf16_pair_store",
    "bf16_store",
    "bf16_store_sr",
    "bits_f32",
    "f16_load",
    "f16_store",
    "f32_bits",
    "io_for",
    "make_converters",
    "mix32",
    "rem_hi",
    "rem_join",
    "rem_lo",
    "sr_bits",
    "step_key",
]

#: storage dtype names, widest first
KINDS = ("float64", "float32", "float16", "bfloat16")
ITEMSIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int16": 2}
#: the storage dtype of a master copy kept as a remainder beside its bfloat16 param
REMAINDER = "int16"
#: 16-bit kinds are handed to the compiled loops as uint16 views
BITS16 = ("float16", "bfloat16")
#: compute dtype of a param storage dtype
COMPUTE = {"float64": "float64", "float32": "float32", "float16": "float32", "bfloat16": "float32"}
#: 2**-14 as float32 (F. Giesen's renormalisation constant of float16 subnormals)
_F16_MAGIC = np.float32(6.103515625e-05)
#: F. Giesen's alignment constant of float16 subnormals: ((127 - 15) + (23 - 10) + 1) << 23, 0.5
_F16_DENORM = np.float32(0.5)
_F16_DENORM_BITS = 0x3F000000


def f32_bits(x: Any) -> Any:
    """The bit pattern of float32 ``x`` as a non-negative integer (each compiler lowers this
    to a bit cast)."""
    return int(np.float32(x).view(np.uint32))


def bits_f32(u: Any) -> Any:
    """The float32 whose bit pattern is the low 32 bits of ``u`` (a bit cast when compiled)."""
    return np.uint32(int(u) & 0xFFFFFFFF).view(np.float32)


def bf16_load(h: Any) -> Any:
    """bfloat16 bits -> float32, exactly."""
    return bits_f32(np.int64(h) << 16)


def bf16_store(x: Any) -> Any:
    """float32 -> bfloat16 bits, round to nearest even; NaN stays NaN (quiet, payload kept)."""
    u = f32_bits(x)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return ((u >> 16) | 0x40) if nan else ((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


def bf16_lo(w: Any) -> Any:
    """The bfloat16 in the low half of the 32-bit word ``w`` (the first of two neighbouring
    elements on a little-endian machine) -> float32, exactly."""
    return bits_f32((np.int64(w) & 0xFFFF) << 16)


def bf16_hi(w: Any) -> Any:
    """The bfloat16 in the high half of ``w`` (the second element) -> float32, exactly."""
    return bits_f32(np.int64(w) & 0xFFFF0000)


def bf16_pair_store(a: Any, b: Any) -> Any:
    """Two float32 -> one 32-bit word of two bfloat16, ``a`` in the low half: exactly
    ``bf16_store(a) | bf16_store(b) << 16``. The CPU lowering rounds both in 32-bit lanes and
    keeps their high halves (no narrowing shuffle): the loop over word pairs that uses it
    moves no element across vector lanes."""
    return bf16_store(a) | (bf16_store(b) << 16)


def bf16_store_sr(x: Any, r: Any) -> Any:
    """float32 -> bfloat16 bits, rounded stochastically with the 16 random bits ``r``: up
    (away from zero) with probability (dropped bits) / 2**16, else down; NaN as ``bf16_store``.
    """
    u = f32_bits(x)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return ((u >> 16) | 0x40) if nan else ((u + r) >> 16)


def rem_join(h: Any, r: Any) -> Any:
    """The float32 master of bfloat16 bits ``h`` and int16 remainder ``r``, exactly: the high
    half is ``h`` less one where ``r < 0`` (``rem_hi`` rounded it up), modulo 2**16, the low
    half ``r``'s bits."""
    r = np.int64(r)
    hi = (np.int64(h) - ((r >> 15) & 1)) & 0xFFFF
    return bits_f32((hi << 16) | (r & 0xFFFF))


def rem_hi(x: Any) -> Any:
    """The bfloat16 bits kept beside the remainder of float32 ``x``: its high 16 bits, plus
    one where its low 16 bits are >= 0x8000 (half away from zero in magnitude), modulo 2**16."""
    u = f32_bits(x)
    return ((u >> 16) + ((u >> 15) & 1)) & 0xFFFF


def rem_lo(x: Any) -> Any:
    """The int16 remainder of float32 ``x``: its low 16 bits as a signed 16-bit value."""
    return ((f32_bits(x) & 0xFFFF) ^ 0x8000) - 0x8000


def f16_load(h: Any) -> Any:
    """float16 bits -> float32, exactly (subnormals, ±0, ±inf, NaN payloads)."""
    h = np.int64(h)
    o = ((h & 0x7FFF) << 13) + 0x38000000  # exponent rebiased from 15 to 127
    e = h & 0x7C00
    # zero or subnormal: renormalised by one exact float subtraction
    sub = f32_bits(bits_f32(o + 0x00800000) - _F16_MAGIC)
    # inf or NaN: the exponent is all ones again
    o = (o + 0x38000000) if e == 0x7C00 else (sub if e == 0 else o)
    return bits_f32(o | ((h & 0x8000) << 16))


def f16_store(x: Any) -> Any:
    """float32 -> float16 bits, round to nearest even (overflow to ±inf, subnormals exact);
    NaN stays NaN (quiet, the top of its payload kept)."""
    u = f32_bits(x)
    a = u & 0x7FFFFFFF
    # |x| >= 65536: inf, or NaN
    big = (0x7E00 | ((a >> 13) & 0x3FF)) if a > 0x7F800000 else 0x7C00
    # normal: rebias the exponent (-112 << 23) and round half to even (+ 0xFFF, + 1 if odd)
    norm = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    # below 2**-14: a float16 subnormal or zero, aligned by one float addition
    o = (
        big
        if a >= 0x47800000
        else ((f32_bits(bits_f32(a) + _F16_DENORM) - _F16_DENORM_BITS) if a < 0x38800000 else norm)
    )
    return o | ((u >> 16) & 0x8000)


def mix32(x: Any) -> Any:
    """A 32-bit integer hash (bijective, full avalanche: C. Wellons' lowbias32 family)."""
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def step_key(seed: Any, step: Any) -> Any:
    """The per-step key of the rounding hash: one value per (seed, step)."""
    return mix32((seed & 0xFFFFFFFF) ^ mix32(step))


def sr_bits(i: Any, salt: Any, key: Any) -> Any:
    """16 random bits for element ``i`` of the array with ``salt`` under the step ``key``:
    ``mix32(mix32(i_lo ^ salt) + i_hi ^ key) >> 16`` (``mix32`` written out twice, so that
    the function calls nothing a compiler must resolve)."""
    x = ((i & 0xFFFFFFFF) ^ salt) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = ((x + (i >> 32)) ^ key) & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    return x >> 16


def make_converters(
    dev: Callable[[Callable[..., Any]], Any], compute: str
) -> dict[str, dict[str, Any]]:
    """The per-array loads and stores of a compiled loop, for a compiler that compiles a Python
    function with ``dev`` (``numba.cuda.jit(device=True)``, or the identity where the functions
    are registered already): ``{"load": {kind: fn(bits or value)}, "store": {kind: fn(value)},
    "param": {kind or "bfloat16-sr" or "bfloat16-remainder": fn(value, i, salt, key)},
    "master": {master kind: (load, store)}}``, each a closure over the leaf conversions above
    (no call resolved by global name); a float32 master's pair is never called (the loop reads
    and writes the master as it is), a remainder's is ``(rem_join, rem_lo)``."""
    np_c = np.float64 if compute == "float64" else np.float32
    leaf = {
        n: dev(globals()[n])
        for n in (
            "bf16_load",
            "bf16_store",
            "bf16_store_sr",
            "f16_load",
            "f16_store",
            "sr_bits",
            "rem_join",
            "rem_hi",
            "rem_lo",
        )
    }
    rem_hi_ = leaf["rem_hi"]
    bf16_store, bf16_store_sr, f16_store = (
        leaf["bf16_store"],
        leaf["bf16_store_sr"],
        leaf["f16_store"],
    )
    sr_bits_ = leaf["sr_bits"]

    def same(x):
        return x

    def to_compute(x):
        return np_c(x)

    def to_f32(x):
        return np.float32(x)

    def p_same(x, i, salt, key):
        return x

    def p_f32(x, i, salt, key):
        return np.float32(x)

    def p_bf16(x, i, salt, key):
        return bf16_store(x)

    def p_bf16_sr(x, i, salt, key):
        return bf16_store_sr(x, sr_bits_(i, salt, key))

    def p_f16(x, i, salt, key):
        return f16_store(x)

    def p_rem(x, i, salt, key):
        return rem_hi_(x)

    w = {
        f.__name__: dev(f)
        for f in (same, to_compute, to_f32, p_same, p_f32, p_bf16, p_bf16_sr, p_f16, p_rem)
    }
    return {
        "load": {
            compute: w["same"],
            "float32": w["to_compute"] if compute == "float64" else w["same"],
            "bfloat16": leaf["bf16_load"],
            "float16": leaf["f16_load"],
        },
        "store": {
            compute: w["same"],
            "float32": w["to_f32"] if compute == "float64" else w["same"],
            "bfloat16": leaf["bf16_store"],
            "float16": leaf["f16_store"],
        },
        "param": {
            compute: w["p_same"],
            "float32": w["p_f32"] if compute == "float64" else w["p_same"],
            "bfloat16": w["p_bf16"],
            "bfloat16-sr": w["p_bf16_sr"],
            "bfloat16-remainder": w["p_rem"],
            "float16": w["p_f16"],
        },
        # a master copy's load (param bits, master element) and store (the master's element)
        "master": {
            "float32": (w["same"], w["same"]),
            "int16": (leaf["rem_join"], leaf["rem_lo"]),
        },
    }


# -- the storage format of one launch -----------------------------------------------------------


@dataclass(frozen=True)
class IO:
    """How one launch stores its arrays and what else it carries (see the module docstring)."""

    param: str = "float32"
    grad: str = "float32"
    state: str = "float32"
    #: an fp32 master copy of the param is read, stepped and written, the param stored from it
    master: bool = False
    #: the master is kept as the bfloat16 param and an int16 remainder (``rem_join``/``rem_hi``/
    #: ``rem_lo``) instead of a float32 array; only with ``master`` and a bfloat16 param
    remainder: bool = False
    #: the param store rounds stochastically (bfloat16 params without a master)
    sr: bool = False
    #: the grad is multiplied by 1/scale first: None, "host" (a scalar), "device" (a pointer)
    scale: str | None = None
    #: a device flag read in the kernel: nonzero leaves every array as it was
    found_inf: bool = False
    #: the host scalars come from a device buffer (capturable steps)
    kbuf: bool = False
    #: the unscaled grad is stored back into the grad array
    write_grad: bool = False
    #: quantized state slots (``kernels/quant.py``): None, "int8" or "float8_e4m3"; the slots
    #: a rule does not let be quantized are stored as ``state`` says (float32)
    quant: str | None = None

    def __post_init__(self) -> None:
        if self.remainder and not (self.master and self.param == "bfloat16"):
            raise ValueError(
                f"a master kept as a remainder needs a bfloat16 param with a master copy; got "
                f"param={self.param!r}, master={self.master}"
            )

    @property
    def compute(self) -> str:
        return COMPUTE[self.param]

    @property
    def param_store(self) -> str:
        """The param store's conversion: the param kind, "bfloat16-sr" (stochastic) or
        "bfloat16-remainder" (``rem_hi``)."""
        if self.remainder:
            return "bfloat16-remainder"
        return "bfloat16-sr" if self.sr else self.param

    @property
    def plain(self) -> bool:
        c = self.compute
        return (
            self.param == self.grad == self.state == c
            and not (self.master or self.sr or self.scale or self.found_inf or self.kbuf)
            and not self.write_grad
            and not self.quant
        )

    def kind(self, role: str) -> str:
        """Storage dtype of ``role``: "param", "grad", "state" or "master" (float32, or int16
        for a remainder)."""
        if role == "master":
            return REMAINDER if self.remainder else "float32"
        return getattr(self, role)

    def itemsizes(self) -> dict[str, int]:
        return {r: ITEMSIZE[self.kind(r)] for r in ("param", "grad", "state", "master")}


def io_for(param: str, grad: str | None = None, state: str | None = None, **extras: Any) -> IO:
    """The ``IO`` of a launch from storage dtype names (grad and state default to the param's)."""
    return IO(param=param, grad=grad or param, state=state or param, **extras)


def element_source(
    nslots: int,
    writes: Sequence[bool],
    io: IO,
    scale: str,
    key: str,
    indent: int,
    index: str = "i",
) -> list[str]:
    """The per-element body of a launch with the storage format ``io``, as Python source lines
    at ``indent``: each array loaded once into a compute-dtype local (``lp``/``lg``/``ls``; a
    master kept as a remainder joined with its param by ``lm``), the rule (``elem``) called,
    each result stored once (``sp``/``sg``/``ss``; the remainder by ``sm``). ``scale``: the
    expression of 1/grad_scale, ``key``: that of the step key (the loop variable is ``i``, the
    salt ``x[1]``; ``index``: the element's index in its array, which stochastic rounding
    hashes, when the loop runs over a slice of it). The numba CPU loops and the numba-cuda
    kernel share it."""
    pad = " " * indent
    slots = [f"s{j}" for j in range(nslots)]
    outs = ", ".join(["pi"] + [f"o{j}" for j in range(nslots)])
    pv = "lm(p[i], m[i])" if io.remainder else "m[i]" if io.master else "lp(p[i])"
    lines = [
        f"pv = {pv}",
        f"gv = lg(g[i]){' * ' + scale if io.scale else ''}",
    ]
    if io.write_grad:
        lines.append("g[i] = sg(gv)")
    lines += [f"a{j} = ls(s{j}[i])" if w else f"a{j} = pv" for j, w in enumerate(writes)]
    lines.append(
        f"{outs}{',' if nslots == 0 else ''} = elem("
        f"pv, gv, {''.join(f'a{j}, ' for j in range(nslots))}k)"
    )
    if io.master:
        lines.append("m[i] = sm(pi)" if io.remainder else "m[i] = pi")
    lines.append(f"p[i] = sp(pi, {index}, x[1], {key})")
    lines += [f"{s}[i] = ss(o{j})" for j, s in enumerate(slots) if writes[j]]
    return [pad + line for line in lines]
