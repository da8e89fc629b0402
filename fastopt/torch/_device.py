"""The GPU path of ``fastopt.torch``: one multi-tensor launch per (param group, device, storage
plan, variant), the loss scale, found-inf flag and clip coefficient read on the device.

A bucket of a checked step (``FusedOptimizer._plan_group``) whose backend has ``launch_table``
(CuPy, numba-cuda) is launched once over a ``_launch.TensorTable`` of its tensors (lengths and
addresses of param, grad, state slots and master copy, ``kernels.multi_tensor``), built by
``be.tensor_table`` and kept with the group's cached launch (``_steady.Steady``): a steady step
re-checks the tensors as the CPU path does and writes only the gradients' column
(``TensorTable.set_column``), so the device copy of the table is refreshed only when a gradient
moved.

``Amp`` is what a step carries besides the hyperparameters: the host factor ``inv_scale``
(1/grad_scale read on the host, times the clip coefficient on the CPU), or on the device
GradScaler's ``grad_scale`` and ``found_inf`` tensors (read inside the kernels: no host
synchronisation), and the device ``[norm, clip_coef]`` of ``max_grad_norm`` (``GradNorm`` over
the step's gradients, one reduction pass per gradient dtype before the updates).

Groups on a GPU whose rule's variant does not depend on the step (and every
``capturable=True`` group; ``FusedOptimizer._device_scalars``) keep their step counts on the
device (float32 0-d tensors on the parameter's device, as torch's fused and capturable
optimizers do) and compute the host scalars there (``fastopt._capture.DeviceScalars``, one per
cached launch): the step advances unless the found-inf flag is set, torch's step tensors are
advanced by ``_foreach_add_``/``_foreach_sub_`` on the device as torch's fused step does, and a
learning rate held in a device tensor is copied into the scalars' control array on the device.
Nothing in such a step reads device memory on the host, so it can be captured by
``torch.cuda.graph`` and replayed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from ..kernels import storage

__all__ = ["Amp", "DeviceLaunch", "flat", "launch", "stream_context", "stream_of"]


@dataclasses.dataclass
class Amp:
    """The loss-scale, found-inf and clipping inputs of one step (see the module docstring)."""

    inv_scale: float | None = None
    scale: Any = None
    found_inf: Any = None
    #: the device ``GradNorm`` of the step's CUDA gradients (None: no clipping on the device)
    norm: Any = None

    def clip_for(self, compute: str) -> Any:
        return None if self.norm is None else self.norm.coef(compute)


def flat(t: torch.Tensor) -> Any:
    """A 1-element view of a 0-d or 1-element tensor (the kernels index ``[0]``): the tensor
    on a GPU, a NumPy view on the CPU (a fake's device, the simulator)."""
    v = t.detach().reshape(-1)
    return v.numpy() if v.device.type == "cpu" else v


def stream_context(device: torch.device) -> Any:
    """CuPy's current device and stream set to ``device`` and torch's current stream on it
    (the device scalars are made there, the scalar kernel and ``ctl`` writes follow the
    stream); a no-op elsewhere."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    import cupy

    from ..backends.cupy_backend import _stream_for

    stack = contextlib.ExitStack()
    index = device.index if device.index is not None else torch.cuda.current_device()
    stack.enter_context(cupy.cuda.Device(index))
    st = _stream_for(torch.cuda.current_stream(device).cuda_stream)
    if st is not None:
        stack.enter_context(st)
    return stack


def stream_of(device: torch.device) -> int | None:
    """torch's current stream handle on a CUDA ``device`` (None elsewhere: a fake's device)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.current_stream(device).cuda_stream)


def io_of(base: storage.IO, amp: Amp, kbuf: bool) -> storage.IO:
    """The storage format of one launch: ``base`` (the tensors' storage dtypes and master copy)
    with this step's extras."""
    scale = "device" if amp.scale is not None else ("host" if amp.inv_scale is not None else None)
    return dataclasses.replace(base, scale=scale, found_inf=amp.found_inf is not None, kbuf=kbuf)


