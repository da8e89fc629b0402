"""``fastopt.torch``: ``torch.optim`` drop-ins running fastopt's fused kernels.

    import fastopt.torch as fot
    opt = fot.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    scaler = torch.amp.GradScaler("cuda")      # or "cpu"
    ...
    scaler.scale(loss).backward(); scaler.step(opt); scaler.update(); opt.zero_grad()

Every fastopt optimizer (``fastopt.optimizers.CLASSES``) has a class here of the same name: a
subclass of ``torch.optim.Optimizer`` with ``torch.optim``'s signature (``params`` as tensors or
param-group dicts, the same keyword names and defaults) plus ``backend="auto"`` (numba for CPU
tensors, cupy for CUDA tensors; "numba-cuda" on request). Param groups, ``add_param_group``,
``zero_grad``, every learning-rate scheduler, closures and hooks are torch's own.

The state is torch's: ``state[p]`` holds the same keys, shapes and dtypes (``step`` a float32
0-d tensor where torch keeps one), so ``state_dict()`` loads into ``torch.optim`` and the
reverse, mid-run. Parameters whose ``.grad`` is None are skipped and keep their state and step.

A step launches once per (device, dtype, variant, step count, master copy or not, host state)
over all the parameters of a param group that have a gradient, in place: on the CPU one
parallel loop walks a table of the tensors' addresses (``numba_backend.launch_many``, or
``launch_many_io`` for 16-bit storage, master copies and loss scales); on a GPU one
multi-tensor kernel walks a device table of them (``_device``; CuPy or numba-cuda).
Parameters stay where they are: nothing is repacked, so ``zero_grad``, ``.to()``,
``load_state_dict`` and parameters added later need no care. Like
torch's in-place ops, a step bumps the autograd version counters of everything it writes, so
a graph built on the old weights refuses ``backward()``. DTensor parameters (FSDP2) are
stepped through their local shards, with DTensor state (``_dtensor``).

Nothing is written before every group is checked (``_memory``, ``_plan_group``, ``_steady``; a
state dict at load: ``_compat``): each tensor a kernel touches (parameter, gradient, state,
master copy, the 0-d step counts and host state written through their addresses) is a plain
``torch.Tensor``/``nn.Parameter`` (a DTensor's local shard; other subclasses and meta tensors,
which have no memory, are refused with a TypeError naming the parameter), strided, alike in
device, dtype and shape, and backed by its storage (``untyped_storage().nbytes()`` holds
``storage_offset`` and the tensor: a storage freed or shrunk by ``resize_`` is refused); no
written tensor shares memory with another tensor of the step, in any group (the same tensor
twice, a gradient that is a parameter, a state tensor that is its parameter). A gradient that is
not contiguous (expanded, transposed) is read through a contiguous copy and never written. A
parameter's state must hold what its step reads: a step count that is a whole number >= 0, its
buffers and host state (KeyError, TypeError or ValueError, as torch.optim raises at load or in
its step); numbers that an older state dict holds are converted at load, as torch.optim converts
them. Every host value (the variant, the scalars, the host state after the step) is computed
before the first write: a step that cannot be computed (ASGD's ``eta`` overflowing, a zero or
non-finite loss scale) is refused with nothing changed. A group stepped before over the same
tensors re-checks all of this in a few attribute reads per tensor (``_steady``).

AMP: the classes declare ``_step_supports_amp_scaling``, so ``torch.amp.GradScaler`` hands
them its scale and found-inf flag instead of unscaling the gradients itself; a step with
``found_inf`` set changes nothing (params, state, step counts), and the gradients are
unscaled in the same pass as the update (``p.grad`` keeps GradScaler's scale, as with torch's
fused optimizers). On a GPU the step counts live on the device and the scale and the flag are
read by the kernels: no host synchronisation (RAdam and Adan, whose host variant depends on
the step, run their ``Rule.device_flags`` variant there, selecting per step; not ASGD, whose
variant depends on its host state); with ``capturable=True`` the step can be captured in a
CUDA graph (a keyword of the classes torch lacks too: Lion, AdaBelief, Adan, AdEMAMix). A
group whose parameters fall into several launches keeps one cached launch per part
(``_steady.SteadyParts``).
``max_grad_norm=`` clips by the global gradient norm inside the step (the norm of the unscaled
gradients under GradScaler).

float16 and bfloat16 parameters are stepped in their storage dtype (math in float32, round to
nearest even) with state in the parameter's dtype, or, with ``master_weights=True``, through an
fp32 copy (``state[p]["master_param"]``) with fp32 state, the parameter stored from the copy in
the same pass. A 16-bit parameter written between steps (``w.fill_(3.0)``: its version counter
moved) is seen: where it no longer equals its master rounded, the master takes the written
value. A write that bypasses the version counter (through ``w.data`` or a NumPy view) is not
seen, and the master's value wins. ``master_weights="remainder"`` keeps that master of a
bfloat16 parameter as the parameter (its high half) and an int16 ``state[p]["master_remainder"]``
(its low half), the same master bit for bit in 2 bytes instead of 4 (``_master``; float16
parameters refused, state dicts of either form converted).

The core classes' other precision keywords are taken as the core checks them
(``_check_precision``): ``state_dtype`` ("float32" or "bfloat16": the state buffers' storage
dtype, ``precision.resolve_state_kind``; a value the core accepts beyond the storage dtypes is
refused until this path keeps it), ``stochastic_rounding`` and ``seed`` (bfloat16 parameters
without a master copy rounded from a hash of (seed, step, index), the index counted from each
tensor's start, salt 0, on the CPU and GPU paths alike; SGD, which keeps no step count in
torch's state, hashes the steps this object took for the group). ``state_dict`` carries the
state in its storage dtype; ``load_state_dict`` converts each saved state buffer to it
(``_compat.state_keeps``).
"""

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.autograd.graph import increment_version

from .. import _capture, precision
from .. import optimizers as _optimizers
from .._arrays import as_xp_array
from ..backends import get_backend
from ..base import PRECISION_DEFAULTS
from ..functional import Launch
from ..kernels import RULES, storage
from ..kernels.quant import nblocks
from ..kernels.spec import host_precision, host_round
from ..kernels.storage import io_for
from . import _device, _dtensor, _master, _quantized
from ._compat import TorchContract, hp_value
from ._device import Amp, stream_of
from ._memory import address_table as _address_table
from ._memory import check_backed, check_no_overlap, check_written, plain_type
from ._memory import set_scalars as _set_scalars
from ._quantized import full_precision_state_dict
from ._steady import Steady, SteadyParts

