"""Mixed precision on the CPU backends: storage dtypes, master weights, stochastic rounding.

The semantics are ``fastopt.precision.oracle_step``'s: the NumPy oracle in float32 on widened
copies, its results rounded to nearest even into the storage dtypes. The conversions themselves
are held bit for bit to NumPy's float16 and ml_dtypes' bfloat16 casts (every 16-bit pattern
widened, a large sample of float32 patterns narrowed), in both their Python form
(``kernels/storage.py``: what the simulator runs) and as the numba CPU backend compiles them.

The loops around a rule depend on its state layout (how many slots, which ones a step writes),
not on its arithmetic, which the parity matrix holds to the oracle: where a test sweeps every
class only to reach every loop, the default run keeps one class per layout (``LAYOUTS``) and the
others are the ``exhaustive`` group (each class is a compile per loop).
"""

import inspect

import numpy as np
import pytest
from conftest import backend_params
from fastopt.kernels import RULES, storage
from support.cover import marks
from support.oracle import resolve, rule_hp

import fastopt
from fastopt import functional as F
from fastopt import precision
from fastopt.optimizers import CLASSES


def _layout(name):
    """(number of state slots, the slots written) of class ``name``'s first step at its
    defaults: what the generated loops around its rule depend on."""
    spec = RULES[CLASSES[name]._rule]
    hp = rule_hp(name, resolve(name, {}))
    return len(spec.slots), tuple(
        spec.slots_used(spec.flags_of(hp, 1, spec.initial_host_state(hp)))
    )


#: the first class of each state layout
LAYOUTS = list({_layout(name): name for name in reversed(CLASSES)}.values())


def _by_layout(names):
    """``pytest.param`` per class, those beside the first of their layout marked exhaustive."""
    return [pytest.param(n, marks=marks(n in LAYOUTS), id=n) for n in names]


ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
DT = {"bfloat16": BF16, "float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}


def ordinal(a):
    """Storage bit patterns as integers ordered like the values (ulp distance = difference)."""
    a = np.asarray(a)
    bits = 8 * a.dtype.itemsize
    u = a.view({2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize]).astype(np.int64)
    mag = u & ((1 << (bits - 1)) - 1)
    return np.where(u >> (bits - 1) == 1, -mag, mag)


def ulps(a, b):
    assert a.dtype == b.dtype and not np.isnan(np.asarray(a, np.float32)).any()
    return np.abs(ordinal(a) - ordinal(b))


# -- the conversions -------------------------------------------------------------------------------


def _float32_sample(n=200_000):
    rng = np.random.default_rng(7)
    special = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0xFFC00001]
    special += [0x477FF000, 0x477FEFFF, 0x477FF001, 0x33000000, 0x33000001, 0x387FFFFF]
    special += [0x38800000, 0x7F7FFFFF, 0x7F7F8000, 0x3F808000, 0x3F818000, 0x00000001]
    u = np.concatenate([rng.integers(0, 2**32, n, dtype=np.uint64), special]).astype(np.uint32)
    return u.view(np.float32)


def _check_loads(load_bits, kind):
    h = np.arange(1 << 16, dtype=np.uint16)
    ref = h.view(DT[kind]).astype(np.float32)
    got = load_bits(h)
    nan = np.isnan(ref)
    assert np.array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan]), kind
    assert np.isnan(got[nan]).all() and (np.signbit(got[nan]) == np.signbit(ref[nan])).all()


def _check_stores(store_bits, kind, x):
    with np.errstate(over="ignore", invalid="ignore"):
        ref = x.astype(DT[kind]).view(np.uint16)
    got = store_bits(x)
    nan = np.isnan(x)
    assert np.array_equal(got[~nan], ref[~nan]), kind
    back = got[nan].view(DT[kind]).astype(np.float32)
    assert np.isnan(back).all() and (np.signbit(back) == np.signbit(x[nan])).all()
    quiet = 0x40 if kind == "bfloat16" else 0x200
    assert (got[nan] & quiet).all(), "NaN must stay quiet"


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_python_conversions_are_exact(kind):
    load = {"bfloat16": storage.bf16_load, "float16": storage.f16_load}[kind]
    store = {"bfloat16": storage.bf16_store, "float16": storage.f16_store}[kind]
    _check_loads(lambda h: np.array([load(v) for v in h], np.float32), kind)
    _check_stores(
        lambda x: np.array([store(v) for v in x], np.uint16), kind, _float32_sample(20_000)
    )


