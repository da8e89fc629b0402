"""CuPy backend: the rule's CUDA C body (``kernels/*.cu``) compiled once per flag variant.

A variant is the body behind one ``#define`` per flag (``kernels.cuda_source``): branch-free,
reading each array once and writing param and the state it uses once. Two kernel forms exist:

- ``"raw"`` (default): a ``RawKernel`` with a grid-stride loop over 16-byte vectors (4 x
  float32, 2 x float64) and a scalar tail (``cuda_source.raw_source``), used when every buffer
  is 16-byte aligned (FlatBuffer segments always are), else its scalar form. The grid is one
  full wave of resident blocks, sized from the compiled kernel's register count.
- ``"elementwise"``: a ``cupy.ElementwiseKernel`` around the same body (scalar loads).

``KERNEL_FORM`` (from ``FASTOPT_CUPY_KERNEL``, default ``"raw"``) picks one. A launch with a
mixed-precision storage format (``kernels.storage.IO``: 16-bit or mixed storage dtypes, a master
copy, stochastic rounding, a loss scale, device-held scalars of a capturable step) always runs
the raw form generated for that format (``cuda_source.mixed_source``: W elements per trip, W = 16
bytes over the narrowest element, 8 for any 16-bit array). Kernels are compiled
once per (variant, dtype, width); the host scalars are kernel arguments (NumPy scalars of the
buffer dtype, so float32 kernels stay float32), so a new lr or step never recompiles. A launch
runs on the array's device and on its producer's stream: CuPy's current stream for CuPy arrays,
PyTorch's current stream for tensors (``_launch.producer_stream``).

A list of tensors steps in one launch (``tensor_table``, ``launch_table``: the multi-tensor
kernels of ``kernels.multi_tensor`` over a checked table of the tensors' addresses in device
memory), optionally clipped by the global gradient norm computed on the device (``GradNorm``).

Arrays must already be on the GPU: CuPy arrays, or any ``__cuda_array_interface__`` / DLPack
producer (Numba device arrays, PyTorch CUDA tensors, also ones that require grad), viewed by
CuPy without a copy and updated in place.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np

from ..kernels import RULES, cuda_source
from . import _launch, protocol

__all__ = [
    "DEVICE",
    "KERNEL_FORM",
    "KERNEL_FORMS",
    "MAX_TABLE_BLOCKS",
    "NAME",
    "FixedLaunch",
    "GradNorm",
    "available",
    "cuda_source_for",
    "kernel",
    "launch",
    "launch_table",
    "raw_kernel",
    "table_arguments",
    "table_kernel",
    "tensor_table",
    "why_unavailable",
]

NAME = "cupy"
DEVICE = "cuda"
#: steps quantized state slots (``kernels/quant.py``, ``IO.quant``: ``cupy_quant``)
QUANT_STATE = True
#: ``tensor_table`` takes a quantized slot as a ``(codes, absmax)`` pair, ``launch_table``
#: steps it (``cupy_quant.launch_table``)
QUANT_TABLE = True
#: and the packed ones (``kernels.quant.PACKED``: two codes per byte, a thread per byte:
#: ``cupy_quant``), in a step and in a table
QUANT_PACKED = True

try:
    import cupy
except ImportError as _exc:
    cupy = None
    _import_error = f"cupy cannot be imported: {_exc} (install fastopt[cuda12] or fastopt[cuda13])"
else:
    _import_error = ""

#: the kernel forms this backend can launch (see the module docstring)
KERNEL_FORMS = ("raw", "elementwise")
KERNEL_FORM = os.environ.get("FASTOPT_CUPY_KERNEL", "raw")
if KERNEL_FORM not in KERNEL_FORMS:
    raise ImportError(f"FASTOPT_CUPY_KERNEL={KERNEL_FORM!r}; expected one of {KERNEL_FORMS}")

_kernels: dict[Any, Any] = {}
_raw: dict[Any, Any] = {}
_grid: dict[Any, Any] = {}  # (raw kernel key, device id) -> resident blocks per SM x SMs
_streams: dict[Any, Any] = {}  # stream handle -> cupy.cuda.ExternalStream
_device_error = None


def _probe():
    global _device_error
    if _device_error is None:
        try:
            n = cupy.cuda.runtime.getDeviceCount()
            _device_error = "" if n > 0 else "CUDA reports no GPU (getDeviceCount() == 0)"
        except Exception as exc:  # no driver, driver too old for the runtime, ...
            _device_error = f"no usable CUDA GPU: {exc}"
    return _device_error


def available():
    return cupy is not None and _probe() == ""


def why_unavailable():
    if cupy is None:
        return _import_error
    return _probe()


def _key(rule, flags):
    return rule, tuple(sorted((k, bool(v)) for k, v in flags.items()))


def kernel(rule, flags):
    """The ``cupy.ElementwiseKernel`` of one variant (built once; CuPy compiles per dtype)."""
    key = _key(rule, flags)
    k = _kernels.get(key)
    if k is None:
        in_p, out_p, op, name, pre = cuda_source.elementwise_args(rule, flags)
        k = _kernels[key] = cupy.ElementwiseKernel(
            in_p, out_p, op, name, preamble=pre, no_return=True
        )
    return k


def cuda_source_for(rule, flags, dtype, index_32_bits=True):
    """The complete CUDA source CuPy compiles for one variant and dtype, and the NVRTC options
    it compiles with (without the ``-arch``), built without a GPU (for compile checks).

    Uses CuPy's own code generator for a 1-D contiguous launch, so the text is what CuPy runs;
    ``index_32_bits=False`` is the form CuPy picks for arrays of 2**31 elements or more.
    Returns ``(source, options)``."""
    if cupy is None:
        raise RuntimeError(_import_error)
    from cupy._core import _carray, _kernel
    from cupy._core import core as _core

    dtype = np.dtype(dtype)
    in_p, out_p, op, name, pre = cuda_source.elementwise_args(rule, flags)
    ek = cupy.ElementwiseKernel(in_p, out_p, op, name, preamble=pre, no_return=True)
    ndarray, indexer, scalar = 1, 2, 3  # CuPy's _ArgInfo kinds
    infos = []
    for p in ek.params[:-1]:
        if p.name in RULES[rule].scalars:
            infos.append(_kernel._ArgInfo(scalar, dtype.type, dtype, 0, True, index_32_bits))
        else:
            infos.append(_kernel._ArgInfo(ndarray, cupy.ndarray, dtype, 1, True, index_32_bits))
    infos.append(_kernel._ArgInfo(indexer, _carray.Indexer, None, 1, True, index_32_bits))
    type_map = _kernel._TypeMap((("T", dtype.type),))
    code = _kernel._get_elementwise_kernel_code(tuple(infos), type_map, ek.params, op, name, pre)
    headers = "\n".join(f"#include <{h}>" for h in _core._cupy_header_list)
    options = _core.assemble_cupy_compiler_options(()) + ("--device-as-default-execution-space",)
    return headers + "\n" + code, options


def raw_kernel(rule, flags, dtype, width):
    """The ``cupy.RawKernel`` of one variant, dtype and vector width (built once)."""
    dtype = np.dtype(dtype)
    key = _key(rule, flags) + (dtype.name, width)
    k = _raw.get(key)
    if k is None:
        src = cuda_source.raw_source(rule, flags, cuda_source.CTYPES[dtype.name], width)
        k = _raw[key] = cupy.RawKernel(src, cuda_source.kernel_name(rule))
    return k


def _waves(key, k):
    dev = cupy.cuda.Device()
    slot = (key, dev.id)
    blocks = _grid.get(slot)
    if blocks is None:
        sms = dev.attributes["MultiProcessorCount"]
        blocks = _grid[slot] = sms * _launch.blocks_per_sm(k.num_regs, _launch.THREADS)
    return blocks


def _as_cupy(a, what):
    if isinstance(a, cupy.ndarray):
        return a
    a = _launch.plain_view(a)
    if hasattr(a, "__cuda_array_interface__"):
        return cupy.asarray(a)  # a view of the same device memory, no copy
    if hasattr(a, "__dlpack__"):
        return cupy.from_dlpack(a)
    raise TypeError(
        f"{what}: expected a GPU array (CuPy, __cuda_array_interface__ or DLPack), "
        f"got {type(a).__name__}"
    )


def _stream_for(ptr):
    if ptr is None or ptr == cupy.cuda.get_current_stream().ptr:
        return None
    st = _streams.get(ptr)
    if st is None:
        if len(_streams) > 64:  # short-lived streams: do not keep wrappers forever
            _streams.clear()
        with warnings.catch_warnings():
            # CuPy 14 prefers Stream.from_external(obj with __cuda_stream__); a raw handle (all
            # PyTorch and __cuda_array_interface__ give) still needs ExternalStream
            warnings.simplefilter("ignore", DeprecationWarning)
            st = _streams[ptr] = cupy.cuda.ExternalStream(ptr)
    return st


_mixed: dict[Any, Any] = {}
_scalar: dict[Any, Any] = {}


def scalar_kernel(program):
    """The one-thread kernel computing a capturable step's scalars on the device
    (``kernels.device_scalars.c_source``), as ``run(like, ctl, k32, k64, keyp, fi, seed)``
    launched on ``like``'s producer stream."""
    from ..kernels import device_scalars

    src = device_scalars.c_source(program)
    kern = _scalar.get(src)
    if kern is None:
        kern = _scalar[src] = cupy.RawKernel(src, "fastopt_scalars")

    def run(like, ctl, k32, k64, keyp, fi, seed):
        stream = _stream_for(_launch.producer_stream(like))
        args = (ctl, k32, k64, keyp, _as_cupy(fi, "found_inf"), np.uint32(seed))
        with ctl.device:
            if stream is not None:
                with stream:
                    kern((1,), (1,), args)
            else:
                kern((1,), (1,), args)

    return run


