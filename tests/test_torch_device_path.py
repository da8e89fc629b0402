"""``fastopt.torch``'s GPU path and its step protocol, proven on the CPU.

- A fake GPU backend (``tests/support/fake_table.py``: real tables, the work done by the CPU
  many-tensor loop, every call recorded) stands in for CuPy/numba-cuda: one table launch per
  (param group, storage plan, variant), the table built once and re-used by the steady step
  behind its re-checks, the gradient column following the gradients, a capturable step whose
  scalars, step counts, loss scale, found-inf flag and tensor lr never reach the host (any
  ``.item()``/``float()``/``bool()`` of them raises), against ``torch.optim``'s fused Adam.
- ``max_grad_norm=`` on the CPU path against torch's ``GradScaler.unscale_`` +
  ``clip_grad_norm_`` + step over several steps, optimizers and dtypes; on the fake GPU path
  against the CPU path.
- ``capturable=True`` on CPU parameters behaves as torch's fused capturable step on the CPU.
"""

from __future__ import annotations

import contextlib

import pytest
from support.host_reads import no_host_reads

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.torch

from support import fake_table  # noqa: E402

import fastopt.torch as fot  # noqa: E402

SIZES = (0, 1, 7, 130, 4099)


@pytest.fixture
def fake(monkeypatch):
    """Every device steps through the fake GPU backend."""
    return fake_table.use_fake(monkeypatch)


def _params(dtype, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in sizes]


def _grads(params, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


def _close(a, b, rtol, atol, what):
    torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=atol, msg=what)


def _same_state(ours, ref, pa, pb, rtol, atol):
    for i, (a, b) in enumerate(zip(pa, pb)):
        _close(a.detach(), b.detach(), rtol, atol, f"param {i}")
        sa, sb = ours.state[a], ref.state[b]
        assert set(sb) <= set(sa), (sorted(sa), sorted(sb))
        for k in sb:
            _close(sa[k].reshape(-1), sb[k].reshape(-1).to(sa[k].device), rtol, atol, f"{i} {k}")


# -- one launch per group and plan, cached -------------------------------------------------------
def test_one_table_launch_per_group_and_plan_reused_by_the_steady_step(fake):
    """Three groups (float32, float64, bfloat16 with fp32 masters): one table and one launch
    each on step 1; later steps build no table and launch once per group; gradients replaced
    by new tensors move only the table's grad column; a state tensor replaced takes its group
    through the full checks (a new table). Params and state equal the CPU path's."""
    groups = [
        _params(torch.float32),
        _params(torch.float64, seed=1),
        _params(torch.bfloat16, seed=2),
    ]
    twins = [[torch.nn.Parameter(p.detach().clone()) for p in g] for g in groups]
    kw = dict(lr=1e-2, weight_decay=0.1, master_weights=True)
    ours = fot.AdamW([{"params": g} for g in groups], **kw)
    ref = fot.AdamW([{"params": g} for g in twins], **kw)
    ref._backend_module = fake_table.cpu_path  # the reference: the real CPU path
    flat_ours = [p for g in groups for p in g]
    flat_ref = [p for g in twins for p in g]
    for step in range(1, 6):
        gs = _grads(flat_ours, step)
        for p, q, g in zip(flat_ours, flat_ref, gs):
            if step >= 4 or p.grad is None:  # new gradient tensors: new addresses
                p.grad, q.grad = g.clone(), g.clone()
            else:  # written in place: the same addresses
                p.grad.copy_(g)
                q.grad.copy_(g)
        fake.clear()
        ours.step()
        ref.step()
        assert len(fake.launches) == 3, step
        assert len(fake.tables) == (3 if step == 1 else 0), step
        for launch, g in zip(fake.launches, groups):
            assert launch["grads"].tolist() == [p.grad.data_ptr() for p in g]
            assert launch["io"].master == (g[0].dtype is torch.bfloat16)
        _same_state(ours, ref, flat_ours, flat_ref, 1e-6, 1e-7)
    # a state tensor replaced: that group is checked in full and gets a new table
    p = groups[1][2]
    ours.state[p]["exp_avg"] = ours.state[p]["exp_avg"].clone()
    q = twins[1][2]
    ref.state[q]["exp_avg"] = ref.state[q]["exp_avg"].clone()
    fake.clear()
    ours.step()
    ref.step()
    assert len(fake.tables) == 1
    assert fake.tables[0].rows[2, 3] == ours.state[p]["exp_avg"].data_ptr()
    _same_state(ours, ref, flat_ours, flat_ref, 1e-6, 1e-7)


