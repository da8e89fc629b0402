"""Shared fixtures: the backend parametrization, seeded inputs and a float64 oracle runner.

``backend_params()`` lists the host backends by default: these tests feed NumPy arrays, which a
GPU backend rightly refuses. ``backend_params(names)`` with CUDA backends named (as ``tests/gpu/``
does, on device arrays) marks them ``gpu`` and skips them cleanly when they cannot run here.

``run_oracle`` steps ``fastopt.reference`` directly (not through the optimizer classes) on
float64 copies, with hyperparameters resolved from ``DEFAULTS`` (torch.optim's defaults,
written out here independently of the classes).
"""

import importlib
import zlib

import numpy as np
import pytest

import fastopt
from fastopt import backends as _backends
from fastopt import reference

#: "numpy" is the oracle itself: in float32 it is still checked against the float64 oracle.


def _device(name):
    try:
        return getattr(importlib.import_module(_backends.BACKENDS[name]), "DEVICE", "cpu")
    except ImportError:
        return "cuda" if name in ("numba-cuda", "cupy") else "cpu"


def backend_params(names=None):
    """``pytest.param`` per backend (default: the host ones); CUDA backends get the ``gpu`` mark
    and a skip when absent."""
    avail = set(fastopt.available_backends())
    out = []
    if names is None:
        names = [b for b in _backends.BACKENDS if _device(b) == "cpu"]
    for name in names:
        marks = []
        if _device(name) == "cuda":
            marks.append(pytest.mark.gpu)
        if name not in avail:
            marks.append(pytest.mark.skip(reason=f"backend {name!r} is not available here"))
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def kernel_backend_params():
    """The backends that run the per-element rules (everything but the NumPy oracle)."""
    return backend_params([b for b in _backends.BACKENDS if b != "numpy" and _device(b) == "cpu"])


@pytest.fixture(params=backend_params())
def backend(request):
    return request.param


@pytest.fixture
def rng(request):
    # a fixed seed per test (its node id), so failures reproduce and tests stay independent
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# --- the float64 oracle ------------------------------------------------------------------------

#: torch.optim defaults; the classes are checked against this table in test_api
DEFAULTS = {
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
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False
    ),
    "AdamW": dict(
        lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, maximize=False
    ),
    "Lion": dict(lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, maximize=False),
}


#: the state buffers PyTorch keeps for each optimizer and options
def state_names(name, hp):
    if name in ("SGD", "Momentum", "Nesterov"):
        return ("momentum_buffer",) if hp["momentum"] != 0 else ()
    if name == "AdaGrad":
        return ("sum",)
    if name == "RMSProp":
        return (
            ("square_avg",)
            + (("grad_avg",) if hp["centered"] else ())
            + (("momentum_buffer",) if hp["momentum"] > 0 else ())
        )
    if name in ("Adam", "AdamW"):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if hp["amsgrad"] else ())
    if name == "Lion":
        return ("exp_avg",)
    raise KeyError(name)


def resolve(name, kwargs):
    """Full hyperparameters of optimizer ``name`` built with ``kwargs``."""
    hp = dict(DEFAULTS[name])
    unknown = set(kwargs) - set(hp)
    assert not unknown, f"{name} has no hyperparameter {unknown}"
    hp.update(kwargs)
    return hp


def oracle_step(name, hp, param, grad, state, step):
    """One step of the reference formulas for ``name`` (in place on float64 arrays)."""
    hp = dict(hp)
    if name in ("SGD", "Momentum", "Nesterov"):
        reference.sgd(
            param,
            grad,
            state,
            step=step,
            lr=hp["lr"],
            momentum=hp["momentum"],
            dampening=hp.get("dampening", 0.0),
            weight_decay=hp["weight_decay"],
            nesterov=hp.get("nesterov", name == "Nesterov"),
            maximize=hp["maximize"],
        )
    elif name == "AdaGrad":
        reference.adagrad(
            param,
            grad,
            state,
            step=step,
            lr=hp["lr"],
            lr_decay=hp["lr_decay"],
            weight_decay=hp["weight_decay"],
            eps=hp["eps"],
            maximize=hp["maximize"],
        )
    elif name == "RMSProp":
        reference.rmsprop(
            param,
            grad,
            state,
            step=step,
            lr=hp["lr"],
            alpha=hp["alpha"],
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            momentum=hp["momentum"],
            centered=hp["centered"],
            maximize=hp["maximize"],
        )
    elif name in ("Adam", "AdamW"):
        reference.adam(
            param,
            grad,
            state,
            step=step,
            lr=hp["lr"],
            betas=tuple(hp["betas"]),
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            amsgrad=hp["amsgrad"],
            maximize=hp["maximize"],
            decoupled_weight_decay=name == "AdamW",
        )
    elif name == "Lion":
        reference.lion(
            param,
            grad,
            state,
            step=step,
            lr=hp["lr"],
            betas=tuple(hp["betas"]),
            weight_decay=hp["weight_decay"],
            maximize=hp["maximize"],
        )
    else:
        raise KeyError(name)


def run_oracle(name, kwargs, param0, grads, lrs=None):
    """Run the float64 oracle of ``name(**kwargs)`` from ``param0`` over the gradient sequence
    ``grads`` (``lrs``: optional lr per step). Returns ``(param, {state name: array})``."""
    hp = resolve(name, kwargs)
    param = np.array(param0, dtype=np.float64)
    fill = hp.get("initial_accumulator_value", 0.0)
    state = {s: np.full_like(param, fill if s == "sum" else 0.0) for s in state_names(name, hp)}
    for t, g in enumerate(grads, start=1):
        if lrs is not None:
            hp["lr"] = lrs[t - 1]
        oracle_step(name, hp, param, np.array(g, dtype=np.float64), state, t)
    return param, state


@pytest.fixture
def oracle():
    return run_oracle
