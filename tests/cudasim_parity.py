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
from support.matrix import FULL, config_id, steps_to_reach, variant_cover
from support.oracle import resolve, run_oracle, state_names
from support.parity import inputs
from support.tolerances import assert_close

import fastopt
from fastopt.backends import numba_cuda_backend as ncb

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" or not ncb.available(),
    reason="run by tests/test_cudasim.py with NUMBA_ENABLE_CUDASIM=1",
)

#: configurations of the optimizer matrix that together reach every variant the classes launch
#: (support.matrix.variant_cover): each one reaches a variant no earlier one does
CASES = variant_cover()


def _inputs(rng, name, kw, n, dtype):
    """Inputs for as many steps as the configuration needs to reach all its variants, two at
    least (state carried from one launch to the next): every simulated launch runs each of
    its threads in Python, and the CPU parity matrix runs every configuration seven steps."""
    p0, grads = inputs(rng, name, n, max(2, steps_to_reach(name, kw)))
    return p0.astype(dtype), [g.astype(dtype) for g in grads]


#: (configuration, n): the cover at n = 301, more elements than the simulated grid has threads
#: (4 x 32), so the grid-stride loop takes three trips, the last one partial; each class's
#: fullest configuration at n = 1 too (a one-thread launch)
SIZED = [(c, 301) for c in CASES] + [(c, 1) for c in FULL]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case, n", SIZED, ids=[f"{config_id(c)}-{n}" for c, n in SIZED])
def test_dict_update_matches_oracle(case, n, dtype, rng):
    name, kw = case
    p0, grads = _inputs(rng, name, kw, n, dtype)
    opt = getattr(fastopt, name)(backend="numba-cuda", **kw)
    p = p0.copy()
    for g in grads:
        opt.update({"w": p}, {"w": g})
    ref_p, ref_state, ref_host = run_oracle(name, kw, p0, grads, host=True)
    assert not np.array_equal(p, p0), "the parameters did not move"
    assert_close(p, ref_p, dtype, f"{name}{kw} param")
    want = state_names(name, resolve(name, kw))
    assert set(opt.state["w"]) == set(want)
    for s in want:
        assert_close(opt.state["w"][s], ref_state[s], dtype, f"{name}{kw} state {s}")
    assert opt.host_state == ref_host


def test_flat_buffer_step_matches_oracle(rng):
    # several parameters of two dtypes in one FlatBuffer: one launch per dtype, padding included
    shapes = {"a": (3, 5), "b": (17,), "c": (2, 2, 9)}
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    params["d"] = rng.standard_normal(33)
    buf = fastopt.FlatBuffer(params)
    opt = fastopt.Adam(lr=0.05, amsgrad=True, weight_decay=0.1, backend="numba-cuda")
    grads = [
        {k: rng.standard_normal(np.shape(v)).astype(v.dtype) for k, v in params.items()}
        for _ in range(3)
    ]
    for gs in grads:
        for k, g in gs.items():
            buf.grads[k][...] = g
        opt.step(buf)
    for k, p0 in params.items():
        ref_p, ref_state = run_oracle(
            "Adam", {"lr": 0.05, "amsgrad": True, "weight_decay": 0.1}, p0, [gs[k] for gs in grads]
        )
        assert_close(buf.params[k], ref_p, p0.dtype, f"param {k}")
        for s, ref in ref_state.items():
            assert_close(opt.state[k][s], ref, p0.dtype, f"state {s} of {k}")


@pytest.mark.parametrize("variant", ncb.variants(), ids=lambda v: f"{v[0]}-{v[1]}")
def test_every_kernel_variant_writes_every_element(variant):
    # each compiled variant, straight through the backend, against the same rule run
    # element by element in plain Python: every element's expected value differs from its input,
    # so an index the grid-stride loop skipped or a slot stored from the wrong variable shows
    rule, flags, writes = variant
    rng = np.random.default_rng(len(ncb.variants()) + ncb.variants().index(variant))
    n = 300
    k = tuple(float(x) for x in rng.uniform(0.1, 0.9, len(fastopt.kernels.RULES[rule].SCALARS)))
    p = rng.standard_normal(n).astype(np.float32)
    # small gradients and non-negative states keep every square root real (|grad_avg| <= 0.2,
    # square_avg >= 0.05), so the plain-Python run below never hits a math domain error
    g = rng.uniform(-0.2, 0.2, n).astype(np.float32)
    states = [
        rng.uniform(0.5, 1.5, n).astype(np.float32)
        if j == 0
        else rng.uniform(0.0, 0.2, n).astype(np.float32)
        for j in range(len(writes))
    ]
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


