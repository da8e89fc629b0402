"""A rule whose variant depends on the step, stepped with its scalars on the device: its
``Rule.device_flags`` variant holds every term and the step's scalars select one (RAdam's
rectification, ``rho_t > 5``; Adan's first step), so no host picks a compiled variant per step.
(ASGD, whose variant depends on its host state, has none yet: its select variant needed 65
registers under numba-cuda on sm_90, one past the gate of ``tests/test_numba_cuda_compile.py``.)

- The recorded scalar program (``device_scalars.trace(..., select=True)``) computes
  ``scalars_of`` bit for bit over many steps (the selecting scalars included), for the defaults,
  the probes and betas that never rectify, and launches ``Rule.device_flags``'s variant.
- The device variant, fed each step's scalars, equals the host's variant of that step bit for
  bit (a division by 1 is exact), element by element.
- ``fastopt.torch``'s RAdam and Adan on the GPU path (the fake backend of
  ``tests/support/fake_table.py``) keep their step counts on the device, read no loss scale,
  found-inf flag or step count on the host in a steady step (one step skipped by found-inf),
  accept ``capturable=True``, and equal the CPU path (the host's variants) given the same
  inputs.
- Without ``select`` (the core classes' capturable steps) such a rule stays refused.
"""

from __future__ import annotations

import contextlib
import math
import types

import numpy as np
import pytest
from fastopt.kernels import RULES, device_scalars, storage
from support.host_reads import no_host_reads

RULES_WITH_DEVICE_FLAGS = [n for n, r in RULES.items() if r.device_flags is not None]


def _hps(rule):
    """The defaults, the test values, every probe (one variant per step switching), and for
    a rule with betas a beta2 small enough that RAdam never rectifies."""
    spec = RULES[rule]
    out = [dict(spec.defaults), dict(spec.defaults, **spec.test_hp)]
    out += [dict(spec.defaults, **{h.name: h.probe}) for h in spec.hyper if h.probe is not None]
    if "betas" in spec.hyper_names:
        b = spec.defaults["betas"]
        out.append(dict(spec.defaults, betas=(b[0], 0.6, *b[2:])))
    return [spec.validate(hp) for hp in out]


def _steps(spec, hp, n):
    """``(t, flags, k)`` of the host's steps 1..n (the host state advanced between them)."""
    hs = spec.initial_host_state(hp) if spec.host_state else None
    for t in range(1, n + 1):
        flags, k = spec.variant_and_scalars(hp, t, hs)
        yield t, flags, k
        if spec.host_state:
            hs = spec.advance_host_state(hp, t, hs)


def test_some_rule_declares_a_device_variant():
    assert "radam" in RULES_WITH_DEVICE_FLAGS


@pytest.mark.parametrize("rule", RULES_WITH_DEVICE_FLAGS)
def test_recorded_program_with_select_computes_the_host_scalars_bit_for_bit(rule):
    spec = RULES[rule]
    shim = types.SimpleNamespace(grid=lambda n: 0)
    switched = set()
    for hp in _hps(rule):
        with pytest.raises(device_scalars.NotCapturable, match="depends on the step"):
            device_scalars.trace(rule, hp)  # the core's capturable steps: still refused
        prog = device_scalars.trace(rule, hp, select=True)
        assert prog.flags == spec.device_flags(hp)
        ns = {"cuda": shim, "math": math}
        exec(device_scalars.python_source(prog), ns)
        kernel = ns["factory"](storage.mix32)
        ctl = np.array(device_scalars.ctl_values(rule, hp, 0), np.float64)
        m = len(spec.scalars)
        k32, k64 = np.zeros(m, np.float32), np.zeros(m)
        keyp, no_inf = np.zeros(1, np.uint32), np.zeros(1, np.float32)
        for t, flags, k in _steps(spec, hp, 60):
            kernel(ctl, k32, k64, keyp, no_inf, np.uint32(3))
            switched.add(tuple(flags.items()))
            assert np.array_equal(k64, np.array(k)), (rule, t, k64, k)
            assert np.array_equal(k32, np.array(k, np.float32)), (rule, t)
    # the host's variants on both sides of its per-step choice were met
    assert len({dict(f)[n] for f in switched for n in ("rectify", "first") if n in dict(f)}) == 2


