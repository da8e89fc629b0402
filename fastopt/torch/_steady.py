"""The steady state of a CPU step of ``fastopt.torch``: a param group stepped before, over the
same tensors, relaunched from its cached address table after re-checks that cost a few
attribute reads per tensor.

After a fully checked step of a group (``FusedOptimizer._plan_group``) that went through one
many-tensor launch (the numba backend; every parameter had a gradient), the group keeps a
``Steady``: its parameters, their state dicts, state tensors and master copies, each tensor's
address, shape and dtype, the step count, the host state's 0-d tensors (NAdam's ``mu_product``,
ASGD's ``eta`` and ``mu``), the variant and the storage plan (16-bit storage, a master copy, a
loss scale: ``kernels.storage.IO``, None for plain float32/float64).
The next step re-checks every one of these by identity, address, shape, dtype and contiguity,
and each gradient by dtype, shape, layout, contiguity and device (its address goes into the
table); the step count is read back from each step tensor and the host state from the first
parameter's (as the full path reads it), so an edit in place is seen; a step
with a loss scale only follows one with a loss scale (the scale's value is the step's own). Any
difference and ``check`` returns None: the step takes the full path, which rebuilds the cache.
A state dict loaded, a parameter moved (``.to()``), a gradient set to None, a hyperparameter
that changes the variant: each ends the steady state.
"""

import numpy as np
import torch

from ..backends import numba_backend
from ..kernels import storage


class Steady:
    """One param group's cached launch (see the module docstring)."""

    __slots__ = (
        "chunks",
        "container",
        "device",
        "dtype",
        "flags",
        "group",
        "host",
        "io",
        "np_dtype",
        "params",
        "plist",
        "pptrs",
        "shapes",
        "slots",
        "states",
        "step_ptrs",
        "steps",
        "t",
        "table",
        "used",
    )

    @classmethod
    def build(cls, opt, group, spec, t, flags, used, tensors, table, chunks, np_dtype, io=None):
        """The cache of a group just launched through ``table`` (with the storage plan ``io``,
        None for a plain launch), or None where the group's step cannot be repeated this way (a
        parameter without a gradient, step counts or host state that are not float32 CPU
        scalars)."""
        from . import float32_scalars

        plist = group["params"]
        if len(tensors) != len(plist):
            return None
        self = cls()
        self.group, self.plist, self.container = group, plist, opt.state
        self.params = tuple(p for p, _, _, _ in tensors)
        if any(a is not b for a, b in zip(self.params, plist)):
            return None
        p0 = self.params[0]
        self.dtype, self.device, self.np_dtype = p0.dtype, p0.device, np_dtype
        self.shapes = tuple(p.shape for p in self.params)
        self.pptrs = tuple(int(r) for r in table[:, 1])
        self.states = tuple(opt.state.get(p) for p in self.params)  # None: no state (SGD)
        names = spec.state
        # (state key, tensor, address, dtype) of every state tensor the launch touches
        self.slots = tuple(
            tuple(
                (names[j], a, a.data_ptr(), a.dtype) for j, a in enumerate(slots) if a is not None
            )
            + (() if m is None else (("master_param", m, m.data_ptr(), m.dtype),))
            for _, _, slots, m in tensors
        )
        self.io = io
        steps = [None if st is None else st.get("step") for st in self.states]
        if all(s is None for s in steps):
            # no step count (SGD): every step after the first is step 2 (its fresh buffers
            # exist), as ``_plan_group`` counts
            self.steps, self.step_ptrs, t = None, None, 2
        elif float32_scalars(steps):
            self.steps = tuple(steps)
            self.step_ptrs = np.array([s.data_ptr() for s in steps], dtype=np.int64)
        else:
            return None
        # the host state: (name, each parameter's 0-d tensor, their addresses)
        host = []
        for name in spec.host_names:
            ts = [None if st is None else st.get(name) for st in self.states]
            if not float32_scalars(ts):
                return None
            host.append((name, tuple(ts), np.array([x.data_ptr() for x in ts], dtype=np.int64)))
        self.host = tuple(host)
        self.t, self.flags, self.used = t, flags, used
        self.table, self.chunks = table, chunks
        return self

    def check(self, opt, group, spec, hp, inv_scale=None):
        """``(k, hs)``, this step's host scalars and host state before it, when every tensor is
        still the one cached (see the module docstring), else None. Writes the gradients'
        addresses into the table."""
        plist = group["params"]
        scaled = self.io is not None and self.io.scale is not None
        if (
            (inv_scale is not None) != scaled
            or group is not self.group
            or plist is not self.plist
            or len(plist) != len(self.params)
            or opt.state is not self.container
        ):
            return None
        t = self.t + 1 if self.steps is not None else self.t
        if not self.host:  # without host state the variant is known before the tensors
            flags, k = spec.plan(hp, t, None)
            if flags != self.flags:
                return None
        dt, dev, state = self.dtype, self.device, opt.state
        master = self.io is not None and self.io.master
        gptrs = []
        for i, p in enumerate(plist):
            shape = self.shapes[i]
            g = p.grad
            if (
                p is not self.params[i]
                or g is None
                or g.dtype is not dt
                or g.shape != shape
                or g.layout is not torch.strided
                or not g.is_contiguous()
                or g.device != dev
                or p.data_ptr() != self.pptrs[i]
                or p.shape != shape
                or p.dtype is not dt
                or not p.is_contiguous()
            ):
                return None
            st = self.states[i]
            if state.get(p) is not st or (st is not None and ("master_param" in st) != master):
                return None
            for name, buf, ptr, bdt in self.slots[i]:
                if (
                    st.get(name) is not buf
                    or buf.data_ptr() != ptr
                    or buf.shape != shape
                    or buf.dtype is not bdt
                    or not buf.is_contiguous()
                ):
                    return None
            if self.steps is not None:
                s = self.steps[i]
                if (
                    st.get("step") is not s
                    or s.data_ptr() != self.step_ptrs[i]
                    or float(s) != self.t
                ):
                    return None
            for name, ts, ptrs in self.host:
                x = ts[i]
                if st.get(name) is not x or x.data_ptr() != ptrs[i]:
                    return None
            gptrs.append(g.data_ptr())
        hs = None
        if self.host:
            hs = {name: float(ts[0]) for name, ts, _ in self.host}
            flags, k = spec.plan(hp, t, hs)
            if flags != self.flags:
                return None
        self.table[:, 2] = gptrs
        return k, hs

    def run(self, spec, hp, k, hs, inv_scale=None):
        """The launch ``check`` cleared, then the step counts and the host state advanced."""
        t = self.t + 1 if self.steps is not None else self.t
        if self.io is None:
            numba_backend.launch_many(
                spec.name, self.flags, self.used, self.np_dtype, self.table, self.chunks, k
            )
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
                key=storage.step_key(0, t),
            )
        if self.steps is not None:
            numba_backend.add_at(self.step_ptrs, 1.0)
            self.t += 1
        if self.host:
            new = spec.advance_host_state(hp, t, hs)
            for name, _, ptrs in self.host:
                numba_backend.fill_at(ptrs, new[name])
