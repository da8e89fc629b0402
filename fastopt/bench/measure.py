"""Measurement core shared by ``fastopt bench`` and the pytest-benchmark suite in ``bench/``.

The optimizer step is memory-bound, so every figure is a bandwidth. One step reads the param,
the grad and every state buffer it reads (``n_read``) once and writes the param and every state
buffer (``n_state``) once:

    bytes per step = (3 + n_state + n_read) · itemsize · n

with every array in one dtype, which gives the README's float32 table (SGD 12, Momentum 20,
Adam 28, AMSGrad 36, ...). A step reads every state buffer it writes but one case: ASGD before
its averaging starts (``t0``, 10^6 steps by default) writes ``ax = p`` without reading ``ax``
(16 B/element, not 20); the rule spec says which (``Rule.slots_read``), for the variant the
benchmark's steps run.
With mixed precision each array counts its own itemsize (``bytes_per_step(..., io=)``): param
read (not when an fp32 master is read instead) and written, grad read (and written back when
unscaled in place), the state buffers read and written, the master read and written. The
mixed-precision rows (``PRECISIONS``) compare one optimizer across storage formats side by side.

Effective bandwidth = bytes ÷ median step time; it is compared with two ceilings measured in the
same run on the same backend: a copy (``2·itemsize·n`` bytes) and a same-traffic kernel that
touches exactly the optimizer's buffers with trivial math (``fastopt.bench.ceilings_cpu``;
on a GPU ``fastopt.bench.gpu``, ``fastopt.bench.ceilings_numba_cuda`` for numba-cuda).

Timing: after a warm-up that absorbs compilation and first-touch page faults, each repetition
is timed alone and the median is reported with its spread (``spread``: min, quartiles, max).
Host work uses ``time.perf_counter``; GPU work uses device events recorded around the call
(``gpu.EventTimer``). The runners a GPU figure is compared with are timed in interleaved rounds
(``measure_rounds``): every round visits every runner, so a drift of the device's clocks or
temperature during the run hits all of them alike, and every ratio between two of them has a
spread of its own, one value per round (``ratio_spread``). CPU runners are timed in contiguous
blocks (``measure_group``: two passes, the second in reverse order).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._torch_names import torch_name as _torch_name

__all__ = [
    "CASES",
    "CASE_NAMES",
    "GRID",
    "PRECISIONS",
    "Case",
    "HostTimer",
    "Precision",
    "Runner",
    "bytes_per_step",
    "cpu_model",
    "device_info",
    "fmt_n",
    "host_data",
    "measure",
    "measure_group",
    "measure_rounds",
    "median",
    "percent",
    "ratio_spread",
    "spread",
    "timed_call",
    "traffic_arrays",
    "transformer_shapes",
    "versions",
]


@dataclass(frozen=True)
class Case:
    """One benchmarked optimizer variant: the fastopt class and the matching torch.optim call."""

    name: str
    cls: str
    kwargs: tuple = ()
    #: state buffers written per element (the traffic beyond param and grad)
    n_state: int = 0
    #: ``torch.optim`` class name and kwargs, or None when torch has no such optimizer
    torch_cls: str | None = None
    torch_kwargs: tuple = ()
    #: of those, the ones the benchmark's steps read first (None: every one)
    n_read: int | None = None

    def __post_init__(self) -> None:
        if self.n_read is None:
            object.__setattr__(self, "n_read", self.n_state)

    @property
    def fastopt_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)


def derive_cases() -> Any:
    """The sweep, from the optimizer registry: every class with its defaults, then the variant
    with every hyperparameter probe that adds a state buffer switched on (AMSGrad, centered
    RMSProp with momentum, ...) unless a case with the same rule and state buffers exists."""
    from ..kernels import RULES
    from ..optimizers import CLASSES

    cases, seen = [], set()
    for cls in CLASSES.values():
        slots = cls.slots_for()
        cases.append(_case(cls.__name__.lower(), cls, {}, slots))
        seen.add((cls._rule, slots))
    for cls in CLASSES.values():
        base = cls.slots_for()
        adds = {h: on for h, (_, on) in cls.probes().items() if cls.slots_for(**{h: on}) != base}
        if not adds:
            continue
        order = RULES[cls._rule].state  # name the variant in the order of the slots it adds
        first_new = {
            h: min(order.index(x) for x in cls.slots_for(**{h: on}) if x not in base)
            for h, on in adds.items()
        }
        adds = {h: adds[h] for h in sorted(adds, key=first_new.__getitem__)}
        slots = cls.slots_for(**adds)
        if (cls._rule, slots) in seen:
            continue
        seen.add((cls._rule, slots))
        cases.append(_case(f"{cls.__name__.lower()}-{'-'.join(adds)}", cls, adds, slots))
    return {c.name: c for c in cases}


def _torch_kwargs(cls, torch_cls, hp):
    """``hp`` as ``torch.optim.<torch_cls>`` takes it: a value the fastopt class pins that the
    torch class has no argument for is the torch class's own (AdamW pins
    ``decoupled_weight_decay=True``, which torch's AdamW is and does not take), so it is left
    out; anything else is passed as it is (a torch that lacks it makes no peer)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return hp
    import torch.optim

    takes = inspect.signature(getattr(torch.optim, torch_cls).__init__).parameters
    return {k: v for k, v in hp.items() if k in takes or k not in cls._pinned}


