"""The quantized-state oracle (``fastopt.quant_reference``) and the codec tables
(``kernels/quant.py``) by themselves: the maps against bitsandbytes' definition, the codec's
threshold search against the oracle's nearest-value search, round trips and error bounds."""

import numpy as np
import pytest
from fastopt.kernels import RULES, quant
from fastopt.kernels.storage import IO

from fastopt import quant_reference as qr

CASES = [(f, m) for f in quant.FORMATS for m in ("signed", "unsigned")]


def _rng(seed=0):
    return np.random.default_rng(seed)


# -- the int8 maps ---------------------------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_properties(signed):
    v = quant.dynamic_map(signed)
    assert v.dtype == np.float32 and v.shape == (256,)
    assert np.all(np.diff(v) > 0)  # sorted, 256 distinct values
    assert v[-1] == 1.0 and 0.0 in v
    if signed:
        # 127 negatives, 0, 127 positives and 1: the code of 0 is 127
        assert np.count_nonzero(v < 0) == 127 and v[127] == 0.0
        # no -1: bitsandbytes appends 0 and 1 only (functional.py, create_dynamic_map:
        # ``data.append(0)``, ``data.append(1.0)``); the most negative is the negated
        # midpoint of the last two of linspace(0.1, 1, 65): -(0.9859375 + 1) / 2
        assert v[0] == np.float32(-0.99296875)
        # the smallest magnitude: 10^-6 * (0.1 + 1) / 2 (exponent 0: linspace(0.1, 1, 2))
        assert v[128] == pytest.approx(5.5e-7, rel=1e-6)
    else:
        assert v[0] == 0.0 and np.all(v[1:] > 0)
        # exponent 0 of the unsigned map: linspace(0.1, 1, 3) = 0.1, 0.55, 1, midpoints
        # 0.325 and 0.775, times 10^-6
        assert v[1] == pytest.approx(3.25e-7, rel=1e-6)
    # each decade of 10^(i-6), i = 0..6, holds 2^i (signed) or 2^(i+1) (unsigned) values
    pos = v[v > 0][:-1]
    counts = np.bincount(np.floor(np.log10(pos) + 7).astype(int), minlength=7)
    want = [2**i if signed else 2 ** (i + 1) for i in range(7)]
    assert counts.tolist() == want


@pytest.mark.torch
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_its_definition_under_torch(signed):
    """The map built from bitsandbytes' recipe with torch itself (torch.linspace, float32
    tensor arithmetic), bit for bit."""
    torch = pytest.importorskip("torch")
    data = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2 ** (i + (0 if signed else 1)) + 1)
        mid = (b[:-1] + b[1:]) / 2.0
        data += (10 ** (i - 6) * mid).tolist()
        if signed:
            data += (-(10 ** (i - 6)) * mid).tolist()
    ref = torch.tensor(sorted([*data, 0.0, 1.0]), dtype=torch.float32).numpy()
    assert np.array_equal(quant.dynamic_map(signed), ref)


@pytest.mark.torch
@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bitsandbytes(signed):
    F = pytest.importorskip("bitsandbytes.functional")
    assert np.array_equal(quant.dynamic_map(signed), F.create_dynamic_map(signed=signed).numpy())


def test_even_slots_never_go_negative():
    """``Slot.quant_map`` takes every even slot for non-negative (the unsigned map): every
    quantizable even slot of every rule stays >= 0 over steps of the oracle on random data,
    with its probes on."""
    from support import matrix, oracle

    checked = 0
    for name, kwargs in matrix.MATRIX:
        spec = oracle.spec_of(name)
        even = [s.name for s in spec.slots if s.even and s.quantize]
        if not even:
            continue
        rng = _rng(1)
        p0 = rng.standard_normal(64)
        grads = [rng.standard_normal(64) for _ in range(matrix.STEPS)]
        _, st = oracle.run_oracle(name, kwargs, p0, grads)
        for s in even:
            if s in st:
                assert np.all(np.asarray(st[s]) >= 0), (name, kwargs, s)
                checked += 1
    assert checked > 0


# -- the codec ---------------------------------------------------------------------------------


