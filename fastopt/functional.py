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

Mixed precision (``fastopt.precision``): the param may be float16, bfloat16, float32 or
float64, the grad in the param dtype or float32, the state buffers (all in one dtype) in the
param dtype, float32 or bfloat16; ``master_param=`` (an fp32 array) keeps the master copy of a
16-bit param, or ``master_remainder=`` (an int16 array) the low half of a bfloat16 param's fp32
master (the param its high half, ``fastopt.precision.split_master``);
``stochastic_rounding=True`` (with ``seed=``, ``salt=``) rounds a bfloat16 param stochastically.
Loss scaling: ``grad_scale=`` (a number, or a 1-element array: host, or device for the GPU
backends, read in the kernel) multiplies the grad by 1/scale inside the pass
(``unscale_grads=True`` also stores the unscaled grad); ``found_inf=`` (a number or 1-element
array) nonzero makes the call change nothing. Each entry point returns True when the step was
applied, False when ``found_inf`` skipped it.

The classes validate once per parameter and then only re-check what can change, so they launch
through ``StepPlan`` (the same scalars and kernels, without the per-call checks).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from . import precision
from ._arrays import as_xp_array, check_torch_storage
from ._validate import (
    SUPPORTED_DTYPES,
    check_no_overlap,
    check_param_arrays,
    check_reach,
    check_step,
    check_writable,
    describe,
    dtype_of,
    is_array,
    residence,
)
from .backends import resolve
from .backends.protocol import step_runner_of
from .kernels import RULES, storage

__all__ = ["Launch", "StepPlan", "plan", "run", "variant_and_scalars", *RULES]


def variant_and_scalars(
    rule: str, step: int, hp: Mapping[str, Any], hs: Mapping[str, float] | None = None
) -> tuple[dict[str, bool], tuple[Any, ...]]:
    """``(flags, k)``: the compiled variant and the host scalars of one step of ``rule`` with
    the (already validated) hyperparameters ``hp`` and host state ``hs`` (the rule spec's
    ``flags_of`` and ``scalars_of``: ``Rule.variant_and_scalars``)."""
    return RULES[rule].variant_and_scalars(hp, step, hs)


#: the older name of ``variant_and_scalars``, kept for callers written against it
plan = variant_and_scalars


