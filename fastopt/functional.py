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
import math

import numpy as np

from . import reference
from ._arrays import as_xp_array
from ._validate import (
    SUPPORTED_DTYPES,
    check_hyperparams,
    check_no_overlap,
    check_param_arrays,
    check_reach,
    check_step,
    dtype_of,
    is_array,
)
from .backends import resolve
from .kernels import RULES
from .kernels.cuda_source import OPTIONAL, slots_used

__all__ = ["Launch", "adagrad", "adam", "lion", "plan", "rmsprop", "sgd"]


# -- per-step scalars and flag variants, one function per rule ------------------------------------

def _sgd_plan(step, lr, momentum, dampening, weight_decay, nesterov, maximize):
    first = step == 1
    k = (weight_decay, 0.0 if first else momentum, 1.0 if first else 1.0 - dampening, momentum, lr)
    return {"maximize": maximize, "decay": weight_decay != 0, "momentum": momentum != 0,
            "nesterov": nesterov}, k


def _adagrad_plan(step, lr, lr_decay, weight_decay, eps, maximize):
    return ({"maximize": maximize, "decay": weight_decay != 0},
            (weight_decay, lr / (1.0 + (step - 1) * lr_decay), eps))


def _rmsprop_plan(step, lr, alpha, eps, weight_decay, momentum, centered, maximize):
    return ({"maximize": maximize, "decay": weight_decay != 0, "centered": centered,
             "momentum": momentum > 0},
            (weight_decay, alpha, 1.0 - alpha, eps, momentum, lr))


def _adam_plan(step, lr, betas, eps, weight_decay, amsgrad, maximize, decoupled):
    beta1, beta2 = betas
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    return ({"maximize": maximize, "decay": weight_decay != 0, "decoupled": decoupled,
             "amsgrad": amsgrad},
            (weight_decay, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
             lr / bc1, 1.0 / math.sqrt(bc2), eps))


def _lion_plan(step, lr, betas, weight_decay, maximize):
    beta1, beta2 = betas
    return ({"maximize": maximize, "decay": weight_decay != 0},
            (1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr))


_PLANS = {"sgd": _sgd_plan, "adagrad": _adagrad_plan, "rmsprop": _rmsprop_plan,
          "adam": _adam_plan, "lion": _lion_plan}


def plan(rule, step, hp):
    """``(flags, k)``: the compiled variant and the host scalars of one step of ``rule`` with
    the (already validated) hyperparameters ``hp``."""
    return _PLANS[rule](step, **hp)


class Launch:
    """One step of one rule on one backend: the variant and host scalars are computed once,
    then ``runner(dtype, writes)(param, grad, states)`` launches it on any number of flat
    arrays. Trusts its caller: the arrays must already have passed ``check_param_arrays``."""

    __slots__ = ("_runners", "be", "flags", "hp", "k", "rule", "step")

    def __init__(self, be, rule, step, hp):
        self.be, self.rule, self.step, self.hp = be, rule, step, hp
        self.flags, self.k = plan(rule, step, hp)
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
        if be.NAME == "numpy":
            oracle, names = getattr(reference, rule), RULES[rule].STATE
            kw = dict(self.hp, step=self.step)

            def run(param, grad, states):
                oracle(param, grad, {n: s for n, s in zip(names, states) if s is not None}, **kw)
        elif hasattr(be, "prepare"):
            run = be.prepare(rule, flags, writes, k, dtype)
        else:
            def run(param, grad, states):
                be.launch(rule, flags, param, grad, tuple(states), k)
        if rule == "sgd" and self.step == 1 and flags["momentum"] and writes[0]:
            inner = run

            def run(param, grad, states):
                # the rule computes b = 0·b + g on the first step; 0·NaN is NaN, so an
                # uninitialised buffer (PyTorch has none before step 1) is cleared for b = g
                states[0][...] = 0
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
    for (name, a), used in zip(states.items(), slots_used(rule, flags)):
        if used and a is None:
            flag = OPTIONAL.get(rule, {}).get(name)
            why = "always" if flag is None else f"with {flag} on"
            raise ValueError(f"{who}: state {name!r} is required {why} "
                             f"({', '.join(f'{k}={v}' for k, v in flags.items())}), got None")
    supported = tuple(getattr(be, "DTYPES", SUPPORTED_DTYPES))
    _, entries = check_param_arrays(None, param, grad, states.items(), supported, who=who)
    check_reach(be, [(label, a) for label, a, _ in entries], "the arrays of one step",
                exc=TypeError)
    check_no_overlap(entries)
    if param.ndim != 1:  # validated: same shape, param and state contiguous (views, no copy)
        param, grad = param.reshape(-1), grad.reshape(-1)
        states = {n: None if a is None else a.reshape(-1) for n, a in states.items()}
    return be, param, grad, tuple(states.values())


def _run(rule, backend, step, hp, param, grad, states):
    step = check_step(step)
    hp = check_hyperparams(hp)
    flags, _ = plan(rule, step, hp)
    be, param, grad, states = _checked(rule, flags, backend, param, grad, states)
    writes = tuple(s is not None for s in states)
    Launch(be, rule, step, hp).runner(dtype_of(param), writes)(param, grad, states)


def sgd(param, grad, momentum_buffer=None, *, step, lr=1e-3, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False, backend="auto"):
    """SGD / Momentum / Nesterov; ``momentum_buffer`` is required when ``momentum != 0``."""
    _run("sgd", backend, step, {"lr": lr, "momentum": momentum, "dampening": dampening,
                                "weight_decay": weight_decay, "nesterov": nesterov,
                                "maximize": maximize},
         param, grad, {"momentum_buffer": momentum_buffer})


def adagrad(param, grad, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False, backend="auto"):
    """AdaGrad with PyTorch's ``clr = lr / (1 + (t - 1) * lr_decay)``."""
    _run("adagrad", backend, step, {"lr": lr, "lr_decay": lr_decay,
                                    "weight_decay": weight_decay, "eps": eps,
                                    "maximize": maximize},
         param, grad, {"sum": state_sum})


def rmsprop(param, grad, square_avg, grad_avg=None, momentum_buffer=None, *, step, lr=1e-2,
            alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False, backend="auto"):
    """RMSProp; ``grad_avg`` is required when centered, ``momentum_buffer`` when momentum > 0."""
    _run("rmsprop", backend, step, {"lr": lr, "alpha": alpha, "eps": eps,
                                    "weight_decay": weight_decay, "momentum": momentum,
                                    "centered": centered, "maximize": maximize},
         param, grad, {"square_avg": square_avg, "grad_avg": grad_avg,
                       "momentum_buffer": momentum_buffer})


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
         decoupled=False, backend="auto"):
    """Adam (``decoupled=True``: AdamW); ``max_exp_avg_sq`` is required with amsgrad."""
    _run("adam", backend, step, {"lr": lr, "betas": betas, "eps": eps,
                                 "weight_decay": weight_decay, "amsgrad": amsgrad,
                                 "maximize": maximize, "decoupled": decoupled},
         param, grad, {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq,
                       "max_exp_avg_sq": max_exp_avg_sq})


def lion(param, grad, exp_avg, *, step, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
         maximize=False, backend="auto"):
    """Lion: sign of the interpolated momentum, decoupled weight decay."""
    _run("lion", backend, step, {"lr": lr, "betas": betas, "weight_decay": weight_decay,
                                 "maximize": maximize},
         param, grad, {"exp_avg": exp_avg})
