"""Numba CUDA backend: each rule from ``kernels/`` as a device function in a grid-stride kernel.

The per-element rule is the very function the CPU backend inlines (``make_rule(**flags)``),
compiled here by ``numba.cuda.jit(device=True)``; one kernel per (rule, flag variant, state slots
present) is built once and cached. Absent state slots cost no memory traffic: the kernel variant
never loads or stores them (the param array only fills the argument position). The host scalars
arrive as one tuple in the buffer dtype, so float32 kernels stay float32 and a new lr or step
never recompiles. The grid is one full wave of resident blocks (the device's multiprocessor
count times the blocks that fit per multiprocessor, from the compiled kernel's register count)
and every thread walks the buffer with a grid-stride loop on 64-bit indices, so any n works with
one launch.

Mixed precision (``kernels.storage.IO``): a launch whose arrays are not all in the compute dtype,
or that carries a master copy, stochastic rounding, a loss scale, a device found-inf flag or
device-held scalars (capturable steps), runs a kernel generated for its storage format
(``mixed_kernel_source``): 16-bit arrays are passed as uint16 views and converted on their bits
by ``kernels/storage.py``'s functions compiled as device functions (bit casts lowered here).

A list of tensors steps in one launch (``tensor_table``, ``launch_table``, ``GradNorm``: the
CuPy backend's entry points, over the same table of addresses and chunks), the element body
strided over each chunk's elements.

Arrays must already live on the GPU (CuPy, Numba device arrays, PyTorch CUDA tensors, also ones
that require grad, anything with ``__cuda_array_interface__``): a launch copies nothing between
host and device. Kernels run on the producer's stream (``_launch.producer_stream``: CuPy's
current stream for CuPy arrays, PyTorch's current stream for tensors, the interface's stream for
others), else on the default stream, and on the arrays' GPU whatever device is current.

``available()`` compiles one small variant the first time it is asked: numba-cuda needs NVVM and
libdevice besides a driver, and a machine that has the driver but not those reports why here
instead of failing every launch. Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) host
NumPy arrays are accepted, which is how CI checks these kernels without a GPU.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from typing import Any

import numpy as np

from ..kernels import RULES, storage
from ..kernels.fma import fma
from ..kernels.storage import bits_f32, f32_bits
from . import _launch, protocol

__all__ = [
    "DEVICE",
    "NAME",
    "SIMULATOR",
    "THREADS",
    "GradNorm",
    "available",
    "kernel",
    "launch",
    "launch_config",
    "launch_table",
    "norm_kernels",
    "python_kernel",
    "table_kernel",
    "table_kernel_source",
    "table_python_kernel",
    "table_signature",
    "tensor_table",
    "variants",
    "why_unavailable",
]

NAME = "numba-cuda"
#: steps quantized state slots (``kernels/quant.py``, ``IO.quant``: ``numba_cuda_quant``)
QUANT_STATE = True
#: ``tensor_table`` takes a quantized slot as a ``(codes, absmax)`` pair, ``launch_table``
#: steps it (``numba_cuda_quant.launch_table``)
QUANT_TABLE = True
#: and the packed ones (``kernels.quant.PACKED``: two codes per byte, a thread per byte:
#: ``numba_cuda_quant``), in a step and in a table
QUANT_PACKED = True

#: threads per block (shared with the CuPy backend)
THREADS = _launch.THREADS
#: True when Numba runs CUDA kernels in its Python simulator
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
#: where the arrays live: GPU memory, or host memory when the simulator runs the kernels on the CPU
DEVICE = "cpu" if SIMULATOR else "cuda"
# The simulator runs one Python thread per CUDA thread: a tiny grid keeps it fast, and a grid
# smaller than n makes the grid-stride loop take several trips, which is what CI must see.
_SIM_THREADS, _SIM_BLOCKS = 32, 4

if not hasattr(np, "row_stack"):
    # numba-cuda (<= 0.30 at least) registers an overload of np.row_stack whenever NumPy >= 2.0;
    # NumPy 2.5 removed that alias of np.vstack, so its first compile fails with AttributeError.
    # Restoring the alias (what it always was) lets numba-cuda run beside a current NumPy.
    np.row_stack = np.vstack


def _register_fma():
    """The rules' fused multiply-add (kernels/fma.py) as one PTX ``fma.rn`` (typed and lowered
    directly: an overload would be compiled as a separate device function, which needs a
    driver even to compile PTX)."""
    try:
        from numba.cuda import types
        from numba.cuda.extending import lower_builtin, type_callable
    except ImportError:  # numba's built-in CUDA target: the core registries serve it
        from numba.core import types
        from numba.core.imputils import lower_builtin
        from numba.extending import type_callable

    @type_callable(fma)
    def _type_fma(context):
        def typer(a, b, c):
            if isinstance(a, types.Float) and a == b == c:
                return a
            return None

        return typer

    @lower_builtin(fma, types.Float, types.Float, types.Float)
    def _lower_fma(context, builder, sig, args):
        return builder.fma(*args)

    # kernels/storage.py's bit casts: the register read as the other type
    from llvmlite import ir

    @type_callable(f32_bits)
    def _type_f32_bits(context):
        def typer(x):
            return types.int64 if x == types.float32 else None

        return typer

    @lower_builtin(f32_bits, types.float32)
    def _lower_f32_bits(context, builder, sig, args):
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    @type_callable(bits_f32)
    def _type_bits_f32(context):
        def typer(u):
            return types.float32 if isinstance(u, types.Integer) else None

        return typer

    @lower_builtin(bits_f32, types.Integer)
    def _lower_bits_f32(context, builder, sig, args):
        v = args[0]
        width = sig.args[0].bitwidth
        if width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())


try:
    from numba import cuda
except Exception as _exc:
    cuda = None
    _import_error = f"numba.cuda cannot be imported: {type(_exc).__name__}: {_exc}"
else:
    _import_error = ""
    if not SIMULATOR:  # the simulator runs the rules as Python: kernels/fma.py itself
        _register_fma()

_compiled: dict[Any, Any] = {}
_sm_count: dict[Any, Any] = {}
_grid: dict[
    Any, Any
] = {}  # (variant key, dtype, device id) -> (specialised kernel, blocks of one wave)
_streams: dict[Any, Any] = {}
_views: dict[
    Any, Any
] = {}  # (pointer, shape, strides, typestr) -> numba device array view, no owner
_probe_error = None


def _probe():
    """'' when a kernel calling a device function compiles here, else why not (once)."""
    global _probe_error
    if _probe_error is None:
        try:
            if not cuda.is_available():
                _probe_error = (
                    "numba.cuda finds no usable CUDA GPU and driver "
                    "(cuda.is_available() is False; cuda.detect() says why)"
                )
            elif not SIMULATOR:
                from numba import types

                rule, flags, writes = variants(["sgd"])[0]
                t = types.float32
                sig = (t[::1],) * (2 + len(writes)) + (types.UniTuple(t, len(RULES[rule].scalars)),)
                cc = cuda.get_current_device().compute_capability
                cuda.compile_ptx(python_kernel(rule, flags, writes), sig, cc=cc)
                _probe_error = ""
            else:
                _probe_error = ""
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [""])[0]
            _probe_error = (
                f"numba-cuda cannot compile a kernel here ({type(exc).__name__}: "
                f"{first}); it needs NVVM and libdevice: pip install "
                "'numba-cuda[cu13]' (or [cu12]), or set CUDA_HOME to a CUDA toolkit"
            )
    return _probe_error


def available():
    return cuda is not None and _probe() == ""


def why_unavailable():
    if cuda is None:
        return _import_error + " (install fastopt[cuda12] or fastopt[cuda13])"
    return _probe()


def kernel_source(name, nslots, writes):
    """Python source of the kernel factory for a rule with ``nslots`` state slots, of which the
    ones marked in ``writes`` are present: a grid-stride loop that loads param, grad and each
    present slot once into locals, calls the rule, and stores param and each present slot once;
    an absent slot is neither loaded nor stored (the rule never uses it: its local is the
    param's value). One source per (slot count, present slots), for rules of any arity."""
    lines = [
        "def factory(elem):",
        f"    def {name}(p, g, {''.join(f's{j}, ' for j in range(nslots))}k):",
        "        start = cuda.grid(1)",
        "        stride = cuda.gridsize(1)",
        "        for i in range(start, p.shape[0], stride):",
        "            pi = p[i]",
    ]
    lines += [
        f"            a{j} = s{j}[i]" if w else f"            a{j} = pi"
        for j, w in enumerate(writes)
    ]
    outs = ", ".join(["pi"] + [f"a{j}" for j in range(nslots)])
    lines += [
        f"            {outs}{',' if nslots == 0 else ''} = elem(pi, g[i], "
        f"{''.join(f'a{j}, ' for j in range(nslots))}k)",
        "            p[i] = pi",
    ]
    lines += [f"            s{j}[i] = a{j}" for j, w in enumerate(writes) if w]
    lines += [f"    return {name}"]
    return "\n".join(lines) + "\n"


def prologue_source(io, nscalars):
    """The first lines of every kernel of a storage format ``io`` (the single-tensor, table and
    quantized kernels), as source at the body's indent: nothing written when the device
    found-inf flag ``fi`` is set, the scalars ``k`` from device memory ``kb`` (capturable),
    ``inv`` the reciprocal grad scale (device ``gs`` or host ``x[0]``), ``key`` the step key
    (device ``kp`` or host ``x[2]``)."""
    lines = []
    if io.found_inf:
        lines += ["        if fi[0] != 0:", "            return"]
    if io.kbuf:
        lines.append(f"        k = ({''.join(f'kb[{j}], ' for j in range(nscalars))})")
    if io.scale == "device":
        lines.append("        inv = CT(1) / CT(gs[0])")
    elif io.scale == "host":
        lines.append("        inv = x[0]")
    lines.append(f"        key = {'kp[0]' if io.kbuf and io.sr else 'x[2]'}")
    return lines


def mixed_kernel_source(name, nslots, writes, io, nscalars):
    """``kernel_source`` for a launch with the storage format ``io``: the kernel takes ``(p, g,
    s0.., m, k, x, kb, gs, fi, kp)``: ``m`` the fp32 master, ``k`` the host scalars, ``x =
    (1/grad_scale, salt, step key)`` (host values), ``kb`` the scalars in device memory
    (capturable), ``gs`` the device grad_scale, ``fi`` the device found-inf flag, ``kp`` the
    device step key; the arguments a storage format does not use are placeholders never read.
    Each array is loaded once into a compute-dtype local and stored once, converted by its storage
    dtype (``lp``/``lg``/``ls`` load, ``sp``/``sg``/``ss`` store: the factory's arguments)."""
    slots = [f"s{j}" for j in range(nslots)]
    lines = [
        "def factory(elem, lp, lg, ls, sp, sg, ss, CT, lm, sm):",
        f"    def {name}(p, g, {''.join(s + ', ' for s in slots)}m, k, x, kb, gs, fi, kp):",
    ]
    lines += prologue_source(io, nscalars)
    lines += [
        "        start = cuda.grid(1)",
        "        stride = cuda.gridsize(1)",
        "        for i in range(start, p.shape[0], stride):",
        *storage.element_source(nslots, writes, io, "inv", "key", 12),
        f"    return {name}",
    ]
    return "\n".join(lines) + "\n"


def python_kernel(rule, flags, writes, io=None):
    """The uncompiled kernel function of one variant (what ``kernel`` hands to ``cuda.jit``),
    for the storage format ``io`` when it is not plain."""
    spec = RULES[rule]
    if len(writes) != len(spec.state):
        raise ValueError(
            f"rule {rule!r} has {len(spec.state)} state slots {spec.state}, "
            f"got {len(writes)} write flags"
        )
    jit = cuda.jit(device=True, inline="always")
    elem = jit(spec.element(flags, jit))  # the rule's helpers as device functions too
    # ``cuda`` is a global of the kernel, not a cell: the simulator swaps a kernel's globals
    ns = {"__name__": __name__, "cuda": cuda}
    name = f"fastopt_{rule}"
    if io is None or io.plain:
        exec(compile(kernel_source(name, len(writes), writes), __file__, "exec"), ns)
        return ns["factory"](elem)
    src = mixed_kernel_source(name, len(writes), writes, io, len(spec.scalars))
    exec(compile(src, __file__, "exec"), ns)
    conv = storage.make_converters(lambda f: cuda.jit(device=True, inline="always")(f), io.compute)
    return ns["factory"](
        elem,
        conv["load"][io.param],
        conv["load"][io.grad],
        conv["load"][io.state],
        conv["param"][io.param_store],
        conv["store"][io.grad],
        conv["store"][io.state],
        getattr(np, io.compute),
        *conv["master"][io.kind("master")],
    )


def variants(rules=None):
    """Every (rule, flags, writes) variant ``fastopt.functional`` can launch: the launchable
    flag combinations of each rule (its spec's ``variants``), with the slots they use."""
    return [
        (rule, flags, RULES[rule].slots_used(flags))
        for rule in rules or RULES
        for flags in RULES[rule].variants()
    ]


def mixed_signature(rule, writes, io):
    """The numba argument types of the mixed kernel of one variant under ``io`` (unused
    positions typed as the param), for ``cuda.compile_ptx`` checks without a GPU."""
    from numba import types

    def arr(kind):
        return types.uint16[::1] if kind in storage.BITS16 else getattr(types, kind)[::1]

    p = arr(io.param)
    c = getattr(types, io.compute)
    sig = (p, arr(io.grad)) + tuple(arr(io.state) if w else p for w in writes)
    sig += ((types.int16 if io.remainder else types.float32)[::1] if io.master else p,)
    sig += (types.UniTuple(c, len(RULES[rule].scalars)), types.Tuple((c, types.int64, types.int64)))
    sig += (c[::1] if io.kbuf else p, types.float32[::1] if io.scale == "device" else p)
    sig += (types.float32[::1] if io.found_inf else p, types.uint32[::1] if io.kbuf else p)
    return sig


_scalar: dict[Any, Any] = {}


def scalar_kernel(program):
    """The one-thread kernel computing a capturable step's scalars on the device
    (``kernels.device_scalars.python_source``), as ``run(like, ctl, k32, k64, keyp, fi,
    seed)`` launched on ``like``'s producer stream (plain Python under the simulator)."""
    import math

    from ..kernels import device_scalars

    src = device_scalars.python_source(program)
    fn = _scalar.get(src)
    if fn is None:
        ns = {"__name__": __name__, "cuda": cuda, "math": math}
        exec(compile(src, __file__, "exec"), ns)
        mix = cuda.jit(device=True, inline="always")(storage.mix32)
        fn = _scalar[src] = cuda.jit(ns["factory"](mix))

    def run(like, ctl, k32, k64, keyp, fi, seed):
        if SIMULATOR and isinstance(like, np.ndarray):
            fn[1, 1](ctl, k32, k64, keyp, fi, np.uint32(seed))
            return
        views = [_device_view(a, "device scalars") for a in (ctl, k32, k64, keyp, fi)]
        _configured(fn, 1, 1, _stream_ptr(like))(*views, np.uint32(seed))

    return run


def kernel(rule, flags, writes, io=None):
    """The cached ``cuda.jit`` kernel of one variant (compiled lazily per argument types)."""
    if io is not None and io.plain:
        io = None
    key = (rule, tuple(sorted(flags.items())), tuple(writes), io)
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = cuda.jit(python_kernel(rule, flags, tuple(writes), io))
    return fn


def launch_config(n, regs_per_thread=None):
    """(blocks, threads) for ``n`` elements on the current device: one full wave of resident
    blocks of a kernel using ``regs_per_thread`` registers (None: as many as the thread limit
    allows), no more than the work needs; the grid-stride loop covers the rest."""
    if SIMULATOR:
        return max(1, min(_SIM_BLOCKS, -(-n // _SIM_THREADS))), _SIM_THREADS
    dev = cuda.get_current_device()
    sms = _sm_count.get(dev.id)
    if sms is None:
        sms = _sm_count[dev.id] = int(dev.MULTIPROCESSOR_COUNT)
    per_sm = _launch.blocks_per_sm(regs_per_thread or 1, THREADS)
    return _launch.grid_size(n, sms, per_sm), THREADS


def _stream_ptr(a):
    """The CUDA stream handle work on ``a`` should be ordered on (0: the default stream)."""
    s = _launch.producer_stream(a)
    # 1 and 2 (legacy and per-thread default streams) both order with the legacy default stream
    return 0 if s is None or s <= 2 else s


def _stream(ptr):
    if ptr == 0:
        return cuda.default_stream()
    st = _streams.get(ptr)
    if st is None:
        if len(_streams) > 64:  # short-lived streams: do not keep wrappers forever
            _streams.clear()
        st = _streams[ptr] = cuda.external_stream(ptr)
    return st


_configs: dict[
    Any, Any
] = {}  # (kernel, blocks, threads, stream handle, device) -> launch configuration


def _configured(fn, blocks, threads, ptr, dev=None):
    """``fn[blocks, threads, stream]``, made once per grid and stream and reused: a configuration
    costs host time to build, and building one for a grid under 128 blocks warns
    (NumbaPerformanceWarning). Small arrays get small grids on purpose (no more blocks than the
    work needs), so that warning is silenced here, for fastopt's own launches only. ``dev``: the
    current device's id (a stream handle of 0 means each device's own default stream)."""
    if dev is None:
        dev = cuda.get_current_device().id
    key = (fn, blocks, threads, ptr, dev)
    cfg = _configs.get(key)
    if cfg is None:
        if len(_configs) > 512:  # many sizes or short-lived streams: do not grow forever
            _configs.clear()
        with warnings.catch_warnings():
            for category in _performance_warnings():
                warnings.simplefilter("ignore", category)
            cfg = _configs[key] = fn[blocks, threads, _stream(ptr)]
    return cfg


def _performance_warnings():
    """NumbaPerformanceWarning as numba-cuda raises it (its own class in recent releases,
    numba's in older ones)."""
    found = []
    for mod in ("numba.cuda.core.errors", "numba.core.errors"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(__import__(mod, fromlist=["x"]).NumbaPerformanceWarning)
    return found


def _device_view(a, name):
    a = _launch.plain_view(a)
    if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__"):
        raise TypeError(
            f"the numba-cuda backend updates device arrays in place; {name} is a "
            f"host {type(a).__name__} of shape {tuple(a.shape)} and dtype {a.dtype}. "
            "Pass CuPy arrays, Numba device arrays or CUDA tensors, or use "
            "backend='numba' for host arrays"
        )
    if type(a).__module__.startswith("numba") and cuda.is_cuda_array(a):
        return a
    desc = a.__cuda_array_interface__
    key = (desc["data"][0], tuple(desc["shape"]), desc.get("strides"), desc["typestr"])
    view = _views.get(key)
    if view is None:
        if len(_views) >= 4096:
            _views.clear()
        # owner=None: the view keeps no reference to the producer, so the cache holds no memory
        # alive; it is only ever used for an array that has this very pointer, shape and type.
        # sync=False: ordering comes from launching on the producer's stream, not a host sync
        view = _views[key] = cuda.from_cuda_array_interface(desc, owner=None, sync=False)
    return view


def _dtype(a):
    try:
        return np.dtype(a.dtype)
    except TypeError:  # a framework's own dtype object (torch.float32): ask the interface
        return np.dtype(a.__cuda_array_interface__["typestr"])


def _device_index(a):
    """The GPU ordinal an array lives on (CuPy: .device.id; PyTorch: .device.index), or None."""
    dev = getattr(a, "device", None)
    for attr in ("id", "index"):
        i = getattr(dev, attr, None)
        if isinstance(i, int):
            return i
    return None


def _bits16(a):
    """A 16-bit float device (or simulator host) array as its uint16 view."""
    if _dtype(a).itemsize == 2:
        return a.view(np.uint16)
    return a


def launch_mixed(rule, flags, param, grad, states, k, io, master=None, extras=None):
    """One launch under the storage format ``io`` (``kernels.storage.IO``): ``extras`` holds the
    host values ``inv_scale``, ``salt``, ``key`` and the device arrays ``scale`` (grad_scale),
    ``found_inf``, ``kbuf`` (the scalars, in the compute dtype) and ``keyp`` (the step key)."""
    n = int(param.shape[0])
    if n == 0:
        return
    extras = extras or {}
    param, grad = _launch.plain_view(param), _launch.plain_view(grad)
    states = tuple(None if s is None else _launch.plain_view(s) for s in states)
    writes = tuple(s is not None for s in states)
    ct = np.dtype(io.compute).type
    scalars = tuple(ct(x) for x in k)
    inv = extras.get("inv_scale")
    x = (
        ct(1.0 if inv is None else inv),
        np.int64(extras.get("salt", 0)),
        np.int64(extras.get("key", 0)),
    )
    fn = kernel(rule, flags, writes, io)
    dev = [extras.get(name) for name in ("kbuf", "scale", "found_inf", "keyp")]
    p = _bits16(param)
    if SIMULATOR and isinstance(param, np.ndarray):
        # empty views fill the unused positions (see ``launch``)
        blocks, threads = launch_config(n)
        hole = p[:0]
        arrays = [p, _bits16(grad)] + [hole if s is None else _bits16(s) for s in states]
        arrays += [hole if master is None else master]
        fn[blocks, threads](*arrays, scalars, x, *[hole if d is None else d for d in dev])
        return
    devi = _device_index(param)
    if isinstance(devi, int) and devi != cuda.get_current_device().id:
        with cuda.gpus[devi]:
            _launch_mixed_device(fn, n, param, grad, states, master, scalars, x, dev)
    else:
        _launch_mixed_device(fn, n, param, grad, states, master, scalars, x, dev)


def _launch_mixed_device(fn, n, param, grad, states, master, scalars, x, dev):
    ptr = _stream_ptr(param)
    p = _device_view(_bits16(param), "param")
    arrays = [p, _device_view(_bits16(grad), "grad")]
    arrays += [
        p if s is None else _device_view(_bits16(s), f"state slot {i}")
        for i, s in enumerate(states)
    ]
    arrays.append(p if master is None else _device_view(master, "master"))
    devs = [p if d is None else _device_view(d, "device scalar") for d in dev]
    blocks, threads = launch_config(n)
    _configured(fn, min(blocks, -(-n // threads)), threads, ptr)(*arrays, scalars, x, *devs)


def launch(rule, flags, param, grad, states, k, io=None, master=None, extras=None):
    if io is not None and io.quant:
        from .numba_cuda_quant import launch_quant

        launch_quant(rule, flags, param, grad, states, k, io, master, extras)
        return
    if io is not None and not io.plain:
        launch_mixed(rule, flags, param, grad, states, k, io, master, extras)
        return
    n = int(param.shape[0])
    if n == 0:
        return
    param, grad = _launch.plain_view(param), _launch.plain_view(grad)
    states = tuple(None if s is None else _launch.plain_view(s) for s in states)
    writes = tuple(s is not None for s in states)
    dtype = _dtype(param)
    scalars = tuple(dtype.type(x) for x in k)
    fn = kernel(rule, flags, writes)
    if SIMULATOR and isinstance(param, np.ndarray):
        # the simulator copies every host argument in and back out, so the param array must not
        # fill an absent slot (its stale copy would land last); an empty view never indexed does
        blocks, threads = launch_config(n)
        arrays = [param, grad] + [param[:0] if s is None else s for s in states]
        fn[blocks, threads](*arrays, scalars)
        return
    key = (rule, tuple(sorted(flags.items())), writes, dtype.name)
    dev = _device_index(param)
    if isinstance(dev, int) and dev != cuda.get_current_device().id:
        with cuda.gpus[dev]:  # launch where the arrays live, not on Numba's current device
            _launch_device(fn, key, n, param, grad, states, scalars)
    else:
        _launch_device(fn, key, n, param, grad, states, scalars)


def _launch_device(fn, key, n, param, grad, states, scalars):
    # everything below runs with the arrays' device current: its SM count, its CuPy stream
    ptr = _stream_ptr(param)
    p = _device_view(param, "param")
    arrays = [p, _device_view(grad, "grad")]
    arrays += [p if s is None else _device_view(s, f"state slot {i}") for i, s in enumerate(states)]
    dev = cuda.get_current_device().id
    entry = _grid.get(key + (dev,))
    if entry is None:
        spec = fn.specialize(*arrays, scalars)  # compiled for these types, once
        blocks, _ = launch_config(1 << 62, spec.get_regs_per_thread())
        entry = _grid[key + (dev,)] = (spec, blocks)
    spec, wave = entry
    blocks = min(wave, -(-n // THREADS))
    try:
        _configured(spec, blocks, THREADS, ptr, dev)(*arrays, scalars)
    except TypeError:  # other array types than the specialisation's (layout, readonly): generic
        _configured(fn, blocks, THREADS, ptr, dev)(*arrays, scalars)


# -- multi-tensor launches: one kernel over a table of tensors -----------------------------------
#
# The numba-cuda form of ``kernels.multi_tensor`` (the CuPy backend's ``launch_table`` and
# ``GradNorm``): the same table (``_launch.TensorTable``: int64 rows ``(n, param, grad, slot...,
# master)`` and uint64 chunk entries, read here as int64: a tensor index stays below 2^31), the
# same chunks, one block per chunk, the element body of ``mixed_kernel_source``
# (``storage.element_source``) over 1-D views of each chunk made from the table's addresses
# (``_view``: an intrinsic on the GPU, a ctypes view of host memory under the simulator),
# the index stochastic rounding hashes counted from the tensor's start. The elements of a chunk
# are strided over the block's threads one at a time (numba-cuda has no 16-byte vector access
# to say it with). The norm: a grid-stride pass writing one partial sum per block (a fixed tree
# in shared memory), then one block over the partials, as in ``kernels/multi_tensor.cuh``.

_VIEW = None


def _view_fn():
    """``view(address, n, like)``: the 1-D C-contiguous array of ``like``'s dtype of ``n``
    elements at ``address`` (no check: the table was checked on the host)."""
    global _VIEW
    if _VIEW is not None:
        return _VIEW
    if SIMULATOR:
        import ctypes

        def view(address, n, like):
            size = int(n) * like.dtype.itemsize
            buf = (ctypes.c_char * size).from_address(int(address))
            return np.frombuffer(buf, dtype=like.dtype, count=int(n))

        _VIEW = view
        return view
    from numba.core.typing.templates import signature

    try:
        from numba.cuda import types
        from numba.cuda.extending import intrinsic
        from numba.cuda.np.arrayobj import np_cfarray
    except ImportError:  # numba's built-in CUDA target
        from numba.core import types
        from numba.extending import intrinsic
        from numba.np.arrayobj import np_cfarray

    @intrinsic  # type: ignore[no-redef]
    def view(typingctx, address, n, like):
        if not isinstance(address, types.Integer) or not isinstance(like, types.Array):
            return None
        arr = types.Array(like.dtype, 1, "C")
        ptr = types.CPointer(like.dtype)

        def codegen(context, builder, sig, args):
            p = builder.inttoptr(args[0], context.get_value_type(ptr))
            return np_cfarray(context, builder, signature(arr, ptr, sig.args[1]), (p, args[1]))

        return arr(address, n, like), codegen

    _VIEW = view
    return view


def table_kernel_source(name, nslots, writes, io, nscalars, clip=False):
    """Python source of the multi-tensor kernel factory of a rule with ``nslots`` state slots
    (the present ones ``writes``) under the storage format ``io``: the kernel takes ``(table,
    chunks, nchunks, chunk, pl, gl, sl, ml, k, x, kb, gs, fi, kp, cl)``, ``pl``..``ml`` one-
    element arrays of the storage types of param, grad, state and master (what each chunk
    view is typed as), ``k``..``kp`` as ``mixed_kernel_source`` takes them and ``cl`` the
    device ``[norm, clip_coef]`` (placeholders where unused)."""
    from ..kernels.storage import ITEMSIZE

    item = {
        "p": ITEMSIZE[io.param],
        "g": ITEMSIZE[io.grad],
        "s": ITEMSIZE[io.state],
        "m": ITEMSIZE[io.kind("master")],
    }
    lines = [
        "def factory(elem, lp, lg, ls, sp, sg, ss, CT, view, lm, sm):",
        f"    def {name}(table, chunks, nchunks, chunk, pl, gl, sl, ml, k, x, kb, gs, fi, kp, cl):",
    ]
    lines += prologue_source(io, nscalars)
    if clip:
        lines.append("        cf = cl[1]")
    lines += [
        "        c = cuda.blockIdx.x",
        "        while c < nchunks:",
        "            e = chunks[c]",
        "            j = e >> 32",
        "            base = (e & 0xFFFFFFFF) * chunk",
        "            cnt = min(base + chunk, table[j, 0]) - base",
        f"            p = view(table[j, 1] + base * {item['p']}, cnt, pl)",
        f"            g = view(table[j, 2] + base * {item['g']}, cnt, gl)",
    ]
    lines += [
        f"            s{j} = view(table[j, {3 + j}] + base * {item['s']}, cnt, sl)"
        if w
        else f"            s{j} = p"
        for j, w in enumerate(writes)
    ]
    lines.append(
        f"            m = view(table[j, {3 + nslots}] + base * {item['m']}, cnt, ml)"
        if io.master
        else "            m = p"
    )
    lines += [
        "            i = cuda.threadIdx.x",
        "            while i < cnt:",
    ]
    body = storage.element_source(nslots, writes, io, "inv", "key", 16, index="base + i")
    if clip:  # the unscaled gradient times the clip coefficient, as the CUDA C lane does
        at = [n for n, ln in enumerate(body) if ln.strip().startswith("gv = ")]
        assert len(at) == 1, "storage.element_source: one line loads the gradient"
        body[at[0]] += " * cf"
    lines += body
    lines += [
        "                i += cuda.blockDim.x",
        "            c += cuda.gridDim.x",
        f"    return {name}",
    ]
    return "\n".join(lines) + "\n"


def table_python_kernel(rule, flags, writes, io, clip=False):
    """The uncompiled multi-tensor kernel of one variant under ``io`` (see
    ``table_kernel_source``)."""
    spec = RULES[rule]
    jit = cuda.jit(device=True, inline="always")
    elem = jit(spec.element(flags, jit))  # the rule's helpers as device functions too
    ns = {"__name__": __name__, "cuda": cuda}
    name = f"fastopt_mt_{rule}"
    src = table_kernel_source(name, len(writes), tuple(writes), io, len(spec.scalars), clip)
    exec(compile(src, __file__, "exec"), ns)
    conv = storage.make_converters(lambda f: cuda.jit(device=True, inline="always")(f), io.compute)
    return ns["factory"](
        elem,
        conv["load"][io.param],
        conv["load"][io.grad],
        conv["load"][io.state],
        conv["param"][io.param_store],
        conv["store"][io.grad],
        conv["store"][io.state],
        getattr(np, io.compute),
        _view_fn(),
        *conv["master"][io.kind("master")],
    )


def _like_dtype(kind):
    return np.dtype(np.uint16) if kind in storage.BITS16 else np.dtype(kind)


def table_signature(rule, writes, io, clip=False):
    """The numba argument types of the multi-tensor kernel (``cuda.compile_ptx`` checks)."""
    from numba import types

    def arr(kind):
        return getattr(types, _like_dtype(kind).name)[::1]

    c = getattr(types, io.compute)
    p = arr(io.param)
    sig: tuple[Any, ...] = (types.int64[:, ::1], types.int64[::1], types.int64, types.int64)
    sig += (p, arr(io.grad), arr(io.state), arr(io.kind("master")))
    sig += (types.UniTuple(c, len(RULES[rule].scalars)), types.Tuple((c, types.int64, types.int64)))
    sig += (c[::1] if io.kbuf else p, types.float32[::1] if io.scale == "device" else p)
    sig += (types.float32[::1] if io.found_inf else p, types.uint32[::1] if io.kbuf else p)
    sig += (c[::1] if clip else p,)
    return sig


_tables: dict[Any, Any] = {}


def table_kernel(rule, flags, writes, io, clip=False):
    """The cached ``cuda.jit`` multi-tensor kernel of one variant under ``io``."""
    key = (rule, tuple(sorted(flags.items())), tuple(writes), io, bool(clip))
    fn = _tables.get(key)
    if fn is None:
        fn = _tables[key] = cuda.jit(table_python_kernel(rule, flags, tuple(writes), io, clip))
    return fn


def _norm_factory(lg, CT, view, scale, threads):
    """The partial-sum kernel and the finish kernel of the gradient norm (accumulating in
    ``CT``; ``scale``: None, "host" or "device")."""
    import math

    device_scale, host_scale = scale == "device", scale == "host"

    def sumsq(table, width, chunks, nchunks, chunk, gl, isz, x, gs, partials):
        if device_scale:
            inv = CT(1) / CT(gs[0])
        elif host_scale:
            inv = x[0]
        else:
            inv = CT(1)
        acc = CT(0)
        c = cuda.blockIdx.x
        while c < nchunks:
            e = chunks[c]
            j = e >> 32
            base = (e & 0xFFFFFFFF) * chunk
            cnt = min(base + chunk, table[j, 0]) - base
            g = view(table[j, 2] + base * isz, cnt, gl)
            part = CT(0)
            i = cuda.threadIdx.x
            while i < cnt:
                v = CT(lg(g[i])) * inv
                part += v * v
                i += cuda.blockDim.x
            acc += part
            c += cuda.gridDim.x
        red = cuda.shared.array(threads, CT)
        t = cuda.threadIdx.x
        red[t] = acc
        cuda.syncthreads()
        s = cuda.blockDim.x // 2
        while s > 0:
            if t < s:
                red[t] += red[t + s]
            cuda.syncthreads()
            s //= 2
        if t == 0:
            partials[cuda.blockIdx.x] = red[0]

    def finish(partials, count, max_norm, out, out_f):
        t = cuda.threadIdx.x
        acc = CT(0)
        i = t
        while i < count:
            acc += partials[i]
            i += cuda.blockDim.x
        red = cuda.shared.array(threads, CT)
        red[t] = acc
        cuda.syncthreads()
        s = cuda.blockDim.x // 2
        while s > 0:
            if t < s:
                red[t] += red[t + s]
            cuda.syncthreads()
            s //= 2
        if t == 0:
            norm = CT(math.sqrt(red[0]))
            coef = (CT(1) / (norm + CT(1e-6))) * max_norm
            if coef > CT(1):  # clamp(max=1): NaN stays NaN
                coef = CT(1)
            out[0] = norm
            out[1] = coef
            out_f[0] = np.float32(norm)
            out_f[1] = np.float32(coef)

    return sumsq, finish


_norms: dict[Any, Any] = {}


def norm_kernels(grad, acc, scale):
    """The cached ``cuda.jit`` (partial sums, finish) of the gradient norm."""
    key = (grad, acc, scale)
    fns = _norms.get(key)
    if fns is None:
        conv = storage.make_converters(lambda f: cuda.jit(device=True, inline="always")(f), acc)
        sumsq, finish = _norm_factory(
            conv["load"][grad], getattr(np, acc), _view_fn(), scale, THREADS
        )
        fns = _norms[key] = (cuda.jit(sumsq), cuda.jit(finish))
    return fns


_placeholders: dict[Any, Any] = {}


def tensor_table(rule, io, tensors, chunk=None):
    """``cupy_backend.tensor_table`` on this backend: the checked ``_launch.TensorTable`` of
    ``tensors`` (``[(param, grad, slots, master)]`` on one GPU; host arrays under the
    simulator), for ``launch_table``."""
    if not tensors:
        raise ValueError("an empty list of tensors")
    kind, _ = _launch.describe(tensors[0][0], "tensor 0 param")[3]
    if SIMULATOR:
        blocks = _SIM_BLOCKS
    else:
        if kind != "cuda":
            raise ValueError(f"tensor 0 is on {kind}; the numba-cuda backend steps CUDA arrays")
        sms = int(cuda.get_current_device().MULTIPROCESSOR_COUNT)
        blocks = sms * _launch.blocks_per_sm(64, THREADS)
    return _launch.TensorTable(rule, io, tensors, chunk=chunk, blocks=blocks)


def _small(dtype, dev):
    """A one-element device array of ``dtype`` (a typed placeholder; host under the
    simulator), one per (dtype, device)."""
    key = (np.dtype(dtype).str, dev)
    a = _placeholders.get(key)
    if a is None:
        host = np.zeros(1, dtype)
        a = _placeholders[key] = host if SIMULATOR else cuda.to_device(host)
    return a


def _upload(table, ptr):
    """The table's device copies on the current device (host arrays under the simulator)."""
    if SIMULATOR:
        table.device_rows, table.device_chunks = table.rows, table.chunks.view(np.int64)
        table.stale = table.stale_chunks = False
        return
    st = _stream(ptr)
    if table.device_rows is None or table.device_rows.shape != table.rows.shape:
        table.device_rows = cuda.to_device(table.rows, stream=st)
        table.stale = False
    elif table.stale:  # in place: a captured launch keeps reading the table at its address
        table.device_rows.copy_to_device(table.rows, stream=st)
        table.stale = False
    if table.stale_chunks or table.device_chunks is None:
        table.device_chunks = cuda.to_device(table.chunks.view(np.int64), stream=st)
        table.stale_chunks = False


def _arg(a, dev, name):
    """A device array argument; a 0-d one (GradScaler's scale and found-inf tensors) as its
    1-element view, which the kernels index."""
    v = a if SIMULATOR else _device_view(a, name)
    return v.reshape(1) if getattr(v, "ndim", 1) == 0 else v


def _table_blocks(nchunks):
    if SIMULATOR:
        return min(nchunks, _SIM_BLOCKS), _SIM_THREADS
    return min(nchunks, 1 << 20), THREADS


def _on_table_device(table, fn):
    index = table.device[1]
    if not SIMULATOR and index is not None and index != cuda.get_current_device().id:
        with cuda.gpus[index]:
            return fn()
    return fn()


def launch_table(rule, flags, io, table, k, extras=None, clip=None, stream=None):
    """``cupy_backend.launch_table`` on this backend: one launch of the ``flags`` variant of
    ``rule`` under ``io`` over every tensor of ``table`` (``_launch.TensorTable``), checked
    against the variant and the storage format first; ``extras`` and ``clip`` as there, ``stream`` a
    CUDA stream handle (None: the default stream). Under the simulator the tensors are host
    arrays. A table of quantized state (``io.quant``) launches ``numba_cuda_quant``'s kernel."""
    table.check(rule, flags, io)
    if not io.kbuf and len(k) != len(RULES[rule].scalars):
        raise ValueError(f"k: {len(k)} scalars; {rule} takes {len(RULES[rule].scalars)}")
    writes = tuple(RULES[rule].slots_used(flags))
    ex = extras or {}
    if clip is not None:
        want = np.dtype(io.compute)
        if _dtype(clip) != want or int(np.prod(clip.shape)) < 2:
            raise ValueError(f"clip: {_dtype(clip)}{tuple(clip.shape)}; expected {want}[2]")
    needed = {"kbuf": io.kbuf, "scale": io.scale == "device", "found_inf": io.found_inf}
    needed["keyp"] = io.kbuf and io.sr
    for name, need in needed.items():
        if need and ex.get(name) is None:
            raise ValueError(f"{name}: the storage format {io} reads it from the device")
    if table.nchunks == 0:
        return
    if io.quant is not None:  # quantized state: a block of codes per chunk (numba_cuda_quant)
        from . import numba_cuda_quant

        numba_cuda_quant.launch_table(rule, flags, io, table, k, ex, clip, stream)
        return

    def run():
        dev = None if SIMULATOR else cuda.get_current_device().id
        ptr = 0 if stream is None else stream
        _upload(table, ptr)
        ct = np.dtype(io.compute).type
        scalars = tuple(ct(x) for x in k)
        inv = ex.get("inv_scale")
        x: tuple[Any, ...] = (ct(1.0 if inv is None else inv), np.int64(ex.get("salt", 0)))
        x += (np.int64(ex.get("key", 0)),)
        likes = [_small(_like_dtype(kd), dev) for kd in (io.param, io.grad, io.state)]
        likes.append(_small(np.dtype(io.kind("master")), dev))
        hole = likes[0]
        devs = [
            hole if ex.get(n) is None else _arg(ex[n], dev, n)
            for n in ("kbuf", "scale", "found_inf", "keyp")
        ]
        cl = hole if clip is None else _arg(clip, dev, "clip")
        args = (table.device_rows, table.device_chunks, np.int64(table.nchunks))
        args += (np.int64(table.chunk), *likes, scalars, x, *devs, cl)
        fn = table_kernel(rule, flags, writes, io, clip is not None)
        blocks, threads = _table_blocks(table.nchunks)
        if SIMULATOR:
            fn[blocks, threads](*args)
        else:
            _configured(fn, blocks, threads, ptr, dev)(*args)

    _on_table_device(table, run)


class GradNorm:
    """``cupy_backend.GradNorm`` on this backend: the global L2 norm of the unscaled gradients
    of ``tables`` and the clip coefficient in device memory (``out``, and its float32 copy
    ``out_f``), deterministic (per-block partials, then one block in a fixed order)."""

    def __init__(self, tables, scale=None):
        if not tables:
            raise ValueError("GradNorm of no tables")
        self.tables, self.scale = list(tables), scale
        self.acc = "float64" if any(t.io.compute == "float64" for t in tables) else "float32"
        if len({t.device for t in self.tables}) > 1:
            raise ValueError("GradNorm: tables on more than one device")
        if SIMULATOR:
            wave = _SIM_BLOCKS
        else:
            wave = launch_config(1 << 62, 32)[0]
        self.grids = [min(t.nchunks, wave) for t in self.tables]
        dt = np.dtype(self.acc)
        host = [np.zeros(max(1, sum(self.grids)), dt), np.zeros(2, dt), np.zeros(2, np.float32)]
        arrays = host if SIMULATOR else [cuda.to_device(a) for a in host]
        self.partials: Any
        self.out: Any
        self.out_f: Any
        self.partials, self.out, self.out_f = arrays

    def coef(self, compute):
        """The ``clip=`` buffer of a launch computing in ``compute``."""
        return self.out if compute == self.acc else self.out_f

    def __call__(self, max_norm, extras=None, stream=None):
        ex = extras or {}
        ct = np.dtype(self.acc).type
        ptr = 0 if stream is None else stream
        threads = _SIM_THREADS if SIMULATOR else THREADS

        def run():
            dev = None if SIMULATOR else cuda.get_current_device().id
            x = (ct(ex.get("inv_scale", 1.0)),)
            gs = _small(np.float32, dev)
            if self.scale == "device":
                gs = _arg(ex["scale"], dev, "scale")
            offset = 0
            for t, grid in zip(self.tables, self.grids):
                if grid == 0:
                    continue
                _upload(t, ptr)
                sumsq, _ = norm_kernels(t.io.grad, self.acc, self.scale)
                gl = _small(_like_dtype(t.io.grad), dev)
                isz = np.int64(storage.ITEMSIZE[t.io.grad])
                part = self.partials[offset : offset + grid]
                args: tuple[Any, ...] = (t.device_rows, np.int64(len(t.columns)), t.device_chunks)
                args += (np.int64(t.nchunks), np.int64(t.chunk), gl, isz, x, gs, part)
                if SIMULATOR:
                    sumsq[grid, threads](*args)
                else:
                    _configured(sumsq, grid, threads, ptr, dev)(*args)
                offset += grid
            _, finish = norm_kernels(self.tables[0].io.grad, self.acc, self.scale)
            args = (self.partials, np.int64(offset), ct(max_norm), self.out, self.out_f)
            if SIMULATOR:
                finish[1, threads](*args)
            else:
                _configured(finish, 1, threads, ptr, dev)(*args)

        _on_table_device(self.tables[0], run)
        return self.out


def step_runner(plan, dtype, writes, io):
    """The backend protocol's runner (``backends.protocol``): ``launch`` per call."""
    return protocol.launch_runner(launch, plan, io)


#: name -> the cuda.jit kernel of a per-element function that is no spec rule
_element_kernels: dict[Any, Any] = {}


def element_runner(name, make_elem, nslots):
    """``run(param, grad, states, k)`` for a per-element function that is no spec rule (the
    textbook's chapters; see ``numba_backend.element_runner``): this backend's grid-stride
    kernel (``kernel_source``, every slot present) around ``make_elem()`` compiled as a device
    function, launched on the arrays' device. Unchecked, like ``launch``."""

    def run(param, grad, states, k):
        n = int(param.shape[0])
        if n == 0:
            return
        fn = _element_kernels.get(name)
        if fn is None:
            elem = cuda.jit(device=True, inline="always")(make_elem())
            ns = {"__name__": __name__, "cuda": cuda}
            kname = name.replace(".", "_").lower()
            exec(compile(kernel_source(kname, nslots, (True,) * nslots), __file__, "exec"), ns)
            fn = _element_kernels[name] = cuda.jit(ns["factory"](elem))
        if SIMULATOR and isinstance(param, np.ndarray):  # CI: host arrays in the simulator
            blocks, threads = launch_config(n)  # (it copies every argument back: a writable grad)
            fn[blocks, threads](param, grad if grad.flags.writeable else grad.copy(), *states, k)
            return
        param, grad = _launch.plain_view(param), _launch.plain_view(grad)
        states = tuple(_launch.plain_view(s) for s in states)
        key = (name, (), (True,) * len(states), np.dtype(param.dtype).name)
        dev = _device_index(param)
        if isinstance(dev, int) and dev != cuda.get_current_device().id:
            with cuda.gpus[dev]:  # where the arrays live, whatever device is current
                _launch_device(fn, key, n, param, grad, states, k)
        else:
            _launch_device(fn, key, n, param, grad, states, k)

    return run
