"""``master_weights="remainder"``: a bfloat16 param and an int16 remainder as the fp32 master.

The split (``kernels/storage.py``'s ``rem_hi``/``rem_lo``/``rem_join``, their CUDA C twins in
``storage.cuh`` and the oracle's ``precision.split_master``/``join_master``, written apart) is a
bijection of 32-bit patterns, so:

- the master (the param and remainder joined) follows the trajectory of ``master_weights=True``
  bit for bit, given the same gradients;
- the params differ from ``master_weights=True``'s exactly where that master's low 16 bits are
  0x8000 and bit 16 is clear (a tie whose lower bfloat16 neighbour is even: nearest-even keeps
  it, the remainder's param is one unit further from zero).

Both statements are tested on random data over several steps, for several rules, on the oracle
and the numba loop; on a lattice where ties are common too (SGD, lr 2^-9, gradients ±1 and ±2).
The CUDA C body runs in ``tests/test_cuda_mixed.py`` (plan ``bf16-remainder``), the numba-cuda
kernels in ``tests/cudasim_parity.py``, both on a GPU in ``tests/gpu/test_gpu_mixed.py``.
"""

import numpy as np
import pytest
from fastopt.kernels import RULES, storage

import fastopt
from fastopt import functional, precision
from fastopt.memory import state_bytes_per_param

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
REM = precision.MASTER_REMAINDER

#: bit patterns at the edges of the split: ties above even and odd bfloat16, the largest
#: finite float (rounds to inf), infinities, NaNs whose high half wraps (0x7FFF, 0xFFFF), zeros,
#: subnormals
EDGES = np.array(
    [
        0x3F808000,
        0x3F818000,
        0x3F807FFF,
        0x3F808001,
        0x7F7FFFFF,
        0x7F800000,
        0xFF800000,
        0x7FFF8000,
        0xFFFF8000,
        0x7FC00000,
        0xFFC00001,
        0x00000000,
        0x80000000,
        0x00008000,
        0x80018000,
        0x0000FFFF,
    ],
    dtype=np.uint32,
)


def _patterns(n=1 << 16, seed=0):
    rng = np.random.default_rng(seed)
    return np.concatenate([EDGES, rng.integers(0, 1 << 32, n, dtype=np.uint64).astype(np.uint32)])


def _tie_above_even(master):
    u = np.asarray(master, np.float32).view(np.uint32)
    return ((u & 0xFFFF) == 0x8000) & (((u >> 16) & 1) == 0)


def test_split_and_join_are_inverse_on_every_bit_pattern_and_agree_with_the_kernels_functions():
    u = _patterns()
    m = u.view(np.float32)
    p, r = precision.split_master(m)
    assert p.dtype == BF16 and r.dtype == np.int16
    assert np.array_equal(precision.join_master(p, r).view(np.uint32), u)
    # the kernels' scalar functions (what numba and the simulator compile; storage.cuh is
    # held to them by the g++ harness) give the same bits, element by element
    idx = np.r_[: len(EDGES), len(EDGES) : len(u) : 97]
    for i in idx:
        x = np.float32(m[i])
        assert storage.rem_hi(x) == int(p.view(np.uint16)[i]), hex(u[i])
        assert storage.rem_lo(x) == int(r[i]), hex(u[i])
        back = storage.rem_join(np.uint16(p.view(np.uint16)[i]), np.int16(r[i]))
        assert int(np.float32(back).view(np.uint32)) == int(u[i]), hex(u[i])


def test_the_param_is_nearest_even_but_at_ties_above_even_bfloat16():
    u = _patterns(seed=1)
    finite = (u & 0x7F800000) != 0x7F800000
    m = u[finite].view(np.float32)
    p, _ = precision.split_master(m)
    rne = m.astype(BF16).view(np.uint16)
    tie = _tie_above_even(m)
    assert tie.sum() >= 3  # the edges hold ties; the rule is tested, not skipped
    assert np.array_equal(p.view(np.uint16) != rne, tie)
    # one unit further from zero: the next bfloat16 bit pattern (magnitudes count up)
    assert np.array_equal(p.view(np.uint16)[tie], rne[tie] + 1)


def _run(cls, hp, backend, p0, grads, master_weights):
    opt = getattr(fastopt, cls)(backend=backend, master_weights=master_weights, **hp)
    rule = opt._rule
    params, out = {"w": p0.copy()}, []
    for g in grads:
        opt.update(params, {"w": g})
        st = opt.state["w"]
        if master_weights == "remainder":
            master = precision.join_master(params["w"], st[REM])
        else:
            master = st[precision.MASTER].copy()
        slots = {s: st[s].copy() for s in RULES[rule].state if s in st}
        out.append((params["w"].copy(), master, slots))
    return out


