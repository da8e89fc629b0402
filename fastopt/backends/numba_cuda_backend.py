"""Numba CUDA backend: each rule from ``kernels/`` as a device function in a grid-stride kernel.

The per-element rule is the very function the CPU backend inlines (``make_rule(**flags)``),
compiled here by ``numba.cuda.jit(device=True)``; one kernel per (rule, flag variant, state slots
present) is built once and cached. Absent state slots cost no memory traffic: the kernel variant
never loads or stores them (the param array only fills the argument position). The host scalars
arrive as one tuple in the buffer dtype, so float32 kernels stay float32 and a new lr or step
never recompiles. The grid is sized from the device's multiprocessor count and every thread
walks the buffer with a grid-stride loop on 64-bit indices, so any n works with one launch.

Arrays must already live on the GPU (CuPy, Numba device arrays, PyTorch CUDA tensors, anything
with ``__cuda_array_interface__``): a launch copies nothing between host and device. Kernels run
on CuPy's current stream for CuPy arrays, on the producer's stream for other arrays that export
one, else on the default stream. Under the Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) host
NumPy arrays are accepted, which is how CI checks these kernels without a GPU.
"""
import inspect
import itertools
import os
import sys

import numpy as np

from ..kernels import RULES
from ..kernels.fma import fma

__all__ = [
    "BLOCKS_PER_SM",
    "DEVICE",
    "NAME",
    "SIMULATOR",
    "THREADS",
    "available",
    "kernel",
    "launch",
    "launch_config",
    "python_kernel",
    "variants",
    "why_unavailable",
]

NAME = "numba-cuda"

#: threads per block; a multiple of the warp size that keeps occupancy full on sm_80/sm_90
THREADS = 256
#: resident blocks per multiprocessor the grid is sized for (2048 threads / 256 on sm_80+)
BLOCKS_PER_SM = 8
#: True when Numba runs CUDA kernels in its Python simulator
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")
#: where the arrays live: GPU memory, or host memory when the simulator runs the kernels on the CPU
DEVICE = "cpu" if SIMULATOR else "cuda"
# The simulator runs one Python thread per CUDA thread: a tiny grid keeps it fast, and a grid
# smaller than n makes the grid-stride loop take several trips, which is what CI must see.
_SIM_THREADS, _SIM_BLOCKS = 32, 4

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


try:
    from numba import cuda
except ImportError as _exc:  # numba-cuda (or numba's built-in CUDA target) is missing
    cuda = None
    _import_error = f"numba.cuda cannot be imported: {_exc}"
else:
    _import_error = ""
    if not SIMULATOR:  # the simulator runs the rules as Python: kernels/fma.py itself
        _register_fma()

_compiled = {}
_sm_count = {}
_streams = {}


def available():
    if cuda is None:
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # noqa: BLE001 - a broken driver install reads as "no GPU"
        return False


def why_unavailable():
    if cuda is None:
        return _import_error + " (install fastopt[cuda12] or fastopt[cuda13])"
    if not available():
        return ("numba.cuda finds no usable CUDA GPU and driver "
                "(cuda.is_available() is False; cuda.detect() says why)")
    return ""


def _kernel1(elem, write):
    # rules with one state slot: sgd (momentum_buffer), adagrad (sum), lion (exp_avg)
    def fastopt_kernel1(p, g, s0, k):
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for i in range(start, p.shape[0], stride):
            pi = p[i]
            a = s0[i] if write else pi
            pi, a = elem(pi, g[i], a, k)
            p[i] = pi
            if write:
                s0[i] = a

    return fastopt_kernel1


def _kernel3(elem, w0, w1, w2):
    # rules with three state slots: rmsprop (square_avg, grad_avg, momentum_buffer) and
    # adam (exp_avg, exp_avg_sq, max_exp_avg_sq); an absent slot is neither loaded nor stored
    def fastopt_kernel3(p, g, s0, s1, s2, k):
        start = cuda.grid(1)
        stride = cuda.gridsize(1)
        for i in range(start, p.shape[0], stride):
            pi = p[i]
            a = s0[i] if w0 else pi
            b = s1[i] if w1 else pi
            c = s2[i] if w2 else pi
            pi, a, b, c = elem(pi, g[i], a, b, c, k)
            p[i] = pi
            if w0:
                s0[i] = a
            if w1:
                s1[i] = b
            if w2:
                s2[i] = c

    return fastopt_kernel3


def python_kernel(rule, flags, writes):
    """The uncompiled kernel function of one variant (what ``kernel`` hands to ``cuda.jit``)."""
    mod = RULES[rule]
    if len(writes) != len(mod.STATE):
        raise ValueError(f"rule {rule!r} has {len(mod.STATE)} state slots {mod.STATE}, "
                         f"got {len(writes)} write flags")
    elem = cuda.jit(device=True, inline="always")(mod.make_rule(**flags))
    if len(writes) == 1:
        return _kernel1(elem, writes[0])
    return _kernel3(elem, *writes)


