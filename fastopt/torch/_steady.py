"""The steady state of a CPU step of ``fastopt.torch``: a param group stepped before, over the
same tensors, relaunched from its cached address table after re-checks that cost a few
attribute reads per tensor.

After a fully checked step of a group (``FusedOptimizer._plan_group``) that went through one
many-tensor launch (the numba backend; every parameter had a gradient), the group keeps a
``Steady``: its parameters, their state dicts, state tensors and master copies, each tensor's
address, shape and dtype, the step count, the host state's 0-d tensors (NAdam's ``mu_product``,
ASGD's ``eta`` and ``mu``), the variant and the storage format (16-bit storage, a master copy, a
loss scale: ``kernels.storage.IO``, None for plain float32/float64), and the byte spans of
everything the launch writes. A group that went through several launches (parameters of several
dtypes, step counts, master copies or host states) keeps one ``Steady`` per launch, each with
its parameters' places in the group (``idx``), together as a ``SteadyParts`` that holds every
parameter of the group once: a steady step re-checks and relaunches each part as above.

The next step re-checks every one of these by identity, address, shape, dtype and contiguity,
and every tensor against the storage that backs it (``untyped_storage().nbytes()`` still holds
``storage_offset`` and the tensor's bytes: a storage shrunk by ``resize_`` is seen); each
gradient by type, dtype, shape, contiguity, device, sign bit and storage (its address goes into
the table; its span is checked against the written spans of every group in one vectorised
search, ``grads_clear``). The step counts and host state are read back through their addresses
in one call (``_memory.read_at``): every step count must be the cached one and every parameter's
host state the same (a parameter whose host state drifted, ASGD under a schedule where it skipped
a step, takes the full path, which launches it with its own). With master copies, each
parameter's version counter must be the one recorded after the last step (a write between steps
makes the full path re-sync the master from it). A step with a loss scale only follows one with
a loss scale (the scale's value is the step's own). Any difference and ``check`` returns None:
the step takes the full path, which rebuilds the cache or refuses with a clear error. A state
dict loaded, a parameter moved (``.to()``), a gradient set to None, a hyperparameter that
changes the variant: each ends the steady state.

Every host value of the step (the variant, the scalars, the host state after it) is computed
in ``check``, before anything is written; ``run`` launches, advances the step counts and host
state through their addresses and bumps the version counters of everything it wrote (one call),
as torch's in-place ops do.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .._quantized import names_of
from ..backends import numba_backend
from ..kernels import storage
from ..kernels.spec import Rule
from ..precision import MASTER, MASTER_REMAINDER
from ._memory import byte_span, read_at

_PLAIN = (torch.Tensor, torch.nn.Parameter)
#: the state key of a master by its dtype: an fp32 copy, or a bfloat16 param's int16 remainder
_MASTER = {torch.float32: MASTER, torch.int16: MASTER_REMAINDER}


class Steady:
    """One param group's cached launch (see the module docstring)."""

    __slots__ = (
        "chunks",
        "container",
        "device",
        "dl",
        "dtype",
        "flags",
        "group",
        "host",
        "host_ptrs",
        "host_vers",
        "hs0",
        "idx",
        "index",
        "io",
        "isz",
        "masters",
        "nbytes",
        "np_dtype",
        "params",
        "plist",
        "pptrs",
        "rows",
        "seed",
        "shapes",
        "slots",
        "states",
        "step_ptrs",
        "step_vers",
        "steps",
        "t",
        "table",
        "used",
        "whi",
        "wlo",
        "written",
    )

    chunks: Any
    container: Any
    device: Any
    dl: Any
    dtype: Any
    flags: Any
    group: Any
    hs0: Any
    idx: Any
    host: Any
    host_ptrs: Any
    host_vers: Any
    index: Any
    io: Any
    isz: Any
    masters: Any
    nbytes: Any
    np_dtype: Any
    params: Any
    plist: Any
    pptrs: Any
    rows: Any
    seed: Any
    shapes: Any
    slots: Any
    states: Any
    step_ptrs: Any
    step_vers: Any
    steps: Any
    t: Any
    table: Any
    used: Any
    whi: Any
    wlo: Any
    written: Any

    @classmethod
    def build(
        cls, opt: Any, group: dict[str, Any], index: int, spec: Rule, t: int,
        flags: dict[str, bool], used: tuple[bool, ...], tensors: list[Any], table: Any,
        chunks: Any, np_dtype: Any, io: storage.IO | None = None, dl: Any = None,
        hs0: dict[str, float] | None = None, seed: int = 0, part: bool = False,
    ) -> Steady | None:  # fmt: skip
        """The cache of group ``index`` just launched through ``table`` (with the storage format
        ``io``, None for a plain launch; ``dl`` a GPU's ``_device.DeviceLaunch``, whose table
        ``table`` is), or None where the group's step cannot be repeated this way (a parameter
        without a gradient, step counts or host state that are not float32 CPU scalars, or
        device step counts of a capturable group)."""
        from ._memory import float32_scalars

        plist = group["params"]
        self = cls()
        self.group, self.plist, self.container, self.index = group, plist, opt.state, index
        self.params = tuple(p for p, _, _, _ in tensors)
        if part:  # one launch of several (``SteadyParts``): its parameters' places in the group
            pos = {id(p): j for j, p in enumerate(plist)}
            self.idx = tuple(pos.get(id(p), -1) for p in self.params)
            if -1 in self.idx or len(set(self.idx)) != len(self.idx):
                return None
        else:
            self.idx = None
            if len(tensors) != len(plist) or any(a is not b for a, b in zip(self.params, plist)):
                return None
        p0 = self.params[0]
        self.dtype, self.np_dtype, self.device, self.dl = p0.dtype, np_dtype, p0.device, dl
        self.isz = p0.element_size()
        self.shapes = tuple(p.shape for p in self.params)
        self.nbytes = np.array([p.numel() * self.isz for p in self.params], dtype=np.int64)
        self.pptrs = tuple(int(r) for r in table[:, 1])
        self.states = tuple(opt.state.get(p) for p in self.params)  # None: no state (SGD)
        names = spec.state
        # (state key, tensor, address, dtype, bytes of one element, shape) of every state
        # tensor the launch touches (a quantized slot's codes and absmax: ``_quantized``)
        self.slots = tuple(
            tuple(
                (key, a, a.data_ptr(), a.dtype, a.element_size(), a.shape)
                for j, x in enumerate(slots)
                if x is not None
                for key, a in (
                    zip(names_of(names[j]), x) if isinstance(x, tuple) else [(names[j], x)]
                )
            )
            + (
                ()
                if m is None
                else ((_MASTER[m.dtype], m, m.data_ptr(), m.dtype, m.element_size(), m.shape),)
            )
            for _, _, slots, m in tensors
        )
        self.io, self.seed = io, seed
        # with master copies: each parameter's record ``[master, address, version]`` of the
        # optimizer's ``_masters`` (made by the full path's step), kept current by ``run``
        self.masters = None
        if io is not None and io.master:
            self.masters = tuple(opt.__dict__.get("_masters", {}).get(p) for p in self.params)
            if None in self.masters:
                return None
        steps: list[Any] = [None if st is None else st.get("step") for st in self.states]
        self.step_vers = None
        if all(s is None for s in steps):
            # no step count (SGD): every step after the first is step 2 (its fresh buffers
            # exist), as ``_plan_group`` counts
            self.steps, self.step_ptrs, t = None, None, 2
        elif dl is not None and dl.ds is not None:
            # a capturable group: the counts live on the device, advanced there; re-checked
            # by identity, address and version counter, never read
            if any(s is None or s.device != p0.device for s in steps):
                return None
            self.steps, self.step_ptrs = tuple(steps), None
        elif float32_scalars(steps):
            self.steps = tuple(steps)
            self.step_ptrs = np.array([s.data_ptr() for s in steps], dtype=np.int64)
        else:
            return None
        # the host state: (name, each parameter's 0-d tensor, their addresses); a capturable
        # group's lives on the device (advanced there, re-checked by version, never read)
        dev = dl is not None and dl.ds is not None
        self.hs0 = hs0
        host = []
        for name in spec.host_names:
            ts: list[Any] = [None if st is None else st.get(name) for st in self.states]
            if dev:
                if any(x is None or x.device != p0.device for x in ts):
                    return None
            elif not float32_scalars(ts):
                return None
            host.append((name, tuple(ts), np.array([x.data_ptr() for x in ts], dtype=np.int64)))
        self.host = tuple(host)
        self.host_ptrs = np.concatenate([h[2] for h in host]) if host and not dev else None
        self.host_vers = None
        self.t, self.flags, self.used = t, flags, used
        self.table, self.chunks = table, chunks
        if dev:
            self._record_versions()
        # everything a step writes (version counters bumped after it) and its byte spans
        self.written = [
            *self.params,
            *(x[1] for row in self.slots for x in row),
            *(self.steps or ()),
            *(x for h in self.host for x in h[1]),
        ]
        w = self.written
        lo = np.fromiter((x.data_ptr() for x in w), np.int64, len(w))
        size = np.fromiter((x.nbytes for x in w), np.int64, len(w))
        self.wlo, self.whi = lo[size > 0], (lo + size)[size > 0]
        # what ``check`` reads per parameter, as Python values: (param, shape, bytes, address,
        # state, slots as (key, tensor, address, dtype, itemsize, bytes), step count and its
        # address, host state as (key, tensor, address))
        step_ptrs = [None] * len(self.params) if self.step_ptrs is None else self.step_ptrs.tolist()
        self.rows = tuple(
            (
                p,
                self.shapes[i],
                int(self.nbytes[i]),
                self.pptrs[i],
                self.states[i],
                tuple(
                    (n, a, ptr, dt, sz, shp, sz * a.numel())
                    for n, a, ptr, dt, sz, shp in self.slots[i]
                ),
                None if self.steps is None else self.steps[i],
                step_ptrs[i],
                tuple((name, ts[i], int(ptrs[i])) for name, ts, ptrs in self.host),
            )
            for i, p in enumerate(self.params)
        )
        return self

    def _record_versions(self) -> None:
        """The version counters of the device step counts and host state after our step."""
        if self.steps is not None:
            self.step_vers = [s._version for s in self.steps]
        self.host_vers = [x._version for _, ts, _ in self.host for x in ts]

    @staticmethod
    def written_spans(cached: Sequence[Steady]) -> tuple[np.ndarray, np.ndarray] | None:
        """``(lo, hi)``: the byte spans written by the cached groups ``cached``, sorted, or
        None when two of them overlap (then the full checks say which)."""
        if not cached:
            return np.empty(0, np.int64), np.empty(0, np.int64)
        lo = np.concatenate([c.wlo for c in cached])
        hi = np.concatenate([c.whi for c in cached])
        order = np.argsort(lo, kind="stable")
        lo, hi = lo[order], hi[order]
        if (hi[:-1] > lo[1:]).any():
            return None
        return lo, hi

    def grads_clear(self, lo: np.ndarray, hi: np.ndarray) -> bool:
        """Does no gradient of this group (its addresses in the table, checked by ``check``)
        share a byte with a written span ``[lo, hi)`` (sorted, disjoint)?"""
        if lo.size == 0:
            return True
        glo = self.table[:, 2]
        ghi = glo + self.nbytes
        j = np.searchsorted(hi, glo, side="right")  # the first span ending after each start
        inside = j < lo.size
        return not (inside & (lo[np.minimum(j, lo.size - 1)] < ghi) & (self.nbytes > 0)).any()

    def entries(self) -> list[tuple[Any, torch.Tensor, bool, tuple[int, int]]]:
        """The overlap entries (``_memory.check_no_overlap``) of this group's next step."""
        out = []
        for i, p in enumerate(self.params):
            label = (
                f"parameter {i if self.idx is None else self.idx[i]} of param group {self.index}"
            )
            tensors: list[tuple[Any, Any, bool]] = [(label, p, True)]
            if p.grad is not None:
                tensors.append(((label, ".grad"), p.grad, False))
            tensors += [((label, f"state {x[0]!r}"), x[1], True) for x in self.slots[i]]
            if self.steps is not None:
                tensors.append(((label, "state 'step'"), self.steps[i], True))
            tensors += [((label, f"state {name!r}"), ts[i], True) for name, ts, _ in self.host]
            out += [(lbl, t, w, byte_span(t)) for lbl, t, w in tensors]
        return out

    def check(
        self, opt: Any, group: dict[str, Any], spec: Rule, hp: dict[str, Any], scaled: bool = False
    ) -> tuple[Any, Any, Any] | None:
        """``(k, hs, new_hs)``, this step's host scalars, host state before it and after it,
        when every tensor is still the one cached and still backed by its storage (see the
        module docstring), else None. Writes the gradients' addresses into the table.
        ``scaled``: the step's CPU launch multiplies the gradients by a host factor."""
        plist = group["params"]
        was_scaled = self.io is not None and self.io.scale is not None
        if (
            (self.dl is None and scaled != was_scaled)
            or group is not self.group
            or plist is not self.plist
            or (self.idx is None and len(plist) != len(self.params))
            or opt.state is not self.container
        ):
            return None
        if self.idx is not None:  # a part: its parameters, by their places in the group
            try:
                plist = [plist[j] for j in self.idx]
            except IndexError:
                return None
        t = self.t + 1 if self.steps is not None else self.t
        dt, state, isz, masters = self.dtype, opt.state, self.isz, self.masters
        mkey = MASTER_REMAINDER if self.io is not None and self.io.remainder else MASTER
        device, vers = self.device, self.step_vers
        plain = _PLAIN
        gptrs = []
        try:  # an opaque tensor (sparse, MKL-DNN) raises on its storage; a key deleted from
            # the state raises KeyError: the full path says what is wrong
            for i, (p, (q, shape, nb, pptr, st, slots, s, sptr, hosts)) in enumerate(
                zip(plist, self.rows)
            ):
                g = p.grad
                if (
                    p is not q
                    or type(g) not in plain  # None too
                    or g.dtype is not dt
                    or g.shape != shape
                    or not g.is_contiguous()
                    or g.device != device
                    or g.is_neg()
                    or g.untyped_storage().nbytes() < g.storage_offset() * isz + nb
                    or p.data_ptr() != pptr
                    or p.shape != shape
                    or p.dtype is not dt
                    or not p.is_contiguous()
                    or p.untyped_storage().nbytes() < p.storage_offset() * isz + nb
                    or state.get(p) is not st
                ):
                    return None
                for name, buf, ptr, bdt, bsz, bshape, bnb in slots:
                    if (
                        st[name] is not buf
                        or buf.data_ptr() != ptr
                        or buf.shape != bshape
                        or buf.dtype is not bdt
                        or not buf.is_contiguous()
                        or buf.untyped_storage().nbytes() < buf.storage_offset() * bsz + bnb
                    ):
                        return None
                if masters is not None:
                    rec = masters[i]
                    if rec[0] is not st.get(mkey) or rec[2] != p._version:
                        return None  # written since our step: the full path re-syncs the master
                elif st is not None and (MASTER in st or MASTER_REMAINDER in st):
                    return None
                if s is not None and (
                    st["step"] is not s
                    or (sptr is not None and s.data_ptr() != sptr)
                    or (vers is not None and s._version != vers[i])
                    or s.untyped_storage().nbytes() < s.storage_offset() * 4 + 4
                ):
                    return None
                for name, x, ptr in hosts:
                    if (
                        st[name] is not x
                        or x.data_ptr() != ptr
                        or x.untyped_storage().nbytes() < x.storage_offset() * 4 + 4
                    ):
                        return None
                gptrs.append(g.data_ptr())
        except (KeyError, NotImplementedError, RuntimeError):
            return None
        # the step counts and host state, read back through their (re-checked) addresses
        if self.step_ptrs is not None and not (read_at(self.step_ptrs) == self.t).all():
            return None
        hs = new_hs = None
        if self.host_vers is not None:
            # on the device: unwritten since our step, the values the device scalars hold
            if [x._version for _, ts, _ in self.host for x in ts] != self.host_vers:
                return None
            hs = self.hs0
        elif self.host:
            values = read_at(self.host_ptrs).reshape(len(self.host), -1)
            if not (values == values[:, :1]).all():
                return None  # not every parameter's own (or NaN): the full path buckets them
            hs = {name: float(values[j, 0]) for j, (name, _, _) in enumerate(self.host)}
        try:
            flags, k = spec.variant_and_scalars(hp, t, hs)
            if self.host and self.host_vers is None:
                new_hs = spec.advance_host_state(hp, t, hs)
        except (ArithmeticError, ValueError):
            return None  # the full path refuses it with a clear error
        if self.dl is not None and self.dl.ds is not None and spec.device_flags is not None:
            flags = spec.device_flags(hp)  # the device's variant, whatever the step
        if flags != self.flags:
            return None
        if self.dl is not None:
            self.dl.mt.set_column("grad", gptrs)  # the device copy refreshed if one moved
        else:
            self.table[:, 2] = gptrs
        return k, hs, new_hs

    def run(
        self,
        spec: Rule,
        hp: dict[str, Any],
        k: Any,
        hs: Any,
        new_hs: Any,
        amp: Any,
        kt: int | None = None,
    ) -> None:
        """The launch ``check`` cleared, then the step counts and the host state advanced and
        the version counters of everything written bumped. ``amp``: the step's
        ``_device.Amp`` (the host factor of a CPU launch; a GPU launch's device inputs);
        ``kt``: the step stochastic rounding's key hashes where it is not the step count
        (``FusedOptimizer._key_step``)."""
        t = self.t + 1 if self.steps is not None else self.t
        kt = t if kt is None else kt
        inv_scale = amp.inv_scale
        on_device = self.dl is not None and self.dl.ds is not None
        if self.dl is not None:
            hosts = {name: list(ts) for name, ts, _ in self.host} if on_device else None
            self.dl(
                spec, self.flags, k, kt, hp, self.group.get("lr"), amp,
                list(self.steps) if on_device and self.steps else [], self.device, hosts,
            )  # fmt: skip
        elif self.io is None:
            numba_backend.launch_many(
                spec.name, self.flags, self.used, self.np_dtype, self.table, self.chunks, k
            )
        elif self.io.quant:
            from ._quantized import launch

            key = storage.step_key(self.seed, kt)
            args = (spec.name, self.flags, self.used, self.io, self.table, self.chunks, k)
            launch(*args, inv_scale, key)
        else:
            numba_backend.launch_many_io(
                spec.name,
                self.flags,
                self.used,
                self.io,
                self.table,
                self.chunks,
                k,
                inv_scale=1.0 if inv_scale is None else inv_scale,
                key=storage.step_key(self.seed, kt),
            )
        if self.steps is not None:
            if self.step_ptrs is not None:
                numba_backend.add_at(self.step_ptrs, 1.0)
            self.t += 1
        if self.host and not on_device:
            for name, _, ptrs in self.host:
                numba_backend.fill_at(ptrs, new_hs[name])
        torch.autograd.graph.increment_version(self.written)
        if on_device:
            self._record_versions()
        if self.masters is not None:
            for p, rec in zip(self.params, self.masters):
                rec[2] = p._version


