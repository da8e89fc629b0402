"""The public surface (the README's Use section): both calling conventions, checkpoints,
schedules, state names, aliases, backend selection, lazy imports and the functional entry points."""

import copy
import pickle
import subprocess
import sys

import numpy as np
import pytest
from conftest import backend_params
from support.cover import marks
from support.matrix import FULL, config_id
from support.oracle import (
    TORCH_DEFAULTS,
    initial_state,
    oracle_step,
    resolve,
    rule_hp,
    run_oracle,
    spec_of,
    state_names,
)
from support.tolerances import assert_close

import fastopt
from fastopt import functional as F
from fastopt.optimizers import CLASSES

#: one configuration per optimizer that uses every state buffer it can have
FULL_IDS = [config_id(c) for c in FULL]

#: shapes of a small model; sizes 20000 + 20000 keep each parameter below the numba backend's
#: parallel threshold while the packed buffer is above it (serial and parallel loops must agree)
SHAPES = {"w1": (20, 1000), "b1": (20000,), "w2": (7, 11), "b2": (1,), "s": ()}


def _model(rng, dtypes=(np.float32,)):
    params = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        dt = dtypes[i % len(dtypes)]
        params[name] = np.asarray(rng.standard_normal(shape), dtype=dt)
    return params


def _grads(rng, params):
    return {n: np.asarray(rng.standard_normal(p.shape), dtype=p.dtype) for n, p in params.items()}


def _make(name, kwargs, backend):
    return getattr(fastopt, name)(**kwargs, backend=backend)


# --- dict API == flat API, bit for bit ---------------------------------------------------------


@pytest.mark.parametrize(
    "dtypes",
    [
        pytest.param((np.float32,), id="f32"),
        # the packed float64 buffer reaches the float64 build of the parallel loop, the same loop
        # as the float32 one at another width (test_parity keeps the parallel loop at float32);
        # "mixed" keeps a float64 group beside a float32 one, on the serial float64 loop
        pytest.param((np.float64,), id="f64", marks=marks(False)),
        pytest.param((np.float32, np.float64), id="mixed"),
    ],
)
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("cfg", FULL, ids=FULL_IDS)
def test_dict_and_flat_api_agree_bit_for_bit(cfg, backend, dtypes, rng):
    name, kwargs = cfg
    params = _model(rng, dtypes)
    grads = [_grads(rng, params) for _ in range(3)]
    d_params = {n: p.copy() for n, p in params.items()}
    d_opt, f_opt = _make(name, kwargs, backend), _make(name, kwargs, backend)
    buf = fastopt.FlatBuffer(params)
    assert len(buf.groups) == len(dtypes)
    for g in grads:
        d_opt.update(d_params, g)
        for n, a in g.items():
            buf.grads[n][...] = a
        f_opt.step(buf)
    for n in params:
        assert buf.params[n].shape == params[n].shape and buf.params[n].dtype == params[n].dtype
        assert not np.array_equal(buf.params[n], params[n]), f"{n} did not move"
        assert np.array_equal(buf.params[n], d_params[n]), f"param {n}"
        assert set(f_opt.state[n]) == set(d_opt.state[n])
        for s in d_opt.state[n]:
            assert np.array_equal(np.asarray(f_opt.state[n][s]), np.asarray(d_opt.state[n][s])), (
                f"state {s} of {n}"
            )


def test_flatbuffer_layout_and_alignment(rng):
    params = _model(rng, (np.float32, np.float64))
    buf = fastopt.FlatBuffer(params)
    assert {g.dtype for g in buf.groups} == {np.dtype(np.float32), np.dtype(np.float64)}
    opt = fastopt.Adam(amsgrad=True, backend="numba")
    opt.step(buf)
    for group in buf.groups:
        assert group.data.flags.c_contiguous and group.data.ndim == 1
        assert group.grad.shape == group.data.shape
    for n, p in params.items():
        view = buf.params[n]
        assert view.shape == p.shape and view.dtype == p.dtype
        # views of the flat buffers, each segment on a >= 16-byte boundary
        group = next(g for g in buf.groups if n in g.slots)
        assert np.shares_memory(view, group.data) and np.shares_memory(buf.grads[n], group.grad)
        for arr in [view, buf.grads[n], *opt.state[n].values()]:
            assert arr.__array_interface__["data"][0] % 16 == 0, f"{n} is not 16-byte aligned"
    with pytest.raises(ValueError):
        buf.data  # noqa: B018 - two dtypes: no single flat buffer
    single = fastopt.FlatBuffer(_model(rng))
    assert single.data is single.groups[0].data and single.grad is single.groups[0].grad
    # values were copied in, and the views write through to the flat buffer
    assert np.array_equal(buf.params["w2"], params["w2"])
    single.params["b2"][...] = 3.5
    off = single.groups[0].slots["b2"][0]
    assert single.data[off] == np.float32(3.5)


