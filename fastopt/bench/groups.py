"""Runners for every measured thing, and the sweep that turns them into JSON records.

A *group* is one (device, optimizer case, dtype, n): the fastopt backends on that device, the
ceilings of each (same-traffic kernel and copy, on the same backend) and the torch peers, timed
together (``measure.measure_group``) so that the ratios between them are fair. Records are plain
dicts, the schema of ``bench/results/*.json``; ``finalize`` adds the cross-group ratios
(× NumPy oracle, × torch).
"""

import numpy as np

from ..backends import BACKENDS, available_backends, get_backend
from .measure import (
    PRECISIONS,
    HostTimer,
    Runner,
    bytes_per_step,
    host_data,
    measure_group,
    median,
    percent,
)

__all__ = [
    "ceiling_backend",
    "ceiling_runner",
    "copy_runner",
    "device_of",
    "fastopt_runner",
    "finalize",
    "group_factories",
    "precision_factories",
    "run_group",
    "run_precision_group",
]


def device_of(backend):
    """ "cpu" or "cuda" for a fastopt backend name."""
    return get_backend(backend).DEVICE


def ceiling_backend(device, backends):
    """The backend whose kernels measure ``device``'s ceilings: ``numba`` on the CPU, the first
    GPU backend present on CUDA (CuPy before Numba CUDA)."""
    if device == "cpu":
        return "numba"
    for name in ("cupy", "numba-cuda"):
        if name in backends:
            return name
    return None


def fastopt_runner(case, backend, p0, g0, kwargs=(), io=None):
    """``opt.step(buf)`` of the fastopt optimizer of ``case`` on ``backend``, over a FlatBuffer
    holding one parameter of ``p0.size`` elements (the fused one-launch path users call);
    ``kwargs``: mixed-precision keywords of the optimizer, ``io`` its storage plan (the bytes
    moved count each array's own dtype)."""
    import fastopt

    be = get_backend(backend)
    if be.DEVICE == "cuda":
        from .gpu import timer_for, to_device

        timer = timer_for(backend)
        if isinstance(p0, np.ndarray):  # host data: the buffer must live on the GPU
            p0, g0 = to_device(p0), to_device(g0)
    else:
        timer = HostTimer()
    gdt = None if g0.dtype == p0.dtype else "float32"
    buf = fastopt.FlatBuffer({"w": p0}, grad_dtype=gdt)  # copies the values in
    buf.grads["w"][...] = g0
    opt = getattr(fastopt, case.cls)(**case.fastopt_kwargs, **dict(kwargs), backend=backend)
    nbytes = bytes_per_step(
        case.n_state, p0.size, None if io is not None else p0.dtype, io=io, n_read=case.n_read
    )
    return Runner(backend, lambda: opt.step(buf), timer, nbytes, keep=(buf, opt))


def ceiling_runner(backend, n_state, p0, g0):
    """Same-traffic kernel with ``n_state`` state buffers on ``backend``."""
    if backend == "numba":
        from . import ceilings_cpu

        return ceilings_cpu.traffic_runner(n_state, p0, g0)
    from . import gpu

    return gpu.traffic_runner(backend, n_state, p0, g0)


def copy_runner(backend, p0):
    """Copy of an ``p0``-sized buffer on ``backend``."""
    if backend == "numba":
        from . import ceilings_cpu

        return ceilings_cpu.copy_runner(p0)
    from . import gpu

    return gpu.copy_runner(backend, p0)


def ceiling_backends(device, backends):
    """The backends whose ceilings a group measures: on a GPU each GPU backend measured gets its
    own (its rows are scored against kernels of the same compiler), else the device's default
    (``ceiling_backend``), e.g. numba's for the CPU rows and the NumPy oracle."""
    if device == "cuda":
        own = [b for b in backends if get_backend(b).DEVICE == "cuda"]
        if own:
            return own
    ceil = ceiling_backend(device, available_backends())
    return [ceil] if ceil is not None else []