#: the step whose variant stands for a benchmark's timed steps (past every warm-up switch the
#: rules have: RAdam's rectification from step 6, ASGD's averaging only from t0 on)
STEADY_STEP = 100


def _case(name, cls, kwargs, slots):
    from ..kernels import RULES

    sig = inspect.signature(cls.__init__).parameters
    hp = {k: v.default for k, v in sig.items() if k in cls._hyper + cls._flags}
    hp.update(kwargs, **cls._pinned)
    torch_cls = _torch_name(cls)
    torch_kwargs = tuple(_torch_kwargs(cls, torch_cls, hp).items()) if torch_cls else ()
    spec = RULES[cls._rule]
    flags, _ = spec.variant_and_scalars(spec.validate({**spec.defaults, **hp}), STEADY_STEP)
    n_read = sum(spec.slots_read(flags))
    return Case(
        name, cls.__name__, tuple(kwargs.items()), len(slots), torch_cls, torch_kwargs, n_read
    )


#: The sweep: every optimizer with its defaults, plus the variants that add traffic.
CASES = derive_cases()
CASE_NAMES = tuple(CASES)


#: The default sweep per device: (sizes, dtypes). GPU sizes reach far beyond the L2 cache.
GRID = {
    "cpu": ((1 << 20, 10**7), ("float32", "float64")),
    "cuda": ((1 << 20, 1 << 24, 1 << 28), ("float32",)),
}


def bytes_per_step(
    n_state: int, n: int, dtype: Any = None, io: Any = None, n_read: int | None = None
) -> Any:
    """Bytes one step moves: param, grad and ``n_read`` state buffers read (default: all
    ``n_state``); param and the ``n_state`` state buffers written; all in ``dtype``, or each
    array in its storage dtype of ``io`` (``kernels.storage.IO``)."""
    n_read = n_state if n_read is None else n_read
    if io is None:
        return (3 + n_state + n_read) * np.dtype(dtype).itemsize * int(n)
    size = io.itemsizes()
    # the param is written only beside an fp32 master; a remainder is joined with it: read too
    p_reads = 0 if io.master and not io.remainder else 1
    per = size["param"] * (1 + p_reads) + size["grad"] * (2 if io.write_grad else 1)
    # a quantized slot: a byte (half a byte packed) of code per element, a float32 per block
    state = size["state"] if not io.quant else sum(_quant_bytes(256, io.quant)) / 256
    per += (n_state + n_read) * state + (2 * size["master"] if io.master else 0)
    return round(per * int(n))


