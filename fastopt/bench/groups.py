"""Runners for every measured thing, and the sweep that turns them into JSON records.

A *group* is one (device, optimizer case, dtype, n): the fastopt backends on that device, the
ceilings measured beside them and the torch peers, timed together so that the ratios between
them are fair. On the CPU the ceilings are numba's same-traffic kernel and copy, and the group
is timed in two passes (``measure.measure_group``). On a GPU the ceiling is one same-traffic
kernel of the group's own traffic (``gpu.bytes_traffic_runner``), beside a device-to-device
memcpy and the device's rated bandwidth, and the group is timed in interleaved rounds
(``measure.measure_rounds``): every record carries its spread (``spread``: min, quartiles,
max; ``round_median_s``: one median per round) and every ratio within a group one value per
round (``*_spread``). Records are plain dicts, the schema of ``bench/results/*.json``;
``finalize`` adds the ratios across rows (× NumPy oracle, × torch on the same layout).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .measure import Case, Runner

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ..backends import BACKENDS, available_backends, get_backend
from .measure import (
    PRECISIONS,
    HostTimer,
    Runner,
    bytes_per_step,
    host_data,
    measure_group,
    measure_rounds,
    median,
    percent,
    ratio_spread,
    spread,
    traffic_arrays,
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
    "record",
    "run_group",
    "run_precision_group",
    "score_gpu_group",
]

#: how a GPU group is timed: interleaved rounds, each runner timed ``PER_ROUND`` times a round
ROUNDS, PER_ROUND = 7, 3


def device_of(backend: Any) -> str:
    """ "cpu" or "cuda" for a fastopt backend name."""
    return get_backend(backend).DEVICE


def ceiling_backend(device: str, backends: Sequence[str]) -> Any:
    """The backend whose kernels measure ``device``'s ceilings: ``numba`` on the CPU, the first
    GPU backend present on CUDA (CuPy before Numba CUDA)."""
    if device == "cpu":
        return "numba"
    for name in ("cupy", "numba-cuda"):
        if name in backends:
            return name
    return None


def fastopt_runner(
    case: Case, backend: Any, p0: Any, g0: Any, kwargs: Any = (), io: Any = None
) -> Runner:
    """``opt.step(buf)`` of the fastopt optimizer of ``case`` on ``backend``, over a FlatBuffer
    holding one parameter of ``p0.size`` elements (the fused one-launch path users call);
    ``kwargs``: mixed-precision keywords of the optimizer, ``io`` its storage format (the bytes
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


def ceiling_runner(backend: Any, n_state: int, p0: Any, g0: Any) -> Any:
    """Same-traffic kernel with ``n_state`` state buffers on ``backend``."""
    if backend == "numba":
        from . import ceilings_cpu

        return ceilings_cpu.traffic_runner(n_state, p0, g0)
    from . import gpu

    return gpu.traffic_runner(backend, n_state, p0, g0)


def copy_runner(backend: Any, p0: Any) -> Any:
    """Copy of an ``p0``-sized buffer on ``backend``."""
    if backend == "numba":
        from . import ceilings_cpu

        return ceilings_cpu.copy_runner(p0)
    from . import gpu

    return gpu.copy_runner(backend, p0)


def ceiling_backends(device: str, backends: Sequence[str]) -> Any:
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
    case: Case,
    device: str,
    n: int,
    dtype: Any,
    backends: Sequence[str],
    torch_modes: Sequence[str] = (),
    layouts: Sequence[str] = ("flat", "list"),
    seed: int = 0,
    references: bool = False,
) -> Any:
    """Factories for the group's timing: keys ("step", backend), ("torch", mode, layout),
    ("adapter", "list") (fastopt.torch on the list), and the ceilings: on the CPU ("ceiling",
    "numba") and ("copy", "numba"); on a GPU ("ceiling", "traffic") (the same-traffic kernel of
    this case's arrays) and ("memcpy",), plus with ``references`` the older kernels of each
    GPU backend, ("reference", "traffic:<backend>") and ("reference", "copy:<backend>"),
    labelled references and never ceilings."""
    if device == "cuda":
        from .gpu import device_data

        p0, g0 = device_data(n, dtype, seed)
    else:
        p0, g0 = host_data(n, dtype, seed)
    facs: dict[tuple[str, ...], Callable[..., Any]] = {}
    for b in backends:
        facs[("step", b)] = lambda b=b: fastopt_runner(case, b, p0, g0)
    if device == "cuda":
        from . import gpu

        arrays = traffic_arrays(n, case.n_state, p0.dtype, n_read=case.n_read)
        facs[("ceiling", "traffic")] = lambda: gpu.bytes_traffic_runner(arrays)
        facs[("memcpy",)] = lambda: gpu.memcpy_runner(p0)
        if references:
            for b in (b for b in backends if get_backend(b).DEVICE == "cuda"):
                facs[("reference", f"traffic:{b}")] = lambda b=b: ceiling_runner(
                    b, case.n_state, p0, g0
                )
                facs[("reference", f"copy:{b}")] = lambda b=b: copy_runner(b, p0)
    else:
        for ceil in ceiling_backends(device, backends):
            facs[("ceiling", ceil)] = lambda c=ceil: ceiling_runner(c, case.n_state, p0, g0)
            facs[("copy", ceil)] = lambda c=ceil: copy_runner(c, p0)
    if torch_modes:
        from .torch_peers import ADAPTER, torch_runner

        for mode in torch_modes:
            for layout in layouts:
                facs[("torch", mode, layout)] = lambda m=mode, lay=layout: torch_runner(
                    case, m, device, p0, g0, lay
                )
        if "list" in layouts:  # fastopt's torch.optim face, on the same list
            facs[("adapter", "list")] = lambda: torch_runner(case, ADAPTER, device, p0, g0, "list")
    return facs


