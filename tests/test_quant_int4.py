"""``state_dtype="int4"`` by itself: its maps and block size against torchao's 4-bit
optimizer state (``torchao.optim``; the tests that import it skip without it), the oracle's
codes against torchao's quantizer and packing, and the kernels' codec (``kernels/quant.py``)
against the oracle."""

import numpy as np
import pytest
from fastopt.kernels import quant

from fastopt import _quantized
from fastopt import quant_reference as qr

MAPS = ("signed", "unsigned")


def _rng(seed=0):
    return np.random.default_rng(seed)


def _data(n, qm, rng, spread=3.0):
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-spread, spread, n))).astype(np.float32)
    return np.abs(x) if qm == "unsigned" else x


def _torchao():
    pytest.importorskip("torch")
    return pytest.importorskip("torchao.optim.subclass_4bit")


@pytest.mark.torch
@pytest.mark.parametrize("qm", MAPS)
def test_maps_and_block_equal_torchao(qm):
    """The two maps are torchao's ``get_qmap_signed`` / ``get_qmap_unsigned`` bit for bit (in
    the float32 tensor torchao builds from them), and its 4-bit Adam's block size is 128."""
    import inspect

    s4 = _torchao()  # skips without torch or torchao
    import torch
    from torchao.optim import Adam4bit

    want = s4.get_qmap_signed() if qm == "signed" else s4.get_qmap_unsigned()
    want = torch.tensor(want, dtype=torch.float32).numpy()
    assert np.array_equal(quant.table("int4", qm).dec, want)
    assert np.array_equal(qr.values("int4", qm), want)
    block = inspect.signature(Adam4bit.__init__).parameters["block_size"].default
    assert quant.BLOCKS["int4"] == block == 128


@pytest.mark.parametrize("qm", MAPS)
def test_codec_is_the_oracle_nearest(qm):
    """The kernels' threshold lookup (``encode``, plain Python) gives the oracle's code (nearest,
    ties up) at, beside and between every pair of values, far below the smallest, and on
    random values; the host conversion (``_quantized``) is the oracle bit for bit."""
    t = quant.table("int4", qm)
    assert t.dec.shape == (16,) and np.all(np.isinf(t.thr[15:])) and t.top == 1
    v = t.dec.astype(np.float64)
    mids = ((v[:-1] + v[1:]) / 2).astype(np.float32)
    pts = np.concatenate([t.dec, mids])
    rng = _rng(1)
    y = np.concatenate(
        [
            pts,
            np.nextafter(pts, np.float32(2)),
            np.nextafter(pts, np.float32(-2)),
            rng.uniform(-1, 1, 3000).astype(np.float32),
            (rng.uniform(-1, 1, 300) * np.exp2(rng.uniform(-149, -3, 300))).astype(np.float32),
            np.array([0.0, -0.0, 1.0, -1.0], np.float32),
        ]
    )
    y = np.abs(y) if qm == "unsigned" else y
    y = y[np.abs(y) <= 1]
    got = np.array(
        [quant.encode(np.float32(a), t.base, t.bthr, t.e_lo, t.e_hi, t.mb) for a in y], np.uint8
    )
    # the oracle with the absmax pinned to 1: y unscaled
    want = np.empty(y.size, np.uint8)
    step = quant.BLOCKS["int4"] - 1
    for lo in range(0, y.size, step):
        part = y[lo : lo + step]
        block = np.zeros(step + 1, np.float32)
        block[: part.size], block[-1] = part, 1
        codes, _ = qr.quantize(block, "int4", qm)
        want[lo : lo + part.size] = qr.unpack(codes, block.size)[: part.size]
    assert np.array_equal(got, want)
    # ties go up: a midpoint that is a float32 takes the upper code (every one of the 16ths)
    exact = mids.astype(np.float64) == (v[:-1] + v[1:]) / 2
    assert np.count_nonzero(exact) >= (15 if qm == "unsigned" else 5)
    assert np.array_equal(got[t.dec.size : 2 * t.dec.size - 1][exact], np.arange(1, 16)[exact])
    x = _data(1001, qm, rng)
    c1, a1 = _quantized.quantize(x, "int4", qm)
    c2, a2 = qr.quantize(x, "int4", qm)
    assert np.array_equal(c1, c2) and np.array_equal(a1, a2)
    assert np.array_equal(
        _quantized.dequantize(c1, a1, "int4", qm, x.size), qr.dequantize(c2, a2, "int4", qm, x.size)
    )