@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
def test_compiled_cpu_conversions_are_exact(kind):
    numba = pytest.importorskip("numba")
    from fastopt.backends import numba_backend  # noqa: F401  (registers the CPU lowerings)

    load = {"bfloat16": storage.bf16_load, "float16": storage.f16_load}[kind]
    store = {"bfloat16": storage.bf16_store, "float16": storage.f16_store}[kind]

    @numba.njit
    def loads(h, out):
        for i in range(h.shape[0]):
            out[i] = load(h[i])

    @numba.njit
    def stores(x, out):
        for i in range(x.shape[0]):
            out[i] = store(x[i])

    def load_bits(h):
        out = np.empty(h.size, np.float32)
        loads(h, out)
        return out

    def store_bits(x):
        out = np.empty(x.size, np.uint16)
        stores(x, out)
        return out

    _check_loads(load_bits, kind)
    _check_stores(store_bits, kind, _float32_sample())


def test_bf16_word_conversions_are_the_element_conversions():
    """The word-at-a-time forms (two bfloat16 in one 32-bit word, the CPU loop over
    all-bfloat16 arrays) against the element forms: every 16-bit pattern in each half of a
    word, the float32 sample paired both ways, in Python and as the numba backend compiles them."""
    numba = pytest.importorskip("numba")
    from fastopt.backends import numba_backend  # noqa: F401  (registers the CPU lowerings)

    rng = np.random.default_rng(11)
    h = np.arange(1 << 16, dtype=np.uint32)
    words = h | (rng.permutation(h) << 16)
    x = _float32_sample()
    a, b = x, rng.permutation(x)

    @numba.njit
    def split(w, lo, hi):
        for i in range(w.shape[0]):
            lo[i] = storage.bf16_lo(w[i])
            hi[i] = storage.bf16_hi(w[i])

    @numba.njit
    def join(a, b, out):
        for i in range(a.shape[0]):
            out[i] = storage.bf16_pair_store(a[i], b[i])

    @numba.njit
    def one_by_one(a, b, out):
        for i in range(a.shape[0]):
            out[i] = storage.bf16_store(a[i]) | (np.uint32(storage.bf16_store(b[i])) << 16)

    lo, hi = np.empty(h.size, np.float32), np.empty(h.size, np.float32)
    split(words, lo, hi)
    halves = words.view(np.uint16).reshape(-1, 2)
    for got, bits in ((lo, halves[:, 0]), (hi, halves[:, 1])):
        _check_loads(lambda _, got=got, bits=bits: got[np.argsort(bits)], "bfloat16")
    joined, ref = np.empty(x.size, np.uint32), np.empty(x.size, np.uint32)
    join(a, b, joined)
    one_by_one(a, b, ref)
    assert np.array_equal(joined, ref)
    _check_stores(lambda v: joined.view(np.uint16)[0::2], "bfloat16", a)
    _check_stores(lambda v: joined.view(np.uint16)[1::2], "bfloat16", b)
    py = slice(0, 4000)  # the Python forms, on a slice (they run one element per call)
    assert [storage.bf16_pair_store(u, v) for u, v in zip(a[py], b[py])] == list(ref[py])
    sample = words[:: 1 << 4]
    lo_py = np.array([storage.bf16_lo(w) for w in sample], np.float32)
    hi_py = np.array([storage.bf16_hi(w) for w in sample], np.float32)
    assert np.array_equal(lo_py.view(np.uint32), lo[:: 1 << 4].view(np.uint32))
    assert np.array_equal(hi_py.view(np.uint32), hi[:: 1 << 4].view(np.uint32))


