"""``fastopt.torch`` over a model's parameter list, and what a training loop wraps around a step.

The rows of the GPU run (``scripts/gpu_run.py``) that compare the same work side by side, each
group timed in interleaved rounds (``measure.measure_rounds``) so that every ratio carries one
value per round:

- ``list_group``: ``fastopt.torch`` over a transformer's parameter list (195 or 196 tensors,
  ``measure.transformer_shapes``), torch's fused step on the very same list, fastopt's flat
  step (``opt.step(buf)``, one FlatBuffer) and torch's fused step on one flat tensor of the
  same size, in one storage format (``measure.PRECISIONS``); torch peers only where torch keeps
  the same bytes (no master copy: torch.optim has none);
- ``graph_group``: the same list stepped by a ``capturable=True`` ``fastopt.torch`` optimizer
  replayed from a CUDA graph, the flat capturable step replayed from one, and torch's
  ``capturable=True`` fused step replayed from one (its peer);
- ``clip_group``: a step with ``max_grad_norm`` against the unclipped step and against torch's
  ``clip_grad_norm_`` followed by its fused step;
- ``lowbit_group``: quantized optimizer state (``state_dtype="int8"``, ``"float8_e4m3"``,
  ``"int4"``) against float32 state, with the bytes of state per parameter read from the
  state itself;
- ``count_syncs``: host synchronisations in a steady step with ``torch.amp.GradScaler``, from
  torch's sync debug mode.

A row whose code does not exist in this checkout is not scheduled: ``features`` probes for each
(a keyword a constructor refuses, a module that does not import) and says why not. Every
function takes ``device="cpu"`` too (the ``numba`` backend, host timers, numba's ceilings), so
the machinery runs in the default test run without a GPU.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .measure import Case, Runner

import contextlib
import importlib.util
import uuid
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from .measure import (
    CASES,
    PRECISIONS,
    HostTimer,
    Runner,
    bytes_per_step,
    measure_rounds,
    median,
    percent,
    ratio_spread,
    traffic_arrays,
    transformer_shapes,
)

__all__ = [
    "FEATURES",
    "LOWBIT_STATES",
    "clip_group",
    "count_syncs",
    "features",
    "graph_group",
    "list_group",
    "lowbit_group",
    "same_work_in_torch",
    "sync_rows",
]

#: the quantized state dtypes whose rows are scheduled (each only where fastopt accepts it)
LOWBIT_STATES = ("int8", "float8_e4m3", "int4")
#: the guards ``features`` reports, by name
FEATURES = (
    "fastopt.torch",
    "bfloat16",
    "capturable",
    "max_grad_norm",
    *(f"{k}:{sd}" for sd in LOWBIT_STATES for k in ("state_dtype", "torch_state_dtype")),
    "sync_debug_mode",
    "bitsandbytes",
)
#: what a constructor says when it does not take a keyword (or value) of a scheduled row
_REFUSED = (TypeError, ValueError, NotImplementedError, RuntimeError)


def _torch():
    import torch

    return torch


def _fot():
    import fastopt.torch as fot

    return fot


def _probe_param(device):
    torch = _torch()
    p = torch.nn.Parameter(torch.zeros(8, device=device))
    p.grad = torch.ones(8, device=device)
    return p


def _try(make):
    """``(True, "")`` when ``make()`` runs, else ``(False, why)``."""
    try:
        make()
    except _REFUSED as exc:
        return False, f"{type(exc).__name__}: {str(exc)[:200]}"
    except ImportError as exc:
        return False, f"ImportError: {exc}"
    return True, ""


def features(device: str = "cuda", backend: Any = None) -> Any:
    """Which scheduled rows the code here can run: name -> ``{"available": bool, "why": str}``.

    - ``fastopt.torch``: the adapter imports (torch is installed);
    - ``bfloat16``: bfloat16 tensors can be viewed (``ml_dtypes``);
    - ``capturable``: ``fastopt.torch.Adam(..., capturable=True)`` constructs and steps;
    - ``max_grad_norm``: ``fastopt.torch.Adam(..., max_grad_norm=1.0)`` constructs and steps;
    - ``state_dtype:<dtype>`` for each of ``LOWBIT_STATES``: ``fastopt.Adam(state_dtype=...)``
      steps a ``FlatBuffer`` on the device (every backend with ``QUANT_STATE``: the CPU
      backend, both GPU backends); ``torch_state_dtype:<dtype>``:
      ``fastopt.torch.Adam(..., state_dtype=...)`` constructs and steps;
    - ``sync_debug_mode``: torch has ``torch.cuda.set_sync_debug_mode``;
    - ``bitsandbytes``: ``bitsandbytes`` imports (its 8-bit Adam is the low-bit peer).
    """
    out = {}

    def put(name, ok, why=""):
        out[name] = {"available": bool(ok), "why": "" if ok else why}

    ok, why = _try(_fot)
    put("fastopt.torch", ok, why)
    put(
        "bfloat16",
        importlib.util.find_spec("ml_dtypes") is not None,
        "ml_dtypes is not installed",
    )
    backend = backend or ("cupy" if device == "cuda" else "numba")
    for name, kw in (
        ("capturable", {"capturable": True}),
        ("max_grad_norm", {"max_grad_norm": 1.0}),
    ):
        if not out["fastopt.torch"]["available"]:
            put(name, False, "fastopt.torch does not import")
            continue

        def make(kw=kw):
            opt = _fot().Adam([_probe_param(device)], backend=backend, **kw)
            opt.step()

        put(name, *_try(make))
    import fastopt

    adam: Any = fastopt.Adam  # probed with keywords it may not take

    def flat_step(sd):  # a step on the device: a backend may construct but not step the plan
        if device == "cuda":
            import cupy as xp
        else:
            xp = np
        buf = fastopt.FlatBuffer({"w": xp.zeros(256, dtype=xp.float32)})
        adam(state_dtype=sd, backend=backend).step(buf)

    for sd in LOWBIT_STATES:
        put(f"state_dtype:{sd}", *_try(lambda sd=sd: flat_step(sd)))
        if not out["fastopt.torch"]["available"]:
            put(f"torch_state_dtype:{sd}", False, "fastopt.torch does not import")
            continue

        def make(sd=sd):
            opt = _fot().Adam([_probe_param(device)], backend=backend, state_dtype=sd)
            opt.step()

        put(f"torch_state_dtype:{sd}", *_try(make))
    torch_ok = importlib.util.find_spec("torch") is not None
    put(
        "sync_debug_mode",
        torch_ok and hasattr(_torch().cuda, "set_sync_debug_mode"),
        "torch.cuda.set_sync_debug_mode is missing",
    )
    put(
        "bitsandbytes",
        importlib.util.find_spec("bitsandbytes") is not None,
        "bitsandbytes is not installed",
    )
    return out


# -- data and runners ----------------------------------------------------------------------------


def _dtype(name):
    return getattr(_torch(), name)


def list_data(n: int, precision: str, device: str, seed: int = 0) -> Any:
    """A flat param and grad of ``n`` elements as torch tensors on ``device`` in the storage of
    ``precision`` (a ``measure.PRECISIONS`` name): standard normal params, grads scaled by
    1e-2, drawn in float32 and rounded."""
    torch = _torch()
    pr = PRECISIONS[precision]
    gen = torch.Generator(device=device).manual_seed(seed)
    p = torch.randn(int(n), generator=gen, device=device).to(_dtype(pr.param))
    g = (torch.randn(int(n), generator=gen, device=device) * 1e-2).to(_dtype(pr.grad))
    return p, g


def _params(p_flat, g_flat, layout):
    """torch Parameters holding copies of ``p_flat``: one tensor, or the transformer's list."""
    torch = _torch()
    if layout == "flat":
        pieces = [(p_flat, g_flat)]
    else:
        shapes = transformer_shapes(p_flat.numel())
        if shapes is None:
            raise ValueError(f"n={p_flat.numel()} is too small for a transformer's list")
        pieces, off = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            pieces.append((p_flat[off : off + size].view(shape), g_flat[off : off + size]))
            off += size
    params = []
    for p, g in pieces:
        q = torch.nn.Parameter(p.clone())  # each tensor owns its storage, as a model's do
        q.grad = g.reshape(p.shape).clone()
        params.append(q)
    return params


