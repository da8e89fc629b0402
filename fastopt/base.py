"""The optimizer base class: the public API (``update``, ``step``, ``state_dict``,
``load_state_dict``, hyperparameters as attributes) of every optimizer.

A subclass names the rule it runs (``_rule``, a name in ``kernels.RULES``), the rule
hyperparameters it pins (``_pinned``, e.g. AdamW's ``decoupled_weight_decay=True``) and its
constructor with ``torch.optim``'s signature; its hyperparameters, fixed flags, domains, state
buffers and their initial values all come from the rule spec. How a step checks and launches lives
in ``fastopt._steps`` (a ``Stepper`` the optimizer owns, handed ``STEP_HOOKS``); state creation
and ``state_dict`` checks in ``fastopt._state``.

Every optimizer also takes the mixed-precision keywords (``fastopt.precision``):
``state_dtype`` (None: the param dtype; "float32"; "bfloat16"), ``master_weights`` (True: an
fp32 master copy of every 16-bit param, kept as the state buffer ``"master_param"``;
"remainder": the same master as a bfloat16 param plus the int16 ``"master_remainder"``),
``stochastic_rounding`` and ``seed`` (bfloat16 params without a master), and ``capturable``
(the step count and lr on the device, so a step can be captured in a CUDA graph; on the CPU
accepted and equivalent). Every subclass's constructor accepts them (``__init_subclass__``
adds them to its signature), and ``update``/``step`` take the loss-scale keywords
``grad_scale``, ``found_inf`` and ``unscale_grads``.

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
import copy
import functools
import inspect
import threading
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from . import _capture, backends, precision
from ._state import OptimizerState, StateKinds
from ._steps import StepHooks, Stepper
from ._validate import check_names, normalise_hyper
from .flat import FlatBuffer
from .kernels import RULES

__all__ = ["NONFINITE_POLICIES", "Optimizer"]

#: the attributes older pickles kept the state's parts in -> ``OptimizerState``'s names
_OLD_STATE_NAMES = {
    "_state": "arrays",
    "_layout": "layout",
    "_bound": "shapes",
    "_flat_state": "flat",
    "_pending": "pending",
    "_pending_host": "pending_host",
    "_host": "host",
}

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
    def guarded(self, *args, **kwargs):
        lock = self._lock
        if not lock.acquire(False):
            raise RuntimeError(_BUSY.format(cls=type(self).__name__, what=method.__name__))
        try:
            return method(self, *args, **kwargs)
        finally:
            lock.release()

    return guarded


#: the mixed-precision keywords every optimizer constructor takes, with their defaults
PRECISION_DEFAULTS = {
    "state_dtype": None,
    "master_weights": False,
    "stochastic_rounding": False,
    "seed": 0,
    "capturable": False,
}


def _with_precision(init):
    """``init`` taking the mixed-precision keywords too: they are set once it has run (a
    subclass calling its parent's constructor sets them again, last)."""
    sig = inspect.signature(init)
    if any(n in sig.parameters for n in PRECISION_DEFAULTS):
        return init

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        prec = {n: kwargs.pop(n, d) for n, d in PRECISION_DEFAULTS.items()}
        init(self, *args, **kwargs)
        self._set_precision(**prec)

    P = inspect.Parameter
    params = [p for p in sig.parameters.values() if p.kind is not P.VAR_KEYWORD]
    var_kw = [p for p in sig.parameters.values() if p.kind is P.VAR_KEYWORD]
    extra = [P(n, P.KEYWORD_ONLY, default=d) for n, d in PRECISION_DEFAULTS.items()]
    __init__.__signature__ = sig.replace(  # type: ignore[attr-defined]
        parameters=params + extra + var_kw
    )
    return __init__


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
    _hyper: ClassVar[tuple[str, ...]] = ()
    _flags: ClassVar[tuple[str, ...]] = ()
    #: the per-element rule this optimizer runs (a name in ``kernels.RULES``) and the rule's
    #: hyperparameters this class pins (AdamW: ``decoupled_weight_decay=True``); ``_hyper`` and
    #: ``_flags`` are derived from the rule spec (``__init_subclass__``)
    _rule: ClassVar[Any] = None
    _pinned: ClassVar[dict[str, Any]] = {}

    def __init__(self, backend: str = "auto", nonfinite: str | None = None) -> None:
        self._lock = threading.Lock()
        self._st = OptimizerState()  # buffers, layout, pending loads, host state
        # update()/step()'s checks, caches and launches (fastopt._steps)
        self._stepper = Stepper(self._rule, self._st, STEP_HOOKS)
        self.backend = backend
        self.nonfinite = nonfinite
        self.step_count = 0
        self._hyper_ok = True  # the constructor validated every hyperparameter
        self._set_precision(**PRECISION_DEFAULTS)
        self._frozen = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _with_precision(cls.__dict__["__init__"])  # type: ignore[method-assign]
        if cls._rule is not None:  # hyperparameters and flags: the rule's, less the pinned
            spec = RULES[cls._rule]
            cls._hyper = tuple(
                h.name for h in spec.hyper if not h.fixed and h.name not in cls._pinned
            )
            cls._flags = tuple(h.name for h in spec.hyper if h.fixed and h.name not in cls._pinned)

    def _set_precision(
        self,
        state_dtype=None,
        master_weights=False,
        stochastic_rounding=False,
        seed=0,
        capturable=False,
    ):
        st = self.__dict__.get("_st")
        if st is not None and st.bound:
            raise RuntimeError("the precision settings are fixed once an optimizer has stepped")
        state_dtype = precision.check_state_dtype(state_dtype)
        master_weights = precision.check_master_weights(master_weights)
        for name, v in (
            ("stochastic_rounding", stochastic_rounding),
            ("capturable", capturable),
        ):
            if not isinstance(v, (bool, np.bool_)):
                raise TypeError(f"invalid {name}={v!r}; expected True or False")
        if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
            raise TypeError(f"invalid seed={seed!r}; expected an integer in [0, 2**32)")
        if not 0 <= int(seed) < 1 << 32:
            raise ValueError(f"invalid seed={seed!r}; expected an integer in [0, 2**32)")
        if master_weights and stochastic_rounding:
            raise ValueError(
                "stochastic_rounding=True rounds bfloat16 params that have no master copy; "
                f"with master_weights={master_weights!r} each param is rounded from its fp32 "
                "master: choose one"
            )
        if capturable and self._rule is not None:
            from .kernels import device_scalars

            hp = self._rule_hp({h: getattr(self, h) for h in self._hyper + self._flags})
            try:  # a rule the device cannot compute the scalars of: refused up front
                device_scalars.trace(self._rule, hp)
            except device_scalars.NotCapturable as exc:
                raise ValueError(f"{type(self).__name__}(capturable=True): {exc}") from None
        self.__dict__.pop("_kinds_memo", None)
        self._prec = {
            "state_dtype": state_dtype,
            "master_weights": master_weights,
            "stochastic_rounding": bool(stochastic_rounding),
            "seed": int(seed),
            "capturable": bool(capturable),
        }

    def _upload_hyper(self):
        """A capturable optimizer's new hyperparameter value, written into device memory at
        once (on the current stream), so the replays of a captured step see it; an invalid
        value is left for the next step to refuse."""
        try:
            hp = self._check_hyper({h: getattr(self, h) for h in self._hyper + self._flags})
        except (TypeError, ValueError):
            return
        self._dev.upload(self._rule_hp(hp))

    @property
    def step_count(self) -> int:
        """Steps taken. A capturable optimizer on a GPU keeps the count on the device (a step
        skipped there by ``found_inf`` does not count): reading it synchronises once."""
        ds = self.__dict__.get("_dev")
        return self._step_count if ds is None else ds.step()

    @step_count.setter
    def step_count(self, value: int) -> None:
        object.__setattr__(self, "_step_count", value)
        ds = self.__dict__.get("_dev")
        if ds is not None:
            ds.set_step(value)

    @property
    def state_dtype(self) -> str | None:
        """The state dtype policy: None (the param dtype; float32 with a master copy),
        "float32" or "bfloat16" (fixed at construction)."""
        return self._prec["state_dtype"]

    @property
    def master_weights(self) -> bool | str:
        """False; True: every 16-bit param keeps an fp32 master copy (state
        ``"master_param"``); "remainder": every bfloat16 param keeps its fp32 master as the
        param plus an int16 remainder (state ``"master_remainder"``)."""
        return self._prec["master_weights"]

    @property
    def stochastic_rounding(self) -> bool:
        """Are bfloat16 params (without a master) rounded stochastically?"""
        return self._prec["stochastic_rounding"]

    @property
    def seed(self) -> int:
        """The seed of stochastic rounding's hash."""
        return self._prec["seed"]

    @property
    def capturable(self) -> bool:
        """Are the step count and lr kept on the device (CUDA-graph capturable steps)?"""
        return self._prec["capturable"]

    def _kinds(self) -> StateKinds:
        """Which state buffers a parameter keeps, in which dtype (fixed at construction)."""
        k = self.__dict__.get("_kinds_memo")
        if k is None:
            k = self._kinds_memo = StateKinds(
                self._slots,
                self.state_dtype,
                bool(self.master_weights),
                self.stochastic_rounding,
                tuple((s.name, s.quant_map) for s in self._spec.slots if s.quantize),
                remainder=self.master_weights == "remainder",
            )
        return k

    def _state_kind(self, param_kind):
        """The storage dtype of the state buffers of a param of ``param_kind``."""
        return self._kinds().state_kind(param_kind)

    def _names_for(self, param_kind):
        """The state buffer names of a param of ``param_kind`` (``StateKinds.names_for``)."""
        return self._kinds().names_for(param_kind)

    # the state's parts under their older names (checkpoint.py and tests read them)
    @property
    def _bound(self):
        return self._st.shapes

    @property
    def _layout(self):
        return self._st.layout

    @property
    def _flat_state(self):
        return self._st.flat

    @property
    def _host(self):
        return self._st.host

    @property
    def _pending(self):
        return self._st.pending

    @property
    def _spec(self):
        return RULES[self._rule]

    @classmethod
    def probes(cls) -> dict[str, tuple[Any, Any]]:
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
    def slots_for(cls, **kwargs: Any) -> tuple[str, ...]:
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

    def _device_scalars(self, be, rhp, like):
        """A capturable step on a GPU: the device scalars (created at the first such step)
        and the steps issued so far (the host's count: the device holds the steps taken)."""
        ds = self.__dict__.get("_dev")
        if ds is None:
            ds = self._dev = _capture.DeviceScalars(
                be, self._rule, rhp, self._step_count, self._st.host, self.seed, like
            )
        return ds, self._step_count

    def _commit_count(self, step, on_device):
        """An applied step's count, after its launches (``on_device``: a capturable step on a
        GPU, whose device holds the count taken; the host keeps the count issued)."""
        if on_device:
            self._step_count = step
        else:
            self.step_count = step

    def _state_fill(self, name):
        """The initial value of state slot ``name`` (the rule's, from the hyperparameters)."""
        return self._spec.initial(name, self._rule_hp(self.hyperparams))

    def _initial_host(self):
        """The rule's initial host state, from the hyperparameters."""
        return self._spec.initial_host_state(self._rule_hp(self.hyperparams))

    def _init(self, hp):
        """Validate the constructor's hyperparameters, set them as attributes, and fix the
        state buffers they imply."""
        hp = {k: v for k, v in hp.items() if k not in self._pinned}  # a subclass's pins win
        hp = self._check_hyper(hp)
        for k, v in hp.items():
            setattr(self, k, v)
        self._slots = self._spec.state_names(self._rule_hp(hp))
        self.__dict__.pop("_kinds_memo", None)

    def __setattr__(self, name: str, value: Any) -> None:
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
            if self.__dict__.get("_dev") is not None:
                self._upload_hyper()
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
            stepper = self.__dict__.get("_stepper")
            if stepper is not None:
                stepper.forget()
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

    def __getattr__(self, name: str) -> Any:
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
        return self._st.arrays

    @property
    def host_state(self) -> dict[str, float]:
        """The rule's host scalars carried between steps (NAdam's ``mu_product``, ASGD's
        ``eta`` and ``mu``) as a new dict of float32 values under torch's names: ``{}`` for a
        rule without any, and before the first step (they are created with the state)."""
        return dict(self._current_host() or {})

    def _current_host(self):
        """The host state now: the device's for a capturable optimizer stepping on a GPU (read
        back: one synchronisation), else the host's (a pending one before the first step)."""
        ds = self.__dict__.get("_dev")
        if ds is not None and self._st.host:
            return ds.host_state()
        return self._st.host_now()

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

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        del d["_lock"]
        del d["_stepper"]  # caches of live arrays: rebuilt by the first step after loading
        if d.pop("_dev", None) is not None:  # device-held count: pickled as the host value
            d["_step_count"] = self.step_count
            if self._st.host:  # and so is the host state
                st = d["_st"] = copy.copy(self._st)
                st.host = self._current_host()
        return d

    def __setstate__(self, d: dict[str, Any]) -> None:
        if "step_count" in d:  # pickled before the count became a property
            d["_step_count"] = d.pop("step_count")
        d.setdefault("_prec", dict(PRECISION_DEFAULTS))
        if "_st" not in d:  # pickled when the state's parts were the optimizer's attributes
            st = d["_st"] = OptimizerState()
            for old, new in _OLD_STATE_NAMES.items():
                if old in d:
                    setattr(st, new, d.pop(old))
        d.pop("_dict_cache", None)  # pickled when the step caches were the optimizer's own
        d.pop("_flat_cache", None)
        self.__dict__.update(d)
        self.__dict__["_lock"] = threading.Lock()
        self.__dict__["_stepper"] = Stepper(self._rule, d["_st"], STEP_HOOKS)

    @_exclusive
    def update(
        self,
        params: Mapping[str, Any],
        grads: Mapping[str, Any],
        *,
        grad_scale: Any = None,
        found_inf: Any = None,
        unscale_grads: bool = False,
    ) -> bool:
        """Update the arrays of ``params`` (dict name -> array) in place from ``grads``.

        State is created on the first call; later calls must pass the same names, shapes and
        dtypes. Every input is validated before anything is written. Returns True when the step
        was applied, False when ``nonfinite="skip"`` or ``found_inf`` skipped it.

        Loss scaling (what ``torch.amp.GradScaler`` hands a fused optimizer): ``grad_scale``
        (a number, or a 1-element array: host, or device on a GPU backend, read in the kernel)
        multiplies every grad by 1/scale inside the pass; ``unscale_grads=True`` also stores
        the unscaled grads. ``found_inf`` (a number or 1-element array) nonzero makes the step
        change nothing: params, state and step count.
        """
        return self._stepper.update(self, params, grads, grad_scale, found_inf, unscale_grads)

    @_exclusive
    def step(
        self,
        buf: FlatBuffer,
        *,
        grad_scale: Any = None,
        found_inf: Any = None,
        unscale_grads: bool = False,
    ) -> bool:
        """One fused step over a ``FlatBuffer``: one kernel call per dtype.

        Returns True when the step was applied, False when ``nonfinite="skip"`` or
        ``found_inf`` skipped it. The loss-scale keywords are ``update``'s.
        """
        return self._stepper.step(self, buf, grad_scale, found_inf, unscale_grads)

    @_exclusive
    def state_dict(self) -> dict[str, Any]:
        """Plain data: optimizer kind, step count, hyperparameters and per-parameter state
        (``{name: {state name: numpy array}}``, host copies shaped like the parameters, plus
        the rule's host state as 0-d float32 arrays, as torch keeps it)."""
        state = self._st.snapshot(self._current_host())
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

    def _check_state_dict(self, sd):
        """Check a state dict whole (kind, step, flags, hyperparameter values, then the state
        through ``OptimizerState.check_loaded``) and return what ``_commit_state_dict``
        applies; writes nothing."""
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
        loaded, hs = self._st.check_loaded(sd["state"], self._kinds(), self._spec, kind)
        return hp, int(step), loaded, hs

    def _commit_state_dict(self, hp, step, loaded, hs):
        """Apply a checked state dict (``_check_state_dict``): nothing here is refused."""
        self._st.load(loaded, hs)
        ds = self.__dict__.get("_dev")
        if self._st.bound and ds is not None and hs:  # a capturable optimizer's host state
            ds.set_host_state(hs)  # lives on the device
        for h in self._hyper:
            setattr(self, h, hp[h])
        self._hyper_ok = True  # validated by _check_state_dict
        self.step_count = step

    def __repr__(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hyperparams.items())
        extra = f", nonfinite={self.nonfinite!r}" if self.nonfinite is not None else ""
        extra += "".join(
            f", {k}={v!r}" for k, v in self._prec.items() if v != PRECISION_DEFAULTS[k]
        )
        return f"{type(self).__name__}({hp}, backend={self.backend!r}{extra})"


#: what a ``Stepper`` asks of the optimizer beyond its public settings (``fastopt._steps``)
STEP_HOOKS = StepHooks(
    hyperparams=Optimizer._step_hp,
    rule_hp=Optimizer._rule_hp,
    kinds=Optimizer._kinds,
    state_fill=Optimizer._state_fill,
    initial_host=Optimizer._initial_host,
    device=Optimizer._device_scalars,
    commit_count=Optimizer._commit_count,
)