def _slots_present(rule, flags):
    # which state slots fastopt.functional passes for a flag variant (None for the others)
    if rule == "sgd":
        return (flags["momentum"],)
    if rule == "rmsprop":
        return (True, flags["centered"], flags["momentum"])
    if rule == "adam":
        return (True, True, flags["amsgrad"])
    return (True,) * len(RULES[rule].STATE)


def variants(rules=None):
    """Every (rule, flags, writes) variant ``fastopt.functional`` can launch: all flag
    combinations of each rule (Nesterov only with momentum), with the state slots they use."""
    out = []
    for rule in rules or RULES:
        names = list(inspect.signature(RULES[rule].make_rule).parameters)
        for values in itertools.product((False, True), repeat=len(names)):
            flags = dict(zip(names, values))
            if rule == "sgd" and flags["nesterov"] and not flags["momentum"]:
                continue
            out.append((rule, flags, _slots_present(rule, flags)))
    return out


def kernel(rule, flags, writes):
    """The cached ``cuda.jit`` kernel of one variant (compiled lazily per argument types)."""
    key = (rule, tuple(sorted(flags.items())), tuple(writes))
    fn = _compiled.get(key)
    if fn is None:
        fn = _compiled[key] = cuda.jit(python_kernel(rule, flags, tuple(writes)))
    return fn


def launch_config(n):
    """(blocks, threads) for ``n`` elements: enough blocks to fill every multiprocessor, no more
    than the work needs; the grid-stride loop covers the rest."""
    if SIMULATOR:
        return max(1, min(_SIM_BLOCKS, -(-n // _SIM_THREADS))), _SIM_THREADS
    dev = cuda.get_current_device()
    sms = _sm_count.get(dev.id)
    if sms is None:
        sms = _sm_count[dev.id] = int(dev.MULTIPROCESSOR_COUNT)
    return max(1, min(sms * BLOCKS_PER_SM, -(-n // THREADS))), THREADS


def _stream_ptr(a):
    """The CUDA stream handle work on ``a`` should be ordered on (0: the default stream)."""
    cp = sys.modules.get("cupy")
    if cp is not None and isinstance(a, cp.ndarray):
        return cp.cuda.get_current_stream().ptr
    # __cuda_array_interface__ v3: "stream" is the producer's stream; 1 and 2 name the legacy and
    # per-thread default streams, None means the producer promises no pending work
    s = a.__cuda_array_interface__.get("stream")
    return s if isinstance(s, int) and s > 2 else 0


def _stream(ptr):
    if ptr == 0:
        return cuda.default_stream()
    st = _streams.get(ptr)
    if st is None:
        if len(_streams) > 64:  # short-lived streams: do not keep wrappers forever
            _streams.clear()
        st = _streams[ptr] = cuda.external_stream(ptr)
    return st


def _device_view(a, name):
    if isinstance(a, np.ndarray) or not hasattr(a, "__cuda_array_interface__"):
        raise TypeError(f"the numba-cuda backend updates device arrays in place; {name} is a "
                        f"host {type(a).__name__} of shape {tuple(a.shape)} and dtype {a.dtype}. "
                        "Pass CuPy arrays, Numba device arrays or CUDA tensors, or use "
                        "backend='numba' for host arrays")
    if cuda.is_cuda_array(a) and type(a).__module__.startswith("numba"):
        return a
    # sync=False: ordering comes from launching on the producer's stream, not from a host sync
    return cuda.as_cuda_array(a, sync=False)


def launch(rule, flags, param, grad, states, k):
    n = int(param.shape[0])
    if n == 0:
        return
    writes = tuple(s is not None for s in states)
    dtype = np.dtype(param.dtype)
    scalars = tuple(dtype.type(x) for x in k)
    fn = kernel(rule, flags, writes)
    blocks, threads = launch_config(n)
    if SIMULATOR and isinstance(param, np.ndarray):
        # the simulator copies every host argument in and back out, so the param array must not
        # fill an absent slot (its stale copy would land last); an empty view never indexed does
        arrays = [param, grad] + [param[:0] if s is None else s for s in states]
        fn[blocks, threads](*arrays, scalars)
        return
    dev = getattr(getattr(param, "device", None), "id", None)  # CuPy arrays say which GPU
    if isinstance(dev, int) and dev != cuda.get_current_device().id:
        with cuda.gpus[dev]:  # launch where the arrays live, not on Numba's current device
            _launch_device(fn, blocks, threads, param, grad, states, scalars)
    else:
        _launch_device(fn, blocks, threads, param, grad, states, scalars)


def _launch_device(fn, blocks, threads, param, grad, states, scalars):
    ptr = _stream_ptr(param)
    p = _device_view(param, "param")
    arrays = [p, _device_view(grad, "grad")]
    arrays += [p if s is None else _device_view(s, f"state slot {i}") for i, s in enumerate(states)]
    fn[blocks, threads, _stream(ptr)](*arrays, scalars)

