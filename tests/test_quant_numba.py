"""Quantized state on the Numba CPU backend, through ``fastopt.functional``:

- bit for bit against its definition: the float32-state step of the same backend on the
  dequantized state, then the oracle's quantization (``fastopt.quant_reference``): codes,
  scales and params identical;
- against the full oracle (``backend="numpy"``: the reference formulas on dequantized state,
  then the oracle's quantization): params within float32 rounding, and a code different only
  where the reference's float32 math rounds a value across a threshold (one code apart, a
  small fraction of them).
"""

import numpy as np
import pytest
from fastopt.kernels import RULES, quant, storage
from support.matrix import RULE_FULL

from fastopt import _quantized as Q
from fastopt import functional as F
from fastopt import precision
from fastopt import quant_reference as qr

N = 1000  # 3 full blocks and a short one
STEPS = 3
#: the rules every format runs by default; the rest under -m exhaustive (a cold numba cache
#: compiles two loops per case)
DEFAULT_RULES = ("adam", "lion")


def _cases(default=None):
    """(rule, format) cases: by default every rule in int8 and ``DEFAULT_RULES`` in every
    format (``default``: only these rules); the rest under -m exhaustive."""
    out = []
    for rule in RULES:
        for fmt in quant.ALL_FORMATS:
            on = rule in DEFAULT_RULES or (fmt == "int8" and default is None)
            marks = () if on else (pytest.mark.exhaustive,)
            out.append(pytest.param(rule, fmt, id=f"{rule}-{fmt}", marks=marks))
    return out


def _initial(rule, hp, fmt, n, rng):
    """Slot arrays for a run: quantized pairs (from random values, so that step 1 starts from
    non-trivial state where the rule reads it) and float32 arrays; None where unused."""
    spec = RULES[rule]
    flags = spec.flags_of(hp, 1, spec.initial_host_state(hp))
    out = {}
    for s, used in zip(spec.slots, spec.slots_used(flags)):
        if not used:
            out[s.name] = None
            continue
        x = rng.standard_normal(n).astype(np.float32) * np.float32(0.1)
        if s.even:
            x = np.abs(x) + np.float32(spec.initial(s.name, hp))
        if s.fresh:
            x[:] = spec.initial(s.name, hp)
        out[s.name] = Q.quantize(x, fmt, s.quant_map) if s.quantize else x
    if out.get("grad_avg") is not None:
        # centered RMSprop takes sqrt(v - ga²): keep v above ga² (decoded) by a margin wider than
        # the coarsest code's rounding, or a NaN makes its block's absmax, and so the whole
        # block, NaN on both sides and the comparison proves nothing
        ga = out["grad_avg"]
        gm = spec.slot("grad_avg").quant_map
        ga = Q.dequantize(ga[0], ga[1], fmt, gm) if isinstance(ga, tuple) else ga
        v = ga * ga + np.float32(0.05) + np.abs(rng.standard_normal(n).astype(np.float32)) * 0.1
        sq = spec.slot("square_avg")
        out["square_avg"] = Q.quantize(v, fmt, sq.quant_map) if sq.quantize else v
    return out


def _codes(codes, fmt):
    """One code per element (a packed format's unpacked)."""
    return qr.unpack(codes, N) if fmt in quant.PACKED else codes


def _copy(state):
    return {
        k: None if v is None else (v[0].copy(), v[1].copy()) if isinstance(v, tuple) else v.copy()
        for k, v in state.items()
    }


def _hs_kw(rule, hp, step):
    spec = RULES[rule]
    return {"host_state": spec.replay_host_state(hp, step)} if spec.host_state else {}


