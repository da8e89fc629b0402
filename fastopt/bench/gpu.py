"""GPU timing and ceilings for the ``cupy`` and ``numba-cuda`` backends (imported only when used).

Timing records a CUDA event before and after the call and waits on the second one, so a
repetition measures the device time of everything the call launched, not the launch. Events of
CuPy and Numba are recorded on the legacy default stream, which orders itself with every other
blocking stream. The same-traffic kernels mirror ``_bench_cpu``: one per number of state
buffers, one multiply-add per buffer, on the backend being measured (a CuPy
``ElementwiseKernel`` here, ``numba.cuda`` kernels in ``_bench_numba_cuda``), plus a
device-to-device copy; CuPy also gets a vectorised same-traffic kernel (16-byte loads, the
skeleton of the optimizer's raw kernel: ``kernels.cuda_source.grid_stride_kernel``), the ceiling
its vectorised optimizer kernels are held to. ``latency`` measures small steps against an empty
kernel launch, per call and back to back.

Data for GPU groups is drawn on the device (``device_data``) and cached per size, so a 2^28
group does not spend seconds drawing 2^28 normal numbers on the host.
"""

import statistics
import time

from .measure import Runner, bytes_per_step

__all__ = [
    "EventTimer",
    "copy_runner",
    "device_data",
    "empty_runner",
    "gpu_name",
    "latency",
    "timer_for",
    "to_device",
    "traffic_runner",
    "vector_traffic_runner",
]

_cupy_kernels = {}
_data = {}


class EventTimer:
    """Time per call on the device, from two CUDA events around the calls.

    A call shorter than ``BATCH_S`` is timed over a batch of back-to-back calls (the batch is
    sized from the previous measurement, at most ``MAX_BATCH``): one call between two events
    would count the host's time to issue it as device time, since the GPU idles from the start
    event until the launch arrives. Back to back, the host issues the next call while the GPU
    runs this one, as in a training loop; host time shows only where it exceeds device time
    (``latency`` reports both views for small steps)."""

    device = "cuda"
    BATCH_S = 1e-3
    MAX_BATCH = 64

    def __init__(self, new_event, elapsed_ms, synchronize):
        self._new, self._elapsed, self.sync = new_event, elapsed_ms, synchronize
        self.batch = 1

    def time(self, fn):
        start, end = self._new(), self._new()
        batch = self.batch
        start.record()
        for _ in range(batch):
            fn()
        end.record()
        end.synchronize()
        t = self._elapsed(start, end) / 1e3 / batch
        if t > 0:
            self.batch = max(1, min(self.MAX_BATCH, int(self.BATCH_S / t)))
        return t

    def time_one(self, fn):
        """Events around exactly one call (host issue time included)."""
        start, end = self._new(), self._new()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return self._elapsed(start, end) / 1e3


def timer_for(kind):
    """An ``EventTimer`` using the events of ``kind``: "cupy", "numba-cuda" or "torch"."""
    if kind == "cupy":
        import cupy

        return EventTimer(
            cupy.cuda.Event, cupy.cuda.get_elapsed_time, cupy.cuda.Device().synchronize
        )
    if kind == "numba-cuda":
        from numba import cuda

        return EventTimer(
            cuda.event,
            lambda a, b: a.elapsed_time(b),  # timing=True by default
            cuda.synchronize,
        )
    if kind == "torch":
        import torch

        return EventTimer(
            lambda: torch.cuda.Event(enable_timing=True),
            lambda a, b: a.elapsed_time(b),
            torch.cuda.synchronize,
        )
    raise ValueError(f"no GPU timer for {kind!r}; expected 'cupy', 'numba-cuda' or 'torch'")


def gpu_name():
    """Name of the current CUDA device, or None when no GPU is usable."""
    try:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    try:
        from numba import cuda

        if cuda.is_available():
            name = cuda.get_current_device().name
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        pass
    return None


def to_device(a):
    """A CuPy copy of ``a`` (host or device; never the same memory)."""
    import cupy

    return cupy.array(a, copy=True)