def test_grad_scaler_on_the_table_path_of_a_rule_the_device_cannot_plan(fake):
    """ASGD (its variant depends on the host state: no device scalars) on the table path takes
    GradScaler's scale as a host factor and skips a found-inf step on the host (its step
    counts are host tensors): the same params, state and step counts as the CPU path given
    the same inputs, bit for bit."""
    ps = _params(torch.bfloat16, (3, 130, 4099))
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = fot.ASGD(ps, lr=1e-2, t0=0.0, master_weights=True)
    ref = fot.ASGD(qs, lr=1e-2, t0=0.0, master_weights=True)
    ref._backend_module = fake_table.cpu_path
    for step in range(1, 6):
        found = torch.tensor(1.0 if step == 2 else 0.0)
        for p, q, g in zip(ps, qs, _grads(ps, step, 256.0)):
            p.grad, q.grad = g.clone(), g.clone()
        fake.clear()
        ours.step(grad_scale=torch.tensor(256.0), found_inf=found)
        ref.step(grad_scale=torch.tensor(256.0), found_inf=found)
        assert len(fake.launches) == (0 if step == 2 else 1)
        if fake.launches:
            assert fake.launches[0]["io"].scale == "host" and not fake.launches[0]["io"].kbuf
        _same_state(ours, ref, ps, qs, 0, 0)
    assert all(ours.state[p]["step"].item() == 4 for p in ps)


# -- capturable: nothing read on the host --------------------------------------------------------
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_device_step_reads_nothing_on_the_host_and_matches_torch_fused(fake, amsgrad, capturable):
    """An AdamW on the device (capturable or not: its step counts live on the device as in
    torch's fused step) with a tensor lr under StepLR, stepped with GradScaler's
    ``grad_scale``/``found_inf`` (one step with found-inf set): after the first step (which
    reads the step counts and lr once) no step reads the loss scale, the flag, the lr or a step
    count on the host; one scalar-kernel run, one launch and no table per step; params, state
    and step counts equal torch's fused capturable AdamW given the same inputs."""
    ps = _params(torch.float32, (3, 130, 4099))
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(weight_decay=0.1, amsgrad=amsgrad)
    ours = fot.AdamW(ps, lr=torch.tensor(0.01), capturable=capturable, **kw)
    ref = torch.optim.AdamW(qs, lr=torch.tensor(0.01), fused=True, capturable=capturable, **kw)
    sched = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ours, ref)]
    scale = torch.tensor(1024.0)
    for step in range(1, 8):
        found = torch.tensor(1.0 if step == 4 else 0.0)
        for p, q, g in zip(ps, qs, _grads(ps, step, 1024.0)):
            p.grad, q.grad = g.clone(), g.clone()
        ref.grad_scale, ref.found_inf = scale, found
        ref.step()
        del ref.grad_scale, ref.found_inf
        fake.clear()
        watched = [scale, found, ours.param_groups[0]["lr"]]
        if step > 1:
            watched += [ours.state[p]["step"] for p in ps]
        with no_host_reads(watched) if step > 1 else contextlib.nullcontext():
            ours.step(grad_scale=scale, found_inf=found)
        assert len(fake.launches) == 1 and fake.scalar_runs == 1
        assert len(fake.tables) == (1 if step == 1 else 0)
        assert {"found_inf", "kbuf", "keyp", "scale"} <= set(fake.launches[0]["extras"])
        for s in sched:
            s.step()
        _same_state(ours, ref, ps, qs, 2e-6, 1e-7)
    assert all(ours.state[p]["step"].item() == 6 for p in ps)


