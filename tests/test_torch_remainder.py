"""``fastopt.torch`` with ``master_weights="remainder"`` (``fastopt/torch/_master.py``): each
bfloat16 parameter's fp32 master kept as the parameter (the high half) and an int16
``master_remainder`` (the low half).

- On the CPU (one ``launch_many_io`` per bucket, then the cached steady launch; with quantized
  state one ``launch_many_quant``), over several steps: the master (parameter and remainder
  joined by the oracle's ``precision.join_master``) equals ``master_weights=True``'s fp32 master
  bit for bit, the state too, the parameters differ only where that master's low half is a tie;
  parameter, remainder and state equal the core's remainder step (the dict API) bit for bit.
  AdamW by default; SGD, Lion and AdamW with int8 state under -m exhaustive.
- The GPU path (the fake table backend of ``tests/support/fake_table.py``): one table launch
  whose master column is the int16 remainder (``IO.remainder``), the CPU path's bits.
- float16 parameters are refused at construction, in ``add_param_group`` and at the step
  (a parameter converted since), before anything is written.
- State dicts: the remainder under its name as int16, a bit-exact round trip; a
  ``master_weights=True`` state converted at the next step (split, the pair holding the saved
  master bit for bit) and the reverse (joined); a ``torch.optim`` state (no master) steps from
  a remainder of zeros with its state widened to float32; a malformed remainder refused at load.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from support import fake_table  # noqa: E402

import fastopt  # noqa: E402
import fastopt.torch as fot  # noqa: E402
from fastopt import precision  # noqa: E402

REM, MASTER = precision.MASTER_REMAINDER, precision.MASTER
SIZES = (1, 7, 300)


def _params(sizes=SIZES, seed=0, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]


def _clone(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def _grads(ps, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in ps]


def _bf16(t):
    return t.detach().cpu().view(torch.int16).numpy().copy().view(precision.bfloat16())


def _joined(p, rem):
    """The fp32 master of a bfloat16 parameter and its remainder, by the oracle's join."""
    return precision.join_master(_bf16(p), rem.detach().cpu().numpy())


def _bits(a):
    return np.asarray(a, dtype=np.float32).view(np.uint32)


def _same_as_true(pr, r, pt, t, state_keys):
    """Remainder optimizer ``r`` over ``pr`` against ``master_weights=True`` ``t`` over ``pt``:
    the joined master is True's master bit for bit, the state equal, and the parameters differ
    only at ties of True's master (low half 0x8000)."""
    for p, q in zip(pr, pt):
        sr, st = r.state[p], t.state[q]
        assert MASTER not in sr and sr[REM].dtype is torch.int16
        m = st[MASTER].numpy()
        assert np.array_equal(_bits(_joined(p, sr[REM])), _bits(m))
        for k in state_keys:
            assert torch.equal(sr[k], st[k]), k
        differ = (p.detach() != q.detach()).numpy()
        assert ((_bits(m)[differ] & 0xFFFF) == 0x8000).all()


#: each case compiles its loops for both master forms and the core's: one by default
EXHAUSTIVE = pytest.mark.exhaustive
CASES = [
    # (class, hyperparameters, state keys); the int8 case runs the quantized many-tensor loop
    ("AdamW", dict(lr=1e-2, weight_decay=0.1), ("exp_avg", "exp_avg_sq", "step")),
    pytest.param(
        "SGD", dict(lr=0.1, momentum=0.9, nesterov=True), ("momentum_buffer",), marks=EXHAUSTIVE
    ),
    pytest.param("Lion", dict(lr=1e-3, weight_decay=0.1), ("exp_avg",), marks=EXHAUSTIVE),
    pytest.param(
        "AdamW",
        dict(lr=1e-2, state_dtype="int8"),
        ("exp_avg.codes", "exp_avg.absmax", "exp_avg_sq.codes", "exp_avg_sq.absmax", "step"),
        marks=EXHAUSTIVE,
    ),
]


@pytest.mark.parametrize(("name", "kw", "keys"), CASES, ids=["AdamW", "SGD", "Lion", "AdamW-int8"])
def test_master_is_the_fp32_masters_and_the_cores_bit_for_bit(name, kw, keys):
    """Four steps (the first full, the rest cached) with a float32 parameter in the group (no
    master): the joined master is ``master_weights=True``'s bit for bit, parameter, remainder
    and state the core dict API's remainder step."""
    pr = _params() + _params((5,), seed=3, dtype=torch.float32)
    pt, pc = _clone(pr), _clone(pr)
    cls = getattr(fot, name)
    r = cls(pr, master_weights="remainder", **kw)
    t = cls(pt, master_weights=True, **kw)
    core = getattr(fastopt, name)(master_weights="remainder", backend="numba", **kw)
    arrays = {str(i): _bf16(p) if p.dtype is torch.bfloat16 else p.detach().numpy().copy()
              for i, p in enumerate(pc)}  # fmt: skip
    for step in range(1, 5):
        gs = _grads(pr, step)
        for p, q, g in zip(pr, pt, gs):
            p.grad, q.grad = g.clone(), g.clone()
        r.step()
        t.step()
        core.update(arrays, {str(i): _bf16(g) if g.dtype is torch.bfloat16 else g.numpy()
                             for i, g in enumerate(gs)})  # fmt: skip
    _same_as_true(pr[:-1], r, pt[:-1], t, keys)
    assert REM not in r.state[pr[-1]]  # a float32 parameter is its own master
    for i, p in enumerate(pr):
        got = _bf16(p) if p.dtype is torch.bfloat16 else p.detach().numpy()
        assert np.array_equal(got.view(np.uint8), arrays[str(i)].view(np.uint8)), i
        for k in (*keys, REM) if p.dtype is torch.bfloat16 else keys:
            if k == "step":
                continue
            want = np.asarray(core.state[str(i)][k])
            assert np.array_equal(r.state[p][k].numpy().view(np.uint8), want.view(np.uint8)), k


