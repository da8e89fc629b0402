"""Hardening, round 2, at the core doors: ``update(params, grads)``, ``FlatBuffer``/``step(buf)``,
``fastopt.functional`` and the classes' state dicts.

Four families, each closed at its root (ARCHITECTURE.md, "How a step flows"):

1. the memory behind an array: a torch tensor whose storage was freed or shrunk, a meta tensor, a
   NumPy view of an array resized since, and an array resized in place between cached steps
   (``_arrays.check_backing``, ``_arrays.Pins``);
2. a call refused after it wrote: every fallible computation (host scalars, the host state
   after the step, the step count) is planned before the first write (``StepPlan``,
   ``Rule.variant_and_scalars``), and the step count and host state are committed after the
   launches;
3. ndarray subclasses: viewed as plain arrays (``np.matrix``, ``np.memmap``, any subclass) or
   refused (a masked array) at every door;
4. valid input refused: the state dict and checkpoint of a master-weights optimizer over mixed
   bfloat16 and float32 params.

Every case runs on every CPU backend (the ``backend`` fixture): a correct result against the
oracle or an identical twin, or a clear ``TypeError``/``ValueError`` with nothing changed
(params, grads, state, step count, host state).
"""

import math
import time

import numpy as np
import pytest
from fastopt.kernels import spec as rule_spec

import fastopt
from fastopt import functional as F
from fastopt import reference

torch = pytest.importorskip("torch")


def _copy(a):
    if isinstance(a, torch.Tensor):
        return a.detach().numpy().copy()
    return np.array(a, copy=True)


def _snap(opt, *dicts):
    """Everything a refused call must leave as it was: the arrays of ``dicts``, every state
    buffer, the step count, the host state and the hyperparameters."""
    return (
        [{n: _copy(a) for n, a in d.items()} for d in dicts],
        {n: {s: _copy(a) for s, a in st.items()} for n, st in opt.state.items()},
        [{s: _copy(a) for s, a in f.items()} for f in (opt._flat_state or [])],
        opt.step_count,
        opt.host_state,
        opt.hyperparams,
    )


def _assert_same(before, after):
    arrays0, state0, flat0, step0, host0, hp0 = before
    arrays1, state1, flat1, step1, host1, hp1 = after
    for d0, d1 in zip(arrays0, arrays1):
        assert d0.keys() == d1.keys()
        for n in d0:
            assert np.array_equal(d0[n], d1[n], equal_nan=True), f"array {n!r} changed"
    assert state0.keys() == state1.keys(), "state created or dropped"
    for n, st in state0.items():
        for s, a in st.items():
            assert np.array_equal(a, state1[n][s], equal_nan=True), f"state {s} of {n} changed"
    for f0, f1 in zip(flat0, flat1):
        for s in f0:
            assert np.array_equal(f0[s], f1[s], equal_nan=True), f"flat state {s} changed"
    assert step1 == step0, "step count changed"
    assert host1 == host0, "host state changed"
    assert hp1 == hp0


def _refused(opt, call, dicts, exc, match):
    """``call()`` raises ``exc`` matching ``match`` and changes nothing of ``opt`` or ``dicts``."""
    before = _snap(opt, *dicts)
    with pytest.raises(exc, match=match):
        call()
    _assert_same(before, _snap(opt, *dicts))


def _arrays(rng, shapes, dtype=np.float32):
    return {n: rng.standard_normal(s).astype(dtype) for n, s in shapes.items()}


SHAPES = {"a": (5,), "w": (8, 8)}


def _twins(backend, cls=fastopt.Adam, steps=2, seed=0, **kw):
    """Two optimizers stepped identically over equal params (one to disturb, one to compare)."""
    rng = np.random.default_rng(seed)
    p = _arrays(rng, SHAPES)
    gs = [_arrays(rng, SHAPES) for _ in range(steps)]
    out = []
    for _ in range(2):
        params, opt = {n: a.copy() for n, a in p.items()}, cls(backend=backend, **kw)
        for g in gs:
            assert opt.update(params, g) is True
        out.append((opt, params))
    return out, _arrays(rng, SHAPES)


