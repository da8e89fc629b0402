"""Property-based tests (hypothesis): random shapes (sizes 0 and 1 included), dtypes,
hyperparameters and step counts."""

import os
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.matrix import MATRIX
from support.oracle import resolve, run_oracle, state_names
from support.tolerances import assert_close

import fastopt

CPU = [b for b in ("numpy", "numba") if b in fastopt.available_backends()]
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw):
    """(optimizer name, constructor kwargs): any configuration of the optimizer matrix (every
    class, every probe combination), at a random fraction or multiple of its lr."""
    name, kw = draw(st.sampled_from(MATRIX))
    kw = dict(kw, lr=resolve(name, kw)["lr"] * draw(st.floats(0.1, 2.0)))
    return name, kw


shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


def _cls(name):
    return getattr(fastopt, name)


@SETTINGS
@given(
    cfg=configs(),
    shape=shapes,
    dtype=st.sampled_from([np.float32, np.float64]),
    steps=st.integers(1, 5),
    seed=st.integers(0, 2**32 - 1),
    backend=st.sampled_from(CPU),
    flat=st.booleans(),
)
def test_every_cpu_backend_agrees_with_oracle(cfg, shape, dtype, steps, seed, backend, flat):
    name, kw = cfg
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape)
    grads = [rng.standard_normal(shape) for _ in range(steps)]
    ref_p, ref_state = run_oracle(name, kw, p0, grads)
    opt = _cls(name)(backend=backend, **kw)
    if flat:
        buf = fastopt.FlatBuffer({"p": p0.astype(dtype)})
        for g in grads:
            buf.grads["p"][...] = g.astype(dtype)
            assert opt.step(buf) is True
        param = buf.params["p"]
    else:
        param = p0.astype(dtype)
        for g in grads:
            assert opt.update({"p": param}, {"p": g.astype(dtype)}) is True
    assert param.dtype == dtype and param.shape == shape
    assert_close(param, ref_p, dtype, f"{name} param")
    assert set(opt.state["p"]) == set(state_names(name, resolve(name, kw)))
    for s, ref in ref_state.items():
        assert_close(opt.state["p"][s], ref, dtype, f"{name} state {s}")


@SETTINGS
@given(
    cfg=configs(),
    shape=shapes,
    dtype=st.sampled_from([np.float32, np.float64]),
    steps=st.integers(0, 4),
    seed=st.integers(0, 2**32 - 1),
    backend=st.sampled_from(CPU),
)
def test_state_dict_round_trip_is_lossless(cfg, shape, dtype, steps, seed, backend):
    name, kw = cfg
    rng = np.random.default_rng(seed)
    params = {"a": rng.standard_normal(shape).astype(dtype), "b": rng.standard_normal(3)}
    opt = _cls(name)(backend=backend, **kw)
    for _ in range(steps):
        opt.update(
            params, {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
        )
    sd = opt.state_dict()
    copy = _cls(name)(backend=backend, **kw)
    copy.load_state_dict(sd)
    sd2 = copy.state_dict()
    assert sd2["step"] == sd["step"] and sd2["hyperparams"] == sd["hyperparams"]
    assert sd2["optimizer"] == sd["optimizer"]
    for n, st_ in sd["state"].items():
        for s, a in st_.items():
            assert a.dtype == sd2["state"][n][s].dtype
            assert np.array_equal(a, sd2["state"][n][s])
    # both continue identically, bit for bit
    twin = {k: v.copy() for k, v in params.items()}
    g = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
    opt.update(params, g)
    copy.update(twin, {k: v.copy() for k, v in g.items()})
    for k in params:
        assert np.array_equal(params[k], twin[k])
        for s in opt.state[k]:
            assert np.array_equal(opt.state[k][s], copy.state[k][s])


_SAVED = {}


def _checkpoint_bytes():
    """One checkpoint (Adam with AMSGrad, three parameters, two steps), built once."""
    if not _SAVED:
        rng = np.random.default_rng(5)
        params = {
            "w": rng.standard_normal((4, 3)),
            "b": rng.standard_normal(3).astype(np.float32),
            "e": np.zeros(0),
        }
        opt = fastopt.Adam(amsgrad=True)
        for _ in range(2):
            opt.update(
                params, {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
            )
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "c")
            fastopt.save_checkpoint(path, opt, params)
            with open(path, "rb") as f:
                _SAVED["blob"] = f.read()
    return _SAVED["blob"]


@st.composite
def damage(draw):
    blob = bytearray(_checkpoint_bytes())
    kind = draw(st.sampled_from(["truncate", "flip", "flips", "insert"]))
    if kind == "truncate":
        return bytes(blob[: draw(st.integers(0, len(blob) - 1))])
    if kind == "insert":
        at = draw(st.integers(0, len(blob)))
        return bytes(blob[:at] + draw(st.binary(min_size=1, max_size=8)) + blob[at:])
    for _ in range(1 if kind == "flip" else draw(st.integers(2, 8))):
        at = draw(st.integers(0, len(blob) - 1))
        blob[at] ^= draw(st.integers(1, 255))
    if bytes(blob) == _checkpoint_bytes():  # flips that cancel out: not damage
        blob[0] ^= 1
    return bytes(blob)


@settings(max_examples=60, deadline=None)
@given(blob=damage())
def test_damaged_checkpoint_always_refused(blob):
    rng = np.random.default_rng(6)
    params = {
        "w": rng.standard_normal((4, 3)),
        "b": rng.standard_normal(3).astype(np.float32),
        "e": np.zeros(0),
    }
    opt = fastopt.Adam(amsgrad=True)
    opt.update(params, {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()})
    p0, sd0 = {k: v.copy() for k, v in params.items()}, opt.state_dict()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c")
        with open(path, "wb") as f:
            f.write(blob)
        with pytest.raises(fastopt.CheckpointError):
            fastopt.load_checkpoint(path, opt, params)
    assert all(np.array_equal(params[k], p0[k]) for k in params)
    sd = opt.state_dict()
    assert sd["step"] == sd0["step"] == 1
    for n, st_ in sd["state"].items():
        for s, a in st_.items():
            assert np.array_equal(a, sd0["state"][n][s])


def test_undamaged_checkpoint_loads():
    """The control for the damage property: the intact bytes do load."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c")
        with open(path, "wb") as f:
            f.write(_checkpoint_bytes())
        params = {"w": np.zeros((4, 3)), "b": np.zeros(3, np.float32), "e": np.zeros(0)}
        opt = fastopt.Adam(amsgrad=True)
        fastopt.load_checkpoint(path, opt, params)
    assert opt.step_count == 2 and np.abs(params["w"]).sum() > 0
