"""Checkpoints: bit-identical resume, atomic save, refusal of damaged or mismatched files."""

import os

import numpy as np
import pytest
from support.matrix import FULL, config_id

import fastopt
from fastopt import checkpoint as ckpt
from fastopt.optimizers import CLASSES

CPU = [b for b in ("numpy", "numba") if b in fastopt.available_backends()]
#: every class, in its fullest configuration (every state buffer, its host state)
CONFIGS = [(CLASSES[name], kw) for name, kw in FULL]
IDS = [config_id(c) for c in FULL]


def _shapes():
    return {
        "w": ((3, 4), np.float32),
        "b": ((4,), np.float32),
        "one": ((1,), np.float64),
        "empty": ((0,), np.float64),
        "big": ((300,), np.float64),
    }


def _params(rng):
    return {n: rng.standard_normal(s).astype(d) for n, (s, d) in _shapes().items()}


def _poisoned():
    return {n: np.full(s, np.nan, d) for n, (s, d) in _shapes().items()}


def _grad_seq(n_steps):
    rng = np.random.default_rng(99)
    return [
        {n: rng.standard_normal(s).astype(d) for n, (s, d) in _shapes().items()}
        for _ in range(n_steps)
    ]


def _step(opt, target, g, flat):
    if flat:
        for n, a in g.items():
            target.grads[n][...] = a
        return opt.step(target)
    return opt.update(target, g)


def _assert_same(opt_a, pa, opt_b, pb):
    for n in pa:
        assert np.array_equal(pa[n], pb[n]), f"param {n!r} differs"
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["step"] == sb["step"] and sa["hyperparams"] == sb["hyperparams"]
    assert set(sa["state"]) == set(sb["state"])
    for n, st in sa["state"].items():
        for s, a in st.items():
            assert np.array_equal(a, sb["state"][n][s]), f"state {s!r} of {n!r} differs"


@pytest.mark.parametrize("flat", [False, True], ids=["dict", "flat"])
@pytest.mark.parametrize("cls, kw", CONFIGS, ids=IDS)
@pytest.mark.parametrize("backend", CPU)
def test_resume_is_bit_identical(tmp_path, backend, cls, kw, flat):
    grads = _grad_seq(10)
    lrs = [0.01 * (1 + 0.3 * t) for t in range(10)]  # a schedule: lr is saved too

    def make(params):
        return fastopt.FlatBuffer(params) if flat else params

    def view(t):
        return t.params if flat else t

    full_opt, full = cls(backend=backend, **kw), make(_params(np.random.default_rng(0)))
    for t in range(10):
        full_opt.lr = lrs[t]
        assert _step(full_opt, full, grads[t], flat)

    opt, run = cls(backend=backend, **kw), make(_params(np.random.default_rng(0)))
    for t in range(4):
        opt.lr = lrs[t]
        _step(opt, run, grads[t], flat)
    path = tmp_path / "run.ckpt"
    fastopt.save_checkpoint(path, opt, run)

    resumed_opt, resumed = cls(backend=backend, **kw), make(_poisoned())
    fastopt.load_checkpoint(path, resumed_opt, resumed)
    assert resumed_opt.step_count == 4 and resumed_opt.lr == lrs[3]
    for t in range(4, 10):
        resumed_opt.lr = lrs[t]
        _step(resumed_opt, resumed, grads[t], flat)
    _assert_same(full_opt, view(full), resumed_opt, view(resumed))


def test_load_into_stepped_optimizer_restores_in_place(tmp_path):
    rng = np.random.default_rng(1)
    params = _params(rng)
    opt = fastopt.Adam(amsgrad=True)
    opt.update(params, _grad_seq(1)[0])
    fastopt.save_checkpoint(tmp_path / "a", opt, params)
    saved = {n: a.copy() for n, a in params.items()}
    sd = opt.state_dict()
    views = {n: dict(st) for n, st in opt.state.items()}
    for g in _grad_seq(3):
        opt.update(params, g)
    fastopt.load_checkpoint(tmp_path / "a", opt, params)
    assert opt.step_count == 1
    for n in params:
        assert np.array_equal(params[n], saved[n])
        for s, a in opt.state[n].items():
            assert a is views[n][s]  # the same buffers, rewritten in place
            assert np.array_equal(a, sd["state"][n][s])


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(2)
    params = _params(rng)
    opt = fastopt.RMSProp(centered=True)
    for g in _grad_seq(2):
        opt.update(params, g)
    path = tmp_path / "ckpt.fo"
    fastopt.save_checkpoint(path, opt, params)
    return path, opt, params


def _fresh_target(opt):
    """A stepped optimizer and params, different from the file's, to prove nothing changes."""
    params = _params(np.random.default_rng(7))
    target = type(opt)(**dict(opt.hyperparams.items()))
    target.update(params, _grad_seq(3)[2])
    return target, params