def _assert_twins_equal(a, b):
    (oa, pa), (ob, pb) = a, b
    for n in pa:
        assert np.array_equal(pa[n], pb[n]), f"param {n!r} differs from its twin"
        for s in ob.state[n]:
            assert np.array_equal(oa.state[n][s], ob.state[n][s]), f"state {s} of {n} differs"
    assert oa.step_count == ob.step_count


# -- 1: the memory behind an array ------------------------------------------------------------


def _shrunk(n=64):
    t = torch.arange(n, dtype=torch.float32)
    t.untyped_storage().resize_(8)  # what a sharded model does to a gathered parameter
    return t


@pytest.mark.parametrize("door", ["functional", "update", "FlatBuffer"])
def test_a_tensor_whose_storage_shrank_is_refused_before_a_read(backend, door):
    t = _shrunk()
    rng = np.random.default_rng(1)
    g, m, v = (rng.standard_normal(64).astype(np.float32) for _ in range(3))
    keep = [g.copy(), m.copy(), v.copy()]
    with pytest.raises(ValueError, match=r"holds 8.*freed or shrunk"):
        if door == "functional":
            F.adam(t, g, m, v, step=1, backend=backend)
        elif door == "update":
            opt = fastopt.Adam(backend=backend)
            try:
                opt.update({"w": t}, {"w": g})
            finally:
                assert opt.state == {} and opt.step_count == 0
        else:
            fastopt.FlatBuffer({"w": t})
    for a, b in zip((g, m, v), keep):
        assert np.array_equal(a, b)
    # the grad's storage shrunk instead
    p = torch.ones(64)
    with pytest.raises(ValueError, match="grad"):
        F.adam(p, _shrunk(), m, v, step=1, backend=backend)
    assert torch.equal(p, torch.ones(64)) and np.array_equal(m, keep[1])


def test_a_meta_or_sparse_tensor_is_refused(backend):
    opt = fastopt.SGD(lr=0.1, backend=backend)
    g = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="meta tensor"):
        opt.update({"w": torch.ones(4, device="meta")}, {"w": g})
    with pytest.raises(TypeError, match="meta tensor"):
        F.sgd(torch.ones(4, device="meta"), g, step=1, lr=0.1, backend=backend)
    with pytest.raises(TypeError, match="sparse"):
        fastopt.FlatBuffer({"w": torch.ones(4).to_sparse()})
    assert opt.state == {} and opt.step_count == 0


@pytest.mark.parametrize("shrink", ["param", "grad"])
def test_torch_tensors_shrunk_between_cached_steps_are_refused(backend, shrink):
    rng = np.random.default_rng(2)
    params = {n: torch.tensor(a) for n, a in _arrays(rng, SHAPES).items()}
    opt = fastopt.Adam(backend=backend)
    for _ in range(2):
        grads = {n: torch.tensor(a) for n, a in _arrays(rng, SHAPES).items()}
        assert opt.update(params, grads) is True  # the second through the cached path
    before = _snap(opt, params, grads)
    # torch locks a storage that NumPy views (resize_ raises); if it ever stops doing so, the
    # cached path still compares each tensor's address and storage size
    for t in (params["w"], grads["w"]):
        try:
            t.untyped_storage().resize_(8)
        except RuntimeError:
            continue
        with pytest.raises(ValueError, match="freed or shrunk"):
            opt.update(params, grads)
        return
    _assert_same(before, _snap(opt, params, grads))
    # a fresh tensor whose storage was shrunk, handed in at a cached step
    fresh = torch.tensor(rng.standard_normal((8, 8)).astype(np.float32))
    fresh.untyped_storage().resize_(8)
    call = (
        (lambda: opt.update({**params, "w": fresh}, grads))
        if shrink == "param"
        else (lambda: opt.update(params, {**grads, "w": fresh}))
    )
    _refused(opt, call, [params, grads], ValueError, "freed or shrunk")
    assert opt.update(params, grads) is True and opt.step_count == 3


