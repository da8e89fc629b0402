"""How a step's inputs are checked and launched: ``Stepper``, the machinery behind
``Optimizer.update`` and ``Optimizer.step``.

The first step over a set of arrays validates everything (``fastopt._validate``, the checks
``fastopt.functional`` makes too) and records what it established in a cache; later steps
re-check, per array, only what can change without the optimizer seeing it (the identity of each
array, its shape and dtype, its flags, the state buffers the user may have rebound, and the
address and size of the memory that owns each array: ``_arrays.Pins``, since a cached flat
view of an array resized in place would point at freed memory; and the memory behind each grad
that is a view) and fall back to the full validation when anything differs: O(1) host work per
array.

Then one ``functional.StepPlan`` per step plans the whole step before anything is written: the
variant, the host scalars, the host state after the step and the next step count (any of them
can fail: an overflow, a step count too large for a float); then every runner is prepared, the
rule runs over every parameter (dict API) or every dtype group (``FlatBuffer``), and only then
are the step count and the host state committed (``_commit``).

A ``Stepper`` is its own object, owned by the optimizer (``Optimizer._stepper``). It talks to
the optimizer through an explicit interface: the optimizer's public settings (``StepOwner``:
backend, nonfinite policy, step count, capturable, seed), passed to every call, and the
functions the optimizer class hands it (``StepHooks``); and to the state only through
``OptimizerState``'s methods. It reads no private attribute of either.
"""

from __future__ import annotations

import bisect
import functools
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from . import _capture, backends, precision
from ._arrays import (
    Pins,
    array_module,
    as_xp_array,
    as_xp_dicts,
    backing_error,
    on_device,
    to_numpy,
)
from ._validate import (
    SUPPORTED_DTYPES,
    NonFiniteGradientError,
    _extent,
    all_finite,
    check_array,
    check_names,
    check_no_overlap,
    check_param_arrays,
    check_reach,
    check_state_arrays,
    check_str_names,
    describe,
    dtype_name,
    dtype_of,
    is_array,
)
from .flat import FlatBuffer
from .functional import StepPlan, device_flag, found, loss_scale
from .kernels import RULES

if TYPE_CHECKING:
    from ._state import OptimizerState, StateKinds

__all__ = ["StepHooks", "StepOwner", "Stepper"]


def _root(a: np.ndarray) -> np.ndarray | None:
    """The NumPy array that owns ``a``'s memory, or None when the memory belongs to something
    else (a buffer, a memory map, a DLPack producer): two host arrays can share memory only if
    they have the same owner, or a foreign one."""
    b = a.base
    while b is not None:
        if type(b) is not np.ndarray:
            return None
        a, b = b, b.base
    return a


def _flat_slot(st: Mapping[str, Any], s: str, kinds: StateKinds) -> Any:
    """A step's argument for slot ``s`` of a parameter's state ``st``: its flat view, a
    quantized slot's ``(flat codes, absmax)``, or None when the parameter keeps no such slot."""
    if kinds.quant_map(s) is not None:
        from ._quantized import names_of

        codes, absmax = names_of(s)
        return (st[codes].reshape(-1), st[absmax]) if codes in st else None
    return st[s].reshape(-1) if s in st else None


def _check_master(kinds: StateKinds, pk: str, who: str) -> None:
    """A master the params of ``pk`` can keep (``master_weights="remainder"`` refuses float16
    params), named by ``who``; before anything is written."""
    try:
        kinds.master_name(pk)
    except ValueError as exc:
        raise ValueError(f"{who}: {exc}") from None


def _check_quant_backend(be: ModuleType, kinds: StateKinds) -> None:
    if kinds.quant is not None:
        from ._quantized import check_backend

        check_backend(be, kinds.quant)


def _check_quant_state(
    name: str, p: Any, st: Mapping[str, Any], kinds: StateKinds, pk: str
) -> list[tuple[str, Any, bool]]:
    """The state buffers of a parameter of a quantized optimizer: each shaped and typed as
    ``StateKinds.buffers_for`` says, C-contiguous and writeable; their overlap entries."""
    from ._validate import check_writable

    entries = []
    for s, (shape, dt) in kinds.buffers_for(pk, tuple(p.shape)).items():
        a = st[s]
        if not is_array(a) or tuple(a.shape) != shape or dtype_of(a) != dt:
            raise ValueError(
                f"state {s!r} of parameter {name!r} is {describe(a)}; expected "
                f"{dtype_name(dt)}{list(shape)}"
            )
        check_writable(name, f"state {s!r}", a)
        entries.append((f"state {s!r} of parameter {name!r}", a, True))
    return entries