def _bf16_wild(rng, n):
    """Normal-ish bfloat16 values, one in ten replaced by a random bit pattern (NaN, ±inf,
    subnormals, huge values)."""
    bits = rng.standard_normal(n).astype(np.float32).astype(BF16).view(np.uint16)
    wild = rng.random(n) < 0.1
    bits[wild] = rng.integers(0, 1 << 16, int(wild.sum()), dtype=np.uint16)
    return bits.view(BF16)


@pytest.mark.parametrize("name", _by_layout(CLASSES))
def test_bf16_word_loop_matches_the_element_loop(name, monkeypatch):
    """All-bfloat16 steps on the CPU walk the arrays a 32-bit word (two elements) at a time;
    arrays that do not start on a 4-byte boundary take the element loop. Both give the same
    bits, params and every state buffer, NaN and subnormals included, over an odd length (the
    last element goes through the element loop), with the grad unscaled in the pass and
    stored back."""
    from fastopt.backends import numba_backend

    calls = []
    real = numba_backend.kernel

    def spy(*a, **kw):
        calls.append(kw.get("pairs", False))
        return real(*a, **kw)

    monkeypatch.setattr(numba_backend, "kernel", spy)
    rng = np.random.default_rng(12)
    n, steps = 1001, 3
    p0 = _bf16_wild(rng, n)
    grads = [_bf16_wild(rng, n) for _ in range(steps)]

    def run(offset):
        def place(a):
            out = np.empty(n + offset, BF16)[offset:]
            out[...] = a
            return out

        p, opt, unscaled = place(p0), CLASSES[name](backend="numba"), []
        for g in grads:
            g = place(g)
            opt.update({"w": p}, {"w": g}, grad_scale=2.0, unscale_grads=True)
            unscaled.append(g)
        return p, opt, unscaled

    with np.errstate(all="ignore"):
        calls.clear()
        p_words, opt_words, g_words = run(0)
        assert True in calls, "the aligned arrays did not take the word loop"
        calls.clear()
        p_elems, opt_elems, g_elems = run(1)
        assert calls and True not in calls, "misaligned arrays must take the element loop"
        halved = [(g.astype(np.float32) * np.float32(0.5)).astype(BF16) for g in grads]
    assert np.array_equal(p_words.view(np.uint16), p_elems.view(np.uint16))
    assert opt_words.state["w"].keys() == opt_elems.state["w"].keys()
    for s, a in opt_words.state["w"].items():
        assert np.array_equal(a.view(np.uint16), opt_elems.state["w"][s].view(np.uint16)), s
    for gw, ge, ref in zip(g_words, g_elems, halved):
        assert np.array_equal(gw.view(np.uint16), ge.view(np.uint16))
        nan = np.isnan(ref.astype(np.float32))
        assert np.isnan(gw[nan].astype(np.float32)).all()
        assert np.array_equal(gw.view(np.uint16)[~nan], ref.view(np.uint16)[~nan])


# -- every optimizer, 16-bit storage ---------------------------------------------------------------

STEPS = 30
N = 512


