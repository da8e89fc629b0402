"""``fastopt.torch``: groups stepped in several launches keep their cached launches, and
``capturable=`` on the classes torch.optim has no counterpart of; proven on the CPU with the
fake GPU backend (``tests/support/fake_table.py``) and the numba CPU path.

- A param group whose parameters need several launches (float32 and bfloat16 parameters, two
  step counts) caches one ``Steady`` per launch (``_steady.SteadyParts``): its steady steps
  build no table, launch once per part, read no step count on the host (the device path) or
  re-use every address table (the CPU path), and equal the same parameters stepped one group
  per launch.
- ``capturable=True`` on Lion, AdaBelief, AdEMAMix and Adan (whose first step's form the device
  selects by its scalars, ``Rule.device_flags``) steps with the scalars on the device (no host
  read of the loss scale, found-inf flag or step counts in a steady step) and equals the CPU
  path.
"""

from __future__ import annotations

import contextlib

import pytest
from support.host_reads import no_host_reads

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from support import fake_table  # noqa: E402

import fastopt.torch as fot  # noqa: E402
from fastopt.torch._steady import Steady, SteadyParts  # noqa: E402


@pytest.fixture
def fake(monkeypatch):
    return fake_table.use_fake(monkeypatch)


def _grads(params, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


def _mixed():
    """Six parameters of one group: float32 and bfloat16, interleaved."""
    gen = torch.Generator().manual_seed(4)
    sizes = (7, 130, 1, 4099, 33, 300)
    return [
        torch.nn.Parameter(
            torch.randn(n, generator=gen).to(torch.bfloat16 if i % 2 else torch.float32)
        )
        for i, n in enumerate(sizes)
    ]


def _twin(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def _same(oa, ob, pa, pb):
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for k, v in ob.state[b].items():
            assert torch.equal(oa.state[a][k].cpu(), v.cpu()), k


@pytest.mark.parametrize("capturable", [False, True])
def test_mixed_group_steady_steps_on_the_device_path(fake, capturable):
    """One group of float32 and bfloat16 parameters, two of them first stepped alone (two step
    counts per dtype: four launches): from step 3 on no table is built, four launches per step,
    one scalar-kernel run per launch, no step count or loss-scale read on the host, and params,
    state and step counts equal the same parameters stepped in four groups of their own."""
    ps = _mixed()
    qs = _twin(ps)
    kw = dict(lr=1e-2, weight_decay=0.1, master_weights=True, capturable=capturable)
    ours = fot.AdamW(ps, **kw)
    # the reference: one group per launch (each caches a whole-group Steady)
    ref = fot.AdamW(
        [{"params": [qs[i] for i in idx]} for idx in ((0, 4), (2,), (1, 5), (3,))], **kw
    )
    scale = torch.tensor(64.0)
    for step in range(1, 7):
        gs = _grads(ps, step, 64.0)
        for i, (p, q, g) in enumerate(zip(ps, qs, gs)):
            # step 1: parameters 2 and 3 have no gradient (they lag one step behind)
            has = step > 1 or i not in (2, 3)
            p.grad, q.grad = (g.clone(), g.clone()) if has else (None, None)
        found = torch.tensor(1.0 if step == 5 else 0.0)
        fake.clear()
        watched = [scale, found]
        if step > 2:
            watched += [ours.state[p]["step"] for p in ps]
        with no_host_reads(watched) if step > 2 else contextlib.nullcontext():
            ours.step(grad_scale=scale, found_inf=found)
        if step > 2:
            assert isinstance(ours._steady[0], SteadyParts)
            assert len(fake.tables) == 0 and len(fake.launches) == 4, step
            assert fake.scalar_runs == 4
        launches = len(fake.launches)
        ref.step(grad_scale=scale, found_inf=found)
        assert len(fake.launches) - launches == launches  # the same launches, group by group
        _same(ours, ref, ps, qs)
    assert [int(ours.state[p]["step"]) for p in ps] == [5, 5, 4, 4, 5, 5]


def test_mixed_group_steady_steps_on_the_cpu_path():
    """The CPU path: a group of float32 and bfloat16 parameters keeps one cached launch per
    dtype (the address tables built once), and equals two groups of one dtype each."""
    ps = _mixed()
    qs = _twin(ps)
    ours = fot.Adam(ps, lr=1e-2, amsgrad=True)
    ref = fot.Adam([{"params": qs[0::2]}, {"params": qs[1::2]}], lr=1e-2, amsgrad=True)
    tables = None
    for step in range(1, 6):
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        cached = ours._steady[0]
        assert isinstance(cached, SteadyParts) and len(cached.parts) == 2
        if tables is None:
            tables = [part.table for part in cached.parts]
        else:  # the same cache, its tables re-used
            assert [part.table for part in cached.parts] == tables
        _same(ours, ref, ps, qs)
    # a parameter without a gradient: the parts no longer cover the group, the full path
    ps[3].grad = None
    qs[3].grad = None
    ours.step()
    ref.step()
    assert 0 not in ours._steady or ours._steady[0] is not cached
    _same(ours, ref, ps, qs)


def test_a_part_whose_tensor_moved_takes_the_full_path(fake):
    """A state tensor of one part replaced between steps: the full path rebuilds the tables
    of the group (the re-checks of every part ran first)."""
    ps = _mixed()
    opt = fot.Adam(ps, lr=1e-2)
    for step in range(1, 4):
        for p, g in zip(ps, _grads(ps, step)):
            p.grad = g
        if step == 3:
            opt.state[ps[1]]["exp_avg"] = opt.state[ps[1]]["exp_avg"].clone()
        fake.clear()
        opt.step()
        assert len(fake.tables) == (0 if step == 2 else 2), step
    assert isinstance(opt._steady[0], SteadyParts)
    assert all(isinstance(s, Steady) for s in opt._steady[0].parts)


NO_TORCH_PEER = [
    ("Lion", dict(lr=1e-3, weight_decay=0.1)),
    ("AdaBelief", dict(lr=1e-2, eps=1e-3, eps_root=1e-3)),
    ("AdEMAMix", dict(lr=1e-2, weight_decay=0.1)),
    # its first step's form is a variant of its own on the host; the device selects it
    ("Adan", dict(lr=1e-2, betas=(0.8, 0.7, 0.9), eps=1e-3, eps_root=1e-3, weight_decay=0.1)),
]


@pytest.mark.parametrize("name,kw", NO_TORCH_PEER, ids=[c[0] for c in NO_TORCH_PEER])
def test_capturable_without_a_torch_counterpart(fake, name, kw):
    """``capturable=True`` is a keyword (and a param-group key) of the classes torch.optim
    lacks: a steady step reads nothing on the host and its result equals the CPU path's
    (float32 rounding of the scalars made on the device: 1e-6)."""
    gen = torch.Generator().manual_seed(5)
    ps = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (3, 130, 4099)]
    qs = _twin(ps)
    ours = getattr(fot, name)(ps, capturable=True, **kw)
    assert ours.param_groups[0]["capturable"] is True
    ref = getattr(fot, name)(qs, **kw)
    ref._backend_module = fake_table.cpu_path
    scale = torch.tensor(32.0)
    for step in range(1, 6):
        found = torch.tensor(1.0 if step == 3 else 0.0)
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g * 32.0, g.clone()
        fake.clear()
        watched = [scale, found]
        if step > 1:
            watched += [t for p in ps for t in ours.state[p].values() if t.dim() == 0]
        with no_host_reads(watched) if step > 1 else contextlib.nullcontext():
            ours.step(grad_scale=scale, found_inf=found)
        if step != 3:
            ref.step()
        assert len(fake.launches) == 1 and len(fake.tables) == (1 if step == 1 else 0)
        assert fake.launches[0]["io"].kbuf
        for a, b in zip(ps, qs):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
            for k, v in ref.state[b].items():
                torch.testing.assert_close(
                    ours.state[a][k].float(), v.float(), rtol=1e-6, atol=1e-7
                )


def test_capturable_defaults_to_false_without_a_torch_counterpart():
    p = torch.nn.Parameter(torch.zeros(3))
    assert fot.Adan([p]).param_groups[0]["capturable"] is False
