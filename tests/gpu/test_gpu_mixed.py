"""Mixed precision, loss scaling and capturable steps on a real GPU (``-m gpu``; skipped without).

What only a GPU can confirm, everything else being proven on the CPU layers (the g++ harness
runs the same CUDA C, the simulator the same numba-cuda kernels):

- the mixed kernels as CuPy and numba-cuda compile and launch them on device arrays, agreeing
  with the numba CPU loop (within an ulp of the storage dtype: the GPU compilers fuse
  multiply-adds the CPU loop rounds twice);
- bfloat16 CUDA tensors viewed, not copied;
- a whole step captured in a CUDA graph (``cupy.cuda.Stream.begin_capture``), replayed with new
  gradients, a new lr and a device found-inf flag, equal to the same steps run eagerly: no
  host synchronisation happens inside a step (a capture would fail on one).
"""

import numpy as np
import pytest
from gpu_common import gpu_backend_params, needs_gpu, to_device, to_host

import fastopt

pytestmark = needs_gpu
ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)


def _ulps16(a, b):
    o = [np.asarray(x).view(np.uint16).astype(np.int64) for x in (a, b)]
    o = [np.where(x >> 15, -(x & 0x7FFF), x) for x in o]
    return np.abs(o[0] - o[1])


PLANS = [
    ("bf16", dict(), BF16, BF16),
    ("f16", dict(), np.dtype("f2"), np.dtype("f2")),
    ("bf16-master", dict(master_weights=True), BF16, np.dtype("f4")),
    (
        "bf16-sr-bf16state",
        dict(stochastic_rounding=True, seed=5, state_dtype="bfloat16"),
        BF16,
        BF16,
    ),
    ("f32-bf16state", dict(state_dtype="bfloat16"), np.dtype("f4"), np.dtype("f4")),
]


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("plan", PLANS, ids=[p[0] for p in PLANS])
def test_mixed_precision_matches_the_cpu_loop(plan, backend):
    _, kw, pdt, gdt = plan
    n, rng = (1 << 20) + 7, np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(pdt)
    grads = [rng.standard_normal(n).astype(gdt) * 64 for _ in range(5)]
    host = {"w": p0.copy()}
    dev = {"w": to_device(p0)}
    cpu = fastopt.Adam(lr=1e-3, backend="numba", **kw)
    gpu = fastopt.Adam(lr=1e-3, backend=backend, **kw)
    for g in grads:
        cpu.update(host, {"w": g}, grad_scale=64.0)
        gpu.update(dev, {"w": to_device(g)}, grad_scale=64.0)
    got = to_host(dev["w"])
    if pdt.itemsize == 2:
        _assert_within_16_bit_ulps(got, host["w"])
    else:
        # float32 params: equal to float32 rounding, except where a 16-bit state rounded the
        # other way on one side (a fused multiply-add moved the value before rounding by an
        # ulp); such a flip changes that step's update by about lr·2^-8 relative to it
        flips = ~np.isclose(got, host["w"], rtol=1e-5, atol=1e-6)
        assert flips.mean() < 0.01, f"{flips.mean():.4f} of the elements differ"
        atol = 1e-6 if "state_dtype" not in kw else len(grads) * 1e-3 * 2**-6
        np.testing.assert_allclose(got, host["w"], rtol=1e-5, atol=atol)
    assert cpu.state["w"].keys() == gpu.state["w"].keys()
    for s, a in cpu.state["w"].items():
        b = to_host(gpu.state["w"][s])
        assert b.dtype == a.dtype, s
        if a.dtype.itemsize == 2:
            _assert_close_16_bit_state(b, a, what=s)
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=s)


