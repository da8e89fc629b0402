"""Numba CUDA kernels under the simulator against the float64 oracle (params and every state).

Not collected by a plain ``pytest`` run (the name does not start with ``test_``):
``tests/test_cudasim.py`` runs this file in a separate pytest process with
``NUMBA_ENABLE_CUDASIM=1``, because the simulator replaces ``numba.cuda`` for the whole process.
Every optimizer and flag variant runs through the public classes with
``backend="numba-cuda"`` on host arrays, which the simulator executes thread by thread: the
grid (4 blocks of 32 threads) is smaller than n, so the grid-stride loop takes several trips.

The default run keeps the configurations of the pairwise cover (``support.cover``; in float64
each class's fullest configuration) and a pairwise cover of each rule's kernel variants; the
others carry the ``exhaustive`` marker, and ``tests/test_cudasim.py`` runs them in a test of
that group.
"""

import os

import numpy as np
import pytest
from fastopt.kernels import device_scalars
from support.cover import marks, matrix_cover, pairwise_by
from support.matrix import FULL, MATRIX, config_id, steps_to_reach, variant_cover
from support.oracle import class_of, resolve, rule_hp, run_oracle, spec_of, state_names
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
_KEPT = [MATRIX[i] for i in matrix_cover()]


def _kept(case, n, dtype):
    """The default run keeps the configurations of the cover and the one-thread launches in
    float32, and each class's fullest configuration in float64 (under the simulator a float64
    kernel runs the same Python as the float32 one; what float64 adds, a stray float32
    rounding, shows in any configuration that reaches the rounded value)."""
    if dtype is np.float64:
        return case in FULL
    return n == 1 or case in _KEPT


@pytest.mark.parametrize(
    "case, n, dtype",
    [
        pytest.param(c, n, d, marks=marks(_kept(c, n, d)), id=f"{config_id(c)}-{n}-{i}")
        for c, n in SIZED
        for d, i in ((np.float32, "f32"), (np.float64, "f64"))
    ],
)
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


_VARIANT_COVER = set(pairwise_by(ncb.variants(), lambda v: v[0], lambda v: v[1]))


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(v, marks=marks(i in _VARIANT_COVER), id=f"{v[0]}-{v[1]}")
        for i, v in enumerate(ncb.variants())
    ],
)
def test_every_kernel_variant_writes_every_element(variant):
    # each compiled variant, straight through the backend, against the same rule run
    # element by element in plain Python: every element's expected value differs from its input,
    # so an index the grid-stride loop skipped or a slot stored from the wrong variable shows
    rule, flags, writes = variant
    rng = np.random.default_rng(len(ncb.variants()) + ncb.variants().index(variant))
    n = 300
    k = tuple(float(x) for x in rng.uniform(0.1, 0.9, len(fastopt.kernels.RULES[rule].scalars)))
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


# -- mixed precision: the numba-cuda kernels generated per storage format -------------------------

#: (rule, hyperparameters, param, grad, state, master, stochastic rounding, grad_scale)
MIXED = [
    (
        "adam",
        dict(lr=0.05, amsgrad=True, weight_decay=0.1),
        "bfloat16",
        "bfloat16",
        "bfloat16",
        False,
        False,
        None,
    ),
    ("adam", dict(lr=0.05), "bfloat16", "float32", "float32", True, False, 8.0),
    (
        "adam",
        dict(lr=0.05, weight_decay=0.1),
        "bfloat16",
        "bfloat16",
        "float32",
        "remainder",
        False,
        None,
    ),
    ("sgd", dict(lr=0.05, momentum=0.9), "bfloat16", "bfloat16", "float32", False, True, None),
    ("rmsprop", dict(lr=0.01, centered=True), "float16", "float16", "float16", False, False, None),
    ("lion", dict(lr=0.01), "float64", "float32", "float32", False, False, 0.5),
]