def _timer(device, kind="torch"):
    if device == "cpu":
        return HostTimer()
    from .gpu import timer_for

    return timer_for(kind)


def same_work_in_torch(precision: str, kwargs: Any = ()) -> bool:
    """Whether ``torch.optim``'s fused step keeps the same bytes as fastopt in ``precision``:
    params, grads and state in one dtype, no master copy (torch.optim has none), no other
    state dtype."""
    pr = PRECISIONS[precision]
    kw = dict(pr.kwargs, **dict(kwargs))
    return pr.param == pr.grad and not kw.get("master_weights") and not kw.get("state_dtype")


def adapter_runner(
    case: Case,
    p_flat: Any,
    g_flat: Any,
    layout: str,
    device: str,
    nbytes: int,
    kwargs: Any = (),
    backend: Any = None,
) -> Runner:
    """``fastopt.torch.<cls>`` stepping copies of ``p_flat`` as one tensor or as the list."""
    params = _params(p_flat, g_flat, layout)
    kw = dict(case.fastopt_kwargs, **dict(kwargs))
    if backend is not None:
        kw["backend"] = backend
    opt = getattr(_fot(), case.cls)(params, **kw)
    return Runner(
        "fastopt.torch",
        opt.step,
        _timer(device),
        nbytes,
        info={"layout": layout, "n_tensors": len(params), "peer": f"fastopt.torch.{case.cls}"},
        keep=(params, opt),
    )