@pytest.mark.parametrize(("rule", "fmt"), _cases(default=DEFAULT_RULES))
def test_bit_exact_against_float32_state_then_oracle_quantization(rule, fmt):
    spec, hp = RULES[rule], RULE_FULL[rule]
    rng = np.random.default_rng(5)
    p = rng.standard_normal(N).astype(np.float32)
    st = _initial(rule, hp, fmt, N, rng)
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(N).astype(np.float32)
        # the definition: float32 state from the codes, the float32 step, then quantized
        p32 = p.copy()
        full = {}
        for s in spec.slots:
            a = st[s.name]
            full[s.name] = (
                qr.dequantize(a[0], a[1], fmt, s.quant_map)
                if isinstance(a, tuple)
                else None
                if a is None
                else a.copy()
            )
        F.run(rule, p32, g, full, step=t, hp=hp, backend="numba", **_hs_kw(rule, hp, t))
        F.run(
            rule, p, g, st, step=t, hp=hp, backend="numba", state_dtype=fmt, **_hs_kw(rule, hp, t)
        )
        assert np.array_equal(p, p32, equal_nan=True), t
        for s in spec.slots:
            a = st[s.name]
            if isinstance(a, tuple):
                codes, absmax = qr.quantize(full[s.name], fmt, s.quant_map)
                # (centered RMSprop's v - grad_avg^2 can go negative once both are rounded
                # apart: NaN, as torch's formula gives; the NaN blocks must match too)
                assert np.array_equal(a[1], absmax, equal_nan=True), (t, s.name)
                ok = ~np.isnan(absmax[np.arange(N) // quant.BLOCKS[fmt]])
                assert np.array_equal(_codes(a[0], fmt)[ok], _codes(codes, fmt)[ok]), (t, s.name)
            elif a is not None:
                assert np.array_equal(a, full[s.name], equal_nan=True), (t, s.name)


@pytest.mark.parametrize(("rule", "fmt"), _cases(default=DEFAULT_RULES))
def test_against_the_oracle(rule, fmt):
    spec, hp = RULES[rule], RULE_FULL[rule]
    rng = np.random.default_rng(9)
    p = rng.standard_normal(N).astype(np.float32)
    st = _initial(rule, hp, fmt, N, rng)
    p_o, st_o = p.copy(), _copy(st)
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(N).astype(np.float32)
        kw = dict(step=t, hp=hp, state_dtype=fmt, **_hs_kw(rule, hp, t))
        F.run(rule, p, g, st, backend="numba", **kw)
        kw = dict(step=t, hp=hp, state_dtype=fmt, **_hs_kw(rule, hp, t))
        F.run(rule, p_o, g, st_o, backend="numpy", **kw)
        np.testing.assert_allclose(p, p_o, rtol=2e-5, atol=2e-6)
        for s in spec.slots:
            a, b = st[s.name], st_o[s.name]
            if isinstance(a, tuple):
                np.testing.assert_allclose(a[1], b[1], rtol=1e-5)
                d = _codes(a[0], fmt).astype(int) - _codes(b[0], fmt).astype(int)
                if quant.table(fmt, s.quant_map).signmag:  # sign-magnitude: compare values
                    va = Q.dequantize(a[0], a[1], fmt, s.quant_map)
                    vb = Q.dequantize(b[0], b[1], fmt, s.quant_map)
                    d = (va != vb).astype(int)
                assert np.abs(d).max() <= 1 and np.count_nonzero(d) <= 0.01 * N, (t, s.name)
                # keep the two runs on one trajectory: the next step starts from the same codes
                b[0][...], b[1][...] = a[0], a[1]
            elif a is not None:
                np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
                b[...] = a
        p_o[...] = p


@pytest.mark.exhaustive  # the parallel loop's compile is most of a cold run's cost
@pytest.mark.parametrize("fmt", quant.ALL_FORMATS)
def test_bfloat16_params_and_parallel_loop(fmt):
    """bfloat16 params (the param rounded from the float32 result, as for float32 state) and a
    length that takes the parallel loop: bit for bit against float32 state then the oracle's
    quantization."""
    bf16 = precision.bfloat16()
    hp = RULE_FULL["adam"]
    n = 70_001
    rng = np.random.default_rng(2)
    for dt in (bf16, np.float32):
        p = rng.standard_normal(n).astype(dt)
        m = Q.quantize(rng.standard_normal(n).astype(np.float32) * 0.1, fmt, "signed")
        v = Q.quantize(np.abs(rng.standard_normal(n)).astype(np.float32) * 0.01, fmt, "unsigned")
        g = rng.standard_normal(n).astype(dt)
        p32 = p.copy()
        full = {
            "exp_avg": qr.dequantize(*m, fmt, "signed", n),
            "exp_avg_sq": qr.dequantize(*v, fmt, "unsigned", n),
            "max_exp_avg_sq": None,
        }
        if hp["amsgrad"]:
            mx = Q.quantize(
                np.abs(rng.standard_normal(n)).astype(np.float32) * 0.02, fmt, "unsigned"
            )
            full["max_exp_avg_sq"] = qr.dequantize(*mx, fmt, "unsigned", n)
        else:
            mx = None
        F.run("adam", p32, g, full, step=2, hp=hp, backend="numba")
        F.run(
            "adam",
            p,
            g,
            {"exp_avg": m, "exp_avg_sq": v, "max_exp_avg_sq": mx},
            step=2,
            hp=hp,
            backend="numba",
            state_dtype=fmt,
        )
        assert np.array_equal(
            p.view(np.uint16 if dt is bf16 else np.uint32),
            p32.view(np.uint16 if dt is bf16 else np.uint32),
        )
        for name, pair, qm in (("exp_avg", m, "signed"), ("exp_avg_sq", v, "unsigned")):
            c, a = qr.quantize(full[name], fmt, qm)
            assert np.array_equal(pair[0], c) and np.array_equal(pair[1], a)


def test_functional_refuses_before_writing():
    rng = np.random.default_rng(0)
    p = rng.standard_normal(300).astype(np.float32)
    g = rng.standard_normal(300).astype(np.float32)
    m = Q.quantize(np.zeros(300, np.float32), "int8", "signed")
    v = Q.quantize(np.zeros(300, np.float32), "int8", "unsigned")
    before = p.copy(), m[0].copy(), v[1].copy()
    bad = [
        ((m[0], m[1][:1]), v, ValueError),  # absmax too short
        ((m[0].astype(np.int8), m[1]), v, ValueError),  # codes not uint8
        (m[0], v, TypeError),  # not a pair
        (m, (v[0], v[1].astype(np.float64)), ValueError),
    ]
    for mm, vv, exc in bad:
        with pytest.raises(exc):
            F.adam(p, g, mm, vv, step=1, state_dtype="int8", backend="numba")
    with pytest.raises(ValueError, match="state_dtype"):
        F.adam(p, g, m, v, step=1, state_dtype="int2", backend="numba")
    with pytest.raises(ValueError, match="codes"):  # int8 codes given as int4 ones
        F.adam(p, g, m, v, step=1, state_dtype="int4", backend="numba")
    with pytest.raises(ValueError):  # codes sharing memory with absmax's owner... or the param
        F.adam(p, g, (p.view(np.uint8)[:300], m[1]), v, step=1, state_dtype="int8")
    assert np.array_equal(p, before[0]) and np.array_equal(m[0], before[1])
    assert np.array_equal(v[1], before[2])


@pytest.mark.parametrize(
    ("name", "how"),
    [(n, "loops") for n in sorted(quant.CODECS)]
    + [(n, "arithmetic") for n in sorted(quant.ARITHMETIC_DECODE)],
)
def test_compiled_decode_equals_the_table(name, how):
    """Each decode as numba compiles it (the loops': a lookup for the dynamic maps, float8's
    bit fields; and the dynamic maps' by arithmetic: their linspace means and decades) gives
    the table's float32 of all 256 codes, bit for bit (NaN where the table has NaN), compiled
    and as plain Python."""
    import numba

    import fastopt.backends.numba_quant  # noqa: F401  (registers the codec for numba)

    dec = quant.CODECS[name][0] if how == "loops" else quant.ARITHMETIC_DECODE[name]
    t = next(
        quant.table(f, m)
        for f in quant.ALL_FORMATS
        for m in ("signed", "unsigned")
        if quant.TABLES[(f, m)] == name
    )

    @numba.njit
    def decode_all(codes, d):
        out = np.empty(codes.size, np.float32)
        for i in range(codes.size):
            out[i] = dec(codes[i], d)
        return out

    codes = np.arange(t.dec.size, dtype=np.uint8)  # 16 codes for a packed format's
    got = decode_all(codes, t.dec)
    nan = np.isnan(t.dec)
    assert np.array_equal(np.isnan(got), nan)
    assert np.array_equal(got[~nan].view(np.uint32), t.dec[~nan].view(np.uint32))
    py = np.array([dec(np.uint8(c), t.dec) for c in range(t.dec.size)], np.float32)
    assert np.array_equal(py[~nan].view(np.uint32), t.dec[~nan].view(np.uint32))


@pytest.mark.exhaustive
@pytest.mark.parametrize("name", ["dynamic_signed", "dynamic_unsigned"])
def test_compiled_arithmetic_encode_equals_the_lookup_on_every_float32(name):
    """The int8 encode by arithmetic as the loops compile it (``kernels.quant.FAST_ENCODE``)
    gives the lookup's code of every float32 it does not flag, all 2^32 bit patterns, and
    flags under 0.1 % of them (the loops encode a flagged value's block by the lookup)."""
    import numba

    import fastopt.backends.numba_quant  # noqa: F401  (registers the codec for numba)

    fast, look = quant.FAST_ENCODE[name], quant.CODECS[name][1]
    bits_f32 = storage.bits_f32

    @numba.njit(error_model="numpy")
    def sweep(first, count):
        bad = 0
        flagged = 0
        for i in range(count):
            x = bits_f32(first + i)
            c, f = fast(x, None, None, 0, 0, 0)
            if f:
                flagged += 1
            elif c != look(x, None, None, 0, 0, 0):
                bad += 1
        return bad, flagged

    step = 1 << 28
    bad = flagged = 0
    for first in range(0, 1 << 32, step):
        b, f = sweep(first, step)
        bad, flagged = bad + b, flagged + f
    assert bad == 0
    assert flagged < (1 << 32) // 1000


def _int4_mismatches():
    """A compiled count, over float32 values (a range of bit patterns or an array), of where
    the int4 encode the loops run (``kernels.quant.FAST_ENCODE``: comparisons) differs from
    the lookup (``CODECS``) or flags, for both 4-bit maps in one loop."""
    import numba

    import fastopt.backends.numba_quant  # noqa: F401  (registers the codec for numba)

    fs, ls = quant.FAST_ENCODE["dynamic4_signed"], quant.CODECS["dynamic4_signed"][1]
    fu, lu = quant.FAST_ENCODE["linear4_unsigned"], quant.CODECS["linear4_unsigned"][1]
    bits_f32 = storage.bits_f32

    @numba.njit(error_model="numpy")
    def mismatches(first, count, y):
        bad = 0
        for i in range(count if y.size == 0 else y.size):
            x = bits_f32(first + i) if y.size == 0 else y[i]
            c, f = fs(x, None, None, 0, 0, 0)
            bad += f or c != ls(x, None, None, 0, 0, 0)
            c, f = fu(x, None, None, 0, 0, 0)
            bad += f or c != lu(x, None, None, 0, 0, 0)
        return bad

    return mismatches


def test_compiled_int4_encode_equals_the_lookup():
    """The int4 encode the loops run (``kernels.quant.FAST_ENCODE``: fifteen comparisons)
    gives the lookup's code, never flagged, at, beside and two ulps from every threshold of
    both maps, at every table value and its negation, on random values of every magnitude
    and sign, and for ±0, ±inf, NaN, ±2 and the floats around them (both maps on every value:
    a signed slot's encode never sees a negative scaled value past -1, an unsigned one none
    below 0, but the encode answers the lookup's code on all of them)."""
    up, down = np.float32(np.inf), np.float32(-np.inf)
    vals = [np.zeros(0, np.float32)]
    for m in ("signed", "unsigned"):
        t = quant.table("int4", m)
        thr = t.thr[np.isfinite(t.thr)]
        near = [thr, np.nextafter(thr, up), np.nextafter(thr, down)]
        near += [np.nextafter(near[1], up), np.nextafter(near[2], down)]
        vals += [*near, t.dec, -t.dec]
    rng = np.random.default_rng(11)
    vals.append(rng.uniform(-1.5, 1.5, 200_000).astype(np.float32))
    mag = np.exp2(rng.uniform(-150, 127.9, 200_000)) * rng.choice([-1.0, 1.0], 200_000)
    vals.append(mag.astype(np.float32))
    edge = np.array([0.0, np.inf, np.nan, 2.0, 1.0, 2.0**-149, 2.0**-126], np.float32)
    edge = np.concatenate([edge, np.nextafter(edge, up), np.nextafter(edge, down)])
    vals += [edge, -edge]
    y = np.concatenate(vals).astype(np.float32)
    assert _int4_mismatches()(0, 0, y) == 0


@pytest.mark.exhaustive
def test_compiled_int4_encode_equals_the_lookup_on_every_float32():
    """The int4 encode the loops run (comparisons) gives the lookup's code of all 2^32 float32
    bit patterns, both maps, never flagging one."""
    mismatches = _int4_mismatches()
    none = np.zeros(0, np.float32)
    step = 1 << 28
    bad = sum(mismatches(first, step, none) for first in range(0, 1 << 32, step))
    assert bad == 0


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float8_e5m2"])
def test_compiled_float8_encode_equals_its_definition(name):
    """The float8 encode as the CPU loops compile it (``numba_intrinsics``: the bit arithmetic
    on 32-bit lanes) gives the byte of its plain-Python definition (``kernels.quant.CODECS``)
    at, beside and two ulps from every threshold, at every table value, on random values of
    the format's range and far below it (subnormal results), and for ±0, ±inf and NaN."""
    import numba

    import fastopt.backends.numba_quant  # noqa: F401  (registers the codec for numba)

    enc = quant.CODECS[name][1]
    t = next(
        quant.table(f, m)
        for f in quant.FORMATS
        for m in ("signed", "unsigned")
        if quant.TABLES[(f, m)] == name
    )

    @numba.njit(error_model="numpy")
    def encode_all(y, out):
        for i in range(y.size):
            out[i] = enc(y[i], None, None, 0, 0, 0)

    thr = t.thr[np.isfinite(t.thr)]
    up, down = np.float32(np.inf), np.float32(-np.inf)
    near = [thr, np.nextafter(thr, up), np.nextafter(thr, down)]
    near += [np.nextafter(near[1], up), np.nextafter(near[2], down)]
    rng = np.random.default_rng(7)
    rand = rng.uniform(-1, 1, 4000).astype(np.float32) * t.top
    tiny = (rng.uniform(-1, 1, 1000) * np.exp2(rng.uniform(-149, -5, 1000))).astype(np.float32)
    special = np.array([0.0, np.inf, np.nan, t.top], np.float32)
    dec = t.dec[np.isfinite(t.dec)]
    y = np.concatenate([*near, dec, rand, tiny, special])
    y = np.concatenate([y, -y])
    got = np.empty(y.size, np.uint8)
    encode_all(y, got)
    with np.errstate(invalid="ignore", over="ignore"):
        want = np.array([enc(x, None, None, 0, 0, 0) & 0xFF for x in y], np.uint8)
    assert np.array_equal(got, want)
