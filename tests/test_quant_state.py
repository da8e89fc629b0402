"""Quantized state in the optimizer classes: the dict API and FlatBuffer steps agree, state
dicts and checkpoints carry ``<slot>.codes``/``<slot>.absmax`` and round-trip bit for bit, and
full-precision state converts both ways (an fp32 state dict loaded into an 8-bit optimizer is
quantized as a step would store it; ``full_precision_state`` dequantizes for an fp32 one)."""

import numpy as np
import pytest
from fastopt.kernels import quant

import fastopt
from fastopt import _quantized as Q
from fastopt.checkpoint import load_checkpoint, save_checkpoint

SHAPES = {"w": (30, 20), "b": (300,), "s": (7,)}


def _params(rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_dict_and_flatbuffer_agree_and_state_names(fmt):
    rng = np.random.default_rng(0)
    params = _params(rng)
    buf = fastopt.FlatBuffer({k: v.copy() for k, v in params.items()})
    a, b = fastopt.AdamW(lr=0.01, state_dtype=fmt), fastopt.AdamW(lr=0.01, state_dtype=fmt)
    for _ in range(3):
        g = _grads(rng)
        a.update(params, g)
        for k in g:
            buf.grads[k][...] = g[k]
        b.step(buf)
    for k, shape in SHAPES.items():
        assert np.array_equal(buf.params[k], params[k])
        st = a.state[k]
        assert sorted(st) == [
            "exp_avg.absmax",
            "exp_avg.codes",
            "exp_avg_sq.absmax",
            "exp_avg_sq.codes",
        ]
        assert st["exp_avg.codes"].dtype == np.uint8 and st["exp_avg.codes"].shape == shape
        assert st["exp_avg.absmax"].shape == (quant.nblocks(int(np.prod(shape))),)
        for s in st:
            assert np.array_equal(st[s], b.state[k][s])


@pytest.mark.parametrize("fmt", quant.ALL_FORMATS)
def test_state_dict_and_checkpoint_round_trip(fmt, tmp_path):
    rng = np.random.default_rng(1)
    params = _params(rng)
    opt = fastopt.Adam(lr=0.01, state_dtype=fmt)
    for _ in range(2):
        opt.update(params, _grads(rng))
    sd = opt.state_dict()
    save_checkpoint(tmp_path / "c.fopt", opt, params)
    g = _grads(rng)
    p1 = {k: v.copy() for k, v in params.items()}
    opt.update(p1, g)
    # resumed from the state dict, and from the checkpoint: the same next step, bit for bit
    for how in ("state_dict", "checkpoint"):
        o2 = fastopt.Adam(lr=0.01, state_dtype=fmt)
        p2 = {k: v.copy() for k, v in params.items()}
        if how == "state_dict":
            o2.load_state_dict(sd)
        else:
            load_checkpoint(tmp_path / "c.fopt", o2, p2)
        o2.update(p2, g)
        for k in params:
            assert np.array_equal(p1[k], p2[k])
            for s in opt.state[k]:
                assert np.array_equal(opt.state[k][s], o2.state[k][s])


def test_full_precision_state_converts_both_ways():
    rng = np.random.default_rng(2)
    params = _params(rng)
    f32 = fastopt.Adam(lr=0.01)
    for _ in range(3):
        f32.update(params, _grads(rng))
    sd32 = f32.state_dict()
    q8 = fastopt.Adam(lr=0.01, state_dtype="int8")
    q8.load_state_dict(sd32)  # quantized on load
    sdq = q8.state_dict()
    for k in params:
        for s, qm in (("exp_avg", "signed"), ("exp_avg_sq", "unsigned")):
            codes, absmax = Q.quantize(sd32["state"][k][s], "int8", qm)
            assert np.array_equal(sdq["state"][k][f"{s}.codes"].reshape(-1), codes)
            assert np.array_equal(sdq["state"][k][f"{s}.absmax"], absmax)
    back = Q.full_precision_state(sdq, "adam", "int8")
    f32b = fastopt.Adam(lr=0.01)
    f32b.load_state_dict(back)
    for k in params:
        for s in ("exp_avg", "exp_avg_sq"):
            a, b = sd32["state"][k][s], f32b.state_dict()["state"][k][s]
            assert a.shape == b.shape and a.dtype == b.dtype == np.float32
            amax = np.abs(a).max()
            assert np.abs(a - b).max() <= 0.0071 * amax  # half the map's widest gap
    # a quantized state dict is refused by an fp32 optimizer as it is (names differ), and
    # refused whole: nothing changed
    with pytest.raises(KeyError, match="codes"):
        fastopt.Adam(lr=0.01).load_state_dict(sdq)


def test_load_refuses_bad_quantized_buffers():
    rng = np.random.default_rng(3)
    params = _params(rng)
    opt = fastopt.Adam(lr=0.01, state_dtype="int8")
    opt.update(params, _grads(rng))
    sd = opt.state_dict()
    before = {k: {s: a.copy() for s, a in st.items()} for k, st in opt.state.items()}
    bad = dict(sd, state={k: dict(v) for k, v in sd["state"].items()})
    bad["state"]["b"]["exp_avg.absmax"] = np.zeros(5, np.float32)  # 2 blocks, not 5
    with pytest.raises(ValueError, match="absmax"):
        opt.load_state_dict(bad)
    bad["state"]["b"]["exp_avg.absmax"] = sd["state"]["b"]["exp_avg.absmax"]
    bad["state"]["b"]["exp_avg.codes"] = sd["state"]["b"]["exp_avg.codes"].astype(np.int16)
    with pytest.raises(ValueError, match="codes"):
        opt.load_state_dict(bad)
    for k, st in opt.state.items():
        for s, a in st.items():
            assert np.array_equal(a, before[k][s])


def test_policy_refusals():
    with pytest.raises(ValueError, match="state_dtype"):
        fastopt.Adam(state_dtype="int2")
    opt = fastopt.Adam(state_dtype="int8")
    p = {"x": np.ones(4)}  # float64 params: quantized state is float32 math
    with pytest.raises(TypeError, match="float32"):
        opt.update(p, {"x": np.ones(4)})
    assert opt.step_count == 0 and not opt.state


def test_backend_without_quantized_state_refuses_before_anything_changes():
    """A backend module that does not declare QUANT_STATE is refused by every door before
    anything is written (checked with the backends' protocol test double: a module with only
    ``launch``, registered as a CPU backend)."""
    from fastopt import _quantized as Q2

    class Fake:
        NAME = "fake"

    with pytest.raises(TypeError, match="quantized state"):
        Q2.check_backend(Fake, "int8")
    Q2.check_backend(Fake, None)  # nothing to refuse without quantized state
    from fastopt.backends import numba_backend, numpy_backend

    for be in (numba_backend, numpy_backend):
        Q2.check_backend(be, "int8")


def test_a_step_refuses_bad_quantized_buffers_before_writing():
    """A state buffer rebound to the wrong dtype or length (the dict API re-checks rebound
    state) is refused by the next step, which changes nothing."""
    rng = np.random.default_rng(4)
    params = _params(rng)
    opt = fastopt.Adam(lr=0.01, state_dtype="int8")
    opt.update(params, _grads(rng))
    good = {k: v.copy() for k, v in params.items()}
    saved = {k: {s: a.copy() for s, a in st.items()} for k, st in opt.state.items()}
    for s, bad in (
        ("exp_avg.codes", saved["b"]["exp_avg.codes"].astype(np.int8)),
        ("exp_avg_sq.absmax", np.zeros(3, np.float32)),
        ("exp_avg.absmax", np.zeros((2, 1), np.float32)),
    ):
        opt.state["b"][s] = bad
        with pytest.raises(ValueError, match=s.replace(".", r"\.")):
            opt.update(params, _grads(rng))
        opt.state["b"][s] = saved["b"][s].copy()
        assert opt.step_count == 1
        for k in params:
            assert np.array_equal(params[k], good[k])
            for t, a in opt.state[k].items():
                assert np.array_equal(a, saved[k][t])


def test_bfloat16_params_with_a_master_and_int8_state_follow_the_float32_run():
    """bfloat16 params with an fp32 master and int8 state: the master steps exactly as float32
    params with int8 state do (the same codes), and the param is the master rounded."""
    bf16 = pytest.importorskip("ml_dtypes").bfloat16
    rng = np.random.default_rng(5)
    p0 = rng.standard_normal(1000).astype(bf16)
    a = fastopt.Adam(lr=1e-2, state_dtype="int8", master_weights=True)
    b = fastopt.Adam(lr=1e-2, state_dtype="int8")
    pa, pb = {"w": p0.copy()}, {"w": p0.astype(np.float32)}
    for _ in range(3):
        g = rng.standard_normal(1000).astype(bf16)
        a.update(pa, {"w": g})
        b.update(pb, {"w": g.astype(np.float32)})
    assert np.array_equal(a.state["w"]["master_param"], pb["w"])
    assert np.array_equal(pa["w"], pb["w"].astype(bf16))
    for s in b.state["w"]:
        assert np.array_equal(a.state["w"][s], b.state["w"][s])