def mixed_kernel(rule, flags, io, vector):
    """The ``cupy.RawKernel`` of one variant under the storage format ``io`` (built once)."""
    key = _key(rule, flags) + (io, vector)
    k = _mixed.get(key)
    if k is None:
        src = cuda_source.mixed_source(rule, flags, io, vector=vector)
        k = _mixed[key] = cupy.RawKernel(src, cuda_source.kernel_name(rule))
    return k


def mixed_arguments(rule, flags, io, named, k, extras):
    """The argument tuple of the mixed kernel: the arrays of ``named`` in ``mixed_args`` order,
    the host scalars (or the device buffer holding them) and the extras, typed as the kernel
    declares them (``extras``: host ``inv_scale``, ``salt``, ``key``; device ``kbuf``,
    ``scale``, ``found_inf``, ``keyp``). Built without a GPU (the arrays are passed through)."""
    arrays, scalars = cuda_source.mixed_args(rule, flags, io)
    args = []
    for a, _, _ in arrays:
        if named.get(a) is None:
            raise ValueError(f"{a}: required by {rule} with {flags} and {io}, got None")
        args.append(named[a])
    return args + _scalar_arguments(rule, io, scalars, k, extras)


def _scalar_arguments(rule, io, scalars, k, extras):
    """The values of the kernel arguments ``scalars`` (``[(C type, name)]`` from
    ``cuda_source.mixed_args``), typed as declared (see ``mixed_arguments``)."""
    ct = np.float64 if io.compute == "float64" else np.float32
    host = {
        "inv_scale": lambda: ct(extras["inv_scale"]),
        "salt": lambda: np.uint32(extras.get("salt", 0)),
        "key": lambda: np.uint32(extras.get("key", 0)),
    }
    device = {"kbuf": "kbuf", "gscale": "scale", "found_inf": "found_inf", "keyp": "keyp"}
    rule_scalars = dict(zip(RULES[rule].scalars, k))
    args = []
    for _, n in scalars:
        if n in rule_scalars:
            args.append(ct(rule_scalars[n]))
        elif n in host:
            args.append(host[n]())
        else:
            if extras.get(device[n]) is None:
                raise ValueError(f"{device[n]}: the storage format {io} reads it from the device")
            args.append(extras[device[n]])
    return args