class StepPlan:
    """One step of one rule on one backend, planned before anything is written: the variant
    and host scalars (``Rule.variant_and_scalars``) and the host state after the step
    (``hs_after``, ``Rule.advance_host_state``; not for a step whose host state lives on the
    device), so that a value that cannot be computed (an overflow, a step too large for a float) is
    a ``ValueError`` with nothing changed. ``runner(dtype, writes, io)`` then gives the
    ``run(param, grad, states, master, salt)`` that launches the step on any number of flat
    arrays of one dtype and storage format: the backend's ``step_runner`` (the one protocol of
    ``fastopt.backends.protocol``), cached per ``(dtype, writes, io)``. Trusts its caller: the
    arrays must already have passed ``check_param_arrays``.

    ``io`` (``kernels.storage.IO``, None: every array in ``dtype``) is a launch's storage format;
    ``inv_scale`` the host value of 1/grad_scale (``io.scale == "host"``), ``scale`` the device
    array holding grad_scale (``io.scale == "device"``), ``seed`` the stochastic rounding seed
    (the step's hash key follows from it and the step)."""

    __slots__ = (
        "_runners",
        "be",
        "device",
        "flags",
        "found_inf",
        "hp",
        "hs",
        "hs_after",
        "inv_scale",
        "k",
        "key",
        "rule",
        "scale",
        "step",
    )

    def __init__(
        self,
        be: Any,
        rule: str,
        step: int,
        hp: Mapping[str, Any],
        hs: Mapping[str, float] | None = None,
        *,
        inv_scale: float | None = None,
        scale: str | None = None,
        seed: int = 0,
        device: Any = None,
        found_inf: Any = None,
    ) -> None:
        spec = RULES[rule]
        if hs is None and spec.host_state:
            hs = spec.replay_host_state(hp, step)
        self.be, self.rule, self.step, self.hp, self.hs = be, rule, step, hp, hs
        self.flags, self.k = spec.variant_and_scalars(hp, step, hs)
        self.hs_after: dict[str, Any] | None = (
            spec.advance_host_state(hp, step, hs)
            if hs and device is None
            else (None if hs is None else dict(hs))
        )
        self.inv_scale, self.scale = inv_scale, scale
        self.key = storage.step_key(int(seed), step)
        # a capturable step: the scalars in device memory (fastopt._capture.DeviceScalars)
        self.device, self.found_inf = device, found_inf
        self._runners: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def runner(self, dtype: Any, writes: tuple[bool, ...], io: Any = None) -> Callable[..., Any]:
        """``run(param, grad, states, master=None, salt=0)`` for arrays of ``dtype`` whose
        present state slots are ``writes`` (one bool per slot of the rule), stored as ``io``
        says."""
        if io is not None and io.plain:
            io = None
        key = (dtype, writes, io)
        run = self._runners.get(key)
        if run is None:
            run = self._runners[key] = self._make(np.dtype(dtype), writes, io)
        return run

    def _make(self, dtype, writes, io):
        run = step_runner_of(self.be)(self, dtype, writes, io)
        return self._with_fresh_slots(writes, run, io)

    def _with_fresh_slots(self, writes, run, io=None):
        """``run``, first resetting the slots a first step reads where torch creates the
        buffer fresh (``Slot.fresh``)."""
        spec = RULES[self.rule]
        used = spec.slots_used(self.flags)
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

            def run(param, grad, states, master=None, salt=0):
                # a slot the rule reads on step 1, where torch has no such buffer yet: reset to
                # its initial value (0·NaN is NaN), whatever the caller's array held
                for j, value in fresh:
                    if isinstance(states[j], tuple):  # a quantized slot: (codes, absmax, ..)
                        from ._quantized import constant

                        code, amax = constant(value, io.quant, spec.slots[j].quant_map)
                        states[j][0][...] = code
                        states[j][1][...] = amax
                    else:
                        states[j][...] = value
                inner(param, grad, states, master, salt)

        return run


#: the older name of ``StepPlan``, kept for callers written against it
Launch = StepPlan


# -- loss scaling ----------------------------------------------------------------------------------


def loss_scale(grad_scale: Any, what: str = "grad_scale") -> tuple[str | None, float | None, Any]:
    """``(io.scale, inv_scale, device array)`` of a ``grad_scale=`` argument: None (no
    scaling); a positive finite number or 1-element host array (1/scale computed once, in
    float64, here); a 1-element device array (read in the kernel: no host synchronisation)."""
    if grad_scale is None:
        return None, None, None
    a = _array(grad_scale) if not isinstance(grad_scale, (int, float, np.number)) else None
    if a is not None and is_array(a):
        if a.size != 1 or not precision.kind(dtype_of(a)):
            raise ValueError(
                f"invalid {what}: {describe(a)}; expected a number or a 1-element float array"
            )
        if residence(a) == "device":
            return "device", None, a.reshape(1)
        grad_scale = a.reshape(-1)[0]
    if isinstance(grad_scale, (bool, np.bool_)) or not isinstance(
        grad_scale, (int, float, np.number)
    ):
        raise TypeError(
            f"invalid {what}: {grad_scale!r} is a {type(grad_scale).__name__}; expected a "
            "number or a 1-element array"
        )
    v = float(grad_scale)
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"invalid {what}: {v!r}; expected a finite number > 0")
    inv = 1.0 / v
    if not np.isfinite(inv):  # a subnormal scale: 1/scale overflows
        raise ValueError(
            f"invalid {what}: {v!r}; its reciprocal overflows to inf (expected a scale > 5.6e-309)"
        )
    return "host", inv, None


def device_flag(found_inf: Any) -> Any:
    """A ``found_inf=`` given as a 1-element float32 device array, as that array (read in the
    kernels of a capturable step); None for anything else."""
    if found_inf is None or isinstance(found_inf, (bool, int, float, np.number)):
        return None
    a = _array(found_inf)
    if is_array(a) and residence(a) == "device" and a.size == 1 and dtype_of(a) == np.float32:
        return a.reshape(1)
    return None


