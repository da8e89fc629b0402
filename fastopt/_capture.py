"""Capturable steps: the step count, hyperparameters and host scalars of an optimizer kept in
device memory (``kernels.device_scalars``), so that a whole step launches kernels only.

``DeviceScalars`` belongs to one optimizer built with ``capturable=True`` and stepped on a GPU
backend (one that has ``scalar_kernel``: CuPy, numba-cuda; numba-cuda under the CUDA simulator
too, on host arrays). Per step: the hyperparameters that changed since the last step are
written into ``ctl`` (an assignment on the device, no synchronisation), the scalar kernel
advances the step and computes the scalars unless the device found-inf flag is set, and the
update kernels read them from ``k32``/``k64``. ``step_count``, ``state_dict`` and checkpoints
read the count back (one synchronisation, outside any graph).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import ModuleType
from typing import Any

import numpy as np

from ._arrays import array_module
from .kernels import RULES, device_scalars

__all__ = ["DeviceScalars", "supports"]


def supports(be: ModuleType) -> bool:
    """Can backend module ``be`` run capturable steps (a scalar kernel on its device)?"""
    return hasattr(be, "scalar_kernel")


class DeviceScalars:
    """See the module docstring. ``like``: an array on the device the optimizer steps."""

    def __init__(
        self,
        be: ModuleType,
        rule: str,
        hp: Mapping[str, Any],
        step: int,
        hs: Mapping[str, float] | None,
        seed: int,
        like: Any,
        select: bool = False,
    ) -> None:
        spec = RULES[rule]
        # NotCapturable for a rule it cannot do; ``select``: a rule's device variant too
        # (``Rule.device_flags``), which the caller launches (``program.flags``)
        self.program = device_scalars.trace(rule, hp, select)
        self.be, self.rule, self.seed = be, rule, np.uint32(seed)
        xp = array_module(like)
        values = device_scalars.ctl_values(rule, hp, step, hs)
        self.ctl = xp.asarray(np.array(values, dtype=np.float64))
        m = len(spec.scalars)
        self.k32 = xp.zeros(m, dtype=np.float32)
        self.k64 = xp.zeros(m, dtype=np.float64)
        self.keyp = xp.zeros(1, dtype=np.uint32)
        self.no_inf = xp.zeros(1, dtype=np.float32)
        self._hp = list(values[1 : 1 + self._nhp(spec)])
        self.kernel = be.scalar_kernel(self.program)

    @staticmethod
    def _nhp(spec: Any) -> int:
        return sum(h.size for h in spec.hyper)  # a tuple as its entries, no bools

    def upload(self, hp: Mapping[str, Any]) -> None:
        """Write the numeric hyperparameters that changed since the last step into ``ctl``."""
        values = device_scalars.ctl_values(self.rule, hp, 0)[1 : 1 + len(self._hp)]
        for j, (old, new) in enumerate(zip(self._hp, values)):
            if old != new:
                self.ctl[1 + j] = new
        self._hp = values

    def advance(self, like: Any, found_inf: Any = None) -> None:
        """Launch the scalar kernel on ``like``'s stream (skipped on the device when
        ``found_inf`` holds a nonzero value)."""
        fi = self.no_inf if found_inf is None else found_inf
        self.kernel(like, self.ctl, self.k32, self.k64, self.keyp, fi, self.seed)

    def extras(self, compute: str, found_inf: Any = None) -> dict[str, Any]:
        """The device arrays an update kernel of ``compute`` dtype reads."""
        kbuf = self.k64 if compute == "float64" else self.k32
        return {"kbuf": kbuf, "keyp": self.keyp, "found_inf": found_inf}

    def step(self) -> int:
        """The steps taken (read back: one synchronisation)."""
        return int(_host(self.ctl)[0])

    def set_step(self, step: int) -> None:
        self.ctl[0] = float(step)

    def set_host_state(self, hs: Mapping[str, float]) -> None:
        """Write the host state ``hs`` (a loaded state dict's) into ``ctl``."""
        for n, v in hs.items():
            self.ctl[self.program.hs_index[n]] = float(v)

    def host_state(self) -> dict[str, float]:
        """The rule's host state after the steps taken (read back)."""
        spec = RULES[self.rule]
        ctl = _host(self.ctl)
        return {n: float(ctl[self.program.hs_index[n]]) for n, _ in spec.host_state}


def _host(a: Any) -> np.ndarray[Any, Any]:
    if isinstance(a, np.ndarray):
        return a
    return array_module(a).asnumpy(a)
