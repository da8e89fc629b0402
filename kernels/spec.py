"""The rule spec: everything fastopt knows about one optimizer's update, declared once.

Each ``kernels/<name>.py`` declares ``RULE = Rule(...)``:

- ``hyper``: the hyperparameters (``torch.optim``'s names), each with its default and domain,
  and whether it is fixed at construction (it decides a state slot or the math's form);
- ``slots``: the per-element state buffers (``torch.optim``'s state names), each with the flag
  whose variants keep it, its value before the first step and whether it is even in (p, g);
- ``make_rule(**flags)``: the per-element rule, ``rule(p, g, s0, .., s{k-1}, k) -> (p, s0, ..)``
  over scalars, one argument per slot (an absent slot's argument is a placeholder it never
  uses), ``k`` the host scalars as one tuple; its keyword arguments are the rule's flags, each
  combination a compiled variant;
- ``scalars``: the names of the host scalars in ``k``'s order (the CUDA C body takes them by
  these names, in this order);
- ``flags_of(hp, step, hs)``: the compiled variant of a step (a dict of the flags), from the
  hyperparameters, the step and the host state before it (RAdam's rectification switches on
  at a step, ASGD's averaging when its ``mu`` leaves 1): a flag is never a per-element branch on
  a value;
- ``scalars_of(hp, step, hs)``: the host scalars of a step, by name, in float64 (cast once to
  the buffer dtype by the backends);
- ``host_state``: per-optimizer scalars carried from step to step on the host (NAdam's
  ``mu_product``, ASGD's ``eta`` and ``mu``), each with its initial value (a number, or a
  hyperparameter's name), and ``advance(hp, step, hs)``, their values after step ``step``.
  ``torch.optim`` keeps them as 0-d tensors of its scalar dtype (float32 by default), so they
  are float32 values here too: every value is rounded to float32 (``f32``) when it is set, and
  an ``advance`` that multiplies two of them rounds the factor first, as torch's in-place
  arithmetic on a float32 tensor does (``f32(f32(a) * f32(b))``).

- ``class_name``: the name of its optimizer class (``fastopt.<class_name>``, generated from the
  spec with the rule module's docstring), and ``test_hp``: hyperparameters under which every
  term of the update shows within a few steps (the tests run with them).

The pieces several rules share are declared once, in ``kernels/shared.py``: the gradient
prologue (maximize, then L2 or decoupled weight decay: the per-element helper, its flags and
host scalars; ``kernels/shared.cuh`` for the CUDA C bodies), the Adam family's bias-corrected
scalars and the hyperparameters every rule spells alike. A per-element helper is plain Python
marked with ``helper``; ``Rule.element(flags, jit)`` is the rule with its helpers compiled by
``jit`` (a target that cannot call plain Python: numba-cuda).

The backends, the classes, ``fastopt.functional``, the benchmark's byte counts, the demo's list
and the tests' matrices read these fields; only the CUDA C body (``kernels/<name>.cu``) is
written beside the rule, and a test holds its signature to ``slots`` and ``scalars``.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import itertools
import math
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "DOMAINS",
    "HELPERS",
    "REPLAY_LIMIT",
    "Elem",
    "Hyper",
    "Rule",
    "Slot",
    "bind_helpers",
    "check_value",
    "f32",
    "helper",
    "maximum",
    "sqrt",
    "where",
]

#: the most host-state advances ``Rule.replay_host_state`` runs (a functional call at step ``t``
#: without ``host_state=`` replays ``t - 1`` of them, 3 to 25 us each: at most a quarter of a
#: second): past it, the host state must be passed (what torch's functional API asks for at
#: every step)
REPLAY_LIMIT = 10_000

#: a number the host computes with: a Python float, or (capturable steps) a symbol that
#: ``kernels.device_scalars`` records arithmetic on
Real = Any
#: hyperparameters by name (validated: Python floats, tuples of floats, bools)
Hyperparams = Mapping[str, Any]
#: host state by name (float32 values as Python floats, or recorded symbols)
HostState = Mapping[str, Real]
#: ``flags_of(hp, step, hs)``: the compiled variant of a step
FlagsOf = Callable[[Hyperparams, Real, HostState | None], dict[str, bool]]
#: ``scalars_of(hp, step, hs)``: the host scalars of a step by name
ScalarsOf = Callable[[Hyperparams, Real, HostState | None], Mapping[str, Real]]
#: ``advance(hp, step, hs)``: the host state after step ``step``
Advance = Callable[[Hyperparams, Real, dict[str, Real]], Mapping[str, Real]]
#: the per-element function of a variant: ``rule(p, g, s0, .., k) -> (p, s0, ..)``
Elem = Callable[..., tuple[Real, ...]]
#: ``make_rule(**flags)``: the per-element function of a variant
MakeRule = Callable[..., Elem]
#: ``check(hp)``: constraints between hyperparameters (raises ValueError)
Check = Callable[[dict[str, Any]], None]

#: hyperparameter domains: name -> (description, predicate on a normalised value)
DOMAINS: dict[str, tuple[str, Callable[[Any], bool] | None]] = {
    "nonneg": ("a real number >= 0", lambda v: v >= 0),
    "positive": ("a real number > 0", lambda v: v > 0),
    "unit": ("a real number in [0, 1)", lambda v: 0 <= v < 1),
    "closed_unit": ("a real number in [0, 1]", lambda v: 0 <= v <= 1),
    "real": ("a finite real number", lambda v: True),
    # as many betas as the hyperparameter's default has (Adam's pair, Adan's triple)
    "betas": ("a {n} ({names}) with 0 <= beta < 1", lambda v: all(0 <= b < 1 for b in v)),
    "etas": (
        "a pair (etaminus, etaplus) with 0 < etaminus < 1 < etaplus",
        lambda v: 0 < v[0] < 1 < v[1],
    ),
    "range": ("a pair (min, max) with 0 <= min <= max", lambda v: 0 <= v[0] <= v[1]),
    "bool": ("True or False", None),
}
#: the domains whose values are tuples of reals
TUPLES = ("betas", "etas", "range")


# -- the math ``scalars_of`` and ``advance`` may use --------------------------------------------
#
# Plain Python on numbers. Capturable steps compute the host scalars on the device from the step
# count and hyperparameters held there: ``kernels.device_scalars`` runs ``scalars_of`` once on
# symbols to record its arithmetic, so a branch on the step or a hyperparameter must be written
# with ``where`` (Python's ``if`` cannot be recorded), a root with ``sqrt``, a rounding to
# float32 (host state) with ``f32``.


def sqrt(x: Real) -> Real:
    """``math.sqrt`` (correctly rounded), recordable."""
    f = getattr(x, "__fastopt_sqrt__", None)
    return f() if f is not None else math.sqrt(x)


def where(cond: Any, a: Real, b: Real) -> Real:
    """``a if cond else b``, recordable."""
    f = getattr(cond, "__fastopt_where__", None)
    return f(a, b) if f is not None else (a if cond else b)


def maximum(a: Real, b: Real) -> Real:
    """``max(a, b)``, recordable."""
    return where(a >= b, a, b)


#: set by ``host_precision``: host state held in float64
_WIDE_HOST_STATE = contextvars.ContextVar("fastopt_wide_host_state", default=False)


@contextlib.contextmanager
def host_precision(wide: bool) -> Iterator[None]:
    """Within it, ``host_round`` rounds nothing when ``wide``: host state held in float64, as
    torch holds it for a float64 parameter whose state dict it loaded (its load policy casts
    0-d state to the parameter's dtype)."""
    token = _WIDE_HOST_STATE.set(bool(wide))
    try:
        yield
    finally:
        _WIDE_HOST_STATE.reset(token)


def f32(x: Real) -> Real:
    """``x`` rounded to float32 (torch's default scalar dtype: what ``torch.as_tensor`` of a
    Python float holds), as a Python float; recordable."""
    f = getattr(x, "__fastopt_f32__", None)
    if f is not None:
        return f()
    import numpy as np

    return float(np.float32(x))


def host_round(x: Real) -> Real:
    """``x`` rounded to the host state's dtype: float32 (``f32``) as torch creates it, nothing
    inside ``host_precision(True)`` (float64 host state, where torch's in-place arithmetic on
    it, NAdam's ``mu_product *= mu``, runs in float64); recordable."""
    if _WIDE_HOST_STATE.get() and getattr(x, "__fastopt_f32__", None) is None:
        return float(x)
    return f32(x)


# -- per-element helpers ------------------------------------------------------------------------
#
# A rule may call a helper (``kernels/shared.py``'s ``prologue``): plain Python like the rule,
# so the simulator, the tests and ``Rule.slots_read`` run it as it is. The Numba CPU backend
# registers every helper to be inlined where a rule calls it; numba-cuda cannot call plain
# Python from a device function, so it compiles a rule through ``Rule.element(flags, jit)``,
# whose helpers are device functions (``bind_helpers``).

#: the per-element helpers rules call, in declaration order
HELPERS: list[Callable[..., Any]] = []

_F = TypeVar("_F", bound=Callable[..., Any])


def helper(fn: _F) -> _F:
    """Declare ``fn`` a per-element rule helper (see above); returns ``fn``."""
    HELPERS.append(fn)
    return fn


def bind_helpers(fn: _F, jit: Callable[[Callable[..., Any]], Any]) -> _F:
    """``fn`` with every rule helper among the globals it calls replaced by ``jit`` of it (its
    own helpers bound first): a copy sharing ``fn``'s code and closure, over a copy of its
    globals. ``fn`` itself when it calls no helper."""
    glb = fn.__globals__
    names = [n for n in fn.__code__.co_names if any(glb.get(n) is h for h in HELPERS)]
    if not names:
        return fn
    glb = dict(glb, **{n: jit(bind_helpers(glb[n], jit)) for n in names})
    out = types.FunctionType(fn.__code__, glb, fn.__name__, fn.__defaults__, fn.__closure__)
    out.__qualname__, out.__kwdefaults__ = fn.__qualname__, fn.__kwdefaults__
    return out  # type: ignore[return-value]


def check_value(name: str, value: Any, domain: str, size: int = 2) -> Any:
    """``value`` normalised (Python float, tuple of floats or bool) and checked against
    ``domain`` (a tuple domain's values have ``size`` entries); raises TypeError/ValueError
    naming ``name`` and what was expected."""
    import numpy as np

    what, ok = DOMAINS[domain]
    if domain == "betas":
        names = ", ".join(f"beta{i}" for i in range(1, size + 1))
        what = what.format(n={2: "pair", 3: "triple"}.get(size, f"{size}-tuple"), names=names)
    if domain == "bool":
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"invalid {name}: {value!r}; expected True or False")
        return bool(value)

    def real(v: Any, label: str) -> float:
        if isinstance(v, (bool, np.bool_)) or not isinstance(
            v, (int, float, np.integer, np.floating)
        ):
            raise TypeError(
                f"invalid {label}: {v!r} is a {type(v).__name__}; expected a real number"
            )
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(
                f"invalid {label}: {v!r}; expected {what} (NaN and inf are not valid values)"
            )
        return f

    v: float | tuple[float, ...]
    if domain in TUPLES:
        if not isinstance(value, (tuple, list)) or len(value) != size:
            raise ValueError(f"invalid {name}: {value!r}; expected {what}")
        v = tuple(real(x, name) for x in value)
    else:
        v = real(value, name)
    assert ok is not None  # only "bool" has no predicate
    if not ok(v):
        raise ValueError(f"invalid {name}: {value!r}; expected {what}")
    return v