def _quant_bytes(n: int, fmt: str) -> tuple[int, int]:
    """Bytes of one quantized slot of ``n`` elements in format ``fmt``: codes, block scales."""
    from ..kernels.quant import code_bytes, nblocks

    return code_bytes(n, fmt), 4 * nblocks(n, fmt)


def traffic_arrays(
    n: int, n_state: int, dtype: Any = None, io: Any = None, n_read: int | None = None
) -> Any:
    """The arrays one step moves, ``[(name, bytes, mode)]`` with mode "r" (read), "w" (written)
    or "rw": the param (written only when an fp32 master is read instead; read and written beside
    a remainder), the grad (written
    back too when unscaled in place), ``n_read`` state buffers read and written and the rest
    written only (a quantized slot, ``io.quant``: its codes and its block scales), and the
    master copy. The same model as ``bytes_per_step``: the bytes times the
    length of the mode add up to it. The GPU's same-traffic kernel moves exactly these."""
    n_read = n_state if n_read is None else n_read
    if io is None:
        size = dict.fromkeys(("param", "grad", "state"), np.dtype(dtype).itemsize)
        master = write_grad = False
    else:
        size, master, write_grad = io.itemsizes(), io.master, io.write_grad
    n = int(n)
    p_written_only = master and not (io is not None and io.remainder)
    out = [
        ("param", size["param"] * n, "w" if p_written_only else "rw"),
        ("grad", size["grad"] * n, "rw" if write_grad else "r"),
    ]
    quant = getattr(io, "quant", None)
    for j in range(n_state):
        mode = "rw" if j < n_read else "w"
        if quant:  # a quantized slot: a byte (or half) of code per element, a scale per block
            cb, sb = _quant_bytes(n, quant)
            out += [(f"state{j}.codes", cb, mode), (f"state{j}.absmax", sb, mode)]
        else:
            out.append((f"state{j}", size["state"] * n, mode))
    if master:
        out.append(("master", size["master"] * n, "rw"))
    return out


@dataclass(frozen=True)
class Precision:
    """One storage format of the mixed-precision rows: the params' and grads' dtypes and the
    optimizer keywords that choose the state dtype and the master copy."""

    name: str
    param: str
    grad: str
    kwargs: tuple = ()

    def io(self, n_state: int | None = None) -> Any:
        """The storage format (``kernels.storage.IO``) of this precision's launches."""
        from ..precision import QUANTIZED, io_of, resolve_state_kind

        kw = dict(self.kwargs)
        master = kw.get("master_weights", False)
        state = resolve_state_kind(kw.get("state_dtype"), self.param, master)
        quant = kw.get("state_dtype") if kw.get("state_dtype") in QUANTIZED else None
        return io_of(
            self.param, self.grad, state, master, kw.get("stochastic_rounding", False), quant=quant
        )


#: the mixed-precision rows: float32 (the baseline), bfloat16 params and grads with bfloat16
#: state (torch's fused default for bf16 models), with float32 state, and with float32 state and
#: an fp32 master copy (what mixed-precision training keeps), and with that master as the param
#: plus an int16 remainder (``master_weights="remainder"``); float32 params with quantized
#: state (``state_dtype="int8"``, ``"float8_e4m3"``, ``"int4"``); float16 likewise
PRECISIONS = {
    p.name: p
    for p in (
        Precision("float32", "float32", "float32"),
        Precision("bfloat16", "bfloat16", "bfloat16"),
        Precision("bfloat16+fp32-state", "bfloat16", "bfloat16", (("state_dtype", "float32"),)),
        Precision("bfloat16+master", "bfloat16", "bfloat16", (("master_weights", True),)),
        Precision("bfloat16+remainder", "bfloat16", "bfloat16", (("master_weights", "remainder"),)),
        Precision("int8-state", "float32", "float32", (("state_dtype", "int8"),)),
        Precision("float8-state", "float32", "float32", (("state_dtype", "float8_e4m3"),)),
        Precision("int4-state", "float32", "float32", (("state_dtype", "int4"),)),
        Precision("float16", "float16", "float16"),
        Precision("float16+master", "float16", "float16", (("master_weights", True),)),
    )
}