__all__ = [
    "CPUOffload",
    "FusedOptimizer",
    *_optimizers.CLASSES,
    "Adagrad",
    "RMSprop",
    "full_precision_state_dict",
]

#: torch dtypes the kernels run on, and their storage kinds (``kernels.storage``)
_KINDS = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
#: the torch dtype of a storage kind
_TORCH = {v: k for k, v in _KINDS.items()}
#: the plain dtypes: one many-tensor launch on the CPU
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: (rule, its bool hyperparameters) -> can the device compute its scalars (``_device_scalars``)
_DEVICE_RULES: dict[Any, bool] = {}
#: how errors name the remainder form of master weights (``_master``)
_REM = "master_weights='remainder'"
#: keyword arguments of torch.optim constructors that select torch's own implementation
_TORCH_IMPL = ("foreach", "fused", "capturable", "differentiable")


def _torch_defaults(cls):
    """The param-group keys torch's counterpart of ``cls`` keeps that fastopt's has not
    (``foreach``, ``fused``, ...), with torch's defaults: so state dicts load both ways."""
    from .._torch_names import torch_name as _torch_name

    name = _torch_name(cls)
    if name is None:
        return {}
    tcls = getattr(torch.optim, name)
    probe = tcls([torch.nn.Parameter(torch.zeros(1))])
    return dict(probe.defaults)


