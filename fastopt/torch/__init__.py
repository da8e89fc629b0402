"""``fastopt.torch``: ``torch.optim`` drop-ins running fastopt's fused kernels.

    import fastopt.torch as fot
    opt = fot.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    scaler = torch.amp.GradScaler("cuda")      # or "cpu"
    ...
    scaler.scale(loss).backward(); scaler.step(opt); scaler.update(); opt.zero_grad()

Every fastopt optimizer (``fastopt.optimizers.CLASSES``) has a class here of the same name: a
subclass of ``torch.optim.Optimizer`` with ``torch.optim``'s signature (``params`` as tensors or
param-group dicts, the same keyword names and defaults) plus ``backend="auto"`` (numba for CPU
tensors, cupy for CUDA tensors; "numba-cuda" on request). Param groups, ``add_param_group``,
``zero_grad``, every learning-rate scheduler, closures and hooks are torch's own.

The state is torch's: ``state[p]`` holds the same keys, shapes and dtypes (``step`` a float32
0-d tensor where torch keeps one), so ``state_dict()`` loads into ``torch.optim`` and the
reverse, mid-run. Parameters whose ``.grad`` is None are skipped and keep their state and step.

A step launches once per (device, dtype, variant, step count, master copy or not) over all the
parameters of a param group that have a gradient, in place: on the CPU one parallel loop walks
a table of the tensors' addresses (``numba_backend.launch_many``, or ``launch_many_io`` for
16-bit storage, master copies and loss scales); on a GPU each tensor is one launch of the CuPy
kernel. Parameters stay where they are: nothing is repacked, so ``zero_grad``,
``.to()``, ``load_state_dict`` and parameters added later need no care. Every tensor is
checked (device, dtype, shape, contiguity) before anything is written.

AMP: the classes declare ``_step_supports_amp_scaling``, so ``torch.amp.GradScaler`` hands
them its scale and found-inf flag instead of unscaling the gradients itself; a step with
``found_inf`` set changes nothing (params, state, step counts), and the gradients are
unscaled in the same pass as the update (``p.grad`` keeps GradScaler's scale, as with torch's
fused optimizers). float16 and bfloat16 parameters are stepped in their storage dtype (math in
float32, round to nearest even) with state in the parameter's dtype, or, with
``master_weights=True``, through an fp32 copy (``state[p]["master_param"]``) with fp32 state,
the parameter stored from the copy in the same pass.
"""

import inspect

import numpy as np
import torch

from .. import optimizers as _optimizers
from .._arrays import as_xp_array
from ..backends import get_backend
from ..base import PRECISION_DEFAULTS
from ..functional import Launch
from ..kernels import RULES
from ..kernels.storage import io_for
from . import _dtensor
from ._compat import TorchContract, advances_host_state_as_loaded, hp_value
from ._steady import Steady

__all__ = ["CPUOffload", "FusedOptimizer", *_optimizers.CLASSES, "Adagrad", "RMSprop"]

#: torch dtypes the kernels run on, and their storage kinds (``kernels.storage``)
_KINDS = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}
#: the plain dtypes: one many-tensor launch on the CPU
_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
#: keyword arguments of torch.optim constructors that select torch's own implementation
_TORCH_IMPL = ("foreach", "fused", "capturable", "differentiable")


def _torch_defaults(cls):
    """The param-group keys torch's counterpart of ``cls`` keeps that fastopt's has not
    (``foreach``, ``fused``, ...), with torch's defaults: so state dicts load both ways."""
    from .._torch_names import torch_name as _torch_name

    name = _torch_name(cls)
    if name is None:
        return {}
    tcls = getattr(torch.optim, name)
    probe = tcls([torch.nn.Parameter(torch.zeros(1))])
    return dict(probe.defaults)


