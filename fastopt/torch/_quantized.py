"""Quantized state in ``fastopt.torch``: ``state_dtype="int8"`` / ``"float8_e4m3"``.

Every slot the rule lets be quantized (``Slot.quantize``) is kept per parameter as two plain
tensors under the core's names (``fastopt._quantized.names_of``): ``state[p]["<slot>.codes"]``
(uint8, the parameter's shape, contiguous) and ``state[p]["<slot>.absmax"]`` (float32,
``ceil(numel / 256)`` block scales; a block never straddles two tensors). The other slots (ASGD's
``ax``, Rprop's ``prev``...) stay float32 tensors under their own names. Values, codec and maps
are the core's (``kernels/quant.py``).

A CPU step launches once per bucket (``numba_quant_many.launch_many_quant``: one fused pass over
a table of the tensors' addresses, codes and scales included), bit for bit the core's
per-parameter step (the dict API). A GPU bucket is one launch too: the backend's
``tensor_table`` takes each quantized slot as its ``(codes, absmax)`` pair of tensors (the
``IO`` carrying ``quant``; the table holds the codes' and the scales' addresses, one chunk per
block of codes) and ``launch_table`` runs the multi-tensor quantized kernel
(``kernels/quant_cuda.py``), cached and re-checked like a float table, no host
synchronisation; a backend does so where it declares ``QUANT_TABLE = True`` (CuPy,
numba-cuda) besides ``QUANT_STATE``, and ``check_device`` refuses quantized state on any other
table backend before anything is written. Other backends step each tensor through their runner
with ``(codes, absmax)`` pairs (the NumPy oracle among them).

A DTensor parameter's slot (FSDP2) is its local shard's: blocks start at each shard's first
element, the codes a DTensor like the parameter, the scales a DTensor of one row per shard
(``_dtensor.absmax_layout``); ``check_slots`` hands the kernels the local codes and the local
row's scales, and a state of another sharding is refused (``_dtensor.check_absmax``).

State dicts carry the two tensors per slot as they are (a round trip is bit-exact). A state dict
of full-precision slots (``torch.optim.Adam``'s, a float32 ``fastopt.torch`` one's) loads into a
quantized optimizer quantized as a step would store it (``load_keeps``);
``full_precision_state_dict`` turns a quantized one back into float32 slots for them. Every
loaded codes/absmax tensor is checked (dtype, shape, both halves present, backed by its storage)
before anything is written (``check_loaded``); so is every one a step reads (``check_slots``):
the kernels index them by the parameter's length.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import _quantized as Q
from .. import precision
from ..kernels import RULES, quant
from . import _dtensor
from ._memory import check_backed, check_written, plain_type

__all__ = [
    "check_device",
    "check_loaded",
    "check_slots",
    "fmt_of",
    "full_precision_state_dict",
    "has_slot",
    "launch",
    "load_keeps",
    "need",
    "new_slot",
    "quantized",
]


def fmt_of(opt: Any) -> str | None:
    """The quantized format of ``opt`` ("int8", "float8_e4m3", "int4"), or None."""
    sd = getattr(opt, "state_dtype", None)
    return sd if sd in precision.QUANTIZED else None


def quantized(spec: Any, fmt: str | None) -> dict[str, str]:
    """``{slot: map}`` of the slots stored quantized under ``fmt`` (none without one)."""
    if fmt is None:
        return {}
    return {s.name: s.quant_map for s in spec.slots if s.quantize}


def need(names: tuple[str, ...], spec: Any, fmt: str | None) -> tuple[str, ...]:
    """The state keys of ``names`` (slots, step, host state): a quantized slot's two."""
    q = quantized(spec, fmt)
    return tuple(n for s in names for n in (Q.names_of(s) if s in q else (s,)))


def has_slot(state: dict[str, Any], slot: str) -> bool:
    """Does a parameter's ``state`` hold ``slot`` (a tensor, or a quantized slot's codes)?"""
    return state.get(slot) is not None or Q.names_of(slot)[0] in state


