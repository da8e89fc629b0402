"""Mixed precision: storage dtypes, the state dtype policy, and the oracle that defines them.

Params may be stored in float16, bfloat16, float32 or float64; grads in the param dtype or
float32; state buffers in the param dtype (the default, what ``torch.optim``'s fused path
does), in float32 or in bfloat16 (``state_dtype=``). The math of a step runs in float32, or
float64 for float64 params; each value is widened exactly when loaded and rounded to nearest
even when stored. ``master_weights=True`` keeps an fp32 copy of every 16-bit param as a state
buffer (``"master_param"``): the step updates the copy and stores the param rounded from it,
in the same pass. ``master_weights="remainder"`` keeps the same fp32 master in 2 bytes instead
of 4: a bfloat16 param and an int16 remainder (``"master_remainder"``) together hold its 32 bits
(``split_master``/``join_master``; ``kernels/storage.py``: Transformer Engine's
``store_param_remainders``), so the master follows the float32-master trajectory bit for bit,
and the param is the master rounded half away from zero in its last bit instead of to nearest
even (they differ only where the master sits exactly on a tie whose lower neighbour is even).
``stochastic_rounding=True`` rounds bfloat16 params (without a master)
stochastically instead, from a counter-based hash of (seed, step, element index)
(``kernels/storage.py``).

bfloat16 host arrays are NumPy arrays of ``ml_dtypes.bfloat16`` (``pip install ml_dtypes``,
the ``fastopt[bf16]`` extra) or torch tensors (viewed, never copied); fastopt imports without
ml_dtypes and asks for it only when a bfloat16 array is met.

``oracle_step`` is the semantics: the NumPy oracle (``fastopt.reference``) run in the compute
dtype on widened copies, its results rounded to the storage dtypes. Every backend's mixed
precision is tested against it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from .kernels import quant, storage
from .kernels.storage import COMPUTE, IO

__all__ = [
    "MASTER",
    "MASTER_REMAINDER",
    "MASTER_WEIGHTS",
    "PACKED",
    "QUANTIZED",
    "STATE_DTYPES",
    "bfloat16",
    "check_master_weights",
    "check_remainder_param",
    "check_state_dtype",
    "grad_kinds",
    "io_of",
    "join_master",
    "kind",
    "known_kind",
    "oracle_step",
    "param_salt",
    "resolve_state_kind",
    "round_to",
    "split_master",
    "sr_round_bf16",
    "state_kinds",
    "storage_dtype",
    "widen",
]

#: the state buffer name of the fp32 master copy of a 16-bit param
MASTER = "master_param"
#: the state buffer name of the int16 remainder that, with its bfloat16 param, is the master
MASTER_REMAINDER = "master_remainder"
#: what ``master_weights=`` accepts: no master, an fp32 copy, or the bfloat16 param + remainder
MASTER_WEIGHTS = (False, True, "remainder")
#: what ``state_dtype=`` accepts (None: the param dtype; float32 with a master copy; the
#: quantized formats of ``kernels/quant.py``: the slots a rule lets be quantized as codes and
#: block scales, the others float32)
STATE_DTYPES = (None, "float32", "bfloat16", *quant.ALL_FORMATS)
#: the quantized policies among them
QUANTIZED = quant.ALL_FORMATS
#: the quantized policies of two codes per byte (stepped by a backend declaring ``QUANT_PACKED``)
PACKED = quant.PACKED


def bfloat16() -> np.dtype[Any]:
    """The NumPy dtype of bfloat16 (``ml_dtypes.bfloat16``); ImportError with the fix when
    ml_dtypes is not installed."""
    try:
        import ml_dtypes
    except ImportError as exc:
        raise ImportError(
            "bfloat16 arrays need ml_dtypes (NumPy's bfloat16 dtype): pip install ml_dtypes "
            f"(or fastopt[bf16]): {exc}"
        ) from exc
    return np.dtype(ml_dtypes.bfloat16)


def storage_dtype(name: str) -> np.dtype[Any]:
    """The NumPy dtype of a storage dtype name (``"bfloat16"`` through ml_dtypes)."""
    return bfloat16() if name == "bfloat16" else np.dtype(name)


def kind(dtype: Any) -> str | None:
    """The storage dtype name of a NumPy dtype (native byte order), or None when it is none of
    float16, bfloat16, float32, float64."""
    try:
        dt = np.dtype(dtype)
    except TypeError:
        return None
    if dt.name == "bfloat16" and dt.itemsize == 2:
        return "bfloat16"
    if dt.kind == "f" and dt.isnative and dt.name in storage.ITEMSIZE:
        return dt.name
    return None


def known_kind(dtype: Any) -> str:
    """``kind(dtype)`` of a dtype already checked to be a storage dtype (``TypeError`` for any
    other: a bug in the caller, not a user error)."""
    k = kind(dtype)
    if k is None:
        raise TypeError(f"{dtype!r} is not a storage dtype (float16, bfloat16, float32, float64)")
    return k


def grad_kinds(param_kind: str) -> tuple[str, ...]:
    """The grad storage dtypes a param of ``param_kind`` accepts: its own, or float32."""
    return (param_kind,) if param_kind == "float32" else (param_kind, "float32")


def state_kinds(param_kind: str) -> tuple[str, ...]:
    """The state storage dtypes a param of ``param_kind`` can keep: its own, float32, and
    bfloat16 unless the math is float64 (bfloat16 from float64 would round twice)."""
    out = [param_kind, "float32"]
    if COMPUTE[param_kind] == "float32":
        out.append("bfloat16")
    return tuple(dict.fromkeys(out))


def check_state_dtype(value: Any) -> str | None:
    """``state_dtype=`` normalised (None, "float32", "bfloat16", or a quantized format:
    "int8", "float8_e4m3", "int4"); NumPy dtypes accepted."""
    if value is None:
        return None
    name = kind(value) if not isinstance(value, str) else value
    if name not in STATE_DTYPES[1:]:
        raise ValueError(
            f"invalid state_dtype={value!r}; expected None (the param dtype), 'float32', "
            f"'bfloat16' or a quantized format {', '.join(map(repr, QUANTIZED))}"
        )
    return name


def check_master_weights(value: Any) -> bool | str:
    """``master_weights=`` normalised: False, True (an fp32 master copy of every 16-bit param)
    or "remainder" (the master of a bfloat16 param kept as the param plus an int16 remainder)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value == "remainder":
        return value
    raise TypeError(f"invalid master_weights={value!r}; expected True, False or 'remainder'")


