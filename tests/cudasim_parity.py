"""Numba CUDA kernels under the simulator against the float64 oracle (params and every state).

Not collected by a plain ``pytest`` run (the name does not start with ``test_``):
``tests/test_cudasim.py`` runs this file in a separate pytest process with
``NUMBA_ENABLE_CUDASIM=1``, because the simulator replaces ``numba.cuda`` for the whole process.
Every optimizer and flag variant runs through the public classes with
``backend="numba-cuda"`` on host arrays, which the simulator executes thread by thread: the
grid (4 blocks of 32 threads) is smaller than n, so the grid-stride loop takes several trips.
"""
import os

import numpy as np
import pytest

import fastopt
from conftest import run_oracle, state_names, resolve
from fastopt.backends import numba_cuda_backend as ncb
from tolerances import assert_close

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" or not ncb.available(),
    reason="run by tests/test_cudasim.py with NUMBA_ENABLE_CUDASIM=1")

#: every flag variant of every optimizer (each flag that selects a compiled variant, alone and
#: combined), with non-default hyperparameters so that each scalar matters
CASES = [
    ("SGD", {}),
    ("SGD", dict(weight_decay=0.1, maximize=True)),
    ("SGD", dict(momentum=0.8, dampening=0.3)),
    ("SGD", dict(momentum=0.8, weight_decay=0.05, maximize=True)),
    ("SGD", dict(momentum=0.7, nesterov=True, weight_decay=0.05)),
    ("SGD", dict(momentum=0.7, nesterov=True, maximize=True)),
    ("Momentum", {}),
    ("Nesterov", {}),
    ("AdaGrad", {}),
    ("AdaGrad", dict(lr_decay=0.1, weight_decay=0.1, initial_accumulator_value=0.5)),
    ("AdaGrad", dict(maximize=True)),
    ("RMSProp", {}),
    ("RMSProp", dict(centered=True)),
    ("RMSProp", dict(momentum=0.6)),
    ("RMSProp", dict(centered=True, momentum=0.6, weight_decay=0.1, maximize=True)),
    ("RMSProp", dict(weight_decay=0.1, alpha=0.9)),
    ("Adam", {}),
    ("Adam", dict(amsgrad=True)),
    ("Adam", dict(weight_decay=0.1, maximize=True)),
    ("Adam", dict(amsgrad=True, weight_decay=0.1, maximize=True, betas=(0.8, 0.9))),
    ("AdamW", {}),
    ("AdamW", dict(amsgrad=True, maximize=True)),
    ("AdamW", dict(weight_decay=0.0)),
    ("Lion", {}),
    ("Lion", dict(weight_decay=0.5, maximize=True)),
]
CLASSES = {"SGD": fastopt.SGD, "Momentum": fastopt.Momentum, "Nesterov": fastopt.Nesterov,
           "AdaGrad": fastopt.AdaGrad, "RMSProp": fastopt.RMSProp, "Adam": fastopt.Adam,
           "AdamW": fastopt.AdamW, "Lion": fastopt.Lion}
STEPS = 7


def _case_id(case):
    name, kw = case
    return name + "".join(f"-{k}={v}" for k, v in kw.items())


def _inputs(rng, n, dtype):
    # lr scaled up so that 7 steps move the params visibly (a kernel that skips the update fails)
    p0 = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) for _ in range(STEPS)]
    return p0, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("n", [1, 1001])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_dict_update_matches_oracle(case, n, dtype, rng):
    name, kw = case
    kw = dict(kw)
    kw.setdefault("lr", 0.05)
    p0, grads = _inputs(rng, n, dtype)
    opt = CLASSES[name](backend="numba-cuda", **kw)
    p = p0.copy()
    for g in grads:
        opt.update({"w": p}, {"w": g})
    ref_p, ref_state = run_oracle(name, kw, p0, grads)
    assert not np.array_equal(p, p0), "the parameters did not move"
    assert_close(p, ref_p, dtype, f"{name}{kw} param")
    want = state_names(name, resolve(name, kw))
    assert set(opt.state["w"]) == set(want)
    for s in want:
        assert_close(opt.state["w"][s], ref_state[s], dtype, f"{name}{kw} state {s}")