class FusedOptimizer(TorchContract, torch.optim.Optimizer):
    """The ``torch.optim.Optimizer`` face of a fastopt optimizer class (``_fastopt``)."""

    #: the fastopt class (set on each generated class, ``_make``)
    _fastopt: Any = None
    #: torch keeps a step count for the rule (no fresh slot), set by ``_make``
    _keeps_step: bool = True
    _step_supports_amp_scaling = True
    _steady: dict[int, Steady | SteadyParts]
    #: the precision settings (``_check_precision``; set per instance by the generated
    #: constructors, these defaults serve optimizers pickled before they existed)
    master_weights: bool | str = False
    state_dtype: str | None = None
    stochastic_rounding: bool = False
    seed: int = 0

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

    # -- hyperparameters -------------------------------------------------------------------------
    @classmethod
    def _rule_hp(cls, group):
        """The rule's hyperparameters of a param group (tensor lr as a float; the class's
        pinned values; torch's ``decoupled_weight_decay`` when the group carries it)."""
        fo = cls._fastopt
        spec = RULES[fo._rule]
        hp = {}
        for h in spec.hyper_names:
            if h in fo._pinned:
                hp[h] = fo._pinned[h]
            elif h in group:
                hp[h] = hp_value(h, group[h])  # tensor lr, betas, ... as floats
        return spec.validate(hp)

    def _check_group(self, group, what):
        try:
            hp = type(self)._rule_hp(group)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(self).__name__}: {what}: {exc}") from None
        if group.get("capturable"):
            _check_capturable(type(self), hp, what)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        merged = dict(self.defaults, **{k: v for k, v in param_group.items() if k != "params"})
        self._check_group(merged, "a param group")
        if self.master_weights == "remainder":  # float16 params refused before any is added
            ps = param_group.get("params")
            if ps is not None and not isinstance(ps, (torch.Tensor, set)):
                ps = param_group["params"] = list(ps)  # a generator is read once
            for p in [ps] if isinstance(ps, torch.Tensor) else ps or ():
                if isinstance(p, torch.Tensor) and p.dtype is torch.float16:
                    precision.check_remainder_param("float16", f"{type(self).__name__}: {_REM}")
        super().add_param_group(param_group)

    # -- state -----------------------------------------------------------------------------------
    def _state_kind(self, param_dtype, master, label=None):
        """The storage dtype name of the state buffers of a parameter of ``param_dtype``
        (``precision.resolve_state_kind``: ``state_dtype``, else the parameter's dtype, float32
        beside a master copy); TypeError (naming ``label``) for bfloat16 state of float64
        parameters."""
        from ..precision import resolve_state_kind

        try:
            return resolve_state_kind(self.state_dtype, _KINDS[param_dtype], master)
        except TypeError as exc:
            raise TypeError(f"{label or type(self).__name__}: {exc}") from None

    def _sr(self, param_dtype, master):
        """Does a launch of ``param_dtype`` parameters round their stores stochastically?"""
        return self.stochastic_rounding and param_dtype is torch.bfloat16 and not master

    def _new_state(self, p, spec, hp, slots, master=False, step_device=None):
        """``state[p]`` as torch creates it on a parameter's first step (torch's keys: a step
        count where torch keeps one, the state buffers ``slots``, host scalars as 0-d
        tensors), not yet stored: ``_run_plan`` stores it once every check of the step has
        passed. Empty for a parameter that needs none, as in torch (SGD without momentum).
        ``master``: the master form (``_master``: False, True or "remainder").
        ``step_device``: where the step count lives (on a GPU whose scalars live there,
        ``_device_scalars``: the parameter's device, as torch's fused and capturable
        optimizers keep it; else the CPU)."""
        new = {}
        if type(self)._keeps_step:
            new["step"] = torch.tensor(0.0, dtype=torch.float32, device=step_device)
        # ``state_dtype``, or the parameter's dtype (float32 beside a master copy: 16-bit
        # states would undo the master)
        sdtype = _TORCH[self._state_kind(p.dtype, master)]
        fmt = _quantized.fmt_of(self)
        for s in spec.slots:
            if s.name in slots and not s.fresh and fmt and s.quantize:  # codes and scales
                new.update(_quantized.new_slot(p, spec, hp, s.name, fmt))
            elif s.name in slots and not s.fresh:
                new[s.name] = torch.full_like(
                    p, spec.initial(s.name, hp), dtype=sdtype, memory_format=torch.preserve_format
                )
        for name, value in spec.initial_host_state(hp).items():
            new[name] = torch.tensor(value, dtype=torch.float32, device=step_device)
        if master == "remainder":  # the low half of the fp32 master: the param is it exactly
            new[precision.MASTER_REMAINDER] = torch.zeros_like(p, dtype=torch.int16)
        elif master:  # the fp32 copy a 16-bit parameter is stepped through
            new["master_param"] = p.detach().to(torch.float32, copy=True)
        return new

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

    def _key_step(self, index, t=None):
        """The step that stochastic rounding's key hashes (``storage.step_key(seed, step)``):
        the parameters' step count ``t`` where torch keeps one; else (SGD) the steps this
        optimizer object took for param group ``index`` plus one (a count torch's state has no
        place for: it restarts with a new object), so every step draws new random bits.
        None for a cached launch of a rule with step counts (its own count)."""
        if type(self)._keeps_step:
            return t
        return self.__dict__.get("_key_steps", {}).get(index, 0) + 1

    def _group_hp(self, index, group):
        """``_rule_hp`` of a param group; the learning rate of a group whose scalars live on
        the device (``_device_scalars``), held in a device tensor, is read once (its first
        step) and never again: the step copies it into the device scalars on the device
        (``_device.DeviceLaunch``)."""
        lr = group.get("lr")
        if self._device_tensor(lr) and self._device_scalars(group, lr.device):
            seen = self.__dict__.setdefault("_lr_seen", {})
            key = (index, id(lr))
            if key not in seen:
                seen.clear() if len(seen) > 64 else None
                seen[key] = float(lr)
            return type(self)._rule_hp(dict(group, lr=seen[key]))
        return type(self)._rule_hp(group)

    def _device_scalars_only(self):
        """Does every parameter with a gradient sit in a group whose scalars are computed on
        its device (``_device_scalars``)? Then the step reads ``grad_scale`` and ``found_inf``
        in its kernels."""
        seen = False
        for group in self.param_groups:
            devices = {p.device for p in group["params"] if p.grad is not None}
            if any(not self._device_scalars(group, d) for d in devices):
                return False
            seen = seen or bool(devices)
        return seen

    def _device_scalars(self, group, device):
        """Does ``group`` step on ``device`` with its step counts and scalars on the device?
        On a GPU backend that computes scalars there (``_on_device``): a ``capturable=True``
        group, and any group whose rule and flags the device can compute (as torch's fused
        optimizers keep their step counts on the device); RAdam and Adan through their device
        variant (``Rule.device_flags``, ``device_scalars.trace(..., select=True)``); not ASGD."""
        if not self._on_device(device):
            return False
        if group.get("capturable"):
            return True
        cls = type(self)
        fo = cls._fastopt
        spec = RULES[fo._rule]
        flags = tuple(
            bool(fo._pinned[h.name] if h.name in fo._pinned else group.get(h.name, h.default))
            for h in spec.hyper
            if h.domain == "bool"
        )
        key = (spec.name, flags)
        ok = _DEVICE_RULES.get(key)
        if ok is None:
            from ..kernels import device_scalars

            hp = spec.validate(
                dict(spec.defaults, **{h.name: f for h, f in zip(_bools(spec), flags)})
            )
            ok = _DEVICE_RULES[key] = device_scalars.capturable(spec.name, hp, select=True)
        return ok

    def _device_tensor(self, x):
        """A tensor on a device whose step reads it in its kernels (``_on_device``)."""
        return isinstance(x, torch.Tensor) and self._on_device(x.device)

    def _on_device(self, device):
        """Does ``device``'s backend launch tables and compute scalars on the device?"""
        be = self._backend_module(device)
        return hasattr(be, "launch_table") and _capture.supports(be)

    def _backend_module(self, device):
        """The backend module that steps tensors on ``device``."""
        return get_backend(self._backend_for(device))

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

    def _table_backend(self, device):
        """The backend module of ``device`` when it launches multi-tensor tables, else None."""
        be = self._backend_module(device)
        return be if hasattr(be, "launch_table") else None

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

    def _plan_group(self, group, index, spec, hp, amp):
        """Check one group's tensors and state and compute each launch's host values, writing
        nothing (``_Plan``; ``_run_plan`` writes)."""
        cls = type(self)
        slots = spec.state_names(hp)
        want_master = getattr(self, "master_weights", False)
        names = spec.state
        # the error names of a parameter's tensors (``_memory.name_of``)
        what = {
            n: f"state {n!r}" for n in (*names, *_master.MASTERS.values(), "step", *spec.host_names)
        }
        plan = _Plan(index, spec, hp, amp)
        entries = plan.entries
        masters = self.__dict__.setdefault("_masters", {})
        # what an existing state must hold: the step count (where torch keeps one), every
        # state buffer of the variant that is not made on step 1, the host state
        fmt = _quantized.fmt_of(self)
        need = (
            (("step",) if cls._keeps_step else ())
            + tuple(s.name for s in spec.slots if s.name in slots and not s.fresh)
            + spec.host_names
        )
        need = _quantized.need(need, spec, fmt)
        buckets: dict[Any, list[Any]] = {}
        for j, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            label = f"{cls.__name__}: parameter {j} of param group {index}"
            # DTensors are stepped through their local shards (``_dtensor``): the kernels, and
            # so every check of memory, see ``local(x)``; plain tensors are their own
            _dtensor.check(p, g, (), None, label)
            lp = _dtensor.local(p)
            lg = _check_param(lp, _dtensor.local(g), label, entries)
            if fmt:  # a backend that steps quantized state here, plain tensors
                _quantized.check_device(self._backend_module(lp.device), fmt, label)
                _quantized.check_sharded(p, fmt, label)
            kind = _KINDS[p.dtype]
            if kind == "float16" and want_master == "remainder":
                precision.check_remainder_param(kind, f"{label}: {_REM}")
            want = want_master if kind in ("float16", "bfloat16") else False
            state: Any = self.state.get(p) or plan.new.get(p)
            fresh = not state
            # the master form it steps with (``_master``: a held one converted to the
            # optimizer's), which decides the state's storage dtype, as at load
            form = _master.form_of(want, state, fresh)
            held = _master.held(state)
            if held == "remainder" and kind != "bfloat16":
                raise ValueError(
                    f"{label}: its state holds 'master_remainder' (the low half of a bfloat16 "
                    f"param's fp32 master); the parameter is {p.dtype}"
                )
            has_master = bool(form)
            self._state_kind(p.dtype, has_master, label)  # refused before anything is made
            if fresh:
                on_dev = self._device_scalars(group, lp.device)
                state = self._new_state(p, spec, hp, slots, form, lp.device if on_dev else None)
                if state:
                    plan.new[p] = state
            else:
                _check_keys(state, need, label)
                if self._device_scalars(group, lp.device):
                    # step counts and host state live on the device: a state from a step that
                    # kept them on the host (torch's foreach step, a state dict) is moved there
                    # when the step writes (``_run_plan``), as torch's fused load moves them
                    moved = {
                        n: state[n].to(lp.device, torch.float32)
                        for n in ("step", *spec.host_names)
                        if isinstance(state.get(n), torch.Tensor) and state[n].device != lp.device
                    }
                    if moved:
                        plan.new[p] = moved
                m = state.get(_master.MASTERS[held]) if held else None
                _dtensor.check(p, g, [state.get(n) for n in names], m, label)
            checks = None if fresh else entries
            if "step" in state:
                step = _step_of(state["step"], label, checks) + 1
            else:  # torch keeps no step count (SGD): step 1 is the one without a fresh buffer
                fresh_slots = [x.name for x in spec.slots if x.fresh]
                step = 1 if not all(_quantized.has_slot(state, n) for n in fresh_slots) else 2
            sdtype = _TORCH[self._state_kind(p.dtype, has_master, label)]
            bufs, lm = self._check_state(lp, state, names, label, checks, what, sdtype)
            if fmt:  # each quantized slot as its (codes, absmax) pair
                bufs = _quantized.check_slots(
                    lp, state, spec, fmt, bufs, label, checks, p if lp is not p else None
                )
            hs, wide = None, False
            if spec.host_state:
                hs, wide = _host_state(state, spec, label, checks, what)
            if lm is not None and not fresh and held is True:
                rec = masters.get(p)
                if (
                    rec is None
                    or rec[0] is not lm
                    or rec[1] != lp.data_ptr()
                    or (rec[2] != p._version)
                ):
                    # the parameter was written since the step that stored it from its master
                    # (or the master was loaded): the 16-bit value the user wrote wins (a
                    # remainder needs none: the parameter is its master's high half)
                    stale = lm.to(lp.dtype) != lp
                    if bool(stale.any()):
                        if form == "remainder":  # split below: the master it would hold
                            lm = torch.where(stale, lp.to(torch.float32), lm)
                        else:
                            plan.resync.append((lm, lp, stale))
            if not fresh and form != held:  # the held master converted (``_master``)
                lm = self._convert_master(plan, p, lp, lm, held, form)
            # one storage format per launch (with or without a master copy, as an fp32 copy or
            # a remainder: a loaded state dict may mix them), one step count, one host state
            # (ASGD under a schedule where one parameter skipped a step keeps its own eta) in
            # one precision
            key = (lp.device, lp.dtype, step, form, hs, wide)
            buckets.setdefault(key, []).append((p, lp, lg, state, bufs))
        for (device, dtype, t, master, hs, wide), items in buckets.items():
            hsd = None if hs is None else dict(zip(spec.host_names, hs))
            try:  # every host value of the step, before anything is written
                with host_precision(wide):  # float64 host state (torch's load widened it)
                    flags, k = spec.variant_and_scalars(hp, t, hsd)
                    new_hs = spec.advance_host_state(hp, t, hsd) if spec.host_state else None
            except (ArithmeticError, ValueError) as exc:
                raise ValueError(
                    f"{cls.__name__}: param group {index}: the host scalars of step {t} "
                    f"({', '.join(f'{h}={v}' for h, v in hp.items())}"
                    f"{'' if hsd is None else f', host state {hsd}'}) cannot be computed "
                    f"({type(exc).__name__}: {exc}); nothing was stepped"
                ) from None
            plan.buckets.append(
                _Bucket(
                    spec.name,
                    device,
                    dtype,
                    t,
                    master,
                    hsd,
                    new_hs,
                    flags,
                    k,
                    items,
                    wide,
                    self._key_step(index, t),
                )
            )
        return plan

    @staticmethod
    def _convert_master(plan, p, lp, lm, held, form):
        """The master of parameter ``p`` (local tensor ``lp``) converted from the form its
        state holds (``held``, its local tensor ``lm``) to ``form`` (``_master``), written by
        ``_run_plan``: the new master stored, the old one dropped and, for a split, the
        parameter written with the split's bfloat16. Returns the new master's local tensor."""
        new = plan.new.setdefault(p, {})
        if form == "remainder" and held is True:
            bits, rem = _master.split(lm)
            plan.params.append((lp, bits))
        elif form == "remainder":  # no master: the param is one, its remainder zero
            rem = torch.zeros_like(lp, dtype=torch.int16)
        else:
            assert form is True and held == "remainder", (form, held)
            m = _master.join(lp, lm)
            plan.drop.append((p, precision.MASTER_REMAINDER))
            new[precision.MASTER] = _dtensor.like(p, m)
            return m
        if held is True:
            plan.drop.append((p, precision.MASTER))
        new[precision.MASTER_REMAINDER] = _dtensor.like(p, rem)
        return rem

    @staticmethod
    def _check_state(p, state, names, label, entries, what, sdtype):
        """Every state tensor a kernel will touch is shaped and placed like its parameter ``p``
        (a DTensor's local shard) and of the state's storage dtype ``sdtype``, and
        backed by its storage, with no internal overlap (``_memory.check_written``): a state
        dict from elsewhere may not be. Returns the tensors the kernels see (local shards) of
        the state buffers ``names`` (None where absent) and of the master the state holds (an
        fp32 copy, or a bfloat16 parameter's int16 remainder: ``_master``), and adds each
        to the overlap ``entries`` (None: a state made just now, which needs no check)."""
        local = _dtensor.local
        mname = _master.MASTERS.get(_master.held(state))
        m = local(state.get(mname)) if mname else None
        shape, device = p.shape, p.device
        bufs = [local(state.get(name)) for name in names]
        if entries is None:
            return bufs, m
        for name, buf in zip(names, bufs):
            if buf is None:
                continue
            lbl = (label, what[name])
            span = check_written(buf, lbl)  # a tensor, backed by its storage
            if buf.shape != shape or buf.dtype is not sdtype or buf.device != device:
                raise ValueError(
                    f"{label}: state {name!r} is {buf.dtype}{list(buf.shape)} on "
                    f"{buf.device}; expected {sdtype}{list(shape)} on {device} (a state "
                    "dict of another model?)"
                )
            entries.append((lbl, buf, True, span))
        if m is not None:
            lbl = (label, what[mname])
            span = check_written(m, lbl)
            mdt = torch.int16 if mname == precision.MASTER_REMAINDER else torch.float32
            if m.shape != shape or m.dtype is not mdt or m.device != device:
                raise ValueError(
                    f"{label}: state {mname!r} is {m.dtype}{list(m.shape)} on {m.device}; "
                    f"expected {mdt}{list(shape)} on {device}"
                )
            entries.append((lbl, m, True, span))
        return bufs, m

    def _run_plan(self, plan):
        """The writes of one checked group (``_plan_group``): new state stored, master copies
        re-synced from parameters written since, then per bucket the launch, the step counts
        and host state advanced and the version counters of everything written bumped."""
        spec, hp, amp = plan.spec, plan.hp, plan.amp
        inv_scale = amp.inv_scale
        names = spec.state
        group = self.param_groups[plan.index]
        local = _dtensor.local
        for p, new in plan.new.items():
            self.state[p].update(new)
        for p, key in plan.drop:
            del self.state[p][key]
        for lp, bits in plan.params:  # a split master's high half (``_master``)
            lp.copy_(bits)
        for m, p, stale in plan.resync:
            m.copy_(torch.where(stale, p.to(torch.float32), m))
        masters = self.__dict__.setdefault("_masters", {})
        fmt = _quantized.fmt_of(self)
        qslots = _quantized.quantized(spec, fmt)
        # each launch may be cached (``Steady``; a group of several: ``SteadyParts``)
        whole = len(plan.buckets) == 1
        parts: list[Any] = []
        for b in plan.buckets:
            used = spec.slots_used(b.flags)
            # the master form (``_master``): an fp32 copy, or a remainder (an int16 master
            # column beside the bfloat16 param: ``IO.remainder``)
            mb, rem = bool(b.master), b.master == "remainder"
            skind = self._state_kind(b.dtype, mb)
            sr = self._sr(b.dtype, mb)
            tensors, wrappers = [], []
            for p, lp, lg, _, bufs in b.items:
                slots = [x if u else None for x, u in zip(bufs, used)]
                for j, u in enumerate(used):
                    if u and slots[j] is None and fmt and names[j] in qslots:  # fresh, quantized
                        new = _quantized.new_slot(p, spec, hp, names[j], fmt)
                        self.state[p].update(new)
                        codes, absmax = new.values()
                        if lp is not p:  # the local codes, the local shard's scales
                            absmax = local(absmax).view(-1)[: nblocks(lp.numel())]
                        slots[j] = (local(codes), absmax)
                    elif u and slots[j] is None:  # a fresh slot (SGD's momentum buffer), step 1
                        x = self.state[p][names[j]] = torch.zeros_like(p, dtype=_TORCH[skind])
                        slots[j] = local(x)
                master = self.state[p].get(_master.MASTERS[b.master]) if mb else None
                tensors.append((lp, lg, slots, local(master)))
                if lp is not p:  # a DTensor: its own version counter, and its state's
                    wrappers.append(p)
                    wrappers += [  # the quantized slots' codes and scales
                        self.state[p][k]
                        for n, u in zip(names, used)
                        if u
                        for k in _quantized.need((n,), spec, fmt)
                    ]
            kind = _KINDS[b.dtype]
            # quantized slots among the variant's (None: the launch stores none)
            quant = fmt if any(u and n in qslots for n, u in zip(names, used)) else None
            steps = [state["step"] for *_, state, _ in b.items if "step" in state]
            be = self._table_backend(b.device)
            dl, steps_on_device, on_device = None, [], False
            if be is not None and _address_table(tensors, len(used), mb) is not None:
                # a GPU: one launch over a table of the tensors (``_device``)
                capturable = self._device_scalars(group, b.device) and _capture.supports(be)
                if group.get("capturable") and not capturable:
                    raise NotImplementedError(
                        f"{type(self).__name__}(capturable=True): backend {be.NAME!r} computes "
                        "no scalars on the device"
                    )
                base = io_for(kind, kind, skind, master=mb, remainder=rem, sr=sr, quant=quant)
                dev_hosts = None
                if capturable and spec.host_state:  # advanced on the device, copied from there
                    dev_hosts = {n: [st[n] for *_, st, _ in b.items] for n in spec.host_names}
                with host_precision(b.wide):
                    dl = _device.launch(
                        be, spec, b.flags, b.k, b.kt, hp, group.get("lr"), base, tensors, amp,
                        steps if capturable else [], b.device, capturable, b.kt - 1, b.hs,
                        dev_hosts, self.seed,
                    )  # fmt: skip
                launched = (dl.mt.rows, None, base)
                if dl.ds is not None:  # the variant launched: the device's (``_device``)
                    b.flags = dl.ds.program.flags
                if capturable:
                    steps_on_device, steps, on_device = steps, [], True
            elif group.get("capturable") and b.device.type != "cpu":
                raise NotImplementedError(
                    f"{type(self).__name__}(capturable=True): parameters on {b.device} need a "
                    "GPU backend that launches tables of contiguous tensors (cupy, numba-cuda)"
                )
            factor = inv_scale
            if dl is None and amp.norm is not None:
                # a GPU bucket outside the tables (a tensor that is not contiguous): the clip
                # coefficient is read here (one synchronisation) and joins the host factor
                coef = amp.norm.coef("float64" if kind == "float64" else "float32")
                factor = (1.0 if factor is None else factor) * float(coef[1])
            io = io_for(
                kind, kind, skind, master=mb, remainder=rem, sr=sr,
                scale=None if factor is None else "host", quant=quant,
            )  # fmt: skip
            if dl is None:
                with host_precision(b.wide):
                    if io.plain:
                        launched = self._launch(b, hp, used, tensors)
                    else:  # 16-bit storage, a master copy or the loss scale: the storage formats
                        launched = self._launch_io(b, hp, used, tensors, io, factor)
            _set_scalars(steps, 1, add=True)
            hosts = []
            if spec.host_state:
                # the values of the host state's dtype (float32 as torch makes it; float64 where
                # torch's load widened it), whatever dtype the 0-d tensors are in
                for n, v in b.new_hs.items():
                    ts = [state[n] for *_, state, _ in b.items]
                    if not on_device:  # a capturable step's are written on the device
                        _set_scalars(ts, v)
                    hosts += ts
            written = [
                t
                for p, _, slots, m in tensors
                for t in (p, *_quantized.flat_tensors(slots), m)
                if t is not None
            ]
            increment_version(written + wrappers + steps + steps_on_device + hosts)
            for (p, *_), (lp, _, _, lm) in zip(b.items, tensors):
                if lm is not None:
                    masters[p] = [lm, lp.data_ptr(), p._version]  # the cached path updates it
            parts.append(
                None
                if launched is None
                else self._cache(
                    plan.index, spec, b, used, tensors, *launched, dl=dl, part=not whole
                )
            )
        cached = parts[0] if whole else SteadyParts.build(parts, group["params"])
        if cached is not None:
            self.__dict__.setdefault("_steady", {})[plan.index] = cached

    def _launch(self, b, hp, used, tensors):
        """One plain launch (every array in the parameters' dtype); ``(table, chunks, None)``
        when it went through one address table (the numba backend), else None."""
        be = self._backend_module(b.device)
        table = _address_table(tensors, len(used)) if be.NAME == "numba" else None
        if table is not None:
            # one launch over every tensor: a table of their lengths and addresses (checked
            # by ``_plan_group``: alike, contiguous, backed by their storage, no overlap)
            chunks = be.chunks_for(table[:, 0].tolist())
            be.launch_many(b.spec_name, b.flags, used, _DTYPES[b.dtype], table, chunks, b.k)
            return table, chunks, None
        views = [
            [_plain(p), _plain(g)] + [None if a is None else _plain(a) for a in slots]
            for p, g, slots, _ in tensors
        ]
        self._launch_each(be, b, hp, views)
        return None

    def _launch_io(self, b, hp, used, tensors, io, inv_scale):
        """The launch of a storage format (``kernels.storage.IO``): 16-bit storage, an fp32
        master copy, the gradient unscaled by ``inv_scale`` in the same pass (``p.grad`` stays
        as GradScaler left it). On the CPU one launch over every tensor (cached like
        ``_launch``'s), else one per tensor."""
        be = self._backend_module(b.device)
        launch = Launch(be, b.spec_name, b.t, hp, b.hs, inv_scale=inv_scale, seed=self.seed)
        launch.key = storage.step_key(self.seed, b.kt)  # stochastic rounding's (``_key_step``)
        writes = tuple(a is not None for a in tensors[0][2])
        if io.quant and be.NAME == "numba":  # codes and scales: their own table (_quantized)
            table = _quantized.address_table(tensors, len(used), io.master)
            if table is not None:
                chunks = _quantized.chunks(table, str(io.quant))
                args = (b.spec_name, b.flags, writes, io, table, chunks, b.k, inv_scale)
                _quantized.launch(*args, key=launch.key)
                return table, chunks, io
        table = None
        if be.NAME == "numba" and not io.quant:
            table = _address_table(tensors, len(used), master=io.master)
        if table is not None:  # one launch over every tensor, as _launch
            chunks = be.chunks_for(table[:, 0].tolist())
            be.launch_many_io(
                b.spec_name,
                b.flags,
                writes,
                io,
                table,
                chunks,
                b.k,
                inv_scale=1.0 if inv_scale is None else inv_scale,
                key=launch.key,
            )
            return table, chunks, io
        with _torch_stream(b.device):
            for p, g, slots, master in tensors:
                row = [p, g, *slots, master]
                # the gradient is contiguous (``_check_param``) and never written back; a
                # quantized slot's pair is contiguous (``_quantized.check_slots``)
                arrays = [
                    a if a is None or isinstance(a, tuple) or a.is_contiguous() else a.contiguous()
                    for a in row
                ]
                flat: list[Any] = [
                    None if a is None or isinstance(a, tuple) else as_xp_array(_plain(a).view(-1))
                    for a in arrays
                ]
                states = tuple(flat[2:-1])
                if io.quant:  # the quantized slots as (codes, absmax) arrays
                    states = _quantized.runner_states(slots, lambda a: _array(_plain(a)))
                run = launch.runner(flat[0].dtype, writes, io)
                run(flat[0], flat[1], states, flat[-1], 0)
                for orig, a in zip(row, arrays):
                    if orig is not None and a is not orig:
                        orig.copy_(a)
        return None

    def _cache(self, index, spec, b, used, tensors, table, chunks, io, dl=None, part=False):
        """The cache of the launch just made over ``table`` for param group ``index``'s next
        step (``Steady``; ``dl`` the GPU's ``_device.DeviceLaunch``; ``part``: one of the
        group's several launches), or None where it cannot be kept."""
        group = self.param_groups[index]
        np_dtype = None if io is not None else _DTYPES[b.dtype]
        cached = Steady.build(
            self, group, index, spec, b.t, b.flags, used, tensors, table, chunks, np_dtype, io, dl,
            b.hs, self.seed, part,
        )  # fmt: skip
        return cached

    def _launch_each(self, be, b, hp, views):
        """One launch per tensor (GPU backends, the numpy backend, non-contiguous tensors
        through contiguous copies written back; the gradient, contiguous, is only read). CUDA
        tensors are stepped on torch's current stream of their device, so the step is ordered
        after the backward that wrote the gradients."""
        launch = Launch(be, b.spec_name, b.t, hp, b.hs)
        writes = tuple(a is not None for a in views[0][2:])
        run = launch.runner(_DTYPES[b.dtype], writes)
        with _torch_stream(b.device):
            for row in views:
                arrays = [a if a is None or a.is_contiguous() else a.contiguous() for a in row]
                flat = [None if a is None else _array(a.view(-1)) for a in arrays]
                run(flat[0], flat[1], tuple(flat[2:]))
                for orig, a in zip(row, arrays):
                    if orig is not None and a is not orig:
                        orig.copy_(a)

    def _backend_for(self, device):
        if self.backend != "auto":
            return self.backend
        return "cupy" if device.type == "cuda" else "numba"