def _run(cls, backend, kind, steps=STEPS, n=N, seed=0, **kw):
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(n).astype(DT[kind])
    opt = cls(lr=1e-2, backend=backend, **kw)
    for _ in range(steps):
        opt.update({"w": p}, {"w": rng.standard_normal(n).astype(DT[kind])})
    return p, opt


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("kind", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", _by_layout(CLASSES))
def test_16_bit_params_and_state_agree_with_the_oracle(name, kind, backend):
    """States in the param dtype (the default): within 4 ulps of the fp32-math oracle with
    low-precision storage after 30 steps, params and every state buffer (bfloat16: the word
    loop; float16: the element loop)."""
    cls = CLASSES[name]
    p, opt = _run(cls, backend, kind)
    ref, ref_opt = _run(cls, "numpy", kind)
    assert not np.isnan(p.astype(np.float32)).any()
    assert ulps(p, ref).max() <= 4, f"{name} {kind} param: {ulps(p, ref).max()} ulps"
    for s, a in opt.state["w"].items():
        assert a.dtype == DT[kind], f"state {s} is {a.dtype}"
        d = ulps(a, ref_opt.state["w"][s]).max()
        assert d <= 4, f"{name} {kind} state {s}: {d} ulps"


@pytest.mark.parametrize("backend", backend_params())
def test_state_dtype_policies(backend):
    rng = np.random.default_rng(3)
    p = {"h": rng.standard_normal(64).astype(BF16), "f": rng.standard_normal(64).astype("f4")}
    for policy, want in [
        (None, {"h": BF16, "f": np.dtype("f4")}),
        ("float32", {"h": np.dtype("f4"), "f": np.dtype("f4")}),
        ("bfloat16", {"h": BF16, "f": BF16}),
    ]:
        opt = fastopt.Adam(state_dtype=policy, backend=backend)
        opt.update(p, {k: np.ones_like(v) for k, v in p.items()})
        for k, dt in want.items():
            assert {a.dtype for a in opt.state[k].values()} == {dt}, (policy, k)
    with pytest.raises(TypeError, match="bfloat16 state would round it twice"):
        fastopt.Adam(state_dtype="bfloat16", backend=backend).update(
            {"d": np.ones(4)}, {"d": np.ones(4)}
        )


# -- master weights: the bf16 rounding of an fp32 torch.optim run ---------------------------------


def _torch_cases():
    from fastopt.bench.measure import CASES

    return [c for c in CASES.values() if c.torch_cls is not None and not c.kwargs]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("case", _torch_cases(), ids=lambda c: c.name)
def test_master_weights_track_an_fp32_torch_run(case, backend):
    """bf16 params with an fp32 master (and fp32 state): after 30 steps each bf16 param is the
    bf16 rounding of what fp32 torch.optim computes from the same gradients (a couple of
    elements of 4096 may round the other way: the two fp32 runs differ by an ulp or so)."""
    torch = pytest.importorskip("torch")
    n, rng = 4096, np.random.default_rng(5)
    p0 = rng.standard_normal(n).astype(BF16)
    grads = [rng.standard_normal(n).astype(BF16) for _ in range(STEPS)]
    tcls = getattr(torch.optim, case.torch_cls)
    takes = inspect.signature(tcls).parameters
    kw = {k: v for k, v in dict(case.torch_kwargs, lr=1e-2).items() if k in takes}
    w = torch.tensor(p0.astype(np.float32), requires_grad=True)
    topt = tcls([w], **kw)
    ours = {"w": p0.copy()}
    opt = getattr(fastopt, case.cls)(lr=1e-2, master_weights=True, backend=backend)
    for g in grads:
        w.grad = torch.tensor(g.astype(np.float32))
        topt.step()
        opt.update(ours, {"w": g})
    want = w.detach().numpy().astype(BF16)
    mism = int((ours["w"].view(np.uint16) != want.view(np.uint16)).sum())
    assert mism <= 2, f"{case.name}: {mism} of {n} bf16 params differ from fp32 torch"
    master = opt.state["w"][precision.MASTER]
    assert master.dtype == np.float32
    np.testing.assert_allclose(master, w.detach().numpy(), rtol=1e-5, atol=1e-6)


# -- stochastic rounding ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_stochastic_rounding_is_unbiased_and_reproducible(backend):
    """SGD with a constant update that bf16 cannot hold: round to nearest loses it every step,
    stochastic rounding keeps it on average (mean error ~0 over many elements); the same seed
    gives the same bits, another seed others."""
    n = 1 << 16
    lr, g = 1.0, np.full(n, 1e-3, BF16)  # 1 - 1e-3 lies between two bf16 neighbours of 1

    def run(sr, seed, steps=1):
        p = np.ones(n, BF16)
        opt = fastopt.SGD(lr=lr, stochastic_rounding=sr, seed=seed, backend=backend)
        for _ in range(steps):
            opt.update({"w": p}, {"w": g})
        return p

    exact = np.float32(1) - np.float32(g[0].astype(np.float32))
    nearest = run(False, 0).astype(np.float32)
    assert (nearest == 1.0).all()  # round to nearest: the update is lost
    a, b, c = run(True, 1), run(True, 1), run(True, 2)
    assert np.array_equal(a.view(np.uint16), b.view(np.uint16))
    assert not np.array_equal(a.view(np.uint16), c.view(np.uint16))
    vals = a.astype(np.float32)
    assert set(np.unique(vals)) <= {np.float32(1.0), np.float32(0.99609375)}
    ulp = 1.0 - 0.99609375
    err = vals.mean(dtype=np.float64) - float(exact)
    # unbiased: |mean error| within 4 standard errors (sd <= ulp/2 per element)
    assert abs(err) < 4 * (ulp / 2) / np.sqrt(n), f"mean error {err:.3g}"
    # and over many steps the sum of the updates is kept, not lost
    many = run(True, 3, steps=8).astype(np.float32).mean(dtype=np.float64)
    assert abs(many - (1 - 8 * float(g[0].astype(np.float32)))) < 4 * ulp / np.sqrt(n) * 3


def test_stochastic_rounding_bits_agree_across_backends():
    out = {}
    for backend in ("numpy", "numba"):
        r = np.random.default_rng(9)
        p = r.standard_normal(3001).astype(BF16)
        m, v = np.zeros(3001, np.float32), np.zeros(3001, np.float32)
        for t in range(1, 4):
            F.adam(
                p,
                r.standard_normal(3001).astype(BF16),
                m,
                v,
                step=t,
                lr=0.01,
                backend=backend,
                stochastic_rounding=True,
                seed=11,
                salt=5,
            )
        out[backend] = p
    assert np.array_equal(out["numpy"].view(np.uint16), out["numba"].view(np.uint16))


# -- state, checkpoints, FlatBuffers, tensors, refusals --------------------------------------------


@pytest.mark.parametrize("backend", backend_params())
def test_master_and_bf16_state_survive_checkpoints(tmp_path, backend):
    """The fp32 master and bfloat16 state are saved and restored exactly: a resumed run
    continues bit for bit."""
    rng = np.random.default_rng(8)
    p0 = {"w": rng.standard_normal(300).astype(BF16), "h": rng.standard_normal(9).astype("f2")}
    grads = [
        {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in p0.items()} for _ in range(6)
    ]

    def make():
        return fastopt.Adam(lr=0.01, master_weights=True, state_dtype="bfloat16", backend=backend)

    full, opt = {k: v.copy() for k, v in p0.items()}, make()
    for g in grads:
        opt.update(full, g)
    half, first = {k: v.copy() for k, v in p0.items()}, make()
    for g in grads[:3]:
        first.update(half, g)
    assert set(first.state["w"]) == {"exp_avg", "exp_avg_sq", precision.MASTER}
    assert first.state["w"][precision.MASTER].dtype == np.float32
    assert first.state["w"]["exp_avg"].dtype == BF16
    path = tmp_path / "mixed.ckpt"
    fastopt.save_checkpoint(path, first, half)
    resumed, second = {k: np.zeros_like(v) for k, v in p0.items()}, make()
    fastopt.load_checkpoint(path, second, resumed)
    for g in grads[3:]:
        second.update(resumed, g)
    for k in p0:
        assert np.array_equal(resumed[k].view(np.uint16), full[k].view(np.uint16))
        for s, a in opt.state[k].items():
            assert np.array_equal(second.state[k][s], a), (k, s)
    # a state_dict without the master copy does not fit an optimizer that keeps one
    sd = opt.state_dict()
    del sd["state"]["w"][precision.MASTER]
    late = make()
    late.load_state_dict(sd)  # before the first step: its names are checked when it binds
    with pytest.raises(KeyError, match="master_param"):
        late.update({k: v.copy() for k, v in p0.items()}, grads[0])
    assert late.step_count == opt.step_count


@pytest.mark.parametrize("backend", backend_params())
def test_flat_buffer_with_float32_grads_of_bf16_params(backend):
    rng = np.random.default_rng(6)
    params = {"a": rng.standard_normal(100).astype(BF16), "b": rng.standard_normal(33)}
    buf = fastopt.FlatBuffer(params, grad_dtype="float32")
    assert {str(g.grad.dtype) for g in buf.groups} == {"float32", "float64"}
    ref = {k: v.copy() for k, v in params.items()}
    opt, ref_opt = fastopt.Adam(lr=0.01, backend=backend), fastopt.Adam(lr=0.01, backend="numpy")
    for _ in range(3):
        g = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in params.items()}
        for k in g:
            buf.grads[k][...] = g[k]
        opt.step(buf)
        ref_opt.update(ref, {k: g[k].astype(np.float32 if k == "a" else np.float64) for k in g})
    assert ulps(buf.params["a"], ref["a"]).max() <= 1
    np.testing.assert_allclose(buf.params["b"], ref["b"], rtol=1e-12)