# --- state_dict --------------------------------------------------------------------------------


def _run(opt, api, params, grads):
    """Step ``opt`` through ``grads`` with the dict or flat API; params are updated in place."""
    if api == "dict":
        for g in grads:
            opt.update(params, g)
        return params
    buf = params
    for g in grads:
        for n, a in g.items():
            buf.grads[n][...] = a
        opt.step(buf)
    return buf


@pytest.mark.parametrize("api", ["dict", "flat"])
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("cfg", FULL, ids=FULL_IDS)
def test_state_dict_round_trip_resumes_bit_identically(cfg, backend, api, rng):
    name, kwargs = cfg
    params = _model(rng, (np.float32, np.float64))
    grads = [_grads(rng, params) for _ in range(10)]

    def fresh():
        p = {n: a.copy() for n, a in params.items()}
        return fastopt.FlatBuffer(p) if api == "flat" else p

    straight = _run(_make(name, kwargs, backend), api, fresh(), grads)

    first = _make(name, kwargs, backend)
    half = _run(first, api, fresh(), grads[:5])
    sd = first.state_dict()
    sd = pickle.loads(pickle.dumps(copy.deepcopy(sd)))  # plain data: survives a checkpoint file
    assert sd["step"] == 5 and sd["optimizer"] == type(first).__name__
    assert all(isinstance(a, np.ndarray) for st in sd["state"].values() for a in st.values())
    # the saved arrays are copies: stepping the old optimizer does not change them
    before = {n: {s: a.copy() for s, a in st.items()} for n, st in sd["state"].items()}
    _run(first, api, copy.deepcopy(half) if api == "dict" else half, grads[5:6])
    assert all(np.array_equal(sd["state"][n][s], before[n][s]) for n in before for s in before[n])

    # load into a new optimizer before its first step ...
    resumed = _make(name, kwargs, backend)
    resumed.load_state_dict(sd)
    assert resumed.step_count == 5
    half_again = _run(_make(name, kwargs, backend), api, fresh(), grads[:5])
    out = _run(resumed, api, half_again, grads[5:])

    # ... and into one that has already stepped (its state is overwritten)
    used = _make(name, kwargs, backend)
    other = _run(used, api, fresh(), grads[:2])
    used.load_state_dict(sd)
    half_third = _run(_make(name, kwargs, backend), api, fresh(), grads[:5])
    if api == "dict":
        for n in other:
            other[n][...] = half_third[n]
    else:
        for g_other, g_src in zip(other.groups, half_third.groups):
            g_other.data[...] = g_src.data
    out2 = _run(used, api, other, grads[5:])

    get = (lambda r: r) if api == "dict" else (lambda r: r.params)
    for n in params:
        assert np.array_equal(get(out)[n], get(straight)[n]), f"param {n} after resume"
        assert np.array_equal(get(out2)[n], get(straight)[n]), f"param {n} after resume (used)"


def test_state_dict_is_rejected_by_the_wrong_optimizer(rng):
    params = _model(rng)
    opt = fastopt.Adam(backend="numpy")
    opt.update(params, _grads(rng, params))
    with pytest.raises(ValueError, match="Adam"):
        fastopt.AdamW(backend="numpy").load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="amsgrad"):
        fastopt.Adam(amsgrad=True, backend="numpy").load_state_dict(opt.state_dict())


# --- schedules ---------------------------------------------------------------------------------