def new_slot(p: torch.Tensor, spec: Any, hp: Any, slot: str, fmt: str) -> dict[str, torch.Tensor]:
    """A quantized slot of parameter ``p`` holding its initial value (``Rule.initial``):
    ``{"<slot>.codes": uint8 like p (contiguous), "<slot>.absmax": float32 scales}``."""
    code, amax = Q.constant(spec.initial(slot, hp), fmt, spec.slot(slot).quant_map)
    codes_name, absmax_name = Q.names_of(slot)
    if _dtensor.is_dtensor(p):  # codes like the parameter, a row of scales per shard
        lp = _dtensor.local(p)
        codes = torch.full(lp.shape, code, dtype=torch.uint8, device=lp.device)
        return {
            codes_name: _dtensor.like(p, codes),
            absmax_name: _dtensor.new_absmax(p, float(amax), f"state {absmax_name!r}"),
        }
    return {
        codes_name: torch.full(
            Q.codes_shape(fmt, tuple(p.shape)), code, dtype=torch.uint8, device=p.device
        ),
        absmax_name: torch.full(
            (quant.nblocks(p.numel(), fmt),), float(amax), dtype=torch.float32, device=p.device
        ),
    }


def _expect(p: Any, part: str, fmt: str) -> tuple[torch.dtype, tuple[int, ...]]:
    if part == Q.CODES:
        return torch.uint8, Q.codes_shape(fmt, tuple(p.shape))
    return torch.float32, (quant.nblocks(p.numel(), fmt),)


def check_slots(
    p: torch.Tensor,
    state: dict[str, Any],
    spec: Any,
    fmt: str,
    bufs: list[Any],
    label: str,
    entries: list[Any] | None,
    param: Any = None,
) -> list[Any]:
    """``bufs`` (the state tensors of ``spec.state``, None where absent) with each quantized
    slot present in ``state`` as its ``(codes, absmax)`` pair, both checked (unless ``entries``
    is None: made just now): plain tensors on ``p``'s device, codes uint8 of ``p``'s shape and
    absmax float32 of one scale per block, contiguous, backed by their storage, without internal
    overlap; each added to the overlap ``entries``. A slot with one half only is refused
    (KeyError). ``param``: the DTensor ``p`` is the local shard of (its slots' codes a DTensor
    like it, their scales one of ``_dtensor.absmax_layout``), else None."""
    q = quantized(spec, fmt)
    out = list(bufs)
    for j, name in enumerate(spec.state):
        if name not in q:
            continue
        keys = Q.names_of(name)
        have = [k in state for k in keys]
        if not any(have):
            out[j] = None
            continue
        if not all(have):
            raise KeyError(
                f"{label}: its state has {keys[have.index(True)]!r} but no "
                f"{keys[have.index(False)]!r}; a quantized slot is both"
            )
        pair = (state[keys[0]], state[keys[1]])
        if _dtensor.is_dtensor(param):  # the local shard's codes and its row of scales
            pair = _local_pair(param, pair, keys, label)
        if entries is not None:
            for key, t in zip(keys, pair):
                lbl = (label, f"state {key!r}")
                span = check_written(t, lbl)  # a plain tensor, backed by its storage
                dt, shape = _expect(p, Q.split_name(key)[1] or "", fmt)
                if (
                    t.dtype is not dt
                    or tuple(t.shape) != shape
                    or t.device != p.device
                    or not t.is_contiguous()
                ):
                    raise ValueError(
                        f"{label}: state {key!r} is {t.dtype}{list(t.shape)} on {t.device}"
                        f"{'' if t.is_contiguous() else ' (not contiguous)'}; expected a "
                        f"contiguous {dt}{list(shape)} on {p.device} (a state dict of another "
                        "model or format?)"
                    )
                entries.append((lbl, t, True, span))
        out[j] = pair
    return out


def _placed_like(codes: Any, param: Any) -> bool:
    """Are ``codes`` a DTensor on ``param``'s mesh, with its placements and global shape?"""
    return bool(
        _dtensor.is_dtensor(codes)
        and codes.device_mesh == param.device_mesh
        and codes.placements == param.placements
        and codes.shape == param.shape
    )


def _local_pair(param: Any, pair: tuple[Any, Any], keys: tuple[str, str], label: str) -> Any:
    """A DTensor parameter's slot ``pair`` as the kernels see it: the local codes (the codes a
    DTensor placed like ``param``) and the local shard's scales (``_dtensor.check_absmax``)."""
    codes, absmax = pair
    if not _placed_like(codes, param):
        raise ValueError(
            f"{label}: state {keys[0]!r} is {_describe(codes)}; expected a DTensor uint8"
            f"{list(param.shape)} placed like the parameter, {param.placements}"
        )
    lt = _dtensor.check_absmax(param, absmax, f"{label}: state {keys[1]!r}")
    return _dtensor.local(codes), lt


