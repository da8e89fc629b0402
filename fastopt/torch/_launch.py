"""The launches of one bucket of a ``fastopt.torch`` step outside the GPU tables
(``_device``): on the CPU (numba) one parallel loop over a table of the tensors' lengths and
addresses (``numba_backend.launch_many``; ``launch_many_io`` for a storage format: 16-bit
storage, a master copy, a loss scale; quantized state through ``_quantized``), else one launch
per tensor (the numpy backend, a GPU bucket outside the tables, tensors that are not contiguous
through contiguous copies written back)."""

from typing import Any

import numpy as np
import torch

from .._arrays import as_xp_array
from ..functional import Launch
from ..kernels import storage
from . import _quantized
from ._groups import ParamGroups
from ._memory import address_table as _address_table

#: the plain dtypes: one many-tensor launch on the CPU
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


class Launcher(ParamGroups):
    """The CPU and per-tensor launches of a ``FusedOptimizer`` bucket (the module
    docstring)."""

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
