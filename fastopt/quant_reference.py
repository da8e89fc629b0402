"""The NumPy oracle of quantized state (``state_dtype="int8"`` / ``"float8_e4m3"`` / ``"int4"``).

Written apart from the kernels' codec (``kernels/quant.py``): a code here is the index of the
nearest table value found by comparing float64 distances (``argmin``: ties to the lower code),
not by the kernels' threshold search; float8 codes come from ml_dtypes' casts (round to nearest
even) and float8 values from ml_dtypes' dtypes, not from ``kernels.quant.fp8_values``; the
int8 value tables are ``kernels.quant.dynamic_map``, which ``tests/test_quant_reference.py``
holds to bitsandbytes' ``create_dynamic_map`` (and to its definition evaluated by torch); the
int4 signed map is ``dynamic_map(True, 3, 4)`` and the unsigned one ``linspace(0, 1, 17)[1:]``
evaluated here, both held to torchao's. int4 codes are the nearest value with ties to the
upper code (torchao's rounding), packed two per byte here (element ``2i`` the high nibble of
byte ``i``).

Semantics (``kernels/quant.py``'s docstring): blocks of ``BLOCKS[fmt]`` elements from each
tensor's first element; ``absmax`` the largest magnitude of a block's float32 values (NaN if
any is);
``code = nearest(x * (top / absmax))`` (the code of 0 when absmax is below ``top · 2^-126``);
``value = table[code] * (absmax / top)``, every product and quotient rounded to float32.
``oracle_step`` is one step: each quantized slot dequantized, the low-precision oracle
(``precision.oracle_step``, float32 state) run, each quantized slot requantized.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from . import precision
from .kernels import RULES, quant
from .kernels.storage import IO

__all__ = ["dequantize", "oracle_step", "pack", "quantize", "top", "unpack", "values"]


def _fp8_dtype(name: str) -> Any:
    import ml_dtypes

    return np.dtype(getattr(ml_dtypes, name))


def values(fmt: str, quant_map: str) -> np.ndarray:
    """The float32 value of every code of format ``fmt`` for a slot of ``quant_map``."""
    name = quant.TABLES[(fmt, quant_map)]
    if fmt == "int8":
        return quant.dynamic_map(quant_map == "signed")
    if fmt == "int4":
        if quant_map == "signed":
            return quant.dynamic_map(True, 3, 4)
        return np.linspace(0, 1, 17, dtype=np.float64)[1:].astype(np.float32)
    return np.arange(256, dtype=np.uint8).view(_fp8_dtype(name)).astype(np.float32)


def top(fmt: str, quant_map: str) -> np.float32:
    """The largest finite value of the format's table."""
    if fmt in ("int8", "int4"):
        return np.float32(1.0)
    return np.float32(float(np.finfo(_fp8_dtype(quant.TABLES[(fmt, quant_map)])).max))


def _blocks(n: int, fmt: str) -> np.ndarray:
    """The block index of each of ``n`` elements."""
    return np.arange(n) // quant.BLOCKS[fmt]