@pytest.mark.parametrize("rule", RULES_WITH_DEVICE_FLAGS)
def test_device_variant_equals_the_host_variant_of_each_step(rule):
    """Element by element in float32 (the rule's Python statements on NumPy scalars, non-finite
    gradients included): the device's variant with step ``t``'s scalars gives the host
    variant's values, bit for bit, under every hyperparameter set of ``_hps``."""
    spec = RULES[rule]
    rng = np.random.default_rng(1)
    n = 24
    for hp in _hps(rule):
        dev = spec.element(spec.device_flags(hp))
        p0 = rng.standard_normal(n).astype(np.float32)
        states = [rng.random(n).astype(np.float32) for _ in spec.slots]
        for t, flags, k in _steps(spec, hp, 12):
            host = spec.element(flags)
            k32 = tuple(np.float32(x) for x in k)
            g = rng.standard_normal(n).astype(np.float32)
            g[:2] = (np.inf, np.nan)
            with np.errstate(all="ignore"):
                for i in range(n):
                    a = host(p0[i], g[i], *(s[i] for s in states), k32)
                    b = dev(p0[i], g[i], *(s[i] for s in states), k32)
                    assert [x.tobytes() for x in a] == [x.tobytes() for x in b], (t, i, flags)


# -- fastopt.torch ------------------------------------------------------------------------------
TORCH_CASES = [
    # rho_t passes 5 at step 6 with beta2 = 0.95
    ("RAdam", dict(lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)),
    ("Adan", dict(lr=1e-2, betas=(0.8, 0.7, 0.9), eps=1e-3, eps_root=1e-3, weight_decay=0.1)),
]


@pytest.mark.torch
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("name,kw", TORCH_CASES, ids=[c[0] for c in TORCH_CASES])
def test_torch_rule_on_the_device_path(monkeypatch, name, kw, capturable):
    torch = pytest.importorskip("torch")
    from support import fake_table

    import fastopt.torch as fot
    from fastopt.backends import get_backend

    monkeypatch.setattr(fot.FusedOptimizer, "_backend_module", lambda self, device: fake_table)
    gen = torch.Generator().manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (3, 130, 4099)]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = getattr(fot, name)(ps, capturable=capturable, **kw)
    ref = getattr(fot, name)(qs, **kw)
    ref._backend_module = lambda device: get_backend("numba")
    scale = torch.tensor(128.0)
    calls = fake_table.calls
    for step in range(1, 12):
        found = torch.tensor(1.0 if step == 4 else 0.0)
        g_gen = torch.Generator().manual_seed(100 + step)
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, generator=g_gen)
            p.grad, q.grad = g * 128.0, g.clone()
        calls.clear()
        watched = [scale, found]
        if step > 1:  # the step counts
            watched += [t for p in ps for t in ours.state[p].values() if t.dim() == 0]
        with no_host_reads(watched) if step > 1 else contextlib.nullcontext():
            ours.step(grad_scale=scale, found_inf=found)
        if step != 4:
            ref.step()
        assert len(calls.launches) == 1 and len(calls.tables) == (1 if step == 1 else 0), step
        assert calls.launches[0]["flags"]["select"] and calls.launches[0]["io"].kbuf
        for a, b in zip(ps, qs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            for key, v in ref.state[b].items():
                torch.testing.assert_close(
                    ours.state[a][key].float(), v.float(), rtol=1e-6, atol=1e-7
                )
    assert all(int(ours.state[p]["step"]) == 10 for p in ps)