class DeviceLaunch:
    """What a GPU bucket keeps from step to step: the backend module ``be``, its table ``mt``,
    the storage format ``base`` (no extras) and, for a capturable group, the device scalars
    ``ds``, the step tensors ``steps`` and the index of ``lr`` in ``ds.ctl``."""

    def __init__(
        self, be: Any, mt: Any, base: storage.IO, like: Any, ds: Any = None, lr_at: int = -1
    ) -> None:
        self.be, self.mt, self.base, self.ds, self.lr_at = be, mt, base, ds, lr_at
        #: a tensor on the table's device: its producer (torch's current stream) orders the
        #: scalar kernel
        self.like = like
        self._ctl_view: Any = None

    def ctl_view(self) -> torch.Tensor:
        """``ds.ctl`` as a torch tensor (the same device memory)."""
        if self._ctl_view is None:
            ctl = self.ds.ctl
            self._ctl_view = (
                torch.from_numpy(ctl) if type(ctl).__module__ == "numpy" else torch.as_tensor(ctl)
            )
        return self._ctl_view

    def __call__(
        self,
        spec: Any,
        flags: Any,
        k: Any,
        t: int,
        hp: Any,
        lr: Any,
        amp: Amp,
        steps: list[torch.Tensor],
        device: torch.device,
        hosts: dict[str, list[torch.Tensor]] | None = None,
    ) -> None:
        """One step: (capturable) the scalars on the device, then the update launch, then the
        device step tensors advanced unless found-inf and the host state tensors ``hosts``
        (NAdam's ``mu_product``) copied from the device scalars (the host step counts and
        host state of a step that is not capturable are the caller's)."""
        ds = self.ds
        stream = stream_of(device)
        io = io_of(self.base, amp, ds is not None)
        found = None if amp.found_inf is None else flat(amp.found_inf)
        extras: dict[str, Any] = {}
        if amp.inv_scale is not None:
            extras["inv_scale"] = amp.inv_scale
        if amp.scale is not None:
            extras["scale"] = flat(amp.scale)
        if found is not None:
            extras["found_inf"] = found
        if ds is not None:
            with stream_context(device):  # CuPy's current stream: torch's
                ds.upload(hp)
                if isinstance(lr, torch.Tensor) and lr.device == device:
                    # a device lr: copied on the device (ctl is float64), never read
                    self.ctl_view()[self.lr_at].copy_(lr.reshape(()), non_blocking=True)
                ds.advance(self.like, found)
            for name, ts in (hosts or {}).items():  # the host state after the step (or kept)
                src = self.ctl_view()[ds.program.hs_index[name]]
                torch._foreach_copy_(ts, [src] * len(ts))
            extras.update(ds.extras(io.compute, found))
        else:
            extras["key"] = storage.step_key(0, t)
        self.be.launch_table(
            spec.name, flags, io, self.mt, k, extras=extras, clip=amp.clip_for(io.compute),
            stream=stream,
        )  # fmt: skip
        if ds is not None and steps:
            torch._foreach_add_(steps, 1)
            if amp.found_inf is not None:
                torch._foreach_sub_(steps, [amp.found_inf.reshape(())] * len(steps))


def launch(
    be: Any,
    spec: Any,
    flags: Any,
    k: Any,
    t: int,
    hp: Any,
    lr: Any,
    base: storage.IO,
    tensors: list[Any],
    amp: Amp,
    steps: list[torch.Tensor],
    device: torch.device,
    capturable: bool,
    step0: int,
    hs: Any,
    hosts: dict[str, list[torch.Tensor]] | None = None,
) -> DeviceLaunch:
    """The first launch of a GPU bucket: its table (and device scalars), then the step;
    returns the ``DeviceLaunch`` for the group's cache."""
    from .._capture import DeviceScalars

    mt = be.tensor_table(spec.name, base, tensors)
    ds, lr_at = None, -1
    like = _cupy_like(tensors[0][0])
    if capturable:
        with stream_context(device):
            ds = DeviceScalars(be, spec.name, hp, step0, hs, 0, like)
        lr_at = 1 + _offset(spec, "lr")
    dl = DeviceLaunch(be, mt, base, like, ds, lr_at)
    dl(spec, flags, k, t, hp, lr, amp, steps, device, hosts)
    return dl


def _cupy_like(t: torch.Tensor) -> Any:
    """A small float32 array on ``t``'s device, of the array module ``DeviceScalars``
    allocates with (NumPy for a CPU tensor: a fake's device, the simulator; CuPy on a GPU)."""
    if t.device.type == "cpu":
        return np.zeros(1, np.float32)
    import cupy

    return cupy.from_dlpack(torch.zeros(1, dtype=torch.float32, device=t.device))


def _offset(spec: Any, name: str) -> int:
    """The index of hyperparameter ``name`` among the numeric ones of ``ctl``
    (``kernels.device_scalars.ctl_values``: every hyperparameter's entries in order)."""
    j = 0
    for h in spec.hyper:
        if h.name == name:
            return j
        j += h.size
    raise KeyError(name)
