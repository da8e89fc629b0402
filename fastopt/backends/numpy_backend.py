"""The NumPy oracle as a backend: ``fastopt.reference``, array at a time (also the fallback).

Its ``step_runner`` (``backends.protocol``) runs the rule's oracle function over whole arrays:
``reference.<rule>`` for arrays stored in the compute dtype, ``precision.oracle_step`` for a
storage format (16-bit storage, a master copy, a loss scale, stochastic rounding).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .protocol import Runner

if TYPE_CHECKING:
    from ..functional import StepPlan
    from ..kernels.storage import IO

NAME = "numpy"
DEVICE = "cpu"
#: steps quantized state slots (``kernels/quant.py``, ``IO.quant``)
QUANT_STATE = True
#: and the packed ones (``kernels.quant.PACKED``: two codes per byte)
QUANT_PACKED = True


def available() -> bool:
    return True


def why_unavailable() -> str:
    return ""


def step_runner(plan: StepPlan, dtype: Any, writes: tuple[bool, ...], io: IO | None) -> Runner:
    """``run(param, grad, states, master=None, salt=0)``: one step of ``plan`` by the oracle."""
    from .. import precision, reference
    from ..kernels import RULES

    rule, names = plan.rule, RULES[plan.rule].state
    hs = plan.hs or {}
    if io is not None and io.quant:
        return _quant_runner(plan, io)
    if io is not None:
        step, hp, inv, key = plan.step, plan.hp, plan.inv_scale, plan.key

        def run(
            param: Any, grad: Any, states: Sequence[Any], master: Any = None, salt: int = 0
        ) -> None:
            precision.oracle_step(
                rule,
                param,
                grad,
                {n: s for n, s in zip(names, states) if s is not None},
                io=io,
                step=step,
                hp=hp,
                hs=hs,
                master=master,
                salt=salt,
                inv_scale=inv,
                key=key,
            )

        return run
    oracle = getattr(reference, rule)
    # the oracle takes the hyperparameters that shape a step (not, say, the initial
    # accumulator value, which only shapes the state it is handed)
    takes = inspect.signature(oracle).parameters
    kw = {h: v for h, v in plan.hp.items() if h in takes}
    kw["step"] = plan.step

    def run(  # type: ignore[no-redef]
        param: Any, grad: Any, states: Sequence[Any], master: Any = None, salt: int = 0
    ) -> None:
        st = {n: s for n, s in zip(names, states) if s is not None}
        # host state as the oracle keeps it (torch's 0-d tensors), this step's copy
        st.update({n: np.array(v, dtype=np.float32) for n, v in hs.items()})
        oracle(param, grad, st, **kw)

    return run


def _segments(blocks: np.ndarray, size: int) -> list[tuple[int, int, int, int]]:
    """Runs of adjacent blocks of a block table, as ``(first, stop, first block, stop block)``
    (a run is stepped as one tensor: its blocks are the same): a run ends where the next block
    does not follow or the last is short (a tensor's last block of fewer than ``size``
    elements, whose neighbour starts the next tensor's blocks)."""
    out = []
    start = 0
    for b in range(1, blocks.shape[0] + 1):
        if (
            b == blocks.shape[0]
            or blocks[b, 0] != blocks[b - 1, 1]
            or blocks[b - 1, 1] - blocks[b - 1, 0] < size
        ):
            out.append((int(blocks[start, 0]), int(blocks[b - 1, 1]), start, b))
            start = b
    return out


def _quant_runner(plan: StepPlan, io: IO) -> Runner:
    """The oracle's step over quantized state (``fastopt.quant_reference.oracle_step``); a
    ``FlatBuffer`` group's quantized slots (``(codes, absmax, blocks)``) run per run of
    adjacent blocks."""
    from .. import quant_reference
    from ..kernels import RULES, quant

    names = RULES[plan.rule].state
    packed = io.quant in quant.PACKED
    hs = plan.hs or {}
    kw = dict(
        fmt=io.quant, step=plan.step, hp=plan.hp, hs=hs, inv_scale=plan.inv_scale, key=plan.key
    )

    def run(
        param: Any, grad: Any, states: Sequence[Any], master: Any = None, salt: int = 0
    ) -> None:
        blocks = next((s[2] for s in states if isinstance(s, tuple) and len(s) > 2), None)
        if blocks is None:
            st = {
                n: s[:2] if isinstance(s, tuple) else s
                for n, s in zip(names, states)
                if s is not None
            }
            quant_reference.oracle_step(
                plan.rule, param, grad, st, io=io, master=master, salt=salt, **kw
            )
            return
        for lo, hi, b0, b1 in _segments(blocks, quant.BLOCKS[io.quant]):
            # packed codes: bytes lo / 2 .. ceil(hi / 2) (lo even: kernels/quant.py)
            c0, c1 = (lo // 2, (hi + 1) // 2) if packed else (lo, hi)
            st = {
                n: (s[0][c0:c1], s[1][b0:b1]) if isinstance(s, tuple) else s[lo:hi]
                for n, s in zip(names, states)
                if s is not None
            }
            quant_reference.oracle_step(
                plan.rule,
                param[lo:hi],
                grad[lo:hi],
                st,
                io=io,
                master=None if master is None else master[lo:hi],
                salt=salt,
                **kw,
            )

    return run