@dataclass(frozen=True)
class Hyper:
    """One hyperparameter: its name, its default (``torch.optim``'s), its domain (a key of
    ``DOMAINS``) and whether it is fixed once an optimizer is built."""

    name: str
    default: Any
    domain: str = "nonneg"
    fixed: bool = False
    #: a value that switches the rule to another variant or brings a term into play (tests and
    #: benchmarks sweep default and probe); None for a bool: its negation
    probe: Any = None
    #: keyword-only in the class's constructor (after ``*``), as torch's ``maximize`` is
    keyword_only: bool = False

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"hyperparameter {self.name}: unknown domain {self.domain!r}")
        if self.probe is None and self.domain == "bool":
            object.__setattr__(self, "probe", not self.default)
        if self.domain in ("etas", "range") and len(self.default) != 2:
            raise ValueError(f"hyperparameter {self.name}: a {self.domain} is a pair")

    @property
    def size(self) -> int:
        """How many reals the hyperparameter holds: 0 for a bool, a tuple's length, else 1."""
        if self.domain == "bool":
            return 0
        return len(self.default) if self.domain in TUPLES else 1

    @property
    def annotation(self) -> type | types.GenericAlias:
        """The constructor's type annotation of the hyperparameter."""
        if self.domain == "bool":
            return bool
        if self.domain in TUPLES:
            return types.GenericAlias(tuple, (float,) * self.size)
        return float

    def check(self, value: Any) -> Any:
        """``value`` normalised and checked against the domain (``check_value``)."""
        return check_value(self.name, value, self.domain, self.size or 2)


