"""``fastopt.torch`` on a real GPU (``-m gpu``; skipped without one): ``state_dtype=`` and
stochastic rounding in the multi-tensor launch, groups of several launches kept in their
cached launches, and ``capturable=True`` of a class torch.optim lacks.

The CPU proofs are ``tests/test_torch_precision.py`` and ``tests/test_torch_device_parts.py``
(oracle, fake backend); what only a GPU confirms is here:

- bfloat16 state and stochastically rounded bfloat16 parameters over a transformer's tensor
  list equal the CPU path given the same inputs (within one bfloat16 unit, most elements
  exactly: the GPU's float32 square root and division against the CPU's);
- a param group of float32 and bfloat16 parameters (two launches) stepped with GradScaler
  under ``torch.cuda.set_sync_debug_mode("error")``: its steady steps never synchronise, and
  equal the same parameters in one group per dtype;
- a ``capturable=True`` Lion captured with ``torch.cuda.graph``: replays equal eager steps;
- RAdam and Adan (their device variants, ``Rule.device_flags``) with GradScaler: steady
  steps never synchronise, and equal the CPU path;
- ``master_weights="remainder"``: the joined master equals ``master_weights=True``'s on the
  same backend bit for bit.
"""

import numpy as np
import pytest
from gpu_common import gpu_backend_params, needs_gpu

from fastopt.bench.measure import transformer_shapes

pytestmark = needs_gpu
torch = pytest.importorskip("torch")
import fastopt.torch as fot  # noqa: E402  (imports torch)

N = (1 << 18) + 3


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")


def _list(dtype=torch.float32, seed=0, device="cuda"):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(int(np.prod(s)), generator=gen).to(dtype).to(device))
        for s in transformer_shapes(N)
    ]


def _grads(ps, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in ps]


def _one_ulp(a, b, dtype):
    """``a`` within one unit in the last place of ``dtype`` of ``b``, 99 % exactly."""
    a, b = a.detach().double().cpu().reshape(-1), b.detach().double().cpu().reshape(-1)
    ulp = {torch.bfloat16: 2.0**-7, torch.float32: 2.0**-23}[dtype]
    assert ((a - b).abs() <= ulp * b.abs() * 1.01 + 2e-7).all()
    if a.numel() >= 1000:
        assert (a == b).double().mean() >= 0.99


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("capturable", [False, True])
def test_state_dtype_and_stochastic_rounding_equal_the_cpu_path(backend, capturable):
    _cuda()
    ps = _list(torch.bfloat16)
    qs = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ps]
    kw = dict(lr=1e-3, weight_decay=0.01, state_dtype="bfloat16", stochastic_rounding=True, seed=3)
    ours = fot.AdamW(ps, capturable=capturable, backend=backend, **kw)
    ref = fot.AdamW(qs, backend="numba", **kw)
    for step in range(1, 4):
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.to("cuda"), g.clone()
        ours.step()
        ref.step()
        for p, q in zip(ps, qs):  # step by step: one unit apart would compound otherwise
            _one_ulp(p, q, torch.bfloat16)
            for n in ("exp_avg", "exp_avg_sq"):
                assert ours.state[p][n].dtype is torch.bfloat16
                _one_ulp(ours.state[p][n], ref.state[q][n], torch.bfloat16)
            with torch.no_grad():
                q.copy_(p.cpu())
                for n in ("exp_avg", "exp_avg_sq"):
                    ref.state[q][n].copy_(ours.state[p][n].cpu())
    io = ours._steady[0].io  # the cached launch's storage format
    assert io.sr and io.state == "bfloat16"


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("capturable", [False, True])
def test_mixed_dtype_group_steady_steps_do_not_synchronise(backend, capturable):
    _cuda()
    ps = _list(torch.float32)[:24]
    for i in range(1, len(ps), 2):
        ps[i] = torch.nn.Parameter(ps[i].detach().to(torch.bfloat16))
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=1e-3, capturable=capturable, backend=backend, master_weights=True)
    opt = fot.Adam(ps, **kw)
    ref = fot.Adam([{"params": qs[0::2]}, {"params": qs[1::2]}], **kw)
    scalers = [torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=10**6)]
    scalers.append(torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=10**6))
    x = torch.randn(len(ps), device="cuda")

    def step(o, params, scaler):
        loss = sum((p.float().sum() * x[i]) for i, p in enumerate(params))
        scaler.scale(loss).backward()
        scaler.step(o)
        scaler.update()
        o.zero_grad(set_to_none=False)

    for _ in range(3):
        step(opt, ps, scalers[0])
        step(ref, qs, scalers[1])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step(opt, ps, scalers[0])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for _ in range(3):
        step(ref, qs, scalers[1])
    torch.cuda.synchronize()
    assert type(opt._steady[0]).__name__ == "SteadyParts"
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert int(opt.state[p]["step"]) == 6


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_capturable_lion_graph_replays_equal_eager_steps(backend):
    _cuda()
    ps = _list()
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = fot.Lion(ps, lr=1e-4, weight_decay=0.1, capturable=True, backend=backend)
    eager = fot.Lion(qs, lr=1e-4, weight_decay=0.1, capturable=True, backend=backend)
    for p, q, g in zip(ps, qs, _grads(ps, 1)):
        p.grad, q.grad = g.to("cuda"), g.to("cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            ours.step()
            eager.step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ours.step()
    for i in range(4):
        for p, q, g in zip(ps, qs, _grads(ps, 10 + i)):
            p.grad.copy_(g)
            q.grad.copy_(g)
        graph.replay()
        eager.step()
    torch.cuda.synchronize()
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["exp_avg"], eager.state[q]["exp_avg"])