def check_remainder_param(param_kind: str, who: str = "master_weights='remainder'") -> None:
    """A master kept as a remainder is the low half of a float32 whose high half is a
    bfloat16 param: a float16 param (which keeps a master copy otherwise) is refused
    (``ValueError``); float32 and float64 params are their own master and keep none."""
    if param_kind == "float16":
        raise ValueError(
            f"{who} keeps the fp32 master of a bfloat16 param as the param plus a 16-bit "
            "remainder; a float16 param cannot hold a float32's high half: use "
            "master_weights=True (an fp32 copy) for float16 params"
        )


def split_master(master: npt.ArrayLike) -> tuple[npt.NDArray[Any], npt.NDArray[np.int16]]:
    """A float32 master as ``(bfloat16 param, int16 remainder)``: the remainder is the low 16
    bits as a signed value, the param the high 16 bits plus one where the remainder is
    negative (half away from zero in magnitude), modulo 2**16 (``kernels/storage.py``'s
    ``rem_hi``/``rem_lo``, written here as integer division, independently)."""
    m = np.ascontiguousarray(master, dtype=np.float32)
    hi, lo = np.divmod(m.view(np.uint32).astype(np.int64), 65536)
    up = lo >= 32768
    rem = (lo - 65536 * up).astype(np.int16)
    bits = ((hi + up) % 65536).astype(np.uint16)
    return bits.view(bfloat16()), rem