def check_device(be: Any, fmt: str | None, label: str) -> None:
    """Refuse (NotImplementedError, before anything is written) quantized state on a backend
    that does not step it on this path: every backend must declare ``QUANT_STATE``
    (``fastopt._quantized.check_backend``), a GPU backend (one with ``launch_table``) also
    ``QUANT_TABLE`` (its tables take ``(codes, absmax)`` pairs; CuPy's and numba-cuda's do),
    and for a packed format (``"int4"``) ``QUANT_PACKED``."""
    if fmt is None:
        return
    name = getattr(be, "NAME", be)
    if (
        not getattr(be, "QUANT_STATE", False)
        or (hasattr(be, "launch_table") and not getattr(be, "QUANT_TABLE", False))
        or (fmt in quant.PACKED and not getattr(be, "QUANT_PACKED", False))
    ):
        raise NotImplementedError(
            f"{label}: state_dtype={fmt!r}: backend {name!r} does not step quantized state in "
            "fastopt.torch (the numba CPU backend does); nothing was stepped"
        )


def check_sharded(p: Any, fmt: str, label: str) -> None:
    """Refuse (NotImplementedError, before anything is written) a packed format (``"int4"``)
    for a DTensor parameter: the sharded layout (``_dtensor.absmax_layout``) is the byte
    formats' (codes like the parameter, blocks of ``quant.BLOCK``)."""
    if fmt in quant.PACKED and _dtensor.is_dtensor(p):
        raise NotImplementedError(
            f"{label}: state_dtype={fmt!r} with a DTensor parameter: the sharded layout holds "
            "the byte formats (int8, float8_e4m3) only; nothing was stepped"
        )


def flat_tensors(slots: list[Any]) -> list[torch.Tensor]:
    """The tensors of a launch's slot list (a quantized slot's pair as its two)."""
    out: list[torch.Tensor] = []
    for a in slots:
        if isinstance(a, tuple):
            out += a
        elif a is not None:
            out.append(a)
    return out


def address_table(tensors: list[Any], nslots: int, master: bool) -> np.ndarray | None:
    """int64 rows ``(n, param, grad, slot..., master, absmax...)`` of
    ``numba_quant_many.launch_many_quant`` (0 for an absent slot, master copy or absmax), or
    None when a parameter or gradient is not contiguous (the per-tensor path takes it)."""
    rows = []
    for p, g, slots, m in tensors:
        if not (p.is_contiguous() and g.is_contiguous()):
            return None
        row = [p.numel(), p.data_ptr(), g.data_ptr()]
        row += [0 if a is None else (a[0] if isinstance(a, tuple) else a).data_ptr() for a in slots]
        row.append(m.data_ptr() if master and m is not None else 0)
        row += [a[1].data_ptr() if isinstance(a, tuple) else 0 for a in slots]
        rows.append(row)
    return np.array(rows, dtype=np.int64).reshape(len(tensors), 4 + 2 * nslots)


def chunks(table: np.ndarray, fmt: str) -> np.ndarray:
    """The block chunks of a quantized launch of format ``fmt`` over ``table``."""
    from ..backends.numba_quant_many import block_chunks

    return block_chunks(table[:, 0].tolist(), fmt)


def launch(
    name: str,
    flags: Any,
    writes: tuple[bool, ...],
    io: Any,
    table: np.ndarray,
    chunk_rows: np.ndarray,
    k: Any,
    inv_scale: float | None,
    key: int,
) -> None:
    """The CPU launch of a quantized bucket over its ``address_table``."""
    from ..backends.numba_quant_many import launch_many_quant

    launch_many_quant(
        name,
        flags,
        writes,
        io,
        table,
        chunk_rows,
        k,
        inv_scale=1.0 if inv_scale is None else inv_scale,
        key=key,
    )


def runner_states(slots: list[Any], as_array: Any) -> tuple[Any, ...]:
    """A per-tensor runner's ``states`` (``protocol.Runner``): a quantized slot as its
    ``(codes, absmax)`` arrays, any other as a flat array (``as_array`` of each tensor)."""
    return tuple(
        None
        if a is None
        else (as_array(a[0].view(-1)), as_array(a[1]))
        if isinstance(a, tuple)
        else as_array(a.view(-1))
        for a in slots
    )


# -- state dicts ---------------------------------------------------------------------------------


def _describe(v: object) -> str:
    if isinstance(v, torch.Tensor):
        return f"a {v.dtype} tensor of shape {list(v.shape)} on {v.device}"
    return f"a {type(v).__name__}"