def found(found_inf: Any) -> bool:
    """True when a ``found_inf=`` argument (None, a number, a 1-element host or device array)
    says the gradients hold a non-finite value. A device array is read here: one host
    synchronisation (capturable optimizers read it in the kernel instead)."""
    if found_inf is None:
        return False
    if isinstance(found_inf, (bool, int, float, np.number)):
        return float(found_inf) != 0
    a = _array(found_inf)
    if not is_array(a) or a.size != 1:
        raise ValueError(
            f"invalid found_inf: {describe(a) if is_array(a) else repr(found_inf)}; expected "
            "a number or a 1-element array"
        )
    if residence(a) == "device":
        import cupy

        return bool(cupy.asnumpy(cupy.asarray(a)).reshape(-1)[0] != 0)
    return bool(np.asarray(a).reshape(-1)[0] != 0)


# -- the checked public door ----------------------------------------------------------------------


def _array(a, label=None):
    """Host DLPack producers (PyTorch CPU tensors) as NumPy views; a torch tensor that requires
    grad is detached first (a view of the same memory), once its storage is found to hold what
    it spans; an ndarray subclass as a plain ndarray view (a masked array refused:
    ``as_xp_array``). Device arrays go to the backend as they are (each GPU backend views them
    without a copy)."""
    if type(a) is np.ndarray or a is None:
        return a  # its memory is checked with the rest (check_param_arrays)
    if isinstance(a, np.ndarray):
        return as_xp_array(a, label)
    if type(a).__module__.startswith("torch") and hasattr(a, "detach"):
        check_torch_storage(a, label)
        a = a.detach()
    return a if is_array(a) else as_xp_array(a, label)


