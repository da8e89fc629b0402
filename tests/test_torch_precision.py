"""``fastopt.torch``'s storage formats beyond the parameter's dtype: ``state_dtype=``,
``stochastic_rounding=`` and ``seed=``, as the core classes take them.

- On the CPU (one ``numba_backend.launch_many_io`` over the group's tensors) each step is held
  to the oracle (``fastopt.precision.oracle_step``, the semantics of every storage format) run
  on the same params and state the step started from: params and state, several steps, float32,
  bfloat16 and float16 params, state in float32 and bfloat16, stochastic rounding of bfloat16
  params with the hash index counted from each tensor's start and salt 0 (two equal tensors of
  one launch round alike; the oracle rounds each tensor on its own).
- The GPU path (the fake backend of ``tests/support/fake_table.py``, capturable or not) gives
  the CPU path's bits: the same storage format in one table launch, the step key from the seed
  (on the device, the scalar kernel's ``keyp``).
- State dicts carry the state in its storage dtype; a state dict loads into any storage
  policy by one conversion from the saved values (``_compat.state_keeps``).
- Settings the core refuses are refused (quantized state: ``tests/test_torch_quant.py``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from fastopt.kernels import RULES, storage  # noqa: E402
from support import fake_table  # noqa: E402

import fastopt.torch as fot  # noqa: E402
from fastopt import precision  # noqa: E402

SIZES = (1, 7, 130, 4099)
#: one unit in the last place of each storage dtype, relative
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _np(t):
    """A NumPy copy of ``t`` in its storage dtype (bfloat16 through ml_dtypes)."""
    t = t.detach().cpu()
    if t.dtype is torch.bfloat16:
        return t.view(torch.int16).numpy().copy().view(precision.bfloat16())
    return t.numpy().copy()


def _torch(a):
    if a.dtype == precision.bfloat16():
        return torch.from_numpy(a.view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _params(dtype, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]


def _grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in params]


def _within(got, want, dtype, what):
    """``got`` equals ``want`` within one unit in the last place of ``dtype`` (the rule's
    float32 statements fuse what the oracle rounds twice: a last-bit difference before the
    store, or a few float32 units where a result cancels, 2e-7 on unit-scale inputs), and a
    16-bit result exactly for most elements."""
    g, w = got.double().reshape(-1), want.double().reshape(-1)
    tol = ULP[dtype] * w.abs() * 1.01 + 2e-7
    bad = (g - w).abs() > tol
    assert not bad.any(), (what, g[bad][:5].tolist(), w[bad][:5].tolist())
    if g.numel() >= 100 and dtype is not torch.float32:
        assert (g == w).double().mean() >= 0.9, (what, (g == w).double().mean())


CASES = [
    # (class, param dtype, state_dtype, stochastic_rounding, hyperparameters)
    ("Adam", torch.float32, "bfloat16", False, dict(lr=1e-2, weight_decay=0.1)),
    ("AdamW", torch.bfloat16, "float32", True, dict(lr=1e-2, weight_decay=0.1)),
    ("Adam", torch.bfloat16, None, True, dict(lr=1e-2, amsgrad=True)),
    ("Lion", torch.float16, "float32", False, dict(lr=1e-3, weight_decay=0.1)),
    ("SGD", torch.bfloat16, "bfloat16", True, dict(lr=1e-1, momentum=0.9, nesterov=True)),
]


@pytest.mark.parametrize(("name", "dtype", "state_dtype", "sr", "kw"), CASES)
def test_cpu_steps_equal_the_oracle(name, dtype, state_dtype, sr, kw):
    """Each of five steps of the CPU path equals ``oracle_step`` run from the same params and
    state (salt 0, key ``step_key(seed, t)``); the state is kept in ``state_dtype`` (the param
    dtype when None); stochastic rounding rounds differently from nearest."""
    ps = _params(dtype)
    opt = getattr(fot, name)(ps, state_dtype=state_dtype, stochastic_rounding=sr, seed=7, **kw)
    spec = RULES[type(opt)._fastopt._rule]
    hp = type(opt)._rule_hp(opt.param_groups[0])
    pk = precision.known_kind(_np(ps[0]).dtype)
    sk = state_dtype or pk
    io = precision.io_of(pk, pk, sk, sr=sr)
    assert io.sr == (sr and dtype is torch.bfloat16)
    differs = 0
    for t in range(1, 6):
        before = []
        for p, g in zip(ps, _grads(ps, t)):
            p.grad = g
            st = opt.state.get(p, {})
            before.append((_np(p), {n: _np(st[n]) for n in spec.state if n in st}))
        opt.step()
        flags, _ = spec.variant_and_scalars(hp, t, None)
        used = dict(zip(spec.state, spec.slots_used(flags)))
        for i, (p, (pa, sa)) in enumerate(zip(ps, before)):
            for n, u in used.items():  # a slot made on this step starts as the spec says
                if u and n not in sa:
                    fill = spec.initial(n, hp)
                    sa[n] = np.full(pa.shape, fill, dtype=precision.storage_dtype(sk))
            ga = _np(p.grad)
            key = storage.step_key(7, t)
            precision.oracle_step(spec.name, pa, ga, sa, io=io, step=t, hp=hp, salt=0, key=key)
            _within(p.detach(), _torch(pa), dtype, (name, t, i, "param"))
            for n, a in sa.items():
                got = opt.state[p][n]
                assert got.dtype is getattr(torch, sk), (n, got.dtype)
                _within(got, _torch(a), getattr(torch, sk), (name, t, i, n))
            if io.sr:
                nearest = precision.io_of(pk, pk, sk)
                pn = before[i][0].copy()
                sn = {n: a.copy() for n, a in before[i][1].items()}
                precision.oracle_step(spec.name, pn, ga, sn, io=nearest, step=t, hp=hp)
                differs += int((pn != pa).sum())
    if io.sr:
        assert differs > 0  # stochastic rounding is not round-to-nearest


def test_stochastic_rounding_index_counts_from_each_tensor_start():
    """Two equal tensors in one launch (after a longer one) round alike: the hash index is
    the element's index in its own tensor (salt 0 for every tensor), as on the GPU path; the
    seed changes the bits."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(300, generator=gen).bfloat16()
    grad = torch.randn(300, generator=gen).bfloat16()

    def run(seed):
        ps = [torch.nn.Parameter(torch.randn(1000).bfloat16())] + [
            torch.nn.Parameter(base.clone()) for _ in range(2)
        ]
        opt = fot.SGD(ps, lr=0.37, stochastic_rounding=True, seed=seed)
        for p in ps:
            p.grad = torch.ones_like(p) if p.numel() == 1000 else grad.clone()
        opt.step()
        return ps

    a, b = run(5), run(6)
    assert torch.equal(a[1], a[2])
    assert not torch.equal(a[1], b[1])