def torch_fused_runner(
    case: Case,
    p_flat: Any,
    g_flat: Any,
    layout: str,
    device: str,
    nbytes: int,
    clip: Any = None,
    **extra: Any,
) -> Runner:
    """``torch.optim.<cls>(fused=True, **extra)`` over copies of ``p_flat``; with ``clip`` a
    ``clip_grad_norm_(params, clip)`` (torch's default: its foreach kernels on a GPU) before
    each step."""
    torch = _torch()
    params = _params(p_flat, g_flat, layout)
    opt = getattr(torch.optim, case.torch_cls)(  # type: ignore[arg-type]  # rows of cases torch has
        params, **dict(case.torch_kwargs), fused=True, **extra
    )
    peer = f"torch.optim.{case.torch_cls}(fused=True" + "".join(
        f", {k}={v!r}" for k, v in extra.items()
    )
    peer += ")"
    fn = opt.step
    if clip is not None:
        clip_ = torch.nn.utils.clip_grad_norm_

        def fn():
            clip_(params, clip)
            opt.step()

        peer = f"torch.nn.utils.clip_grad_norm_ + {peer}"
    return Runner(
        f"torch-fused{'+clip' if clip is not None else ''}",
        fn,
        _timer(device),
        nbytes,
        info={"layout": layout, "n_tensors": len(params), "peer": peer},
        keep=(params, opt),
    )


def flat_runner(
    case: Case,
    p_flat: Any,
    g_flat: Any,
    device: str,
    nbytes: int,
    kwargs: Any = (),
    backend: Any = None,
) -> Runner:
    """fastopt's flat step: ``opt.step(buf)`` over one FlatBuffer holding a copy of
    ``p_flat`` (on its device), the grads copied in."""
    import fastopt
    from fastopt._arrays import as_xp_array

    backend = backend or ("cupy" if device == "cuda" else "numba")
    gdt = None if g_flat.dtype == p_flat.dtype else "float32"
    buf = fastopt.FlatBuffer({"w": p_flat}, grad_dtype=gdt)
    buf.grads["w"][...] = as_xp_array(g_flat)
    opt = getattr(fastopt, case.cls)(**case.fastopt_kwargs, **dict(kwargs), backend=backend)
    return Runner(
        backend,
        lambda: opt.step(buf),
        _timer(device, "cupy" if device == "cuda" else None),
        nbytes,
        info={"layout": "flat", "n_tensors": 1, "opt": opt},
        keep=(buf, opt),
    )


def _ceilings(facs, device, arrays_of, p_flat, io=None, n_state=0):
    """Add the group's ceilings to ``facs``: on a GPU the same-traffic kernel of
    ``arrays_of()`` and a memcpy of the param's elements as float32 (4 bytes each, whatever
    the plan stores); on the CPU numba's same-traffic kernel of the storage format ``io``."""
    if device == "cuda":
        from . import gpu

        facs[("ceiling", "traffic")] = lambda: gpu.bytes_traffic_runner(arrays_of())
        facs[("memcpy",)] = lambda: gpu.memcpy_runner(_as_cupy(p_flat.float()))
        return
    from . import ceilings_cpu

    n = p_flat.numel()
    if io is None or io.plain:
        p0 = np.zeros(n, np.float32)
        facs[("ceiling", "numba")] = lambda: ceilings_cpu.traffic_runner(n_state, p0, p0 + 1)
    else:
        facs[("ceiling", "numba")] = lambda: ceilings_cpu.mixed_traffic_runner(io, n_state, n)