def group_factories(
    case, device, n, dtype, backends, torch_modes=(), layouts=("flat", "list"), seed=0
):
    """Factories for ``measure_group``: keys ("step", backend), ("ceiling", backend),
    ("ceiling-vec", "cupy"), ("copy", backend), ("torch", mode, layout)."""
    if device == "cuda":
        from .gpu import device_data

        p0, g0 = device_data(n, dtype, seed)
    else:
        p0, g0 = host_data(n, dtype, seed)
    facs = {}
    for b in backends:
        facs[("step", b)] = lambda b=b: fastopt_runner(case, b, p0, g0)
    for ceil in ceiling_backends(device, backends):
        facs[("ceiling", ceil)] = lambda c=ceil: ceiling_runner(c, case.n_state, p0, g0)
        facs[("copy", ceil)] = lambda c=ceil: copy_runner(c, p0)
        if ceil == "cupy":
            from .gpu import vector_traffic_runner

            facs[("ceiling-vec", ceil)] = lambda: vector_traffic_runner(case.n_state, p0, g0)
    if torch_modes:
        from .torch_peers import ADAPTER, torch_runner

        for mode in torch_modes:
            for layout in layouts:
                facs[("torch", mode, layout)] = lambda m=mode, lay=layout: torch_runner(
                    case, m, device, p0, g0, lay
                )
        if device == "cpu" and "list" in layouts:  # fastopt's torch.optim face, same list
            facs[("adapter", "list")] = lambda: torch_runner(case, ADAPTER, device, p0, g0, "list")
    return facs


def _record(case, device, n, dtype, runner, times, backend, layout="flat"):
    med = median(times)
    rec = {
        "optimizer": case.name,
        "class": case.cls,
        "flags": case.fastopt_kwargs,
        "backend": backend,
        "device": device,
        "layout": layout,
        "n_tensors": runner.info.get("n_tensors", 1),
        "dtype": str(dtype),
        "n": int(n),
        "reps": len(times),
        "median_s": med,
        "min_s": min(times),
        "times_s": [float(t) for t in times],
        "bytes": runner.bytes,
        "gbps": runner.bytes / med / 1e9,
    }
    if "peer" in runner.info:
        rec["peer"] = runner.info["peer"]
    return rec


def run_group(
    case,
    device,
    n,
    dtype,
    backends,
    torch_modes=(),
    layouts=("flat", "list"),
    reps=30,
    warmup=3,
    budget_s=None,
    progress=None,
):
    """Measure one group; returns its records (fastopt backends first, then torch peers), each
    carrying the ceilings measured alongside."""
    facs = group_factories(case, device, n, dtype, backends, torch_modes, layouts)
    res = measure_group(
        facs,
        reps=reps,
        warmup=warmup,
        budget_s=budget_s,
        together=device == "cpu",
        progress=progress,
    )
    ceil = {}  # (kind, backend) -> (median s, GB/s)
    ceil_bytes = {}  # (kind, backend) -> bytes the ceiling kernel moves
    for key, (runner, times) in res.items():
        if key[0] in ("ceiling", "ceiling-vec", "copy"):
            ceil[key] = (median(times), runner.bytes / median(times) / 1e9)
            ceil_bytes[key] = runner.bytes
    own = [k[1] for k in ceil if k[0] == "ceiling"]
    records = []
    for key, (runner, times) in res.items():
        if key[0] == "step":
            rec = _record(case, device, n, dtype, runner, times, key[1])
            scored = key[1] if ("ceiling", key[1]) in ceil else (own[0] if own else None)
        elif key[0] == "torch":
            rec = _record(case, device, n, dtype, runner, times, f"torch-{key[1]}", key[2])
            scored = own[0] if own else None
        elif key[0] == "adapter":
            rec = _record(case, device, n, dtype, runner, times, "fastopt.torch", key[1])
            scored = own[0] if own else None
        else:
            continue
        t, gbps = ceil.get(("ceiling", scored), (None, None))
        rec["ceiling_backend"], rec["ceiling_s"], rec["ceiling_gbps"] = (
            scored if t else None,
            t,
            gbps,
        )
        # the ceiling kernel reads every state buffer it writes: more than a step that only
        # overwrites one (ASGD before t0) moves, so its bytes are its own
        rec["ceiling_bytes"] = ceil_bytes.get(("ceiling", scored))
        rec["copy_gbps"] = ceil.get(("copy", scored), (None, None))[1]
        rec["ceiling_vec_gbps"] = ceil.get(("ceiling-vec", scored), (None, None))[1]
        rec["pct_of_ceiling"] = percent(rec["gbps"], rec["ceiling_gbps"])
        rec["pct_of_copy"] = percent(rec["gbps"], rec["copy_gbps"])
        rec["pct_of_vec_ceiling"] = percent(rec["gbps"], rec["ceiling_vec_gbps"])
        records.append(rec)
    return records


