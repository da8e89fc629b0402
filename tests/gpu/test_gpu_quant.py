"""Quantized state (``state_dtype="int8"`` / ``"float8_e4m3"`` / ``"int4"``) on a real GPU
(``-m gpu``; skipped without one). The kernels' math is proven on the CPU (the g++ harness runs
the CuPy kernel's CUDA C and the simulator the numba-cuda kernel, bit for bit against the
float32 step then the oracle's quantization); what only a GPU confirms:

- both GPU backends' quantized steps on device arrays of real size (many blocks, a short
  last one) against the NumPy oracle from the same state, step by step: params within
  float32 rounding, scales within float32 rounding, and a code different only where a value
  sits on a threshold (one code apart, under 1 % of them; int4's packed codes compared per
  element, a thread per byte of them on the GPU; the tolerances the CPU backend is
  held to against the oracle): the oracle's float32 math rounds differently, and the GPU
  compilers contract the rule's multiply-adds into fused ones, as for float32 state;
- the optimizer classes over two tensors (the dict API; the byte formats) and a ``FlatBuffer``
  (a block table of both parameters; int8 and int4) against the oracle the same way;
- against bitsandbytes' 8-bit blockwise Adam (``bnb.optim.Adam8bit``, when ``bitsandbytes``
  imports): one step from the same codes and scales, the same maps and block size; its
  quantizer is not exact nearest (``tests/test_quant_reference.py``) and its update rounds
  differently, so codes agree up to one step of the map and params to a small fraction of
  the update.
"""

import numpy as np
import pytest
from fastopt.kernels import quant
from gpu_common import gpu_backend_params, needs_gpu, to_device, to_host

import fastopt
from fastopt import _quantized as Q
from fastopt import functional as F

pytestmark = needs_gpu
FORMATS = quant.ALL_FORMATS
#: the optimizer classes' formats: the byte formats (int4's step is the functional one's
#: kernel, and its FlatBuffer layout ``test_flat_buffer_matches_the_oracle``'s)
CLASS_FORMATS = quant.FORMATS
#: the reference: the NumPy oracle (``quant_reference.oracle_step``: no compilation on the GPU
#: machine), within the tolerances the CPU backend is held to against it
#: (``tests/test_quant_numba.py``)
REF = "numpy"


def _close_codes(a, b, fmt, qm, absmax, n, what):
    """Codes of one step from the same state: equal but where a value sits on a threshold
    (one code apart, or one float8 value apart, under 1 % of them; ``n`` elements, a packed
    format's codes unpacked first)."""
    if fmt in quant.PACKED:
        a, b = Q.unpack(a, n), Q.unpack(b, n)
    if quant.table(fmt, qm).signmag:
        va, vb = Q.dequantize(a, absmax, fmt, qm), Q.dequantize(b, absmax, fmt, qm)
        d = (va != vb).astype(int)
    else:
        d = np.abs(a.astype(int) - b.astype(int))
    assert d.max() <= 1 and np.count_nonzero(d) <= 0.01 * n, (what, d.max(), np.count_nonzero(d))


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("fmt", FORMATS)
def test_functional_step_matches_the_oracle(backend, fmt):
    n, rng = (1 << 18) + 77, np.random.default_rng(1)  # 1025 blocks, the last of 77
    p = rng.standard_normal(n).astype(np.float32)
    m = Q.quantize(rng.standard_normal(n).astype(np.float32) * 0.1, fmt, "signed")
    v = Q.quantize(np.abs(rng.standard_normal(n)).astype(np.float32) * 0.01, fmt, "unsigned")
    mx = Q.quantize(np.abs(rng.standard_normal(n)).astype(np.float32) * 0.02, fmt, "unsigned")
    hp = dict(lr=1e-3, weight_decay=0.01, amsgrad=True)
    for t in range(1, 3):
        g = rng.standard_normal(n).astype(np.float32)
        dev = [to_device(p), to_device(g)] + [(to_device(a), to_device(b)) for a, b in (m, v, mx)]
        F.adam(*dev, step=t, state_dtype=fmt, backend=backend, **hp)
        F.adam(p, g, m, v, mx, step=t, state_dtype=fmt, backend=REF, **hp)
        np.testing.assert_allclose(to_host(dev[0]), p, rtol=2e-5, atol=2e-6)
        for (c, a), pair, qm in zip(dev[2:], (m, v, mx), ("signed", "unsigned", "unsigned")):
            np.testing.assert_allclose(to_host(a), pair[1], rtol=1e-5)
            _close_codes(to_host(c), pair[0], fmt, qm, pair[1], n, (backend, fmt, t))