@pytest.mark.parametrize("capturable", [False, True])
def test_device_path_launches_the_int16_remainder_as_the_master_column(monkeypatch, capturable):
    """The table path (the fake GPU backend): one launch whose storage format keeps the master
    as a remainder and whose table's master column is the int16 tensor; params, remainders and
    state equal the CPU path's over four steps."""
    fake = fake_table.use_fake(monkeypatch)
    pa = _params(seed=4)
    pb = _clone(pa)
    ours = fot.AdamW(pa, lr=1e-2, weight_decay=0.1, master_weights="remainder",
                     capturable=capturable)  # fmt: skip
    ref = fot.AdamW(pb, lr=1e-2, weight_decay=0.1, master_weights="remainder")
    ref._backend_module = fake_table.cpu_path
    for step in range(1, 5):
        for p, q, g in zip(pa, pb, _grads(pa, step)):
            p.grad, q.grad = g.clone(), g.clone()
        fake.clear()
        ours.step()
        ref.step()
        assert len(fake.launches) == 1
        io = fake.launches[0]["io"]
        assert io.master and io.remainder and io.kind("master") == "int16"
        rows = fake.launches[0]["table"].rows
        assert rows[:, -1].tolist() == [ours.state[p][REM].data_ptr() for p in pa]
        for p, q in zip(pa, pb):
            assert torch.equal(p, q)
            for k in (REM, "exp_avg", "exp_avg_sq"):
                assert torch.equal(ours.state[p][k], ref.state[q][k]), k


def test_float16_parameters_are_refused_before_anything_is_written():
    half = _params((3,), dtype=torch.float16)
    with pytest.raises(ValueError, match="float16"):
        fot.Adam(half, master_weights="remainder")
    ps = _params((4,))
    opt = fot.Adam(ps, master_weights="remainder")
    with pytest.raises(ValueError, match="float16"):
        opt.add_param_group({"params": (p for p in half)})
    assert len(opt.param_groups) == 1
    # a parameter converted to float16 after construction: refused at the step, nothing written
    late = _params((6,), seed=2)
    opt.add_param_group({"params": late})
    late[0].data = late[0].data.to(torch.float16)
    before = [p.detach().clone() for p in ps + late]
    for p in ps + late:
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="float16"):
        opt.step()
    assert not opt.state and all(torch.equal(p, b) for p, b in zip(ps + late, before))
    with pytest.raises(TypeError, match="'remainder'"):
        fot.Adam(ps, master_weights="fp32")


def _run(opt, ps, steps, seed0=0):
    for s in range(steps):
        for p, g in zip(ps, _grads(ps, seed0 + s)):
            p.grad = g
        opt.step()


def test_state_dicts_round_trip_and_convert_between_the_forms():
    kw = dict(lr=1e-2, weight_decay=0.1)
    pr, pt = _params(seed=5), _params(seed=5)
    r = fot.AdamW(pr, master_weights="remainder", **kw)
    t = fot.AdamW(pt, master_weights=True, **kw)
    _run(r, pr, 3)
    _run(t, pt, 3)
    # ties in True's master (low half 0x8000 above an even bfloat16): its parameter rounds
    # them down, the split's up; the conversion must write the split's into the parameter
    tie = torch.tensor([0x3F808000, 0x40828000, -0x403E8000], dtype=torch.int32)
    with torch.no_grad():
        t.state[pt[2]][MASTER][:3] = tie.view(torch.float32)
        pt[2][:3] = tie.view(torch.float32).to(torch.bfloat16)
    sd_r, sd_t = copy.deepcopy(r.state_dict()), copy.deepcopy(t.state_dict())
    assert all(sd_r["state"][i][REM].dtype is torch.int16 for i in range(len(pr)))
    # the same form: bit for bit (torch's load would cast the int16 to the param's dtype)
    p2 = _clone(pr)
    r2 = fot.AdamW(p2, master_weights="remainder", **kw)
    r2.load_state_dict(copy.deepcopy(sd_r))
    for i, p in enumerate(p2):
        for k, v in sd_r["state"][i].items():
            assert r2.state[p][k].dtype is v.dtype and torch.equal(r2.state[p][k], v), k
    # an fp32 master into a remainder optimizer, and a remainder into an fp32-master one:
    # converted at the next step, which then equals the unconverted optimizers' step
    p3, p4 = _clone(pt), _clone(pr)
    r3 = fot.AdamW(p3, master_weights="remainder", **kw)
    r3.load_state_dict(copy.deepcopy(sd_t))
    t4 = fot.AdamW(p4, master_weights=True, **kw)
    t4.load_state_dict(copy.deepcopy(sd_r))
    assert MASTER in r3.state[p3[0]] and REM in t4.state[p4[0]]  # until the step
    for opt, ps in ((r, pr), (t, pt), (r2, p2), (r3, p3), (t4, p4)):
        _run(opt, ps, 2, seed0=10)
    _same_as_true(p3, r3, pt, t, ("exp_avg", "exp_avg_sq", "step"))
    _same_as_true(pr, r, p4, t4, ("exp_avg", "exp_avg_sq", "step"))
    for p, q in zip(p2, pr):
        assert torch.equal(p, q) and torch.equal(r2.state[p][REM], r.state[q][REM])