def device_data(n, dtype, seed=0):
    """Random params and grads on the GPU (as ``measure.host_data``: standard normal params,
    grads scaled by 1e-2; never zeros), drawn once per (n, dtype, seed) and cached; callers
    copy them (``to_device``) before writing."""
    import cupy

    key = (int(n), str(dtype), seed)
    if key not in _data:
        _data.clear()  # one size at a time: a 2^28 pair is 2 GiB
        rng = cupy.random.default_rng(seed)
        p = rng.standard_normal(int(n), dtype=dtype)
        g = rng.standard_normal(int(n), dtype=dtype)
        g *= g.dtype.type(1e-2)
        _data[key] = (p, g)
    return _data[key]


def _cupy_traffic(n_state):
    import cupy

    outs = ", ".join(["T p"] + [f"T s{j}" for j in range(n_state)])
    body = " ".join(["p = p + c * g;"] + [f"s{j} = s{j} + c * g;" for j in range(n_state)])
    return cupy.ElementwiseKernel("T g, T c", outs, body, f"fastopt_traffic{n_state}")


def traffic_runner(backend, n_state, p0, g0):
    """Same-traffic kernel on ``backend`` ("cupy" or "numba-cuda") over device copies of the
    host arrays ``p0``/``g0`` and ``n_state`` zeroed state buffers."""
    import cupy

    p, g = to_device(p0), to_device(g0)
    states = [cupy.zeros_like(p) for _ in range(n_state)]
    c = p0.dtype.type(1e-3)
    if backend == "cupy":
        key = ("cupy", n_state)
        if key not in _cupy_kernels:
            _cupy_kernels[key] = _cupy_traffic(n_state)
        kern = _cupy_kernels[key]
        fn = lambda: kern(g, c, p, *states)
    elif backend == "numba-cuda":
        from numba import cuda

        from .ceilings_numba_cuda import launcher

        arrs = [cuda.as_cuda_array(a) for a in (p, g, *states)]
        fn = launcher(n_state, p.size, *arrs, c)
    else:
        raise ValueError(f"no GPU ceiling for backend {backend!r}")
    return Runner(
        f"ceiling:{backend}",
        fn,
        timer_for(backend),
        bytes_per_step(n_state, p.size, p.dtype),
        keep=(p, g, states),
    )


def _vector_traffic(n_state, ctype):
    import cupy

    from ..backends import _launch
    from ..kernels import cuda_source

    key = ("vec", n_state, ctype)
    if key not in _cupy_kernels:
        width = cuda_source.VECTOR_WIDTH[ctype]
        arrays = [("g", False), ("p", True)] + [(f"s{j}", True) for j in range(n_state)]

        def lane(ref):
            return [f"const T g_ = {ref('g')};"] + [
                f"{ref(a)} = {ref(a)} + c * g_;" for a, w in arrays if w
            ]

        name = f"fastopt_traffic{n_state}_vec"
        src = f"typedef {ctype} T;\n" + cuda_source.grid_stride_kernel(
            name, ctype, width, arrays, ("c",), lane
        )
        kern = cupy.RawKernel(src, name)
        per_sm = _launch.blocks_per_sm(kern.num_regs)
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        _cupy_kernels[key] = (kern, width, sms * per_sm)
    return _cupy_kernels[key]


