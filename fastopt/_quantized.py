"""Quantized state on the host side: the checks of a slot's (codes, absmax) pair, array-wide
conversions between float32 and quantized state (loading a full-precision state dict into a
quantized optimizer and back), and the state names (``<slot>.codes``, ``<slot>.absmax``).

The conversions are the kernels' codec (``kernels/quant.py``: the same thresholds, searched
with ``np.searchsorted``), so a state quantized here is what a step would have stored.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ._validate import check_writable, describe, dtype_of, is_array, residence
from .kernels import quant

__all__ = [
    "ABSMAX",
    "CODES",
    "check_backend",
    "check_pair",
    "constant",
    "dequantize",
    "full_precision_state",
    "names_of",
    "quantize",
    "split_name",
]

CODES = "codes"
ABSMAX = "absmax"


def names_of(slot: str) -> tuple[str, str]:
    """The state names of a quantized slot's two buffers."""
    return f"{slot}.{CODES}", f"{slot}.{ABSMAX}"


def split_name(name: str) -> tuple[str, str | None]:
    """``("exp_avg", "codes")`` of ``"exp_avg.codes"``; ``(name, None)`` for any other."""
    base, dot, part = name.rpartition(".")
    if dot and part in (CODES, ABSMAX):
        return base, part
    return name, None