class _Bucket:
    """One launch of a checked step: parameters alike in device, dtype, step count, master copy
    and host state (its values, and ``wide``: held in float64), with the variant ``flags``, host
    scalars ``k`` and host state after it (``new_hs``), all computed before anything is
    written; ``kt`` the step stochastic rounding's key hashes (``_key_step``). ``items``:
    ``(param, its local tensor, gradient to read, state, state tensors)``."""

    __slots__ = (
        "device",
        "dtype",
        "flags",
        "hs",
        "items",
        "k",
        "kt",
        "master",
        "new_hs",
        "spec_name",
        "t",
        "wide",
    )

    def __init__(self, spec_name, device, dtype, t, master, hs, new_hs, flags, k, items, wide, kt):
        self.spec_name, self.device, self.dtype, self.t, self.master = (
            spec_name,
            device,
            dtype,
            t,
            master,
        )
        self.hs, self.new_hs, self.flags, self.k, self.items = hs, new_hs, flags, k, items
        self.wide, self.kt = wide, kt


class _Plan:
    """One param group's checked step (``FusedOptimizer._plan_group``): the launches
    (``buckets``), the overlap entries of every tensor it touches, state to store (``new``),
    master copies to re-sync (``resync``) and masters converted (``drop``, ``params``), for
    ``_run_plan`` to write."""

    __slots__ = (
        "amp", "buckets", "drop", "entries", "hp", "index", "new", "params", "resync", "spec",
    )  # fmt: skip

    def __init__(self, index, spec, hp, amp):
        self.index, self.spec, self.hp, self.amp = index, spec, hp, amp
        self.buckets, self.entries, self.new, self.resync = [], [], {}, []
        #: a master converted from the form its state held (``_master``): the old one's key
        #: ``(param, key)``, and the bfloat16 written into a parameter ``(local, values)``
        self.drop, self.params = [], []