def _assert_same_trajectory(rule, hp, backend, p0, grads):
    want = _run(rule, hp, backend, p0, grads, True)
    got = _run(rule, hp, backend, p0, grads, "remainder")
    ties = 0
    for t, ((pw, mw, sw), (pg, mg, sg)) in enumerate(zip(want, got)):
        assert np.array_equal(mg.view(np.uint32), mw.view(np.uint32)), f"{rule} step {t}"
        for s in sw:
            assert np.array_equal(sg[s].view(np.uint32), sw[s].view(np.uint32)), (rule, s, t)
        tie = _tie_above_even(mw)
        differ = pg.view(np.uint16) != pw.view(np.uint16)
        assert np.array_equal(differ, tie), f"{rule} step {t}: params differ off the ties"
        assert np.array_equal(pg.view(np.uint16)[tie], pw.view(np.uint16)[tie] + 1)
        ties += int(tie.sum())
    return ties


#: rules and hyperparameters of the trajectory tests (the default run: the oracle over several
#: rules, the numba loop over two; the rest under -m exhaustive)
TRAJECTORIES = [
    ("AdamW", dict(lr=1e-2)),
    ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
    ("RMSprop", dict(lr=1e-3, centered=True)),
    ("Adagrad", dict(lr=1e-2)),
]
DEFAULT_NUMBA = ("AdamW", "SGD")


@pytest.mark.parametrize(
    "backend,rule,hp",
    [
        pytest.param(
            b,
            r,
            hp,
            id=f"{b}-{r}",
            marks=() if b == "numpy" or r in DEFAULT_NUMBA else pytest.mark.exhaustive,
        )
        for b in ("numpy", "numba")
        for r, hp in TRAJECTORIES
    ],
)
def test_master_follows_the_fp32_master_trajectory_bit_for_bit(backend, rule, hp):
    rng = np.random.default_rng(len(rule))
    n = 1001
    p0 = rng.standard_normal(n).astype(BF16)
    grads = [rng.standard_normal(n).astype(BF16) for _ in range(4)]
    _assert_same_trajectory(rule, hp, backend, p0, grads)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_ties_on_a_lattice_where_they_are_common(backend):
    """Params in [1, 2) (bfloat16 spacing 2^-7), SGD with lr 2^-9 and gradients in {±1, ±2}:
    every master is a multiple of 2^-9, and hundreds land on a tie above an even param."""
    rng = np.random.default_rng(7)
    n = 1001
    p0 = (1 + rng.integers(0, 128, n) / 128).astype(BF16)
    grads = [rng.choice([-2.0, -1.0, 1.0, 2.0], n).astype(BF16) for _ in range(5)]
    ties = _assert_same_trajectory("SGD", dict(lr=2.0**-9), backend, p0, grads)
    assert ties > n // 2  # many ties over the steps: the statement is exercised