def _resized_view(n):
    """A view of the first ``n`` floats of an array then resized to 2^20 elements: the view
    points at the freed block (the new one is mapped elsewhere)."""
    base = np.arange(n + 8, dtype=np.float32)
    view = base[8:]
    base.resize(1 << 20, refcheck=False)
    return base, view


def test_a_view_of_a_resized_array_is_refused_at_every_door(backend):
    rng = np.random.default_rng(3)
    g, m, v = (rng.standard_normal(64).astype(np.float32) for _ in range(3))
    keep = [g.copy(), m.copy(), v.copy()]
    _base, dangling = _resized_view(64)
    for call in (
        lambda: F.adam(dangling, g, m, v, step=1, backend=backend),
        lambda: F.adam(m.copy(), dangling, m, v, step=1, backend=backend),  # a grad, read only
        lambda: fastopt.FlatBuffer({"w": dangling}),
    ):
        with pytest.raises(ValueError, match="resized or freed"):
            call()
    opt = fastopt.Adam(backend=backend)
    with pytest.raises(ValueError, match="resized or freed"):
        opt.update({"w": dangling}, {"w": g})
    assert opt.state == {} and opt.step_count == 0
    for a, b in zip((g, m, v), keep):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("what", ["param", "grad", "state"])
def test_views_whose_array_is_resized_between_cached_steps_are_refused(backend, what):
    rng = np.random.default_rng(4)
    base = rng.standard_normal(8 + 64).astype(np.float32)
    params = {"a": rng.standard_normal(5).astype(np.float32)}
    if what == "param":
        params["w"] = base[8:].reshape(8, 8)
    else:
        params["w"] = rng.standard_normal((8, 8)).astype(np.float32)
    opt = fastopt.Adam(backend=backend)
    grads = _arrays(rng, SHAPES)
    if what == "grad":
        grads["w"] = base[8:].reshape(8, 8)
    if what == "state":
        opt.update(params, grads)
        base[8:] = opt.state["w"]["exp_avg"].reshape(-1)
        opt.state["w"]["exp_avg"] = base[8:].reshape(8, 8)  # a valid rebinding, used
    for _ in range(2):
        assert opt.update(params, grads) is True
    base.resize(1 << 20, refcheck=False)  # every view of it now points at freed memory
    keep = {"a": params["a"]} if what == "param" else params
    before = _snap(opt, keep)
    if what == "state":  # the snapshot must not read the freed buffer either
        before[1]["w"].pop("exp_avg")
    with pytest.raises(ValueError, match="resized or freed"):
        opt.update(params, grads)
    after = _snap(opt, keep) if what != "state" else None
    if after is not None:
        _assert_same(before, after)
    else:
        assert opt.step_count == before[3]
        assert np.array_equal(params["w"], before[0][0]["w"])
        assert np.array_equal(opt.state["w"]["exp_avg_sq"], before[1]["w"]["exp_avg_sq"])


@pytest.mark.parametrize("what", ["param", "exp_avg"])
def test_arrays_resized_in_place_between_cached_steps_are_followed(backend, what):
    # resized up then back: same object, shape, dtype and flags, new memory (grown to 64 MiB,
    # past glibc's largest dynamic mmap threshold (32 MiB), the block moves out of the heap for
    # good; at 8 MiB a long-lived process had raised the threshold and realloc stayed put).
    # The cached flat views pointed at the freed block (a write after free); the address
    # re-check rebuilds them, and the step lands where its twin's does, bit for bit.
    (a, b), g = _twins(backend)
    (opt, params) = a
    arr = params["w"] if what == "param" else opt.state["w"]["exp_avg"]
    address = arr.ctypes.data
    arr.resize((1 << 20, 8), refcheck=False)
    arr.resize((8, 8), refcheck=False)
    assert arr.ctypes.data != address  # moved (else the case tests nothing)
    for _ in range(2):
        assert a[0].update(a[1], g) is True
        assert b[0].update(b[1], g) is True
    _assert_twins_equal(a, b)