def _as_cupy(t):
    from fastopt._arrays import as_xp_array

    return as_xp_array(t)


# -- records -------------------------------------------------------------------------------------


def _records(res, case, device, n, dtype, step, extra=None, errors=None):
    """Records of one group (``measure_rounds``'s result), keyed as the factories were:
    ``(kind, backend, layout[, variant])``; the ceilings scored in. Returns (records by key,
    ceilings)."""
    from .groups import record

    group = uuid.uuid4().hex[:12]
    out, ceilings = {}, {}
    for key, (runner, times, rts) in res.items():
        if key[0] in ("ceiling", "memcpy"):
            ceilings["traffic" if key[0] == "ceiling" else "memcpy"] = (runner, times, rts)
            continue
        _, backend, layout, *variant = key
        rec = record(case, device, n, dtype, runner, times, backend, layout, rts)
        rec.update(group=group, step=step, variant=variant[0] if variant else None)
        rec.update(extra or {})
        if errors:
            rec["group_errors"] = errors
        for k in ("graph", "state_dtype", "state_bytes_per_param", "clip"):
            if k in runner.info:
                rec[k] = runner.info[k]
        out[key] = rec
    if not out and errors:
        raise RuntimeError(f"no runner of the group could run: {errors}")
    if device == "cuda":
        from .gpu import gpu_name
        from .groups import score_gpu_group

        score_gpu_group(list(out.values()), ceilings, gpu_name())
    elif "traffic" in ceilings:
        runner, times, rts = ceilings["traffic"]
        for rec in out.values():
            rec["ceiling_backend"], rec["ceiling_bytes"] = "numba", runner.bytes
            rec["ceiling_gbps"] = runner.bytes / median(times) / 1e9
            rec["pct_of_ceiling"] = percent(rec["gbps"], rec["ceiling_gbps"])
    return out, ceilings


def relate(rec: Any, other: Any, field: Any, invert: Any = False) -> Any:
    """``rec[field]``: ``other``'s time over ``rec``'s (``invert``: ``rec``'s over ``other``'s),
    the two timed in the same rounds, with ``field + "_spread"`` (one ratio per round) and
    ``field + "_vs"`` naming ``other``. Nothing when ``other`` is None."""
    if other is None:
        return rec
    a, b = (rec, other) if invert else (other, rec)
    rec[field] = a["median_s"] / b["median_s"]
    rec[field + "_spread"] = ratio_spread(a.get("round_median_s"), b.get("round_median_s"))
    rec[field + "_vs"] = f"{other['backend']} ({other['layout']}" + (
        f", {other['variant']})" if other.get("variant") else ")"
    )
    return rec


def _measure(facs, device, rounds, per_round, warmup, budget_s):
    """``measure_rounds`` of the group; a runner that fails to build or warm up is left out,
    its error kept (``_records`` puts the group's errors into every record)."""
    errors: dict[str, Any] = {}
    res = measure_rounds(
        facs, rounds=rounds, per_round=per_round, warmup=warmup, budget_s=budget_s, errors=errors
    )
    return res, {"/".join(map(str, k)): v for k, v in errors.items()}


# -- the groups ----------------------------------------------------------------------------------