def _assert_close_16_bit_state(got, want, what):
    """A 16-bit state slot: within 4 of its ulps (a rounding flipped on one side in some of
    the steps) of the larger magnitude, plus 2 ulps of the slot's rms where a moment cancels
    near zero (there an ulp count is meaningless: +1e-7 and -1e-7 are 26,000 bfloat16 ulps
    apart); the elements that differ at all under 1 %."""
    g, w = (np.asarray(x).astype(np.float64) for x in (got, want))
    eps = 2.0**-7 if got.dtype == BF16 else 2.0**-10  # an ulp, relative, at most
    rms = float(np.sqrt(np.mean(w * w)))
    tol = 4 * eps * np.maximum(np.abs(g), np.abs(w)) + 2 * eps * rms
    worst = float(np.max(np.abs(g - w) - tol))
    assert worst <= 0, f"{what}: off by {worst:.3g} beyond the tolerance"
    assert (g != w).mean() < 0.01, f"{what}: {(g != w).mean():.4f} of the elements differ"


def _assert_within_16_bit_ulps(got, want, what="param"):
    """At most 2 ulps of the 16-bit dtype apart, and in under 1 % of the elements."""
    d = _ulps16(got, want)
    assert d.max() <= 2 and (d > 0).mean() < 0.01, f"{what}: {d.max()} ulps, {(d > 0).mean():.4f}"