def test_flatbuffer_arrays_resized_or_rebound_between_cached_steps(backend):
    rng = np.random.default_rng(5)
    p = {"a": rng.standard_normal(40), "b": rng.standard_normal((3, 7))}
    bufs = [fastopt.FlatBuffer(p), fastopt.FlatBuffer(p)]
    opts = [fastopt.Adam(backend=backend) for _ in bufs]
    for _ in range(2):
        g = rng.standard_normal(bufs[0].grad.shape)
        for buf, opt in zip(bufs, opts):
            buf.grad[...] = g
            assert opt.step(buf) is True
    group = bufs[0].groups[0]
    n = group.data.shape[0]
    address = group.data.ctypes.data
    group.data.resize(1 << 23, refcheck=False)
    group.data.resize(n, refcheck=False)
    assert group.data.ctypes.data != address
    for buf, opt in zip(bufs, opts):
        assert opt.step(buf) is True
    assert np.array_equal(bufs[0].groups[0].data, bufs[1].groups[0].data)
    # a grad rebound to a view of an array resized since: refused, nothing changed
    base = np.zeros(n + 8)
    group.grad = base[8:]
    assert opts[0].step(bufs[0]) is True
    base.resize(1 << 20, refcheck=False)
    opt = opts[0]
    _refused(opt, lambda: opt.step(bufs[0]), [{"data": group.data}], ValueError, "resized or freed")


# -- 2: everything that can fail is computed before the first write ----------------------------


def test_asgd_whose_host_state_overflows_is_refused_before_a_write(backend):
    rng = np.random.default_rng(6)
    params, grads = _arrays(rng, SHAPES), _arrays(rng, SHAPES)
    # the first step: (1 + lambd·lr·1)^alpha overflows while planning the host state after it
    opt = fastopt.ASGD(lambd=1e6, alpha=100, backend=backend)
    _refused(opt, lambda: opt.update(params, grads), [params, grads], ValueError, "asgd.*step 1")
    assert opt.state == {}  # no state created for a step that cannot be planned
    buf = fastopt.FlatBuffer(params)
    _refused(opt, lambda: opt.step(buf), [buf.params], ValueError, "asgd")
    # later steps: a schedule sets the same values
    opt = fastopt.ASGD(backend=backend)
    for _ in range(2):
        assert opt.update(params, grads) is True
    opt.lambd, opt.alpha = 1e6, 100.0
    _refused(opt, lambda: opt.update(params, grads), [params, grads], ValueError, "step 3")
    hs = {"eta": np.array(0.01, np.float32), "mu": 1.0}
    p = params["a"].copy()
    with pytest.raises(ValueError, match="asgd"):
        F.asgd(p, grads["a"], np.zeros(5, np.float32), step=1, lambd=1e6, alpha=100,
               host_state=hs, backend=backend)  # fmt: skip
    assert np.array_equal(p, params["a"]) and hs["eta"] == np.float32(0.01) and hs["mu"] == 1.0


@pytest.mark.parametrize("layout", ["dict", "flat"])
def test_a_loaded_step_too_large_for_a_float_is_refused_before_a_write(backend, layout):
    rng = np.random.default_rng(7)
    params, grads = _arrays(rng, SHAPES), _arrays(rng, SHAPES)
    opt = fastopt.NAdam(backend=backend)
    if layout == "dict":
        opt.update(params, grads)
        call, arrays = (lambda: opt.update(params, grads)), [params, grads]
    else:
        buf = fastopt.FlatBuffer(params)
        opt.step(buf)
        call, arrays = (lambda: opt.step(buf)), [buf.params]
    sd = opt.state_dict()
    sd["step"] = 10**400
    opt.load_state_dict(sd)
    _refused(opt, call, arrays, ValueError, r"nadam: the host scalars of step 100000\.\.\.")
    assert opt.step_count == 10**400  # not incremented