# -- the checks every public door makes, on this backend -------------------------------------------


def test_functional_refuses_bad_input_before_any_launch():
    from fastopt import functional as F

    p = np.ones(64, np.float32)
    g, st = np.ones_like(p), [np.zeros_like(p) for _ in range(3)]
    before = [a.copy() for a in (p, *st)]
    cases = [
        (
            lambda: F.adam(p, g, np.zeros(16, np.float32), st[1], step=1, backend="numba-cuda"),
            ValueError,
            "exp_avg",
        ),
        (
            lambda: F.adam(p, g, st[0], st[1], amsgrad=True, step=1, backend="numba-cuda"),
            ValueError,
            "max_exp_avg_sq",
        ),
        (
            lambda: F.sgd(p, g, momentum=0.9, step=1, backend="numba-cuda"),
            ValueError,
            "momentum_buffer",
        ),
        (
            lambda: F.sgd(p, g, st[0], momentum=0.9, lr=-1.0, step=1, backend="numba-cuda"),
            ValueError,
            "lr",
        ),
        (
            lambda: F.adagrad(p.astype(">f4"), g, st[0], step=1, backend="numba-cuda"),
            TypeError,
            "big-endian",
        ),
        (
            lambda: F.lion(np.ones(64, np.int32), g, st[0], step=1, backend="numba-cuda"),
            TypeError,
            "int32",
        ),
        (lambda: F.rmsprop(p, g[:-1], st[0], step=1, backend="numba-cuda"), ValueError, "grad"),
    ]
    for call, exc, word in cases:
        with pytest.raises(exc, match=word):
            call()
    for a, b in zip((p, *st), before):
        assert np.array_equal(a, b)


def test_dict_state_rebound_and_flat_rebound_are_refused():
    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal(64).astype(np.float32)}
    opt = fastopt.Adam(backend="numba-cuda")
    for _ in range(2):
        opt.update(params, {"w": rng.standard_normal(64).astype(np.float32)})
    w0, st0 = params["w"].copy(), opt.state["w"]["exp_avg"]
    opt.state["w"]["exp_avg"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="'exp_avg'"):
        opt.update(params, {"w": np.ones(64, np.float32)})
    opt.state["w"]["exp_avg"] = st0
    assert np.array_equal(params["w"], w0) and opt.step_count == 2
    buf = fastopt.FlatBuffer({"a": rng.standard_normal(33).astype(np.float32)})
    opt = fastopt.Adam(backend="numba-cuda")
    opt.step(buf)
    opt.step(buf)
    data = buf.groups[0].data
    buf.groups[0].data = np.ones(data.shape[0] + 256, np.float32)
    with pytest.raises(ValueError, match="FlatBuffer"):
        opt.step(buf)
    assert opt.step_count == 2


def test_nonfinite_values_like_the_oracle():
    # the rules run as plain Python here: kernels/fma.py's fused multiply-add and the
    # NaN-propagating AMSGrad max
    n = 8
    p = {be: np.linspace(1, 2, n).astype(np.float32) for be in ("numpy", "numba-cuda")}
    for be, arr in p.items():
        opt = fastopt.RMSProp(lr=0.01, centered=True, backend=be)
        for _ in range(250):  # grad_avg**2 overflows float32 after ~200 steps
            opt.update({"w": arr}, {"w": np.full(n, 1e20, np.float32)})
    assert np.isfinite(p["numba-cuda"]).all()
    np.testing.assert_allclose(p["numba-cuda"], p["numpy"], rtol=1e-6)
    out = {}
    for be in ("numpy", "numba-cuda"):
        w = np.linspace(-1, 1, n).astype(np.float32)
        opt = fastopt.Adam(lr=0.1, amsgrad=True, backend=be)
        opt.update({"w": w}, {"w": np.ones(n, np.float32)})
        opt.state["w"]["max_exp_avg_sq"][1] = np.nan
        opt.state["w"]["exp_avg_sq"][2] = np.nan
        g = np.ones(n, np.float32)
        g[3] = np.nan
        opt.update({"w": w}, {"w": g})
        out[be] = (w, opt.state["w"]["max_exp_avg_sq"].copy())
    for a, b in zip(out["numba-cuda"], out["numpy"]):
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.isnan(a[1:4]).all()
        np.testing.assert_allclose(a[~np.isnan(a)], b[~np.isnan(b)], rtol=1e-6)