SELECTING = [
    ("RAdam", dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.01)),
    ("Adan", dict(lr=1e-3, weight_decay=0.01)),
]


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("name,kw", SELECTING, ids=[c[0] for c in SELECTING])
def test_step_dependent_rules_do_not_synchronise_and_equal_the_cpu_path(backend, name, kw):
    """RAdam and Adan (their device variant selecting per step) with GradScaler: steady steps
    under ``set_sync_debug_mode("error")`` across RAdam's rectification switch (step 6), then
    params and state against the CPU path given the same gradients (float32: 1e-5)."""
    _cuda()
    ps = _list()[:16]
    qs = [torch.nn.Parameter(p.detach().cpu().clone()) for p in ps]
    ours = getattr(fot, name)(ps, capturable=True, backend=backend, **kw)
    ref = getattr(fot, name)(qs, backend="numba", **kw)
    scale = torch.tensor(256.0, device="cuda")
    found = torch.zeros((), device="cuda")
    for step in range(1, 9):
        gs = _grads(qs, step)
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = (g * 256.0).to("cuda"), g.clone()
        if step > 2:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            ours.step(grad_scale=scale, found_inf=found)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref.step()
    torch.cuda.synchronize()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p.detach().cpu(), q.detach(), rtol=1e-5, atol=1e-6)
        for k, v in ref.state[q].items():
            torch.testing.assert_close(
                ours.state[p][k].cpu().float(), v.float(), rtol=1e-5, atol=1e-6
            )


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("capturable", [False, True])
def test_remainder_master_is_the_fp32_master_on_the_device(backend, capturable):
    """``master_weights="remainder"`` in the multi-tensor launch (the int16 remainder as the
    table's master column): over a transformer's tensor list, the bfloat16 parameter and its
    remainder joined (``precision.join_master``) equal, bit for bit, the fp32 master the same
    backend keeps with ``master_weights=True`` given the same gradients; the state too."""
    from fastopt import precision

    _cuda()
    pr = _list(torch.bfloat16, seed=8)
    pt = [torch.nn.Parameter(p.detach().clone()) for p in pr]
    kw = dict(lr=1e-2, weight_decay=0.1, backend=backend, capturable=capturable)
    r = fot.AdamW(pr, master_weights="remainder", **kw)
    t = fot.AdamW(pt, master_weights=True, **kw)
    for s in range(1, 4):
        for p, q, g in zip(pr, pt, _grads(pr, s)):
            p.grad, q.grad = g.cuda(), g.cuda()
        r.step()
        t.step()
    torch.cuda.synchronize()
    for p, q in zip(pr, pt):
        bits = p.detach().cpu().view(torch.int16).numpy().view(precision.bfloat16())
        rem = r.state[p][precision.MASTER_REMAINDER]
        assert rem.dtype is torch.int16 and rem.device == p.device
        joined = precision.join_master(bits, rem.cpu().numpy())
        want = t.state[q]["master_param"].cpu().numpy()
        assert np.array_equal(joined.view(np.uint32), want.view(np.uint32))
        for n in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(r.state[p][n], t.state[q][n])