def test_flat_buffer_functional_and_state_dicts():
    """The FlatBuffer path (bfloat16 and float32 groups: a float32 param is its own master and
    keeps none), the functional door with ``master_remainder=``, state dicts that round-trip bit
    for bit, and loads across the two forms: a float32-master state into a remainder optimizer
    and back, the masters exact all along."""
    rng = np.random.default_rng(3)
    shapes = {"a": (7, 9), "b": (130,), "c": (5,)}
    p0 = {
        k: rng.standard_normal(s).astype(BF16 if k != "c" else np.float32)
        for k, s in shapes.items()
    }
    grads = [
        {k: rng.standard_normal(s).astype(p0[k].dtype) for k, s in shapes.items()} for _ in range(5)
    ]

    def steps(opt, buf, gs):
        for g in gs:
            for k in g:
                buf.grads[k][...] = g[k]
            opt.step(buf)

    fa, fb = fastopt.FlatBuffer(p0), fastopt.FlatBuffer(p0)
    A = fastopt.AdamW(lr=1e-2, master_weights=True, backend="numba")
    B = fastopt.AdamW(lr=1e-2, master_weights="remainder", backend="numba")
    steps(A, fa, grads[:2])
    steps(B, fb, grads[:2])
    assert sorted(B.state["a"]) == ["exp_avg", "exp_avg_sq", REM]
    assert sorted(B.state["c"]) == ["exp_avg", "exp_avg_sq"]
    for k in ("a", "b"):
        m = precision.join_master(fb.params[k], B.state[k][REM])
        assert np.array_equal(m.view(np.uint32), A.state[k][precision.MASTER].view(np.uint32))
    assert np.array_equal(fa.params["c"], fb.params["c"])

    # a remainder state dict round-trips bit for bit
    sd = B.state_dict()
    assert sd["state"]["a"][REM].dtype == np.int16
    B2 = fastopt.AdamW(lr=1e-2, master_weights="remainder", backend="numba")
    B2.load_state_dict(sd)
    fb2 = fastopt.FlatBuffer({k: v.copy() for k, v in fb.params.items()})
    steps(B2, fb2, grads[2:3])
    steps(B, fb, grads[2:3])
    for k in shapes:
        assert np.array_equal(fb2.params[k].view(np.uint8), fb.params[k].view(np.uint8))
        for s, a in B.state[k].items():
            assert np.array_equal(B2.state[k][s].view(np.uint8), a.view(np.uint8)), s

    # the fp32-master state into a remainder optimizer (the params it was stepped with), and
    # that one's state back into an fp32-master optimizer: the masters stay A's, bit for bit
    C = fastopt.AdamW(lr=1e-2, master_weights="remainder", backend="numba")
    C.load_state_dict(A.state_dict())
    fc = fastopt.FlatBuffer({k: v.copy() for k, v in fa.params.items()})
    steps(A, fa, grads[2:4])
    steps(C, fc, grads[2:4])
    D = fastopt.AdamW(lr=1e-2, master_weights=True, backend="numba")
    D.load_state_dict(C.state_dict())
    fd = fastopt.FlatBuffer({k: v.copy() for k, v in fc.params.items()})
    steps(A, fa, grads[4:])
    steps(D, fd, grads[4:])
    for k in ("a", "b"):
        want = A.state[k][precision.MASTER].view(np.uint32)
        assert np.array_equal(D.state[k][precision.MASTER].view(np.uint32), want)

    # the functional door: the same step as a master_param call
    p = rng.standard_normal(301).astype(np.float32)
    pb, r = precision.split_master(p)
    pm, master = pb.copy(), precision.join_master(pb, r)
    m1, v1 = np.zeros(301, np.float32), np.zeros(301, np.float32)
    m2, v2 = m1.copy(), v1.copy()
    g = rng.standard_normal(301).astype(BF16)
    functional.adam(pb, g, m1, v1, step=1, lr=1e-2, master_remainder=r, backend="numba")
    functional.adam(pm, g, m2, v2, step=1, lr=1e-2, master_param=master, backend="numba")
    assert np.array_equal(precision.join_master(pb, r).view(np.uint32), master.view(np.uint32))


def test_checkpoints_round_trip_the_remainder(tmp_path):
    from fastopt.checkpoint import load_checkpoint, save_checkpoint

    rng = np.random.default_rng(5)
    params = {"w": rng.standard_normal(257).astype(BF16)}
    opt = fastopt.Adam(lr=1e-2, master_weights="remainder", backend="numpy")
    opt.update(params, {"w": rng.standard_normal(257).astype(BF16)})
    save_checkpoint(tmp_path / "c.ckpt", opt, params)
    back = fastopt.Adam(lr=1e-2, master_weights="remainder", backend="numpy")
    into = {"w": np.zeros(257, BF16)}
    load_checkpoint(tmp_path / "c.ckpt", back, into)
    g = {"w": rng.standard_normal(257).astype(BF16)}
    opt.update(params, g)
    back.update(into, g)
    assert np.array_equal(into["w"].view(np.uint16), params["w"].view(np.uint16))
    for s, a in opt.state["w"].items():
        assert np.array_equal(back.state["w"][s].view(np.uint8), a.view(np.uint8)), s


def test_refusals_before_any_write():
    f16 = {"w": np.linspace(-1, 1, 9).astype(np.float16)}
    before = f16["w"].copy()
    opt = fastopt.Adam(master_weights="remainder", backend="numpy")
    with pytest.raises(ValueError, match="parameter 'w' .*float16 param cannot hold"):
        opt.update(f16, {"w": np.ones(9, np.float16)})
    assert np.array_equal(f16["w"], before) and not opt.state and opt.step_count == 0
    assert not opt._st.bound and opt._st.host is None  # refused before the state was created
    with pytest.raises(ValueError, match="float16 group \\(w\\).*float16 param cannot hold"):
        fastopt.Adam(master_weights="remainder").step(fastopt.FlatBuffer(f16))
    with pytest.raises(TypeError, match="master_weights"):
        fastopt.Adam(master_weights="fp32")
    with pytest.raises(ValueError, match="choose one"):
        fastopt.Adam(master_weights="remainder", stochastic_rounding=True)

    # the functional door
    p, r = precision.split_master(np.linspace(-1, 1, 9).astype(np.float32))
    m, v, g = np.zeros(9, np.float32), np.zeros(9, np.float32), np.ones(9, BF16)
    p0, r0 = p.copy(), r.copy()
    bad = [
        (dict(master_remainder=r, master_param=np.zeros(9, np.float32)), "pass one"),
        (dict(master_remainder=r.astype(np.int32)), "expected int16"),
        (dict(master_remainder=r[:5]), "expected int16"),
    ]
    for kw, why in bad:
        with pytest.raises(ValueError, match=why):
            functional.adam(p, g, m, v, step=1, **kw)
    with pytest.raises(ValueError, match="low half of a bfloat16"):
        functional.adam(
            np.ones(9, np.float32), np.ones(9, np.float32), m, v, step=1, master_remainder=r
        )
    with pytest.raises(ValueError, match="float16 param cannot hold"):
        functional.adam(
            np.ones(9, np.float16), np.ones(9, np.float16), m, v, step=1, master_remainder=r
        )
    assert np.array_equal(p.view(np.uint16), p0.view(np.uint16)) and np.array_equal(r, r0)
    assert not m.any() and not v.any()


