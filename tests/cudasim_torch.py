"""``fastopt.torch`` through the numba-cuda backend under Numba's CUDA simulator (run by
``tests/test_cudasim.py`` with ``NUMBA_ENABLE_CUDASIM=1``): the simulator keeps the arrays in
host memory, so CPU tensors stepped with ``backend="numba-cuda"`` take the GPU path of
``fastopt.torch`` (``_device``: one ``launch_table`` per group and plan over a cached table,
``GradNorm`` for ``max_grad_norm``, the scalar kernel of a ``capturable=True`` step with the
loss scale and found-inf flag read by the kernels) with the real numba-cuda kernels. Each is
held to the numba CPU path, and the capturable step to torch's fused capturable AdamW.
"""

import os

import pytest

torch = pytest.importorskip("torch")

import fastopt.torch as fot  # noqa: E402
from fastopt.backends import numba_cuda_backend as ncb  # noqa: E402

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" or not ncb.available(),
    reason="run by tests/test_cudasim.py with NUMBA_ENABLE_CUDASIM=1",
)
SIZES = (0, 1, 7, 130, 300)


def _params(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(n, generator=gen).to(dtype)) for n in SIZES]


def _grads(params, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(p.shape, generator=gen) * scale).to(p.dtype) for p in params]


def _same(oa, ob, pa, pb, rtol, atol):
    for i, (a, b) in enumerate(zip(pa, pb)):
        torch.testing.assert_close(a.detach().double(), b.detach().double(), rtol=rtol, atol=atol)
        for k in ob.state[b]:
            x, y = oa.state[a][k], ob.state[b][k]
            torch.testing.assert_close(x.double(), y.double(), rtol=rtol, atol=atol, msg=(i, k))


@pytest.mark.parametrize("name", ["AdamW", "RAdam"])  # device scalars; host scalars
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
def test_table_path_equals_the_cpu_path(dtype, name, monkeypatch):
    calls = []
    orig = ncb.launch_table
    monkeypatch.setattr(ncb, "launch_table", lambda *a, **k: (calls.append(a[3]), orig(*a, **k)))
    ps, qs = _params(dtype), _params(dtype)
    kw = dict(lr=1e-2, weight_decay=0.1, master_weights=True, max_grad_norm=3.0)
    ours = getattr(fot, name)(ps, backend="numba-cuda", **kw)
    ref = getattr(fot, name)(qs, backend="numba", **kw)
    for step in range(1, 4):
        for p, q, g in zip(ps, qs, _grads(ps, step, (0.1, 2.0, 1.0)[step - 1])):
            p.grad, q.grad = g.clone(), g.clone()
        calls.clear()
        ours.step()
        ref.step()
        assert len(calls) == 1  # one table launch for the group
        if step > 1:  # the cached table, re-used
            assert calls[0] is ours._steady[0].dl.mt
        tol = (1e-6, 1e-7) if dtype is torch.float32 else (1e-2, 1e-3)
        _same(ours, ref, ps, qs, *tol)


def test_capturable_step_with_device_loss_scale_matches_torch_fused():
    ps = _params(torch.float32)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    ours = fot.AdamW(ps, lr=1e-2, weight_decay=0.1, capturable=True, backend="numba-cuda")
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1, capturable=True, fused=True)
    scale = torch.tensor(64.0)
    for step in range(1, 5):
        found = torch.tensor(1.0 if step == 2 else 0.0)
        for p, q, g in zip(ps, qs, _grads(ps, step, 64.0)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step(grad_scale=scale, found_inf=found)
        ref.grad_scale, ref.found_inf = scale, found
        ref.step()
        _same(ours, ref, ps, qs, 2e-6, 1e-7)
    assert all(float(ours.state[p]["step"]) == 3 for p in ps)