def _inv_scale(grad_scale, who):
    """1/grad_scale, or None without a loss scale. A scale of zero (GradScaler's scale
    underflowed), negative or non-finite is refused before anything is written: torch's fused
    Adam divides by it and steps every parameter to inf/NaN."""
    if grad_scale is None:
        return None
    v = float(grad_scale)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(
            f"{who}: grad_scale is {v}; expected a finite loss scale > 0 (a GradScaler whose "
            "scale underflowed to 0?); nothing was stepped"
        )
    return 1.0 / v


def _check_precision(who, master_weights, state_dtype, stochastic_rounding, seed):
    """``(master_weights, state_dtype, stochastic_rounding, seed)`` checked as the core's
    optimizers check them (``base.Optimizer._set_precision``, ``precision.check_state_dtype``):
    ``master_weights`` False, True or "remainder" (``_master``); ``state_dtype`` one the core
    accepts: a storage dtype of the kernels
    (``kernels.storage.KINDS``: the state tensors are plain torch tensors of it) or a quantized
    format (``_quantized``: codes and block scales)."""
    from .. import precision

    try:
        master_weights = precision.check_master_weights(master_weights)
    except TypeError as exc:
        raise TypeError(f"{who}: {exc}") from None
    if not isinstance(stochastic_rounding, (bool, np.bool_)):
        raise TypeError(
            f"{who}: invalid stochastic_rounding={stochastic_rounding!r}; expected True or False"
        )
    try:
        sd = precision.check_state_dtype(state_dtype)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None
    if sd is not None and sd not in storage.KINDS and sd not in precision.QUANTIZED:
        raise NotImplementedError(f"{who}: state_dtype={sd!r} is not kept by fastopt.torch")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{who}: invalid seed={seed!r}; expected an integer in [0, 2**32)")
    if not 0 <= int(seed) < 1 << 32:
        raise ValueError(f"{who}: invalid seed={seed!r}; expected an integer in [0, 2**32)")
    if master_weights and stochastic_rounding:
        raise ValueError(
            f"{who}: stochastic_rounding=True rounds bfloat16 params that have no master copy; "
            f"with master_weights={master_weights!r} each param is stored from its fp32 master: "
            "choose one"
        )
    return master_weights, sd, bool(stochastic_rounding), int(seed)