def record(
    case: Case,
    device: str,
    n: int,
    dtype: Any,
    runner: Runner,
    times: Sequence[float],
    backend: Any,
    layout: str = "flat",
    round_times: Any = None,
) -> Any:
    """One JSON record: the row's identity, its bytes and GB/s (of the median), every timed call
    (``times_s``) and their ``spread``; with ``round_times`` (interleaved rounds) the median of
    each round (``round_median_s``) and how it was timed (``timing``)."""
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
        "spread": spread(times),
        "bytes": runner.bytes,
        "gbps": runner.bytes / med / 1e9,
    }
    if round_times is not None:
        rec["round_median_s"] = [median(rt) for rt in round_times]
        rec["timing"] = f"interleaved rounds: {len(round_times)} rounds"
    if "peer" in runner.info:
        rec["peer"] = runner.info["peer"]
    return rec


def score_gpu_group(records: list[dict[str, Any]], ceilings: Any, device_name: Any = None) -> Any:
    """Hold every record of one GPU group against the ceilings measured in it. ``ceilings``
    maps "traffic" and "memcpy" to ``(runner, times, round_times)``. Each record gets
    ``ceiling_gbps`` (the same-traffic kernel: ``ceiling_kind``, ``ceiling_bytes``),
    ``pct_of_ceiling`` with its per-round ``pct_of_ceiling_spread``, ``memcpy_gbps`` and
    ``pct_of_memcpy`` (also as ``copy_gbps``/``pct_of_copy``, ``copy_kind``), and the device's
    rated bandwidth (``rated_gbps``, ``pct_of_rated``, ``rated_source``), None where unknown."""
    from .gpu import rated_bandwidth

    rated, source = rated_bandwidth(device_name)
    traffic = ceilings.get("traffic")
    copy = ceilings.get("memcpy")
    for rec in records:
        own = rec.get("round_median_s")
        if traffic is not None:
            runner, times, rounds = traffic
            t = median(times)
            rec["ceiling_backend"], rec["ceiling_kind"] = "cupy", runner.info["kind"]
            rec["ceiling_s"], rec["ceiling_bytes"] = t, runner.bytes
            rec["ceiling_gbps"] = runner.bytes / t / 1e9
            rec["ceiling_spread"] = spread(times)
            rec["pct_of_ceiling"] = percent(rec["gbps"], rec["ceiling_gbps"])
            # per round: (bytes / own time) / (ceiling bytes / ceiling time)
            r = ratio_spread([median(x) for x in rounds], own) if own else None
            scale = 100.0 * rec["bytes"] / runner.bytes
            rec["pct_of_ceiling_spread"] = (
                None if r is None else {k: v * scale if k != "rounds" else v for k, v in r.items()}
            )
        else:
            rec["ceiling_gbps"] = rec["pct_of_ceiling"] = None
        if copy is not None:
            runner, times, _ = copy
            rec["memcpy_gbps"] = rec["copy_gbps"] = runner.bytes / median(times) / 1e9
            rec["memcpy_spread"] = spread(times)
            rec["copy_kind"] = runner.info["kind"]
            rec["pct_of_memcpy"] = rec["pct_of_copy"] = percent(rec["gbps"], rec["memcpy_gbps"])
        else:
            rec["memcpy_gbps"] = rec["copy_gbps"] = rec["pct_of_copy"] = None
        rec["rated_gbps"] = None if rated is None else rated / 1e9
        rec["rated_source"] = source
        rec["pct_of_rated"] = percent(rec["gbps"], rec["rated_gbps"])
    return records