def launch_mixed(rule, flags, param, grad, states, k, io, master=None, extras=None):
    """One launch under the storage format ``io`` (see ``mixed_arguments`` for ``extras``)."""
    extras = extras or {}
    p = _as_cupy(param, "param")
    if p.size == 0:
        return
    named = {"param": p, "grad": _as_cupy(grad, "grad")}
    named["master"] = None if master is None else _as_cupy(master, "master")
    for name, s in zip(RULES[rule].state, states):
        named[name] = None if s is None else _as_cupy(s, name)
    ex = dict(extras)
    for d in ("kbuf", "scale", "found_inf", "keyp"):
        if ex.get(d) is not None:
            ex[d] = _as_cupy(ex[d], d)
    args = mixed_arguments(rule, flags, io, named, k, ex)
    bufs = [a for a in args if isinstance(a, cupy.ndarray) and a.size == p.size]
    vector = all(b.data.ptr % 16 == 0 for b in bufs)
    width = cuda_source.mixed_width(io, rule, flags) if vector else 1
    stream = _stream_for(_launch.producer_stream(param))
    with p.device:
        kern = mixed_kernel(rule, flags, io, vector)
        blocks = _launch.grid_size(p.size // width or 1, 1, _waves(_key(rule, flags) + (io,), kern))
        call = (kern, (blocks,), (_launch.THREADS,), (*args, np.int64(p.size)))
        if stream is not None:
            with stream:
                call[0](*call[1:])
        else:
            call[0](*call[1:])


def launch(rule, flags, param, grad, states, k, io=None, master=None, extras=None):
    if io is not None and io.quant:
        from .cupy_quant import launch_quant

        launch_quant(rule, flags, param, grad, states, k, io, master, extras)
        return
    if io is not None and not io.plain:
        launch_mixed(rule, flags, param, grad, states, k, io, master, extras)
        return
    if KERNEL_FORM == "raw" and _driver is not None and type(param) is _ndarray:
        fixed = _fixed.get(_fixed_key(rule, flags, param, grad, states))
        if fixed is not None:  # the same buffers as a checked launch before: scalars and go
            fixed(k)
            return
    names = RULES[rule].state
    used = cuda_source.slots_used(rule, flags)
    p = _as_cupy(param, "param")
    if p.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"param: dtype {p.dtype}, expected float32 or float64 (16-bit params run with a "
            "storage format: launch(..., io=...))"
        )
    arrays = [_as_cupy(grad, "grad")]
    for name, s, u in zip(names, states, used):
        if not u:
            continue  # this variant never touches the slot: not even a kernel argument
        if s is None:
            raise ValueError(f"{name}: required by {rule} with {flags}, got None")
        arrays.append(_as_cupy(s, name))
    for name, a in zip(("grad",) + tuple(n for n, u in zip(names, used) if u), arrays):
        if a.shape != p.shape or a.dtype != p.dtype or a.device != p.device:
            raise ValueError(
                f"{name}: shape {a.shape} dtype {a.dtype} on {a.device}, expected "
                f"shape {p.shape} dtype {p.dtype} on {p.device} like param"
            )
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}: not C-contiguous; a fused step updates flat memory")
    if not p.flags.c_contiguous:
        raise ValueError("param: not C-contiguous; a fused step updates flat memory")
    if p.size == 0:
        return
    scalar = p.dtype.type
    scalars = tuple(scalar(x) for x in k)
    # the producer's stream: a torch tensor passed straight in orders on torch's current stream
    stream_ptr = _launch.producer_stream(param)
    stream = _stream_for(stream_ptr)
    with p.device:  # run where the data lives, whatever device is current
        if stream is not None:
            with stream:
                _launch_on_device(rule, flags, p, arrays, scalars)
        else:
            _launch_on_device(rule, flags, p, arrays, scalars)
        if KERNEL_FORM == "raw" and _driver is not None and type(param) is _ndarray:
            # checked and launched once: later launches over the same buffers take its fixed
            # launch
            if len(_fixed) >= _MAX_FIXED:
                _fixed.clear()
            if stream_ptr is None:
                stream_ptr = cupy.cuda.get_current_stream().ptr
            _fixed[_fixed_key(rule, flags, param, grad, states)] = _fixed_for(
                rule, flags, p, arrays, stream_ptr
            )


