"""``fastopt.torch``'s GPU path on a real GPU (``-m gpu``; skipped without one).

The launch logic, the sync-free protocol and the clipping are proven on the CPU
(``tests/test_torch_device_path.py`` with a fake backend, ``tests/cudasim_torch.py`` through
numba-cuda under the simulator); what only a GPU confirms is here, over a transformer's
196-tensor list (``bench.measure.transformer_shapes``) on both GPU backends:

- one multi-tensor launch per group and plan: params and state against torch's fused step on
  the same list (float32; bfloat16 with fp32 masters against an fp32 fused run, rounded);
- steady GradScaler steps of a ``capturable=True`` optimizer under
  ``torch.cuda.set_sync_debug_mode("error")`` (any host synchronisation raises);
- a whole ``optimizer.step()`` captured with ``torch.cuda.graph``: its replays equal eager
  steps, an LR scheduler's writes into the device lr reach the replays;
- ``max_grad_norm`` against ``scaler.unscale_`` + ``clip_grad_norm_`` + fused step, and the
  cost of the clipped step against the unclipped one (recorded, the target is in the GPU run);
- quantized state (``state_dtype="int8"``/``"float8_e4m3"``/``"int4"``, the codes and scales
  in the table; int4's packed, a thread per byte): one launch per step over a 196-tensor list
  (``QN`` elements), step by step from the same state against the CPU path of the NumPy oracle
  (``backend="numpy"``: nothing to compile on the GPU machine) within the tolerances
  ``tests/gpu/test_gpu_quant.py`` holds the GPU kernels to; a capturable quantized step (int8)
  captured with ``torch.cuda.graph``, its replays equal to eager steps (the same tolerances),
  the eager steps free of host synchronisation.
"""

import numpy as np
import pytest
from gpu_common import gpu_backend_params, needs_gpu

from fastopt.bench.measure import transformer_shapes

pytestmark = needs_gpu
torch = pytest.importorskip("torch")
import fastopt.torch as fot  # noqa: E402  (imports torch)

N = (1 << 20) + 3
#: the quantized list: 196 tensors, many of them shorter than a block of codes
QN = (1 << 18) + 3


def _cuda():
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")


def _list(dtype=torch.float32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(int(np.prod(s)), generator=gen, device="cuda").to(dtype))
        for s in transformer_shapes(N)
    ]


def _twins(ps, dtype=None):
    return [torch.nn.Parameter(p.detach().clone().to(dtype or p.dtype)) for p in ps]


def _grads(ps, seed, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [torch.randn(p.shape, generator=gen, device="cuda") * scale for p in ps]


def _close(ours, ref, pa, pb, rtol, atol):
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.detach().float(), b.detach().float(), rtol=rtol, atol=atol)
        for k, v in ref.state[b].items():
            torch.testing.assert_close(
                ours.state[a][k].float().reshape(-1),
                v.float().reshape(-1).to(ours.state[a][k].device),
                rtol=rtol,
                atol=atol,
            )


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("capturable", [False, True])
def test_list_step_matches_torch_fused(backend, capturable):
    _cuda()
    ps = _list()
    qs = _twins(ps)
    ours = fot.AdamW(ps, lr=1e-3, weight_decay=0.01, capturable=capturable, backend=backend)
    ref = torch.optim.AdamW(qs, lr=1e-3, weight_decay=0.01, fused=True, capturable=capturable)
    for step in range(1, 5):
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    _close(ours, ref, ps, qs, 1e-5, 1e-6)
    cached = ours._steady[0]
    assert cached.dl is not None and cached.dl.mt.rows.shape[0] == len(ps)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_bf16_master_list_is_the_rounding_of_an_fp32_fused_run(backend):
    _cuda()
    ps = _list(torch.bfloat16)
    qs = _twins(ps, torch.float32)
    ours = fot.Adam(ps, lr=1e-3, master_weights=True, backend=backend)
    ref = torch.optim.Adam(qs, lr=1e-3, fused=True)
    for step in range(1, 4):
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
        ours.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(ours.state[p]["master_param"], q.detach(), rtol=1e-5, atol=1e-6)
        assert torch.equal(p.detach(), ours.state[p]["master_param"].to(torch.bfloat16))


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("capturable", [False, True])
def test_grad_scaler_steady_steps_do_not_synchronise(backend, capturable):
    _cuda()
    ps = _list()
    opt = fot.Adam(ps, lr=1e-3, capturable=capturable, backend=backend)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10, growth_interval=10**6)
    x = torch.randn(len(ps), device="cuda")

    def step():
        loss = sum((p.sum() * x[i]) for i, p in enumerate(ps))
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=False)

    for _ in range(3):  # the first step checks everything (reads the step counts once)
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert all(int(opt.state[p]["step"]) == 6 for p in ps)
    assert all(opt.state[p]["step"].device == p.device for p in ps)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_host_step_counts_of_a_torch_state_dict_move_to_the_device(backend):
    """A state dict of torch's foreach Adam (step counts on the host) loaded mid-run: the next
    step moves the counts to the device and goes on as torch does."""
    _cuda()
    ps = _list()[:8]
    qs = _twins(ps)
    ref = torch.optim.Adam(qs, lr=1e-3, foreach=True)
    for p, q, g in zip(ps, qs, _grads(ps, 1)):
        p.grad, q.grad = g.clone(), g.clone()
    ref.step()
    with torch.no_grad():
        for p, q in zip(ps, qs):
            p.copy_(q)
    ours = fot.Adam(ps, lr=1e-3, backend=backend)
    ours.load_state_dict(ref.state_dict())
    assert ours.state[ps[0]]["step"].device.type == "cpu"
    for step in (2, 3):
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    assert all(ours.state[p]["step"].device == p.device for p in ps)
    _close(ours, ref, ps, qs, 1e-5, 1e-6)


