"""GPU timing and ceilings for the ``cupy`` and ``numba-cuda`` backends (imported only when used).

Timing records a CUDA event before and after the call and waits on the second one, so a
repetition measures the device time of everything the call launched, not the launch. Events of
CuPy and Numba are recorded on the legacy default stream, which orders itself with every other
blocking stream.

What a GPU figure is held against, all measured in the same group as the step:

- ``bytes_traffic_runner``: the same-traffic kernel, one CuPy raw kernel that moves exactly the
  step's arrays (each at its own size, read, written or both, as the step does:
  ``measure.traffic_arrays``) with 16-byte loads and stores and one wave of resident blocks,
  the skeleton of the optimizer's vectorised kernel with no math: the ceiling of a step of that
  traffic;
- ``memcpy_runner``: a device-to-device ``cudaMemcpyAsync`` of the param's bytes;
- ``rated_bandwidth``: the memory bandwidth NVIDIA rates the device at (a data-sheet figure,
  not a measurement), looked up by the device's name read at run time.

The older kernels stay as labelled references, never ceilings: ``traffic_runner`` (a CuPy
``ElementwiseKernel`` or numba-cuda's scalar loop with one multiply-add per buffer: the
optimizers' vectorised kernels beat the CuPy one by up to half again) and ``copy_runner``
(``cupy.copyto``, a copy kernel, or numba-cuda's scalar copy loop). The runs of 2026-11-26
held the CuPy rows against a float-typed form of the same-traffic kernel that read every state
buffer (ASGD's write-only average included) and copied with ``cupy.copyto``.
``latency`` measures small steps against an empty kernel launch, per call and back to back;
``torch_graph_runner`` replays any step captured with ``torch.cuda.graph``.

Data for GPU groups is drawn on the device (``device_data``) and cached per size, so a 2^28
group does not spend seconds drawing 2^28 normal numbers on the host.
"""

import statistics
import time

from .measure import Runner, bytes_per_step

