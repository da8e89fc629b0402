"""The optimizer base: state, the two calling conventions, checkpoints of the state.

A subclass declares its hyperparameters (``_hyper``), its structural flags (``_flags``), the
rule it runs (``_rule``, a name in ``kernels.RULES``), how its hyperparameters are validated
(``_check_hyper``) and which state buffers it keeps (``_state_names``). Everything else — input
validation, the non-finite policy, state creation, the dict API, the flat API, ``state_dict`` —
lives here once.

Every public call validates all of its inputs before it writes anything: a refused call leaves
every parameter, every state buffer and the step counter exactly as they were. The first step
checks everything (``fastopt._validate``, the checks ``fastopt.functional`` makes too); later
steps re-check, per array, only what can change without the optimizer seeing it — the identity
of each array, its shape and dtype, its flags (writeable, contiguous), the state buffers the
user may have rebound — and fall back to the full checks when anything differs. That keeps a
step's host cost O(1) per array.
"""

import bisect
import contextlib
import functools
import sys
import threading
from collections.abc import Mapping

import numpy as np

from . import backends
from ._arrays import array_module, as_xp_array, as_xp_dicts, on_device, to_numpy
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
    check_writable,
    describe,
    dtype_name,
    dtype_of,
    is_array,
    normalise_hyper,
)
from .flat import FlatBuffer, ReadOnlyViews
from .functional import Launch
from .kernels import RULES

__all__ = ["NONFINITE_POLICIES", "Optimizer"]

#: what ``nonfinite=`` accepts: None (PyTorch: NaN/inf flow through), "raise", "skip"
NONFINITE_POLICIES = (None, "raise", "skip")

_BUSY = (
    "{cls}.{what}() was called while another thread is using this optimizer; one "
    "optimizer is stepped by one thread at a time (guard it with a lock, or give each "
    "thread its own optimizer)"
)


def _exclusive(method):
    """One thread at a time: a second concurrent call is refused (RuntimeError), not queued,
    and changes nothing."""

    @functools.wraps(method)
    def guarded(self, *args):
        lock = self._lock
        if not lock.acquire(False):
            raise RuntimeError(_BUSY.format(cls=type(self).__name__, what=method.__name__))
        try:
            return method(self, *args)
        finally:
            lock.release()

    return guarded


def _root(a):
    """The NumPy array that owns ``a``'s memory, or None when the memory belongs to something
    else (a buffer, a memory map, a DLPack producer): two host arrays can share memory only if
    they have the same owner, or a foreign one."""
    b = a.base
    while b is not None:
        if type(b) is not np.ndarray:
            return None
        a, b = b, b.base
    return a


class _Entry:
    """One parameter of the dict API as the last full validation saw it."""

    __slots__ = (
        "dtype",
        "name",
        "nst",
        "p",
        "pflat",
        "ptr",
        "sarrs",
        "sflat",
        "shape",
        "src",
        "st",
        "tdtype",
    )


class _DictCache:
    """What a full validation of ``update()`` established, to re-check cheaply next step."""

    __slots__ = ("be", "entries", "fast", "los", "n", "roots", "spans", "state", "writes")

    def __init__(self, entries, state, be, writes):
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
        roots = [_root(a) for a in written]
        # memory NumPy owns can be shared only through views of its owner, so a grad whose
        # owner is no parameter's or state's owner needs no byte-range check; with any other
        # owner (a memory map, a DLPack producer) every grad's byte range is checked
        self.roots = None if any(r is None for r in roots) else {id(r) for r in roots}
        spans = sorted((ext[0], ext[1], a) for a in written if (ext := _extent(a)) is not None)
        self.los = [s[0] for s in spans]
        self.spans = spans

    def overlaps(self, g):
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
        "fast",
        "grads",
        "groups",
        "host",
        "n",
        "shapes",
        "states",
        "writes",
    )