def _mixed_arrays(rule, pk, gk, sk, master, rng, n=257):
    import ml_dtypes

    dt = {
        "bfloat16": ml_dtypes.bfloat16,
        "float16": np.float16,
        "float32": np.float32,
        "float64": np.float64,
    }
    spec = fastopt.kernels.RULES[rule]
    p = rng.standard_normal(n).astype(dt[pk])
    st = {s: rng.uniform(0.1, 1.0, n) for s in spec.state}
    if "grad_avg" in st:  # centered RMSProp: square_avg >= grad_avg**2 keeps the root real
        st["grad_avg"] = 0.3 * rng.standard_normal(n)
        st["square_avg"] = st["grad_avg"] ** 2 + rng.uniform(0.1, 1.0, n)
    st = {s: a.astype(dt[sk]) for s, a in st.items()}
    grads = [rng.standard_normal(n).astype(dt[gk]) for _ in range(3)]
    m = p.astype(np.float32) if master else None
    if master == "remainder":  # the master's low half; the bfloat16 param is its high half
        p, m = fastopt.precision.split_master(rng.standard_normal(n).astype(np.float32))
    return p, st, grads, m


def _ulps16(a, b):
    o = [x.view(np.uint16).astype(np.int64) for x in (a, b)]
    o = [np.where(x >> 15, -(x & 0x7FFF), x) for x in o]
    return np.abs(o[0] - o[1])


@pytest.mark.parametrize("case", MIXED, ids=lambda c: f"{c[0]}-{c[2]}-{c[4]}")
def test_mixed_precision_kernels_match_the_oracle(case):
    from fastopt import functional as F

    rule, hp, pk, gk, sk, master, sr, scale = case
    spec = fastopt.kernels.RULES[rule]
    out = {}
    for backend in ("numba-cuda", "numpy"):
        p, st, grads, m = _mixed_arrays(rule, pk, gk, sk, master, np.random.default_rng(3))
        for t, g in enumerate(grads, start=2):
            F.run(
                rule,
                p,
                g * (scale or 1),
                st,
                step=t,
                hp=dict(spec.defaults, **hp),
                backend=backend,
                **{"master_remainder" if master == "remainder" else "master_param": m},
                stochastic_rounding=sr,
                seed=4,
                salt=1,
                grad_scale=scale,
            )
        out[backend] = (p, st, m)
    (p, st, m), (rp, rst, rm) = out["numba-cuda"], out["numpy"]
    if master == "remainder":  # the masters the pairs hold
        m, rm = fastopt.precision.join_master(p, m), fastopt.precision.join_master(rp, rm)
    for a, b, what in [(p, rp, "param")] + [(st[s], rst[s], s) for s in st] + [(m, rm, "master")]:
        if a is None:
            continue
        if a.dtype.itemsize == 2:
            d = _ulps16(a, b)
            assert d.max() <= 1 and (d > 0).sum() <= 5, f"{rule} {what}: {d.max()} ulps"
        else:
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6, err_msg=f"{rule} {what}")


def test_capturable_form_reads_scalars_scale_and_found_inf_from_device_memory():
    """The kernel of a capturable step: the host scalars, the grad scale, the found-inf flag
    and the rounding key come from (simulated) device memory; a zero flag gives the host form's
    result, a nonzero one changes nothing."""
    import dataclasses

    from fastopt.kernels import storage

    rule, spec = "adam", fastopt.kernels.RULES["adam"]
    hp = dict(spec.defaults, lr=0.05, weight_decay=0.1)
    flags, k = spec.variant_and_scalars(hp, 3)
    writes = spec.slots_used(flags)
    host = storage.IO("bfloat16", "bfloat16", "float32", sr=True, scale="host")
    dev = dataclasses.replace(host, kbuf=True, found_inf=True, scale="device")
    key = storage.step_key(9, 3)
    results = []
    for io, flag in ((host, 0.0), (dev, 0.0), (dev, 1.0)):
        p, st, grads, _ = _mixed_arrays(
            rule, "bfloat16", "bfloat16", "float32", False, np.random.default_rng(5)
        )
        states = tuple(st[s] if w else None for s, w in zip(spec.state, writes))
        extras = {"inv_scale": 0.25, "salt": 2, "key": key}
        if io.kbuf:
            extras.update(
                kbuf=np.array(k, np.float32),
                scale=np.array([4.0], np.float32),
                found_inf=np.array([flag], np.float32),
                keyp=np.array([key], np.uint32),
            )
        before = p.copy()
        ncb.launch(rule, flags, p, grads[0] * 4, states, k, io=io, extras=extras)
        results.append((before, p, st))
    (_, p0, st0), (_, p1, st1), (b2, p2, _) = results
    assert np.array_equal(p0.view(np.uint16), p1.view(np.uint16))
    for s in st0:
        assert np.array_equal(st0[s], st1[s])
    assert np.array_equal(b2.view(np.uint16), p2.view(np.uint16))