def _check_max_norm(max_grad_norm, who):
    """``max_grad_norm`` as a float (None: no clipping): finite and > 0."""
    if max_grad_norm is None:
        return None
    if isinstance(max_grad_norm, bool) or not isinstance(max_grad_norm, (int, float)):
        raise TypeError(f"{who}: max_grad_norm={max_grad_norm!r}; expected a number or None")
    v = float(max_grad_norm)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{who}: max_grad_norm={v}; expected a finite number > 0")
    return v


def _bools(spec):
    """The rule's bool hyperparameters."""
    return [h for h in spec.hyper if h.domain == "bool"]


def _check_capturable(cls, hp, what):
    """A ``capturable=True`` group needs a rule whose host scalars the device computes
    (``kernels.device_scalars``: not one whose variant depends on the step or host state)."""
    from ..kernels import device_scalars

    spec = RULES[cls._fastopt._rule]
    try:
        device_scalars.trace(spec.name, hp, select=True)
    except device_scalars.NotCapturable as exc:
        raise NotImplementedError(f"{cls.__name__}(capturable=True): {what}: {exc}") from None


def _check_param(p, g, label, entries):
    """Refuse a parameter or gradient a kernel cannot step in place (``_memory``), adding both
    to the overlap ``entries``; returns the gradient to read: ``g`` itself, or a contiguous
    copy of a strided, expanded or lazily negated one (read once, never written back, as torch
    reads it)."""
    span = check_written(p, label)
    if p.dtype not in _KINDS:
        raise TypeError(
            f"{label} is {p.dtype}; fastopt.torch steps "
            f"{', '.join(str(d) for d in _KINDS)} parameters"
        )
    glabel = (label, ".grad")
    if not plain_type(g):
        check_backed(g, glabel)  # names the subclass
    if g.layout is not torch.strided:
        raise RuntimeError(f"{label}: fastopt.torch does not support sparse gradients")
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
        raise ValueError(
            f"{label}: its gradient is {g.dtype}{list(g.shape)} on {g.device}, the parameter "
            f"{p.dtype}{list(p.shape)} on {p.device}; expected them alike"
        )
    entries.append((label, p, True, span))
    entries.append((glabel, g, False, check_backed(g, glabel, read_only=True)))
    if not g.is_meta and (g.is_neg() or not g.is_contiguous()):
        g = g.resolve_neg().contiguous()
    return g


