"""In-place functional entry points over flat arrays: one per optimizer.

Each function checks its inputs, computes the per-step scalars on the host (in float64, cast
once to the buffer dtype) and runs one fused pass of the optimizer's per-element rule
(``kernels/``) on the chosen backend, or the NumPy oracle (``fastopt.reference``) when the
backend is ``"numpy"``. ``step`` is the 1-based step count. Arrays are contiguous, of one
native-endian float dtype and one shape (n-D arrays are stepped as their flat views), updated in
place; optional state arrays are ``None`` when the variant does not use them.

The checks are the optimizer classes' (``fastopt._validate``), made before anything is written:
the param and every state buffer C-contiguous, writeable, of the param's shape and dtype; the
grad of that shape and dtype; a state the variant uses present (``amsgrad=True`` needs
``max_exp_avg_sq``, momentum a ``momentum_buffer``, ...); no written buffer sharing memory with
another input; every array where the backend runs; hyperparameters in range. A refused call
raises ``TypeError``/``ValueError`` and changes nothing.

The classes validate once per parameter and then only re-check what can change, so they launch
through ``Launch`` (the same scalars and kernels, without the per-call checks).
"""

import inspect

import numpy as np

from . import reference
from ._arrays import as_xp_array
from ._validate import (
    SUPPORTED_DTYPES,
    check_no_overlap,
    check_param_arrays,
    check_reach,
    check_step,
    dtype_of,
    is_array,
)
from .backends import resolve
from .kernels import RULES

__all__ = ["Launch", "plan", "run", *RULES]


def plan(rule, step, hp, hs=None):
    """``(flags, k)``: the compiled variant and the host scalars of one step of ``rule`` with
    the (already validated) hyperparameters ``hp`` and host state ``hs`` (the rule spec's
    ``flags_of`` and ``scalars_of``)."""
    return RULES[rule].plan(hp, step, hs)


class Launch:
    """One step of one rule on one backend: the variant and host scalars are computed once,
    then ``runner(dtype, writes)(param, grad, states)`` launches it on any number of flat
    arrays. Trusts its caller: the arrays must already have passed ``check_param_arrays``."""

    __slots__ = ("_runners", "be", "flags", "hp", "hs", "k", "rule", "step")

    def __init__(self, be, rule, step, hp, hs=None):
        spec = RULES[rule]
        if hs is None and spec.host_state:
            hs = spec.replay_host_state(hp, step)
        self.be, self.rule, self.step, self.hp, self.hs = be, rule, step, hp, hs
        self.flags, self.k = spec.plan(hp, step, hs)
        self._runners = {}

    def runner(self, dtype, writes):
        """``run(param, grad, states)`` for arrays of ``dtype`` whose present state slots are
        ``writes`` (one bool per slot of the rule)."""
        key = (dtype, writes)
        run = self._runners.get(key)
        if run is None:
            run = self._runners[key] = self._make(np.dtype(dtype), writes)
        return run

    def _make(self, dtype, writes):
        be, rule, flags, k = self.be, self.rule, self.flags, self.k
        spec = RULES[rule]
        if be.NAME == "numpy":
            oracle, names = getattr(reference, rule), spec.state
            # the oracle takes the hyperparameters that shape a step (not, say, the initial
            # accumulator value, which only shapes the state it is handed)
            takes = inspect.signature(oracle).parameters
            kw = {h: v for h, v in self.hp.items() if h in takes}
            kw["step"] = self.step
            hs = self.hs or {}

            def run(param, grad, states):
                st = {n: s for n, s in zip(names, states) if s is not None}
                # host state as the oracle keeps it (torch's 0-d tensors), this step's copy
                st.update({n: np.array(v, dtype=np.float32) for n, v in hs.items()})
                oracle(param, grad, st, **kw)
        elif hasattr(be, "prepare"):
            run = be.prepare(rule, flags, writes, k, dtype)
        else:

            def run(param, grad, states):
                be.launch(rule, flags, param, grad, tuple(states), k)

        used = spec.slots_used(flags)
        fresh = (
            [
                (j, spec.initial(s.name, self.hp))
                for j, s in enumerate(spec.slots)
                if s.fresh and writes[j] and used[j]
            ]
            if self.step == 1
            else []
        )
        if fresh:
            inner = run

            def run(param, grad, states):
                # a slot the rule reads on step 1, where torch has no such buffer yet: reset to
                # its initial value (0·NaN is NaN), whatever the caller's array held
                for j, value in fresh:
                    states[j][...] = value
                inner(param, grad, states)

        return run


# -- the checked public door ----------------------------------------------------------------------


def _array(a):
    """Host DLPack producers (PyTorch CPU tensors) as NumPy views; a torch tensor that requires
    grad is detached first (a view of the same memory). Device arrays go to the backend as they
    are (each GPU backend views them without a copy)."""
    if type(a) is np.ndarray or a is None:
        return a
    if type(a).__module__.startswith("torch") and hasattr(a, "detach"):
        a = a.detach()
    return a if is_array(a) else as_xp_array(a)