def check_loaded(opt: Any, key: Any, st: dict[str, Any], p: torch.Tensor) -> None:
    """Refuse (nothing written) a parameter's saved state ``st`` that ``opt`` cannot keep:
    for a quantized ``opt``, a quantized slot's codes (uint8, ``p``'s shape) and absmax
    (float32, one per block) of any other dtype or shape, backed by less storage than they
    reach, one half without the other, or beside the slot's full-precision tensor; for one
    that is not, any quantized slot (its format is not in the state dict: convert it with
    ``full_precision_state_dict`` by the optimizer that saved it)."""
    spec = RULES[type(opt)._fastopt._rule]
    fmt = fmt_of(opt)
    q = quantized(spec, fmt)
    who = type(opt).__name__
    for name in st:
        base, part = Q.split_name(name) if isinstance(name, str) else (name, None)
        if part is None:
            continue
        if base not in spec.state:
            continue  # not a slot of this rule: torch keeps unknown keys as they are
        if base not in q:
            raise ValueError(
                f"{who}.load_state_dict: state {name!r} of parameter {key!r} is a quantized "
                f"slot; this optimizer keeps {base!r} in full precision (state_dtype="
                f"{getattr(opt, 'state_dtype', None)!r}): convert the state dict with "
                "fastopt.torch.full_precision_state_dict(the optimizer that saved it)"
            )
        codes_name, absmax_name = Q.names_of(base)
        missing = [n for n in (codes_name, absmax_name) if n not in st]
        if missing:
            raise KeyError(
                f"{who}.load_state_dict: the state of parameter {key!r} has {name!r} but no "
                f"{missing[0]!r}; a quantized slot is both"
            )
        if base in st:
            raise ValueError(
                f"{who}.load_state_dict: the state of parameter {key!r} has both {base!r} and "
                f"{name!r}; expected one form of the slot"
            )
        t = st[name]
        if _dtensor.is_dtensor(p) or _dtensor.is_dtensor(t):  # a sharded parameter's slot
            _check_loaded_dtensor(who, key, name, part, t, p)
            continue
        assert fmt is not None
        dt, shape = _expect(p, part, fmt)
        if (
            not isinstance(t, torch.Tensor)
            or not plain_type(t)
            or t.dtype is not dt
            or tuple(t.shape) != shape
        ):
            raise ValueError(
                f"{who}.load_state_dict: state {name!r} of parameter {key!r} is "
                f"{_describe(t)}; expected {dt}{list(shape)} ("
                + (
                    "two codes per byte"
                    if part == Q.CODES and fmt in quant.PACKED
                    else "one code per element of the parameter"
                    if part == Q.CODES
                    else f"one scale per block of {quant.BLOCKS[fmt]} elements"
                )
                + ")"
            )
        check_backed(t, (f"parameter {key!r}", f"state {name!r}"), read_only=True)


def _check_loaded_dtensor(who: str, key: Any, name: str, part: str, t: Any, p: Any) -> None:
    """A saved codes or absmax tensor ``t`` of DTensor parameter ``p`` (or a DTensor saved for a
    plain one): laid out as this optimizer keeps it (``_dtensor.absmax_layout``)."""
    what = f"{who}.load_state_dict: state {name!r} of parameter {key!r}"
    if not _dtensor.is_dtensor(p):
        raise ValueError(
            f"{what} is a DTensor; the parameter is not (a state dict of a sharded run: "
            "convert it with full_precision_state_dict by the optimizer that saved it)"
        )
    want = torch.uint8 if part == Q.CODES else torch.float32
    if not isinstance(t, torch.Tensor) or t.dtype is not want:
        raise ValueError(f"{what} is {_describe(t)}; expected a {want} DTensor")
    d: Any = t  # a DTensor, checked below
    if part == Q.CODES:
        if not _placed_like(d, p):
            raise ValueError(
                f"{what} is {_describe(t)}; expected a DTensor uint8{list(p.shape)} placed like "
                f"the parameter, {p.placements} (a state of another sharding?)"
            )
        lt = _dtensor.local(t)
    else:
        lt = _dtensor.check_absmax(p, t, what)
    check_backed(lt, (f"parameter {key!r}", f"state {name!r}"), read_only=True)