@pytest.mark.parametrize("qm", MAPS)
@pytest.mark.parametrize("n", [1, 127, 128, 129, 1001])
def test_layout_round_trip_and_error_bound(qm, n):
    """Codes of ``n`` elements are ``ceil(n / 2)`` bytes (element ``2i`` the high nibble of
    byte ``i``, an odd tensor's last low nibble 0), one scale per 128; the dequantized values
    lie within half a gap of the map (16ths: 1/32 of the block's absmax, 1/16 below 1/32
    where there is no zero to round to; the signed map's
    widest gap, 0.2125 to 0.4375, half of it 0.1125); unsigned ones requantize to the same
    codes and scales."""
    rng = _rng(n)
    x = _data(n, qm, rng)
    codes, absmax = qr.quantize(x, "int4", qm)
    assert codes.dtype == np.uint8 and codes.shape == (-(-n // 2),)
    assert absmax.shape == (quant.nblocks(n, "int4"),) == (-(-n // 128),)
    assert quant.code_bytes(n, "int4") == codes.size
    blk = np.arange(n) // 128
    assert np.array_equal(
        absmax, np.array([np.abs(x[blk == b]).max() for b in range(absmax.size)], np.float32)
    )
    one = qr.unpack(codes, n)
    assert np.array_equal(codes[: n // 2], (one[0 : 2 * (n // 2) : 2] << 4) | one[1::2][: n // 2])
    if n % 2:
        assert codes[-1] & 15 == 0 and codes[-1] >> 4 == one[-1]
    back = qr.dequantize(codes, absmax, "int4", qm, n)
    rel = np.abs(back.astype(np.float64) - x) / absmax[blk]
    bound = np.where(x < absmax[blk] / 32, 1 / 16, 1 / 32) if qm == "unsigned" else 0.1125
    assert np.all(rel <= bound * (1 + 1e-6))
    if qm == "unsigned":  # the block's max is code 15 (the signed map has no -1)
        again, same = qr.quantize(back, "int4", qm)
        assert np.array_equal(again, codes) and np.array_equal(same, absmax)


def test_zero_blocks_and_nan():
    """A zero block keeps absmax 0, so it dequantizes to zeros in either map (the unsigned map
    has no zero: a zero in a block of absmax ``a`` comes back as ``a / 16``); NaN poisons its
    block's scale only."""
    for qm in MAPS:
        codes, absmax = qr.quantize(np.zeros(300, np.float32), "int4", qm)
        assert np.all(absmax == 0)
        assert np.all(qr.dequantize(codes, absmax, "int4", qm, 300) == 0)
    x = np.zeros(256, np.float32)
    x[0] = 2.0
    c, a = qr.quantize(x, "int4", "unsigned")
    assert np.all(qr.dequantize(c, a, "int4", "unsigned", 256)[1:128] == np.float32(2 / 16))
    x = np.ones(300, np.float32)
    x[5] = np.nan
    _, absmax = qr.quantize(x, "int4", "signed")
    assert np.isnan(absmax[0]) and np.all(absmax[1:] == 1)


@pytest.mark.torch
@pytest.mark.parametrize("qm", MAPS)
def test_codes_against_torchao_quantizer(qm):
    """torchao's own 4-bit state (``OptimState4bit.zeros`` then ``copy_`` of float32 values:
    its scaling, ``quantize_4bit_with_qmap`` and packing) keeps the oracle's scales and
    packed bytes but where its float32 rounding of ``x / absmax`` and of the residual puts a
    value on the other side of a midpoint (measured: none of these 16384 in either map), and
    there the two values
    lie within float32 rounding of the midpoint; its dequantized state is the oracle's where
    the codes agree."""
    torch = pytest.importorskip("torch")
    s4 = _torchao()
    rng = _rng(11)
    n = 1 << 14
    x = _data(n, qm, rng)
    st = s4.OptimState4bit.zeros((n,), signed=qm == "signed", block_size=128)
    st.copy_(torch.from_numpy(x))
    codes, absmax = qr.quantize(x, "int4", qm)
    assert np.array_equal(st.scale.numpy(), absmax)
    theirs = qr.unpack(st.codes.numpy(), n)
    mine = qr.unpack(codes, n)
    differ = theirs != mine
    assert np.count_nonzero(differ) <= 1e-3 * n
    v = qr.values("int4", qm).astype(np.float64)
    y = x[differ].astype(np.float64) / absmax[np.arange(n)[differ] // 128]
    lo, hi = np.minimum(mine[differ], theirs[differ]), np.maximum(mine[differ], theirs[differ])
    assert np.all(hi - lo == 1)
    assert np.allclose(y, (v[lo] + v[hi]) / 2, rtol=0, atol=2e-7)
    got = st.dequantize().numpy()
    want = qr.dequantize(codes, absmax, "int4", qm, n)
    assert np.array_equal(got[~differ], want[~differ])


# -- the optimizer classes: dict API, FlatBuffer, state dicts, checkpoints, refusals ----------

#: odd sizes (a half-used last byte), one block and a bit, and 320 = 2.5 blocks whose short last
#: block is followed at once by the next parameter's (64-byte segments of 16 float32)
SHAPES = {"w": (37, 11), "b": (320,), "c": (129,), "s": (7,)}


def _params(rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def _grads(rng):
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}


def test_dict_flatbuffer_and_oracle_agree_and_state_layout():
    """Adam with int4 state: the dict API and a ``FlatBuffer`` step the same params and codes
    bit for bit on the numba backend, and so do the oracle backend's two (its runs of blocks
    end at a short block); each slot's codes are ``ceil(n / 2)`` bytes, its scales one per 128
    elements; numba against the oracle: params within float32 rounding, scales equal, codes
    equal but for a value the two float32 computations put on either side of a midpoint."""
    import fastopt

    rng = np.random.default_rng(0)
    params = _params(rng)
    grads = [_grads(rng) for _ in range(3)]
    out = {}
    for be in ("numba", "numpy"):
        p = {k: v.copy() for k, v in params.items()}
        buf = fastopt.FlatBuffer({k: v.copy() for k, v in params.items()})
        offs = [off for _, _, off, _, _ in buf.layout]
        assert all(off % 2 == 0 for off in offs)
        a = fastopt.Adam(lr=0.01, state_dtype="int4", backend=be)
        b = fastopt.Adam(lr=0.01, state_dtype="int4", backend=be)
        for g in grads:
            a.update(p, g)
            for k in g:
                buf.grads[k][...] = g[k]
            b.step(buf)
        for k, shape in SHAPES.items():
            n = int(np.prod(shape))
            assert np.array_equal(buf.params[k], p[k]), (be, k)
            st = a.state[k]
            assert (
                st["exp_avg.codes"].shape == (-(-n // 2),) and st["exp_avg.codes"].dtype == np.uint8
            )
            assert st["exp_avg_sq.absmax"].shape == (-(-n // 128),)
            for s in st:
                assert np.array_equal(st[s], b.state[k][s], equal_nan=True), (be, k, s)
        out[be] = p, {k: {s: np.array(v) for s, v in a.state[k].items()} for k in SHAPES}
    for k, shape in SHAPES.items():
        n = int(np.prod(shape))
        np.testing.assert_allclose(out["numba"][0][k], out["numpy"][0][k], rtol=2e-5, atol=2e-6)
        for s in ("exp_avg", "exp_avg_sq"):
            sa, sb = out["numba"][1][k], out["numpy"][1][k]
            np.testing.assert_allclose(sa[f"{s}.absmax"], sb[f"{s}.absmax"], rtol=1e-5)
            d = qr.unpack(sa[f"{s}.codes"], n).astype(int) - qr.unpack(sb[f"{s}.codes"], n)
            assert np.abs(d).max() <= 1 and np.count_nonzero(d) <= 0.01 * n + 1


def test_full_precision_round_trips():
    """A float32 optimizer's state loads quantized as a step would store it, and
    ``full_precision_state`` (given the shapes packed codes do not keep) turns it back into
    float32 state within the maps' error (codes and scales round-trip bit for bit through state
    dicts and checkpoints: ``tests/test_quant_state.py``, every format)."""
    import fastopt

    rng = np.random.default_rng(1)
    params = _params(rng)
    f32 = fastopt.Adam(lr=0.01)
    for _ in range(3):
        f32.update(params, _grads(rng))
    sd32 = f32.state_dict()
    q4 = fastopt.Adam(lr=0.01, state_dtype="int4")
    q4.load_state_dict(sd32)  # quantized on load (pending: bound at the first step)
    sdq = q4.state_dict()
    for k in params:
        for s, qm in (("exp_avg", "signed"), ("exp_avg_sq", "unsigned")):
            codes, absmax = _quantized.quantize(sd32["state"][k][s], "int4", qm)
            assert np.array_equal(sdq["state"][k][f"{s}.codes"], codes)
            assert np.array_equal(sdq["state"][k][f"{s}.absmax"], absmax)
    with pytest.raises(ValueError, match="shapes"):
        _quantized.full_precision_state(sdq, "adam", "int4")
    back = _quantized.full_precision_state(sdq, "adam", "int4", SHAPES)
    f32b = fastopt.Adam(lr=0.01)
    f32b.load_state_dict(back)
    for k in params:
        for s, worst in (("exp_avg", 0.1125), ("exp_avg_sq", 1 / 16)):
            a, b = sd32["state"][k][s], f32b.state_dict()["state"][k][s]
            assert a.shape == b.shape == SHAPES[k] and b.dtype == np.float32
            amax = np.abs(a).max()
            assert np.abs(a - b).max() <= worst * amax * (1 + 1e-6)


def test_refusals_before_anything_changes():
    """int4 is stepped by every backend (each declares ``QUANT_PACKED``) and refused by one
    that does not declare it (the core's check and fastopt.torch's), and int4 buffers of the
    wrong size at load and at a step, each before anything is written."""
    import fastopt
    from fastopt.backends import cupy_backend, numba_backend, numba_cuda_backend, numpy_backend

    for be in (numba_backend, numpy_backend, cupy_backend, numba_cuda_backend):
        _quantized.check_backend(be, "int4")

    class NoPacked:  # a backend stepping the byte formats only
        NAME = "fake"
        QUANT_STATE = True

    _quantized.check_backend(NoPacked, "int8")
    with pytest.raises(TypeError, match="4-bit"):
        _quantized.check_backend(NoPacked, "int4")
    pytest.importorskip("torch")
    from fastopt.torch import _quantized as TQ

    for be in (cupy_backend, numba_cuda_backend):  # their tables step int4 too
        TQ.check_device(be, "int4", "gpu")

    TQ.check_device(NoPacked, "int8", "fake")
    with pytest.raises(NotImplementedError, match="int4"):
        TQ.check_device(NoPacked, "int4", "fake")
    rng = np.random.default_rng(3)
    params = _params(rng)
    opt = fastopt.Adam(lr=0.01, state_dtype="int4")
    opt.update(params, _grads(rng))
    sd = opt.state_dict()
    saved = {k: {s: a.copy() for s, a in st.items()} for k, st in opt.state.items()}
    good = {k: v.copy() for k, v in params.items()}
    bad = dict(sd, state={k: dict(v) for k, v in sd["state"].items()})
    bad["state"]["b"]["exp_avg.codes"] = np.zeros(320, np.uint8)  # one per element, not two
    with pytest.raises(ValueError, match="codes"):
        opt.load_state_dict(bad)
    bad["state"]["b"]["exp_avg.codes"] = np.zeros((16, 10), np.uint8)  # not one-dimensional
    with pytest.raises(ValueError, match="codes"):
        opt.load_state_dict(bad)
    opt.state["b"]["exp_avg.codes"] = np.zeros(320, np.uint8)
    with pytest.raises(ValueError, match="codes"):
        opt.update(params, _grads(rng))
    opt.state["b"]["exp_avg.codes"] = saved["b"]["exp_avg.codes"].copy()
    assert opt.step_count == 1
    for k in params:
        assert np.array_equal(params[k], good[k])
        for s, a in opt.state[k].items():
            assert np.array_equal(a, saved[k][s])


def test_state_bytes_per_param():
    """Adam with int4 state: 2 · (1/2 + 4/128) B per parameter."""
    from fastopt.memory import state_bytes_per_param

    assert state_bytes_per_param("adam", state_dtype="int4") == 2 * (0.5 + 4 / 128)
    assert state_bytes_per_param("lion", state_dtype="int4") == 0.5 + 4 / 128


@pytest.mark.torch
@pytest.mark.exhaustive  # 1000 training steps of a transformer
def test_int4_adam_trains_a_transformer_like_float32():
    """``bench/quant_convergence.py --int4``: the 2-layer transformer, 500 steps of Adam with
    ``fastopt.torch``; the held-out loss with int4 state within 1 % of float32 state's.
    Measured (seed 0, torch 2.13.0 on the CPU, one thread; held-out loss, float32 / int4):
    Adam 1.53356 / 1.53261 (-0.06 %); through the core optimizer over the same tensors Adam
    1.53356 / 1.53529 (+0.11 %), AdamW 1.55258 / 1.55525 (+0.17 %), SGD with momentum
    1.62584 / 1.62917 (+0.20 %), Lion 1.85584 / 2.30352 (+24 %): its momentum (beta2 0.99)
    moves by 1 % of the gradient a step, under the spacing of 16 codes, and stalls (torchao
    offers 4-bit state for Adam and AdamW only)."""
    import importlib.util
    from pathlib import Path

    torch = pytest.importorskip("torch")
    path = Path(__file__).resolve().parents[1] / "bench" / "quant_convergence.py"
    spec = importlib.util.spec_from_file_location("quant_convergence", path)
    assert spec is not None and spec.loader is not None
    qc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(qc)
    torch.set_num_threads(1)
    base = qc.train("Adam", None)
    got = qc.train("Adam", "int4")
    assert abs(got / base - 1) <= 0.01, (got, base)


@pytest.mark.torch
def test_fastopt_torch_steps_int4_like_the_core_and_converts_its_state_dicts():
    """``fastopt.torch`` on the CPU (one launch over the group's table, ``numba_quant_many``):
    Adam with int4 state equals the core dict API's step bit for bit (params, packed codes,
    scales; an empty tensor, an odd one with a short block); its state dict round-trips (the
    next step equal), codes of one per element are refused at load before anything is
    written, ``torch.optim.Adam``'s state loads quantized as a step would store it, and
    ``full_precision_state_dict`` gives back tensors of the parameters' shapes that
    ``torch.optim.Adam`` loads."""
    import copy

    torch = pytest.importorskip("torch")
    import fastopt
    import fastopt.torch as fot

    shapes = ((1,), (17, 19), (0,), (300,))
    gen = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = fot.Adam(ps, lr=1e-2, state_dtype="int4")
    core = fastopt.Adam(lr=1e-2, state_dtype="int4", backend="numba")
    cp = {str(i): p.detach().numpy().copy() for i, p in enumerate(ps)}

    def grads(t):
        g = torch.Generator().manual_seed(100 + t)
        return [torch.randn(s, generator=g) for s in shapes]

    for t in range(3):
        gs = grads(t)
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        opt.step()
        core.update(cp, {str(i): g.numpy() for i, g in enumerate(gs)})
        for i, p in enumerate(ps):
            assert np.array_equal(p.detach().numpy(), cp[str(i)]), (t, i)
            for k, a in core.state[str(i)].items():
                assert np.array_equal(opt.state[p][k].numpy(), a), (t, i, k)
    assert opt.state[ps[1]]["exp_avg.codes"].shape == (162,)  # ceil(323 / 2)
    sd = copy.deepcopy(opt.state_dict())
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    other = fot.Adam(qs, lr=1e-2, state_dtype="int4")
    other.load_state_dict(copy.deepcopy(sd))
    gs = grads(9)
    for p, q, g in zip(ps, qs, gs):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    other.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(v, other.state[q][k]), k
    bad = copy.deepcopy(sd)
    bad["state"][3]["exp_avg.codes"] = torch.zeros(300, dtype=torch.uint8)
    before = {k: v.clone() for k, v in other.state[qs[3]].items()}
    with pytest.raises(ValueError, match="two codes per byte"):
        other.load_state_dict(bad)
    for k, v in before.items():
        assert torch.equal(other.state[qs[3]][k], v)
    ta = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2)
    for p in ta.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    ta.step()
    rs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    q4 = fot.Adam(rs, lr=1e-2, state_dtype="int4")
    q4.load_state_dict(ta.state_dict())
    for i, r in enumerate(rs):
        for s, qm in (("exp_avg", "signed"), ("exp_avg_sq", "unsigned")):
            c, a = _quantized.quantize(ta.state_dict()["state"][i][s].numpy(), "int4", qm)
            assert np.array_equal(q4.state[r][f"{s}.codes"].numpy(), c)
            assert np.array_equal(q4.state[r][f"{s}.absmax"].numpy(), a)
    full = fot.full_precision_state_dict(opt)
    tb = torch.optim.Adam([torch.nn.Parameter(p.detach().clone()) for p in ps], lr=1e-2)
    tb.load_state_dict(full)
    for p, r in zip(ps, tb.param_groups[0]["params"]):
        st = opt.state[p]
        for s, qm in (("exp_avg", "signed"), ("exp_avg_sq", "unsigned")):
            want = _quantized.dequantize(
                st[f"{s}.codes"].numpy(), st[f"{s}.absmax"].numpy(), "int4", qm, p.numel()
            )
            got = tb.state[r][s]
            assert got.shape == p.shape and np.array_equal(got.numpy().reshape(-1), want)