class SteadyParts:
    """A param group stepped in several launches (parameters of several dtypes, step counts,
    master copies or host states: one per ``_Bucket`` of its checked step), cached as one
    ``Steady`` per launch (``Steady.build(..., part=True)``: each knows its parameters' places
    in the group) that together hold every parameter of the group once. A steady step re-checks
    each part as a whole group's is re-checked (its table kept, its step counts read back or,
    on the device, re-checked by version) and runs them in order: no table is rebuilt."""

    __slots__ = ("index", "params", "parts", "whi", "wlo")

    def __init__(self, parts: tuple[Steady, ...]) -> None:
        self.parts = parts
        self.index = parts[0].index
        self.params = tuple(p for s in parts for p in s.params)
        self.wlo = np.concatenate([s.wlo for s in parts])
        self.whi = np.concatenate([s.whi for s in parts])

    @classmethod
    def build(cls, parts: list[Steady | None], plist: list[Any]) -> SteadyParts | None:
        """The parts, or None when one could not be cached or they do not hold every
        parameter of the group exactly once (one had no gradient)."""
        if any(p is None for p in parts):
            return None
        done = tuple(p for p in parts if p is not None)
        if not done:
            return None
        places = sorted(j for p in done for j in p.idx)
        if places != list(range(len(plist))):
            return None
        return cls(done)

    def grads_clear(self, lo: Any, hi: Any) -> bool:
        return all(s.grads_clear(lo, hi) for s in self.parts)

    def entries(self) -> list[Any]:
        return [e for s in self.parts for e in s.entries()]

    def check(self, opt: Any, group: Any, spec: Any, hp: Any, scaled: bool = False) -> Any:
        """``(checks,)``: each part's ``Steady.check``, or None when one fails (or the group
        holds other parameters now)."""
        if len(group["params"]) != len(self.params):
            return None
        out = []
        for s in self.parts:
            c = s.check(opt, group, spec, hp, scaled)
            if c is None:
                return None
            out.append(c)
        return (out,)

    def run(self, spec: Any, hp: Any, checks: Any, amp: Any, kt: Any = None) -> None:
        for s, (k, hs, new_hs) in zip(self.parts, checks):
            s.run(spec, hp, k, hs, new_hs, amp, kt)