def _checked(
    rule,
    flags,
    backend,
    param,
    grad,
    states,
    master=None,
    grad_written=False,
    quant=None,
    remainder=None,
):
    """Validate one functional call; returns ``(be, param, grad, states, master, io)`` ready to
    launch (``io`` from the arrays' storage dtypes). With ``quant`` (``state_dtype="int8"`` /
    ``"float8_e4m3"``), a present slot the rule lets be quantized is a pair ``(codes,
    absmax)`` (``fastopt._quantized.check_pair``), the others float32 arrays."""
    who = f"fastopt.functional.{rule}()"
    param, grad = _array(param, f"param of {who}"), _array(grad, f"grad of {who}")
    master = _array(master, f"master_param of {who}")
    remainder = _array(remainder, f"master_remainder of {who}")
    pairs = {}
    if quant is not None:
        for s in RULES[rule].slots:
            a = states[s.name]
            if s.quantize and a is not None:
                if not isinstance(a, (tuple, list)) or len(a) != 2:
                    raise TypeError(
                        f"{who}: state {s.name!r} is a {type(a).__name__}; with "
                        f"state_dtype={quant!r} it is a pair (codes, absmax)"
                    )
                pairs[s.name] = tuple(_array(x, f"state {s.name!r} of {who}") for x in a)
        states = {n: None if n in pairs else a for n, a in states.items()}
    states = {n: _array(a, f"state {n!r} of {who}") for n, a in states.items()}
    be = resolve(backend, param if is_array(param) else None)
    spec = RULES[rule]
    for (name, a), slot, used in zip(states.items(), spec.slots, spec.slots_used(flags)):
        if used and a is None and name not in pairs:
            why = "always" if slot.when is None else f"with {slot.when} on"
            raise ValueError(
                f"{who}: state {name!r} is required {why} "
                f"({', '.join(f'{k}={v}' for k, v in flags.items())}), got None"
            )
    supported = tuple(getattr(be, "DTYPES", SUPPORTED_DTYPES))
    present = [a for a in states.values() if is_array(a)]
    state_dtype = dtype_of(present[0]) if present else None
    if quant is not None:
        state_dtype = np.dtype(np.float32)  # the slots kept in full precision
    pk = precision.kind(dtype_of(param)) if is_array(param) else None
    if state_dtype is not None and pk is not None:
        sk = precision.kind(state_dtype)
        if sk not in precision.state_kinds(pk):
            raise ValueError(
                f"{who}: the state is {describe(present[0])} but the param is "
                f"{describe(param)}; a {pk} param keeps its state in "
                f"{' or '.join(precision.state_kinds(pk))}"
            )
    _, entries = check_param_arrays(
        None,
        param,
        grad,
        states.items(),
        supported,
        who=who,
        state_dtype=state_dtype,
        grad_written=grad_written,
    )
    if master is not None:
        if pk not in storage.BITS16:
            raise ValueError(
                f"{who}: master_param is for float16/bfloat16 params; the param is "
                f"{describe(param)}"
            )
        if (
            not is_array(master)
            or tuple(master.shape) != tuple(param.shape)
            or dtype_of(master) != np.float32
        ):
            raise ValueError(
                f"{who}: master_param is {describe(master)}; expected "
                f"float32{list(param.shape)}, the fp32 copy of the param"
            )
        check_writable(None, "master_param", master, who)
        entries.append((f"master_param of {who}", master, True))
    if remainder is not None:
        if master is not None:
            raise ValueError(
                f"{who}: master_param and master_remainder are two forms of one master; pass one"
            )
        if pk != "bfloat16":
            precision.check_remainder_param(pk or "", f"{who}: master_remainder")
            raise ValueError(
                f"{who}: master_remainder is the low half of a bfloat16 param's fp32 master; the "
                f"param is {describe(param)}"
            )
        if (
            not is_array(remainder)
            or tuple(remainder.shape) != tuple(param.shape)
            or dtype_of(remainder) != np.int16
        ):
            raise ValueError(
                f"{who}: master_remainder is {describe(remainder)}; expected "
                f"int16{list(param.shape)}, the low half of the param's fp32 master"
            )
        check_writable(None, "master_remainder", remainder, who)
        entries.append((f"master_remainder of {who}", remainder, True))
    if pairs:
        from ._quantized import check_backend, check_pair

        check_backend(be, quant)

        if pk not in ("float32", *storage.BITS16):
            raise TypeError(
                f"{who}: state_dtype={quant!r} is for float32, float16 and bfloat16 params; the "
                f"param is {describe(param)}"
            )
        for name, pair in pairs.items():
            entries += check_pair(pair, param, f"state {name!r}", who, quant)
    check_reach(
        be, [(label, a) for label, a, _ in entries], "the arrays of one step", exc=TypeError
    )
    check_no_overlap(entries)
    if param.ndim != 1:  # validated: same shape, param and state contiguous (views, no copy)
        param, grad = param.reshape(-1), grad.reshape(-1)
        states = {n: None if a is None else a.reshape(-1) for n, a in states.items()}
        master = None if master is None else master.reshape(-1)
        remainder = None if remainder is None else remainder.reshape(-1)
    gk = precision.kind(dtype_of(grad))
    sk = precision.kind(state_dtype) if state_dtype is not None else pk
    io = storage.IO(
        pk,
        gk,
        sk,
        master=master is not None or remainder is not None,
        remainder=remainder is not None,
        quant=quant if pairs else None,
    )
    master = remainder if remainder is not None else master
    flat = {
        n: (pairs[n][0].reshape(-1), pairs[n][1]) if n in pairs else a for n, a in states.items()
    }
    return be, param, grad, tuple(flat.values()), master, io