@pytest.mark.parametrize(
    "name,kw",
    [("Adam", dict(lr=0.05, weight_decay=0.1)), ("SGD", dict(lr=0.05, momentum=0.9))],
)
def test_capturable_optimizer_steps_like_the_host_path(name, kw):
    """capturable=True on numba-cuda: the step count and scalars live in (simulated) device
    memory, the scalar kernel computes them, an lr set between steps is written there; the
    results are the host path's, bit for bit (bfloat16 params, stochastic rounding, loss
    scale)."""
    import ml_dtypes

    res = {}
    for cap in (False, True):
        r = np.random.default_rng(1)
        p = {
            "w": r.standard_normal(100).astype(ml_dtypes.bfloat16),
            "v": r.standard_normal(50).astype(np.float32),
        }
        opt = getattr(fastopt, name)(
            **kw, capturable=cap, backend="numba-cuda", stochastic_rounding=True, seed=3
        )
        for t in range(4):
            g = {k: r.standard_normal(v.shape).astype(v.dtype) for k, v in p.items()}
            assert opt.update(p, g, grad_scale=2.0)
            if t == 1:
                opt.lr = kw["lr"] * 0.5
        assert (opt.__dict__.get("_dev") is not None) is cap
        res[cap] = (p, opt.step_count, opt.state_dict())
    assert res[True][1] == res[False][1] == 4
    for k in res[False][0]:
        assert np.array_equal(res[True][0][k].view(np.uint8), res[False][0][k].view(np.uint8))
    assert res[True][2]["step"] == 4


#: the fullest configuration of each class that carries host state and can step capturably
HOST_CAPTURABLE = [
    c
    for c in FULL
    if spec_of(c[0]).host_names
    and device_scalars.capturable(class_of(c[0])._rule, rule_hp(c[0], resolve(*c)))
]


@pytest.mark.parametrize("case", HOST_CAPTURABLE, ids=[config_id(c) for c in HOST_CAPTURABLE])
def test_capturable_host_state_lives_on_the_device(case):
    """A capturable optimizer with host state (NAdam's mu_product) advances it on the device:
    the same params and host state as the host path, bit for bit; ``state_dict`` reads it back
    and ``load_state_dict`` writes it there (before or after the first step), so a resumed run
    continues identically."""
    name, kw = case
    rng = np.random.default_rng(9)
    p0 = rng.standard_normal(64).astype(np.float32)
    grads = [rng.standard_normal(64).astype(np.float32) for _ in range(6)]

    def make(cap):
        return getattr(fastopt, name)(**kw, capturable=cap, backend="numba-cuda")

    runs = {}
    for cap in (False, True):
        opt, p = make(cap), p0.copy()
        for g in grads[:3]:
            assert opt.update({"w": p}, {"w": g})
        sd, p3 = opt.state_dict(), p.copy()
        assert sd["state"]["w"][spec_of(name).host_names[0]].shape == ()
        for g in grads[3:]:
            assert opt.update({"w": p}, {"w": g})
        fresh, q = make(cap), p3.copy()
        fresh.load_state_dict(sd)  # before its first step: seeds the device's copy
        used, r = make(cap), p0.copy()
        used.update({"w": r}, {"w": grads[0]})
        used.load_state_dict(sd)  # after it: written into the device's copy
        r[...] = p3
        for g in grads[3:]:
            assert fresh.update({"w": q}, {"w": g}) and used.update({"w": r}, {"w": g})
        assert (opt.__dict__.get("_dev") is not None) is cap
        assert np.array_equal(q, p) and np.array_equal(r, p)
        assert opt.host_state == fresh.host_state == used.host_state
        runs[cap] = (p, opt.host_state)
    assert np.array_equal(runs[True][0], runs[False][0])
    assert runs[True][1] == runs[False][1]