class _Entry:
    """One parameter of the dict API as the last full validation saw it."""

    __slots__ = (
        "dtype",
        "gdtype",
        "io",
        "ios",
        "mflat",
        "name",
        "nst",
        "p",
        "pflat",
        "pins",
        "ptr",
        "salt",
        "sarrs",
        "sflat",
        "shape",
        "src",
        "st",
        "tbytes",
        "tdtype",
    )

    dtype: Any
    gdtype: Any
    io: Any
    ios: Any
    mflat: Any
    name: Any
    nst: Any
    p: Any
    pflat: Any
    pins: Any
    ptr: Any
    salt: Any
    sarrs: Any
    sflat: Any
    shape: Any
    src: Any
    st: Any
    tbytes: Any
    tdtype: Any

    def io_for(self, ls: _Loss, kbuf: bool = False) -> precision.IO | None:
        """This parameter's storage format with the loss-scale extras of a step (None: plain,
        every array in the compute dtype and nothing extra); ``kbuf``: a capturable step (the
        scalars in device memory)."""
        key = (ls.scale, ls.write_grad, ls.found_dev is not None, kbuf)
        try:
            return self.ios[key]
        except KeyError:
            io = replace(
                self.io, scale=ls.scale, write_grad=ls.write_grad, found_inf=key[2], kbuf=kbuf
            )
            io = self.ios[key] = None if io.plain else io
            return io


class _Loss:
    """The loss-scale keywords of one ``update``/``step`` call, checked."""

    __slots__ = ("found_dev", "inv_scale", "scale", "scale_dev", "skip", "write_grad")

    found_dev: Any
    inv_scale: Any
    scale: Any
    scale_dev: Any
    skip: Any
    write_grad: Any

    def __init__(
        self,
        scale: str | None,
        inv_scale: float | None,
        scale_dev: Any,
        skip: bool,
        found_dev: Any,
        write_grad: bool,
    ) -> None:
        self.scale, self.inv_scale, self.scale_dev = scale, inv_scale, scale_dev
        self.skip, self.found_dev, self.write_grad = skip, found_dev, write_grad


#: one parameter of a dict step: its cache entry and its flat grad
_Todo = tuple["_Entry", Any]

#: no loss scaling: what a call without the keywords carries
NO_LOSS = _Loss(None, None, None, False, None, False)


class _DictCache:
    """What a full validation of ``update()`` established, to re-check cheaply next step."""

    __slots__ = (
        "be",
        "entries",
        "fast",
        "los",
        "n",
        "pins",
        "roots",
        "spans",
        "state",
        "writes",
    )

    be: Any
    entries: Any
    fast: Any
    los: Any
    n: Any
    pins: Any
    roots: Any
    spans: Any
    state: Any
    writes: Any

    def __init__(
        self,
        entries: list[_Entry],
        state: Mapping[str, Any],
        be: ModuleType,
        writes: tuple[bool, ...],
    ) -> None:
        self.entries, self.n, self.state, self.be = entries, len(entries), state, be
        self.writes = writes
        written = []
        for e in entries:
            written.append(e.p)
            written += [a for _, a in e.sarrs]
        # the cheap re-checks read NumPy flags: host arrays (NumPy, or NumPy views of host
        # tensors); device arrays are validated in full at every step
        self.fast = all(type(a) is np.ndarray for a in written)
        if not self.fast:
            return
        self.pins = Pins([a for e in entries for a in e.pins])
        roots = [_root(a) for a in written]
        # memory NumPy owns can be shared only through views of its owner, so a grad whose
        # owner is no parameter's or state's owner needs no byte-range check; with any other
        # owner (a memory map, a DLPack producer) every grad's byte range is checked
        self.roots = None if any(r is None for r in roots) else {id(r) for r in roots}
        spans = sorted((ext[0], ext[1], a) for a in written if (ext := _extent(a)) is not None)
        self.los = [s[0] for s in spans]
        self.spans = spans

    def overlaps(self, g: np.ndarray) -> bool:
        """Does grad ``g`` share memory with a parameter or state buffer (exact)?"""
        ext = _extent(g)
        if ext is None:
            return False
        lo, hi = ext
        spans = self.spans
        for i in range(max(bisect.bisect_right(self.los, lo) - 1, 0), len(spans)):
            slo, shi, a = spans[i]
            if slo >= hi:
                break
            if shi > lo and np.shares_memory(g, a):
                return True
        return False


class _FlatCache:
    """What a full validation of ``step(buf)`` established, to re-check cheaply next step."""

    __slots__ = (
        "be",
        "buf",
        "datas",
        "dtypes",
        "entries",
        "fast",
        "gdtypes",
        "grads",
        "groups",
        "host",
        "masters",
        "n",
        "pins",
        "shapes",
        "states",
        "writes",
    )

    be: Any
    buf: Any
    datas: Any
    dtypes: Any
    entries: Any
    fast: Any
    gdtypes: Any
    grads: Any
    groups: Any
    host: Any
    masters: Any
    n: Any
    pins: Any
    shapes: Any
    states: Any
    writes: Any