@pytest.fixture
def fake(monkeypatch):
    return fake_table.use_fake(monkeypatch)


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize(
    ("dtype", "state_dtype", "sr"),
    [(torch.bfloat16, "float32", True), (torch.float32, "bfloat16", False)],
    ids=["bf16-sr-fp32state", "fp32-bf16state"],
)
def test_device_path_equals_the_cpu_path(fake, dtype, state_dtype, sr, capturable):
    """The table path (the fake GPU backend) launches the group once in its storage format
    (state dtype, stochastic rounding) and, capturable or not, gives the CPU path's params and
    state bit for bit over five steps (the key from the seed: on the device from the scalar
    kernel); steady steps build no table."""
    ps = _params(dtype, seed=1)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype=state_dtype, stochastic_rounding=sr, seed=9)
    ours = fot.AdamW(ps, capturable=capturable, **kw)
    ref = fot.AdamW(qs, **kw)
    ref._backend_module = fake_table.cpu_path
    for t in range(1, 6):
        for p, q, g in zip(ps, qs, _grads(ps, t)):
            p.grad, q.grad = g.clone(), g.clone()
        fake.clear()
        ours.step()
        ref.step()
        assert len(fake.launches) == 1 and len(fake.tables) == (1 if t == 1 else 0)
        io = fake.launches[0]["io"]
        # AdamW's scalars are the device's, capturable or not (its variant is the step's)
        assert (io.state, io.sr, io.kbuf) == (state_dtype, sr, True)
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)
            for n in ("exp_avg", "exp_avg_sq"):
                assert ours.state[p][n].dtype is getattr(torch, state_dtype)
                assert torch.equal(ours.state[p][n], ref.state[q][n])