def list_group(
    case: Case,
    n: int,
    precision: str = "float32",
    device: str = "cuda",
    backend: Any = None,
    rounds: int = 7,
    per_round: int = 3,
    warmup: int = 3,
    budget_s: float | None = None,
    step: Any = "torch-list",
) -> Any:
    """``fastopt.torch`` over the transformer's list in storage format ``precision`` beside torch
    fused on the same list, fastopt's flat step and torch fused on one flat tensor (torch only
    where it keeps the same bytes: ``same_work_in_torch``), all moving the same bytes. The
    list row gets ``speedup_vs_torch`` (torch fused on the list over it) and ``pct_of_flat``
    (its GB/s as a percentage of the flat step's), each with its per-round spread."""
    if isinstance(case, str):
        case = CASES[case]
    pr = PRECISIONS[precision]
    io = pr.io()
    p, g = list_data(n, precision, device)
    nbytes = bytes_per_step(case.n_state, n, io=io, n_read=case.n_read)
    kw = pr.kwargs
    facs: dict[tuple[str, ...], Callable[..., Any]] = {
        ("adapter", "fastopt.torch", "list"): lambda: adapter_runner(
            case, p, g, "list", device, nbytes, kw, backend
        ),
        ("step", backend or ("cupy" if device == "cuda" else "numba"), "flat"): lambda: flat_runner(
            case, p, g, device, nbytes, kw, backend
        ),
    }
    if same_work_in_torch(precision) and case.torch_cls:
        for layout in ("list", "flat"):
            facs[("torch", "torch-fused", layout)] = lambda lay=layout: torch_fused_runner(
                case, p, g, lay, device, nbytes
            )
    _ceilings(
        facs,
        device,
        lambda: traffic_arrays(n, case.n_state, io=io, n_read=case.n_read),
        p,
        io,
        case.n_state,
    )
    res, errors = _measure(facs, device, rounds, per_round, warmup, budget_s)
    recs, _ = _records(
        res, case, device, n, precision, step, {"precision": dict(kw)}, errors=errors
    )
    by = {(k[1], k[2]): r for k, r in recs.items()}
    flat = next((r for (b, lay), r in by.items() if lay == "flat" and b != "torch-fused"), None)
    lst = by.get(("fastopt.torch", "list"))
    if lst is not None:
        relate(lst, by.get(("torch-fused", "list")), "speedup_vs_torch")
        if flat is not None:
            relate(lst, flat, "pct_of_flat")
            lst["pct_of_flat"] *= 100
            if lst["pct_of_flat_spread"]:
                for k in ("min", "median", "max"):
                    lst["pct_of_flat_spread"][k] *= 100
    if flat is not None:
        relate(flat, by.get(("torch-fused", "flat")), "speedup_vs_torch")
    return list(recs.values())


def graph_group(
    case: Case,
    n: int = 1 << 20,
    device: str = "cuda",
    backend: Any = None,
    rounds: int = 7,
    per_round: int = 3,
    warmup: int = 3,
    budget_s: float | None = None,
    step: Any = "graph",
) -> Any:
    """At ``n`` (float32): a ``capturable=True`` ``fastopt.torch`` step over the list replayed
    from a CUDA graph (when ``features()["capturable"]``), the flat capturable step replayed
    from one (``gpu.graph_runner``) and torch's ``capturable=True`` fused step over the same
    list replayed from one. The list row gets ``x_flat_graph`` (its time over the flat graph
    step's) and ``speedup_vs_torch`` (torch's over its), with their spreads."""
    if isinstance(case, str):
        case = CASES[case]
    from . import gpu

    p, g = list_data(n, "float32", device)
    nbytes = bytes_per_step(case.n_state, n, "float32", n_read=case.n_read)
    feats = features(device)
    facs: dict[tuple[str, ...], Callable[..., Any]] = {}
    if feats["capturable"]["available"]:

        def fot_graph():
            params = _params(p, g, "list")
            opt = getattr(_fot(), case.cls)(params, **case.fastopt_kwargs, capturable=True)
            return gpu.torch_graph_runner(
                "fastopt.torch",
                opt.step,
                nbytes,
                keep=(params, opt),
                info={"layout": "list", "n_tensors": len(params), "graph": True},
            )

        facs[("graph", "fastopt.torch", "list", "graph")] = fot_graph
    p0, g0 = _as_cupy(p), _as_cupy(g)
    flat_backend = backend or ("cupy" if device == "cuda" else "numba")

    def flat_graph():
        r = gpu.graph_runner(case, p0, g0, backend=flat_backend)
        r.info.update(layout="flat", n_tensors=1, graph=True)
        return r

    facs[("graph", flat_backend, "flat", "graph")] = flat_graph
    if case.torch_cls:

        def torch_graph():
            torch = _torch()
            params = _params(p, g, "list")
            opt = getattr(torch.optim, case.torch_cls)(  # type: ignore[arg-type]  # rows of cases torch has
                params, **dict(case.torch_kwargs), fused=True, capturable=True
            )
            return gpu.torch_graph_runner(
                "torch-fused",
                opt.step,
                nbytes,
                keep=(params, opt),
                info={
                    "layout": "list",
                    "n_tensors": len(params),
                    "graph": True,
                    "peer": f"torch.optim.{case.torch_cls}(fused=True, capturable=True), "
                    "replayed from a CUDA graph",
                },
            )

        facs[("graph", "torch-fused", "list", "graph")] = torch_graph
    res, errors = _measure(facs, device, rounds, per_round, warmup, budget_s)
    recs, _ = _records(res, case, device, n, "float32", step, errors=errors)
    by = {(k[1], k[2]): r for k, r in recs.items()}
    lst = by.get(("fastopt.torch", "list"))
    if lst is not None:
        relate(lst, by.get((flat_backend, "flat")), "x_flat_graph", invert=True)
        relate(lst, by.get(("torch-fused", "list")), "speedup_vs_torch")
    return list(recs.values())