@pytest.mark.parametrize("step", [math.inf, math.nan, 2.5, -1, True])
def test_a_loaded_step_that_is_no_count_is_refused(backend, step):
    rng = np.random.default_rng(8)
    params, grads = _arrays(rng, SHAPES), _arrays(rng, SHAPES)
    opt = fastopt.Adam(backend=backend)
    opt.update(params, grads)
    sd = opt.state_dict()
    sd["step"] = step
    _refused(opt, lambda: opt.load_state_dict(sd), [params], ValueError, "step")


def test_functional_replay_of_the_host_state_is_bounded(backend, monkeypatch):
    rng = np.random.default_rng(9)
    p, g = (rng.standard_normal(16).astype(np.float32) for _ in range(2))
    m, v = np.zeros(16, np.float32), np.zeros(16, np.float32)
    keep = [p.copy(), m.copy(), v.copy()]
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"step 10000000 without host_state.*pass host_state="):
        F.nadam(p, g, m, v, step=10**7, backend=backend)
    assert time.perf_counter() - t0 < 5  # refused up front, not after 10^7 advances
    assert all(np.array_equal(a, b) for a, b in zip((p, m, v), keep))
    # with the host state given, step 10^7 is one step, as the oracle takes it
    hs = {"mu_product": np.array(0.25, np.float32)}
    F.nadam(p, g, m, v, step=10**7, host_state=hs, backend=backend)
    ref = {"exp_avg": np.zeros(16), "exp_avg_sq": np.zeros(16)}
    ref["mu_product"] = np.array(0.25, np.float32)
    rp = keep[0].astype(np.float64)
    reference.nadam(rp, g.astype(np.float64), ref, step=10**7, lr=2e-3)
    np.testing.assert_allclose(p, rp, rtol=2e-6, atol=1e-7)
    assert hs["mu_product"] == ref["mu_product"]
    # ASGD's host state is a function of the step alone (no read of the state it advances):
    # past the limit it is computed at once, bit-identical to the replay
    spec = fastopt.kernels.RULES["asgd"]
    hp = spec.validate({**spec.defaults, "t0": 3.0})
    assert not spec.reads_host_state(hp, 50)
    assert fastopt.kernels.RULES["nadam"].reads_host_state(
        fastopt.kernels.RULES["nadam"].defaults, 50
    )
    replayed = spec.replay_host_state(hp, 50)
    monkeypatch.setattr(rule_spec, "REPLAY_LIMIT", 10)
    assert spec.replay_host_state(hp, 50) == replayed  # at once, not replayed
    with pytest.raises(ValueError, match="more than 10"):  # the limit in force
        F.nadam(p.copy(), g, m.copy(), v.copy(), step=50, backend=backend)
    ax, pa = np.zeros(16, np.float32), keep[0].copy()
    F.asgd(pa, g, ax, step=10**7, t0=3.0, backend=backend)
    hs = spec.advance_host_state(hp, 10**7 - 1, spec.initial_host_state(hp))
    pr, axr = keep[0].astype(np.float64), np.zeros(16)
    st = {"ax": axr, **{n: np.array(x, np.float32) for n, x in hs.items()}}
    reference.asgd(pr, g.astype(np.float64), st, step=10**7, lr=1e-2, t0=3.0)
    np.testing.assert_allclose(pa, pr, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize(
    "scale",
    [0.0, 5e-324, -1.0, math.inf, math.nan, np.array(0.0, np.float32), "torch0"],
    ids=["zero", "subnormal", "negative", "inf", "nan", "numpy-zero", "torch-zero"],
)
def test_a_grad_scale_with_no_finite_reciprocal_is_refused(backend, scale):
    scale = torch.tensor(0.0) if isinstance(scale, str) else scale
    rng = np.random.default_rng(10)
    params, grads = _arrays(rng, SHAPES), _arrays(rng, SHAPES)
    opt = fastopt.Adam(backend=backend)
    opt.update(params, grads)
    _refused(
        opt,
        lambda: opt.update(params, grads, grad_scale=scale),
        [params, grads],
        ValueError,
        "grad_scale",
    )
    p = params["a"].copy()
    with pytest.raises(ValueError, match="grad_scale"):
        F.sgd(p, grads["a"], step=1, lr=0.1, grad_scale=scale, backend=backend)
    assert np.array_equal(p, params["a"])


# -- 3: ndarray subclasses ---------------------------------------------------------------------


class _Tagged(np.ndarray):
    """A subclass that indexes like its base: viewed as a plain array, stepped in place."""


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
@pytest.mark.parametrize("kind", ["matrix", "subclass"])
def test_ndarray_subclasses_are_stepped_as_plain_arrays(backend, kind):
    # np.matrix stays (1, n) under reshape(-1): the loop once ran over one element with g[0]
    rng = np.random.default_rng(11)
    p0 = rng.standard_normal((2, 3)).astype(np.float32)
    gs = [rng.standard_normal((2, 3)).astype(np.float32) for _ in range(3)]
    wrap = np.asmatrix if kind == "matrix" else (lambda a: a.copy().view(_Tagged))
    p, plain = wrap(p0.copy()), p0.copy()
    opt, twin = fastopt.Adam(backend=backend), fastopt.Adam(backend=backend)
    for g in gs:  # the param a subclass, the grads too from the second step on
        opt.update({"w": p}, {"w": g if g is gs[0] else wrap(g)})
        twin.update({"w": plain}, {"w": g})
    assert type(p) is not np.ndarray and np.array_equal(np.asarray(p), plain)
    ref = p0.astype(np.float64).reshape(-1)
    st = {"exp_avg": np.zeros(6), "exp_avg_sq": np.zeros(6)}
    for t, g in enumerate(gs, 1):
        reference.adam(ref, g.astype(np.float64).reshape(-1), st, step=t, lr=1e-3)
    np.testing.assert_allclose(np.asarray(p).reshape(-1), ref, rtol=1e-5, atol=1e-7)
    # the functional door and a FlatBuffer
    q, m, v = wrap(p0.copy()), np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32)
    F.adam(q, wrap(gs[0]), m, v, step=1, backend=backend)
    r, rm, rv = p0.copy(), np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32)
    F.adam(r, gs[0], rm, rv, step=1, backend=backend)
    assert np.array_equal(np.asarray(q), r) and np.array_equal(m, rm)
    buf = fastopt.FlatBuffer({"w": wrap(p0.copy())})
    assert buf.params["w"].shape == (2, 3) and np.array_equal(buf.params["w"], p0)