def _check_keys(state, need, label):
    """A parameter's existing state holds what its step reads (``need``: the step count where
    torch keeps one, every state buffer of the variant that is not made on step 1, the host
    state). torch.optim raises KeyError for these too (at load for ``step``, in its step for a
    buffer); recreating them would step from the wrong count or from zeros."""
    for n in need:
        if n not in state:
            missing = [x for x in need if x not in state]
            raise KeyError(
                f"{label}: its state has no {', '.join(map(repr, missing))} (keys "
                f"{sorted(state)}); a state dict edited or from another optimizer? (torch.optim "
                "raises KeyError too)"
            )


def _step_of(s, label, entries):
    """A parameter's step count as an int: a 0-d real tensor holding a whole number >= 0 (a
    fractional, negative, inf or NaN count is refused: torch.optim would step on with it, here
    each step's host scalars and the launches' grouping are keyed on whole counts). Added to
    the overlap ``entries`` unless None (a count made just now)."""
    if entries is not None:
        if not isinstance(s, torch.Tensor) or not plain_type(s):
            raise TypeError(
                f"{label}: state 'step' is {s!r}; expected a 0-d tensor (load_state_dict "
                "converts a number, as torch.optim does)"
            )
        dt = s.dtype
        if s.numel() != 1 or dt.is_complex or dt is torch.bool or s.is_meta:
            raise ValueError(
                f"{label}: state 'step' is {s.dtype}{list(s.shape)} on {s.device}; expected a "
                "0-d real tensor"
            )
        lbl = (label, "state 'step'")
        entries.append((lbl, s, True, check_written(s, lbl)))
    v = float(s)
    if not (math.isfinite(v) and v >= 0 and v == int(v)):
        raise ValueError(
            f"{label}: state 'step' is {v}; expected a whole number >= 0 (torch.optim steps on "
            "with a non-finite or fractional count; fastopt.torch refuses it, nothing stepped)"
        )
    return int(v)


