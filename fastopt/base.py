"""The optimizer base class: the public API (``update``, ``step``, ``state_dict``,
``load_state_dict``, hyperparameters as attributes) of every optimizer.

A subclass names the rule it runs (``_rule``, a name in ``kernels.RULES``), the rule
hyperparameters it pins (``_pinned``, e.g. AdamW's ``decoupled_weight_decay=True``) and its
constructor with ``torch.optim``'s signature; its hyperparameters, fixed flags, domains, state
buffers and their initial values all come from the rule spec. How a step checks and launches lives
in ``fastopt._steps``; state creation and ``state_dict`` checks in ``fastopt._state``.

Every public call validates all of its inputs before it writes anything: a refused call leaves
every parameter, every state buffer and the step counter exactly as they were. The first step
checks everything (``fastopt._validate``, the checks ``fastopt.functional`` makes too); later
steps re-check, per array, only what can change without the optimizer seeing it — the identity
of each array, its shape and dtype, its flags (writeable, contiguous), the state buffers the
user may have rebound — and fall back to the full checks when anything differs. That keeps a
step's host cost O(1) per array.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from . import backends
from ._arrays import on_device, to_numpy
from ._state import StateMachinery
from ._steps import StepMachinery
from ._validate import (
    normalise_hyper,
)
from .flat import FlatBuffer
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


class Optimizer(StepMachinery, StateMachinery):
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
    #: hyperparameters this class pins (AdamW: ``decoupled_weight_decay=True``); ``_hyper`` and
    #: ``_flags`` are derived from the rule spec (``__init_subclass__``)
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
        self._host = None  # the rule's host state ({} without one), created with the state
        self._pending_host = None  # host state loaded before the first step
        self._dict_cache = None
        self._flat_cache = None
        self._hyper_ok = True  # the constructor validated every hyperparameter
        self._frozen = True

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

    @classmethod
    def probes(cls):
        """``{hyperparameter: (off, on)}`` for this class's hyperparameters whose spec names a
        probe value: the rule's default and the value that switches a variant or brings a term
        into play (tests and benchmarks sweep them)."""
        spec = RULES[cls._rule]
        own = set(cls._hyper + cls._flags)
        return {
            h.name: (h.default, h.probe)
            for h in spec.hyper
            if h.name in own and h.probe is not None
        }

    @classmethod
    def slots_for(cls, **kwargs):
        """The state buffers an instance built with ``kwargs`` (else the defaults) keeps."""
        import inspect

        sig = inspect.signature(cls.__init__).parameters
        hp = {k: v.default for k, v in sig.items() if k in cls._hyper + cls._flags}
        hp.update(kwargs)
        hp = {**{h.name: h.default for h in RULES[cls._rule].hyper}, **hp, **cls._pinned}
        return RULES[cls._rule].state_names(hp)

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
        except (TypeError, ValueError, KeyError, ArithmeticError):
            # an invalid value (a rule's flags_of may divide by one outside its domain): the
            # validation before the next step refuses it
            return
        if now != self._slots:
            raise ValueError(
                f"{name}={value!r} would change the state buffers of this "
                f"{type(self).__name__} from {list(self._slots)} to {list(now)}; they are fixed "
                "at construction (momentum cannot be switched between zero and non-zero, for "
                "example): create a new optimizer instead"
            )

    @property
    def state(self) -> Mapping[str, Mapping[str, Any]]:
        """Per-parameter state, ``{name: {state name: array}}`` under PyTorch's names (views
        into the flat state buffers for a ``FlatBuffer``, where the mappings are read-only)."""
        return self._state

    @property
    def host_state(self) -> dict[str, float]:
        """The rule's host scalars carried between steps (NAdam's ``mu_product``, ASGD's
        ``eta`` and ``mu``) as a new dict of float32 values under torch's names: ``{}`` for a
        rule without any, and before the first step (they are created with the state)."""
        hs = self._host if self._host is not None else self._pending_host
        return dict(hs or {})

    @property
    def hyperparams(self) -> dict[str, Any]:
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

    @_exclusive
    def update(self, params: Mapping[str, Any], grads: Mapping[str, Any]) -> bool:
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
    def step(self, buf: FlatBuffer) -> bool:
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
    def state_dict(self) -> dict[str, Any]:
        """Plain data: optimizer kind, step count, hyperparameters and per-parameter state
        (``{name: {state name: numpy array}}``, host copies shaped like the parameters, plus
        the rule's host state as 0-d float32 arrays, as torch keeps it)."""
        state = {n: {s: to_numpy(a) for s, a in st.items()} for n, st in self._state.items()}
        hs = self._host
        if self._pending is not None and not state:
            state = {n: {s: a.copy() for s, a in st.items()} for n, st in self._pending.items()}
            hs = self._pending_host
        for st in state.values():  # torch's form: 0-d float32 tensors in every parameter's state
            st.update({h: np.array(v, dtype=np.float32) for h, v in (hs or {}).items()})
        return {
            "optimizer": type(self).__name__,
            "step": self.step_count,
            "hyperparams": self.hyperparams,
            "state": state,
        }

    @_exclusive
    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore ``state_dict()`` output, so that a resumed run continues bit-identically.

        Everything is checked first — optimizer kind, flags, hyperparameter values, step,
        parameter names, state buffer names, shapes and dtypes (against the parameters this
        optimizer already steps, if any) — and only then is anything written: a refused
        state dict changes nothing.
        """
        self._commit_state_dict(*self._check_state_dict(sd))

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        extra = f", nonfinite={self.nonfinite!r}" if self.nonfinite is not None else ""
        return f"{type(self).__name__}({hp}, backend={self.backend!r}{extra})"
