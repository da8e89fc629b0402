"""Sharded parameters: ``torch.distributed.tensor.DTensor`` (FSDP2's ``fully_shard``, tensor
parallelism) stepped through their local shards.

A DTensor's own ``data_ptr()`` is 0 and its ``numel()`` the global one: no kernel may see it.
Its state is created as ``torch.optim`` creates it, with ``*_like(p)`` factories, so every state
buffer (and an fp32 master copy) is a DTensor with the parameter's mesh and placements: the
state dict then holds DTensors, which ``torch.distributed.checkpoint`` saves and loads shard by
shard, and ``get_optimizer_state_dict``/``set_optimizer_state_dict`` understand. Step counts and
host state stay plain 0-d CPU tensors, as torch keeps them.

The step is elementwise, so a shard is stepped on its own: the kernels see ``local(t)``, the
local tensor of each DTensor (``DTensor._local_tensor``, what ``to_local()`` returns outside
autograd), plain tensors unchanged. ``check`` runs on every parameter before anything is
written: a parameter, its gradient and its state buffers are all DTensors with one mesh and
placements (their local shards then have one shape), or all plain tensors. What the kernels
then see, the local tensors, is held to the memory behind it by ``_memory`` (any other tensor
subclass, a meta tensor, a fake or functional tensor, storage that is not there: refused with a
TypeError naming it).

Quantized state (``state_dtype="int8"``/``"float8_e4m3"``, ``_quantized``): blocks start at
each local shard's first element (a block never straddles two tensors, nor two shards), so a
step of a shard is the step of a tensor on its own. A slot's codes are a DTensor like the
parameter (uint8, its mesh, placements and global shape); its block scales are a DTensor of
one row per shard (``absmax_layout``: global shape ``(m_0, .., m_{k-1}, blocks)``, ``Shard(i)``
on every mesh dimension the parameter is sharded on, ``Replicate()`` where it is replicated),
each row holding its shard's ``nblocks(local numel)`` scales then zeros up to ``blocks``, the
count of the largest shard. Both are evenly sharded DTensors, so ``torch.distributed.checkpoint``
saves and loads them shard by shard. Their values hold only
for the sharding that made them: a state loaded into another sharding or world size (its
scales' global shape or placements differ) is refused before anything is written (``_quantized
.check_loaded``); ``full_precision_state_dict`` turns it into float32 DTensors like the
parameter, which load anywhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "absmax_layout",
    "as_absmax",
    "check",
    "check_absmax",
    "is_dtensor",
    "like",
    "local",
    "new_absmax",
]


@functools.cache
def _dtensor_type():
    if not torch.distributed.is_available():
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed tensors
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """Is ``t`` a ``torch.distributed.tensor.DTensor``?"""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Any) -> Any:
    """The tensor a kernel steps for ``t``: a DTensor's local shard, anything else itself (None
    stays None)."""
    if t is not None and is_dtensor(t):
        return t._local_tensor
    return t


def like(p: Any, t: torch.Tensor) -> Any:
    """``t`` (a local tensor shaped like ``p``'s local shard) as ``p`` holds it: a DTensor
    with ``p``'s mesh, placements and global shape when ``p`` is one, else ``t`` itself."""
    if not is_dtensor(p):
        return t
    cls = _dtensor_type()
    return cls.from_local(
        t, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
    )


def absmax_layout(p: Any, who: str) -> tuple[tuple[int, ...], tuple[Any, ...], int]:
    """``(global shape, placements, blocks)`` of a quantized slot's block scales for the
    DTensor parameter ``p`` (see the module docstring, Quantized state): each rank keeps
    ``blocks`` scales (those of the largest local shard, the first one along every sharded
    mesh dimension, as ``torch.chunk`` cuts), one row per shard: global shape ``(m_0, ..,
    m_{k-1}, blocks)`` with ``m_i`` the mesh's size where the parameter is sharded (placement
    ``Shard(i)``) and 1 where it is replicated (``Replicate()``). Other placements (partial,
    strided shards) are refused (NotImplementedError)."""
    from torch.distributed.tensor import Replicate, Shard

    from ..kernels import quant

    mesh = p.device_mesh
    size = list(p.shape)
    shape: list[int] = []
    placements: list[Any] = []
    for i, pl in enumerate(p.placements):
        if type(pl) is Shard:
            n = mesh.size(i)
            size[pl.dim] = -(-size[pl.dim] // n)
            shape.append(n)
            placements.append(Shard(i))
        elif type(pl) is Replicate:
            shape.append(1)
            placements.append(Replicate())
        else:
            raise NotImplementedError(
                f"{who}: quantized state of a DTensor placed as {p.placements}; fastopt.torch "
                "keeps it for Shard and Replicate placements"
            )
    blocks = quant.nblocks(math.prod(size))
    return (*shape, blocks), tuple(placements), blocks


def new_absmax(p: Any, value: float, who: str) -> Any:
    """The block scales of a quantized slot of DTensor ``p`` (``absmax_layout``): ``value`` in
    the blocks of the local shard, zeros in the padding after them."""
    from ..kernels import quant

    shape, _, blocks = absmax_layout(p, who)
    lp = local(p)
    t = torch.zeros((1,) * (len(shape) - 1) + (blocks,), dtype=torch.float32, device=lp.device)
    t.view(-1)[: quant.nblocks(lp.numel())] = value
    return as_absmax(p, t, who)


def as_absmax(p: Any, t: torch.Tensor, who: str) -> Any:
    """The local block scales ``t`` (``(1, .., 1, blocks)``) as the DTensor of ``p``'s
    ``absmax_layout``."""
    shape, placements, _ = absmax_layout(p, who)
    cls = _dtensor_type()
    stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
    return cls.from_local(
        t, p.device_mesh, placements, run_check=False, shape=torch.Size(shape), stride=stride
    )


def check_absmax(p: Any, t: Any, who: str) -> torch.Tensor:
    """The local block scales of DTensor parameter ``p``'s slot ``t``, as the kernels see them
    (its first ``nblocks(local numel)``), after checking that ``t`` is a DTensor of ``p``'s
    ``absmax_layout`` on ``p``'s mesh (ValueError otherwise: a state of another sharding or
    world size, whose blocks start elsewhere)."""
    from ..kernels import quant

    shape, placements, blocks = absmax_layout(p, who)
    lt = local(t) if is_dtensor(t) else None
    if (
        lt is None
        or t.device_mesh != p.device_mesh
        or tuple(t.placements) != placements
        or tuple(t.shape) != shape
        or tuple(lt.shape) != (1,) * (len(shape) - 1) + (blocks,)
    ):
        got = (
            f"a DTensor {t.dtype}{list(t.shape)} placed {tuple(t.placements)} over a mesh of "
            f"{t.device_mesh.size()}"
            if lt is not None
            else f"a plain {getattr(t, 'dtype', type(t).__name__)} tensor"
        )
        raise ValueError(
            f"{who} is {got}; expected a DTensor float32{list(shape)} placed {placements} over "
            f"the parameter's mesh of {p.device_mesh.size()} (one row of scales per shard: "
            "the blocks start at each shard's first element, so a state of another sharding "
            "or world size does not fit; convert it with full_precision_state_dict by the "
            "optimizer that saved it)"
        )
    return lt.view(-1)[: quant.nblocks(local(p).numel())]


def check(p: Any, g: Any, bufs: Sequence[Any], master: Any, who: str) -> None:
    """Refuse (TypeError, nothing written) a parameter whose gradient and state are not all
    DTensors sharded alike or all plain tensors: see the module docstring. ``bufs`` are its
    state buffers (None where absent), ``master`` its fp32 master copy or None."""
    sharded = is_dtensor(p)
    named = [("its gradient", g), ("its master copy", master)]
    named += [(f"its state buffer {i}", b) for i, b in enumerate(bufs)]
    for what, t in named:
        if t is not None and is_dtensor(t) != sharded:
            raise TypeError(
                f"{who}: the parameter is {'a DTensor' if sharded else 'a plain tensor'}, "
                f"{what} is {'a DTensor' if is_dtensor(t) else 'a plain tensor'}; expected "
                "both alike (a state dict of an unsharded model loaded into a sharded one?)"
            )
        if (
            t is not None
            and sharded
            and (t.device_mesh != p.device_mesh or t.placements != p.placements)
        ):
            raise TypeError(
                f"{who}: {what} is sharded as {t.placements} over {t.device_mesh}, the "
                f"parameter as {p.placements} over {p.device_mesh}; expected the same"
            )
    if not sharded:  # plain tensors: shapes checked with the rest (``FusedOptimizer``)
        return
    lp = local(p)
    for what, t in named:
        if t is None:
            continue
        lt = local(t)
        if lt.shape != lp.shape:
            raise TypeError(
                f"{who}: the local shard of {what} is {list(lt.shape)}, the parameter's "
                f"{list(lp.shape)}; expected the same"
            )