def _copy_grads(ps, qs, seed):
    """New gradients into both lists' ``.grad`` tensors, in place (a captured step reads
    them at their addresses)."""
    for p, q, g in zip(ps, qs, _grads(ps, seed)):
        p.grad.copy_(g)
        q.grad.copy_(g)


def _captured(ours, eager, ps, qs):
    """Gradients set, three warm-up steps of both optimizers on a side stream (torch's capture
    recipe), then ``ours.step()`` captured: the ``torch.cuda.CUDAGraph``."""
    for p, q, g in zip(ps, qs, _grads(ps, 1)):
        p.grad, q.grad = g.clone(), g.clone()
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
    return graph


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_cuda_graph_replays_equal_eager_steps(backend):
    _cuda()
    ps, qs = _list(), None
    qs = _twins(ps)
    lr = torch.tensor(1e-3, device="cuda")
    ours = fot.Adam(ps, lr=lr, capturable=True, backend=backend)
    eager = fot.Adam(qs, lr=torch.tensor(1e-3, device="cuda"), capturable=True, backend=backend)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (ours, eager)]
    graph = _captured(ours, eager, ps, qs)
    for i in range(6):
        _copy_grads(ps, qs, 10 + i)
        graph.replay()
        eager.step()
        for sc in scheds:
            sc.step()
    torch.cuda.synchronize()
    _close(ours, eager, ps, qs, 1e-6, 1e-7)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_max_grad_norm_matches_unscale_clip_step_and_costs_little(backend):
    _cuda()
    ps = _list()
    qs = _twins(ps)
    ours = fot.Adam(ps, lr=1e-3, max_grad_norm=1.0, capturable=True, backend=backend)
    ref = torch.optim.Adam(qs, lr=1e-3, fused=True, capturable=True)
    scalers = [torch.amp.GradScaler("cuda", init_scale=256.0) for _ in range(2)]
    for sc in scalers:
        sc.scale(torch.ones((), device="cuda"))
    for step in range(1, 5):
        s = float(scalers[0].get_scale())
        gs = _grads(ps, step, s * (0.0001 if step == 2 else 1.0))
        if step == 3:
            gs[7][0] = float("inf")
        for p, q, g in zip(ps, qs, gs):
            p.grad, q.grad = g.clone(), g.clone()
        scalers[1].unscale_(ref)
        torch.nn.utils.clip_grad_norm_(qs, 1.0)
        scalers[1].step(ref)
        scalers[1].update()
        scalers[0].step(ours)
        scalers[0].update()
    _close(ours, ref, ps, qs, 2e-5, 1e-6)
    # the cost of clipping inside the step (recorded; the GPU run measures it properly)
    plain = fot.Adam(_twins(ps), lr=1e-3, capturable=True, backend=backend)
    for p in plain.param_groups[0]["params"]:
        p.grad = torch.randn_like(p)
    for p in ps:
        p.grad = torch.randn_like(p)
    times = []
    for opt in (plain, ours):
        for _ in range(3):
            opt.step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            opt.step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 10)
    print(f"clipped/unclipped step time: {times[1] / times[0]:.3f} ({times})")
    assert times[1] < 3 * times[0]