def _assert_target_unchanged(target, params, snap):
    p0, sd0 = snap
    assert all(np.array_equal(params[n], p0[n]) for n in params)
    sd = target.state_dict()
    assert sd["step"] == sd0["step"] and sd["hyperparams"] == sd0["hyperparams"]
    for n, st in sd["state"].items():
        for s, a in st.items():
            assert np.array_equal(a, sd0["state"][n][s])


def _snap(target, params):
    return {n: a.copy() for n, a in params.items()}, target.state_dict()


@pytest.mark.parametrize(
    "damage",
    [
        "truncate-prefix",
        "truncate-payload",
        "append",
        "flip-magic",
        "flip-version",
        "flip-length",
        "flip-digest",
        "flip-header",
        "flip-payload",
        "empty",
        "foreign",
    ],
)
def test_damaged_file_refused(saved, damage):
    path, opt, _ = saved
    blob = bytearray(path.read_bytes())
    head = ckpt._HEAD
    hlen = int.from_bytes(blob[12:20], "little")
    if damage == "truncate-prefix":
        blob = blob[:20]
    elif damage == "truncate-payload":
        blob = blob[:-5]
    elif damage == "append":
        blob += b"\0"
    elif damage == "empty":
        blob = b""
    elif damage == "foreign":
        blob = b"PK\x03\x04" + bytes(200)
    else:
        at = {
            "flip-magic": 2,
            "flip-version": 8,
            "flip-length": 21,
            "flip-digest": 40,
            "flip-header": head + hlen // 2,
            "flip-payload": len(blob) - 3,
        }[damage]
        blob[at] ^= 0x10
    path.write_bytes(bytes(blob))
    target, params = _fresh_target(opt)
    snap = _snap(target, params)
    with pytest.raises(fastopt.CheckpointError):
        fastopt.load_checkpoint(path, target, params)
    _assert_target_unchanged(target, params, snap)


def test_mismatched_targets_refused(saved):
    path, opt, _ = saved
    target, params = _fresh_target(opt)
    snap = _snap(target, params)
    cases = [
        (fastopt.Adam(), params, ValueError, "RMSProp"),
        (fastopt.RMSProp(centered=False), params, ValueError, "centered"),
        (target, {k: v for k, v in params.items() if k != "big"}, KeyError, "big"),
        (target, dict(params, extra=np.zeros(3)), KeyError, "extra"),
        (target, dict(params, w=params["w"].astype(np.float64)), ValueError, "'w'"),
        (target, dict(params, big=np.zeros(301)), ValueError, "'big'"),
    ]
    for opt_, params_, exc, word in cases:
        with pytest.raises(exc, match=word):
            fastopt.load_checkpoint(path, opt_, params_)
    _assert_target_unchanged(target, params, snap)
    # a target stepped on other parameter names refuses the file's optimizer state
    other = {k + "_x": v.copy() for k, v in params.items()}
    stepped = fastopt.RMSProp(centered=True)
    stepped.update(other, {k: np.ones_like(v) for k, v in other.items()})
    with pytest.raises(KeyError):
        fastopt.load_checkpoint(path, stepped, params)
    _assert_target_unchanged(target, params, snap)


@pytest.mark.parametrize("fail_at", ["write", "fsync", "replace"])
def test_failed_save_keeps_previous_file(saved, monkeypatch, fail_at):
    path, opt, params = saved
    before = path.read_bytes()
    for g in _grad_seq(2):
        opt.update(params, g)

    def boom(*a, **k):
        raise OSError(f"simulated {fail_at} failure")

    if fail_at == "write":  # the write itself fails half-way through the chunks
        monkeypatch.setattr(
            ckpt, "_atomic_write", lambda p, chunks: _original_atomic_write(p, _failing(chunks))
        )
    else:
        monkeypatch.setattr(ckpt.os, fail_at, boom)
    with pytest.raises(OSError, match="simulated"):
        fastopt.save_checkpoint(path, opt, params)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == [path.name]  # no temporary file left behind
    # and the old file still loads
    target = fastopt.RMSProp(centered=True)
    fastopt.load_checkpoint(path, target, _poisoned())
    assert target.step_count == 2


_original_atomic_write = ckpt._atomic_write


def _failing(chunks):
    """The chunks of a save, failing half-way through the write."""
    for i, c in enumerate(chunks):
        if i == len(chunks) // 2:
            raise OSError("simulated write failure")
        yield c


def test_file_holds_no_pickle_and_says_what_it_is(saved):
    path, _opt, _params = saved
    blob = path.read_bytes()
    assert blob.startswith(ckpt.MAGIC)
    assert b"\x80\x04\x95" not in blob[:200] and b"RMSProp" in blob


def test_bad_arguments():
    with pytest.raises(TypeError):
        fastopt.save_checkpoint("/nonexistent/x", object(), {})
    with pytest.raises(TypeError):
        fastopt.save_checkpoint("/nonexistent/x", fastopt.SGD(), [np.zeros(3)])
    with pytest.raises(TypeError, match="integer"):
        fastopt.save_checkpoint("/nonexistent/x", fastopt.SGD(), {"a": np.zeros(3, np.int32)})