def _probe_values(fmt, qm, rng):
    """float32 values y around every table value and every midpoint (ties included)."""
    t = quant.table(fmt, qm)
    v = t.dec[np.isfinite(t.dec)].astype(np.float64)
    v = np.unique(v)
    mids = (v[:-1] + v[1:]) / 2
    pts = np.concatenate([v, mids]).astype(np.float32)
    near = np.concatenate([pts, np.nextafter(pts, np.float32(np.inf)), np.nextafter(pts, -pts)])
    rand = rng.uniform(-1, 1, 4000).astype(np.float32) * t.top
    tiny = (rng.uniform(-1, 1, 500) * np.exp2(rng.uniform(-149, -10, 500))).astype(np.float32)
    zeros = np.array([0.0, -0.0, t.top], np.float32)
    y = np.concatenate([near, rand, tiny, zeros])
    if qm == "unsigned":
        y = np.abs(y)
    return y[np.abs(y) <= t.top]


@pytest.mark.parametrize(("fmt", "qm"), CASES)
def test_threshold_search_is_the_nearest_value(fmt, qm):
    """The kernels' lookup (``encode``/``encode_signmag``, run here as plain Python) gives the
    oracle's code for values at, beside and between every pair of table values, and for
    values far below the smallest (down to subnormals, both signs)."""
    t = quant.table(fmt, qm)
    y = _probe_values(fmt, qm, _rng())
    enc = quant.encode_signmag if t.signmag else quant.encode
    got = np.array(
        [enc(np.float32(x), t.base, t.bthr, t.e_lo, t.e_hi, t.mb) for x in y], dtype=np.uint8
    )
    # the oracle with absmax = top (efac = 1): its own nearest search / ml_dtypes' cast
    block = np.zeros(quant.BLOCK, np.float32)
    want = np.empty(y.size, np.uint8)
    for lo in range(0, y.size, quant.BLOCK - 1):
        part = y[lo : lo + quant.BLOCK - 1]
        block[: part.size] = part
        block[part.size :] = 0
        block[-1] = qr.top(fmt, qm)  # pins absmax to top: y unscaled
        codes, _ = qr.quantize(block, fmt, qm)
        want[lo : lo + part.size] = codes[: part.size]
    assert np.array_equal(got, want)


@pytest.mark.parametrize(("fmt", "qm"), CASES)
def test_tables_agree_with_the_oracle(fmt, qm):
    t = quant.table(fmt, qm)
    assert np.array_equal(t.dec, qr.values(fmt, qm), equal_nan=True)
    assert t.top == qr.top(fmt, qm)
    assert np.all(t.thr[1:] >= t.thr[:-1])


def _data(n, qm, rng, spread=3.0):
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-spread, spread, n))).astype(np.float32)
    return np.abs(x) if qm == "unsigned" else x


@pytest.mark.parametrize(("fmt", "qm"), CASES)
@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000])
def test_round_trip_and_error_bound(fmt, qm, n):
    """dequantize(quantize(x)) is within half a table gap of x (the gap around x's scaled
    value, times the block's scale); a block's largest magnitude is kept exactly when the table
    holds +-top (int8: the signed map has no -1); codes requantized from their own values are
    unchanged."""
    rng = _rng(n)
    x = _data(n, qm, rng)
    codes, absmax = qr.quantize(x, fmt, qm)
    assert codes.shape == (n,) and absmax.shape == (quant.nblocks(n),)
    blk = np.arange(n) // quant.BLOCK
    assert np.array_equal(
        absmax, np.array([np.abs(x[blk == b]).max() for b in range(absmax.size)], np.float32)
    )
    back = qr.dequantize(codes, absmax, fmt, qm)
    vals = np.unique(qr.values(fmt, qm)[np.isfinite(qr.values(fmt, qm))].astype(np.float64))
    top = float(qr.top(fmt, qm))
    y = x.astype(np.float64) * top / absmax[blk].astype(np.float64)
    j = np.clip(np.searchsorted(vals, y), 1, vals.size - 1)
    half_gap = (vals[j] - vals[j - 1]) / 2
    bound = (half_gap * 1.001 + 1e-6) * absmax[blk] / top
    assert np.all(np.abs(back.astype(np.float64) - x) <= bound)
    again, _ = qr.quantize(back, fmt, qm)
    if fmt != "int8" or qm == "unsigned":  # the block's max is +-top: scales unchanged
        assert np.array_equal(again, codes)
    rel = np.abs(back - x) / np.maximum(absmax[blk], 1e-30)
    # the widest gap next to top: int8 1 - 0.98594 (linspace(0.1, 1, 65)'s step), e4m3fn
    # 448 - 416, e5m2 57344 - 49152; half of it relative to top
    worst = {"int8": 0.0140625, "float8_e4m3": 32 / 448 if qm == "signed" else 8192 / 57344}
    assert rel.max() <= worst[fmt] / 2 * 1.0001