class FusedOptimizer(TorchContract, torch.optim.Optimizer):
    """The ``torch.optim.Optimizer`` face of a fastopt optimizer class (``_fastopt``)."""

    _fastopt = None
    _step_supports_amp_scaling = True

    def __init__(self, params, defaults, backend="auto"):
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a string, got {type(backend).__name__}")
        if backend != "auto":
            get_backend(backend)  # unknown or unavailable: refuse now
        for key in ("differentiable", "capturable"):
            if defaults.get(key):
                raise NotImplementedError(
                    f"{type(self).__name__}({key}=True) is not supported by fastopt.torch; "
                    f"use torch.optim.{type(self).__name__} for {key} steps"
                )
        self._check_group(defaults, "the defaults")
        self.backend = backend
        super().__init__(params, defaults)

    # -- hyperparameters -------------------------------------------------------------------------
    @classmethod
    def _rule_hp(cls, group):
        """The rule's hyperparameters of a param group (tensor lr as a float; the class's
        pinned values; torch's ``decoupled_weight_decay`` when the group carries it)."""
        fo = cls._fastopt
        spec = RULES[fo._rule]
        hp = {}
        for h in spec.hyper_names:
            if h in fo._pinned:
                hp[h] = fo._pinned[h]
            elif h in group:
                hp[h] = hp_value(h, group[h])  # tensor lr, betas, ... as floats
        return spec.validate(hp)

    def _check_group(self, group, what):
        try:
            type(self)._rule_hp(group)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"{type(self).__name__}: {what}: {exc}") from None

    def add_param_group(self, param_group):
        merged = dict(self.defaults, **{k: v for k, v in param_group.items() if k != "params"})
        self._check_group(merged, "a param group")
        super().add_param_group(param_group)

    # -- state -----------------------------------------------------------------------------------
    def _init_state(self, p, spec, hp, slots, master=False):
        """``state[p]`` as torch creates it on a parameter's first step (torch's keys: a step
        count where torch keeps one, the state buffers ``slots``, host scalars as 0-d
        tensors); a parameter that needs none gets no entry, as in torch (SGD without
        momentum)."""
        state = self.state.get(p)
        if state:
            return state
        new = {}
        if type(self)._keeps_step:
            new["step"] = torch.tensor(0.0, dtype=torch.float32)
        # with a master copy the state is float32 too (16-bit states would undo the master)
        sdtype = torch.float32 if master else p.dtype
        for s in spec.slots:
            if s.name in slots and not s.fresh:
                new[s.name] = torch.full_like(
                    p, spec.initial(s.name, hp), dtype=sdtype, memory_format=torch.preserve_format
                )
        for name, value in spec.initial_host_state(hp).items():
            new[name] = torch.tensor(value, dtype=torch.float32)
        if master:  # the fp32 copy a 16-bit parameter is stepped through
            new["master_param"] = p.detach().to(torch.float32, copy=True)
        if new:
            self.state[p].update(new)
            return self.state[p]
        return new

    # -- the step --------------------------------------------------------------------------------
    @torch._disable_dynamo  # opaque to torch.compile: a graph break, the step run eagerly
    @torch.no_grad()
    def step(self, closure=None):
        """One fused step over every parameter with a gradient (``closure`` as in torch)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and float(found_inf) != 0:
            return loss  # GradScaler found inf/NaN: nothing changes, as torch's fused step
        grad_scale = getattr(self, "grad_scale", None)
        inv_scale = None if grad_scale is None else 1.0 / float(grad_scale)
        steady = self.__dict__.setdefault("_steady", {})
        plans = []
        for i, group in enumerate(self.param_groups):
            cached = steady.get(i)
            if cached is not None:  # the same tensors as a checked step before: re-checks only
                spec = RULES[type(self)._fastopt._rule]
                hp = type(self)._rule_hp(group)
                checked = cached.check(self, group, spec, hp, inv_scale)
                if checked is not None:
                    plans.append((cached.run, (spec, hp, *checked, inv_scale)))
                    continue
            steady.pop(i, None)
            plans.append((self._run_group, (*self._plan_group(group, inv_scale), i)))
        for run, args in plans:  # every group checked before any is stepped
            run(*args)
        return loss

    def _plan_group(self, group, inv_scale):
        """Check one group's tensors and state; returns what ``_run_group`` launches."""
        cls = type(self)
        spec = RULES[cls._fastopt._rule]
        hp = cls._rule_hp(group)
        slots = spec.state_names(hp)
        want_master = getattr(self, "master_weights", False)
        names = spec.state
        buckets = {}
        for p in group["params"]:
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(f"{cls.__name__} does not support sparse gradients")
            if p.dtype not in _KINDS:
                raise TypeError(
                    f"{cls.__name__}: a parameter is {p.dtype}; fastopt.torch steps "
                    f"{', '.join(str(d) for d in _KINDS)} parameters"
                )
            if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                raise ValueError(
                    f"{cls.__name__}: a gradient is {g.dtype}{list(g.shape)} on {g.device}, its "
                    f"parameter {p.dtype}{list(p.shape)} on {p.device}; expected them alike"
                )
            master = want_master and _KINDS[p.dtype] in ("float16", "bfloat16")
            state = self._init_state(p, spec, hp, slots, master)
            if "step" in state:
                step = int(state["step"]) + 1
            else:  # torch keeps no step count (SGD): step 1 is the one without a fresh buffer
                fresh = [x.name for x in spec.slots if x.fresh]
                step = 1 if any(state.get(n) is None for n in fresh) else 2
            bufs = self._check_state(p, state, names)
            _dtensor.check(p, g, bufs, state.get("master_param"), cls.__name__)
            # with or without a master copy (a loaded state dict may mix them): one storage
            # plan per launch, which its address table's loop trusts
            key = (p.device, p.dtype, step, "master_param" in state)
            bucket = buckets.setdefault(key, [])
            bucket.append((p, g, state, bufs))
        return spec, hp, buckets, inv_scale

    @staticmethod
    def _check_state(p, state, names):
        """Every state tensor a kernel will touch is shaped and placed like its parameter and
        typed like it (float32 beside an fp32 master copy): a state dict from elsewhere may not
        be. Returns the state tensors of ``names`` (None where absent)."""
        m = state.get("master_param")
        sdtype = p.dtype if m is None else torch.float32
        shape, device = p.shape, p.device
        bufs = [state.get(name) for name in names]
        for name, buf in zip(names, bufs):
            if buf is None:
                continue
            if buf.shape != shape or buf.dtype is not sdtype or buf.device != device:
                raise ValueError(
                    f"state {name!r} of a parameter is {buf.dtype}{list(buf.shape)} on "
                    f"{buf.device}; expected {sdtype}{list(shape)} on {device} (a state "
                    "dict of another model?)"
                )
        if m is not None and (
            m.shape != shape or m.dtype is not torch.float32 or m.device != device
        ):
            raise ValueError(
                f"state 'master_param' of a parameter is {m.dtype}{list(m.shape)} on "
                f"{m.device}; expected float32{list(shape)} on {device}"
            )
        return bufs

    @advances_host_state_as_loaded  # NAdam's mu_product loaded as float64
    def _run_group(self, spec, hp, buckets, inv_scale, index=None):
        names = spec.state
        # a group launched whole (one bucket) may cache its launch
        cache_as = index if len(buckets) == 1 else None
        for (device, dtype, t, master), items in buckets.items():
            hs = None
            if spec.host_state:
                hs = {n: float(items[0][2][n]) for n, _ in spec.host_state}
            flags, _ = spec.plan(hp, t, hs)
            used = spec.slots_used(flags)
            kind = _KINDS[dtype]
            io = io_for(
                kind,
                kind,
                "float32" if master else kind,  # beside a master copy the state is float32
                master=master,
                scale=None if inv_scale is None else "host",
            )
            tensors = []
            for p, g, state, bufs in items:
                slots = [b if u else None for b, u in zip(bufs, used)]
                for j, u in enumerate(used):
                    if u and slots[j] is None:  # a fresh slot (SGD's momentum buffer), step 1
                        slots[j] = self.state[p][names[j]] = torch.zeros_like(
                            p, dtype=torch.float32 if master else p.dtype
                        )
                # DTensors: their local shards (``_dtensor``); the state above is created
                # from ``p`` itself, a DTensor like it
                m = state.get("master_param")
                tensors.append(
                    tuple(_dtensor.local(x) for x in (p, g))
                    + ([_dtensor.local(x) for x in slots], _dtensor.local(m))
                )
            if io.plain:
                self._launch(spec, hp, t, hs, device, dtype, used, tensors, cache_as)
            else:  # 16-bit storage, a master copy or the loss scale: the storage-plan kernels
                self._launch_io(spec, hp, t, hs, device, used, tensors, io, inv_scale, cache_as)
            _set_scalars(
                [state["step"] for _, _, state, _ in items if "step" in state], 1, add=True
            )
            if spec.host_state:
                # float32 values (torch's scalar dtype), whatever dtype a loaded state dict
                # left the 0-d tensors in
                for n, v in spec.advance_host_state(hp, t, hs).items():
                    _set_scalars([state[n] for _, _, state, _ in items], v)

    def _launch(self, spec, hp, step, hs, device, dtype, used, tensors, cache_as=None):
        be = get_backend(self._backend_for(device))
        table = _address_table(tensors, len(spec.slots)) if be.NAME == "numba" else None
        if table is not None:
            # one launch over every tensor: a table of their lengths and addresses (checked
            # above: same device, dtype and shape as their parameter; contiguous, alive)
            launch = Launch(be, spec.name, step, hp, hs)
            chunks = be.chunks_for(table[:, 0].tolist())
            be.launch_many(spec.name, launch.flags, used, _DTYPES[dtype], table, chunks, launch.k)
            self._cache(cache_as, spec, step, launch.flags, used, tensors, table, chunks, dtype)
            return
        views = [
            [_plain(p), _plain(g)] + [None if a is None else _plain(a) for a in slots]
            for p, g, slots, _ in tensors
        ]
        self._launch_each(be, spec, hp, step, hs, dtype, used, views)

    def _launch_io(self, spec, hp, step, hs, device, used, tensors, io, inv_scale, cache_as=None):
        """The launch of a storage plan (``kernels.storage.IO``): 16-bit storage, an fp32
        master copy, the gradient unscaled by ``inv_scale`` in the same pass (``p.grad`` stays
        as GradScaler left it). On the CPU one launch over every tensor (cached like
        ``_launch``'s), else one per tensor."""
        be = get_backend(self._backend_for(device))
        launch = Launch(be, spec.name, step, hp, hs, inv_scale=inv_scale)
        writes = tuple(a is not None for a in tensors[0][2])
        table = (
            _address_table(tensors, len(spec.slots), master=io.master)
            if be.NAME == "numba"
            else None
        )
        if table is not None:  # one launch over every tensor, as _launch
            chunks = be.chunks_for(table[:, 0].tolist())
            be.launch_many_io(
                spec.name,
                launch.flags,
                writes,
                io,
                table,
                chunks,
                launch.k,
                inv_scale=1.0 if inv_scale is None else inv_scale,
                key=launch.key,
            )
            self._cache(cache_as, spec, step, launch.flags, used, tensors, table, chunks, None, io)
            return
        with _torch_stream(device):
            for p, g, slots, master in tensors:
                row = [p, g, *slots, master]
                arrays = [a if a is None or a.is_contiguous() else a.contiguous() for a in row]
                flat = [None if a is None else as_xp_array(_plain(a).view(-1)) for a in arrays]
                run = launch.runner(flat[0].dtype, writes, io)
                run(flat[0], flat[1], tuple(flat[2:-1]), flat[-1], 0)
                for orig, a in zip(row, arrays):
                    if orig is not None and a is not orig:
                        orig.copy_(a)

    def _cache(self, index, spec, step, flags, used, tensors, table, chunks, dtype, io=None):
        """Keep the launch just made over ``table`` for param group ``index``'s next step
        (``Steady``), when the group was launched whole (``index`` not None) and can be."""
        if index is None:
            return
        np_dtype = None if dtype is None else _DTYPES[dtype]
        group = self.param_groups[index]
        cached = Steady.build(
            self, group, spec, step, flags, used, tensors, table, chunks, np_dtype, io
        )
        if cached is not None:
            self.__dict__.setdefault("_steady", {})[index] = cached

    def _launch_each(self, be, spec, hp, step, hs, dtype, used, views):
        """One launch per tensor (GPU backends; non-contiguous tensors through contiguous
        copies written back). CUDA tensors are stepped on torch's current stream of their
        device, so the step is ordered after the backward that wrote the gradients."""
        launch = Launch(be, spec.name, step, hp, hs)
        writes = tuple(a is not None for a in views[0][2:])
        run = launch.runner(_DTYPES[dtype], writes)
        device = views[0][0].device
        with _torch_stream(device):
            for row in views:
                arrays = [a if a is None or a.is_contiguous() else a.contiguous() for a in row]
                flat = [None if a is None else _array(a.view(-1)) for a in arrays]
                run(flat[0], flat[1], tuple(flat[2:]))
                for orig, a in zip(row, arrays):
                    if orig is not None and a is not orig:
                        orig.copy_(a)

    def _backend_for(self, device):
        if self.backend != "auto":
            return self.backend
        return "cupy" if device.type == "cuda" else "numba"