def _launch_on_device(rule, flags, p, arrays, scalars):
    if KERNEL_FORM == "elementwise":
        kernel(rule, flags)(arrays[0], *scalars, p, *arrays[1:])
        return
    k, blocks, _ = _raw_for(rule, flags, p, arrays)
    # argument order of cuda_source.raw_args: grad, param, used state slots, scalars, n
    k((blocks,), (_launch.THREADS,), (arrays[0], p, *arrays[1:], *scalars, np.int64(p.size)))


def _raw_for(rule, flags, p, arrays):
    """(raw kernel, blocks, width) for these buffers on the current device."""
    width = cuda_source.VECTOR_WIDTH[cuda_source.CTYPES[p.dtype.name]]
    if any(a.data.ptr % 16 for a in (p, *arrays)):
        width = 1  # a misaligned buffer: the scalar form of the same kernel
    k = raw_kernel(rule, flags, p.dtype, width)
    key = _key(rule, flags) + (p.dtype.name, width)
    blocks = _launch.grid_size(p.size // width or 1, 1, _waves(key, k))
    return k, blocks, width


# -- fixed launches: the steady state of a step ------------------------------------------------
#
# A step over the same buffers as an earlier, fully checked launch needs nothing but the new
# host scalars. A fixed launch holds the kernel's argument block (the buffers' device pointers,
# the scalars, n) and a pointer to each argument, and launches with one driver call
# (``cuLaunchKernel``), skipping CuPy's per-argument handling. Fixed launches are keyed by
# everything they depend on: the variant, and each buffer's device pointer, size, strides and dtype,
# the device and the stream; so a key can only match buffers the launch is right for. They hold no
# reference to any array (a freed buffer cannot be reached through a key that no live array
# produces).

try:
    from cuda.bindings import driver as _driver
except ImportError:  # cuda-python absent: every launch goes through CuPy
    _driver = None
_ndarray = cupy.ndarray if cupy is not None else None
_fixed: dict[Any, Any] = {}
_MAX_FIXED = 4096


def _fixed_key(rule, flags, param, grad, states):
    arrays = (param, grad) + tuple(s for s in states if s is not None)
    try:
        bufs = tuple((a.data.ptr, a.size, a.strides, a.dtype.char) for a in arrays)
        dev = param.data.device_id
        stream = cupy.cuda.get_current_stream(dev).ptr
    except AttributeError:  # a foreign array: no fixed launch, the checked path converts it
        return None
    return (rule, tuple(flags.items()), dev, stream) + bufs


class FixedLaunch:
    """One raw-kernel launch with everything fixed but the host scalars (see above).

    The argument block is one array of 8-byte slots: the device pointers of the buffers (in
    ``cuda_source.raw_args`` order), the host scalars (a float32 in the low 4 bytes of its slot
    on a little-endian host, a float64 in all 8) and ``n`` as int64; ``pointers`` holds each
    slot's address, which is what ``cuLaunchKernel`` reads the arguments through."""

    def __init__(self, function, blocks, pointers, n_scalars, dtype, n, stream, device):
        n_arr = len(pointers)
        self.values = np.zeros(n_arr + n_scalars + 1, dtype=np.uint64)
        self.values[:n_arr] = pointers
        self.values[-1] = n
        scal = self.values[n_arr : n_arr + n_scalars]
        self.scalars = (
            scal.view(np.float64) if np.dtype(dtype) == np.float64 else scal.view(np.float32)[::2]
        )
        base = self.values.ctypes.data
        self.pointers = np.array([base + 8 * i for i in range(self.values.size)], dtype=np.uint64)
        self._params = self.pointers.ctypes.data
        self.function, self.blocks, self.stream, self.device = function, blocks, stream, device

    def __call__(self, k):
        self.scalars[:] = k  # one cast of the float64 host scalars to the buffer dtype
        if cupy.cuda.runtime.getDevice() != self.device:
            with cupy.cuda.Device(self.device):
                return self._launch()
        return self._launch()

    def _launch(self):
        (err,) = _driver.cuLaunchKernel(
            self.function, self.blocks, 1, 1, _launch.THREADS, 1, 1, 0, self.stream, self._params, 0
        )
        if err != _driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernel failed: {err}")


def _fixed_for(rule, flags, p, arrays, stream_ptr):
    k, blocks, _ = _raw_for(rule, flags, p, arrays)
    ptrs = [arrays[0].data.ptr, p.data.ptr] + [a.data.ptr for a in arrays[1:]]
    return FixedLaunch(
        _driver.CUfunction(k.kernel.ptr),
        blocks,
        ptrs,
        len(RULES[rule].scalars),
        p.dtype,
        p.size,
        _driver.CUstream(stream_ptr),
        p.data.device_id,
    )


# -- multi-tensor launches: one kernel over a table of tensors -----------------------------------
#
# ``kernels.multi_tensor``: the table of a list of tensors (``_launch.TensorTable``: lengths and
# addresses, checked on the host once, kept by the caller with its steady step) and its chunk
# entries live in device memory (any number of tensors: nothing goes through the kernel's
# argument block but the two pointers). ``launch_table`` steps every tensor in one launch, one
# block per chunk; ``GradNorm`` computes the global gradient norm and the clip coefficient
# into device memory, where a launch with ``clip=`` reads it: no host synchronisation.

_mt: dict[Any, Any] = {}
#: blocks of one multi-tensor launch at most (one per chunk below it; a grid-stride loop above)
MAX_TABLE_BLOCKS = 1 << 20


def table_kernel(rule, flags, io, clip=False):
    """The ``cupy.RawKernel`` of one variant's multi-tensor kernel under ``io`` (built once)."""
    from ..kernels import multi_tensor

    key = ("update",) + _key(rule, flags) + (io, bool(clip))
    k = _mt.get(key)
    if k is None:
        src = multi_tensor.source(rule, flags, io, clip=clip)
        k = _mt[key] = cupy.RawKernel(src, multi_tensor.kernel_name(rule))
    return k


def _norm_kernels(grad, acc, scale):
    from ..kernels import multi_tensor

    key = ("norm", grad, acc, scale)
    k = _mt.get(key)
    if k is None:
        src = multi_tensor.norm_source(grad, acc, scale)
        k = _mt[key] = cupy.RawKernel(src, multi_tensor.norm_name(grad, acc, scale))
    return k


def _finish_kernel(acc):
    from ..kernels import multi_tensor

    key = ("finish", acc)
    k = _mt.get(key)
    if k is None:
        k = _mt[key] = cupy.RawKernel(
            multi_tensor.finish_source(acc), multi_tensor.finish_name(acc)
        )
    return k


def _resident_blocks(device_id):
    """Blocks of 256 threads the device holds at once at the 64-register budget of the
    compile checks (4 per multiprocessor): what a table's chunk size is chosen for."""
    sms = cupy.cuda.Device(device_id).attributes["MultiProcessorCount"]
    return sms * _launch.blocks_per_sm(64, _launch.THREADS)


def tensor_table(rule, io, tensors, chunk=None):
    """The checked ``_launch.TensorTable`` of ``tensors`` (``[(param, grad, slots, master)]``,
    CUDA tensors or CuPy arrays of one GPU, stored as the storage format ``io`` says; with
    ``io.quant`` a quantized slot as its ``(codes, absmax)`` pair), for ``launch_table``. Its
    device copy is made by the first launch; keep the table with the step that launches it
    and re-check it with ``same``/``update``/``set_column``."""
    if not tensors:
        raise ValueError("an empty list of tensors")
    kind, index = _launch.describe(tensors[0][0], "tensor 0 param")[3]
    if kind != "cuda":
        raise ValueError(f"tensor 0 is on {kind}; the cupy backend steps CUDA arrays")
    dev = cupy.cuda.Device() if index is None else cupy.cuda.Device(index)
    return _launch.TensorTable(rule, io, tensors, chunk=chunk, blocks=_resident_blocks(dev.id))


def _device_id(table):
    index = table.device[1]
    return cupy.cuda.Device().id if index is None else index


def _upload(table):
    """The table's device copies, made or refreshed on the current device and stream when the
    host copy changed (a steady step with unchanged addresses copies nothing). A refresh of
    the same shape writes the existing device array in place: a CUDA graph that captured a
    launch keeps reading the table at its address."""
    if table.device_rows is None or table.device_rows.shape != table.rows.shape:
        table.device_rows = cupy.asarray(table.rows)
        table.stale = False
    elif table.stale:
        table.device_rows[...] = table.rows
        table.stale = False
    if table.stale_chunks or table.device_chunks is None:
        table.device_chunks = cupy.asarray(table.chunks)
        table.stale_chunks = False


def table_arguments(rule, flags, io, table, k, extras=None, clip=None):
    """The argument tuple of the multi-tensor kernel (``multi_tensor.arguments``): the device
    table and chunk entries, their count and size, the scalars and extras as
    ``mixed_arguments`` types them, then the clip buffer. Built without a GPU (the device
    arrays are passed through)."""
    from ..kernels import multi_tensor

    spec = multi_tensor.arguments(rule, flags, io, clip is not None)
    head = [
        table.device_rows,
        table.device_chunks,
        np.int64(table.nchunks),
        np.int64(table.chunk),
    ]
    scalars = [(t, n) for t, n in spec[4:] if n != "clip"]
    args = head + _scalar_arguments(rule, io, scalars, k, extras or {})
    if clip is not None:
        args.append(clip)
    return args


def _stream_context(stream):
    """A context running on the stream handle ``stream`` (None: CuPy's current stream)."""
    import contextlib

    st = _stream_for(stream)
    return st if st is not None else contextlib.nullcontext()


def launch_table(rule, flags, io, table, k, extras=None, clip=None, stream=None):
    """One launch of the ``flags`` variant of ``rule`` under the storage format ``io`` over every
    tensor of ``table`` (``tensor_table``), in place: ``k`` the host scalars (ignored with
    ``io.kbuf``), ``extras`` as ``launch_mixed`` takes them (host ``inv_scale``, ``salt``,
    ``key``; device ``kbuf``, ``scale``, ``found_inf``, ``keyp``), ``clip`` the device
    ``[norm, clip_coef]`` of ``GradNorm`` (``GradNorm.coef``) or None, ``stream`` a CUDA
    stream handle (None: CuPy's current stream; ``fastopt.torch`` passes torch's). The table
    is checked against the variant and the storage format first (``TensorTable.check``): a refused
    launch writes nothing. One stochastic-rounding salt serves every tensor (the index is
    counted from each tensor's start), as on the CPU (``numba_backend.launch_many_io``).
    A table of quantized state (``io.quant``: ``(codes, absmax)`` pairs, ``tensor_table``)
    launches ``cupy_quant``'s kernel, one CUDA block per block of codes."""
    table.check(rule, flags, io)
    if not io.kbuf and len(k) != len(RULES[rule].scalars):
        raise ValueError(f"k: {len(k)} scalars; {rule} takes {len(RULES[rule].scalars)}")
    ex = dict(extras or {})
    for d in ("kbuf", "scale", "found_inf", "keyp"):
        if ex.get(d) is not None:
            ex[d] = _as_cupy(ex[d], d)
    if clip is not None:
        clip = _as_cupy(clip, "clip")
        want = np.float64 if io.compute == "float64" else np.float32
        if clip.dtype != want or clip.size < 2:
            raise ValueError(f"clip: {clip.dtype}[{clip.size}]; expected {np.dtype(want)}[2]")
    if table.nchunks == 0:
        return
    with cupy.cuda.Device(_device_id(table)), _stream_context(stream):
        _upload(table)
        if io.quant is not None:  # quantized state: a block of codes per chunk (cupy_quant)
            from . import cupy_quant

            cupy_quant.launch_table(rule, flags, io, table, k, ex, clip)
            return
        args = table_arguments(rule, flags, io, table, k, ex, clip)
        kern = table_kernel(rule, flags, io, clip is not None)
        blocks = min(table.nchunks, MAX_TABLE_BLOCKS)
        kern((blocks,), (_launch.THREADS,), tuple(args))


class GradNorm:
    """The global L2 norm of the (unscaled) gradients of ``tables`` and torch's clip
    coefficient, computed on the device (``kernels.multi_tensor``): per table, one grid-stride
    pass writing a partial sum per block; then one block adds the partials in a fixed order
    (deterministic) and writes ``out = [norm, clip_coef]`` (float64 when any table computes in
    float64, else float32) and its float32 copy ``out_f``. ``scale``: None,
    "host" or "device", as the step's loss scale is given (``extras`` of ``__call__``).
    Buffers and grids are made once: keep the object with the tables."""

    def __init__(self, tables, scale=None):
        if not tables:
            raise ValueError("GradNorm of no tables")
        self.tables, self.scale = list(tables), scale
        self.acc = "float64" if any(t.io.compute == "float64" for t in tables) else "float32"
        self.device = _device_id(tables[0])
        if any(_device_id(t) != self.device for t in tables):
            raise ValueError("GradNorm: tables on more than one device")
        dt = np.dtype(self.acc)
        with cupy.cuda.Device(self.device):
            self.grids = []
            for t in self.tables:
                kern = _norm_kernels(t.io.grad, self.acc, scale)
                wave = _waves(("norm", t.io.grad, self.acc, scale), kern)
                self.grids.append(min(t.nchunks, wave))
            self.partials = cupy.zeros(max(1, sum(self.grids)), dtype=dt)
            self.out = cupy.zeros(2, dtype=dt)
            self.out_f = cupy.zeros(2, dtype=np.float32)

    def coef(self, compute):
        """The ``clip=`` buffer of a launch computing in ``compute``."""
        return self.out if compute == self.acc else self.out_f

    def __call__(self, max_norm, extras=None, stream=None):
        """Launch the passes on ``stream`` (a handle; None: CuPy's current stream); returns
        ``out``. ``extras``: ``inv_scale`` (host) or ``scale`` (device grad_scale)."""
        ex = extras or {}
        dt = np.dtype(self.acc).type
        if self.scale == "host":
            unscale = [dt(ex["inv_scale"])]
        elif self.scale == "device":
            unscale = [_as_cupy(ex["scale"], "scale")]
        else:
            unscale = []
        with cupy.cuda.Device(self.device), _stream_context(stream):
            offset = 0
            for t, grid in zip(self.tables, self.grids):
                if grid == 0:
                    continue
                _upload(t)
                kern = _norm_kernels(t.io.grad, self.acc, self.scale)
                args = (
                    t.device_rows,
                    np.int32(len(t.columns)),
                    t.device_chunks,
                    np.int64(t.nchunks),
                    np.int64(t.chunk),
                    *unscale,
                    self.partials[offset : offset + grid],
                )
                kern((grid,), (_launch.THREADS,), args)
                offset += grid
            _finish_kernel(self.acc)(
                (1,),
                (_launch.THREADS,),
                (self.partials, np.int64(offset), dt(max_norm), self.out, self.out_f),
            )
        return self.out


def step_runner(plan, dtype, writes, io):
    """The backend protocol's runner (``backends.protocol``): ``launch`` per call."""
    return protocol.launch_runner(launch, plan, io)
