"""Fused loss-scale handling against ``torch.amp.GradScaler``'s flow (skipped without torch).

torch's flow with a plain optimizer: ``scaler.step(opt)`` unscales every grad in place
(``grad * (1/scale)``), checks them for inf/NaN and skips ``opt.step()`` when it finds any (the
optimizer's step count does not advance); ``scaler.update()`` then adapts the scale. fastopt
gets the same scaled grads with ``grad_scale=`` and ``found_inf=`` and unscales inside its one
pass: params, every state buffer and the step count must match torch's after a run with
skipped steps, and ``unscale_grads=True`` leaves the grads unscaled as ``unscale_`` does.
"""

import numpy as np
import pytest
from conftest import backend_params
from support.tolerances import assert_close

import fastopt

torch = pytest.importorskip("torch")

STEPS = 8
BAD = {2: np.inf, 5: np.nan}  # steps whose gradient holds a non-finite value


def _grads(rng, shapes, t):
    g = {k: rng.standard_normal(s).astype(np.float32) * 1e-3 for k, s in shapes.items()}
    if t in BAD:
        g["b"][3] = BAD[t]
    return g


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize(
    "name,kw",
    [("Adam", dict(lr=0.01)), ("SGD", dict(lr=0.05, momentum=0.9)), ("AdamW", dict(lr=0.01))],
)
def test_grad_scale_and_found_inf_match_grad_scaler(name, kw, backend):
    shapes = {"w": (17, 9), "b": (33,)}
    rng = np.random.default_rng(1)
    p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in p0.items()}
    topt = getattr(torch.optim, name)(list(tp.values()), **kw)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    ours = {k: v.copy() for k, v in p0.items()}
    opt = getattr(fastopt, name)(**kw, backend=backend)
    applied = []
    for t in range(STEPS):
        g = _grads(rng, shapes, t)
        scaler.scale(torch.ones(()))  # what scaling the loss does to the scaler: its scale
        scale = scaler.get_scale()
        scaled = {k: v * np.float32(scale) for k, v in g.items()}
        for k, v in tp.items():
            v.grad = torch.tensor(scaled[k])
        scaler.step(topt)
        scaler.update()
        found_inf = torch.tensor([float(not all(np.isfinite(v).all() for v in scaled.values()))])
        mine = {k: v.copy() for k, v in scaled.items()}
        ok = opt.update(
            ours,
            mine,
            grad_scale=torch.full((1,), scale),
            found_inf=found_inf,
            unscale_grads=True,
        )
        applied.append(ok)
        if ok:  # unscaled in place, like torch's unscale_
            for k, v in tp.items():
                np.testing.assert_array_equal(mine[k], v.grad.numpy(), err_msg=f"grad {k}")
        else:  # a skipped step changes nothing, the grads included
            for k in mine:
                np.testing.assert_array_equal(mine[k], scaled[k])
    assert applied == [t not in BAD for t in range(STEPS)]
    assert opt.step_count == STEPS - len(BAD)
    for k, v in tp.items():
        if "step" in topt.state[v]:  # torch's SGD counts no steps
            assert int(topt.state[v]["step"]) == opt.step_count
        assert_close(ours[k], v.detach().numpy(), np.float32, f"{name} param {k}")
        for s, a in opt.state[k].items():
            assert_close(a, topt.state[v][s].numpy(), np.float32, f"{name} state {s} of {k}")


@pytest.mark.parametrize("backend", backend_params())
def test_fp16_params_with_master_and_loss_scale(backend):
    """float16 params and grads, fp32 master and state, grads scaled by 2**12 (tiny gradients
    survive float16 only scaled): unscaled in the pass, the params are the float16 rounding of
    an fp32 torch run on the unscaled gradients (a couple of elements may round the other
    way)."""
    n, rng, scale = 4096, np.random.default_rng(4), 2.0**12
    p0 = rng.standard_normal(n).astype(np.float16)
    w = torch.tensor(p0.astype(np.float32), requires_grad=True)
    topt = torch.optim.AdamW([w], lr=1e-3)
    ours = {"w": p0.copy()}
    opt = fastopt.AdamW(lr=1e-3, master_weights=True, backend=backend)
    for _ in range(10):
        g16 = (rng.standard_normal(n) * 1e-5 * scale).astype(np.float16)  # scaled, as backward
        w.grad = torch.tensor(g16.astype(np.float32) / np.float32(scale))
        topt.step()
        assert opt.update(ours, {"w": g16}, grad_scale=scale)
    want = w.detach().numpy().astype(np.float16)
    assert int((ours["w"].view(np.uint16) != want.view(np.uint16)).sum()) <= 2
    assert {a.dtype for a in opt.state["w"].values()} == {np.dtype(np.float32)}


@pytest.mark.parametrize("backend", backend_params())
def test_flat_buffer_takes_the_loss_scale_keywords(backend):
    rng = np.random.default_rng(2)
    params = {"a": rng.standard_normal(100).astype(np.float32), "b": rng.standard_normal(7)}
    bufs = [fastopt.FlatBuffer(params) for _ in range(2)]
    opts = [fastopt.Adam(lr=0.1, backend=backend) for _ in range(2)]
    for _ in range(3):
        g = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in params.items()}
        for k in g:
            bufs[0].grads[k][...] = g[k]
            bufs[1].grads[k][...] = g[k] * 4
        assert opts[0].step(bufs[0])
        assert opts[1].step(bufs[1], grad_scale=4.0)
        assert not opts[1].step(bufs[1], grad_scale=4.0, found_inf=np.ones(1, np.float32))
    for k in params:
        np.testing.assert_allclose(bufs[1].params[k], bufs[0].params[k], rtol=1e-6)
    assert opts[1].step_count == 3


def test_loss_scale_arguments_are_checked():
    p, g = {"w": np.ones(4, np.float32)}, {"w": np.ones(4, np.float32)}
    opt = fastopt.Adam()
    for bad, exc in [(0.0, ValueError), (np.inf, ValueError), ("2", TypeError), (True, TypeError)]:
        with pytest.raises(exc, match="grad_scale"):
            opt.update(p, g, grad_scale=bad)
    with pytest.raises(ValueError, match="found_inf"):
        opt.update(p, g, found_inf=np.zeros(3))
    with pytest.raises(ValueError, match="unscale_grads"):
        opt.update(p, g, unscale_grads=True)
    assert opt.step_count == 0 and (p["w"] == 1).all()