class StepOwner(Protocol):
    """What a ``Stepper`` reads of the optimizer it steps: the optimizer's public settings,
    read at every step (they may change between steps). ``base.Optimizer`` is one."""

    backend: str
    nonfinite: str | None
    step_count: int

    @property
    def capturable(self) -> bool: ...
    @property
    def seed(self) -> int: ...


@dataclass(frozen=True)
class StepHooks:
    """What a ``Stepper`` asks of the optimizer it steps beyond its public settings: functions
    the optimizer class hands it (``base.Optimizer``'s, once for every instance), each called
    with the optimizer as its first argument. The stepper reads nothing else of the optimizer."""

    #: this step's hyperparameters: a snapshot, validated when any was set since the last
    #: validation (a refused value raises before anything changes)
    hyperparams: Callable[[Any], dict[str, Any]]
    #: ``(owner, hp)``: the rule's hyperparameters (``hp`` and the ones the class pins)
    rule_hp: Callable[[Any, Mapping[str, Any]], dict[str, Any]]
    #: which state buffers a parameter keeps, in which dtype (``StateKinds``)
    kinds: Callable[[Any], StateKinds]
    #: ``(owner, slot)``: a state slot's initial value
    state_fill: Callable[[Any, str], float]
    #: the rule's initial host state
    initial_host: Callable[[Any], dict[str, Any]]
    #: ``(owner, be, rule_hp, like)``: the device scalars of a capturable step on a GPU (created
    #: at the first one) and the steps issued so far (the host's count; the device holds the
    #: steps taken)
    device: Callable[[Any, ModuleType, dict[str, Any], Any], tuple[_capture.DeviceScalars, int]]
    #: ``(owner, step, on_device)``: an applied step's count, committed after its launches
    commit_count: Callable[[Any, int, bool], None]