def _sync(gpu, cpu):
    """The CPU optimizer's state onto the GPU optimizer's (one trajectory for both)."""
    for name, st in cpu.state.items():
        for s, a in st.items():
            if hasattr(gpu.state[name][s], "shape") and np.ndim(a):
                gpu.state[name][s][...] = to_device(np.asarray(a))


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("fmt", CLASS_FORMATS)
def test_optimizer_classes_match_the_oracle(backend, fmt):
    rng = np.random.default_rng(2)
    shapes = {"w": (300, 513), "b": (300,)}
    host = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    dev = {k: to_device(a) for k, a in host.items()}
    cpu = fastopt.AdamW(lr=1e-3, state_dtype=fmt, backend=REF)
    gpu = fastopt.AdamW(lr=1e-3, state_dtype=fmt, backend=backend)
    for t in range(2):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
        if t:
            _sync(gpu, cpu)
            for k in dev:
                dev[k][...] = to_device(host[k])
        cpu.update(host, grads)
        gpu.update(dev, {k: to_device(g) for k, g in grads.items()})
        for k in shapes:
            np.testing.assert_allclose(to_host(dev[k]), host[k], rtol=2e-5, atol=2e-6)
            for s in ("exp_avg", "exp_avg_sq"):
                qm = "signed" if s == "exp_avg" else "unsigned"
                c, a = Q.names_of(s)
                want_a = np.asarray(cpu.state[k][a])
                np.testing.assert_allclose(to_host(gpu.state[k][a]), want_a, rtol=1e-5)
                got_c = to_host(gpu.state[k][c]).reshape(-1)
                want_c = np.asarray(cpu.state[k][c]).reshape(-1)
                _close_codes(got_c, want_c, fmt, qm, want_a, host[k].size, (k, s, t))


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_flat_buffer_matches_the_oracle(backend, fmt):
    """A ``FlatBuffer`` group of two parameters (each one's blocks from its own offset: the
    block table; int4's codes from the offset's byte) on the GPU against the same on the CPU,
    one step from a fresh state: params, scales and codes."""
    import cupy

    rng = np.random.default_rng(3)
    shapes = {"w": (700, 3), "b": (300,)}
    vals = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    bufs = {
        where: fastopt.FlatBuffer({k: xp.asarray(v) for k, v in vals.items()})
        for where, xp in (("cpu", np), ("gpu", cupy))
    }
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    opts = {
        "cpu": fastopt.Adam(lr=1e-2, state_dtype=fmt, backend=REF),
        "gpu": fastopt.Adam(lr=1e-2, state_dtype=fmt, backend=backend),
    }
    for where, xp in (("cpu", np), ("gpu", cupy)):
        for k, g in grads.items():
            bufs[where].grads[k][...] = xp.asarray(g)
        opts[where].step(bufs[where])
    for k in shapes:
        np.testing.assert_allclose(
            to_host(bufs["gpu"].params[k]), bufs["cpu"].params[k], rtol=2e-5, atol=2e-6
        )
        for s, qm in (("exp_avg", "signed"), ("exp_avg_sq", "unsigned")):
            c, a = Q.names_of(s)
            want_a = np.asarray(opts["cpu"].state[k][a])
            np.testing.assert_allclose(to_host(opts["gpu"].state[k][a]), want_a, rtol=1e-5)
            got_c = to_host(opts["gpu"].state[k][c]).reshape(-1)
            want_c = np.asarray(opts["cpu"].state[k][c]).reshape(-1)
            n = int(np.prod(shapes[k]))
            _close_codes(got_c, want_c, fmt, qm, want_a, n, (k, s))


def test_against_bitsandbytes_adam8bit():
    """One step of ``bnb.optim.Adam8bit`` and of fastopt's Adam with ``state_dtype="int8"``
    from the same codes and scales (bitsandbytes' own state after a first step), on the
    CuPy backend over the same CUDA memory."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA GPU")
    n = 1 << 16
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, device="cuda", generator=gen)
    param = torch.nn.Parameter(w.clone())
    opt = bnb.optim.Adam8bit([param], lr=1e-3, betas=(0.9, 0.999), eps=1e-8, block_wise=True)
    for _ in range(2):  # the state of step 2: both moments non-trivial
        param.grad = torch.randn(n, device="cuda", generator=gen)
        opt.step()
    st = opt.state[param]
    codes1, absmax1 = st["state1"].clone(), st["absmax1"].clone().float()
    codes2, absmax2 = st["state2"].clone(), st["absmax2"].clone().float()
    if codes1.dtype != torch.uint8 or absmax1.numel() != quant.nblocks(n):
        pytest.skip(f"bitsandbytes keeps another layout ({codes1.dtype}, {absmax1.numel()})")
    p0 = param.detach().clone()
    g = torch.randn(n, device="cuda", generator=gen)
    param.grad = g.clone()
    opt.step()
    mine = p0.clone()
    m, v = (codes1.clone(), absmax1.clone()), (codes2.clone(), absmax2.clone())
    F.adam(mine, g, m, v, step=3, lr=1e-3, state_dtype="int8", backend="cupy")
    upd_b = (param.detach() - p0).cpu().numpy()
    upd_f = (mine - p0).cpu().numpy()
    # the same update to within a small fraction of its size for all but a few elements
    off = np.abs(upd_f - upd_b) > 0.05 * np.abs(upd_b) + 1e-6
    assert np.count_nonzero(off) <= 0.01 * n, np.count_nonzero(off)
    for mine_c, key in ((m[0], "state1"), (v[0], "state2")):
        d = np.abs(mine_c.cpu().numpy().astype(int) - st[key].cpu().numpy().astype(int))
        assert np.count_nonzero(d > 1) <= 0.005 * n and np.count_nonzero(d) <= 0.1 * n, key