def run_group(
    case: Case,
    device: str,
    n: int,
    dtype: Any,
    backends: Sequence[str],
    torch_modes: Sequence[str] = (),
    layouts: Sequence[str] = ("flat", "list"),
    reps: int = 30,
    warmup: int = 3,
    budget_s: float | None = None,
    progress: Callable[..., Any] | None = None,
    references: bool = False,
    rounds: int = ROUNDS,
    per_round: int = PER_ROUND,
) -> Any:
    """Measure one group; returns its records (fastopt backends first, then torch peers and
    references), each carrying the ceilings measured alongside. On the CPU ``reps`` and
    ``budget_s`` size the two passes; on a GPU ``rounds`` interleaved rounds of ``per_round``
    timed calls each (fewer rounds when ``budget_s`` would be exceeded, never under 3)."""
    facs = group_factories(
        case, device, n, dtype, backends, torch_modes, layouts, references=references
    )
    if device == "cuda":
        res = measure_rounds(
            facs,
            rounds=rounds,
            per_round=per_round,
            warmup=warmup,
            budget_s=budget_s,
            progress=progress,
        )
        from .gpu import gpu_name

        group = uuid.uuid4().hex[:12]
        records = []
        for key, (runner, times, rts) in res.items():
            if key[0] == "step":
                backend, layout = key[1], "flat"
            elif key[0] == "torch":
                backend, layout = f"torch-{key[1]}", key[2]
            elif key[0] == "adapter":
                backend, layout = "fastopt.torch", key[1]
            elif key[0] == "reference":
                backend, layout = f"reference:{key[1]}", "flat"
            else:
                continue
            rec = record(case, device, n, dtype, runner, times, backend, layout, rts)
            rec["group"] = group
            if key[0] == "reference":
                rec["role"] = "reference"
                rec["reference_kind"] = runner.info.get("kind", runner.label)
            records.append(rec)
        ceilings = {"traffic": res.get(("ceiling", "traffic")), "memcpy": res.get(("memcpy",))}
        return score_gpu_group(records, {k: v for k, v in ceilings.items() if v}, gpu_name())
    res = measure_group(
        facs,
        reps=reps,
        warmup=warmup,
        budget_s=budget_s,
        together=True,
        progress=progress,
    )
    ceil = {}  # (kind, backend) -> (median s, GB/s)
    ceil_bytes = {}  # (kind, backend) -> bytes the ceiling kernel moves
    for key, (runner, times) in res.items():
        if key[0] in ("ceiling", "copy"):
            ceil[key] = (median(times), runner.bytes / median(times) / 1e9)
            ceil_bytes[key] = runner.bytes
    own = [k[1] for k in ceil if k[0] == "ceiling"]
    records = []
    for key, (runner, times) in res.items():
        if key[0] == "step":
            rec = record(case, device, n, dtype, runner, times, key[1])
            scored = key[1] if ("ceiling", key[1]) in ceil else (own[0] if own else None)
        elif key[0] == "torch":
            rec = record(case, device, n, dtype, runner, times, f"torch-{key[1]}", key[2])
            scored = own[0] if own else None
        elif key[0] == "adapter":
            rec = record(case, device, n, dtype, runner, times, "fastopt.torch", key[1])
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
        rec["pct_of_ceiling"] = percent(rec["gbps"], rec["ceiling_gbps"])
        rec["pct_of_copy"] = percent(rec["gbps"], rec["copy_gbps"])
        records.append(rec)
    return records