__all__ = [
    "RATED_BANDWIDTH",
    "EventTimer",
    "bytes_traffic_runner",
    "copy_runner",
    "device_data",
    "empty_runner",
    "gpu_name",
    "latency",
    "memcpy_runner",
    "rated_bandwidth",
    "release_memory",
    "timer_for",
    "to_device",
    "torch_graph_runner",
    "traffic_runner",
    "traffic_source",
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


def latency(runners, calls=30, rounds=7):
    """Small-step latency of each ``Runner`` (label -> runner), in ``rounds`` interleaved rounds
    (each visits every runner, in reverse order every other round), three ways: ``event_s``
    (device time between events around one call, which includes any time the GPU waited for
    the host: ``calls`` calls a round), ``pipelined_s`` (``calls`` calls back to back, then one
    synchronize, per call: what a training loop sees when the host and the GPU overlap; one
    value a round) and ``host_issue_s`` (host time of issuing one call; one a round). Each is
    the median, with its ``*_spread`` and every value (``*_times_s``). Returns label -> dict."""
    from .measure import spread

    for r in runners.values():
        for _ in range(10):
            r.fn()
        r.timer.sync()
    ev = {k: [] for k in runners}
    piped = {k: [] for k in runners}
    host = {k: [] for k in runners}
    for rnd in range(rounds):
        keys = list(runners) if rnd % 2 == 0 else list(reversed(list(runners)))
        for label in keys:
            r = runners[label]
            r.timer.sync()
            ev[label] += [r.timer.time_one(r.fn) for _ in range(calls)]
            r.timer.sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                r.fn()
            r.timer.sync()
            piped[label].append((time.perf_counter() - t0) / calls)
            t0 = time.perf_counter()
            r.fn()
            host[label].append(time.perf_counter() - t0)
            r.timer.sync()
    out = {}
    for label, r in runners.items():
        out[label] = {"bytes": r.bytes, "rounds": rounds}
        for name, vals in (("event", ev), ("pipelined", piped), ("host_issue", host)):
            out[label][f"{name}_s"] = statistics.median(vals[label])
            out[label][f"{name}_spread"] = spread(vals[label])
            out[label][f"{name}_times_s"] = vals[label]
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


# -- what a GPU figure is held against -----------------------------------------------------------

#: memory bandwidth NVIDIA rates each device at, in bytes/s, matched in order against the
#: device's name as the driver reports it (a substring, case-insensitive): data-sheet figures,
#: never measurements. The H100 SXM5 reports itself as "NVIDIA H100 80GB HBM3".
RATED_BANDWIDTH = (
    ("H200", 4.8e12, "NVIDIA H200 data sheet (H200 SXM and NVL): 4.8 TB/s"),
    ("H100 NVL", 3.9e12, "NVIDIA H100 data sheet (H100 NVL): 3.9 TB/s"),
    ("H100 PCIe", 2.0e12, "NVIDIA H100 data sheet (H100 PCIe): 2 TB/s"),
    ("H100 80GB HBM3", 3.35e12, "NVIDIA H100 data sheet (H100 SXM): 3.35 TB/s"),
    ("H100 SXM", 3.35e12, "NVIDIA H100 data sheet (H100 SXM): 3.35 TB/s"),
)


def rated_bandwidth(name):
    """``(bytes/s, source)`` NVIDIA rates the device called ``name`` at, or ``(None, None)``
    for a device not in ``RATED_BANDWIDTH``."""
    if name:
        for key, bw, source in RATED_BANDWIDTH:
            if key.lower() in str(name).lower():
                return bw, source
    return None, None


#: the modes of an array in the same-traffic kernel: read, written, or read and written
MODES = ("r", "w", "rw")
#: bytes of one vector of the same-traffic kernel (a uint4)
VECTOR_BYTES = 16


def traffic_source(modes, name=None):
    """CUDA C of the same-traffic kernel for arrays of ``modes`` (each "r", "w" or "rw"): one
    grid-stride loop over 16-byte vectors, array j of ``n<j>`` vectors (arrays of different
    sizes: each is touched while the index is inside it). Every array read is folded into an
    accumulator that every array written stores, so no load can be dropped; no float math.
    Arguments: ``(unsigned c, long long nmax, a0, n0, a1, n1, ...)``. Returns
    ``(name, source)``."""
    modes = tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if not modes or bad:
        raise ValueError(f"modes {modes!r}: expected a non-empty sequence of {MODES}")
    name = name or "fastopt_traffic_" + "_".join(modes)
    params = ["const unsigned int c", "const long long nmax"]
    for j, m in enumerate(modes):
        const = "const " if m == "r" else ""
        params += [f"{const}uint4 *__restrict__ a{j}", f"const long long n{j}"]
    body = ["    unsigned int x = c;", "    uint4 v;"]
    for j, m in enumerate(modes):
        if m == "r":
            body.append(f"    if (i < n{j}) {{ v = a{j}[i]; x ^= v.x ^ v.y ^ v.z ^ v.w; }}")
    for j, m in enumerate(modes):
        if m == "rw":
            body.append(
                f"    if (i < n{j}) {{ v = a{j}[i]; x ^= v.x ^ v.y ^ v.z ^ v.w; v.x += x; "
                f"v.y += x; v.z += x; v.w += x; a{j}[i] = v; }}"
            )
    for j, m in enumerate(modes):
        if m == "w":
            body.append(
                f"    if (i < n{j}) {{ v.x = x; v.y = x + 1u; v.z = x + 2u; v.w = x + 3u; "
                f"a{j}[i] = v; }}"
            )
    src = "\n".join(
        [
            f'extern "C" __global__ void {name}(',
            "    " + ",\n    ".join(params) + ")",
            "{",
            "  const long long stride = (long long)gridDim.x * blockDim.x;",
            "  for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < nmax;"
            " i += stride) {",
            *body,
            "  }",
            "}",
        ]
    )
    return name, src


def _traffic_kernel(modes):
    import cupy

    from ..backends import _launch

    key = ("bytes", tuple(modes))
    if key not in _cupy_kernels:
        name, src = traffic_source(modes)
        kern = cupy.RawKernel(src, name)
        per_sm = _launch.blocks_per_sm(kern.num_regs)
        sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
        _cupy_kernels[key] = (kern, sms * per_sm)
    return _cupy_kernels[key]


def bytes_traffic_runner(arrays, label="same-traffic"):
    """The same-traffic kernel over fresh device arrays of ``arrays`` (``[(name, nbytes,
    mode)]``, as ``measure.traffic_arrays`` gives them), each rounded up to whole 16-byte
    vectors and filled with random bytes. Its bytes are what it moves: each array's
    (rounded) size once per read and once per write."""
    import cupy
    import numpy as np

    from ..backends import _launch

    modes = tuple(m for _, _, m in arrays)
    kern, wave = _traffic_kernel(modes)
    rng = cupy.random.default_rng(0)
    bufs, args, moved, nmax = [], [], 0, 0
    for _, nbytes, mode in arrays:
        nvec = max(1, -(-int(nbytes) // VECTOR_BYTES))
        buf = rng.random(4 * nvec, dtype=cupy.float32).view(cupy.uint32)
        bufs.append(buf)
        args += [buf, np.int64(nvec)]
        moved += len(mode) * nvec * VECTOR_BYTES
        nmax = max(nmax, nvec)
    blocks = _launch.grid_size(nmax, 1, wave)
    full = (np.uint32(0x9E3779B9), np.int64(nmax), *args)
    fn = lambda: kern((blocks,), (_launch.THREADS,), full)
    return Runner(
        label,
        fn,
        timer_for("cupy"),
        moved,
        info={"kind": "same-traffic kernel (CuPy RawKernel, 16-byte vectors)", "modes": modes},
        keep=bufs,
    )


def memcpy_runner(p0):
    """A device-to-device ``cudaMemcpyAsync`` of ``p0``'s bytes (a copy of ``p0`` into a fresh
    buffer, on CuPy's current stream); bytes = read + written."""
    import cupy

    src = to_device(p0)
    dst = cupy.empty_like(src)
    rt, nbytes = cupy.cuda.runtime, int(src.nbytes)

    def fn():
        stream = cupy.cuda.get_current_stream().ptr
        rt.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, rt.memcpyDeviceToDevice, stream)

    return Runner(
        "memcpy",
        fn,
        timer_for("cupy"),
        2 * nbytes,
        info={"kind": "cudaMemcpyAsync, device to device"},
        keep=(src, dst),
    )


def release_memory():
    """Give the memory pools' cached blocks back to the driver (CuPy's and torch's): a group's
    buffers freed, the next group's find the device's memory free."""
    import contextlib
    import sys

    _data.clear()
    with contextlib.suppress(Exception):
        if "cupy" in sys.modules:
            sys.modules["cupy"].get_default_memory_pool().free_all_blocks()
    with contextlib.suppress(Exception):
        if "torch" in sys.modules and sys.modules["torch"].cuda.is_available():
            sys.modules["torch"].cuda.empty_cache()


def torch_graph_runner(label, step, nbytes, warmup=3, keep=None, info=None):
    """``step`` (a zero-argument call launching CUDA work through torch) captured once in a
    CUDA graph with ``torch.cuda.graph`` after ``warmup`` eager calls on a side stream, as
    torch documents whole-network capture; the runner replays the graph."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    torch.cuda.synchronize()
    return Runner(
        label,
        graph.replay,
        timer_for("torch"),
        nbytes,
        info=dict(info or {}, graph=True),
        keep=(graph, keep),
    )
