"""The float64 oracle runner: ``fastopt.reference`` stepped directly, not through the classes.

Everything an oracle run needs comes from the rule spec of the class's rule
(``fastopt.kernels.RULES``) and the class itself: its full hyperparameters (the constructor's
defaults, the rule's pins), the state buffers it keeps, their initial values, its host state
(as 0-d float32 arrays, the form the oracle functions take) and the oracle function's keyword
arguments. ``TORCH_DEFAULTS`` is written out independently of all that: torch.optim 2.13's
defaults, against which the classes are checked (and against torch itself where it is
installed: ``tests/test_torch_parity.py``).
"""

import functools
import inspect

import numpy as np
from fastopt.kernels import RULES

import fastopt
from fastopt import reference
from fastopt.optimizers import CLASSES

__all__ = [
    "TORCH_DEFAULTS",
    "class_of",
    "host_names",
    "initial_state",
    "oracle_step",
    "resolve",
    "rule_hp",
    "run_oracle",
    "spec_of",
    "state_names",
]

#: torch.optim 2.13's constructor defaults (Momentum, Nesterov and Lion, which torch lacks:
#: fastopt's documented ones), typed in independently of the classes and the rule specs
TORCH_DEFAULTS = {
    "SGD": dict(
        lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False
    ),
    "Momentum": dict(lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.0, maximize=False),
    "Nesterov": dict(lr=0.01, momentum=0.9, weight_decay=0.0, maximize=False),
    "AdaGrad": dict(
        lr=1e-2,
        lr_decay=0.0,
        weight_decay=0.0,
        initial_accumulator_value=0.0,
        eps=1e-10,
        maximize=False,
    ),
    "RMSProp": dict(
        lr=1e-2,
        alpha=0.99,
        eps=1e-8,
        weight_decay=0.0,
        momentum=0.0,
        centered=False,
        maximize=False,
    ),
    "Adam": dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=False,
    ),
    "AdamW": dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False
    ),
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
    "Adamax": dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, maximize=False),
    "NAdam": dict(
        lr=2e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        momentum_decay=4e-3,
        decoupled_weight_decay=False,
        maximize=False,
    ),
    "RAdam": dict(
        lr=1e-3,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        decoupled_weight_decay=False,
        maximize=False,
    ),
    "Adadelta": dict(lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0, maximize=False),
    "Rprop": dict(lr=1e-2, etas=(0.5, 1.2), step_sizes=(1e-6, 50.0), maximize=False),
    "ASGD": dict(lr=1e-2, lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0, maximize=False),
}


def class_of(name):
    """The optimizer class called ``name`` (aliases such as ``Adagrad`` included)."""
    return CLASSES.get(name) or getattr(fastopt, name)


def spec_of(name):
    """The rule spec the class ``name`` runs."""
    return RULES[class_of(name)._rule]


@functools.cache
def _class_defaults(name):
    cls = class_of(name)
    sig = inspect.signature(cls.__init__).parameters
    return {k: sig[k].default for k in cls._hyper + cls._flags}


def resolve(name, kwargs):
    """Full hyperparameters of optimizer ``name`` built with ``kwargs`` (the class's names)."""
    hp = dict(_class_defaults(name))
    unknown = set(kwargs) - set(hp)
    assert not unknown, f"{name} has no hyperparameter {unknown}"
    hp.update(kwargs)
    return hp


def rule_hp(name, hp):
    """The rule's hyperparameters for the class's ``hp``: the rule's defaults, ``hp``, then the
    class's pins (AdamW's ``decoupled_weight_decay=True``, Nesterov's ``nesterov=True``)."""
    cls = class_of(name)
    return {**spec_of(name).defaults, **hp, **cls._pinned}


def state_names(name, hp):
    """The state buffers optimizer ``name`` keeps with hyperparameters ``hp`` (PyTorch's names)."""
    return spec_of(name).state_names(rule_hp(name, hp))


def host_names(name):
    """The host state of optimizer ``name`` (``mu_product``, ``eta``/``mu``; often none)."""
    return spec_of(name).host_names


def initial_state(name, hp, like):
    """Fresh state for one parameter shaped like ``like``: every buffer at its initial value,
    and the host state as 0-d float32 arrays (the form the oracle functions update)."""
    spec, rhp = spec_of(name), rule_hp(name, hp)
    state = {s: np.full_like(like, spec.initial(s, rhp)) for s in state_names(name, hp)}
    state.update({h: np.array(v, np.float32) for h, v in spec.initial_host_state(rhp).items()})
    return state


def oracle_step(name, hp, param, grad, state, step):
    """One step of the reference formulas for ``name`` (in place on ``param`` and ``state``).
    A host state missing from ``state`` is the one of a run with ``hp`` from step 1."""
    spec, rhp = spec_of(name), rule_hp(name, hp)
    fn = getattr(reference, spec.name)
    takes = inspect.signature(fn).parameters
    missing = [h for h in spec.host_names if h not in state]
    if missing:
        hs = spec.replay_host_state(rhp, step)
        state = dict(state, **{h: np.array(hs[h], np.float32) for h in missing})
    fn(param, grad, state, step=step, **{k: v for k, v in rhp.items() if k in takes})


def run_oracle(name, kwargs, param0, grads, lrs=None, host=False):
    """Run the float64 oracle of ``name(**kwargs)`` from ``param0`` over the gradient sequence
    ``grads`` (``lrs``: optional lr per step). Returns ``(param, {state name: array})``, and
    the host state ``{name: float}`` third when ``host`` is true."""
    hp = resolve(name, kwargs)
    if lrs is not None:
        hp["lr"] = lrs[0]
    param = np.array(param0, dtype=np.float64)
    state = initial_state(name, hp, param)
    for t, g in enumerate(grads, start=1):
        if lrs is not None:
            hp["lr"] = lrs[t - 1]
        oracle_step(name, hp, param, np.array(g, dtype=np.float64), state, t)
    hnames = host_names(name)
    slots = {s: a for s, a in state.items() if s not in hnames}
    if host:
        return param, slots, {h: float(state[h]) for h in hnames}
    return param, slots
