"""``FusedOptimizer``: the ``torch.optim.Optimizer`` face of a fastopt optimizer class, and
its step.

Its bases hold the rest: ``_compat.TorchContract`` (pickling, checked state dicts),
``_run.Runner`` (the writes and launches), ``_plan.Planner`` (the checks before them) and
``_groups.ParamGroups`` (hyperparameters, precision settings, backends). ``step`` orchestrates:
the loss scale and found-inf flag, each group's cached launch re-checked or a new plan made,
the overlap of every tensor across groups (``_check_overlap``), the clip coefficient
(``_clip``), then every group written."""

from collections.abc import Callable
from typing import Any

import torch

from ..backends import get_backend
from ..kernels import RULES
from ..kernels.storage import io_for
from ._checks import _inv_scale
from ._compat import TorchContract
from ._device import Amp, stream_of
from ._groups import _KINDS, _check_max_norm
from ._memory import check_no_overlap
from ._plan import _Plan
from ._run import Runner
from ._steady import Steady, SteadyParts


class FusedOptimizer(TorchContract, Runner):
    """The ``torch.optim.Optimizer`` face of a fastopt optimizer class (``_fastopt``)."""

    _step_supports_amp_scaling = True
    _steady: dict[int, Steady | SteadyParts]

    def __init__(
        self,
        params: Any,
        defaults: dict[str, Any],
        backend: str = "auto",
        max_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend != "auto":
            get_backend(backend)  # unknown or unavailable: refuse now
        if defaults.get("differentiable"):
            raise NotImplementedError(
                f"{type(self).__name__}(differentiable=True) is not supported by fastopt.torch; "
                f"use torch.optim.{type(self).__name__} for differentiable steps"
            )
        self._check_group(defaults, "the defaults")
        self.backend = backend
        self.max_grad_norm = _check_max_norm(max_grad_norm, type(self).__name__)
        super().__init__(params, defaults)

    # -- the step --------------------------------------------------------------------------------
    @torch._disable_dynamo  # opaque to torch.compile: a graph break, the step run eagerly
    @torch.no_grad()
    def step(
        self,
        closure: Callable[[], Any] | None = None,
        grad_scale: torch.Tensor | None = None,
        found_inf: torch.Tensor | None = None,
    ) -> Any:
        """One fused step over every parameter with a gradient (``closure`` as in torch).

        ``grad_scale`` and ``found_inf``: torch's protocol for fused optimizers
        (``_step_supports_amp_scaling``; ``torch.amp.GradScaler`` sets them as attributes of
        the optimizer, or pass them here): the gradients are unscaled in the update pass and a
        nonzero ``found_inf`` skips the step. On a GPU (``_device_scalars``) both are read by
        the kernels, never on the host.

        Every group is checked (its cached launch re-checked, or every tensor checked in full)
        and every host value computed before the first write; a refused step changes nothing."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if grad_scale is None:
            grad_scale = getattr(self, "grad_scale", None)
        if found_inf is None:
            found_inf = getattr(self, "found_inf", None)
        who = type(self).__name__
        # on the device: every group's scalars on a GPU (the step counts live there too)
        on_device = self._device_scalars_only()
        amp = Amp()
        if found_inf is not None:
            if on_device and self._device_tensor(found_inf):
                amp.found_inf = found_inf
            elif float(found_inf) != 0:
                return loss  # GradScaler found inf/NaN: nothing changes, as torch's fused step
        if grad_scale is not None:
            if on_device and self._device_tensor(grad_scale):
                amp.scale = grad_scale
            else:
                amp.inv_scale = _inv_scale(grad_scale, who)
        # a CPU launch scales the gradient by one host factor (1/grad_scale, the clip
        # coefficient): whether it has one is known now, its value once the grads are checked
        scaled = amp.inv_scale is not None or self.max_grad_norm is not None
        spec = RULES[type(self)._fastopt._rule]
        steady = self.__dict__.setdefault("_steady", {})
        plans = []
        for i, group in enumerate(self.param_groups):
            hp = self._group_hp(i, group)
            cached = steady.get(i)
            if cached is not None:  # the same tensors as a checked step before: re-checks only
                checked = cached.check(self, group, spec, hp, scaled)
                if checked is not None:
                    plans.append((cached, hp, checked))
                    continue
                del steady[i]
            plans.append(self._plan_group(group, i, spec, hp, amp))
        self._check_overlap(plans, spec, amp)
        if self.max_grad_norm is not None:
            self._clip(plans, amp)
        for plan in plans:  # every group checked before any is stepped
            if isinstance(plan, _Plan):
                self._run_plan(plan)
            else:
                cached, hp, checked = plan
                cached.run(spec, hp, *checked, amp, self._key_step(cached.index))
        if not type(self)._keeps_step:  # the steps each group took (the rounding key's count)
            counts = self.__dict__.setdefault("_key_steps", {})
            for plan in plans:
                i = plan.index if isinstance(plan, _Plan) else plan[0].index
                counts[i] = counts.get(i, 0) + 1
        return loss

    def _clip(self, plans, amp):
        """The clip coefficient of ``max_grad_norm`` from the global norm of the step's
        (unscaled) gradients: on the CPU one ``torch._foreach_norm`` per gradient dtype, folded
        into the launches' host factor; on a GPU ``GradNorm`` over tables of the gradients (one
        reduction pass per dtype and one block to finish), read by the update kernels
        (``Amp.norm``), no synchronisation."""
        grads = []
        for plan in plans:
            if isinstance(plan, _Plan):
                grads += [lg for b in plan.buckets for _, _, lg, _, _ in b.items]
            else:
                grads += [p.grad for p in plan[0].params]
        if not grads:
            return
        devices = {g.device for g in grads}
        if len(devices) > 1:
            raise NotImplementedError(
                f"{type(self).__name__}(max_grad_norm=...): gradients on "
                f"{sorted(map(str, devices))}; the global norm is taken on one device"
            )
        device = next(iter(devices))
        if self._table_backend(device) is not None:
            amp.norm = self._device_norm(grads, device, amp)
            return
        by_dtype: dict[Any, list[Any]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        norms: list[Any] = []
        for dt, gs in by_dtype.items():
            acc = torch.float64 if dt is torch.float64 else torch.float32
            norms += torch._foreach_norm(gs, 2, dtype=acc)
        total = float(torch.linalg.vector_norm(torch.stack([n.double() for n in norms])))
        inv = 1.0 if amp.inv_scale is None else amp.inv_scale
        total *= inv  # the norm of the unscaled gradients
        coef = min(self.max_grad_norm / (total + 1e-6), 1.0) if total == total else total
        amp.inv_scale = inv * coef

    def _device_norm(self, grads, device, amp):
        """The ``GradNorm`` of ``grads`` on ``device`` (cached with its tables, their gradient
        column refreshed), launched on torch's current stream."""
        be = self._table_backend(device)
        spec = RULES[type(self)._fastopt._rule]
        nslots = len(spec.state)
        scale = "device" if amp.scale is not None else "host" if amp.inv_scale is not None else None
        by_dtype: dict[Any, list[Any]] = {}
        for g in grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        key = (
            device,
            scale,
            tuple((dt, tuple(g.numel() for g in gs)) for dt, gs in by_dtype.items()),
        )
        cached = self.__dict__.get("_norm")
        if cached is None or cached[0] != key:
            tables = [
                be.tensor_table(
                    spec.name, io_for(_KINDS[dt]), [(g, g, [None] * nslots, None) for g in gs]
                )
                for dt, gs in by_dtype.items()
            ]
            cached = self.__dict__["_norm"] = (key, tables, be.GradNorm(tables, scale))
        _, tables, gn = cached
        for t, gs in zip(tables, by_dtype.values()):
            t.set_column("grad", [g.data_ptr() for g in gs])
        extras = {}
        if amp.scale is not None:
            extras["scale"] = amp.scale
        elif amp.inv_scale is not None:
            extras["inv_scale"] = amp.inv_scale
        gn(self.max_grad_norm, extras, stream_of(device))
        return gn

    def _check_overlap(self, plans, spec, amp):
        """No tensor the step writes shares memory with another tensor of the step, across
        every group (``_memory.check_no_overlap``). When every group rides its cached launch,
        only the gradients can have moved: their spans are checked against the cached written
        spans in one vectorised search (``Steady.grads_clear``); any doubt takes every group
        through its full checks, whose sweep names what overlaps."""
        if all(not isinstance(p, _Plan) for p in plans):
            cached = tuple(p[0] for p in plans)
            written = self.__dict__.get("_written")
            if written is None or written[0] != cached:
                spans = Steady.written_spans(cached)
                written = self.__dict__["_written"] = (cached, spans)
            if written[1] is not None and all(c.grads_clear(*written[1]) for c in cached):
                return
            self._steady.clear()
            plans[:] = [
                self._plan_group(group, i, spec, self._group_hp(i, group), amp)
                for i, group in enumerate(self.param_groups)
            ]
        entries: list[Any] = []
        for plan in plans:
            entries += plan.entries if isinstance(plan, _Plan) else plan[0].entries()
        check_no_overlap(entries)