def test_memmap_params_write_their_file(backend, tmp_path):
    path = tmp_path / "w.f32"
    p = np.memmap(path, np.float32, "w+", shape=(6,))
    p[...] = 1.0
    opt = fastopt.SGD(lr=0.5, backend=backend)
    opt.update({"w": p}, {"w": np.full(6, 2.0, np.float32)})
    p.flush()
    assert np.array_equal(np.fromfile(path, np.float32), np.zeros(6, np.float32))


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_masked_arrays_are_refused_at_every_door(backend):
    rng = np.random.default_rng(12)
    params, grads = _arrays(rng, SHAPES), _arrays(rng, SHAPES)
    masked = np.ma.masked_array(params["w"], mask=params["w"] > 0)
    opt = fastopt.Adam(backend=backend)
    _refused(
        opt,
        lambda: opt.update({**params, "w": masked}, grads),
        [params, grads],
        TypeError,
        "MaskedArray",
    )
    assert opt.state == {}
    opt.update(params, grads)
    opt.update(params, grads)  # cached from here: a masked grad is refused there too
    mg = {**grads, "w": np.ma.masked_array(grads["w"], mask=grads["w"] > 0)}
    _refused(opt, lambda: opt.update(params, mg), [params, grads], TypeError, "MaskedArray")
    # a state buffer rebound to a subclass
    st = opt.state["w"]
    st["exp_avg"] = np.asmatrix(st["exp_avg"])
    _refused(opt, lambda: opt.update(params, grads), [params, grads], TypeError, "subclass")
    st["exp_avg"] = np.asarray(st["exp_avg"])
    assert opt.update(params, grads) is True
    m = np.zeros((8, 8), np.float32)
    with pytest.raises(TypeError, match="MaskedArray"):
        F.adam(masked, grads["w"], m, m.copy(), step=1, backend=backend)
    with pytest.raises(TypeError, match="MaskedArray"):
        fastopt.FlatBuffer({"w": masked})
    assert not m.any()
    # a FlatBuffer group's grad rebound to a subclass after cached steps
    buf = fastopt.FlatBuffer(params)
    opt = fastopt.Adam(backend=backend)
    for _ in range(2):
        buf.grad[...] = 0.5
        assert opt.step(buf) is True
    good, buf.groups[0].grad = buf.groups[0].grad, np.asmatrix(buf.grad)
    _refused(opt, lambda: opt.step(buf), [buf.params], TypeError, "subclass")
    buf.groups[0].grad = good
    assert opt.step(buf) is True and opt.step_count == 3