def _lr_matters_after_step_one(name, kwargs):
    """Does the rule read lr after the first step (its scalars or its host state)?"""
    spec, hp = spec_of(name), rule_hp(name, resolve(name, kwargs))
    other = dict(hp, lr=hp["lr"] * 0.5)
    hs = spec.initial_host_state(hp)
    return spec.variant_and_scalars(hp, 2, hs) != spec.variant_and_scalars(
        other, 2, hs
    ) or spec.advance_host_state(hp, 2, hs) != spec.advance_host_state(other, 2, hs)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("cfg", FULL, ids=FULL_IDS)
def test_lr_changed_mid_run_takes_effect(cfg, backend, rng):
    name, kwargs = cfg
    n, steps = 1001, 6
    p0 = rng.standard_normal(n)
    grads = [rng.standard_normal(n) for _ in range(steps)]
    lr = resolve(name, kwargs)["lr"]
    lrs = [lr * f for f in (1.0, 1.0, 0.5, 0.25, 2.0, 0.1)]
    opt = _make(name, kwargs, backend)
    p = p0.copy()
    for lr, g in zip(lrs, grads):
        opt.lr = lr
        opt.update({"w": p}, {"w": g})
    p_ref, s_ref = run_oracle(name, kwargs, p0, grads, lrs=lrs)
    p_const, _ = run_oracle(name, kwargs, p0, grads)
    if _lr_matters_after_step_one(name, kwargs):
        assert not np.allclose(p_ref, p_const), "the schedule must change the trajectory"
    else:  # Rprop: lr only seeds the step sizes, at the first step (as in torch)
        assert np.array_equal(p_ref, p_const)
    assert_close(p, p_ref, np.float64, f"{name} param with an lr schedule")
    for s, ref in s_ref.items():
        assert_close(opt.state["w"][s], ref, np.float64, f"{name} {s} with an lr schedule")


def test_changing_hyperparameters_does_not_recompile(rng):
    from fastopt.backends import numba_backend

    n = 1001
    p, g = rng.standard_normal(n), rng.standard_normal(n)
    opt = fastopt.Adam(lr=1e-2, backend="numba")
    opt.update({"w": p}, {"w": g})
    flags = dict(maximize=False, decay=False, decoupled=False, amsgrad=False)
    fn = numba_backend.kernel("adam", flags, (True, True, False), False)
    signatures = list(fn.signatures)
    assert signatures, "the variant was not compiled by the first step"
    for lr in (1e-3, 5e-2, 0.3):
        opt.lr, opt.betas, opt.eps = lr, (0.8, 0.9), 1e-6
        opt.update({"w": p}, {"w": g})
    assert list(fn.signatures) == signatures


# --- state names, defaults, aliases ------------------------------------------------------------


@pytest.mark.parametrize("api", ["dict", "flat"])
@pytest.mark.parametrize("cfg", FULL, ids=FULL_IDS)
def test_state_is_exposed_as_live_views_under_pytorch_names(cfg, api, rng):
    name, kwargs = cfg
    params = {"a": rng.standard_normal((3, 5)), "b": rng.standard_normal(7)}
    opt = _make(name, kwargs, "numba")
    buf = fastopt.FlatBuffer(params) if api == "flat" else {k: v.copy() for k, v in params.items()}
    g = _grads(rng, params)
    _run(opt, api, buf, [g])
    expected = set(state_names(name, resolve(name, kwargs)))
    for k in params:
        assert set(opt.state[k]) == expected
        for s, a in opt.state[k].items():
            assert a.shape == params[k].shape and a.dtype == params[k].dtype, f"{s} of {k}"
    # writing into a state view changes what the next step reads: the views are the live state
    ps = buf if api == "dict" else buf.params
    start = {k: np.array(ps[k]) for k in params}
    planted = {k: {s: rng.uniform(0.5, 1.5, params[k].shape) for s in expected} for k in params}
    if "grad_avg" in expected:  # centered RMSProp needs v > grad_avg² for a real root
        for k in params:
            planted[k]["grad_avg"] *= 0.1
    for k in params:
        for s in expected:
            opt.state[k][s][...] = planted[k][s]
    _run(opt, api, buf, [g])
    hp = resolve(name, kwargs)
    for k in params:
        p_ref, st_ref = (
            start[k].reshape(-1).copy(),
            {s: planted[k][s].reshape(-1).copy() for s in expected},
        )
        oracle_step(name, hp, p_ref, g[k].reshape(-1), st_ref, 2)
        assert_close(np.asarray(ps[k]).reshape(-1), p_ref, np.float64, f"{name} param {k}")