def clip_group(
    case: Case,
    n: int,
    device: str = "cuda",
    backend: Any = None,
    rounds: int = 7,
    per_round: int = 3,
    warmup: int = 3,
    budget_s: float | None = None,
    step: Any = "clip",
    max_norm_fraction: float = 0.5,
) -> Any:
    """float32 over the list: ``fastopt.torch`` with ``max_grad_norm`` (when
    ``features()["max_grad_norm"]``) and without, torch's ``clip_grad_norm_`` + fused step and
    torch's fused step alone. ``max_grad_norm`` is ``max_norm_fraction`` of the grads' norm, so
    every step clips. Bytes: the unclipped step's (the same work; a clipped step also reads
    the grads once more for the norm). The clipped fastopt row gets ``x_unclipped`` (its time
    over the unclipped step's) and ``speedup_vs_torch`` (torch's clip + step over it)."""
    if isinstance(case, str):
        case = CASES[case]
    torch = _torch()
    p, g = list_data(n, "float32", device)
    max_norm = max_norm_fraction * float(torch.linalg.vector_norm(g.float()))
    nbytes = bytes_per_step(case.n_state, n, "float32", n_read=case.n_read)
    facs: dict[tuple[str, ...], Callable[..., Any]] = {
        ("adapter", "fastopt.torch", "list"): lambda: adapter_runner(
            case, p, g, "list", device, nbytes, backend=backend
        ),
    }
    if features(device, backend)["max_grad_norm"]["available"]:

        def clipped():
            r = adapter_runner(
                case, p, g, "list", device, nbytes, {"max_grad_norm": max_norm}, backend
            )
            r.info["clip"] = max_norm
            return r

        facs[("adapter", "fastopt.torch", "list", "clip")] = clipped
    if case.torch_cls:
        facs[("torch", "torch-fused", "list")] = lambda: torch_fused_runner(
            case, p, g, "list", device, nbytes
        )

        def torch_clipped():
            r = torch_fused_runner(case, p, g, "list", device, nbytes, clip=max_norm)
            r.info["clip"] = max_norm
            return r

        facs[("torch", "torch-fused", "list", "clip")] = torch_clipped
    res, errors = _measure(facs, device, rounds, per_round, warmup, budget_s)
    recs, _ = _records(res, case, device, n, "float32", step, errors=errors)
    by = {k[1:]: r for k, r in recs.items()}
    for backend_ in ("fastopt.torch", "torch-fused"):
        c = by.get((backend_, "list", "clip"))
        if c is not None:
            relate(c, by.get((backend_, "list")), "x_unclipped", invert=True)
    c = by.get(("fastopt.torch", "list", "clip"))
    if c is not None:
        relate(c, by.get(("torch-fused", "list", "clip")), "speedup_vs_torch")
    return list(recs.values())


def _state_arrays(opt):
    """The optimizer's state arrays of its one FlatBuffer parameter: name -> (bytes, shape),
    0-d values (step counts) left out."""
    out = {}
    for name, arrays in opt.state.items():
        for s, a in arrays.items():
            if getattr(a, "ndim", 0) >= 1:
                out[f"{name}.{s}"] = int(a.nbytes)
    return out


def _list_state_runner(label, opt, params, device, n, state_dtype):
    """A runner of ``opt.step`` over ``params`` whose bytes are read from its state: params
    read and written, grads read, every state tensor (0-d step counts aside) read and
    written."""
    state = sum(
        int(t.numel() * t.element_size())
        for st in opt.state.values()
        for t in st.values()
        if hasattr(t, "element_size") and t.dim() >= 1
    )
    own = sum(int(q.numel() * q.element_size()) for q in params)
    return Runner(
        label,
        opt.step,
        _timer(device),
        3 * own + 2 * state,
        info={
            "layout": "list",
            "n_tensors": len(params),
            "state_dtype": state_dtype,
            "state_bytes_per_param": state / n,
            "peer": f"{type(opt).__module__}.{type(opt).__name__}",
        },
        keep=(params, opt),
    )