def test_flat_buffer_step_matches_oracle(rng):
    # several parameters of two dtypes in one FlatBuffer: one launch per dtype, padding included
    shapes = {"a": (3, 5), "b": (17,), "c": (2, 2, 9)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    params["d"] = rng.standard_normal(33)
    buf = fastopt.FlatBuffer(params)
    opt = fastopt.Adam(lr=0.05, amsgrad=True, weight_decay=0.1, backend="numba-cuda")
    grads = [{k: rng.standard_normal(np.shape(v)).astype(v.dtype) for k, v in params.items()}
             for _ in range(3)]
    for gs in grads:
        for k, g in gs.items():
            buf.grads[k][...] = g
        opt.step(buf)
    for k, p0 in params.items():
        ref_p, ref_state = run_oracle("Adam", dict(lr=0.05, amsgrad=True, weight_decay=0.1),
                                      p0, [gs[k] for gs in grads])
        assert_close(buf.params[k], ref_p, p0.dtype, f"param {k}")
        for s, ref in ref_state.items():
            assert_close(opt.state[k][s], ref, p0.dtype, f"state {s} of {k}")


@pytest.mark.parametrize("variant", ncb.variants(), ids=lambda v: f"{v[0]}-{v[1]}")
def test_every_kernel_variant_writes_every_element(variant):
    # each compiled variant (all 52), straight through the backend, against the same rule run
    # element by element in plain Python: every element's expected value differs from its input,
    # so an index the grid-stride loop skipped or a slot stored from the wrong variable shows
    rule, flags, writes = variant
    rng = np.random.default_rng(len(ncb.variants()) + ncb.variants().index(variant))
    n = 1000
    k = tuple(float(x) for x in rng.uniform(0.1, 0.9, len(fastopt.kernels.RULES[rule].SCALARS)))
    p = rng.standard_normal(n).astype(np.float32)
    # small gradients and non-negative states keep every square root real (|grad_avg| <= 0.2,
    # square_avg >= 0.05), so the plain-Python run below never hits a math domain error
    g = rng.uniform(-0.2, 0.2, n).astype(np.float32)
    states = [rng.uniform(0.5, 1.5, n).astype(np.float32) if j == 0 else
              rng.uniform(0.0, 0.2, n).astype(np.float32) for j in range(len(writes))]
    states = [s if w else None for s, w in zip(states, writes)]
    # reference: the same rule run element by element in plain Python (float32 scalars)
    elem = fastopt.kernels.RULES[rule].make_rule(**flags)
    want_p = p.copy()
    want_s = [None if s is None else s.copy() for s in states]
    k32 = tuple(np.float32(x) for x in k)
    for i in range(n):
        slots = [want_p[i] if s is None else s[i] for s in want_s]
        out = elem(want_p[i], g[i], *slots, k32)
        want_p[i] = out[0]
        for s, v in zip(want_s, out[1:]):
            if s is not None:
                s[i] = v
    ncb.launch(rule, flags, p, g, tuple(states), k)
    np.testing.assert_allclose(p, want_p, rtol=1e-6, atol=1e-7, err_msg="param")
    for j, (s, w) in enumerate(zip(states, want_s)):
        if s is not None:
            np.testing.assert_allclose(s, w, rtol=1e-6, atol=1e-7, err_msg=f"slot {j}")


def test_launch_config_is_a_grid_stride_grid():
    blocks, threads = ncb.launch_config(10_000)
    assert blocks * threads < 10_000, "the simulator grid must be smaller than n"
    assert ncb.launch_config(1) == (1, threads)