class Optimizer:
    """Base class. Numeric hyperparameters are plain attributes: change them between steps
    (for schedules) and the next step uses them, without recompiling anything. A value set is
    normalised at once (NumPy scalars become Python floats, betas a tuple) and validated before
    the next step changes anything. Structural flags (``_flags``) are fixed at construction:
    assigning a different value raises ``AttributeError``.

    ``nonfinite`` chooses what a step does with a gradient that holds NaN or ±inf:
    ``None`` (default, PyTorch's behaviour) lets them flow through the update elementwise;
    ``"raise"`` raises ``NonFiniteGradientError`` (a ``FloatingPointError`` and a
    ``ValueError``) naming the first offending parameter; ``"skip"`` leaves parameters, state
    and the step counter untouched and makes ``update``/``step`` return False. Either check is
    one reduction per gradient array (per dtype group for a ``FlatBuffer``) before anything
    is written.

    One optimizer is stepped by one thread at a time: a call that overlaps another thread's
    ``update``/``step``/``state_dict``/``load_state_dict`` on the same optimizer raises
    ``RuntimeError`` and changes nothing.
    """

    #: numeric hyperparameters (changeable between steps) and structural flags (fixed)
    _hyper = ()
    _flags = ()
    #: the per-element rule this optimizer runs (a name in ``kernels.RULES``) and the rule's
    #: hyperparameters this class pins (AdamW: ``decoupled=True``); ``_hyper`` and ``_flags``
    #: are derived from the rule spec (``__init_subclass__``)
    _rule = None
    _pinned = {}

    def __init__(self, backend="auto", nonfinite=None):
        self._lock = threading.Lock()
        self.backend = backend
        self.nonfinite = nonfinite
        self.step_count = 0
        self._state = {}  # name -> {state name -> array view}
        self._layout = None  # ("dict", ((name, shape, dtype), ...)) or ("flat", buf.layout)
        self._bound = None  # name -> (shape, dtype name) of the first step
        self._flat_state = None  # per FlatBuffer group: {state name -> flat array}
        self._pending = None  # state loaded before the first step
        self._dict_cache = None
        self._flat_cache = None
        self._hyper_ok = True  # the constructor validated every hyperparameter
        self._frozen = True

    # -- what the rule spec provides ----------------------------------------------------------
    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._rule is not None:  # hyperparameters and flags: the rule's, less the pinned
            spec = RULES[cls._rule]
            cls._hyper = tuple(
                h.name for h in spec.hyper if not h.fixed and h.name not in cls._pinned
            )
            cls._flags = tuple(h.name for h in spec.hyper if h.fixed and h.name not in cls._pinned)

    @property
    def _spec(self):
        return RULES[self._rule]

    def _rule_hp(self, hp):
        """The rule's hyperparameters: the class's, plus the ones the class pins."""
        return {**hp, **self._pinned} if self._pinned else hp

    def _check_hyper(self, hp):
        """Validate ``hp`` (every name of ``_hyper + _flags``) against the rule spec's domains
        and constraints; after construction, also refuse values that would change which state
        buffers exist. Returns ``hp`` normalised."""
        spec = self._spec
        full = spec.validate(self._rule_hp(dict(hp)))
        slots = self.__dict__.get("_slots")
        if slots is not None:
            now = spec.state_names(full)
            if now != slots:
                changed = [h for h in self._hyper if hp.get(h) != getattr(self, h, None)]
                raise ValueError(
                    f"{', '.join(changed) or 'these hyperparameters'} would change the state "
                    f"buffers of this {type(self).__name__} from {list(slots)} to {list(now)}; "
                    "the state buffers are fixed at construction (momentum cannot be switched "
                    "between zero and non-zero, for example): create a new optimizer instead"
                )
        return {k: full[k] for k in hp}

    def _state_names(self):
        return self._slots

    def _state_fill(self, name):
        return self._spec.initial(name, self._rule_hp(self.hyperparams))

    def _init(self, hp):
        """Validate the constructor's hyperparameters, set them as attributes, and fix the
        state buffers they imply."""
        hp = {k: v for k, v in hp.items() if k not in self._pinned}  # a subclass's pins win
        hp = self._check_hyper(hp)
        for k, v in hp.items():
            setattr(self, k, v)
        self._slots = self._spec.state_names(self._rule_hp(hp))

    # -- attributes ------------------------------------------------------------------------------
    def __setattr__(self, name, value):
        if name[0] == "_":
            object.__setattr__(self, name, value)
            return
        cls = type(self)
        if name in cls._hyper:
            value = normalise_hyper(value)
            if "_slots" in self.__dict__:  # a value that would add or drop a state buffer
                self._refuse_slot_change(name, value)
            object.__setattr__(self, name, value)
            object.__setattr__(self, "_hyper_ok", False)  # validated before the next step
            return
        if (name in cls._flags or name in cls._pinned) and self.__dict__.get("_frozen"):
            current = getattr(self, name)
            if normalise_hyper(value) == current and type(value) is not str:
                return  # the value it already has: nothing changes
            raise AttributeError(
                f"{name} is fixed at construction ({cls.__name__} was built with "
                f"{name}={current!r}): it decides which state buffers exist and which compiled "
                f"variant runs; create a new optimizer with {name}={value!r} instead"
            )
        if name == "state":
            raise AttributeError(
                "state is managed by the optimizer: write into its arrays "
                "(opt.state[name][buf][...] = x), rebind one of them, or use "
                "load_state_dict()"
            )
        if name == "backend":
            if not isinstance(value, str):
                raise TypeError(f"backend must be a string, got {type(value).__name__}")
            if value != "auto":
                backends.get_backend(value)  # unknown or unavailable: raise now, not at a step
            self._dict_cache = self._flat_cache = None
        elif name == "nonfinite":
            if value not in NONFINITE_POLICIES:
                raise ValueError(
                    f"invalid nonfinite={value!r}; expected one of {list(NONFINITE_POLICIES)}"
                )
        elif name == "step_count":
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"step_count must be an integer, got {value!r}")
            if value < 0:
                raise ValueError(f"step_count must be >= 0, got {value!r}")
            value = int(value)
        object.__setattr__(self, name, value)

    def __getattr__(self, name):
        # the rule hyperparameters a class pins (Nesterov's nesterov=True) read as attributes
        pinned = type(self)._pinned
        if name in pinned:
            return pinned[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _refuse_slot_change(self, name, value):
        hp = self._rule_hp({h: getattr(self, h) for h in self._hyper + self._flags})
        hp[name] = value
        try:
            now = self._spec.state_names(hp)
        except (TypeError, ValueError, KeyError):
            return  # an invalid value: the validation before the next step refuses it
        if now != self._slots:
            raise ValueError(
                f"{name}={value!r} would change the state buffers of this "
                f"{type(self).__name__} from {list(self._slots)} to {list(now)}; they are fixed "
                "at construction (momentum cannot be switched between zero and non-zero, for "
                "example): create a new optimizer instead"
            )

    @property
    def state(self):
        """Per-parameter state, ``{name: {state name: array}}`` under PyTorch's names (views
        into the flat state buffers for a ``FlatBuffer``, where the mappings are read-only)."""
        return self._state

    @property
    def hyperparams(self):
        """The current hyperparameters and flags, as plain Python values."""
        out = {h: getattr(self, h) for h in self._hyper + self._flags}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in out.items()}

    @contextlib.contextmanager
    def _exclusive_use(self, what):
        """``_exclusive`` for a caller outside the class (``load_checkpoint``)."""
        if not self._lock.acquire(False):
            raise RuntimeError(_BUSY.format(cls=type(self).__name__, what=what))
        try:
            yield
        finally:
            self._lock.release()

    def __getstate__(self):
        d = dict(self.__dict__)
        del d["_lock"]
        d["_dict_cache"] = d["_flat_cache"] = None
        return d

    def __setstate__(self, d):
        self.__dict__.update(d)
        self.__dict__["_lock"] = threading.Lock()

    # -- public API -----------------------------------------------------------------------------
    @_exclusive
    def update(self, params, grads):
        """Update the arrays of ``params`` (dict name -> array) in place from ``grads``.

        State is created on the first call; later calls must pass the same names, shapes and
        dtypes. Every input is validated before anything is written. Returns True when the step
        was applied, False when ``nonfinite="skip"`` skipped it.
        """
        c = self._dict_cache
        if c is not None and c.fast:
            todo = self._recheck_dict(params, grads)
            if todo is not None:
                return self._apply_dict(todo)
        return self._update_full(params, grads)

    @_exclusive
    def step(self, buf):
        """One fused step over a ``FlatBuffer``: one kernel call per dtype.

        Returns True when the step was applied, False when ``nonfinite="skip"`` skipped it.
        """
        c = self._flat_cache
        if c is not None and c.fast and buf is c.buf and self._recheck_flat(c):
            with on_device(None if c.host else c.datas[0]):
                return self._apply_flat(buf, c)
        if not isinstance(buf, FlatBuffer):
            raise TypeError(
                f"step() expects a fastopt.FlatBuffer, got {type(buf).__name__}; "
                "use update(params, grads) for dicts of arrays"
            )
        groups = buf.groups
        with on_device(groups[0].data if groups else None):
            be = self._validate_flat(buf)
            if not self._finite_flat(buf):
                return False
            if self._layout is None:
                self._bind_flat(buf)
            c = self._flat_cache = self._build_flat_cache(buf, be)
            return self._apply_flat(buf, c)

    @_exclusive
    def state_dict(self):
        """Plain data: optimizer kind, step count, hyperparameters and per-parameter state
        (``{name: {state name: numpy array}}``, host copies shaped like the parameters)."""
        state = {n: {s: to_numpy(a) for s, a in st.items()} for n, st in self._state.items()}
        if self._pending is not None and not state:
            state = {n: {s: a.copy() for s, a in st.items()} for n, st in self._pending.items()}
        return {
            "optimizer": type(self).__name__,
            "step": self.step_count,
            "hyperparams": self.hyperparams,
            "state": state,
        }

    @_exclusive
    def load_state_dict(self, sd):
        """Restore ``state_dict()`` output, so that a resumed run continues bit-identically.

        Everything is checked first — optimizer kind, flags, hyperparameter values, step,
        parameter names, state buffer names, shapes and dtypes (against the parameters this
        optimizer already steps, if any) — and only then is anything written: a refused
        state dict changes nothing.
        """
        self._commit_state_dict(*self._check_state_dict(sd))

    # -- the dict API ---------------------------------------------------------------------------
    def _step_hp(self):
        """This step's hyperparameters: a snapshot, validated when any was set since the last
        validation (a refused value raises before anything changes)."""
        dirty = not self._hyper_ok
        self._hyper_ok = True
        hp = {h: getattr(self, h) for h in self._hyper + self._flags}
        if dirty:
            try:
                hp = self._check_hyper(hp)
            except BaseException:
                self._hyper_ok = False
                raise
        return hp

    def _recheck_dict(self, params, grads):
        """The launches of a step whose inputs differ from the last fully validated step only
        in what cannot break it — or None, and the full validation decides."""
        c = self._dict_cache
        if (
            self._state is not c.state
            or not isinstance(params, Mapping)
            or not isinstance(grads, Mapping)
            or len(params) != c.n
            or len(grads) != c.n
        ):
            return None
        state, roots = c.state, c.roots
        todo = []
        for e in c.entries:
            name = e.name
            p = params.get(name)
            if p is not e.src:
                return None
            if e.ptr is not None:  # a host tensor: still the same memory, shape and dtype?
                if (
                    p.data_ptr() != e.ptr
                    or p.shape != e.shape
                    or p.dtype is not e.tdtype
                    or not p.is_contiguous()
                ):
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
                g = as_xp_array(g, f"grad of parameter {name!r}")
                if type(g) is not np.ndarray:
                    return None
            if g.shape != e.shape or (g.dtype is not e.dtype and g.dtype != e.dtype):
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

    def _apply_dict(self, todo, hp=None):
        if hp is None:
            hp = self._step_hp()
        if self.nonfinite is not None:
            for e, g in todo:
                if not all_finite(g):
                    return self._nonfinite_found(e.name, g)
        self.step_count += 1
        c = self._dict_cache
        launch = Launch(c.be, self._rule, self.step_count, self._rule_hp(hp))
        run, last, writes = None, None, c.writes
        for e, g in todo:
            if e.dtype is not last:
                run, last = launch.runner(e.dtype, writes), e.dtype
            run(e.pflat, g, e.sflat)
        return True

    def _update_full(self, params, grads):
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
            be, pairs, hp = self._validate_dict(params, grads)
            if not self._finite((n, g) for n, _, g in pairs):
                return False
            if self._layout is None:
                self._bind(
                    ("dict", tuple((n, tuple(p.shape), str(dtype_of(p))) for n, p, _ in pairs)),
                    {n: p for n, p, _ in pairs},
                )
            c = self._dict_cache = self._build_dict_cache(pairs, sources, be)
            todo = []
            for e, (_, _, g) in zip(c.entries, pairs):
                g = array_module(g).ascontiguousarray(g)
                todo.append((e, g.reshape(-1)))
            return self._apply_dict(todo, hp)

    def _build_dict_cache(self, pairs, sources, be):
        names, slots = self._state_names(), RULES[self._rule].STATE
        entries = []
        for name, p, _ in pairs:
            e = _Entry()
            st = self._state[name]
            e.name, e.p, e.shape, e.dtype, e.src = name, p, p.shape, p.dtype, sources[name]
            e.ptr = e.tdtype = None
            if e.src is not p and hasattr(e.src, "data_ptr") and type(p) is np.ndarray:
                e.ptr, e.tdtype = e.src.data_ptr(), e.src.dtype  # a torch tensor's NumPy view
            e.pflat, e.st, e.nst = p.reshape(-1), st, len(st)
            e.sarrs = tuple((s, st[s]) for s in names)
            e.sflat = tuple(st[s].reshape(-1) if s in st else None for s in slots)
            entries.append(e)
        return _DictCache(entries, self._state, be, tuple(s in names for s in slots))

    def _backend_for(self, arrays, what):
        """The backend module that will run, after checking it can reach ``arrays``."""
        be = backends.resolve(self.backend, arrays[0][1] if arrays else None)
        check_reach(be, arrays, what)
        return be

    def _check_against(self, name, shape, dtype):
        """Shape/dtype of parameter ``name`` against the bound layout or the loaded state."""
        if self._bound is not None:
            ref = self._bound[name]
            if (shape, dtype) != ref:
                raise ValueError(
                    f"parameter {name!r} is {dtype_name(dtype)}{list(shape)} but "
                    f"this optimizer was first stepped with "
                    f"{dtype_name(ref[1])}{list(ref[0])}; create a new optimizer "
                    "or load a matching state_dict"
                )
        elif self._pending is not None:
            for s, a in self._pending[name].items():
                if a.shape != shape or a.dtype != dtype:
                    raise ValueError(
                        f"loaded state {s!r} of parameter {name!r} is "
                        f"{dtype_name(a.dtype)}{list(a.shape)}, but the parameter "
                        f"is {dtype_name(dtype)}{list(shape)}"
                    )

    def _validate_dict(self, params, grads):
        check_names(grads, params, "the names of grads", "the names of params")
        bound = self._layout is not None
        if bound:
            if self._layout[0] != "dict":
                raise ValueError("this optimizer steps a FlatBuffer; call step(buf), not update()")
            check_names(
                params,
                self._state,
                "parameter names",
                "those of the first step (create a new optimizer for other parameters)",
            )
        elif self._pending is not None:
            check_names(params, self._pending, "parameter names", "those of the loaded state")
        hp = self._step_hp()  # schedules may have changed them since the last step
        arrays = []
        for name, p in params.items():
            for role, a in (("param", p), ("grad", grads[name])):
                if not is_array(a):
                    raise TypeError(
                        f"{role} of parameter {name!r} is a {type(a).__name__}; "
                        "expected a NumPy array or a device array"
                    )
                arrays.append((f"{role} of parameter {name!r}", a))
        be = self._backend_for(arrays, "params and grads")
        supported = tuple(getattr(be, "DTYPES", SUPPORTED_DTYPES))
        kind, names = type(self).__name__, self._state_names()
        pairs, entries = [], []
        for name, p in params.items():
            g = grads[name]
            pd, ents = check_param_arrays(name, p, g, (), supported)
            self._check_against(name, tuple(p.shape), pd)
            if bound:
                st = self._state[name]
                if not isinstance(st, Mapping):
                    raise ValueError(
                        f"opt.state[{name!r}] is a {type(st).__name__}; expected "
                        "a dict state name -> array"
                    )
                check_names(
                    st, names, f"state buffers of parameter {name!r}", f"those {kind} keeps"
                )
                ents += check_state_arrays(name, p, [(s, st[s]) for s in names])
            pairs.append((name, p, g))
            entries += ents
        check_no_overlap(entries)
        return be, pairs, hp

    # -- the flat API ---------------------------------------------------------------------------
    def _recheck_flat(self, c):
        """Are the FlatBuffer's groups the arrays the last full validation saw, with the same
        lengths and flags?"""
        groups = c.buf.groups
        if len(groups) != c.n:
            return False
        for i, g in enumerate(groups):
            d, gr = g.data, g.grad
            if (
                g is not c.groups[i]
                or d is not c.datas[i]
                or gr is not c.grads[i]
                or d.shape != c.shapes[i]
                or gr.shape != c.shapes[i]
                or d.dtype is not c.dtypes[i]
                or gr.dtype is not c.dtypes[i]
            ):
                return False
            if c.host:
                if (
                    not d.flags.carray
                    or not gr.flags.c_contiguous
                    or not all(s.flags.carray for s in c.states[i] if s is not None)
                ):
                    return False
            elif not d.flags.c_contiguous or not gr.flags.c_contiguous:
                return False
        return True

    def _apply_flat(self, buf, c):
        hp = self._step_hp()
        if not self._finite_flat(buf):
            return False
        self.step_count += 1
        launch = Launch(c.be, self._rule, self.step_count, self._rule_hp(hp))
        for d, gr, states in zip(c.datas, c.grads, c.states):
            launch.runner(d.dtype, c.writes)(d, gr, states)
        return True

    def _build_flat_cache(self, buf, be):
        c = _FlatCache()
        names, slots = self._state_names(), RULES[self._rule].STATE
        c.buf, c.n, c.groups = buf, len(buf.groups), tuple(buf.groups)
        c.datas = tuple(g.data for g in buf.groups)
        c.grads = tuple(g.grad for g in buf.groups)
        c.shapes = tuple(d.shape for d in c.datas)
        c.dtypes = tuple(d.dtype for d in c.datas)
        c.states = tuple(tuple(f.get(s, None) for s in slots) for f in self._flat_state)
        c.be, c.writes = be, tuple(s in names for s in slots)
        arrays = c.datas + c.grads
        c.host = all(type(a) is np.ndarray for a in arrays)
        # the cheap re-checks read NumPy or CuPy flags; other kinds are validated in full
        cp = sys.modules.get("cupy")
        c.fast = c.host or (cp is not None and all(type(a) is cp.ndarray for a in arrays))
        return c

    def _validate_flat(self, buf):
        layout = buf.layout
        if self._layout is not None:
            if self._layout[0] != "flat":
                raise ValueError(
                    "this optimizer steps dicts of arrays; call update(params, "
                    "grads), not step(buf)"
                )
            if self._layout[1] != layout:
                check_names(
                    buf.params,
                    self._state,
                    "the FlatBuffer's parameter names",
                    "those of the first step",
                )
                old = {
                    n: (dt, off, size, tuple(shape)) for dt, n, off, size, shape in self._layout[1]
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
        elif self._pending is not None:
            check_names(
                buf.params,
                self._pending,
                "the FlatBuffer's parameter names",
                "those of the loaded state",
            )
            for dt, n, _, _, shape in layout:
                self._check_against(n, tuple(shape), np.dtype(dt))
        self._step_hp()
        arrays = []
        for i, g in enumerate(buf.groups):
            for role, a in (("data", g.data), ("grad", g.grad)):
                if not is_array(a):
                    raise TypeError(
                        f"{role} of FlatBuffer group {i} is a {type(a).__name__}; expected an array"
                    )
                arrays.append((f"FlatBuffer group {i} {role}", a))
        be = self._backend_for(arrays, "the FlatBuffer's groups")
        supported = tuple(getattr(be, "DTYPES", SUPPORTED_DTYPES))
        entries = []
        for i, group in enumerate(buf.groups):
            dt = np.dtype(group.dtype)
            who = f"the FlatBuffer {dtype_name(dt)} group"
            n = max((off + size for off, size, _ in group.slots.values()), default=0)
            for role, a in (("data", group.data), ("grad", group.grad)):
                check_array(None, role, a, supported, who)
                if dtype_of(a) != dt or a.ndim != 1 or a.shape[0] < n:
                    raise ValueError(
                        f"{role} of {who} is {describe(a)}; expected a 1-D "
                        f"{dtype_name(dt)} array of at least {n} elements"
                    )
            states = ()
            if self._flat_state is not None:
                states = tuple(self._flat_state[i].items())
                size = next(iter(self._flat_state[i].values())).shape[0] if states else None
                if size is not None and group.data.shape[0] != size:
                    raise ValueError(
                        f"data of {who} is {describe(group.data)} but this "
                        f"optimizer's state for the group holds {size} elements "
                        "(sized at the first step); a FlatBuffer's buffers cannot "
                        "be resized: create a new FlatBuffer and optimizer"
                    )
            _, ents = check_param_arrays(None, group.data, group.grad, states, supported, who)
            entries += ents
        check_no_overlap(entries)
        return be

    # -- the non-finite policy ------------------------------------------------------------------
    def _finite(self, named_grads):
        """Apply the non-finite policy: True to go on, False to skip, or raise."""
        if self.nonfinite is None:
            return True
        for name, g in named_grads:
            if not all_finite(g):
                return self._nonfinite_found(name, g)
        return True

    def _finite_flat(self, buf):
        if self.nonfinite is None:
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
                return self._nonfinite_found(bad, buf.grads.get(bad, group.grad))
        return True

    def _nonfinite_found(self, name, g):
        if self.nonfinite == "skip":
            return False
        h = to_numpy(g)
        raise NonFiniteGradientError(
            f"gradient of parameter {name!r} ({describe(g)}) holds {int(np.isnan(h).sum())} "
            f"NaN and {int(np.isinf(h).sum())} inf values; nonfinite='raise' refused the step "
            "(nothing was changed)"
        )

    # -- state dicts ----------------------------------------------------------------------------
    def _check_state_dict(self, sd):
        keys = {"optimizer", "step", "hyperparams", "state"}
        if not isinstance(sd, dict) or set(sd) != keys:
            got = sorted(sd, key=str) if isinstance(sd, dict) else type(sd).__name__
            raise ValueError(
                f"not a fastopt state_dict: got {got}, expected a dict with keys {sorted(keys)}"
            )
        kind = type(self).__name__
        if sd["optimizer"] != kind:
            raise ValueError(f"state_dict is for optimizer {sd['optimizer']!r}, this is {kind}")
        step = sd["step"]
        if (
            isinstance(step, (bool, np.bool_))
            or not isinstance(step, (int, np.integer))
            or step < 0
        ):
            raise ValueError(f"state_dict step is {step!r}; expected an integer >= 0")
        hp = sd["hyperparams"]
        if not isinstance(hp, dict):
            raise TypeError(f"state_dict hyperparams is a {type(hp).__name__}; expected a dict")
        check_names(hp, self._hyper + self._flags, "state_dict hyperparameters", f"those of {kind}")
        hp = {k: normalise_hyper(v) for k, v in hp.items()}
        for f in self._flags:
            if hp[f] != getattr(self, f):
                raise ValueError(
                    f"state_dict has {f}={hp[f]!r} but this optimizer has "
                    f"{f}={getattr(self, f)!r}; flags decide the state buffers "
                    "and the math, so they must match"
                )
        hp = self._check_hyper(hp)
        state = sd["state"]
        if not isinstance(state, dict):
            raise TypeError(f"state_dict state is a {type(state).__name__}; expected a dict")
        check_str_names(state, "state_dict parameter names")
        want = self._state_names()
        host = {}
        for name, st in state.items():
            if not isinstance(st, dict):
                raise TypeError(
                    f"state of parameter {name!r} is a {type(st).__name__}; "
                    "expected a dict state name -> array"
                )
            check_names(st, want, f"state buffers of parameter {name!r}", f"those {kind} keeps")
            host[name] = {}
            for s in want:
                a = st[s]
                check_array(name, f"state {s!r}", a, SUPPORTED_DTYPES)
                host[name][s] = np.array(to_numpy(a), copy=True)
        if self._layout is not None:
            check_names(
                state, self._state, "state_dict parameter names", "those this optimizer steps"
            )
            for name, st in host.items():
                cur_st = self._state[name]
                check_names(
                    cur_st, want, f"state buffers of parameter {name!r}", f"those {kind} keeps"
                )
                for s, a in st.items():
                    cur = cur_st[s]
                    if not is_array(cur) or a.shape != tuple(cur.shape) or a.dtype != dtype_of(cur):
                        raise ValueError(
                            f"state {s!r} of parameter {name!r} is "
                            f"{dtype_name(a.dtype)}{list(a.shape)}, expected "
                            f"{describe(cur)}"
                        )
                    check_writable(name, f"state {s!r}", cur)
        else:
            for name, st in host.items():
                kinds = {(a.shape, a.dtype) for a in st.values()}
                if len(kinds) > 1:
                    got = sorted((s, a.dtype.name, a.shape) for s, a in st.items())
                    raise ValueError(
                        f"state buffers of parameter {name!r} differ in shape or dtype: {got}"
                    )
        return hp, int(step), host

    def _commit_state_dict(self, hp, step, host):
        if self._layout is not None:
            for name, st in host.items():
                for s, a in st.items():
                    cur = self._state[name][s]
                    cur[...] = array_module(cur).asarray(a)
        else:
            self._pending = host if host else None
        for h in self._hyper:
            setattr(self, h, hp[h])
        self._hyper_ok = True  # validated by _check_state_dict
        self.step_count = step

    # -- internals --------------------------------------------------------------------------
    def _new_state(self, name, like):
        xp = array_module(like)
        out = {}
        pending = (self._pending or {}).get(name)
        for s in self._state_names():
            if pending is not None:
                out[s] = xp.asarray(pending[s]).reshape(like.shape).copy()
            else:
                out[s] = xp.full(like.shape, self._state_fill(s), dtype=dtype_of(like))
        return out

    def _bind(self, layout, params):
        # validated already: the pending state's names, shapes and dtypes match ``params``
        self._state = {n: self._new_state(n, p) for n, p in params.items()}
        self._bound = {n: (shape, np.dtype(dt)) for n, shape, dt in layout[1]}
        self._layout = layout
        self._pending = None

    def _bind_flat(self, buf):
        flat_state, state = [], {}
        for group in buf.groups:
            flat = {
                s: array_module(group.data).full(
                    group.data.shape, self._state_fill(s), dtype=group.dtype
                )
                for s in self._state_names()
            }
            for name, (off, size, shape) in group.slots.items():
                views = {s: a[off : off + size].reshape(shape) for s, a in flat.items()}
                if self._pending is not None:
                    for s, v in views.items():
                        v[...] = array_module(v).asarray(self._pending[name][s])
                state[name] = ReadOnlyViews(
                    views, f"opt.state[{name!r}] (views into the optimizer's flat state)"
                )
            flat_state.append(flat)
        self._flat_state = flat_state
        self._state = ReadOnlyViews(state, "opt.state of an optimizer stepping a FlatBuffer")
        self._layout = ("flat", buf.layout)
        self._bound = {n: (tuple(shape), np.dtype(dt)) for dt, n, _, _, shape in buf.layout}
        self._pending = None

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        extra = f", nonfinite={self.nonfinite!r}" if self.nonfinite is not None else ""
        return f"{type(self).__name__}({hp}, backend={self.backend!r}{extra})"