class Stepper:
    """``update``/``step``'s checks and launches for one optimizer (see the module docstring):
    owned by the optimizer (``Optimizer._stepper``), it keeps what the last full validation
    established (``dict_cache``, ``flat_cache``) and changes the state only through
    ``OptimizerState``'s methods (``state``)."""

    __slots__ = ("dict_cache", "flat_cache", "hooks", "rule", "state")

    def __init__(self, rule: str, state: OptimizerState, hooks: StepHooks) -> None:
        self.rule = rule
        self.state = state
        self.hooks = hooks
        #: what the last full validation of ``update()`` / ``step()`` established
        self.dict_cache: _DictCache | None = None
        self.flat_cache: _FlatCache | None = None

    def forget(self) -> None:
        """Drop what the last full validations established (the next step validates in full)."""
        self.dict_cache = self.flat_cache = None

    def update(
        self,
        owner: StepOwner,
        params: Any,
        grads: Any,
        grad_scale: Any = None,
        found_inf: Any = None,
        unscale_grads: Any = False,
    ) -> bool:
        """``Optimizer.update``: the cheap re-checks when the last full validation still holds,
        else the full path."""
        ls = self._loss_scale(owner, grad_scale, found_inf, unscale_grads)
        c = self.dict_cache
        if c is not None and c.fast and not ls.write_grad:
            todo = self._recheck_dict(c, params, grads)
            if todo is not None:
                return self._apply_dict(owner, todo, ls=ls)
        return self._update_full(owner, params, grads, ls)

    def step(
        self,
        owner: StepOwner,
        buf: Any,
        grad_scale: Any = None,
        found_inf: Any = None,
        unscale_grads: Any = False,
    ) -> bool:
        """``Optimizer.step``: the cheap re-checks when the last full validation still holds,
        else the full path."""
        ls = self._loss_scale(owner, grad_scale, found_inf, unscale_grads)
        c = self.flat_cache
        if (
            c is not None
            and c.fast
            and buf is c.buf
            and not ls.write_grad
            and self._recheck_flat(c)
        ):
            with on_device(None if c.host else c.datas[0]):
                return self._apply_flat(owner, buf, c, ls)
        if not isinstance(buf, FlatBuffer):
            raise TypeError(
                f"step() expects a fastopt.FlatBuffer, got {type(buf).__name__}; "
                "use update(params, grads) for dicts of arrays"
            )
        groups = buf.groups
        with on_device(groups[0].data if groups else None):
            be = self._validate_flat(owner, buf, ls.write_grad)
            if not self._finite_flat(owner, buf):
                return False
            if not self.state.bound:
                self._check_plan(owner, be, self.hooks.hyperparams(owner))  # refused: no state
                self.state.bind_flat(
                    buf,
                    self.hooks.kinds(owner),
                    functools.partial(self.hooks.state_fill, owner),
                    functools.partial(self.hooks.initial_host, owner),
                )
            c = self.flat_cache = self._build_flat_cache(owner, buf, be)
            return self._apply_flat(owner, buf, c, ls)

    def _recheck_dict(self, c: _DictCache, params: Any, grads: Any) -> list[_Todo] | None:
        """The launches of a step whose inputs differ from the last fully validated step (the
        cache ``c``) only in what cannot break it — or None, and the full validation decides."""
        if (
            self.state.arrays is not c.state
            or not isinstance(params, Mapping)
            or not isinstance(grads, Mapping)
            or len(params) != c.n
            or len(grads) != c.n
        ):
            return None
        # the memory behind the cached flat views: still where it was, as large (an array
        # resized in place with refcheck=False moves; its old views point at freed memory)
        if not c.pins.unmoved():
            return None
        state, roots = c.state, c.roots
        todo = []
        for e in c.entries:
            name = e.name
            p = params.get(name)
            if p is not e.src:
                return None
            if p is not e.p:  # a host tensor or an ndarray subclass, stepped through e.p
                if e.ptr is not None:  # a tensor: still the same memory, shape and dtype?
                    if (
                        p.data_ptr() != e.ptr
                        or p.shape != e.shape
                        or p.dtype is not e.tdtype
                        or not p.is_contiguous()
                        or p.untyped_storage().nbytes() != e.tbytes
                    ):
                        return None
                elif p.shape != e.shape or not p.flags.carray:  # a subclass: its own flags
                    return None
                p = e.p
            if p.shape != e.shape or p.dtype is not e.dtype or not p.flags.carray:
                return None
            st = state.get(name)
            if st is not e.st or len(st) != e.nst:
                return None
            for s, a in e.sarrs:
                if st.get(s) is not a or not a.flags.carray:
                    return None
            g = grads.get(name)
            if type(g) is not np.ndarray:
                g = as_xp_array(g, f"grad of parameter {name!r}")  # checks its memory
                if type(g) is not np.ndarray:
                    return None
            elif g.base is not None and backing_error(g) is not None:
                return None  # a view of freed memory: the full validation says so
            if g.shape != e.shape or (g.dtype is not e.gdtype and g.dtype != e.gdtype):
                return None
            if roots is None:
                if c.overlaps(g):
                    return None
            else:
                r = _root(g)
                if (r is None or id(r) in roots) and c.overlaps(g):
                    return None
            if not g.flags.c_contiguous:
                g = np.ascontiguousarray(g)
            todo.append((e, g if g.ndim == 1 else g.reshape(-1)))
        return todo

    def _loss_scale(
        self, owner: StepOwner, grad_scale: Any, found_inf: Any, unscale_grads: Any
    ) -> _Loss:
        """The loss-scale keywords of a call, checked before anything runs. A device
        ``found_inf`` of a capturable optimizer is read in the kernels (no synchronisation);
        otherwise it is read here."""
        if grad_scale is None and found_inf is None and unscale_grads is False:
            return NO_LOSS
        if not isinstance(unscale_grads, (bool, np.bool_)):
            raise TypeError(f"invalid unscale_grads={unscale_grads!r}; expected True or False")
        scale, inv_scale, scale_dev = loss_scale(grad_scale)
        if unscale_grads and scale is None:
            raise ValueError("unscale_grads=True needs a grad_scale (there is nothing to unscale)")
        found_dev = device_flag(found_inf) if owner.capturable else None
        skip = False if found_dev is not None else found(found_inf)
        return _Loss(scale, inv_scale, scale_dev, skip, found_dev, bool(unscale_grads))

    def _device_flag_set(self, be: ModuleType, ls: _Loss) -> bool:
        """A device found-inf flag that no kernel will read (the backend keeps no scalars on
        the device): read here, on the host."""
        return ls.found_dev is not None and not _capture.supports(be) and found(ls.found_dev)

    def _plan(
        self, owner: StepOwner, be: ModuleType, hp: dict[str, Any], ls: _Loss, like: Any
    ) -> tuple[StepPlan, bool]:
        """The ``StepPlan`` of this step, and whether its scalars live on the device (a
        capturable step on a GPU backend: the scalar kernel has been launched). The whole
        plan is computed here, before anything is written: the variant, the host scalars and
        the host state after the step (``StepPlan``; a value that cannot be computed is a
        ``ValueError``); the step count and host state are committed by ``_commit`` once the
        launches have run."""
        if ls.scale_dev is not None and getattr(be, "DEVICE", "cpu") == "cpu":
            raise TypeError(
                f"grad_scale is a device array but backend {be.NAME!r} runs on the CPU; pass a "
                "number or a host array"
            )
        rhp = self.hooks.rule_hp(owner, hp)
        if owner.capturable and _capture.supports(be):
            ds, issued = self.hooks.device(owner, be, rhp, like)
            plan = StepPlan(
                be,
                self.rule,
                issued + 1,  # the steps issued (the device holds the steps taken)
                rhp,
                self.state.host,  # the variant only: the device holds and advances the host state
                inv_scale=ls.inv_scale,
                scale=ls.scale_dev,
                seed=owner.seed,
                device=ds,
                found_inf=ls.found_dev,
            )
            ds.upload(rhp)
            ds.advance(like, ls.found_dev)
            return plan, True
        plan = StepPlan(
            be,
            self.rule,
            owner.step_count + 1,
            rhp,
            self.state.host,
            inv_scale=ls.inv_scale,
            scale=ls.scale_dev,
            seed=owner.seed,
        )
        return plan, False

    def _apply_dict(
        self,
        owner: StepOwner,
        todo: list[_Todo],
        hp: dict[str, Any] | None = None,
        ls: _Loss = NO_LOSS,
    ) -> bool:
        if hp is None:
            hp = self.hooks.hyperparams(owner)
        if owner.nonfinite is not None:
            for e, g in todo:
                if not all_finite(g):
                    return self._nonfinite_found(owner, e.name, g)
        c = self.dict_cache
        assert c is not None, "a dict step launches after its cache is built"
        if ls.skip or self._device_flag_set(c.be, ls):
            return False
        plan, kbuf = self._plan(owner, c.be, hp, ls, todo[0][0].pflat)
        writes = c.writes
        runs = [plan.runner(e.dtype, writes, e.io_for(ls, kbuf)) for e, _ in todo]
        for run, (e, g) in zip(runs, todo):
            run(e.pflat, g, e.sflat, e.mflat, e.salt)
        self._commit(owner, plan, kbuf)
        return True

    def _check_plan(self, owner: StepOwner, be: ModuleType, hp: dict[str, Any]) -> None:
        """Plan the next step (``Rule.variant_and_scalars`` and the host state after it) with the
        host state a first step would create, and raise its ``ValueError`` now: before the state is
        created
        and bound, so that a first step that cannot be planned leaves the optimizer as it was.
        (Later steps plan in ``_plan``, before their first write.)"""
        if owner.capturable and _capture.supports(be):
            return  # the device computes the scalars
        spec, rhp = RULES[self.rule], self.hooks.rule_hp(owner, hp)
        hs = self.state.host_now()
        if hs is None:
            hs = spec.initial_host_state(rhp)
        step = owner.step_count + 1
        spec.variant_and_scalars(rhp, step, hs)
        spec.advance_host_state(rhp, step, hs)

    def _commit(self, owner: StepOwner, plan: StepPlan, on_device: bool) -> None:
        """After an applied step's launches: the step count and the host state (both computed
        by the ``StepPlan``, before anything was written; a capturable step advances the host
        state on the device)."""
        self.hooks.commit_count(owner, plan.step, on_device)  # on the device: the steps issued
        if not on_device:
            self.state.advance_host(plan.hs_after)

    def _update_full(self, owner: StepOwner, params: Any, grads: Any, ls: _Loss = NO_LOSS) -> bool:
        if not isinstance(params, Mapping) or not isinstance(grads, Mapping):
            raise TypeError(
                "update() expects two dicts name -> array (params, grads), got "
                f"{type(params).__name__} and {type(grads).__name__}"
            )
        check_str_names(params, "parameter names")
        if not params:
            raise ValueError(
                "update() got no parameters: params is an empty dict (as "
                "torch.optim refuses an empty parameter list)"
            )
        sources = params
        params, grads = as_xp_dicts(params, grads)
        with on_device(next(iter(params.values()))):
            if ls.write_grad:  # the grads are written too: checked like the params
                be, pairs, hp = self._validate_dict(owner, params, grads, True)
            else:
                be, pairs, hp = self._validate_dict(owner, params, grads)
            if not self._finite(owner, ((n, g) for n, _, g in pairs)):
                return False
            if not self.state.bound:
                self._check_plan(owner, be, hp)  # a step that cannot be planned creates no state
                self.state.bind_dict(
                    ("dict", tuple((n, tuple(p.shape), str(dtype_of(p))) for n, p, _ in pairs)),
                    {n: p for n, p, _ in pairs},
                    self.hooks.kinds(owner),
                    functools.partial(self.hooks.state_fill, owner),
                    functools.partial(self.hooks.initial_host, owner),
                )
            c = self.dict_cache = self._build_dict_cache(owner, pairs, sources, be)
            todo = []
            for e, (_, _, g) in zip(c.entries, pairs):
                g = array_module(g).ascontiguousarray(g)
                todo.append((e, g.reshape(-1)))
            return self._apply_dict(owner, todo, hp, ls)

    def _build_dict_cache(
        self,
        owner: StepOwner,
        pairs: list[tuple[str, Any, Any]],
        sources: Mapping[str, Any],
        be: ModuleType,
    ) -> _DictCache:
        kinds = self.hooks.kinds(owner)
        names, slots = kinds.slots, RULES[self.rule].state
        entries = []
        for name, p, g in pairs:
            e = _Entry()
            st = self.state.arrays[name]
            e.name, e.p, e.shape, e.dtype, e.src = name, p, p.shape, p.dtype, sources[name]
            e.gdtype = g.dtype
            e.ptr = e.tdtype = None
            if e.src is not p and hasattr(e.src, "data_ptr") and type(p) is np.ndarray:
                e.ptr, e.tdtype = e.src.data_ptr(), e.src.dtype  # a torch tensor's NumPy view
            e.pflat, e.st, e.nst = p.reshape(-1), st, len(st)
            pk = precision.known_kind(p.dtype)
            e.sarrs = tuple((s, st[s]) for s in kinds.names_for(pk))
            e.tbytes = None
            if e.ptr is not None:  # the tensor's storage stands for the param's memory
                e.tbytes = e.src.untyped_storage().nbytes()
            # what the cached views are made of (a tensor param's memory: its storage, above)
            e.pins = ([] if e.ptr is not None else [p]) + [a for _, a in e.sarrs]
            e.sflat = tuple(_flat_slot(st, s, kinds) for s in slots)
            master = kinds.master_name(pk)
            m = None if master is None else st.get(master)
            e.mflat = None if m is None else m.reshape(-1)
            e.io = kinds.io_base(pk, precision.known_kind(g.dtype))
            e.ios, e.salt = {}, precision.param_salt(name)
            entries.append(e)
        return _DictCache(entries, self.state.arrays, be, tuple(s in names for s in slots))

    def _backend_for(
        self, owner: StepOwner, arrays: list[tuple[str, Any]], what: str
    ) -> ModuleType:
        """The backend module that will run, after checking it can reach ``arrays``."""
        be = backends.resolve(owner.backend, arrays[0][1] if arrays else None)
        check_reach(be, arrays, what)
        return be

    def _validate_dict(
        self,
        owner: StepOwner,
        params: Mapping[str, Any],
        grads: Mapping[str, Any],
        write_grad: bool = False,
    ) -> tuple[ModuleType, list[tuple[str, Any, Any]], dict[str, Any]]:
        kinds = self.hooks.kinds(owner)
        check_names(grads, params, "the names of grads", "the names of params")
        bound = self.state.layout is not None
        if bound:
            assert self.state.layout is not None
            if self.state.layout[0] != "dict":
                raise ValueError("this optimizer steps a FlatBuffer; call step(buf), not update()")
            check_names(
                params,
                self.state.arrays,
                "parameter names",
                "those of the first step (create a new optimizer for other parameters)",
            )
        elif self.state.pending is not None:
            check_names(params, self.state.pending, "parameter names", "those of the loaded state")
        hp = self.hooks.hyperparams(owner)  # schedules may have changed them since the last step
        arrays = []
        for name, p in params.items():
            for role, a in (("param", p), ("grad", grads[name])):
                if not is_array(a):
                    raise TypeError(
                        f"{role} of parameter {name!r} is a {type(a).__name__}; "
                        "expected a NumPy array or a device array"
                    )
                arrays.append((f"{role} of parameter {name!r}", a))
        be = self._backend_for(owner, arrays, "params and grads")
        _check_quant_backend(be, kinds)
        supported = tuple(getattr(be, "DTYPES", SUPPORTED_DTYPES))
        kind = type(owner).__name__
        pairs, entries = [], []
        for name, p in params.items():
            g = grads[name]
            pd, ents = check_param_arrays(name, p, g, (), supported, grad_written=write_grad)
            pk = precision.known_kind(pd)
            _check_master(kinds, pk, f"parameter {name!r} ({describe(p)})")
            self.state.check_against(name, tuple(p.shape), pd, kinds, type(owner).__name__)
            sk = kinds.state_kind(pk)  # refuses a state dtype this param cannot keep
            if bound:
                st = self.state.arrays[name]
                if not isinstance(st, Mapping):
                    raise ValueError(
                        f"opt.state[{name!r}] is a {type(st).__name__}; expected "
                        "a dict state name -> array"
                    )
                want = kinds.names_for(pk)
                check_names(st, want, f"state buffers of parameter {name!r}", f"those {kind} keeps")
                if kinds.quant is None:
                    ents += check_state_arrays(
                        name, p, [(s, st[s]) for s in want], state_dtype=precision.storage_dtype(sk)
                    )
                else:
                    ents += _check_quant_state(name, p, st, kinds, pk)
            pairs.append((name, p, g))
            entries += ents
        check_no_overlap(entries)
        return be, pairs, hp

    def _recheck_flat(self, c: _FlatCache) -> bool:
        """Are the FlatBuffer's groups the arrays the last full validation saw, with the same
        lengths and flags?"""
        groups = c.buf.groups
        if len(groups) != c.n:
            return False
        if c.pins is not None and not c.pins.unmoved():  # the memory behind every host array
            return False  # (see _recheck_dict)
        for i, g in enumerate(groups):
            d, gr = g.data, g.grad
            if (
                g is not c.groups[i]
                or d is not c.datas[i]
                or gr is not c.grads[i]
                or d.shape != c.shapes[i]
                or gr.shape != c.shapes[i]
                or d.dtype is not c.dtypes[i]
                or gr.dtype is not c.gdtypes[i]
            ):
                return False
            if c.host:
                if (
                    not d.flags.carray
                    or not gr.flags.c_contiguous
                    or not all(
                        (s[0].flags.carray and s[1].flags.carray)
                        if isinstance(s, tuple)
                        else s.flags.carray
                        for s in c.states[i]
                        if s is not None
                    )
                ):
                    return False
            elif not d.flags.c_contiguous or not gr.flags.c_contiguous:
                return False
        return True

    def _apply_flat(
        self, owner: StepOwner, buf: FlatBuffer, c: _FlatCache, ls: _Loss = NO_LOSS
    ) -> bool:
        hp = self.hooks.hyperparams(owner)
        if not self._finite_flat(owner, buf):
            return False
        if ls.skip or self._device_flag_set(c.be, ls):
            return False
        plan, kbuf = self._plan(owner, c.be, hp, ls, c.datas[0])
        runs = [
            plan.runner(d.dtype, c.writes, e.io_for(ls, kbuf)) for d, e in zip(c.datas, c.entries)
        ]
        for run, d, gr, states, m, e in zip(runs, c.datas, c.grads, c.states, c.masters, c.entries):
            run(d, gr, states, m, e.salt)
        self._commit(owner, plan, kbuf)
        return True

    def _build_flat_cache(self, owner: StepOwner, buf: FlatBuffer, be: ModuleType) -> _FlatCache:
        c = _FlatCache()
        kinds = self.hooks.kinds(owner)
        names, slots = kinds.slots, RULES[self.rule].state
        c.buf, c.n, c.groups = buf, len(buf.groups), tuple(buf.groups)
        c.datas = tuple(g.data for g in buf.groups)
        c.grads = tuple(g.grad for g in buf.groups)
        c.shapes = tuple(d.shape for d in c.datas)
        c.dtypes = tuple(d.dtype for d in c.datas)
        c.gdtypes = tuple(g.dtype for g in c.grads)
        assert self.state.flat is not None, "the flat state is bound before its cache is built"
        c.states = tuple(tuple(f.get(s, None) for s in slots) for f in self.state.flat)
        if kinds.quant is not None:  # quantized slots: (codes, absmax, block table)
            from ._quantized import names_of
            from .backends.numba_quant import blocks_of_segments
            from .kernels import quant

            qs = []
            for f, group in zip(self.state.flat, buf.groups):
                segs = [(o, n) for o, n, _ in group.slots.values()]
                # packed codes start at a byte: every offset even (FlatBuffer's alignment)
                assert kinds.quant not in quant.PACKED or all(o % 2 == 0 for o, _ in segs)
                blocks = blocks_of_segments(segs, quant.BLOCKS[kinds.quant])
                qs.append(
                    tuple(
                        (f[names_of(s)[0]], f[names_of(s)[1]], blocks)
                        if names_of(s)[0] in f
                        else f.get(s, None)
                        for s in slots
                    )
                )
            c.states = tuple(qs)
        c.masters = tuple(
            f.get(precision.MASTER, f.get(precision.MASTER_REMAINDER)) for f in self.state.flat
        )
        c.entries = []
        for i, (d, g) in enumerate(zip(c.datas, c.grads)):
            e = _Entry()  # the group's storage format and salt
            e.io = kinds.io_base(precision.known_kind(d.dtype), precision.known_kind(g.dtype))
            e.ios, e.salt = {}, precision.param_salt(f"group {i}")
            c.entries.append(e)
        c.be, c.writes = be, tuple(s in names for s in slots)
        arrays = c.datas + c.grads
        c.host = all(type(a) is np.ndarray for a in arrays)
        # the cheap re-checks read NumPy or CuPy flags; other kinds are validated in full
        cp = sys.modules.get("cupy")
        c.fast = c.host or (cp is not None and all(type(a) is cp.ndarray for a in arrays))
        c.pins = None  # device memory is never resized in place
        if c.host:  # the flat state is the optimizer's own, the data and grads the buffer's
            c.pins = Pins(list(arrays) + [a for f in self.state.flat for a in f.values()])
        return c

    def _check_flat_layout(self, owner: StepOwner, buf: FlatBuffer, kinds: StateKinds) -> None:
        """The FlatBuffer's layout against the one the state was bound to, or against a state
        loaded before the first step."""
        layout = buf.layout
        if self.state.layout is not None:
            if self.state.layout[0] != "flat":
                raise ValueError(
                    "this optimizer steps dicts of arrays; call update(params, "
                    "grads), not step(buf)"
                )
            if self.state.layout[1] != layout:
                check_names(
                    buf.params,
                    self.state.arrays,
                    "the FlatBuffer's parameter names",
                    "those of the first step",
                )
                old = {
                    n: (dt, off, size, tuple(shape))
                    for dt, n, off, size, shape in self.state.layout[1]
                }
                for dt, n, off, size, shape in layout:
                    if old[n] != (dt, off, size, tuple(shape)):
                        o = old[n]
                        raise ValueError(
                            f"parameter {n!r} is {dt}{list(shape)} at offset "
                            f"{off} but this optimizer was first stepped with "
                            f"{o[0]}{list(o[3])} at offset {o[1]}; create a new "
                            "optimizer or load a matching state_dict"
                        )
                raise ValueError("this FlatBuffer's layout differs from the first step's")
        elif self.state.pending is not None:
            check_names(
                buf.params,
                self.state.pending,
                "the FlatBuffer's parameter names",
                "those of the loaded state",
            )
            for dt, n, _, _, shape in layout:
                self.state.check_against(n, tuple(shape), np.dtype(dt), kinds, type(owner).__name__)

    def _validate_flat(
        self, owner: StepOwner, buf: FlatBuffer, write_grad: bool = False
    ) -> ModuleType:
        kinds = self.hooks.kinds(owner)
        self._check_flat_layout(owner, buf, kinds)
        self.hooks.hyperparams(owner)
        arrays = []
        for i, g in enumerate(buf.groups):
            for role, a in (("data", g.data), ("grad", g.grad)):
                if not is_array(a):
                    raise TypeError(
                        f"{role} of FlatBuffer group {i} is a {type(a).__name__}; expected an array"
                    )
                arrays.append((f"FlatBuffer group {i} {role}", a))
        be = self._backend_for(owner, arrays, "the FlatBuffer's groups")
        _check_quant_backend(be, kinds)
        supported = tuple(getattr(be, "DTYPES", SUPPORTED_DTYPES))
        entries = []
        for i, group in enumerate(buf.groups):
            dt = np.dtype(group.dtype)
            who = f"the FlatBuffer {dtype_name(dt)} group"
            _check_master(kinds, precision.known_kind(dt), f"{who} ({', '.join(group.slots)})")
            n = max((off + size for off, size, _ in group.slots.values()), default=0)
            for role, a in (("data", group.data), ("grad", group.grad)):
                ok = (dt,) if role == "data" else (dt, np.dtype(np.float32))
                check_array(None, role, a, supported + ("float32",), who)
                if dtype_of(a) not in ok or a.ndim != 1 or a.shape[0] < n:
                    raise ValueError(
                        f"{role} of {who} is {describe(a)}; expected a 1-D "
                        f"{' or '.join(dtype_name(d) for d in ok)} array of at least {n} elements"
                    )
            states = ()
            if self.state.flat is not None:
                states = tuple(self.state.flat[i].items())
                size = next(iter(self.state.flat[i].values())).shape[0] if states else None
                if size is not None and group.data.shape[0] != size:
                    raise ValueError(
                        f"data of {who} is {describe(group.data)} but this "
                        f"optimizer's state for the group holds {size} elements "
                        "(sized at the first step); a FlatBuffer's buffers cannot "
                        "be resized: create a new FlatBuffer and optimizer"
                    )
            sk = precision.storage_dtype(kinds.state_kind(precision.known_kind(dt)))
            if kinds.quant is not None and states:
                from ._validate import check_writable

                full = []
                for s, a in states:
                    if s.endswith((".codes", ".absmax")):
                        check_writable(None, f"state {s!r}", a, who)
                        entries.append((f"state {s!r} of {who}", a, True))
                    else:
                        full.append((s, a))
                states = tuple(full)
            _, ents = check_param_arrays(
                None,
                group.data,
                group.grad,
                states,
                supported,
                who,
                state_dtype=sk,
                grad_written=write_grad,
            )
            entries += ents
        check_no_overlap(entries)
        return be

    def _finite(self, owner: StepOwner, named_grads: Iterable[tuple[str, Any]]) -> bool:
        """Apply the non-finite policy: True to go on, False to skip, or raise."""
        if owner.nonfinite is None:
            return True
        for name, g in named_grads:
            if not all_finite(g):
                return self._nonfinite_found(owner, name, g)
        return True

    def _finite_flat(self, owner: StepOwner, buf: FlatBuffer) -> bool:
        if owner.nonfinite is None:
            return True
        for group in buf.groups:
            if not all_finite(group.grad):  # one reduction over the whole dtype group
                bad = next(
                    (
                        n
                        for n, (off, size, _) in group.slots.items()
                        if not all_finite(group.grad[off : off + size])
                    ),
                    "(padding between parameters)",
                )
                return self._nonfinite_found(owner, bad, buf.grads.get(bad, group.grad))
        return True

    def _nonfinite_found(self, owner: StepOwner, name: str, g: Any) -> bool:
        if owner.nonfinite == "skip":
            return False
        h = to_numpy(g)
        raise NonFiniteGradientError(
            f"gradient of parameter {name!r} ({describe(g)}) holds {int(np.isnan(h).sum())} "
            f"NaN and {int(np.isinf(h).sum())} inf values; nonfinite='raise' refused the step "
            "(nothing was changed)"
        )