@dataclass(frozen=True)
class Slot:
    """One per-element state buffer: its name, the flag whose variants keep it (None: every
    variant) and its value before the first step (a number, or a hyperparameter's name)."""

    name: str
    when: str | None = None
    init: float | str = 0.0
    #: reset to ``init`` right before step 1 (the rule reads it on step 1, where torch has
    #: no such buffer yet: whatever a caller's array held must not leak into the result)
    fresh: bool = False
    #: an even function of (p, g): negating the param and every gradient leaves it unchanged
    #: (squares, magnitudes, step sizes); else it is odd (negated with them)
    even: bool = False
    #: may be stored quantized (``state_dtype="int8"``/``"float8_e4m3"``, ``kernels/quant.py``):
    #: a running moment. False for a copy of the param or of a gradient (ASGD's ``ax``, Adan's
    #: ``prev_grad``, Rprop's ``prev``) and for a multiplicative step size (Rprop's
    #: ``step_size``), where the rounding enters the update directly or compounds; such a slot
    #: is kept in float32 under a quantized policy
    quantize: bool = True

    @property
    def quant_map(self) -> str:
        """The quantization map of the slot: ``"unsigned"`` for an even slot (every even slot
        is a square, a magnitude or a maximum of them, never negative: held by
        ``tests/test_quant_reference.py`` over every rule), else ``"signed"``."""
        return "unsigned" if self.even else "signed"


