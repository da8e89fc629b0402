"""nonfinite=None (PyTorch: NaN/inf flow through), "raise" and "skip", on both APIs."""

import numpy as np
import pytest
from support.matrix import FULL, config_id

import fastopt
from fastopt.optimizers import CLASSES

CPU = [b for b in ("numpy", "numba") if b in fastopt.available_backends()]
KINDS = list(CLASSES.values())


def _setup(rng):
    params = {
        "a": rng.standard_normal(6),
        "b": rng.standard_normal((2, 3)),
        "c": rng.standard_normal(5),
    }
    return params, {k: rng.standard_normal(v.shape) for k, v in params.items()}


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("cls", KINDS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("backend", CPU)
def test_skip_dict_api(backend, cls, bad):
    rng = np.random.default_rng(1)
    params, grads = _setup(rng)
    opt = cls(backend=backend, nonfinite="skip")
    assert opt.update(params, grads) is True
    snap = ({k: v.copy() for k, v in params.items()}, opt.state_dict())
    grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
    grads["c"][3] = bad  # the last parameter
    assert opt.update(params, grads) is False
    assert all(np.array_equal(params[k], snap[0][k]) for k in params)
    sd = opt.state_dict()
    assert sd["step"] == snap[1]["step"] == 1
    for n, st in sd["state"].items():
        for s, a in st.items():
            assert np.array_equal(a, snap[1]["state"][n][s])
    grads["c"][3] = 0.25
    assert opt.update(params, grads) is True and opt.step_count == 2
    assert not np.array_equal(params["a"], snap[0]["a"])


@pytest.mark.parametrize("backend", CPU)
def test_skip_first_step_creates_no_state(backend):
    rng = np.random.default_rng(2)
    params, grads = _setup(rng)
    grads["b"][0, 0] = np.nan
    opt = fastopt.Adam(backend=backend, nonfinite="skip")
    p0 = {k: v.copy() for k, v in params.items()}
    assert opt.update(params, grads) is False
    assert opt.step_count == 0 and opt.state == {}
    assert all(np.array_equal(params[k], p0[k]) for k in params)


@pytest.mark.parametrize("backend", CPU)
def test_raise_names_parameter_and_changes_nothing(backend):
    rng = np.random.default_rng(3)
    params, grads = _setup(rng)
    opt = fastopt.RMSProp(centered=True, backend=backend, nonfinite="raise")
    opt.update(params, grads)
    p0, sd0 = {k: v.copy() for k, v in params.items()}, opt.state_dict()
    grads["c"][[1, 2]] = [np.inf, np.nan]
    with pytest.raises(fastopt.NonFiniteGradientError, match=r"'c'.*1 NaN and 1 inf") as info:
        opt.update(params, grads)
    assert isinstance(info.value, FloatingPointError) and isinstance(info.value, ValueError)
    assert all(np.array_equal(params[k], p0[k]) for k in params)
    assert opt.step_count == 1
    for n, st in opt.state_dict()["state"].items():
        for s, a in st.items():
            assert np.array_equal(a, sd0["state"][n][s])


@pytest.mark.parametrize("cfg", FULL, ids=[config_id(c) for c in FULL])
@pytest.mark.parametrize("policy", ["raise", "skip"])
@pytest.mark.parametrize("backend", CPU)
def test_flat_api_multi_dtype(backend, policy, cfg):
    """A refused or skipped step changes no parameter, no state buffer, neither the step count
    nor the host state (which the next applied step then advances)."""
    name, kw = cfg
    rng = np.random.default_rng(4)
    buf = fastopt.FlatBuffer(
        {
            "a": rng.standard_normal(5),
            "b": rng.standard_normal(7).astype(np.float32),
            "c": rng.standard_normal((2, 2)).astype(np.float32),
        }
    )
    opt = getattr(fastopt, name)(**kw, backend=backend, nonfinite=policy)
    for g in buf.groups:
        g.grad[...] = rng.standard_normal(g.grad.shape)
    assert opt.step(buf) is True
    host0 = opt.host_state
    data0 = [g.data.copy() for g in buf.groups]
    state0 = [{s: a.copy() for s, a in f.items()} for f in opt._flat_state]
    buf.grads["c"][1, 1] = np.nan  # last parameter of the last dtype group
    if policy == "skip":
        assert opt.step(buf) is False
    else:
        with pytest.raises(fastopt.NonFiniteGradientError, match="'c'"):
            opt.step(buf)
    assert opt.step_count == 1 and opt.host_state == host0
    for g, d in zip(buf.groups, data0):
        assert np.array_equal(g.data, d)
    for f, f0 in zip(opt._flat_state, state0):
        assert all(np.array_equal(f[s], f0[s]) for s in f)
    buf.grads["c"][1, 1] = 0.5
    assert opt.step(buf) is True and opt.step_count == 2
    spec = fastopt.kernels.RULES[opt._rule]
    hp = {**opt.hyperparams, **opt._pinned}
    assert opt.host_state == spec.advance_host_state(hp, 2, host0)


@pytest.mark.parametrize("backend", CPU)
def test_default_lets_nan_flow_through_like_pytorch(backend):
    rng = np.random.default_rng(5)
    params, grads = _setup(rng)
    grads["a"][2] = np.nan
    opt = fastopt.Adam(backend=backend)
    assert opt.nonfinite is None
    assert opt.update(params, grads) is True and opt.step_count == 1
    assert np.isnan(params["a"][2]) and np.isfinite(np.delete(params["a"], 2)).all()
    assert np.isfinite(params["b"]).all()
    assert np.isnan(opt.state["a"]["exp_avg"][2])