def transformer_shapes(n: int, layers: Any = 16) -> Any:
    """~200 parameter shapes of a small pre-LN transformer whose sizes add up to exactly ``n``.

    Per layer: two LayerNorms (weight, bias), fused QKV (weight, bias), output projection, a
    4x MLP; then a final LayerNorm and a token embedding that absorbs the rest (plus a 1-D tail
    when the rest is not a multiple of the width). Returns None when ``n`` is too small.
    """

    def per_layer(d):
        return 12 * d * d + 13 * d

    d = 8
    while layers * per_layer(d + 8) + 2 * (d + 8) <= 0.8 * n:
        d += 8
    if layers * per_layer(d) + 2 * d > n:
        d = 1
        while layers * per_layer(d + 1) + 2 * (d + 1) <= 0.8 * n:
            d += 1
        if layers * per_layer(d) + 2 * d > n:
            return None
    shapes = []
    for _ in range(layers):
        shapes += [
            (d,),
            (d,),
            (3 * d, d),
            (3 * d,),
            (d, d),
            (d,),
            (d,),
            (d,),
            (4 * d, d),
            (4 * d,),
            (d, 4 * d),
            (d,),
        ]
    shapes += [(d,), (d,)]
    rest = n - sum(int(np.prod(s)) for s in shapes)
    if rest // d:
        shapes.append((rest // d, d))
    if rest % d:
        shapes.append((rest % d,))
    return shapes


def host_data(n: int, dtype: Any, seed: int = 0, grad_dtype: Any = None) -> Any:
    """Random params and grads (never zeros: denormal-free, realistic magnitudes); 16-bit
    dtypes (``"bfloat16"`` through ml_dtypes) are drawn in float32 and rounded."""
    from ..precision import storage_dtype

    rng = np.random.default_rng(seed)
    dtype = storage_dtype(dtype) if isinstance(dtype, str) else np.dtype(dtype)
    gdt = dtype if grad_dtype is None else storage_dtype(grad_dtype)
    if dtype.itemsize == 2 or gdt != dtype:
        p = rng.standard_normal(n, dtype=np.float32).astype(dtype)
        g = (rng.standard_normal(n, dtype=np.float32) * np.float32(1e-2)).astype(gdt)
        return p, g
    p = rng.standard_normal(n, dtype=dtype)
    g = rng.standard_normal(n, dtype=dtype)
    g *= dtype.type(1e-2)
    return p, g


class HostTimer:
    """Wall-clock time of one call on the host (everything it launched has finished)."""

    device = "cpu"

    def sync(self) -> None:
        pass

    def time(self, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


@dataclass
class Runner:
    """Something to time: ``fn`` moves ``bytes`` per call, timed by ``timer``."""

    label: str
    fn: Callable[[], Any]
    timer: Any
    bytes: int
    info: dict[str, Any] = field(default_factory=dict)
    #: objects the call needs alive (buffers, optimizers)
    keep: object = None


def _reps_for(t_first, reps, min_reps, budget_s):
    if budget_s is None or t_first <= 0:
        return reps
    return max(min_reps, min(reps, int(budget_s / t_first)))


def measure(
    runner: Runner,
    reps: int = 30,
    warmup: int = 3,
    min_reps: int = 5,
    budget_s: float | None = None,
) -> Any:
    """Warm up, then time ``reps`` calls one by one (fewer when one call would blow
    ``budget_s``, never fewer than ``min_reps``); returns the list of seconds per call."""
    for _ in range(warmup):
        runner.fn()
    runner.timer.sync()
    times = [runner.timer.time(runner.fn)]
    for _ in range(_reps_for(times[0], reps, min_reps, budget_s) - 1):
        times.append(runner.timer.time(runner.fn))
    return times


def measure_group(
    factories: Mapping[Any, Callable[[], Any]],
    reps: int = 30,
    warmup: int = 3,
    min_reps: int = 5,
    budget_s: float | None = None,
    together: bool = True,
    progress: Callable[..., Any] | None = None,
) -> Any:
    """Time several runners that will be compared with each other.

    ``factories`` maps a key to a zero-argument callable building a ``Runner`` (or returning
    None when that runner cannot exist here). Each runner is timed in contiguous blocks of
    repetitions: interleaving single calls of different runners would time their thread pools
    fighting (an OpenMP pool spins for a while after its parallel region), not the runners.
    ``together`` (the default): all runners are built first and timed in two passes, the
    second in reverse order, so that slow drifts of a shared machine hit them alike. Otherwise
    each is built, timed in one pass and freed in turn (for runners that cannot all be held in
    memory at once). GPU groups are timed by ``measure_rounds`` instead. A runner gets ``reps``
    repetitions, fewer when they would exceed its share of ``budget_s`` (never fewer than
    ``min_reps``). Returns ``{key: (runner, times)}``.
    """
    runners = {}
    if together:
        for key, make in factories.items():
            runner = make()
            if runner is not None:
                runners[key] = runner
    share = None if budget_s is None else budget_s / max(1, len(runners or factories))
    passes = 2 if together else 1
    times: dict[Any, Any] = {}
    count: dict[Any, tuple[int, int]] = {}
    for pass_ in range(passes):
        keys = list(runners or factories) if pass_ == 0 else list(reversed(list(runners)))
        for key in keys:
            runner = runners.get(key) if together else factories[key]()
            if runner is None or (pass_ and count[key][pass_] <= 0):
                continue
            if pass_ == 0 and progress:
                progress(key, runner)
            for _ in range(warmup if pass_ == 0 else 1):
                runner.fn()
            runner.timer.sync()
            if pass_ == 0:
                times[key] = [runner.timer.time(runner.fn)]
                total = _reps_for(times[key][0], reps, min_reps, share)
                first = -(-total // passes)  # the first pass's share, first call included
                count[key] = (first - 1, total - first)
            for _ in range(count[key][pass_]):
                times[key].append(runner.timer.time(runner.fn))
            if not together:
                runners[key] = runner
                runner.keep, runner.fn = None, None
    for runner in runners.values():
        runner.keep, runner.fn = None, None
    return {key: (runners[key], times[key]) for key in times}


def spread(times: Sequence[float]) -> Any:
    """The spread of a list of seconds: ``min_s``, ``q1_s``, ``median_s``, ``q3_s``, ``max_s``
    (quartiles by linear interpolation, the median as ``statistics.median``)."""
    a = np.sort(np.asarray(times, dtype=np.float64))
    if a.size == 0:
        raise ValueError("no times to summarise")
    q1, med, q3 = np.quantile(a, [0.25, 0.5, 0.75])
    return {
        "min_s": float(a[0]),
        "q1_s": float(q1),
        "median_s": float(med),
        "q3_s": float(q3),
        "max_s": float(a[-1]),
    }


def ratio_spread(num: Sequence[float] | None, den: Sequence[float] | None) -> Any:
    """Per-round ratios of two runners timed in the same rounds (``measure_rounds``): ``num``
    and ``den`` hold one median per round; round r gives ``num[r] / den[r]``. Returns ``min``,
    ``median``, ``max`` and ``rounds``, or None when the rounds do not pair up."""
    if not num or not den or len(num) != len(den):
        return None
    r = [a / b for a, b in zip(num, den)]
    return {"min": min(r), "median": statistics.median(r), "max": max(r), "rounds": len(r)}


def measure_rounds(
    factories: Mapping[Any, Callable[[], Any]],
    rounds: int = 7,
    per_round: int = 3,
    warmup: int = 3,
    min_rounds: int = 3,
    budget_s: float | None = None,
    progress: Callable[..., Any] | None = None,
    errors: Any = None,
) -> Any:
    """Time runners against each other in interleaved, repeated rounds (the GPU's way).

    ``factories`` maps a key to a zero-argument callable building a ``Runner`` (or None when it
    cannot exist here). Every runner is built first and warmed up (``warmup`` calls). Then
    ``rounds`` rounds: each visits every runner in turn (in order in even rounds, in reverse in
    odd ones, so that every runner's mean position is the same), makes one untimed call (each
    runner finds the caches as the previous runner left them and starts from its own data) and
    ``per_round`` timed calls. The first round's wall time sizes the rest: the rounds stop when
    the next one would end past ``budget_s`` seconds from the first, never before
    ``min_rounds``. Returns ``{key: (runner, times, round_times)}``: every timed call in order,
    and the same calls per round (the input of ``ratio_spread``). With ``errors`` (a dict), a
    runner that fails to build or to warm up is left out and its error recorded there under its
    key; without, the error propagates."""
    runners = {}
    for key, make in factories.items():
        try:
            runner = make()
            if runner is not None:
                for _ in range(warmup):
                    runner.fn()
                runner.timer.sync()
        except Exception as exc:
            if errors is None:
                raise
            errors[key] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        if runner is not None:
            runners[key] = runner
            if progress:
                progress(key, runner)
    per_key: dict[Any, list[list[float]]] = {key: [] for key in runners}
    t0 = time.perf_counter()
    for r in range(rounds):
        keys = list(runners) if r % 2 == 0 else list(reversed(list(runners)))
        for key in keys:
            runner = runners[key]
            runner.fn()
            runner.timer.sync()
            per_key[key].append([runner.timer.time(runner.fn) for _ in range(per_round)])
        done = r + 1
        next_end = (time.perf_counter() - t0) / done * (done + 1)  # if one more round ran
        if budget_s is not None and min_rounds <= done < rounds and next_end > budget_s:
            break
    out = {}
    for key, runner in runners.items():
        times = [t for rt in per_key[key] for t in rt]
        out[key] = (runner, times, per_key[key])
        runner.keep, runner.fn = None, None
    return out


def timed_call(runner: Runner, warmup: int = 3) -> Any:
    """Warm ``runner`` up (compilation, first-touch), then return what an outside timer such as
    pytest-benchmark should time: the call, followed on a GPU by a synchronize inside the timed
    region, so that the device work is counted and not just its launch."""
    for _ in range(warmup):
        runner.fn()
    runner.timer.sync()
    if runner.timer.device == "cpu":
        return runner.fn
    fn, sync = runner.fn, runner.timer.sync

    def call():
        fn()
        sync()

    return call


def median(times: Sequence[float]) -> Any:
    return statistics.median(times)


def percent(x: Any, ceiling: Any) -> Any:
    return None if not ceiling else 100.0 * x / ceiling


def fmt_n(n: int) -> Any:
    """``2^20`` for powers of two, ``10^7`` for powers of ten, else the plain number."""
    n = int(n)
    if n >= 1024 and n & (n - 1) == 0:
        return f"2^{n.bit_length() - 1}"
    k = len(str(n)) - 1
    if n >= 1000 and n == 10**k:
        return f"10^{k}"
    return str(n)


def cpu_model() -> Any:
    """The CPU's model name (from /proc/cpuinfo on Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(gpu_name: Any = None) -> Any:
    """Where the numbers come from: CPU model and cores, memory, and the GPU when one was used."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "machine": platform.machine(),
        "system": platform.system(),
    }
    with contextlib.suppress(AttributeError, OSError):
        info["cores_usable"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(ValueError, OSError, AttributeError):
        info["memory_gib"] = round(
            os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1
        )
    try:
        import numba

        info["numba_threads"] = numba.get_num_threads()
    except ImportError:
        pass
    info["gpu"] = gpu_name
    return info


def versions() -> Any:
    """Versions of everything that shaped the numbers (optional packages only when present)."""
    from importlib import metadata

    from .. import __version__

    out = {"python": platform.python_version(), "numpy": np.__version__, "fastopt": __version__}
    for dist in ("numba", "numba-cuda", "cupy-cuda12x", "cupy-cuda13x", "cupy", "torch"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out