def test_zero_block_and_nan():
    codes, absmax = qr.quantize(np.zeros(300, np.float32), "int8", "signed")
    assert np.all(absmax == 0) and np.all(qr.values("int8", "signed")[codes] == 0)
    assert np.all(qr.dequantize(codes, absmax, "int8", "signed") == 0)
    x = np.ones(300, np.float32)
    x[5] = np.nan
    _, absmax = qr.quantize(x, "int8", "signed")
    assert np.isnan(absmax[0]) and absmax[1] == 1  # NaN poisons its block only


@pytest.mark.torch
def test_codes_against_bitsandbytes_quantize_blockwise():
    """bitsandbytes' CPU quantize_blockwise keeps the same absmax; its codes are the nearest
    value but for a few % of elements (its search is approximate: measured 216 of 16384 codes
    differ with the signed map, 443 with the unsigned one, up to 4 codes apart), and wherever
    they differ the oracle's value is at least as near as bitsandbytes' (the oracle is exact
    nearest)."""
    F = pytest.importorskip("bitsandbytes.functional")
    torch = pytest.importorskip("torch")
    rng = _rng(7)
    for qm in ("signed", "unsigned"):
        x = _data(1 << 14, qm, rng)
        code = F.create_dynamic_map(signed=qm == "signed")
        q, state = F.quantize_blockwise(torch.from_numpy(x), code=code, blocksize=quant.BLOCK)
        mine, absmax = qr.quantize(x, "int8", qm)
        assert np.array_equal(state.absmax.numpy(), absmax)
        theirs = q.numpy()
        differ = theirs != mine
        assert np.count_nonzero(differ) <= 0.04 * x.size
        v = code.numpy().astype(np.float64)
        inv = (np.float32(1) / absmax).astype(np.float32)  # the oracle's scaling
        y = (x * inv[np.arange(x.size) // quant.BLOCK]).astype(np.float64)
        assert np.all(np.abs(y - v[mine]) <= np.abs(y - v[theirs]))


@pytest.mark.parametrize("fmt", quant.FORMATS)
def test_oracle_step_adam(fmt):
    """One quantized Adam step of the oracle: the float32 step on dequantized state, then
    requantized (what the step is defined as), checked against doing just that by hand."""
    from fastopt import precision

    rng = _rng(3)
    n = 700
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m0 = rng.standard_normal(n).astype(np.float32) * 0.1
    v0 = np.abs(rng.standard_normal(n).astype(np.float32)) * 0.01
    qm = {s.name: s.quant_map for s in RULES["adam"].slots}
    st = {
        "exp_avg": qr.quantize(m0, fmt, qm["exp_avg"]),
        "exp_avg_sq": qr.quantize(v0, fmt, qm["exp_avg_sq"]),
    }
    hp = dict(
        lr=0.01,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        amsgrad=False,
        maximize=False,
        decoupled_weight_decay=False,
    )
    pa = p.copy()
    full = {s: qr.dequantize(*st[s], fmt, qm[s]) for s in st}
    pb = p.copy()
    precision.oracle_step("adam", pb, g, full, io=IO(), step=3, hp=hp)
    qr.oracle_step("adam", pa, g, st, fmt=fmt, io=IO(), step=3, hp=hp)
    assert np.array_equal(pa, pb)
    for s in st:
        c, a = qr.quantize(full[s], fmt, qm[s])
        assert np.array_equal(st[s][0], c) and np.array_equal(st[s][1], a)


@pytest.mark.parametrize("qm", ["signed", "unsigned"])
def test_float8_arithmetic_codec_equals_the_lookup(qm):
    """The float8 decode and encode the loops run (``kernels.quant.CODECS``: arithmetic on the
    bits, no table) give the table's value of every byte and the lookup's byte of values at,
    beside and between every pair of table values, far below them and of either sign."""
    t = quant.table("float8_e4m3", qm)
    dec, enc = quant.CODECS[t.name]
    d = np.array([dec(np.uint8(c), t.dec) for c in range(256)], np.float32)
    assert np.array_equal(d.view(np.uint32), t.dec.view(np.uint32)) or (
        np.array_equal(np.isnan(d), np.isnan(t.dec))
        and np.array_equal(d[~np.isnan(d)].view(np.uint32), t.dec[~np.isnan(d)].view(np.uint32))
    )
    y = _probe_values("float8_e4m3", qm, _rng(4))
    y = np.concatenate([y, -y])
    got = [enc(np.float32(x), t.base, t.bthr, t.e_lo, t.e_hi, t.mb) for x in y]
    want = [quant.encode_signmag(np.float32(x), t.base, t.bthr, t.e_lo, t.e_hi, t.mb) for x in y]
    assert got == want


@pytest.mark.parametrize("qm", ["signed", "unsigned"])
def test_int4_encode_by_comparisons_equals_the_lookup(qm):
    """The int4 encode the loops run (``kernels.quant.FAST_ENCODE``: fifteen comparisons with
    the thresholds; run here as plain Python) gives the lookup's code, never flagged: at and
    beside every threshold, at every table value, both signs, and values the lookup sends to
    0 (NaN, ±inf, |y| >= 2)."""
    t = quant.table("int4", qm)
    fast, look = quant.FAST_ENCODE[t.name], quant.CODECS[t.name][1]
    thr = t.thr[np.isfinite(t.thr)]
    up, down = np.float32(np.inf), np.float32(-np.inf)
    near = np.concatenate([thr, np.nextafter(thr, up), np.nextafter(thr, down)])
    special = np.array([np.nan, np.inf, 2.0, 1.999, 1.0, 0.0, 1e-30, 1e-45], np.float32)
    y = np.concatenate([near, t.dec, special, _rng(7).uniform(-2, 2, 500).astype(np.float32)])
    y = np.concatenate([y, -y])
    got = [fast(np.float32(x), None, None, 0, 0, 0) for x in y]
    want = [look(np.float32(x), None, None, 0, 0, 0) for x in y]
    assert [int(c) for c, _ in got] == [int(c) for c in want]
    assert not any(f for _, f in got)


@pytest.mark.parametrize("qm", ["signed", "unsigned"])
def test_dynamic_map_arithmetic_encode_equals_the_lookup(qm):
    """The int8 encode the loops run first (``kernels.quant.FAST_ENCODE``: the code from the
    decade and ``floor(u)``, no lookup; run here as plain Python) gives the lookup's code of
    every value it does not flag: at, beside and between every pair of table values, at and
    beside every threshold and decade boundary, both signs, and values the lookup sends to 0
    (NaN, ±inf, |y| >= 2). It flags few values: under 1 % of uniform ones."""
    t = quant.table("int8", qm)
    fast, look = quant.FAST_ENCODE[t.name], quant.CODECS[t.name][1]
    thr = t.thr[np.isfinite(t.thr)]
    up, down = np.float32(np.inf), np.float32(-np.inf)
    near = np.concatenate([thr, np.nextafter(thr, up), np.nextafter(thr, down)])
    special = np.array([np.nan, np.inf, 2.0, 1.999, 1.0, 0.0, 1e-30, 1e-45], np.float32)
    y = np.concatenate([_probe_values("int8", qm, _rng(5)), near, special])
    y = np.concatenate([y, -y])
    with np.errstate(invalid="ignore", over="ignore"):
        got = [fast(np.float32(x), None, None, 0, 0, 0) for x in y]
        want = np.array([look(np.float32(x), None, None, 0, 0, 0) for x in y])
        codes = np.array([c for c, _ in got])
        flagged = np.array([bool(f) for _, f in got])
        assert np.array_equal(codes[~flagged], want[~flagged])
        u = _rng(6).uniform(-1 if qm == "signed" else 0, 1, 3000).astype(np.float32)
        rate = np.mean([bool(fast(x, None, None, 0, 0, 0)[1]) for x in u])
    assert rate < 0.01


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_thresholds_lie_inside_the_encode_band(signed):
    """Every interior threshold's ``u`` (the arithmetic encode's position in its decade) lies
    well inside the band around its integer that the encode flags: a value outside the band
    is on the same side of the threshold as its ``u`` of the integer."""
    m = quant.dynamic_encode_margins(signed)
    # every threshold but those that cross into a decade or to 1.0 (8; 7 more for the
    # negative half, which has no -1)
    assert m.size == quant.table("int8", "signed" if signed else "unsigned").thr.size - (
        15 if signed else 8
    )
    assert m.max() < quant._AMB / 4
