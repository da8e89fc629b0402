"""The writes of a checked param group in ``fastopt.torch`` (``Runner._run_plan``): the new
state stored, masters converted and re-synced, then per bucket the launch (a GPU: one launch
over a table of the tensors, ``_device``; else ``_launch.Launcher``), the step counts and host
state advanced and the version counters of everything written bumped; each launch cached for
the group's next step (``_cache``: ``_steady.Steady``, several: ``SteadyParts``)."""

from typing import Any

import torch
from torch.autograd.graph import increment_version

from .. import _capture
from ..kernels.quant import nblocks
from ..kernels.spec import host_precision
from ..kernels.storage import io_for
from . import _device, _dtensor, _master, _quantized
from ._groups import _KINDS, _TORCH
from ._launch import _DTYPES, Launcher
from ._memory import address_table as _address_table
from ._memory import set_scalars as _set_scalars
from ._plan import Planner
from ._steady import Steady, SteadyParts


class Runner(Planner, Launcher):
    """The writes of a ``FusedOptimizer`` step, group by group (the module docstring)."""

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
