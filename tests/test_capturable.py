"""Capturable steps, on the CPU: the scalar program recorded from each rule's ``scalars_of``
computes the host scalars bit for bit (``kernels.device_scalars``), and ``capturable=True``
is accepted on the CPU backends and changes nothing there. The device side runs under the
CUDA simulator (``cudasim_parity.py``), the CUDA C scalar kernel through g++
(``test_cuda_mixed.py``), a whole step captured in a CUDA graph on a GPU (``tests/gpu``).
"""

import math
import types

import numpy as np
import pytest
from conftest import backend_params
from fastopt.kernels import RULES, device_scalars, storage

import fastopt


def _class_of(rule):
    return next(c for c in fastopt.optimizers.CLASSES.values() if c._rule == rule)


def _hps(rule, rng):
    """The rule's defaults and its probes (every variant's scalars), with random values."""
    spec = RULES[rule]
    out = []
    for probes in (False, True):
        hp = dict(spec.defaults)
        if probes:
            for h in spec.hyper:
                if h.probe is None:
                    continue
                trial = dict(hp, **{h.name: h.probe})
                try:
                    spec.validate(trial)
                except ValueError:
                    continue
                hp = trial
        hp["lr"] = float(rng.uniform(1e-4, 0.1))
        out.append(spec.validate(hp))
    return out


@pytest.mark.parametrize("rule", list(RULES))
def test_recorded_program_computes_the_host_scalars_bit_for_bit(rule):
    spec = RULES[rule]
    rng = np.random.default_rng(len(rule))
    shim = types.SimpleNamespace(grid=lambda n: 0)  # the kernel's one thread
    for hp in _hps(rule, rng):
        try:
            prog = device_scalars.trace(rule, hp)
        except device_scalars.NotCapturable as exc:
            # the one thing a device cannot do: pick a compiled variant per step (RAdam's
            # rectification, ASGD's averaging); such a rule is refused at construction
            assert "variant that depends on the step or the host state" in str(exc), exc
            with pytest.raises(ValueError, match="capturable"):
                _class_of(rule)(capturable=True)
            continue
        ns = {"cuda": shim, "math": math}
        exec(device_scalars.python_source(prog), ns)
        kernel = ns["factory"](storage.mix32)
        ctl = np.array(device_scalars.ctl_values(rule, hp, 0), np.float64)
        m = len(spec.scalars)
        k32, k64 = np.zeros(m, np.float32), np.zeros(m)
        keyp, no_inf = np.zeros(1, np.uint32), np.zeros(1, np.float32)
        hs = spec.initial_host_state(hp) if spec.host_state else None
        for t in range(1, 40):
            kernel(ctl, k32, k64, keyp, no_inf, np.uint32(5))
            _, k = spec.variant_and_scalars(hp, t, hs)
            assert np.array_equal(k64, np.array(k)), (rule, t)
            assert np.array_equal(k32, np.array(k, np.float32)), (rule, t)
            assert keyp[0] == storage.step_key(5, t)
            if spec.host_state:
                hs = spec.advance_host_state(hp, t, hs)
        assert ctl[0] == 39
        kernel(ctl, k32, k64, keyp, np.ones(1, np.float32), np.uint32(5))  # found inf
        assert ctl[0] == 39, "a step skipped on the device does not count"


def test_a_rule_that_branches_in_python_is_not_capturable():
    spec = RULES["sgd"]
    bad = types.SimpleNamespace(**{f: getattr(spec, f) for f in ("hyper", "scalars", "host_state")})

    def scalars_of(hp, step, hs):
        return dict(spec.scalars_of(hp, step, hs), mu_b=0.0 if step == 1 else hp["momentum"])

    bad.scalars_of, bad.flags_of, bad.advance = scalars_of, spec.flags_of, None
    bad.initial_host_state = spec.initial_host_state
    RULES["_branchy"] = bad
    try:
        with pytest.raises(device_scalars.NotCapturable, match="where"):
            device_scalars.trace("_branchy", spec.validate(dict(spec.defaults, momentum=0.9)))
    finally:
        del RULES["_branchy"]


@pytest.mark.parametrize("backend", backend_params())
def test_capturable_is_accepted_and_equivalent_on_the_cpu(backend):
    rng = np.random.default_rng(3)
    p0 = rng.standard_normal(257).astype(np.float32)
    out = []
    for cap in (False, True):
        p = {"w": p0.copy()}
        opt = fastopt.AdamW(lr=0.01, capturable=cap, backend=backend)
        r = np.random.default_rng(4)
        for t in range(5):
            opt.update(p, {"w": r.standard_normal(257).astype(np.float32)}, grad_scale=2.0)
            opt.lr = 0.01 / (t + 2)
        out.append((p["w"], opt.step_count))
        assert opt.capturable is cap and ("capturable=True" in repr(opt)) is cap
    assert np.array_equal(out[0][0], out[1][0]) and out[0][1] == out[1][1] == 5