def lowbit_group(
    case: Case,
    n: int,
    state_dtypes: Any = LOWBIT_STATES,
    device: str = "cuda",
    backend: Any = None,
    rounds: int = 7,
    per_round: int = 3,
    warmup: int = 3,
    budget_s: float | None = None,
    step: Any = "lowbit",
) -> Any:
    """fastopt's flat step (float32 params) with each of ``state_dtypes`` fastopt accepts
    (``features``) against the same step with float32 state, on ``backend`` (or on each of a
    tuple of backends: the GPU run's cupy and numba-cuda rows in one group). Bytes and the
    ceiling's traffic are read from the state after a first step: the param read and written,
    the grad read, every state array (codes, scales, whatever the format keeps) read and written
    once; each row carries ``state_bytes_per_param`` (bytes of state over parameters, master
    copies aside) and ``speedup_vs_float32_state``. With ``bitsandbytes`` installed, its 8-bit
    Adam over the list beside ``fastopt.torch`` on the same list in the same state dtype."""
    if isinstance(case, str):
        case = CASES[case]
    # ``backend`` may name several (the GPU run: both GPU backends' flat steps in one group)
    backends = tuple(backend) if isinstance(backend, (tuple, list)) else (backend,)
    backend = backends[0]
    p, g = list_data(n, "float32", device)
    feats = features(device, backend)
    dtypes = ["float32"] + [sd for sd in state_dtypes if feats[f"state_dtype:{sd}"]["available"]]
    shapes = {}

    def flat(sd, be=backend):
        kw = {} if sd == "float32" else {"state_dtype": sd}
        r = flat_runner(case, p, g, device, 0, kw, be)
        r.fn()  # the state exists from the first step on
        arrays = _state_arrays(r.info["opt"])
        shapes[sd] = arrays
        state = sum(b for k, b in arrays.items() if not k.endswith("master_param"))
        r.bytes = 3 * 4 * n + 2 * sum(arrays.values())
        r.info.update(state_dtype=sd, state_bytes_per_param=state / n)
        return r

    facs: dict[tuple[str, ...], Callable[..., Any]] = {}
    for be in backends:
        for sd in dtypes:
            facs[("step", be or ("cupy" if device == "cuda" else "numba"), "flat", sd)] = (
                lambda sd=sd, be=be: flat(sd, be)
            )
    if device == "cuda":
        from . import gpu

        for sd in dtypes:

            def ceiling(sd=sd):
                arrays = [("param", 4 * n, "rw"), ("grad", 4 * n, "r")]
                arrays += [(k, b, "rw") for k, b in shapes[sd].items()]
                r = gpu.bytes_traffic_runner(arrays)
                r.info["state_dtype"] = sd
                return r

            facs[("ceiling", sd)] = ceiling
    if "int8" in state_dtypes and feats["bitsandbytes"]["available"] and device == "cuda":

        def bnb():
            import bitsandbytes

            params = _params(p, g, "list")
            opt = bitsandbytes.optim.Adam8bit(params, **dict(case.torch_kwargs))
            opt.step()  # the state exists from the first step on
            return _list_state_runner("bitsandbytes", opt, params, device, n, "int8")

        facs[("peer", "bitsandbytes", "list", "int8")] = bnb
        if feats["torch_state_dtype:int8"]["available"]:

            def fot_int8():
                params = _params(p, g, "list")
                opt = getattr(_fot(), case.cls)(
                    params, **case.fastopt_kwargs, state_dtype="int8", backend=backend or "auto"
                )
                opt.step()
                return _list_state_runner("fastopt.torch", opt, params, device, n, "int8")

            facs[("adapter", "fastopt.torch", "list", "int8")] = fot_int8
    res, errors = _measure(facs, device, rounds, per_round, warmup, budget_s)
    ceil = {k[1]: v for k, v in res.items() if k[0] == "ceiling"}
    res = {k: v for k, v in res.items() if k[0] != "ceiling"}
    recs, _ = _records(res, case, device, n, "float32", step, errors=errors)
    bases = {k[1]: r for k, r in recs.items() if k[0] == "step" and k[-1] == "float32"}
    bnb = recs.get(("peer", "bitsandbytes", "list", "int8"))
    fot8 = recs.get(("adapter", "fastopt.torch", "list", "int8"))
    if fot8 is not None:
        relate(fot8, bnb, "speedup_vs_bitsandbytes")
    for key, rec in recs.items():
        if key[0] != "step":  # the flat steps: each against its own ceiling and float32 state
            continue
        sd = key[-1]
        if sd in ceil:
            from .gpu import gpu_name
            from .groups import score_gpu_group

            score_gpu_group([rec], {"traffic": ceil[sd]}, gpu_name())
        base = bases.get(key[1])
        if base is not None and rec is not base:
            relate(rec, base, "speedup_vs_float32_state")
        if sd == "int8":  # the same parameters and state dtype in bitsandbytes' 8-bit Adam
            relate(rec, bnb, "speedup_vs_bitsandbytes")
    return list(recs.values())