def test_torch_16_bit_tensors_are_stepped_in_place():
    torch = pytest.importorskip("torch")
    for dt, np_dt in ((torch.bfloat16, BF16), (torch.float16, np.dtype(np.float16))):
        w = torch.linspace(-1, 1, 64, dtype=dt, requires_grad=True)
        ptr, before = w.data_ptr(), w.detach().clone()
        opt = fastopt.SGD(lr=0.5)
        assert opt.update({"w": w}, {"w": torch.ones(64, dtype=dt)})
        assert w.data_ptr() == ptr and not torch.equal(w.detach(), before)
        want = (before.float().numpy() - 0.5).astype(np_dt)
        got = w.detach().view(torch.int16).numpy().view(np_dt)
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_mixed_precision_refusals():
    bf = np.ones(8, BF16)
    with pytest.raises(ValueError, match="choose one"):
        fastopt.Adam(master_weights=True, stochastic_rounding=True)
    with pytest.raises(ValueError, match="state_dtype"):
        fastopt.Adam(state_dtype="float16")
    with pytest.raises(ValueError, match="seed"):
        fastopt.SGD(seed=-1)
    with pytest.raises(AttributeError):
        fastopt.SGD().master_weights = True
    m, v = np.zeros(8, np.float32), np.zeros(8, np.float32)
    with pytest.raises(ValueError, match="master_param is for float16/bfloat16"):
        F.adam(np.ones(8, np.float32), np.ones(8, np.float32), m, v, step=1, master_param=m.copy())
    with pytest.raises(ValueError, match="stochastic_rounding"):
        F.adam(
            np.ones(8, np.float32), np.ones(8, np.float32), m, v, step=1, stochastic_rounding=True
        )
    with pytest.raises(ValueError, match="keeps its state in"):
        F.adam(np.ones(8), np.ones(8), m.astype(BF16), v.astype(BF16), step=1)
    with pytest.raises(TypeError, match="float16"):  # a bf16 param's grad: bf16 or float32
        F.sgd(bf.copy(), np.ones(8, np.float16), step=1)
    assert (m == 0).all() and (v == 0).all()


def test_fastopt_runs_without_ml_dtypes():
    """ml_dtypes is optional: without it fastopt imports, steps float16, and refuses bfloat16
    with the fix in the message."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["ml_dtypes"] = None  # as if not installed
import numpy as np
import fastopt
p = {"w": np.ones(8, np.float16)}
assert fastopt.Adam(lr=0.5).update(p, {"w": np.ones(8, np.float16)})
assert (p["w"] < 1).all()
try:
    fastopt.precision.bfloat16()
except ImportError as exc:
    assert "pip install ml_dtypes" in str(exc)
else:
    raise AssertionError("bfloat16 without ml_dtypes")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-3000:]