def _torch_stream(device):
    """CuPy's current stream set to torch's current stream on ``device`` (CUDA tensors), so a
    CuPy launch is ordered with torch's work; a no-op on the CPU."""
    import contextlib

    if device.type != "cuda":
        return contextlib.nullcontext()
    from ..backends.cupy_backend import _stream_for

    stream = _stream_for(torch.cuda.current_stream(device).cuda_stream)
    return stream if stream is not None else contextlib.nullcontext()


def _address_table(tensors, nslots, master=False):
    """int64 rows ``(n, param, grad, slot...)`` of the tensors' lengths and addresses (0 for an
    absent slot), with ``master`` the fp32 master copy's last, or None when one of them is not
    contiguous (the per-tensor path takes it)."""
    rows = []
    for p, g, slots, m in tensors:
        if not (p.is_contiguous() and g.is_contiguous()):
            return None
        row = [p.numel(), p.data_ptr(), g.data_ptr()]
        for a in (*slots, m) if master else slots:
            if a is None:
                row.append(0)
            elif a.is_contiguous():
                row.append(a.data_ptr())
            else:
                return None
        rows.append(row)
    return np.array(rows, dtype=np.int64).reshape(len(tensors), 3 + nslots + master)


def float32_scalars(tensors):
    """Are ``tensors`` all float32 CPU scalars (torch's format of step counts and host state,
    and what a state dict loads as), which Numba may write through their addresses?"""
    return all(
        t is not None
        and t.dtype is torch.float32
        and t.is_cpu
        and t.numel() == 1
        and not t.requires_grad
        for t in tensors
    )