def load_keeps(opt: Any, st: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
    """What a parameter's loaded state keeps instead of torch's load policy (a cast of every
    floating tensor to the parameter's dtype), for a quantized ``opt``: each quantized slot's
    codes (uint8) and absmax (float32) as saved, moved to ``p``'s device, contiguous; a
    full-precision slot the optimizer stores quantized (a state dict of ``torch.optim`` or of a
    float32 optimizer) quantized as a step would store it, its float key dropped (value
    None)."""
    spec = RULES[type(opt)._fastopt._rule]
    fmt = fmt_of(opt)
    out: dict[str, Any] = {}
    if fmt is None:
        return out
    for name, qm in quantized(spec, fmt).items():
        codes_name, absmax_name = Q.names_of(name)
        if codes_name in st and absmax_name in st:
            out[codes_name] = st[codes_name].to(device=p.device).contiguous()
            out[absmax_name] = st[absmax_name].to(device=p.device, dtype=torch.float32)
            out[absmax_name] = out[absmax_name].contiguous()
        elif isinstance(st.get(name), torch.Tensor) and st[name].is_floating_point():
            if _dtensor.is_dtensor(p):  # each shard quantized on its own, as its step stores
                out.update(_quantize_shard(st[name], p, name, fmt, qm))
                out[name] = None
                continue
            x = st[name].detach().to("cpu", torch.float32).contiguous()
            c, a = Q.quantize(x.numpy(), fmt, qm)
            out[codes_name] = torch.from_numpy(c).reshape(Q.codes_shape(fmt, x.shape)).to(p.device)
            out[absmax_name] = torch.from_numpy(a).to(p.device)
            out[name] = None  # the float slot is not kept
    return out


def _quantize_shard(x: Any, p: Any, slot: str, fmt: str, qm: str) -> dict[str, Any]:
    """A full-precision slot ``x`` of DTensor parameter ``p`` (a DTensor placed like it) as the
    codes and scales of its local shard (``_dtensor.absmax_layout``)."""
    codes_name, absmax_name = Q.names_of(slot)
    if not _dtensor.is_dtensor(x) or x.placements != p.placements or x.shape != p.shape:
        raise ValueError(
            f"state {slot!r} is {_describe(x)}; expected a DTensor{list(p.shape)} placed like "
            f"its parameter, {p.placements}"
        )
    lx = _dtensor.local(x).detach().to("cpu", torch.float32).contiguous()
    c, a = Q.quantize(lx.numpy(), fmt, qm)
    lp = _dtensor.local(p)
    shape, _, blocks = _dtensor.absmax_layout(p, f"state {absmax_name!r}")
    row = torch.zeros(blocks, dtype=torch.float32)
    row[: quant.nblocks(lx.numel())] = torch.from_numpy(a)
    return {
        codes_name: _dtensor.like(p, torch.from_numpy(c).reshape(lx.shape).to(lp.device)),
        absmax_name: _dtensor.as_absmax(
            p, row.reshape((1,) * (len(shape) - 1) + (blocks,)).to(lp.device), absmax_name
        ),
    }


def full_precision_state_dict(opt: Any, state_dict: dict[str, Any] | None = None) -> dict[str, Any]:
    """``state_dict`` (default ``opt.state_dict()``) of the quantized ``fastopt.torch``
    optimizer ``opt`` with every quantized slot as one float32 tensor again (dequantized,
    shaped like its codes, or for packed codes like ``opt``'s parameter of that index, under
    the slot's own name): what ``torch.optim`` (``Adam``,
    ``AdamW``, ...) or a float32 ``fastopt.torch`` optimizer loads. A state dict that holds no
    quantized slot is returned as it is (a shallow copy)."""
    fmt = fmt_of(opt)
    sd = opt.state_dict() if state_dict is None else state_dict
    out = dict(sd)
    if fmt is None:
        return out
    spec = RULES[type(opt)._fastopt._rule]
    q = quantized(spec, fmt)
    # a state dict's keys index the parameters in the order of the groups
    shapes = [tuple(p.shape) for g in opt.param_groups for p in g["params"]]
    state = {}
    for key, st in sd["state"].items():
        new = {}
        for name, v in st.items():
            base, part = Q.split_name(name) if isinstance(name, str) else (name, None)
            if part is None or base not in q:
                new[name] = v
            elif part == Q.CODES and _dtensor.is_dtensor(v):  # each shard with its scales
                lv = _dtensor.local(v)
                absmax = _dtensor.local(st[Q.names_of(base)[1]]).reshape(-1)
                absmax = absmax[: quant.nblocks(lv.numel())]
                x = Q.dequantize(
                    lv.detach().cpu().numpy(), absmax.detach().cpu().float().numpy(), fmt, q[base]
                )
                new[base] = _dtensor.like(v, torch.from_numpy(x).reshape(lv.shape).to(lv.device))
            elif part == Q.CODES:
                absmax = st[Q.names_of(base)[1]]
                shape = shapes[key] if fmt in quant.PACKED else tuple(v.shape)
                x = Q.dequantize(
                    v.detach().cpu().numpy(),
                    absmax.detach().cpu().float().numpy(),
                    fmt,
                    q[base],
                    int(np.prod(shape)),
                )
                new[base] = torch.from_numpy(x).reshape(shape).to(v.device)
        state[key] = new
    out["state"] = state
    return out
