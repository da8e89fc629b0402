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

    import torch

    s4 = _torchao()
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