def test_a_torch_optim_state_steps_from_a_remainder_of_zeros():
    """torch.optim's state (bfloat16, no master) into a remainder optimizer: widened to float32
    at load, a remainder of zeros at the step; the step equals an fp32-master optimizer's from
    the same state with the parameter as its master. A malformed remainder is refused at load,
    nothing changed."""
    ps = _params(seed=7)
    tor = torch.optim.AdamW(ps, lr=1e-2)
    _run(tor, ps, 2)
    sd = tor.state_dict()
    pr, pt = _clone(ps), _clone(ps)
    r = fot.AdamW(pr, lr=1e-2, master_weights="remainder")
    r.load_state_dict(copy.deepcopy(sd))
    assert r.state[pr[1]]["exp_avg"].dtype is torch.float32
    assert torch.equal(r.state[pr[1]]["exp_avg"], sd["state"][1]["exp_avg"].float())
    with_master = copy.deepcopy(sd)
    for i, p in enumerate(pt):
        with_master["state"][i][MASTER] = p.detach().float()
    t = fot.AdamW(pt, lr=1e-2, master_weights=True)
    t.load_state_dict(with_master)
    _run(r, pr, 2, seed0=5)
    _run(t, pt, 2, seed0=5)
    _same_as_true(pr, r, pt, t, ("exp_avg", "exp_avg_sq", "step"))
    before = copy.deepcopy(r.state_dict())
    for bad, match in (
        ({REM: torch.zeros(7, dtype=torch.int32)}, "int16"),
        ({REM: torch.zeros(7, dtype=torch.int16), MASTER: torch.zeros(7)}, "both"),
    ):
        broken = copy.deepcopy(before)
        broken["state"][1].update(bad)
        with pytest.raises(ValueError, match=match):
            r.load_state_dict(broken)
        after = r.state_dict()
        for i in before["state"]:
            for k, v in before["state"][i].items():
                assert torch.equal(after["state"][i][k], v)
    f32 = _params((7,), dtype=torch.float32)
    opt = fot.AdamW(f32, lr=1e-2)
    with pytest.raises(ValueError, match="bfloat16"):
        opt.load_state_dict(
            {"state": {0: {"step": torch.tensor(1.0), "exp_avg": torch.zeros(7),
                           "exp_avg_sq": torch.zeros(7), REM: torch.zeros(7, dtype=torch.int16)}},
             "param_groups": copy.deepcopy(opt.state_dict()["param_groups"])}
        )  # fmt: skip


def test_a_dtensor_parameter_keeps_a_dtensor_remainder():
    """One process, a one-rank mesh: the remainder is a DTensor like its parameter, the steps
    equal the plain tensors' bit for bit, and an fp32-master DTensor state converts at the
    next step as a plain one does."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))

        def shard(ps):
            return [
                torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)]))
                for p in ps
            ]

        kw = dict(lr=1e-2, weight_decay=0.1)
        plain, pt = _params(seed=9), _params(seed=9)
        sr, st = shard(plain), shard(pt)
        oa = fot.AdamW(plain, master_weights="remainder", **kw)
        ob = fot.AdamW(sr, master_weights="remainder", **kw)
        ot = fot.AdamW(st, master_weights=True, **kw)
        for t in range(3):
            for p, q, s, g in zip(plain, sr, st, _grads(plain, t)):
                p.grad = g
                q.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
                s.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
            oa.step()
            ob.step()
            if t == 1:  # the fp32-master DTensor state into a remainder optimizer
                sd = copy.deepcopy(ot.state_dict())
                ot = fot.AdamW(st, master_weights="remainder", **kw)
                ot.load_state_dict(sd)
            ot.step()
        for p, q, s in zip(plain, sr, st):
            for x in (q, s):
                assert torch.equal(x.full_tensor(), p)
            for o, x in ((ob, q), (ot, s)):
                rem = o.state[x][REM]
                assert isinstance(rem, DTensor) and rem.placements == x.placements
                assert torch.equal(rem.full_tensor(), oa.state[p][REM])
                assert MASTER not in o.state[x]
    finally:
        dist.destroy_process_group()
