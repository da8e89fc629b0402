"""Bytes of optimizer state per parameter, derived from the rule spec and the storage format.

``state_bytes_per_param(rule, hp, state_dtype, param_dtype, master_weights)``: every slot the
step-1 variant keeps (``Rule.state_names``), at its storage: a quantized slot
(``kernels/quant.py``) one byte of code (half a byte for a packed format) plus one float32
scale per block (``BLOCKS``: 256 elements, 128 for ``"int4"``), any
other slot its dtype's size; plus the master of a 16-bit param with ``master_weights``: a
float32 copy (4 B), or with ``master_weights="remainder"`` a bfloat16 param's int16 remainder
(2 B; ``IO.kind("master")``). Adam with ``state_dtype="int8"``: 2 · (1 + 4/256) = 2.03125 B,
with ``"int4"``: 2 · (1/2 + 4/128) = 1.0625 B (float32 state: 8 B).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import precision
from .kernels import RULES, quant, storage

__all__ = ["state_bytes_per_param"]


def state_bytes_per_param(
    rule: str,
    hp: Mapping[str, Any] | None = None,
    state_dtype: str | None = None,
    param_dtype: str = "float32",
    master_weights: bool | str = False,
) -> float:
    """Bytes of state per parameter element (see the module docstring); ``hp`` defaults to
    the rule's defaults."""
    spec = RULES[rule]
    full = dict(spec.defaults, **(hp or {}))
    policy = precision.check_state_dtype(state_dtype)
    kind = precision.resolve_state_kind(policy, param_dtype, master_weights)
    total = 0.0
    for name in spec.state_names(full):
        slot = spec.slot(name)
        if policy in precision.QUANTIZED and slot.quantize:
            total += quant.code_bytes(2, policy) / 2 + 4 / quant.BLOCKS[policy]
        else:
            total += storage.ITEMSIZE[kind]
    io = precision.io_of(param_dtype, param_dtype, kind, master_weights)
    if io.master:  # float32, or a bfloat16 param's int16 remainder
        total += storage.ITEMSIZE[io.kind("master")]
    return total