def test_torch_bf16_cuda_tensors_are_stepped_in_place():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    w = torch.randn(4097, device="cuda").to(torch.bfloat16)
    ptr, before = w.data_ptr(), w.clone()
    opt = fastopt.SGD(lr=0.5, backend="cupy")
    assert opt.update({"w": w}, {"w": torch.ones_like(w)})
    torch.cuda.synchronize()
    assert w.data_ptr() == ptr
    want = (before.float() - 0.5).to(torch.bfloat16)
    assert torch.equal(w, want)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_whole_step_captured_in_a_cuda_graph(backend):
    """AdamW, bfloat16 params with an fp32 master, float32 grads scaled by 2**10, a device
    grad scale and found-inf flag: two eager warm-up steps, then one step captured and replayed
    four times (new gradients each time, lr halved before the third replay, found_inf set for
    the second). An eager twin steps alike; params, master, state and step counts match."""
    import cupy

    n, rng = (1 << 18) + 3, np.random.default_rng(1)
    p0 = rng.standard_normal(n).astype(BF16)
    grads = [(rng.standard_normal(n) * 1024).astype(np.float32) for _ in range(6)]
    flags = [0, 0, 0, 1, 0, 0]
    kw = dict(lr=1e-3, weight_decay=0.01, capturable=True, master_weights=True, backend=backend)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        scale = cupy.full(1, 1024.0, cupy.float32)
        flag = cupy.zeros(1, cupy.float32)
        buf = fastopt.FlatBuffer({"w": cupy.asarray(p0)}, grad_dtype="float32")
        opt = fastopt.AdamW(**kw)
        twin = {"w": cupy.asarray(p0)}
        topt = fastopt.AdamW(**kw)
        for g in grads[:2]:  # warm-up: kernels compiled, state and device scalars created
            buf.grads["w"][...] = cupy.asarray(g)
            assert opt.step(buf, grad_scale=scale, found_inf=flag)
            topt.update(twin, {"w": cupy.asarray(g)}, grad_scale=scale, found_inf=flag)
        stream.begin_capture()
        opt.step(buf, grad_scale=scale, found_inf=flag)
        graph = stream.end_capture()
        for t, g in enumerate(grads[2:], start=2):
            buf.grads["w"][...] = cupy.asarray(g)
            flag.fill(flags[t])
            if t == 4:
                opt.lr = topt.lr = 5e-4  # written into device memory: the replay sees it
            graph.launch(stream)
            topt.update(twin, {"w": cupy.asarray(g)}, grad_scale=scale, found_inf=flag)
    stream.synchronize()
    assert opt.step_count == topt.step_count == 5  # six steps, one skipped on the device
    assert np.array_equal(
        to_host(buf.params["w"]).view(np.uint16), to_host(twin["w"]).view(np.uint16)
    )
    for s, a in topt.state["w"].items():
        assert np.array_equal(to_host(opt.state["w"][s]), to_host(a)), s
    # and the eager capturable steps agree with the host-scalar path
    ref = {"w": cupy.asarray(p0)}
    hopt = fastopt.AdamW(**dict(kw, capturable=False))
    for t, g in enumerate(grads):
        hopt.lr = 5e-4 if t >= 4 else 1e-3
        hopt.update(ref, {"w": cupy.asarray(g)}, grad_scale=1024.0, found_inf=float(flags[t]))
    assert _ulps16(to_host(ref["w"]), to_host(twin["w"])).max() <= 1


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_device_grad_scale_and_found_inf_without_capturable(backend):
    """Device scalars on a non-capturable optimizer: the scale is read in the kernel, the flag
    once on the host (the step count lives there); the result is the host values' one."""
    import cupy

    rng = np.random.default_rng(2)
    p0 = rng.standard_normal(4099).astype(np.float32)
    g = (rng.standard_normal(4099) * 256).astype(np.float32)
    a, b = {"w": to_device(p0)}, {"w": to_device(p0)}
    oa, ob = fastopt.Adam(lr=0.01, backend=backend), fastopt.Adam(lr=0.01, backend=backend)
    scale, flag = cupy.full(1, 256.0, cupy.float32), cupy.zeros(1, cupy.float32)
    assert oa.update(a, {"w": to_device(g)}, grad_scale=scale, found_inf=flag)
    assert ob.update(b, {"w": to_device(g)}, grad_scale=256.0, found_inf=0.0)
    flag.fill(1)
    assert not oa.update(a, {"w": to_device(g)}, grad_scale=scale, found_inf=flag)
    assert oa.step_count == ob.step_count == 1
    np.testing.assert_array_equal(to_host(a["w"]), to_host(b["w"]))


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_remainder_master_is_the_fp32_master_on_the_device(backend):
    """``master_weights="remainder"`` on the device: the bfloat16 param and its int16
    remainder hold, bit for bit, the fp32 master the same backend keeps with
    ``master_weights=True`` over the same gradients (the same rule, the same compiler); the
    params differ exactly where that master sits on a tie above an even bfloat16 (one unit
    further from zero); and the master is within float32 rounding of the CPU loop's."""
    from fastopt import precision

    n, rng = (1 << 20) + 7, np.random.default_rng(4)
    p0 = rng.standard_normal(n).astype(BF16)
    grads = [rng.standard_normal(n).astype(BF16) for _ in range(4)]
    dev_m, dev_r, host = {"w": to_device(p0)}, {"w": to_device(p0)}, {"w": p0.copy()}
    fp32 = fastopt.AdamW(lr=1e-2, backend=backend, master_weights=True)
    rem = fastopt.AdamW(lr=1e-2, backend=backend, master_weights="remainder")
    cpu = fastopt.AdamW(lr=1e-2, backend="numba", master_weights="remainder")
    for g in grads:
        fp32.update(dev_m, {"w": to_device(g)})
        rem.update(dev_r, {"w": to_device(g)})
        cpu.update(host, {"w": g})
        master = to_host(fp32.state["w"]["master_param"])
        joined = precision.join_master(
            to_host(dev_r["w"]), to_host(rem.state["w"]["master_remainder"])
        )
        assert np.array_equal(joined.view(np.uint32), master.view(np.uint32))
        u = master.view(np.uint32)
        tie = ((u & 0xFFFF) == 0x8000) & (((u >> 16) & 1) == 0)
        pr, pm = (to_host(d["w"]).view(np.uint16) for d in (dev_r, dev_m))
        assert np.array_equal(pr != pm, tie)
        assert np.all(pr[tie] == pm[tie] + 1)
    want = precision.join_master(host["w"], cpu.state["w"]["master_remainder"])
    np.testing.assert_allclose(joined, want, rtol=1e-5, atol=1e-6)