def finalize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``speedup_vs_numpy`` (NumPy oracle time ÷ this time, same optimizer, dtype and n)
    and, for fastopt rows, ``speedup_vs_torch``: the fastest torch peer on the same device and
    the same layout (one flat tensor, or the very same list: the same work) ÷ this time, the
    peer's name in ``torch_peer``; with ``speedup_vs_torch_spread`` (one ratio per round) when
    both were timed in the same interleaved rounds. Returns ``records``."""
    oracle: dict[Any, float] = {}
    torch_best: dict[Any, Any] = {}
    for r in records:
        key = (r["optimizer"], r["dtype"], r["n"])
        if r["backend"] == "numpy" and r["layout"] == "flat":
            oracle[key] = r["median_s"]
        if r["backend"].startswith("torch-"):
            k = key + (r["device"], r["layout"])
            if k not in torch_best or r["median_s"] < torch_best[k]["median_s"]:
                torch_best[k] = r
    for r in records:
        key = (r["optimizer"], r["dtype"], r["n"])
        r["speedup_vs_numpy"] = oracle[key] / r["median_s"] if key in oracle else None
        if r["backend"] in BACKENDS or r["backend"] == "fastopt.torch":
            peer = torch_best.get(key + (r["device"], r["layout"]))
            r["speedup_vs_torch"] = peer["median_s"] / r["median_s"] if peer else None
            r["torch_peer"] = f"{peer['backend']} ({peer['layout']})" if peer else None
            same_rounds = peer is not None and peer.get("group") == r.get("group") is not None
            r["speedup_vs_torch_spread"] = (
                ratio_spread(peer.get("round_median_s"), r.get("round_median_s"))
                if same_rounds and peer is not None
                else None
            )
    return records


# -- mixed-precision rows: one optimizer across storage formats, side by side ----------------------


def precision_factories(
    case: Case, n: int, precisions: Sequence[str], backend: Any = "numba", seed: int = 0
) -> Any:
    """Factories for ``measure_group``: ("step", precision) and ("ceiling", precision) for each
    name of ``measure.PRECISIONS`` (CPU: the numba backend and its same-traffic kernels)."""
    from . import ceilings_cpu

    facs: dict[tuple[str, ...], Callable[..., Any]] = {}
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


def state_bytes(case: Case, pr: Any) -> float:
    """Bytes of optimizer state per parameter of ``case`` in precision ``pr``
    (``fastopt.memory``, derived from the rule spec and the storage format)."""
    import fastopt
    from fastopt.memory import state_bytes_per_param

    opt = getattr(fastopt, case.cls)(**case.fastopt_kwargs)
    kw = dict(pr.kwargs)
    return state_bytes_per_param(
        opt._rule,
        opt._rule_hp(opt.hyperparams),
        state_dtype=kw.get("state_dtype"),
        param_dtype=pr.param,
        master_weights=kw.get("master_weights", False),
    )


def run_precision_group(
    case: Case,
    n: int,
    precisions: Sequence[str],
    backend: Any = "numba",
    reps: int = 60,
    warmup: int = 3,
    budget_s: float | None = None,
    progress: Callable[..., Any] | None = None,
) -> Any:
    """Measure one optimizer at size ``n`` in each storage format of ``precisions``, with each
    format's same-traffic ceiling, all in one group (built together, timed in two passes, the
    second in reverse order: the ratios compare runs of the same minutes). Returns records
    (``dtype`` holds the format's name) with ``ceiling_gbps``, ``pct_of_ceiling`` and, against
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
        rec = record(case, "cpu", n, name, runner, times, backend)
        rec["precision"] = dict(PRECISIONS[name].kwargs, param=PRECISIONS[name].param)
        rec["state_bytes_per_param"] = state_bytes(case, PRECISIONS[name])
        ceil = res.get(("ceiling", name))
        if ceil is None:  # (every format has its same-traffic kernel; kept for a missing one)
            rec["ceiling_gbps"] = rec["pct_of_ceiling"] = None
        else:
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