@pytest.mark.parametrize("name", list(TORCH_DEFAULTS))
def test_defaults_are_pytorch_defaults(name):
    opt = getattr(fastopt, name)()
    hp = opt.hyperparams
    assert set(hp) == set(TORCH_DEFAULTS[name]), f"{name}'s hyperparameters"
    for k, v in TORCH_DEFAULTS[name].items():
        assert hp[k] == (tuple(v) if isinstance(v, list) else v), f"{name}.{k}"


def test_aliases():
    assert fastopt.Adagrad is fastopt.AdaGrad
    assert fastopt.RMSprop is fastopt.RMSProp
    for name in (*CLASSES, "Adagrad", "RMSprop", "FlatBuffer", "available_backends"):
        assert name in fastopt.__all__ and hasattr(fastopt, name)
    for name, cls in CLASSES.items():  # every registered class is exported under its name
        assert getattr(fastopt, name) is cls
    assert issubclass(fastopt.Momentum, fastopt.SGD) and issubclass(fastopt.AdamW, fastopt.Adam)


# --- backends ----------------------------------------------------------------------------------


def test_available_backends():
    from fastopt.backends import BACKENDS

    names = fastopt.available_backends()
    assert isinstance(names, list) and all(isinstance(b, str) for b in names)
    assert names[:2] == ["numpy", "numba"]  # both CPU backends run everywhere
    assert set(names) <= set(BACKENDS)
    assert names == [b for b in BACKENDS if b in names], "listed in the registry's order"


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="nope"):
        fastopt.Adam(backend="nope")
    with pytest.raises(ValueError, match="nope"):
        F.sgd(np.ones(3), np.ones(3), step=1, lr=0.1, backend="nope")


@pytest.mark.parametrize("name", ["numba-cuda", "cupy"])
def test_unavailable_backend_raises_instead_of_falling_back(name):
    if name in fastopt.available_backends():
        pytest.skip(f"{name} is available here")
    with pytest.raises(RuntimeError, match=name):
        fastopt.Adam(backend=name)


def test_auto_picks_numba_for_numpy_arrays():
    from fastopt.backends import resolve as resolve_backend

    assert resolve_backend("auto", np.ones(3)).NAME == "numba"
    assert fastopt.SGD().backend == "auto"


def test_import_fastopt_imports_no_optional_module():
    code = (
        "import sys, fastopt\n"
        "bad = [m for m in ('cupy', 'numba.cuda', 'torch', 'matplotlib', 'sklearn', "
        "'cuda', 'pytest') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "", f"import fastopt imported {res.stdout.strip()}"


# --- functional entry points -------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cfg", FULL, ids=FULL_IDS)
def test_functional_entry_points(cfg, backend, dtype, rng):
    """Each class's fullest configuration through its rule's functional entry point (AdamW as
    ``adam(decoupled_weight_decay=True)``), every state slot passed, host state carried in a
    dict that each call advances in place; params, every slot and the host state against the
    oracle."""
    name, kw = cfg
    n, steps = 1001, 7
    p0 = rng.standard_normal(n).astype(dtype)
    # bounded away from zero, so float32 and float64 never step in opposite directions
    grads = [
        (np.where(rng.random(n) < 0.5, -1.0, 1.0) * rng.uniform(0.6, 2.0, n)).astype(dtype)
        for _ in range(steps)
    ]
    spec, hp = spec_of(name), rule_hp(name, resolve(name, kw))
    fn = getattr(F, spec.name)
    start = initial_state(name, resolve(name, kw), p0)
    states = {s: start.get(s) for s in spec.state}
    extra = {"host_state": {h: float(start[h]) for h in spec.host_names}} if spec.host_names else {}
    p = p0.copy()
    for t, g in enumerate(grads, start=1):
        fn(p, g, *states.values(), step=t, backend=backend, **hp, **extra)
    p_ref, s_ref, h_ref = run_oracle(name, kw, p0, grads, host=True)
    assert_close(p, p_ref, dtype, f"functional {spec.name} param")
    for s, ref in s_ref.items():
        assert_close(states[s], ref, dtype, f"functional {spec.name} {s}")
    if extra:
        assert extra["host_state"] == h_ref, "host state advanced in place"
