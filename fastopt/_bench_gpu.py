"""GPU timing and ceilings for the ``cupy`` and ``numba-cuda`` backends (imported only when used).

Timing records a CUDA event before and after the call and waits on the second one, so a
repetition measures the device time of everything the call launched, not the launch. Events of
CuPy and Numba are recorded on the legacy default stream, which orders itself with every other
blocking stream. The same-traffic kernels mirror ``_bench_cpu``: one per number of state
buffers, one multiply-add per buffer, on the backend being measured (a CuPy
``ElementwiseKernel`` here, ``numba.cuda`` kernels in ``_bench_numba_cuda``), plus a
device-to-device copy.
"""
from ._bench import Runner, bytes_per_step

__all__ = ["EventTimer", "timer_for", "gpu_name", "to_device", "traffic_runner", "copy_runner"]

_cupy_kernels = {}


class EventTimer:
    """Device time of one call, from two CUDA events around it (after a synchronize)."""

    device = "cuda"

    def __init__(self, new_event, elapsed_ms, synchronize):
        self._new, self._elapsed, self.sync = new_event, elapsed_ms, synchronize

    def time(self, fn):
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

        return EventTimer(cupy.cuda.Event, cupy.cuda.get_elapsed_time,
                          cupy.cuda.Device().synchronize)
    if kind == "numba-cuda":
        from numba import cuda

        return EventTimer(cuda.event, lambda a, b: a.elapsed_time(b),  # timing=True by default
                          cuda.synchronize)
    if kind == "torch":
        import torch

        return EventTimer(lambda: torch.cuda.Event(enable_timing=True),
                          lambda a, b: a.elapsed_time(b), torch.cuda.synchronize)
    raise ValueError(f"no GPU timer for {kind!r}; expected 'cupy', 'numba-cuda' or 'torch'")


def gpu_name():
    """Name of the current CUDA device, or None when no GPU is usable."""
    try:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001 - no CuPy, no driver or no device: try Numba next
        pass
    try:
        from numba import cuda

        if cuda.is_available():
            name = cuda.get_current_device().name
            return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001
        pass
    return None


def to_device(a):
    """A CuPy copy of the host array ``a`` (the buffers FlatBuffer and both backends accept)."""
    import cupy

    return cupy.asarray(a)


def _cupy_traffic(n_state):
    import cupy

    outs = ", ".join(["T p"] + [f"T s{j}" for j in range(n_state)])
    body = " ".join(["p = p + c * g;"] + [f"s{j} = s{j} + c * g;" for j in range(n_state)])
    return cupy.ElementwiseKernel("T g, T c", outs, body, f"fastopt_traffic{n_state}")


def traffic_runner(backend, n_state, p0, g0):
    """Same-traffic kernel on ``backend`` ("cupy" or "numba-cuda") over device copies of the
    host arrays ``p0``/``g0`` and ``n_state`` zeroed state buffers."""
    import cupy

    p, g = cupy.asarray(p0), cupy.asarray(g0)
    states = [cupy.zeros_like(p) for _ in range(n_state)]
    c = p0.dtype.type(1e-3)
    if backend == "cupy":
        key = ("cupy", n_state)
        if key not in _cupy_kernels:
            _cupy_kernels[key] = _cupy_traffic(n_state)
        kern = _cupy_kernels[key]
        fn = lambda: kern(g, c, p, *states)  # noqa: E731
    elif backend == "numba-cuda":
        from numba import cuda

        from ._bench_numba_cuda import launcher

        arrs = [cuda.as_cuda_array(a) for a in (p, g, *states)]
        fn = launcher(n_state, p.size, *arrs, c)
    else:
        raise ValueError(f"no GPU ceiling for backend {backend!r}")
    return Runner(f"ceiling:{backend}", fn, timer_for(backend),
                  bytes_per_step(n_state, p.size, p.dtype), keep=(p, g, states))


def copy_runner(backend, p0):
    """A device-to-device copy on ``backend`` (bytes = read + written)."""
    import cupy

    src = cupy.asarray(p0)
    dst = cupy.empty_like(src)
    if backend == "cupy":
        fn = lambda: cupy.copyto(dst, src)  # noqa: E731
    elif backend == "numba-cuda":
        from numba import cuda

        from ._bench_numba_cuda import launcher

        fn = launcher("copy", src.size, cuda.as_cuda_array(dst), cuda.as_cuda_array(src))
    else:
        raise ValueError(f"no GPU copy for backend {backend!r}")
    return Runner(f"copy:{backend}", fn, timer_for(backend), 2 * src.nbytes, keep=(src, dst))