def _checked(rule, flags, backend, param, grad, states):
    """Validate one functional call; returns ``(be, param, grad, states)`` ready to launch."""
    who = f"fastopt.functional.{rule}()"
    param, grad = _array(param), _array(grad)
    states = {n: _array(a) for n, a in states.items()}
    be = resolve(backend, param if is_array(param) else None)
    spec = RULES[rule]
    for (name, a), slot, used in zip(states.items(), spec.slots, spec.slots_used(flags)):
        if used and a is None:
            why = "always" if slot.when is None else f"with {slot.when} on"
            raise ValueError(
                f"{who}: state {name!r} is required {why} "
                f"({', '.join(f'{k}={v}' for k, v in flags.items())}), got None"
            )
    supported = tuple(getattr(be, "DTYPES", SUPPORTED_DTYPES))
    _, entries = check_param_arrays(None, param, grad, states.items(), supported, who=who)
    check_reach(
        be, [(label, a) for label, a, _ in entries], "the arrays of one step", exc=TypeError
    )
    check_no_overlap(entries)
    if param.ndim != 1:  # validated: same shape, param and state contiguous (views, no copy)
        param, grad = param.reshape(-1), grad.reshape(-1)
        states = {n: None if a is None else a.reshape(-1) for n, a in states.items()}
    return be, param, grad, tuple(states.values())


def run(rule, param, grad, states, *, step, hp, backend="auto", host_state=None):
    """One checked, fused step of ``rule`` over flat arrays: ``states`` maps each of the rule's
    slots to its array (or None where the variant does not use it), ``hp`` holds every
    hyperparameter of the rule, ``host_state`` (rules with host state only) a dict of the
    rule's host scalars before this step, updated in place to their values after it (a 0-d
    array in it is written into), as torch's functional API advances ``mu_products`` or
    ``etas``; None: those of a run with these hyperparameters from step 1, nothing advanced."""
    spec = RULES[rule]
    step = check_step(step)
    missing = set(spec.hyper_names) - set(hp)
    if missing or set(hp) - set(spec.hyper_names):
        raise TypeError(
            f"fastopt.functional.{rule}(): hyperparameters {sorted(hp)}; expected "
            f"{list(spec.hyper_names)}"
        )
    if set(states) != set(spec.state):
        raise TypeError(
            f"fastopt.functional.{rule}(): state {sorted(states)}; expected {list(spec.state)}"
        )
    hp = spec.validate(hp)
    who = f"fastopt.functional.{rule}()"
    if host_state is None:
        hs = spec.replay_host_state(hp, step)
    elif not spec.host_state:
        raise TypeError(f"{who}: {rule} keeps no host state; got host_state={host_state!r}")
    else:
        hs = spec.check_host_state(host_state, who=f"{who}: host_state")
        _check_writable_host_state(host_state, who)
    flags, _ = spec.plan(hp, step, hs)
    be, param, grad, arrays = _checked(
        rule, flags, backend, param, grad, {s: states[s] for s in spec.state}
    )
    writes = tuple(a is not None for a in arrays)
    Launch(be, rule, step, hp, hs).runner(dtype_of(param), writes)(param, grad, arrays)
    if host_state is not None:
        for name, value in spec.advance_host_state(hp, step, hs).items():
            if isinstance(host_state[name], np.ndarray):
                host_state[name][...] = value
            else:
                host_state[name] = value


def _check_writable_host_state(host_state, who):
    """A ``host_state`` the step can advance in place: a mutable mapping whose 0-d arrays are
    writeable (checked before anything is written)."""
    if not callable(getattr(host_state, "__setitem__", None)):
        raise TypeError(
            f"{who}: host_state is a {type(host_state).__name__}; expected a dict (it is updated "
            "in place to the values after the step)"
        )
    for name, v in host_state.items():
        if isinstance(v, np.ndarray) and not v.flags.writeable:
            raise ValueError(f"{who}: host_state[{name!r}] is a read-only array")


def _entry(spec):
    """The named functional entry point of one rule, its signature read from the spec:
    ``name(param, grad, <slots>, *, step, <hyperparameters with torch's defaults>,
    backend="auto")``; optional slots default to None."""
    P = inspect.Parameter
    params = [P("param", P.POSITIONAL_OR_KEYWORD), P("grad", P.POSITIONAL_OR_KEYWORD)]
    params += [
        P(s.name, P.POSITIONAL_OR_KEYWORD, default=None if s.when else P.empty) for s in spec.slots
    ]
    params.append(P("step", P.KEYWORD_ONLY))
    params += [P(h.name, P.KEYWORD_ONLY, default=h.default) for h in spec.hyper]
    if spec.host_state:
        params.append(P("host_state", P.KEYWORD_ONLY, default=None))
    params.append(P("backend", P.KEYWORD_ONLY, default="auto"))
    sig = inspect.Signature(params)

    def entry(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(
                f"fastopt.functional.{spec.name}(): {exc}; signature: {spec.name}{sig}"
            ) from None
        bound.apply_defaults()
        a = bound.arguments
        run(
            spec.name,
            a["param"],
            a["grad"],
            {s: a[s] for s in spec.state},
            step=a["step"],
            hp={h: a[h] for h in spec.hyper_names},
            backend=a["backend"],
            host_state=a.get("host_state"),
        )

    entry.__name__ = entry.__qualname__ = spec.name
    entry.__signature__ = sig
    slots = ", ".join(f"``{s.name}``" + (f" (with {s.when})" if s.when else "") for s in spec.slots)
    host = ""
    if spec.host_state:
        names = ", ".join(f"``{n}``" for n in spec.host_names)
        host = (
            f" ``host_state``: a dict of the host state ({names}) before this step, updated "
            "in place to its values after it (None: that of a run with these "
            "hyperparameters from step 1)."
        )
    entry.__doc__ = (
        f"One fused in-place step of {spec.name} over flat arrays: the param, its "
        f"grad and the state {slots}; ``step`` counts from 1. Hyperparameters "
        f"and defaults are torch.optim's.{host} Every input is checked before anything "
        "is written."
    )
    return entry


globals().update({name: _entry(spec) for name, spec in RULES.items()})