def pack(codes: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """4-bit ``codes`` (one per element) two per byte: element ``2i`` the high nibble of byte
    ``i``, ``2i + 1`` the low one (0 past an odd count)."""
    c = np.zeros(2 * (-(-codes.size // 2)), np.uint8)
    c[: codes.size] = codes
    return ((c[0::2] << 4) | c[1::2]).astype(np.uint8)


def unpack(packed: npt.NDArray[np.uint8], n: int) -> npt.NDArray[np.uint8]:
    """The ``n`` 4-bit codes of ``packed`` (``pack``'s inverse)."""
    p = np.asarray(packed, np.uint8).reshape(-1)
    return np.stack([p >> 4, p & 15], axis=1).reshape(-1)[:n]


def quantize(
    x: npt.ArrayLike, fmt: str, quant_map: str
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.float32]]:
    """``(codes, absmax)`` of the float32 values ``x`` (flattened; int4 codes packed)."""
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    bs = quant.BLOCKS[fmt]
    nb = -(-n // bs)
    pad = np.full(nb * bs, 0, np.float32)
    pad[:n] = np.abs(x)
    with np.errstate(invalid="ignore"):
        absmax = pad.reshape(nb, bs).max(axis=1).astype(np.float32)
    t = top(fmt, quant_map)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        # a block under top * 2^-126 (where top / absmax could overflow) holds zeros
        tiny = np.float32(t * np.float32(np.ldexp(1.0, -126)))
        efac = np.where(absmax >= tiny, t / absmax, np.float32(0)).astype(np.float32)
        y = (x * efac[_blocks(n, fmt)]).astype(np.float32)
    if fmt == "int4":  # nearest; of equal distances the upper code (torchao's rounding)
        v = values(fmt, quant_map).astype(np.float64)[::-1]
        codes = np.empty(n, np.uint8)
        for lo in range(0, n, 1 << 16):
            d = np.abs(y[lo : lo + (1 << 16), None].astype(np.float64) - v[None, :])
            codes[lo : lo + (1 << 16)] = v.size - 1 - np.argmin(d, axis=1)
        codes[np.isnan(y)] = 0
        return pack(codes), absmax
    if fmt == "int8":
        v = values(fmt, quant_map).astype(np.float64)
        codes = np.empty(n, np.uint8)
        for lo in range(0, n, 4096):  # nearest: the first of equal distances (lower code)
            d = np.abs(y[lo : lo + 4096, None].astype(np.float64) - v[None, :])
            codes[lo : lo + 4096] = np.argmin(d, axis=1)
        codes[np.isnan(y)] = 0
    else:
        with np.errstate(invalid="ignore", over="ignore"):
            codes = y.astype(_fp8_dtype(quant.TABLES[(fmt, quant_map)])).view(np.uint8)
    return codes, absmax


def dequantize(
    codes: npt.ArrayLike, absmax: npt.ArrayLike, fmt: str, quant_map: str, n: int | None = None
) -> npt.NDArray[np.float32]:
    """The float32 values of ``codes`` (flattened) under the block scales ``absmax``: ``n``
    values (int4: packed codes, ``2 · codes.size`` when None; else ``codes.size``)."""
    c = np.asarray(codes, dtype=np.uint8).reshape(-1)
    if fmt in quant.PACKED:
        c = unpack(c, 2 * c.size if n is None else n)
    a = np.asarray(absmax, dtype=np.float32).reshape(-1)
    t = top(fmt, quant_map)
    with np.errstate(invalid="ignore", over="ignore"):
        dfac = (a / t).astype(np.float32)
        return (values(fmt, quant_map)[c] * dfac[_blocks(c.size, fmt)]).astype(np.float32)


def oracle_step(
    rule: str,
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: Mapping[str, Any],
    *,
    fmt: str,
    io: IO,
    step: int,
    hp: Mapping[str, Any],
    hs: Mapping[str, Any] | None = None,
    master: npt.NDArray[Any] | None = None,
    salt: int = 0,
    inv_scale: float | None = None,
    key: int = 0,
) -> None:
    """One step of ``rule`` with quantized state, in place: ``state`` maps each present slot
    to a float32 array, or, for a quantized slot, to ``(codes, absmax)`` (written in place);
    ``io`` is the storage format of the other arrays (its state dtype float32)."""
    spec = RULES[rule]
    full: dict[str, Any] = {}
    quantized: dict[str, tuple[Any, Any, str]] = {}
    for name, a in state.items():
        if isinstance(a, tuple):
            qm = spec.slot(name).quant_map
            n = int(np.prod(np.shape(param)))
            full[name] = dequantize(a[0], a[1], fmt, qm, n).reshape(np.shape(param))
            quantized[name] = (a[0], a[1], qm)
        else:
            full[name] = a
    precision.oracle_step(
        rule,
        param,
        grad,
        full,
        io=io,
        step=step,
        hp=hp,
        hs=hs,
        master=master,
        salt=salt,
        inv_scale=inv_scale,
        key=key,
    )
    for name, (codes, absmax, qm) in quantized.items():
        c, a = quantize(full[name], fmt, qm)
        codes.reshape(-1)[...] = c
        absmax[...] = a