def _host_state(state, spec, label, entries, what):
    """A parameter's host state (NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``): 0-d real
    tensors holding finite values, each added to the overlap ``entries`` unless None (host state
    made just now). Returns ``(values, wide)``: the values in ``spec.host_names`` order, rounded
    to the host state's dtype, and whether that is float64 (torch's load policy widens 0-d
    state to a float64 parameter's dtype, and torch then advances it in float64)."""
    ts = [state[n] for n in spec.host_names]
    if entries is not None:
        for name, t in zip(spec.host_names, ts):
            if not isinstance(t, torch.Tensor) or not plain_type(t):
                raise TypeError(
                    f"{label}: state {name!r} is {t!r}; expected a 0-d tensor (load_state_dict "
                    "converts a number, as torch.optim does)"
                )
            if t.numel() != 1 or not t.dtype.is_floating_point or t.is_meta:
                raise ValueError(
                    f"{label}: state {name!r} is {t.dtype}{list(t.shape)} on {t.device}; "
                    "expected a 0-d floating-point tensor"
                )
            lbl = (label, what[name])
            entries.append((lbl, t, True, check_written(t, lbl)))
    wide = any(t.dtype is torch.float64 for t in ts)
    values = []
    with host_precision(wide):
        for name, t in zip(spec.host_names, ts):
            v = float(t)
            if not math.isfinite(v):
                raise ValueError(
                    f"{label}: state {name!r} is {v}; expected a finite number (torch.optim would "
                    "step on with it; nothing stepped)"
                )
            values.append(host_round(v))
    return tuple(values), wide


def _torch_stream(device):
    """CuPy's current stream set to torch's current stream on ``device`` (CUDA tensors), so a
    CuPy launch is ordered with torch's work; a no-op on the CPU."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from ..backends.cupy_backend import _stream_for

    stream = _stream_for(torch.cuda.current_stream(device).cuda_stream)
    return stream if stream is not None else contextlib.nullcontext()


def _plain(t):
    return t.detach() if t.requires_grad else t


def _array(t):
    """A NumPy (CPU) or CuPy (CUDA) view of a contiguous tensor, no copy."""
    if t.device.type == "cpu":
        return t.numpy()
    import cupy

    return cupy.from_dlpack(t)


def _make(cls):
    """The torch.optim face of the fastopt class ``cls``: torch's signature, its defaults."""
    sig = inspect.signature(cls.__init__)
    # the core's own keywords (backend, non-finite policy, mixed precision) are not torch's
    skip = ("self", "backend", "nonfinite", *PRECISION_DEFAULTS)
    own = [p for name, p in sig.parameters.items() if name not in skip]
    torch_defaults = _torch_defaults(cls)
    extra = [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
        for k, v in torch_defaults.items()
        if k in _TORCH_IMPL and k not in {p.name for p in own}
    ]
    if not torch_defaults:
        # no torch.optim counterpart (Lion, AdaBelief, Adan, AdEMAMix): ``capturable`` as torch
        # spells it elsewhere, a param-group key, refused where the rule's scalars cannot be
        # computed on the device (``_check_capturable``)
        extra.append(inspect.Parameter("capturable", inspect.Parameter.KEYWORD_ONLY, default=False))
    params = (
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + own
        + extra
        + [
            inspect.Parameter("master_weights", inspect.Parameter.KEYWORD_ONLY, default=False),
            inspect.Parameter("state_dtype", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("stochastic_rounding", inspect.Parameter.KEYWORD_ONLY, default=False),
            inspect.Parameter("seed", inspect.Parameter.KEYWORD_ONLY, default=0),
            inspect.Parameter("max_grad_norm", inspect.Parameter.KEYWORD_ONLY, default=None),
            inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto"),
        ]
    )
    new_sig = inspect.Signature(params)

    def __init__(self, *args, **kwargs):
        bound = new_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self")
        params_, backend = a.pop("params"), a.pop("backend")
        # not a param-group key: the groups stay torch's, so state dicts load both ways
        prec = _check_precision(
            cls.__name__,
            a.pop("master_weights"),
            a.pop("state_dtype"),
            a.pop("stochastic_rounding"),
            a.pop("seed"),
        )
        self.master_weights, self.state_dtype, self.stochastic_rounding, self.seed = prec
        max_grad_norm = a.pop("max_grad_norm")
        defaults = {**torch_defaults, **dict(cls._pinned), **a}
        FusedOptimizer.__init__(self, params_, defaults, backend, max_grad_norm)

    __init__.__signature__ = new_sig  # type: ignore[attr-defined]
    doc = (cls.__doc__ or "").split("\n\n")
    return type(
        cls.__name__,
        (FusedOptimizer,),
        {
            "__init__": __init__,
            "__doc__": f"{doc[0]}\n\nfastopt's fused kernels behind torch.optim's interface "
            f"(see fastopt.torch).\n\n" + "\n\n".join(doc[1:]),
            "__module__": __name__,
            "_fastopt": cls,
            "_keeps_step": not any(s.fresh for s in RULES[cls._rule].slots),
        },
    )


globals().update({name: _make(cls) for name, cls in _optimizers.CLASSES.items()})
Adagrad = globals()["AdaGrad"]
RMSprop = globals()["RMSProp"]

from .offload import CPUOffload  # noqa: E402  (it subclasses the classes above)
