"""Master weights in ``fastopt.torch``: an fp32 copy (``master_weights=True``, state
``"master_param"``) or a remainder (``master_weights="remainder"``, state ``"master_remainder"``).

With a remainder, a bfloat16 parameter's fp32 master is the parameter itself (the high 16 bits)
and an int16 tensor shaped like it (the low 16 bits, as a signed value; Transformer Engine's
split, ``precision.split_master``): 2 bytes per element instead of 4. The launches read and
write the pair (``kernels.storage.IO.remainder``; the table's master column is the int16
tensor), so the master follows ``master_weights=True``'s trajectory bit for bit. A float16
parameter cannot hold a float32's high half: refused (``ValueError``) before anything is
written, at construction or at the step; 32/64-bit parameters keep no master.

Which form a parameter steps with (``form``): a fresh state takes the optimizer's; a held one
keeps what it holds, converted to the optimizer's form where it keeps a master
(``FusedOptimizer._plan_group`` computes the conversion, ``_run_plan`` writes it with the step):

- an fp32 master into a remainder optimizer: its split, the parameter written with the split's
  bfloat16 (which differs from nearest-even rounding only where the master's low half is a
  tie: one unit further from zero), so that the pair holds the master bit for bit;
- a remainder into an fp32-master optimizer: joined with its parameter;
- no master (a ``torch.optim`` state, a ``master_weights=False`` one) into a remainder
  optimizer: a remainder of zeros (the parameter is then its master exactly: the split of a
  bfloat16 value), the state buffers converted to float32 at load (``_compat.state_keeps``).

A parameter written between steps (its version counter moved) needs no re-sync with a
remainder: the write sets the master's high half, and the joined master is the written value
to within the remainder (whose split gives the written parameter back).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .. import precision

__all__ = ["MASTERS", "form_of", "held", "join", "split"]

#: the state keys of a master, by form
MASTERS = {True: precision.MASTER, "remainder": precision.MASTER_REMAINDER}


def held(state: Any) -> bool | str:
    """The master form ``state`` holds: "remainder", True (an fp32 copy) or False."""
    if not state:
        return False
    if precision.MASTER_REMAINDER in state:
        return "remainder"
    return precision.MASTER in state


def form_of(want: bool | str, state: Any, fresh: bool) -> bool | str:
    """The master form a parameter steps with: ``want`` (the optimizer's, for this parameter's
    dtype) for a fresh state; else the held one, converted where the optimizer keeps a master
    (a remainder optimizer gives every bfloat16 parameter a remainder)."""
    if fresh:
        return want
    have = held(state)
    if want == "remainder":
        return "remainder"
    if want is True:
        return bool(have)
    return have


def _np(t: torch.Tensor) -> Any:
    return t.detach().to("cpu").contiguous().numpy()


def split(master: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bfloat16 param, int16 remainder)`` of a float32 ``master`` (on its device): the pair
    that joins back to it bit for bit (``precision.split_master``)."""
    bits, rem = precision.split_master(_np(master))
    p = torch.from_numpy(np.ascontiguousarray(bits).view(np.int16)).view(torch.bfloat16)
    return p.to(master.device), torch.from_numpy(rem).to(master.device)


def join(param: torch.Tensor, remainder: torch.Tensor) -> torch.Tensor:
    """The float32 master of a bfloat16 ``param`` and its int16 ``remainder``
    (``precision.join_master``), on the param's device."""
    bits = _np(param.view(torch.int16)).view(precision.bfloat16())
    return torch.from_numpy(precision.join_master(bits, _np(remainder))).to(param.device)