@pytest.mark.parametrize("rule", sorted(RULES))
def test_bytes_per_param_follow_from_the_spec(rule):
    """The remainder's master costs its int16 (2 B) where the fp32 copy costs 4, for every
    rule: derived from the storage format, the numbers below from the dtypes alone."""
    mw = state_bytes_per_param(rule, param_dtype="bfloat16", master_weights=True)
    rem = state_bytes_per_param(rule, param_dtype="bfloat16", master_weights="remainder")
    none = state_bytes_per_param(rule, param_dtype="bfloat16", state_dtype="float32")
    assert mw - rem == np.dtype(np.float32).itemsize - np.dtype(np.int16).itemsize
    assert rem - none == np.dtype(np.int16).itemsize
    assert state_bytes_per_param(rule, master_weights="remainder") == state_bytes_per_param(rule)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=pytest.mark.exhaustive)])
def test_with_quantized_state(backend):
    """Quantized moments (``state_dtype="int8"``) beside a remainder master: the master is the
    fp32-master optimizer's bit for bit (the quantized loop joins and splits it too)."""
    rng = np.random.default_rng(9)
    p0 = rng.standard_normal(700).astype(BF16)
    kw = dict(lr=1e-2, state_dtype="int8", backend=backend)
    A, B = fastopt.Adam(master_weights=True, **kw), fastopt.Adam(master_weights="remainder", **kw)
    pa, pb = {"w": p0.copy()}, {"w": p0.copy()}
    for _ in range(3):
        g = {"w": rng.standard_normal(700).astype(BF16)}
        A.update(pa, g)
        B.update(pb, g)
        joined = precision.join_master(pb["w"], B.state["w"][REM])
        assert np.array_equal(
            joined.view(np.uint32), A.state["w"][precision.MASTER].view(np.uint32)
        )
        for s in ("exp_avg.codes", "exp_avg_sq.absmax"):
            assert np.array_equal(B.state["w"][s], A.state["w"][s]), s


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_float32_master_on_ties_loads_exactly(backend):
    """A ``master_weights=True`` state whose masters sit on ties above even params (where the
    saved param, nearest even, is not the split's) loads into a remainder optimizer: its first
    step writes the split's param, and the masters go on bit for bit; and back."""
    rng = np.random.default_rng(11)
    n = 513
    p0 = (1 + rng.integers(0, 128, n) / 128).astype(BF16)
    grads = [{"w": rng.choice([-2.0, -1.0, 1.0, 2.0], n).astype(BF16)} for _ in range(4)]
    A = fastopt.SGD(lr=2.0**-9, master_weights=True, backend=backend)
    pa = {"w": p0.copy()}
    A.update(pa, grads[0])
    tie = _tie_above_even(A.state["w"][precision.MASTER])
    assert tie.sum() > 50
    B = fastopt.SGD(lr=2.0**-9, master_weights="remainder", backend=backend)
    B.load_state_dict(A.state_dict())
    pb = {"w": pa["w"].copy()}
    for g in grads[1:3]:
        A.update(pa, g)
        B.update(pb, g)
        joined = precision.join_master(pb["w"], B.state["w"][REM])
        assert np.array_equal(
            joined.view(np.uint32), A.state["w"][precision.MASTER].view(np.uint32)
        )
    C = fastopt.SGD(lr=2.0**-9, master_weights=True, backend=backend)
    C.load_state_dict(B.state_dict())
    pc = {"w": pb["w"].copy()}
    A.update(pa, grads[3])
    C.update(pc, grads[3])
    assert np.array_equal(
        C.state["w"][precision.MASTER].view(np.uint32),
        A.state["w"][precision.MASTER].view(np.uint32),
    )
    assert np.array_equal(pc["w"].view(np.uint16), pa["w"].view(np.uint16))