def finalize(records):
    """Add ``speedup_vs_numpy`` (NumPy oracle time ÷ this time, same optimizer, dtype and n)
    and, for fastopt rows, ``speedup_vs_torch`` (the fastest torch peer on the same device ÷
    this time) with the peer's name in ``torch_peer``. Returns ``records``."""
    oracle, torch_best = {}, {}
    for r in records:
        key = (r["optimizer"], r["dtype"], r["n"])
        if r["backend"] == "numpy" and r["layout"] == "flat":
            oracle[key] = r["median_s"]
        if r["backend"].startswith("torch-"):
            for k in (key + (r["device"],), key + (r["device"], r["layout"])):
                if k not in torch_best or r["median_s"] < torch_best[k]["median_s"]:
                    torch_best[k] = r
    for r in records:
        key = (r["optimizer"], r["dtype"], r["n"])
        r["speedup_vs_numpy"] = oracle[key] / r["median_s"] if key in oracle else None
        # fastopt's flat rows against torch's best on any layout; fastopt.torch's list rows
        # against torch on the very same list
        peer_key = None
        if r["backend"] in BACKENDS:
            peer_key = key + (r["device"],)
        elif r["backend"] == "fastopt.torch":
            peer_key = key + (r["device"], r["layout"])
        if peer_key is not None:
            peer = torch_best.get(peer_key)
            r["speedup_vs_torch"] = peer["median_s"] / r["median_s"] if peer else None
            r["torch_peer"] = f"{peer['backend']} ({peer['layout']})" if peer else None
    return records


# -- mixed-precision rows: one optimizer across storage plans, side by side ----------------------


def precision_factories(case, n, precisions, backend="numba", seed=0):
    """Factories for ``measure_group``: ("step", precision) and ("ceiling", precision) for each
    name of ``measure.PRECISIONS`` (CPU: the numba backend and its same-traffic kernels)."""
    from . import ceilings_cpu

    facs = {}
    for name in precisions:
        pr = PRECISIONS[name]
        io = pr.io()
        p0, g0 = host_data(n, pr.param, seed, pr.grad)
        facs[("step", name)] = lambda p0=p0, g0=g0, pr=pr, io=io: fastopt_runner(
            case, backend, p0, g0, pr.kwargs, io
        )
        if io.plain:
            facs[("ceiling", name)] = lambda p0=p0, g0=g0: ceilings_cpu.traffic_runner(
                case.n_state, p0, g0
            )
        else:
            facs[("ceiling", name)] = lambda io=io: ceilings_cpu.mixed_traffic_runner(
                io, case.n_state, n
            )
    return facs


def run_precision_group(
    case, n, precisions, backend="numba", reps=60, warmup=3, budget_s=None, progress=None
):
    """Measure one optimizer at size ``n`` in each storage plan of ``precisions``, with each
    plan's same-traffic ceiling, all in one group (built together, timed in two passes, the
    second in reverse order: the ratios compare runs of the same minutes). Returns records
    (``dtype`` holds the plan's name) with ``ceiling_gbps``, ``pct_of_ceiling`` and, against
    the float32 row when there is one, ``speedup_vs_float32`` and ``bytes_vs_float32``."""
    res = measure_group(
        precision_factories(case, n, precisions, backend),
        reps=reps,
        warmup=warmup,
        budget_s=budget_s,
        together=True,
        progress=progress,
    )
    records = []
    for name in precisions:
        if ("step", name) not in res:
            continue
        runner, times = res[("step", name)]
        rec = _record(case, "cpu", n, name, runner, times, backend)
        rec["precision"] = dict(PRECISIONS[name].kwargs, param=PRECISIONS[name].param)
        ceil = res.get(("ceiling", name))
        if ceil is not None:
            t = median(ceil[1])
            rec["ceiling_backend"], rec["ceiling_s"] = "numba", t
            rec["ceiling_gbps"] = ceil[0].bytes / t / 1e9
            rec["ceiling_bytes"] = ceil[0].bytes
            rec["pct_of_ceiling"] = percent(rec["gbps"], rec["ceiling_gbps"])
            rec["copy_gbps"] = None
        records.append(rec)
    base = next((r for r in records if r["dtype"] == "float32"), None)
    for r in records:
        r["speedup_vs_float32"] = base["median_s"] / r["median_s"] if base else None
        r["bytes_vs_float32"] = r["bytes"] / base["bytes"] if base else None
    return records