def run(
    rule: str,
    param: Any,
    grad: Any,
    states: Mapping[str, Any],
    *,
    step: int,
    hp: Mapping[str, Any],
    backend: str = "auto",
    host_state: dict[str, Any] | None = None,
    master_param: Any = None,
    master_remainder: Any = None,
    stochastic_rounding: bool = False,
    seed: int = 0,
    salt: int = 0,
    grad_scale: Any = None,
    found_inf: Any = None,
    unscale_grads: bool = False,
    state_dtype: str | None = None,
) -> bool:
    """One checked, fused step of ``rule`` over flat arrays: ``states`` maps each of the rule's
    slots to its array (or None where the variant does not use it), ``hp`` holds every
    hyperparameter of the rule, ``host_state`` (rules with host state only) a dict of the
    rule's host scalars before this step, updated in place to their values after it (a 0-d
    array in it is written into), as torch's functional API advances ``mu_products`` or
    ``etas``; None: those of a run with these hyperparameters from step 1, nothing advanced.
    The mixed-precision and loss-scale keywords are the module docstring's. Returns False
    when ``found_inf`` skipped the step (nothing was changed, the host state included), else
    True."""
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
    quant = _check_quant(state_dtype)
    sr = _check_bool("stochastic_rounding", stochastic_rounding)
    unscale_grads = _check_bool("unscale_grads", unscale_grads)
    seed, salt = _check_u32("seed", seed), _check_u32("salt", salt)
    scale, inv_scale, scale_dev = loss_scale(grad_scale)
    if unscale_grads and scale is None:
        raise ValueError("unscale_grads=True needs a grad_scale (there is nothing to unscale)")
    flags, _ = spec.variant_and_scalars(hp, step, hs)
    be, param, grad, arrays, master, io = _checked(
        rule,
        flags,
        backend,
        param,
        grad,
        {s: states[s] for s in spec.state},
        master_param,
        grad_written=unscale_grads,
        quant=quant,
        remainder=master_remainder,
    )
    if sr and (io.param != "bfloat16" or io.master):
        raise ValueError(
            "stochastic_rounding=True rounds bfloat16 params without a master copy; the "
            f"param is {io.param}" + (" with a master" if io.master else "")
        )
    if scale_dev is not None:
        check_reach(be, [("grad_scale", scale_dev), ("param", param)], "grad_scale and the params")
    io = precision.io_of(
        io.param,
        io.grad,
        io.state,
        "remainder" if io.remainder else io.master,
        sr,
        scale=scale,
        write_grad=unscale_grads,
        quant=io.quant,
    )
    if found(found_inf):
        return False
    writes = tuple(a is not None for a in arrays)
    # the whole plan (variant, scalars, host state after the step) before the one write
    planned = StepPlan(be, rule, step, hp, hs, inv_scale=inv_scale, scale=scale_dev, seed=seed)
    planned.runner(dtype_of(param), writes, io)(param, grad, arrays, master, salt)
    if host_state is not None and planned.hs_after is not None:
        for name, value in planned.hs_after.items():
            if isinstance(host_state[name], np.ndarray):
                host_state[name][...] = value
            else:
                host_state[name] = value
    return True


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


def _check_quant(value):
    """``state_dtype=`` of a functional call: None (the state arrays' own dtype) or a quantized
    format (``kernels.quant.ALL_FORMATS``)."""
    if value is None:
        return None
    if not isinstance(value, str) or value not in _quant_formats():
        raise ValueError(
            f"invalid state_dtype={value!r}; expected None (the state arrays' dtype) or one of "
            f"{list(_quant_formats())} (quantized slots given as (codes, absmax) pairs)"
        )
    return value


def _quant_formats() -> tuple[str, ...]:
    """The quantized state formats (``kernels.quant.ALL_FORMATS``)."""
    from .kernels import quant

    return quant.ALL_FORMATS


def _check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"invalid {name}: {value!r}; expected True or False")
    return bool(value)


def _check_u32(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"invalid {name}: {value!r}; expected an integer in [0, 2**32)")
    if not 0 <= int(value) < 1 << 32:
        raise ValueError(f"invalid {name}: {value!r}; expected an integer in [0, 2**32)")
    return int(value)


#: the mixed-precision and loss-scale keywords of every entry point, with their defaults
_MIXED_KW = {
    "master_param": None,
    "master_remainder": None,
    "stochastic_rounding": False,
    "seed": 0,
    "salt": 0,
    "grad_scale": None,
    "found_inf": None,
    "unscale_grads": False,
    "state_dtype": None,
}


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
    params += [P(n, P.KEYWORD_ONLY, default=d) for n, d in _MIXED_KW.items()]
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
        return run(
            spec.name,
            a["param"],
            a["grad"],
            {s: a[s] for s in spec.state},
            step=a["step"],
            hp={h: a[h] for h in spec.hyper_names},
            backend=a["backend"],
            host_state=a.get("host_state"),
            **{n: a[n] for n in _MIXED_KW},
        )

    entry.__name__ = entry.__qualname__ = spec.name
    entry.__signature__ = sig  # type: ignore[attr-defined]
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
        "is written. Mixed precision and loss scaling: see fastopt.functional. Returns "
        "False when found_inf skipped the step, else True."
    )
    return entry


globals().update({name: _entry(spec) for name, spec in RULES.items()})