# -- 4: a master-weights optimizer over bfloat16 and float32 params ---------------------------


def test_master_weights_over_mixed_dtypes_round_trips(backend, tmp_path):
    from fastopt.checkpoint import load_checkpoint, save_checkpoint
    from fastopt.precision import bfloat16

    bf16 = bfloat16()
    rng = np.random.default_rng(13)
    p0 = {"h": rng.standard_normal(16).astype(bf16), "f": rng.standard_normal(16).astype("f4")}
    gs = [{n: rng.standard_normal(16).astype(a.dtype) for n, a in p0.items()} for _ in range(4)]

    def run(params, opt, grads):
        for g in grads:
            assert opt.update(params, g) is True

    params = {n: a.copy() for n, a in p0.items()}
    opt = fastopt.Adam(lr=1e-2, master_weights=True, backend=backend)
    run(params, opt, gs[:2])
    assert set(opt.state["h"]) == {"exp_avg", "exp_avg_sq", "master_param"}
    assert set(opt.state["f"]) == {"exp_avg", "exp_avg_sq"}
    sd = opt.state_dict()
    opt.load_state_dict(sd)  # its own state dict: once refused
    path = tmp_path / "mixed.fopt"
    save_checkpoint(path, opt, params)
    restored = {n: a.copy() for n, a in p0.items()}
    twin = fastopt.Adam(lr=1e-2, master_weights=True, backend=backend)
    load_checkpoint(path, twin, restored)
    fresh = fastopt.Adam(lr=1e-2, master_weights=True, backend=backend)
    fresh.load_state_dict(sd)
    again = {n: a.copy() for n, a in params.items()}
    for o, ps in ((opt, params), (twin, restored), (fresh, again)):
        run(ps, o, gs[2:])
    for o, ps in ((twin, restored), (fresh, again)):  # bit-exact continuations
        assert o.step_count == opt.step_count == 4
        for n in p0:
            assert np.array_equal(ps[n].view(np.uint8), params[n].view(np.uint8))
            for s, a in opt.state[n].items():
                assert np.array_equal(o.state[n][s], a), f"{s} of {n}"