def join_master(param: npt.ArrayLike, remainder: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """The float32 master of a bfloat16 param and its int16 remainder (``split_master``
    undone, bit for bit)."""
    p = np.ascontiguousarray(param)
    if kind(p.dtype) != "bfloat16":
        raise TypeError(f"join_master: the param is {p.dtype}; expected bfloat16")
    r = np.ascontiguousarray(remainder)
    if r.dtype != np.int16 or r.shape != p.shape:
        raise TypeError(
            f"join_master: the remainder is {r.dtype}{list(r.shape)}; expected int16{list(p.shape)}"
        )
    rr = r.astype(np.int64)
    hi = (p.view(np.uint16).astype(np.int64) - (rr < 0)) % 65536
    u = hi * 65536 + rr % 65536
    return u.astype(np.uint32).view(np.float32)


def resolve_state_kind(policy: str | None, param_kind: str, master: bool | str = False) -> str:
    """The storage dtype of the state buffers of a param: ``policy`` (``state_dtype=``), or
    the param dtype when None (float32 when a master copy is kept: the stepped param is fp32).
    Raises TypeError for bfloat16 state of float64 params."""
    if policy is None:
        return "float32" if master and param_kind in storage.BITS16 else param_kind
    if policy in QUANTIZED:  # the slots kept in full precision: float32
        if COMPUTE[param_kind] != "float32":
            raise TypeError(
                f"state_dtype={policy!r} with {param_kind} params: quantized state is stepped in "
                "float32; use it with float32, float16 or bfloat16 params"
            )
        return "float32"
    if policy not in state_kinds(param_kind):
        raise TypeError(
            f"state_dtype={policy!r} with {param_kind} params: their math is float64, and "
            "bfloat16 state would round it twice; use 'float32' or the param dtype"
        )
    return policy


def io_of(
    param_kind: str,
    grad_kind: str,
    state_kind: str,
    master: bool | str = False,
    sr: bool = False,
    **extras: Any,
) -> IO:
    """The ``kernels.storage.IO`` of a launch (master and stochastic rounding only where
    they apply: a 16-bit param; a bfloat16 param without a master; ``master="remainder"``:
    a bfloat16 param's master kept as a remainder, a float16 param refused)."""
    remainder = master == "remainder" and param_kind in storage.BITS16
    if remainder:
        check_remainder_param(param_kind)
    master = bool(master) and param_kind in storage.BITS16
    sr = bool(sr) and param_kind == "bfloat16" and not master
    return IO(
        param_kind, grad_kind, state_kind, master=master, sr=sr, remainder=remainder, **extras
    )


def param_salt(name: object) -> int:
    """The per-parameter salt of stochastic rounding's hash (a stable function of the name)."""
    return zlib.crc32(str(name).encode()) & 0xFFFFFFFF


# -- host conversions (the oracle's loads and stores) ----------------------------------------------


def widen(a: npt.ArrayLike, compute: npt.DTypeLike) -> npt.NDArray[Any]:
    """A compute-dtype copy of ``a`` (exact: every float16/bfloat16/float32 value is a
    float32 value, every float32 value a float64 one)."""
    return np.asarray(a).astype(compute)


def round_to(x: npt.ArrayLike, dtype: npt.DTypeLike) -> npt.NDArray[Any]:
    """``x`` rounded to nearest even into ``dtype`` (NumPy's and ml_dtypes' casts)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(x).astype(dtype)


def _mix32(x: Any) -> Any:
    x = x & 0xFFFFFFFF
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def sr_round_bf16(x: npt.ArrayLike, salt: int, key: int) -> npt.NDArray[np.uint16]:
    """float32 array ``x`` rounded stochastically to bfloat16 bits (uint16), the random bits
    of element ``i`` being ``storage.sr_bits(i, salt, key)``: ``kernels/storage.py`` array at a
    time."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    i = np.arange(x.size, dtype=np.uint64)
    h = _mix32((i & 0xFFFFFFFF) ^ np.uint64(salt))
    h = _mix32((h + (i >> np.uint64(32))) ^ np.uint64(key))
    r = h >> np.uint64(16)
    u = x.view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    out = np.where(nan, (u >> 16) | 0x40, (u + r) >> 16)
    return out.astype(np.uint16)


def oracle_step(
    rule: str,
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: Mapping[str, npt.NDArray[Any]],
    *,
    io: IO,
    step: int,
    hp: Mapping[str, Any],
    hs: Mapping[str, Any] | None = None,
    master: npt.NDArray[Any] | None = None,
    salt: int = 0,
    inv_scale: float | None = None,
    key: int = 0,
) -> None:
    """One step of ``rule`` with the storage format ``io``: the NumPy oracle
    (``fastopt.reference.<rule>``, in the compute dtype on widened copies), its results
    rounded back into ``param``, ``state`` (name -> array) and ``master`` in place (with
    ``io.remainder``, ``master`` is the int16 remainder: joined with the param before, split
    into both after).

    ``inv_scale`` multiplies the widened grad first (and the product is stored back when
    ``io.write_grad``); ``salt``/``key`` seed stochastic rounding; ``hs``: the rule's host
    state before the step, as the oracle keeps it."""
    import inspect

    from . import reference

    c = np.dtype(io.compute)
    oracle = getattr(reference, rule)
    if io.remainder and master is not None:
        p = join_master(param, master)
    elif io.master and master is not None:
        p = master.astype(np.float32)
    else:
        p = widen(param, c)
    g = widen(grad, c)
    if inv_scale is not None:
        g = g * c.type(inv_scale)
        if io.write_grad:
            grad[...] = round_to(g, grad.dtype)
    st = {n: widen(a, c) for n, a in state.items()}
    st.update({n: np.array(v, dtype=np.float32) for n, v in (hs or {}).items()})
    takes = inspect.signature(oracle).parameters
    kw = {h: v for h, v in hp.items() if h in takes}
    oracle(p, g, st, step=step, **kw)
    if io.remainder and master is not None:
        bits, rem = split_master(p)
        master[...] = rem
        param.view(np.uint16)[...] = bits.view(np.uint16)
    elif io.master and master is not None:
        master[...] = p
    if io.remainder and master is not None:
        pass  # the param is the split's, above
    elif io.sr:
        param.view(np.uint16)[...] = sr_round_bf16(p, salt, key).reshape(param.shape)
    else:
        param[...] = round_to(p, param.dtype)
    for n, a in state.items():
        a[...] = round_to(st[n], a.dtype)