def test_device_state_written_between_steps_takes_the_full_path(fake):
    """On the device path the step counts are never read by a steady step: one written
    between steps (``fill_``: its version counter moved), or a new gradient tensor, or a state
    tensor replaced, is seen by the re-checks, and the full path rebuilds the table and the
    device scalars from the counts now held: the result equals torch's fused AdamW given the
    same writes."""
    ps = _params(torch.float32, (3, 130, 4099))
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = fot.AdamW(ps, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, fused=True)
    for step in range(1, 7):
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.clone(), g.clone()
        if step == 4:  # both optimizers' counts rewound to 1
            for opt, params in ((ours, ps), (ref, qs)):
                for p in params:
                    opt.state[p]["step"].fill_(1.0)
        fake.clear()
        ours.step()
        ref.step()
        assert len(fake.tables) == (1 if step in (1, 4) else 0), step
        assert fake.scalar_runs == 1
        _same_state(ours, ref, ps, qs, 2e-6, 1e-7)
    assert all(ours.state[p]["step"].item() == 4 for p in ps)  # 1, then steps 4, 5, 6


CAPTURABLE = [
    ("NAdam", dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
    ("RMSprop", dict(lr=1e-3, centered=True, momentum=0.5)),
    ("Adamax", dict(lr=1e-2)),
    ("Adadelta", dict(lr=0.5)),
    ("Rprop", dict(lr=1e-2)),
]


@pytest.mark.parametrize("name,kw", CAPTURABLE, ids=[c[0] for c in CAPTURABLE])
def test_capturable_rules_with_a_device_loss_scale_match_torch(fake, name, kw):
    """Every capturable rule (NAdam's ``mu_product`` advanced on the device and copied into
    its per-parameter tensors) stepped with a device loss scale and found-inf flag, one step
    skipped: no host read in a steady step, the cached table kept, params and state equal
    torch.optim's step of the unscaled gradients (the skipped step not taken)."""
    ps = _params(torch.float32, (3, 130, 4099))
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = getattr(fot, name)(ps, capturable=True, **kw)
    ref = getattr(torch.optim, name)(qs, **kw)
    scale = torch.tensor(512.0)
    for step in range(1, 7):
        found = torch.tensor(1.0 if step == 3 else 0.0)
        gs = _grads(ps, step)
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g * 512.0, g.clone()
        if step != 3:
            ref.step()
        fake.clear()
        watched = [scale, found]
        if step > 1:
            watched += [t for p in ps for t in ours.state[p].values() if t.dim() == 0]
        with no_host_reads(watched) if step > 1 else contextlib.nullcontext():
            ours.step(grad_scale=scale, found_inf=found)
        assert len(fake.launches) == 1 and len(fake.tables) == (1 if step == 1 else 0)
        # float32 rounding: fastopt's fused element body against torch's op-by-op steps
        _same_state(ours, ref, ps, qs, 1e-5, 1e-6)


def test_capturable_on_cpu_is_torch_fused_capturable_on_cpu():
    """CPU parameters with ``capturable=True`` step as torch's fused capturable Adam does on
    the CPU (its foreach/single-tensor forms refuse CPU params; the fused one steps them, the
    step counts on the CPU)."""
    ps = _params(torch.float32, (5, 300))
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = fot.Adam(ps, lr=1e-2, capturable=True)
    ref = torch.optim.Adam(qs, lr=1e-2, capturable=True, fused=True)
    with pytest.raises(AssertionError, match="capturable"):
        _torch_refuses_cpu_capturable()
    for step in range(1, 5):
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        _same_state(ours, ref, ps, qs, 2e-6, 1e-7)
    assert all(ours.state[p]["step"].device.type == "cpu" for p in ps)


def _torch_refuses_cpu_capturable():
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    torch.optim.Adam([p], capturable=True, foreach=False).step()


# -- clipping ------------------------------------------------------------------------------------
CLIPPED = [
    ("Adam", dict(lr=1e-2)),
    ("AdamW", dict(lr=1e-2, weight_decay=0.1)),
    ("SGD", dict(lr=1e-2, momentum=0.9)),
    ("RMSprop", dict(lr=1e-3, centered=True)),
    ("Adagrad", dict(lr=1e-2)),
]


@pytest.mark.parametrize("scaler", [False, True], ids=["plain", "grad-scaler"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name,kw", CLIPPED, ids=[c[0] for c in CLIPPED])
def test_max_grad_norm_matches_unscale_clip_step(name, kw, dtype, scaler):
    """``max_grad_norm=`` against torch: ``scaler.unscale_`` + ``clip_grad_norm_`` +
    ``scaler.step`` (or ``clip_grad_norm_`` + ``step``), six steps whose gradient norms lie
    above and below ``max_norm``, with ``torch.amp.GradScaler("cpu")``, one step with an inf
    gradient (skipped by both, the scales kept alike). Params and state within rounding."""
    ps = _params(dtype, (3, 130, 2049))
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    max_norm = 5.0
    ours = getattr(fot, name)(ps, max_grad_norm=max_norm, **kw)
    ref = getattr(torch.optim, name)(qs, **kw)
    scalers = [torch.amp.GradScaler("cpu", init_scale=256.0) for _ in range(2)] if scaler else None
    if scalers:
        for s in scalers:
            s.scale(torch.ones(()))  # creates the scale
    for step in range(1, 7):
        size = (0.05, 1.0, 0.3, 2.0, 0.01, 1.0)[step - 1]
        gs = _grads(ps, step, size)
        if scalers and step == 3:
            gs[1][5] = float("inf")
        if scalers:
            s = float(scalers[0].get_scale())
            assert s == float(scalers[1].get_scale())
            gs = [g * s for g in gs]
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        if scalers:
            scalers[1].unscale_(ref)
            torch.nn.utils.clip_grad_norm_(qs, max_norm)
            scalers[1].step(ref)
            scalers[1].update()
            scalers[0].step(ours)
            scalers[0].update()
        else:
            torch.nn.utils.clip_grad_norm_(qs, max_norm)
            ref.step()
            ours.step()
        tol = (2e-5, 1e-6) if dtype is torch.float32 else (1e-10, 1e-12)
        _same_state(ours, ref, ps, qs, *tol)
    if scalers:
        assert float(scalers[0].get_scale()) == float(scalers[1].get_scale())


def test_max_grad_norm_on_the_device_path_equals_the_cpu_path(fake):
    """The fake GPU path (``GradNorm`` over tables of the gradients, the coefficient read by
    the update launch) against the CPU path's clipping, with and without a device loss scale
    in a capturable optimizer: one norm pass per step, every launch clipped."""
    for capturable in (False, True):
        ps = _params(torch.float32, (3, 130, 2049))
        qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        ours = fot.Adam(ps, lr=1e-2, max_grad_norm=2.0, capturable=capturable)
        ref = fot.Adam(qs, lr=1e-2, max_grad_norm=2.0)
        ref._backend_module = fake_table.cpu_path
        for step in range(1, 5):
            gs = _grads(ps, step, (0.01, 1.0, 3.0, 0.5)[step - 1])
            for p, q, g in zip(ps, qs, gs):
                p.grad, q.grad = (g * 8).clone() if capturable else g.clone(), g.clone()
            fake.clear()
            if capturable:
                ours.step(grad_scale=torch.tensor(8.0), found_inf=torch.tensor(0.0))
            else:
                ours.step()
            ref.step()
            assert fake.norms == 1 and all(x["clip"] for x in fake.launches)
            _same_state(ours, ref, ps, qs, 2e-6, 1e-7)


def test_max_grad_norm_is_checked():
    p = torch.nn.Parameter(torch.zeros(3))
    for bad, exc in ((0.0, ValueError), (-1.0, ValueError), (float("inf"), ValueError),
                     ("1", TypeError), (True, TypeError)):  # fmt: skip
        with pytest.raises(exc, match="max_grad_norm"):
            fot.Adam([p], max_grad_norm=bad)
    opt = fot.Adam([p], max_grad_norm=1.0)
    assert opt.max_grad_norm == 1.0
    with pytest.raises(NotImplementedError, match="max_grad_norm"):
        fot.CPUOffload(fot.Adam, [p], max_grad_norm=1.0)
    import pickle

    assert pickle.loads(pickle.dumps(opt)).max_grad_norm == 1.0
