"""One backend protocol (``fastopt.backends.protocol``): every backend answers
``step_runner(plan, dtype, writes, io)``, and a ``StepPlan`` reaches each the same way.

Compared on random data against the oracle called directly (``fastopt.reference``): params
and every state buffer, float32 and float64, over three steps."""

import importlib

import numpy as np
import pytest
from fastopt.kernels import RULES

from fastopt import reference
from fastopt.backends import BACKENDS, protocol
from fastopt.functional import Launch, StepPlan

ADAM = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.1}


def _hp(rule, **kw):
    spec = RULES[rule]
    return spec.validate({**{h.name: h.default for h in spec.hyper}, **kw})


def test_every_backend_module_speaks_the_protocol():
    for name, path in BACKENDS.items():
        try:
            mod = importlib.import_module(path)
        except ImportError:  # an optional GPU stack that cannot import here
            continue
        assert callable(getattr(mod, "step_runner", None)), name
        assert name == mod.NAME and mod.DEVICE in ("cpu", "cuda")


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_plan_runs_any_backend_like_the_oracle(backend, dtype):
    be = importlib.import_module(BACKENDS[backend])
    spec, hp = RULES["adam"], _hp("adam", **ADAM)
    rng = np.random.default_rng(7)
    n = 257
    p = rng.standard_normal(n).astype(dtype)
    ours = {"p": p.copy(), "exp_avg": np.zeros(n, dtype), "exp_avg_sq": np.zeros(n, dtype)}
    theirs = {k: v.copy() for k, v in ours.items()}
    writes = tuple(s in ("exp_avg", "exp_avg_sq") for s in spec.state)
    for step in (1, 2, 3):
        g = rng.standard_normal(n).astype(dtype)
        plan = StepPlan(be, "adam", step, hp)
        states = [ours.get(s) for s in spec.state]
        plan.runner(np.dtype(dtype), writes)(ours["p"], g, states)
        st = {"exp_avg": theirs["exp_avg"], "exp_avg_sq": theirs["exp_avg_sq"]}
        reference.adam(theirs["p"], g, st, step=step, **ADAM)
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == np.float32 else dict(rtol=1e-13, atol=1e-15)
    for k in ours:
        np.testing.assert_allclose(ours[k], theirs[k], **tol, err_msg=k)
    assert Launch is StepPlan  # the older name still imports


def test_a_launch_only_backend_is_adapted():
    """A module that defines only ``launch`` (a test double, the benchmark's null backend) gets
    the plan's variant and scalars per call; with a storage format, its extras too."""
    calls = []

    class LaunchOnly:
        NAME, DEVICE = "launch-only", "cpu"

        @staticmethod
        def launch(rule, flags, param, grad, states, k, **kw):
            calls.append((rule, flags, k, kw))

    hp = _hp("sgd", lr=0.5, momentum=0.9)
    plan = StepPlan(LaunchOnly, "sgd", 2, hp, inv_scale=0.25, seed=3)
    run = protocol.step_runner_of(LaunchOnly)(plan, np.dtype(np.float32), (True,), None)
    p = np.ones(4, np.float32)
    run(p, p.copy(), [p.copy()])
    assert calls == [("sgd", plan.flags, plan.k, {})]

    class IO:  # the fields launch_runner reads of a storage format
        kbuf, compute = False, "float32"

    run = protocol.launch_runner(LaunchOnly.launch, plan, IO())
    run(p, p.copy(), [p.copy()], None, 11)
    extras = calls[-1][3]["extras"]
    assert extras == {"inv_scale": 0.25, "key": plan.key, "scale": None, "salt": 11}