def pack(codes: np.ndarray) -> np.ndarray:
    """4-bit codes, one per element, two per byte (``kernels/quant.py``: element ``2i`` the
    high nibble of byte ``i``)."""
    c = np.zeros(2 * (-(-codes.size // 2)), np.uint8)
    c[: codes.size] = codes
    return (c[0::2] << 4) | c[1::2]


def unpack(codes: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` 4-bit codes of packed ``codes``, one per element."""
    c = np.asarray(codes, np.uint8).reshape(-1)
    return np.stack([c >> 4, c & 15], axis=1).reshape(-1)[:n]


def codes_shape(fmt: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of the codes of a slot of a param of ``shape``: the param's (one code per
    byte), or ``(ceil(n / 2),)`` for a packed format."""
    if fmt in quant.PACKED:
        return (quant.code_bytes(int(np.prod(shape)) if shape else 1, fmt),)
    return tuple(shape)


def quantize(x: Any, fmt: str, quant_map: str) -> tuple[np.ndarray, np.ndarray]:
    """``(codes, absmax)`` of float32 values ``x`` (one tensor: blocks from its first
    element; packed codes for a packed format), as a step stores them."""
    t = quant.table(fmt, quant_map)
    bs = quant.BLOCKS[fmt]
    x = np.asarray(x, dtype=np.float32).reshape(-1)
    n = x.size
    nb = quant.nblocks(n, fmt)
    mag = np.zeros(nb * bs, np.float32)
    mag[:n] = np.abs(x)
    with np.errstate(invalid="ignore"):
        absmax = mag.reshape(nb, bs).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        efac = np.where(absmax >= t.tiny, t.top / absmax, np.float32(0)).astype(np.float32)
        y = (x * efac[np.arange(n) // bs]).astype(np.float32)
    mag_y = np.abs(y) if t.signmag else y
    codes = np.searchsorted(t.thr, mag_y, side="left").astype(np.int64)
    codes[np.isnan(y)] = 0
    if t.signmag:
        codes |= (y.view(np.uint32) >> 24).astype(np.int64) & 0x80
    if fmt in quant.PACKED:
        return pack(codes.astype(np.uint8)), absmax
    return codes.astype(np.uint8), absmax


def dequantize(
    codes: Any, absmax: Any, fmt: str, quant_map: str, n: int | None = None
) -> np.ndarray:
    """The float32 values of ``codes`` (flattened) under the block scales ``absmax``: ``n``
    of them (packed codes: ``2 · codes.size`` when None)."""
    t = quant.table(fmt, quant_map)
    c = np.asarray(codes).reshape(-1)
    if fmt in quant.PACKED:
        c = unpack(c, 2 * c.size if n is None else n)
    with np.errstate(invalid="ignore", over="ignore"):
        f = (np.asarray(absmax, np.float32) / t.top).astype(np.float32)
        return (t.dec[c] * f[np.arange(c.size) // quant.BLOCKS[fmt]]).astype(np.float32)


def constant(value: float, fmt: str, quant_map: str) -> tuple[int, np.float32]:
    """``(byte, absmax)`` of a slot filled with ``value`` (its initial value): the byte of
    its codes (two equal nibbles for a packed format)."""
    c, a = quantize(np.full(2, value, np.float32), fmt, quant_map)
    return int(c[0]), a[0]


def check_pair(
    pair: Any, param: Any, role: str, who: str, fmt: str = "int8"
) -> list[tuple[str, Any, bool]]:
    """A quantized slot given as ``(codes, absmax)``: codes uint8 shaped like the (checked)
    param (``(ceil(n / 2),)`` for a packed ``fmt``), absmax float32 of ``ceil(n / block)``
    elements, both C-contiguous, writeable and where the param is; returns their overlap
    entries."""
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise TypeError(
            f"{role} of {who} is a {type(pair).__name__}; a quantized slot is a pair "
            "(codes, absmax): uint8 codes shaped like the param and float32 block scales"
        )
    codes, absmax = pair
    n = int(np.prod(param.shape))
    for part, a, dt, shape in (
        ("codes", codes, np.uint8, codes_shape(fmt, tuple(param.shape))),
        ("absmax", absmax, np.float32, (quant.nblocks(n, fmt),)),
    ):
        label = f"{role} {part}"
        if not is_array(a):
            raise TypeError(f"{label} of {who} is a {type(a).__name__}; expected an array")
        if residence(a) != residence(param):
            raise TypeError(f"{label} of {who} ({describe(a)}) is not where the param is")
        if dtype_of(a) != dt or tuple(a.shape) != shape:
            raise ValueError(
                f"{label} of {who} is {describe(a)}; expected {np.dtype(dt).name}{list(shape)}"
            )
        check_writable(None, label, a, who)
    return [(f"{role} codes of {who}", codes, True), (f"{role} absmax of {who}", absmax, True)]


def full_precision_state(
    sd: dict[str, Any], rule: str, fmt: str, shapes: Any = None
) -> dict[str, Any]:
    """A copy of state dict ``sd`` of an optimizer of ``rule`` with ``state_dtype=fmt`` whose
    quantized slots are float32 arrays again (dequantized, shaped like their codes; a packed
    format's shaped by ``shapes``, parameter name -> shape, which it needs): what a float32
    optimizer, or torch, loads."""
    from .kernels import RULES

    maps = {s.name: s.quant_map for s in RULES[rule].slots if s.quantize}
    if fmt in quant.PACKED and shapes is None:
        raise ValueError(
            f"full_precision_state of state_dtype={fmt!r}: packed codes do not keep the "
            "parameters' shapes; pass shapes (parameter name -> shape)"
        )
    state = {}
    for name, st in sd["state"].items():
        out = {}
        for s, a in st.items():
            base, part = split_name(s)
            if part is None:
                out[s] = a
            elif part == CODES:
                absmax = st[names_of(base)[1]]
                shape = np.shape(a) if shapes is None else tuple(shapes[name])
                n = int(np.prod(shape))
                out[base] = dequantize(a, absmax, fmt, maps[base], n).reshape(shape)
        state[name] = out
    return dict(sd, state=state)


def check_backend(be: Any, fmt: str | None) -> None:
    """Quantized state on a backend that steps it (a backend module with ``QUANT_STATE``: the
    numba CPU backend, the NumPy oracle and both CUDA backends), a packed format
    (``kernels.quant.PACKED``: ``"int4"``) on one that also declares ``QUANT_PACKED`` (all
    four do); TypeError before anything is written otherwise."""
    if fmt is not None and not getattr(be, "QUANT_STATE", False):
        raise TypeError(
            f"state_dtype={fmt!r}: backend {getattr(be, 'NAME', be)!r} does not step quantized "
            "state (a backend module declaring QUANT_STATE does)"
        )
    if fmt in quant.PACKED and not getattr(be, "QUANT_PACKED", False):
        raise TypeError(
            f"state_dtype={fmt!r}: backend {getattr(be, 'NAME', be)!r} does not step packed "
            "4-bit state (a backend module declaring QUANT_PACKED does)"
        )