def _set_scalars(tensors, value, add=False):
    """``t += value`` (``add``) or ``t.fill_(value)`` for each of torch's 0-d tensors (step
    counts, host state): float32 CPU ones through their addresses in one Numba call, others one
    by one."""
    if len(tensors) > 1 and float32_scalars(tensors):
        from ..backends.numba_backend import add_at, fill_at

        addresses = np.array([t.data_ptr() for t in tensors], dtype=np.int64)
        (add_at if add else fill_at)(addresses, value)
        return
    for t in tensors:
        if add:
            t += value
        else:
            t.fill_(value)


def _plain(t):
    return t.detach() if t.requires_grad else t


def _array(t):
    """A NumPy (CPU) or CuPy (CUDA) view of a contiguous tensor, no copy."""
    if t.device.type == "cpu":
        return t.numpy()
    import cupy

    return cupy.from_dlpack(t)


def _make(cls):
    """The torch.optim face of the fastopt class ``cls``: torch's signature, its defaults."""
    sig = inspect.signature(cls.__init__)
    # the core's own keywords (backend, non-finite policy, mixed precision) are not torch's
    skip = ("self", "backend", "nonfinite", *PRECISION_DEFAULTS)
    own = [p for name, p in sig.parameters.items() if name not in skip]
    torch_defaults = _torch_defaults(cls)
    extra = [
        inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
        for k, v in torch_defaults.items()
        if k in _TORCH_IMPL and k not in {p.name for p in own}
    ]
    params = (
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + [inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        + own
        + extra
        + [
            inspect.Parameter("master_weights", inspect.Parameter.KEYWORD_ONLY, default=False),
            inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default="auto"),
        ]
    )
    new_sig = inspect.Signature(params)

    def __init__(self, *args, **kwargs):
        bound = new_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        a.pop("self")
        params_, backend = a.pop("params"), a.pop("backend")
        # not a param-group key: the groups stay torch's, so state dicts load both ways
        self.master_weights = bool(a.pop("master_weights"))
        defaults = {**torch_defaults, **dict(cls._pinned), **a}
        FusedOptimizer.__init__(self, params_, defaults, backend)

    __init__.__signature__ = new_sig
    doc = (cls.__doc__ or "").split("\n\n")
    return type(
        cls.__name__,
        (FusedOptimizer,),
        {
            "__init__": __init__,
            "__doc__": f"{doc[0]}\n\nfastopt's fused kernels behind torch.optim's interface "
            f"(see fastopt.torch).\n\n" + "\n\n".join(doc[1:]),
            "__module__": __name__,
            "_fastopt": cls,
            "_keeps_step": not any(s.fresh for s in RULES[cls._rule].slots),
        },
    )


globals().update({name: _make(cls) for name, cls in _optimizers.CLASSES.items()})
Adagrad = globals()["AdaGrad"]
RMSprop = globals()["RMSProp"]

from .offload import CPUOffload  # noqa: E402  (it subclasses the classes above)