def vector_traffic_runner(n_state, p0, g0):
    """The same traffic as ``traffic_runner`` through CuPy with 16-byte vector loads and a
    scalar tail, one wave of resident blocks: the ceiling of the vectorised optimizer kernels."""
    import cupy
    import numpy as np

    from ..backends import _launch
    from ..kernels import cuda_source

    p, g = to_device(p0), to_device(g0)
    states = [cupy.zeros_like(p) for _ in range(n_state)]
    kern, width, wave = _vector_traffic(n_state, cuda_source.CTYPES[p.dtype.name])
    c, n = p.dtype.type(1e-3), np.int64(p.size)
    blocks = _launch.grid_size(max(1, p.size // width), 1, wave)
    fn = lambda: kern((blocks,), (_launch.THREADS,), (g, p, *states, c, n))
    return Runner(
        "ceiling-vec:cupy",
        fn,
        timer_for("cupy"),
        bytes_per_step(n_state, p.size, p.dtype),
        keep=(p, g, states),
    )


def empty_runner(backend="cupy"):
    """An empty kernel, one block of one thread: the floor of any launch."""
    import cupy

    if "empty" not in _cupy_kernels:
        _cupy_kernels["empty"] = cupy.RawKernel(
            'extern "C" __global__ void fastopt_empty() {}', "fastopt_empty"
        )
    kern = _cupy_kernels["empty"]
    return Runner(f"empty:{backend}", lambda: kern((1,), (1,), ()), timer_for("cupy"), 0)


def graph_runner(case, p0, g0, backend="cupy"):
    """One ``capturable=True`` step of ``case`` over a FlatBuffer of ``p0``, captured in a CUDA
    graph (on a side stream, after two eager warm-up steps) and replayed on the current stream:
    a whole step issued with one graph launch, its scalars computed on the device. What a
    training loop that captures its step (as with ``torch.cuda.graphs``) pays per step."""
    import cupy

    import fastopt

    from .measure import Runner, bytes_per_step

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        buf = fastopt.FlatBuffer({"w": to_device(p0)})
        buf.grads["w"][...] = g0
        opt = getattr(fastopt, case.cls)(**case.fastopt_kwargs, capturable=True, backend=backend)
        for _ in range(2):  # kernels compiled, state and device scalars created
            opt.step(buf)
        stream.begin_capture()
        opt.step(buf)
        graph = stream.end_capture()
    stream.synchronize()
    return Runner(
        f"graph:{backend}",
        lambda: graph.launch(),
        timer_for("cupy"),
        bytes_per_step(case.n_state, p0.size, p0.dtype, n_read=case.n_read),
        keep=(buf, opt, graph, stream),
    )


def latency(runners, calls=200, rounds=7):
    """Small-step latency of each ``Runner`` (label -> runner), two ways: ``event_s`` (median
    device time between events around one call, which includes any time the GPU waited for the
    host) and ``pipelined_s`` (``calls`` calls back to back, then one synchronize, per call: what
    a training loop sees when the host and the GPU overlap). Returns label -> dict."""
    out = {}
    for label, r in runners.items():
        for _ in range(10):
            r.fn()
        r.timer.sync()
        ev = [r.timer.time_one(r.fn) for _ in range(calls)]
        piped = []
        for _ in range(rounds):
            r.timer.sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                r.fn()
            r.timer.sync()
            piped.append((time.perf_counter() - t0) / calls)
        host = []
        for _ in range(rounds):  # host time of issuing one call (the launch path alone)
            t0 = time.perf_counter()
            r.fn()
            host.append(time.perf_counter() - t0)
            r.timer.sync()
        out[label] = {
            "event_s": statistics.median(ev),
            "event_times_s": ev,
            "pipelined_s": statistics.median(piped),
            "pipelined_times_s": piped,
            "host_issue_s": statistics.median(host),
            "bytes": r.bytes,
        }
    return out


def copy_runner(backend, p0):
    """A device-to-device copy on ``backend`` (bytes = read + written)."""
    import cupy

    src = to_device(p0)
    dst = cupy.empty_like(src)
    if backend == "cupy":
        fn = lambda: cupy.copyto(dst, src)
    elif backend == "numba-cuda":
        from numba import cuda

        from .ceilings_numba_cuda import launcher

        fn = launcher("copy", src.size, cuda.as_cuda_array(dst), cuda.as_cuda_array(src))
    else:
        raise ValueError(f"no GPU copy for backend {backend!r}")
    return Runner(f"copy:{backend}", fn, timer_for(backend), 2 * src.nbytes, keep=(src, dst))