# -- host synchronisations -----------------------------------------------------------------------

#: what torch's sync debug mode says when an operation synchronises the host
SYNC_WARNING = "synchroniz"


def count_syncs(step: Any, steps: Any = 5, warmup: int = 3, set_mode: Any = None) -> Any:
    """Host synchronisations per call of ``step`` once steady: ``warmup`` calls, then
    ``steps`` calls under torch's sync debug mode "warn", each warning counted
    (``torch.cuda.set_sync_debug_mode``; ``set_mode`` stands in for it); then one call under
    "error", which raises on the first synchronisation. Returns ``{"per_step": [...],
    "error_mode": "passed" or what it raised}``; the mode is reset to "default" whatever
    happens."""
    if set_mode is None:
        set_mode = _torch().cuda.set_sync_debug_mode
    for _ in range(warmup):
        step()
    per_step = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            set_mode("warn")
            for _ in range(steps):
                before = len(caught)
                step()
                per_step.append(
                    sum(SYNC_WARNING in str(w.message).lower() for w in caught[before:])
                )
        finally:
            set_mode("default")
    try:
        set_mode("error")
        step()
        error_mode = "passed"
    except RuntimeError as exc:
        error_mode = f"raised: {str(exc)[:200]}"
    finally:
        set_mode("default")
    return {"per_step": per_step, "error_mode": error_mode}


def _amp_step(opt, scaler, device):
    """One steady training-loop step around ``opt`` with ``scaler``: scale a loss (a device
    scalar), ``scaler.step``, ``scaler.update`` (the grads are already there)."""
    torch = _torch()
    loss = torch.ones((), device=device)

    def step():
        scaler.scale(loss)
        scaler.step(opt)
        scaler.update()

    return step


def sync_rows(
    case: Case, n: int = 1 << 20, device: str = "cuda", steps: int = 5, set_mode: Any = None
) -> Any:
    """Host synchronisations per steady step with ``torch.amp.GradScaler``, over the list in
    float32: ``fastopt.torch`` (as built by default, and with ``capturable=True`` when the
    feature is there: the sync-free step) and torch's fused step (its peer). Returns one dict per
    optimizer: ``optimizer``, ``backend``, ``layout``, ``n``, ``n_tensors``, ``per_step``,
    ``syncs_per_step`` (the most in any steady step), ``error_mode``."""
    if isinstance(case, str):
        case = CASES[case]
    torch = _torch()
    p, g = list_data(n, "float32", device)
    out = []
    makers = {"fastopt.torch": lambda ps: getattr(_fot(), case.cls)(ps, **case.fastopt_kwargs)}
    if features(device)["capturable"]["available"]:
        # the step that keeps its counts, scalars, loss scale and found-inf flag on the device
        makers["fastopt.torch-capturable"] = lambda ps: getattr(_fot(), case.cls)(
            ps, **case.fastopt_kwargs, capturable=True
        )
    if case.torch_cls:
        makers["torch-fused"] = lambda ps: getattr(torch.optim, case.torch_cls)(  # type: ignore[arg-type]  # rows of cases torch has
            ps, **dict(case.torch_kwargs), fused=True
        )
    for label, make in makers.items():
        params = _params(p, g, "list")
        opt = make(params)
        scaler = torch.amp.GradScaler(device, init_scale=2.0**10, growth_interval=10**6)
        res = count_syncs(_amp_step(opt, scaler, device), steps=steps, set_mode=set_mode)
        out.append(
            {
                "optimizer": case.name,
                "backend": label,
                "layout": "list",
                "n": int(n),
                "n_tensors": len(params),
                "per_step": res["per_step"],
                "syncs_per_step": max(res["per_step"], default=None),
                "error_mode": res["error_mode"],
            }
        )
        del params, opt
        with contextlib.suppress(Exception):
            if device == "cuda":
                torch.cuda.synchronize()
    return out