@dataclass(frozen=True)
class Rule:
    """One optimizer rule (see the module docstring)."""

    name: str
    hyper: tuple[Hyper, ...]
    slots: tuple[Slot, ...]
    scalars: tuple[str, ...]
    make_rule: MakeRule
    flags_of: FlagsOf
    scalars_of: ScalarsOf
    #: per-optimizer host scalars carried between steps: ((name, initial value), ...), the
    #: initial value a number or a hyperparameter's name
    host_state: tuple[tuple[str, float | str], ...] = ()
    #: ``advance(hp, step, hs) -> hs``: the host state after step ``step`` (rules with host state)
    advance: Advance | None = None
    #: ``check(hp)``: constraints between hyperparameters (raise ValueError), or None
    check: Check | None = None
    #: the variants that are never launched, each as ((flag, value), ...) pairs that all hold
    #: (e.g. nesterov without momentum)
    excluded: tuple[tuple[tuple[str, bool], ...], ...] = field(default=())
    #: the optimizer class's name (``fastopt.<class_name>``), generated from this spec
    class_name: str | None = None
    #: hyperparameters under which every term of the update shows within a few steps (lr large
    #: enough to move p, betas small enough that the moments change); the tests run with them
    test_hp: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    #: ``device_flags(hp) -> flags``: for a rule whose ``flags_of`` depends on the step, the one
    #: variant a device runs at every step, its host scalars selecting the terms per step
    #: (``where``: RAdam's rectification); None where there is none. Only the callers that
    #: launch it ask for it (``device_scalars.trace(..., select=True)``)
    device_flags: Callable[[Mapping[str, Any]], dict[str, bool]] | None = field(
        default=None, hash=False, compare=False
    )

    def __post_init__(self) -> None:
        flags = self.flags
        for s in self.slots:
            if s.when is not None and s.when not in flags:
                raise ValueError(
                    f"rule {self.name}: slot {s.name} is kept by flag {s.when!r}, "
                    f"which is not one of its flags {flags}"
                )
        nargs = len(inspect.signature(self.make_rule(**dict.fromkeys(flags, False))).parameters)
        if nargs != 3 + len(self.slots):
            raise ValueError(
                f"rule {self.name}: the per-element rule takes {nargs} arguments; "
                f"expected p, g, one per slot {self.state} and k"
            )

    # -- derived names -----------------------------------------------------------------------
    @property
    def flags(self) -> tuple[str, ...]:
        """The compiled-variant flags: ``make_rule``'s keyword arguments, in order."""
        return tuple(inspect.signature(self.make_rule).parameters)

    @property
    def state(self) -> tuple[str, ...]:
        """Every slot name, in the rule's argument order."""
        return tuple(s.name for s in self.slots)

    @property
    def hyper_names(self) -> tuple[str, ...]:
        """Every hyperparameter's name, in declaration order."""
        return tuple(h.name for h in self.hyper)

    @property
    def defaults(self) -> dict[str, Any]:
        """Every hyperparameter's default, by name."""
        return {h.name: h.default for h in self.hyper}

    def hyper_spec(self, name: str) -> Hyper:
        """The ``Hyper`` called ``name``."""
        for h in self.hyper:
            if h.name == name:
                return h
        raise KeyError(f"rule {self.name} has no hyperparameter {name!r}")

    def slot(self, name: str) -> Slot:
        """The ``Slot`` called ``name``."""
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(f"rule {self.name} has no state slot {name!r}")

    def element(
        self, flags: Mapping[str, bool], jit: Callable[[Callable[..., Any]], Any] | None = None
    ) -> Callable[..., Any]:
        """The per-element function of the ``flags`` variant (``make_rule(**flags)``); with
        ``jit``, the rule helpers it calls compiled by ``jit`` first (``bind_helpers``)."""
        elem = self.make_rule(**flags)
        return elem if jit is None else bind_helpers(elem, jit)

    # -- variants and slots ------------------------------------------------------------------
    def variants(self) -> list[dict[str, bool]]:
        """Every flag combination that can be launched (dicts, in ``flags`` order)."""
        out = []
        for bits in itertools.product((False, True), repeat=len(self.flags)):
            flags = dict(zip(self.flags, bits))
            if not any(all(flags[k] == v for k, v in ex) for ex in self.excluded):
                out.append(flags)
        return out

    def slots_used(self, flags: Mapping[str, bool]) -> tuple[bool, ...]:
        """One bool per slot: does the ``flags`` variant read and write it?"""
        return tuple(s.when is None or bool(flags.get(s.when, False)) for s in self.slots)

    def slots_read(self, flags: Mapping[str, bool]) -> tuple[bool, ...]:
        """One bool per slot: does the ``flags`` variant read the slot's value from before the
        step, rather than only overwrite it (ASGD's ``ax`` while it does not average: ``ax =
        p``)? Derived from the rule itself, run in plain Python on probe values: a slot is read
        when some output changes with its input (or the rule raises on one, as a root of a
        negative value does). A read the probes cannot reach would have to hide behind a
        comparison with a value none of them crosses. The scalars run in increasing and in
        decreasing order, so that a device variant selecting by a comparison of two scalars
        (``device_flags``) shows the reads of both its terms, as its kernel loads them. The
        benchmark's byte counts use it."""
        rule = self.make_rule(**flags)
        up = tuple(0.1 + 0.07 * i for i in range(len(self.scalars)))
        probes = (-2.0, 1e-3, 3.0, 1e30, -1e30, math.nan, math.inf)

        def outputs(args: list[float], k: tuple[float, ...]) -> tuple[str, ...] | None:
            try:
                return tuple(repr(float(x)) for x in rule(*args, k))
            except (ArithmeticError, ValueError):
                return None

        def reads(j: int) -> bool:
            for k in (up, up[::-1]):
                for p, g in ((0.75, 0.5), (-0.75, -0.5)):
                    base = [p, g] + [0.25] * len(self.slots)
                    ref = outputs(base, k)
                    for v in probes:
                        if outputs(base[: 2 + j] + [v] + base[3 + j :], k) != ref:
                            return True
            return False

        return tuple(u and reads(j) for j, u in enumerate(self.slots_used(flags)))

    def state_names(self, hp: Hyperparams) -> tuple[str, ...]:
        """The slots an optimizer with hyperparameters ``hp`` keeps (the step-1 variant's)."""
        flags = self.flags_of(hp, 1, self.initial_host_state(hp))
        return tuple(s.name for s, u in zip(self.slots, self.slots_used(flags)) if u)

    def initial(self, slot: str, hp: Hyperparams) -> float:
        """A slot's value before the first step, from ``hp`` where it names a hyperparameter."""
        s = next(x for x in self.slots if x.name == slot)
        return float(hp[s.init]) if isinstance(s.init, str) else float(s.init)

    @property
    def host_names(self) -> tuple[str, ...]:
        """The names of the host state, in declaration order (torch's state names)."""
        return tuple(n for n, _ in self.host_state)

    def initial_host_state(self, hp: Hyperparams) -> dict[str, Real]:
        """The host state before step 1 (float32 values, from ``hp`` where one names a
        hyperparameter); ``{}`` for a rule without host state."""
        return {n: f32(hp[v] if isinstance(v, str) else v) for n, v in self.host_state}

    def advance_host_state(self, hp: Hyperparams, step: Real, hs: HostState) -> dict[str, Real]:
        """The host state after step ``step``: ``advance``, rounded to the host state's dtype
        (``host_round``). A value that cannot be computed (``ASGD(lambd=1e6, alpha=100)``:
        ``(1 + lambd·lr·t)^alpha`` overflows) is a ``ValueError`` (``_arithmetic``)."""
        if not self.host_state:
            return {}
        assert self.advance is not None, f"rule {self.name} has host state but no advance"
        try:
            out = self.advance(hp, step, dict(hs))
            return {n: host_round(out[n]) for n in self.host_names}
        except (ArithmeticError, ValueError) as exc:
            raise _arithmetic_error(self.name, "the host state after", step, exc) from exc

    def check_host_state(self, hs: Any, who: str = "host_state") -> dict[str, float]:
        """``hs`` (a mapping of every host-state name to a finite real, a NumPy scalar or a
        0-d array) as a dict of float32 values; raises TypeError/ValueError naming what is
        wrong."""
        import numpy as np

        names = self.host_names
        if not hasattr(hs, "keys") or set(hs.keys()) != set(names):
            got = sorted(hs.keys()) if hasattr(hs, "keys") else type(hs).__name__
            raise TypeError(f"{who}: got {got}; expected a dict with the keys {list(names)}")
        out: dict[str, float] = {}
        for n in names:
            v = hs[n]
            if isinstance(v, np.ndarray):
                if v.shape != () or v.dtype.kind != "f":
                    raise ValueError(
                        f"{who}[{n!r}] is a {v.dtype.name} array of shape {v.shape}; expected "
                        "a real number or a 0-d float array"
                    )
                v = v[()]
            out[n] = f32(check_value(f"{who}[{n!r}]", v, "real"))
        return out

    # -- one step ----------------------------------------------------------------------------
    def variant_and_scalars(
        self, hp: Hyperparams, step: Real, hs: HostState | None = None
    ) -> tuple[dict[str, bool], tuple[float, ...]]:
        """``(flags, k)``: the variant and the host scalars (a tuple in ``scalars`` order) of
        step ``step`` with the validated hyperparameters ``hp`` and host state ``hs``. A value
        that cannot be computed (a step count too large for a float: ``beta2**step`` of step
        ``10**400``; an overflow) is a ``ValueError`` naming the rule and the step: the callers
        plan a step before they write anything."""
        if hs is None and self.host_state:
            hs = self.replay_host_state(hp, step)
        try:
            values = self.scalars_of(hp, step, hs)
            return self.flags_of(hp, step, hs), tuple(float(values[n]) for n in self.scalars)
        except (ArithmeticError, ValueError) as exc:
            raise _arithmetic_error(self.name, "the host scalars of", step, exc) from exc

    def replay_host_state(self, hp: Hyperparams, step: int) -> dict[str, Real]:
        """The host state before step ``step`` of a run with constant ``hp`` (what a
        functional call without an explicit host state assumes): ``step - 1`` advances from the
        initial values, at most ``REPLAY_LIMIT`` of them — past that, at once when ``advance``
        reads no host state (ASGD's ``eta`` and ``mu`` are functions of the step alone:
        ``reads_host_state``), else a ``ValueError`` asking for ``host_state=`` (NAdam's
        ``mu_product`` is a running product rounded to float32 at every step: no closed
        form gives the same bits)."""
        hs = self.initial_host_state(hp)
        if step - 1 > REPLAY_LIMIT:
            if self.reads_host_state(hp, step - 1):
                raise ValueError(
                    f"{self.name}: step {step} without host_state would replay {step - 1} "
                    f"host-state advances from step 1 (more than {REPLAY_LIMIT}); pass "
                    f"host_state= ({', '.join(self.host_names)} before this step: the "
                    "optimizer's host_state, or torch's state)"
                )
            return self.advance_host_state(hp, step - 1, hs)
        for t in range(1, step):
            hs = self.advance_host_state(hp, t, hs)
        return hs

    def reads_host_state(self, hp: Hyperparams, step: int) -> bool:
        """Does ``advance`` at ``step`` (and at step 1) read the host state it is given? Derived
        as ``slots_read`` is, from running it: on the initial host state and on other values;
        any output that differs is a read."""
        base = self.initial_host_state(hp)
        other = {n: f32(0.5 * v + 0.25) for n, v in base.items()}
        if other == base:
            other = {n: f32(v + 1.0) for n, v in base.items()}
        advance = self.advance
        if advance is None:
            return False
        try:
            return any(advance(hp, t, dict(base)) != advance(hp, t, dict(other)) for t in {1, step})
        except (ArithmeticError, ValueError) as exc:
            raise _arithmetic_error(self.name, "the host state after", step, exc) from exc

    def validate(self, hp: Hyperparams) -> dict[str, Any]:
        """``hp`` (any subset of the rule's hyperparameters) normalised and checked."""
        out: dict[str, Any] = {}
        for name, value in hp.items():
            out[name] = self.hyper_spec(name).check(value)
        if self.check is not None:
            self.check(out)
        return out


def _arithmetic_error(name: str, what: str, step: Real, exc: BaseException) -> ValueError:
    """The ``ValueError`` of host arithmetic that failed (an ``ArithmeticError``: an overflow,
    a division by zero, an integer too large for a float; or a math domain error), naming the
    rule, what was computed and the step."""
    at = step if abs(step) < 10**30 else f"{str(step)[:6]}... ({len(str(step))} digits)"
    return ValueError(
        f"{name}: {what} step {at} cannot be computed with these hyperparameters "
        f"({type(exc).__name__}: {exc})"
    )