def _quant_list(seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return [
        torch.nn.Parameter(torch.randn(int(np.prod(s)), generator=gen, device="cuda"))
        for s in transformer_shapes(QN)
    ]


def _count_launches(monkeypatch, backend):
    """The table launches of ``backend`` (a list the patched ``launch_table`` appends to)."""
    from fastopt.backends import get_backend

    be = get_backend(backend)
    calls = []
    orig = be.launch_table
    # launch_table(rule, flags, io, table, k, ...): the table
    monkeypatch.setattr(be, "launch_table", lambda *a, **k: (calls.append(a[3]), orig(*a, **k)))
    return calls


def _close_quantized(ours, ref, pa, pb, fmt):
    """Params and scales within float32 rounding, codes one apart (one float8 value apart) in
    under 1 % of elements (int4's unpacked first): ``test_gpu_quant.py``'s tolerances against
    the oracle (``ref`` on any device)."""
    from fastopt.kernels import RULES, quant

    from fastopt import _quantized as Q

    maps = {s.name: s.quant_map for s in RULES[type(ours)._fastopt._rule].slots}
    off = 0
    for a, b in zip(pa, pb):
        torch.testing.assert_close(a.detach().cpu(), b.detach().cpu(), rtol=2e-5, atol=2e-6)
        for k, v in ref.state[b].items():
            base, part = Q.split_name(k)
            x, v = ours.state[a][k].cpu(), v.cpu()
            if part == Q.ABSMAX:
                torch.testing.assert_close(x, v, rtol=1e-5, atol=0)
            elif part == Q.CODES:
                amax, qm = ref.state[b][Q.names_of(base)[1]].cpu().numpy(), maps[base]
                n = a.numel()
                xa = Q.dequantize(x.numpy(), amax, fmt, qm, n)
                off += int(np.count_nonzero(xa != Q.dequantize(v.numpy(), amax, fmt, qm, n)))
                if not quant.table(fmt, qm).signmag:  # int8, int4: the codes are ordered
                    xc, vc = x.numpy().reshape(-1), v.numpy().reshape(-1)
                    if fmt in quant.PACKED:
                        xc, vc = Q.unpack(xc, n), Q.unpack(vc, n)
                    d = np.abs(xc.astype(int) - vc.astype(int))
                    assert d.max(initial=0) <= 1, (k, d.max())
    assert off <= 0.01 * sum(p.numel() for p in pa), off


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("fmt", ["int8", "float8_e4m3", "int4"])
def test_quantized_list_steps_match_the_oracle_path(backend, fmt, monkeypatch):
    """One launch per step over the 196-tensor list with quantized state, three steps, each
    from the state the GPU left (copied into the CPU twin: a code one apart would otherwise
    compound), against ``fastopt.torch``'s CPU path through the NumPy oracle."""
    _cuda()
    calls = _count_launches(monkeypatch, backend)
    ps = _quant_list()
    qs = [torch.nn.Parameter(p.detach().cpu()) for p in ps]
    kw = dict(lr=1e-3, weight_decay=0.01, state_dtype=fmt)
    ours = fot.AdamW(ps, backend=backend, **kw)
    ref = fot.AdamW(qs, backend="numpy", **kw)
    for step in range(1, 4):
        calls.clear()
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.clone(), g.cpu()
        ours.step()
        ref.step()
        torch.cuda.synchronize()
        assert len(calls) == 1 and calls[0].io.quant == fmt  # one launch, the codes in it
        assert calls[0].rows.shape[0] == len(ps)
        _close_quantized(ours, ref, ps, qs, fmt)
        with torch.no_grad():  # the next step from the GPU's state on both sides
            for p, q in zip(ps, qs):
                q.copy_(p.cpu())
                for k, v in ref.state[q].items():
                    v.copy_(ours.state[p][k].cpu())
    assert ours._steady[0].dl.mt is calls[0]  # the cached table, re-used


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_quantized_cuda_graph_replays_equal_eager_steps(backend):
    """A capturable AdamW with int8 state captured with ``torch.cuda.graph``: replays over new
    gradients equal eager steps of a twin (the same kernels: params, codes and scales held to
    ``_close_quantized``, the device step counts equal), and the eager steps after the first
    run under ``set_sync_debug_mode("error")``."""
    fmt = "int8"
    _cuda()
    ps = _quant_list()
    qs = _twins(ps)
    kw = dict(lr=1e-3, weight_decay=0.01, state_dtype=fmt, capturable=True, backend=backend)
    ours, eager = fot.AdamW(ps, **kw), fot.AdamW(qs, **kw)
    graph = _captured(ours, eager, ps, qs)
    for i in range(4):
        _copy_grads(ps, qs, 10 + i)
        graph.replay()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if i else "default")  # the first: back on
        try:  # the current stream after the side stream's warm-up
            eager.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    _close_quantized(ours, eager, ps, qs, fmt)
    for p, q in zip(ps, qs):
        assert set(ours.state[p]) == set(eager.state[q])
        assert torch.equal(ours.state[p]["step"], eager.state[q]["step"])  # on the device
