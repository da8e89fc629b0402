"""The plan of a param group's step in ``fastopt.torch``: every check and host value,
computed before anything is written (``_Plan``, ``_Bucket``).

``Planner._plan_group`` checks each parameter with a gradient (``_checks``, ``_memory``; a
DTensor through its local shard, ``_dtensor``), makes the state of a parameter's first step
(``_new_state``, not yet stored), checks an existing one (``_check_state``), converts a held
master to the optimizer's form (``_convert_master``, ``_master``), and groups the parameters
into buckets of one launch each, with each bucket's variant, host scalars and host state after
the step. ``_run.Runner._run_plan`` writes it."""

from typing import Any

import torch

from .. import precision
from ..kernels.spec import host_precision
from . import _dtensor, _master, _quantized
from ._checks import _check_keys, _check_param, _host_state, _step_of
from ._groups import _KINDS, _REM, _TORCH, ParamGroups
from ._memory import check_written


class Planner(ParamGroups):
    """The planning of a ``FusedOptimizer`` step, group by group (the module docstring)."""

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
