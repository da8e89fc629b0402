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
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["check", "is_dtensor", "like", "local"]


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