def test_state_dict_in_storage_dtype_and_loads_across_policies():
    """``state_dict`` carries the state in its storage dtype; it loads into the same policy
    unchanged (torch's load would cast it to the param dtype), into torch.optim and the plain
    policy widened exactly, and torch.optim's float32 state loads into ``state_dtype=
    "bfloat16"`` rounded to nearest even once; stepping on from it equals stepping on from the
    original."""
    ps = _params(torch.float32, seed=2)
    opt = fot.Adam(ps, lr=1e-2, state_dtype="bfloat16")
    for t in range(1, 4):
        for p, g in zip(ps, _grads(ps, t)):
            p.grad = g
        opt.step()
    sd = opt.state_dict()
    assert all(sd["state"][i]["exp_avg"].dtype is torch.bfloat16 for i in range(len(ps)))
    # the same policy: the saved bfloat16 values, not a float32 cast of them
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    same = fot.Adam(qs, lr=1e-2, state_dtype="bfloat16")
    same.load_state_dict(copy.deepcopy(sd))
    for i, q in enumerate(qs):
        for n in ("exp_avg", "exp_avg_sq"):
            assert same.state[q][n].dtype is torch.bfloat16
            assert torch.equal(same.state[q][n], sd["state"][i][n])
    for p, q, g in zip(ps, qs, _grads(ps, 9)):
        p.grad, q.grad = g.clone(), g.clone()
    opt.step()
    same.step()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["exp_avg_sq"], same.state[q]["exp_avg_sq"])
    # into torch.optim and into the plain policy: widened exactly
    sd = opt.state_dict()
    for other in (torch.optim.Adam(qs, lr=1e-2), fot.Adam(qs, lr=1e-2)):
        other.load_state_dict(copy.deepcopy(sd))
        for i, q in enumerate(qs):
            assert other.state[q]["exp_avg"].dtype is torch.float32
            assert torch.equal(other.state[q]["exp_avg"], sd["state"][i]["exp_avg"].float())
    # torch.optim's float32 state into bfloat16 state: rounded once
    tsd = torch.optim.Adam(qs, lr=1e-2)
    for q, g in zip(qs, _grads(qs, 11)):
        q.grad = g
    tsd.step()
    tsd = tsd.state_dict()
    low = fot.Adam(qs, lr=1e-2, state_dtype="bfloat16")
    low.load_state_dict(copy.deepcopy(tsd))
    for i, q in enumerate(qs):
        want = tsd["state"][i]["exp_avg_sq"].to(torch.bfloat16)
        assert torch.equal(low.state[q]["exp_avg_sq"], want)
    low.step()  # steps from the converted state
    assert low.state[qs[0]]["exp_avg"].dtype is torch.bfloat16


def test_precision_settings_travel_with_pickles():
    ps = _params(torch.bfloat16, (5,))
    opt = fot.Adam(ps, state_dtype="float32", stochastic_rounding=True, seed=11)
    twin = copy.deepcopy(opt)
    assert (twin.state_dtype, twin.stochastic_rounding, twin.seed) == ("float32", True, 11)


def test_settings_are_checked_as_the_core_checks_them():
    ps = _params(torch.float32, (3,))
    with pytest.raises(ValueError, match="state_dtype='float16'"):
        fot.Adam(ps, state_dtype="float16")  # refused by the core's check
    with pytest.raises(ValueError, match="choose one"):
        fot.Adam(ps, master_weights=True, stochastic_rounding=True)
    with pytest.raises(TypeError, match="seed"):
        fot.Adam(ps, seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        fot.Adam(ps, seed=-1)
    with pytest.raises(TypeError, match="stochastic_rounding"):
        fot.Adam(ps, stochastic_rounding="yes")


def test_bfloat16_state_of_float64_params_is_refused_before_anything_is_written():
    ps = _params(torch.float64, (4, 9))
    before = [p.detach().clone() for p in ps]
    opt = fot.Adam(ps, state_dtype="bfloat16")
    for p, g in zip(ps, _grads(ps, 1)):
        p.grad = g
    with pytest.raises(TypeError, match="parameter 0 of param group 0.*float64"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)) and not opt.state


def test_sgd_rounding_key_follows_the_steps_on_both_paths(fake):
    """SGD keeps no step count in torch's state: its rounding key hashes the steps the
    optimizer took for the group, so each step draws new bits; the device path (its scalar
    kernel's key) and the CPU path agree bit for bit, a steady step included."""
    ps = _params(torch.bfloat16, (3, 130, 4099), seed=6)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=0.3, momentum=0.9, stochastic_rounding=True, seed=2)
    ours, ref = fot.SGD(ps, **kw), fot.SGD(qs, **kw)
    ref._backend_module = fake_table.cpu_path
    keys = []
    for t in range(1, 5):
        for p, q, g in zip(ps, qs, _grads(ps, t)):
            p.grad, q.grad = g.clone(), g.clone()
        fake.clear()
        ours.step()
        ref.step()
        assert len(fake.launches) == 1 and fake.launches[0]["io"].sr
        keys.append(ref._key_step(0))
        for p, q in zip(ps, qs):
            assert torch.equal(p, q)
            assert torch.equal(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    assert keys == [2, 3, 4, 5]
