"""``fastopt.torch`` through the numba-cuda backend under Numba's CUDA simulator (run by
``tests/test_cudasim.py`` with ``NUMBA_ENABLE_CUDASIM=1``): the simulator keeps the arrays in
host memory, so CPU tensors stepped with ``backend="numba-cuda"`` take the GPU path of
``fastopt.torch`` (``_device``: one ``launch_table`` per group and plan over a cached table,
``GradNorm`` for ``max_grad_norm``, the scalar kernel of a ``capturable=True`` step with the
loss scale and found-inf flag read by the kernels) with the real numba-cuda kernels, quantized
state included (``state_dtype=``: the codes and scales in the table). Each is held to the numba
CPU path, the capturable step to torch's fused capturable AdamW, and the remainder form of
master weights to the same kernel's fp32 master.
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
    ps, qs = _params(dtype), _params(dtype)
    kw = dict(lr=1e-2, weight_decay=0.1, master_weights=True, max_grad_norm=3.0)
    ours = getattr(fot, name)(ps, backend="numba-cuda", **kw)
    ref = getattr(fot, name)(qs, backend="numba", **kw)
    tol = (1e-6, 1e-7) if dtype is torch.float32 else (1e-2, 1e-3)
    _one_launch_per_step(monkeypatch, ours, ref, ps, qs, lambda table, step: None, tol)


def _one_launch_per_step(monkeypatch, ours, ref, ps, qs, check, tol=None):
    """Three steps of ``ours`` (numba-cuda) and ``ref`` on the same gradients: each of ours one
    ``launch_table`` (the group's cached table from the second on), then ``check(table,
    step)`` and, with ``tol``, ``_same``."""
    calls = []
    orig = ncb.launch_table
    monkeypatch.setattr(ncb, "launch_table", lambda *a, **k: (calls.append(a[3]), orig(*a, **k)))
    for step in range(1, 4):
        for p, q, g in zip(ps, qs, _grads(ps, step, (0.1, 2.0, 1.0)[step - 1])):
            p.grad, q.grad = g.clone(), g.clone()
        calls.clear()
        ours.step()
        ref.step()
        assert len(calls) == 1  # one table launch for the group
        if step > 1:  # the cached table, re-used
            assert calls[0] is ours._steady[0].dl.mt
        check(calls[0], step)
        if tol is not None:
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


@pytest.mark.parametrize("capturable", [False, True])
def test_state_dtype_and_stochastic_rounding_equal_the_cpu_path(capturable):
    """bfloat16 parameters rounded stochastically with bfloat16 state, and float32 parameters
    with bfloat16 state, in one group (two launches, cached as parts): the numba-cuda table
    kernels give the numba CPU path's params and state (the same index, salt and key; float32
    arithmetic of the same statements: within one bfloat16 unit)."""
    ps = _params(torch.bfloat16) + _params(torch.float32, seed=1)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=1e-2, weight_decay=0.1, state_dtype="bfloat16", stochastic_rounding=True, seed=5)
    ours = fot.AdamW(ps, backend="numba-cuda", capturable=capturable, **kw)
    ref = fot.AdamW(qs, backend="numba", **kw)
    for step in range(1, 4):
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        for p in ps:
            assert ours.state[p]["exp_avg"].dtype is torch.bfloat16
        _same(ours, ref, ps, qs, 2.0**-7, 1e-6)
    parts = ours._steady[0].parts
    assert sorted(part.dl.base.param for part in parts) == ["bfloat16", "float32"]
    assert [part.dl.base.sr for part in parts if part.dl.base.param == "bfloat16"] == [True]


@pytest.mark.parametrize(
    ("fmt", "dtype", "kw"),
    [
        ("int8", torch.float32, dict(capturable=True)),
        ("float8_e4m3", torch.bfloat16, dict(master_weights=True, max_grad_norm=3.0)),
        ("int4", torch.bfloat16, dict(master_weights=True)),
    ],
    ids=["int8-fp32-capturable", "float8-bf16-master-clip", "int4-bf16-master"],
)
def test_quantized_state_on_the_table_path_equals_the_cpu_path(fmt, dtype, kw, monkeypatch):
    """Quantized state through the GPU path: one ``launch_table`` per step over the cached
    table (codes and scales in it), held to the numba CPU path (``launch_many_quant``): params,
    codes and scales bit for bit (capturable: the scalars computed on the device; int4's
    packed codes over tensors of odd lengths, a thread per byte), or with the
    gradient norm taken on the device (a clip coefficient rounded apart from the CPU's) within
    float32 rounding of it, codes at most one apart in under 1 % of elements."""
    ps, qs = _params(dtype), _params(dtype)
    ours = fot.AdamW(ps, backend="numba-cuda", lr=1e-2, weight_decay=0.1, state_dtype=fmt, **kw)
    kw.pop("capturable", None)
    ref = fot.AdamW(qs, backend="numba", lr=1e-2, weight_decay=0.1, state_dtype=fmt, **kw)
    exact = "max_grad_norm" not in kw

    def check(table, step):
        assert table.io.quant == fmt  # the codes and scales in the table
        for i, (a, b) in enumerate(zip(ps, qs)):
            assert set(ours.state[a]) == set(ref.state[b])
            pairs = [("param", a.detach(), b.detach())]
            pairs += [(k, ours.state[a][k], ref.state[b][k]) for k in ref.state[b]]
            for k, x, y in pairs:
                if exact:
                    assert torch.equal(x, y), (step, i, k)
                elif k.endswith(".codes"):
                    d = (x.int() - y.int()).abs()
                    assert d.le(1).all() and d.gt(0).sum() <= d.numel() // 100, (step, i, k)
                elif k != "step":  # float32 scales and masters; bfloat16 params by an ulp
                    tol = (1e-5, 1e-7) if x.dtype is torch.float32 else (1e-2, 1e-3)
                    torch.testing.assert_close(x.double(), y.double(), rtol=tol[0], atol=tol[1])

    _one_launch_per_step(monkeypatch, ours, ref, ps, qs, check)


def test_remainder_master_in_the_table_equals_the_fp32_master():
    """``master_weights="remainder"`` through the numba-cuda table kernel (the int16 remainder
    as the master column): one launch per step, and the bfloat16 parameter and remainder
    joined equal the same kernel's fp32 master (``master_weights=True``) bit for bit."""
    import numpy as np

    from fastopt import precision

    ps = _params(torch.bfloat16)
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    kw = dict(lr=1e-2, weight_decay=0.1, backend="numba-cuda")
    rem = fot.AdamW(ps, master_weights="remainder", **kw)
    ref = fot.AdamW(qs, master_weights=True, **kw)
    for step in range(1, 4):
        for p, q, g in zip(ps, qs, _grads(ps, step)):
            p.grad, q.grad = g.clone(), g.clone()
        rem.step()
        ref.step()
        assert rem._steady[0].dl.base.remainder
    for p, q in zip(ps, qs):
        bits = p.detach().view(torch.int16).numpy().view(precision.bfloat16())
        joined = precision.join_master(bits, rem.state[p][precision.MASTER_REMAINDER].numpy())
        want = ref.state[q]["master_param"].numpy()
        assert np.array_equal(joined.view(np.uint32), want.view(np.uint32))
        for n in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(rem.state[p][n], ref.state[q][n])
