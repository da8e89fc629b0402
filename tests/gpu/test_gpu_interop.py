"""Arrays from anywhere, on the GPU: updated in place, state on their device, clear errors.

PyTorch CUDA tensors, Numba device arrays and CuPy arrays (also on a non-default stream) are
stepped without a copy (the data pointer is unchanged and the values match the oracle);
``FlatBuffer`` built from device arrays lives on the GPU; mixing host and device arrays, or
two GPUs, is refused before anything changes.
"""

import numpy as np
import pytest
from gpu_common import gpu_backend_params, needs_gpu, to_device, to_host
from support.oracle import run_oracle
from support.tolerances import assert_close

import fastopt

pytestmark = needs_gpu

N = 10_007
KW = {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}
STEPS = 3


def _inputs(seed, dtype=np.float32):
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(N).astype(dtype)
    grads = [rng.standard_normal(N).astype(dtype) for _ in range(STEPS)]
    return p0, grads


def _check(p_host, state, p0, grads, dtype=np.float32):
    ref_p, ref_state = run_oracle("Adam", KW, p0, grads)
    assert_close(p_host, ref_p, dtype, "param")
    for s, ref in ref_state.items():
        assert_close(to_host(state[s]).reshape(-1), ref, dtype, f"state {s}")


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_torch_cuda_tensor_updated_in_place(backend):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    import cupy

    p0, grads = _inputs(1)
    p = torch.tensor(p0, device="cuda")
    ptr = p.data_ptr()
    opt = fastopt.Adam(**KW, backend=backend)
    for g in grads:
        opt.update({"w": p}, {"w": torch.tensor(g, device="cuda")})
    torch.cuda.synchronize()
    assert p.data_ptr() == ptr and p.device.type == "cuda"
    for s, a in opt.state["w"].items():
        assert isinstance(a, cupy.ndarray) and a.device.id == p.device.index, s
    _check(p.cpu().numpy(), opt.state["w"], p0, grads)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_torch_cuda_parameter_updated_in_place(backend):
    # a parameter that requires grad is stepped through a detached view (no-grad semantics,
    # as torch.optim); a dtype fastopt does not step is refused naming the parameter
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    p0, grads = _inputs(9)
    p = torch.nn.Parameter(torch.tensor(p0, device="cuda"))
    ptr = p.data_ptr()
    opt = fastopt.Adam(**KW, backend=backend)
    for g in grads:
        opt.update({"w": p}, {"w": torch.tensor(g, device="cuda", requires_grad=True)})
    torch.cuda.synchronize()
    assert p.data_ptr() == ptr and p.requires_grad
    _check(p.detach().cpu().numpy(), opt.state["w"], p0, grads)
    bad = torch.zeros(4, device="cuda", dtype=torch.int32)  # bfloat16 is stepped (test_gpu_mixed)
    with pytest.raises(TypeError, match="parameter 'b'.*torch.int32"):
        fastopt.Adam(backend=backend).update({"b": bad}, {"b": bad.clone()})


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_nonfinite_values_like_the_oracle_on_the_gpu(backend):
    # centered RMSProp whose grad_avg**2 overflows stays finite (a fused multiply-add), and
    # AMSGrad's max propagates NaN from either operand (CUDA's max would drop it)
    n = 8
    out = {}
    for be in ("numpy", backend):
        dev = be != "numpy"
        w = np.linspace(1, 2, n).astype(np.float32)
        p = to_device(w) if dev else w
        opt = fastopt.RMSProp(lr=0.01, centered=True, backend=be)
        for _ in range(250):
            g = np.full(n, 1e20, np.float32)
            opt.update({"w": p}, {"w": to_device(g) if dev else g})
        out[be] = to_host(p) if dev else p
    assert np.isfinite(out[backend]).all()
    np.testing.assert_allclose(out[backend], out["numpy"], rtol=1e-5)
    for be in ("numpy", backend):
        dev = be != "numpy"
        w = np.linspace(-1, 1, n).astype(np.float32)
        p = to_device(w) if dev else w
        opt = fastopt.Adam(lr=0.1, amsgrad=True, backend=be)
        ones = np.ones(n, np.float32)
        opt.update({"w": p}, {"w": to_device(ones) if dev else ones})
        opt.state["w"]["max_exp_avg_sq"][1] = np.nan
        opt.state["w"]["exp_avg_sq"][2] = np.nan
        g = ones.copy()
        g[3] = np.nan
        opt.update({"w": p}, {"w": to_device(g) if dev else g})
        out[be] = (to_host(p) if dev else p, to_host(opt.state["w"]["max_exp_avg_sq"]))
    for a, b in zip(out[backend], out["numpy"]):
        assert np.array_equal(np.isnan(a), np.isnan(b)) and np.isnan(a[1:4]).all()


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_numba_device_array_updated_in_place(backend):
    from numba import cuda

    p0, grads = _inputs(2)
    p = cuda.to_device(p0)
    ptr = p.__cuda_array_interface__["data"][0]
    opt = fastopt.Adam(**KW, backend=backend)
    for g in grads:
        opt.update({"w": p}, {"w": cuda.to_device(g)})
    cuda.synchronize()
    assert p.__cuda_array_interface__["data"][0] == ptr
    _check(p.copy_to_host(), opt.state["w"], p0, grads)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_functional_on_torch_tensors_directly(backend):
    # the functional layer hands producers' arrays straight to the backend (no CuPy view first)
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    from fastopt import functional as F

    p0, grads = _inputs(3)
    p = torch.tensor(p0, device="cuda")
    st = {s: torch.zeros_like(p) for s in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    for t, g in enumerate(grads, start=1):
        F.adam(
            p,
            torch.tensor(g, device="cuda"),
            st["exp_avg"],
            st["exp_avg_sq"],
            st["max_exp_avg_sq"],
            step=t,
            lr=KW["lr"],
            weight_decay=KW["weight_decay"],
            amsgrad=True,
            backend=backend,
        )
    torch.cuda.synchronize()
    _check(p.cpu().numpy(), {s: a.cpu().numpy() for s, a in st.items()}, p0, grads)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_cupy_non_default_stream_is_ordered(backend):
    # launches go on CuPy's current stream: the gradient written on that stream just before the
    # step is the one the step reads, with no synchronisation in between
    import cupy

    p0, grads = _inputs(4)
    opt = fastopt.Adam(**KW, backend=backend)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        p = cupy.asarray(p0)
        g = cupy.empty_like(p)
        for gh in grads:
            g.set(gh, stream=stream)
            g *= 1  # device work queued on the stream right before the step
            opt.update({"w": p}, {"w": g})
        host = cupy.asnumpy(p, stream=stream)
    stream.synchronize()
    _check(host, opt.state["w"], p0, grads)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_flat_buffer_from_cupy_arrays_lives_on_the_gpu(backend):
    import cupy

    rng = np.random.default_rng(5)
    shapes = {"w1": (64, 33), "b1": (33,), "w2": (33, 7)}
    host = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    buf = fastopt.FlatBuffer({k: to_device(v) for k, v in host.items()})
    assert isinstance(buf.data, cupy.ndarray) and isinstance(buf.grad, cupy.ndarray)
    assert all(isinstance(v, cupy.ndarray) for v in buf.params.values())
    opt = fastopt.Adam(**KW, backend=backend)
    grads = [
        {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        for _ in range(STEPS)
    ]
    for gs in grads:
        for k, g in gs.items():
            buf.grads[k][...] = to_device(g)
        opt.step(buf)
    for k, p0 in host.items():
        assert isinstance(opt.state[k]["exp_avg"], cupy.ndarray)
        ref_p, ref_state = run_oracle(
            "Adam", KW, p0.reshape(-1), [gs[k].reshape(-1) for gs in grads]
        )
        assert_close(to_host(buf.params[k]).reshape(-1), ref_p, np.float32, f"param {k}")
        for s, ref in ref_state.items():
            assert_close(to_host(opt.state[k][s]).reshape(-1), ref, np.float32, f"{s} of {k}")


def test_auto_picks_cupy_for_device_arrays():
    from fastopt.backends import resolve

    assert resolve("auto", to_device(np.ones(3, np.float32))).NAME == "cupy"


@pytest.mark.parametrize("backend", gpu_backend_params() + ["auto"])
def test_host_and_device_mixed_is_refused_before_any_change(backend):
    p0, grads = _inputs(6)
    a, b = to_device(p0), p0.copy()
    opt = fastopt.Adam(**KW, backend=backend)
    with pytest.raises(ValueError, match="host"):
        opt.update({"a": a, "b": b}, {"a": to_device(grads[0]), "b": grads[0].copy()})
    assert opt.step_count == 0 and not opt.state
    np.testing.assert_array_equal(to_host(a), p0)
    np.testing.assert_array_equal(b, p0)
    with pytest.raises(ValueError, match="host"):  # a host grad for a device param
        opt.update({"a": a}, {"a": grads[0].copy()})
    assert opt.step_count == 0
    np.testing.assert_array_equal(to_host(a), p0)


def test_numba_cuda_refuses_host_arrays():
    if "numba-cuda" not in fastopt.available_backends():
        pytest.skip("backend 'numba-cuda' is not available here")
    from fastopt import functional as F

    p = np.ones(4, np.float32)
    with pytest.raises(TypeError, match="host"):
        F.sgd(p, np.ones(4, np.float32), step=1, lr=0.1, backend="numba-cuda")
    np.testing.assert_array_equal(p, 1)


def test_two_devices_are_refused_before_any_change():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    p0, grads = _inputs(7)
    with cupy.cuda.Device(0):
        a, ga = to_device(p0), to_device(grads[0])
    with cupy.cuda.Device(1):
        b, gb = to_device(p0), to_device(grads[0])
    opt = fastopt.Adam(**KW)
    with pytest.raises(ValueError, match="cuda:0.*cuda:1|cuda:1.*cuda:0"):
        opt.update({"a": a, "b": b}, {"a": ga, "b": gb})
    assert opt.step_count == 0 and not opt.state
    np.testing.assert_array_equal(to_host(a), p0)
    np.testing.assert_array_equal(to_host(b), p0)


def test_state_lives_on_the_params_device():
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    p0, grads = _inputs(8)
    with cupy.cuda.Device(1):
        p, g = to_device(p0), to_device(grads[0])
    opt = fastopt.Adam(**KW)
    with cupy.cuda.Device(0):  # another device is current: state must still go to cuda:1
        opt.update({"w": p}, {"w": g})
    assert all(a.device.id == 1 for a in opt.state["w"].values())
    _check(to_host(p), opt.state["w"], p0, grads[:1])


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_torch_parameters_that_require_grad(backend):
    """nn.Parameter (requires_grad) is updated in place, as torch.optim does under no_grad."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    p0, grads = _inputs(9)
    p = torch.nn.Parameter(torch.tensor(p0, device="cuda"))
    ptr = p.data_ptr()
    opt = fastopt.Adam(**KW, backend=backend)
    for g in grads:
        p.grad = torch.tensor(g, device="cuda")
        opt.update({"w": p}, {"w": p.grad})
    torch.cuda.synchronize()
    assert p.data_ptr() == ptr and p.requires_grad
    _check(p.detach().cpu().numpy(), opt.state["w"], p0, grads)
    # the functional API takes them too
    from fastopt import functional as F

    q = torch.nn.Parameter(torch.ones(1000, device="cuda"))
    F.sgd(q, torch.full((1000,), 0.5, device="cuda"), step=1, lr=0.1, backend=backend)
    torch.cuda.synchronize()
    assert torch.all(q.detach() == 0.95)


@pytest.mark.parametrize("backend", gpu_backend_params())
def test_functional_orders_on_torchs_current_stream(backend):
    """A torch tensor stepped through the functional API on a side stream: the step must run
    after the work queued before it on that stream and before the work queued after it. A long
    sleep kernel ahead of the gradient's write would expose a launch on any other stream."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("PyTorch has no CUDA here")
    from fastopt import functional as F

    n = 1 << 22
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        p = torch.ones(n, device="cuda")
        g = torch.zeros(n, device="cuda")
        torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time on the side stream
        g.fill_(0.5)
        F.sgd(p, g, step=1, lr=0.1, backend=backend)
        after = p * 2  # queued on the side stream after the step
    torch.cuda.synchronize()
    assert torch.all(p == 0.95), "the step did not see the gradient written before it"
    assert torch.all(after == 1.9), "work after the step did not see its result"
