"""Multi-tensor launches on a real GPU (``-m gpu``; skipped without one).

What only a GPU can confirm, the kernels' indexing and math being proven on the CPU
(``tests/test_multi_tensor_cuda.py``): the multi-tensor kernels as CuPy compiles and launches
them over CUDA tensors of a transformer's ~200-tensor list (``bench.measure.transformer_shapes``,
some views misaligned on purpose) agree with one single-tensor launch per tensor; the global
norm and the in-step clipping agree with torch's ``GradScaler.unscale_`` +
``clip_grad_norm_`` + a fused ``Adam`` step; the whole clipped step (norm and update) can be
captured in a CUDA graph and replayed, so nothing in it synchronises with the host.
"""

import dataclasses

import numpy as np
import pytest
from fastopt.kernels import RULES
from fastopt.kernels.storage import IO
from gpu_common import needs_gpu

import fastopt
from fastopt.bench.measure import transformer_shapes

pytestmark = needs_gpu
torch = pytest.importorskip("torch")
_AVAIL = set(fastopt.available_backends())

N_LIST = (1 << 20) + 3  # transformer_shapes: 196 tensors, the last a 1-D tail
ADAMW = dict(lr=1e-3, weight_decay=0.01, decoupled_weight_decay=True)
TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cuda(backend="cupy"):
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA here")
    from fastopt.backends import get_backend

    return get_backend(backend)


def _hp(rule, hp):
    return RULES[rule].validate(dict(RULES[rule].defaults, **hp))


def _list(io, gen, misaligned=()):
    """The 196 tensors of the list as ``(param, grad, slots, master)`` under ``io``; the
    tensors numbered in ``misaligned`` are views one element into a larger buffer."""
    shapes = transformer_shapes(N_LIST)
    out = []
    for i, shape in enumerate(shapes):
        n = int(np.prod(shape))

        def make(kind, values, n=n, off=int(i in misaligned)):
            buf = torch.empty(n + off, dtype=TORCH[kind], device="cuda")
            t = buf[off:]
            t.copy_(values)
            return t

        p = torch.randn(n, generator=gen, device="cuda")
        g = torch.randn(n, generator=gen, device="cuda") * 64
        m = torch.randn(n, generator=gen, device="cuda") * 0.1
        v = torch.rand(n, generator=gen, device="cuda") * 0.01
        param = make(io.param, p)
        slots = [make(io.state, m), make(io.state, v), None]
        master = make("float32", param.float()) if io.master else None
        out.append((param, make(io.grad, g), slots, master))
    return out


def _clone(tensors):
    def c(x):
        return None if x is None else x.clone()

    return [(c(p), c(g), [c(s) for s in sl], c(m)) for p, g, sl, m in tensors]


def _ulps16(a, b):
    o = [x.view(torch.int16).long() for x in (a, b)]
    o = [torch.where(x < 0, -(x & 0x7FFF), x) for x in o]
    return (o[0] - o[1]).abs()


BF16_MASTER = IO("bfloat16", "bfloat16", "float32", True, scale="host")


@pytest.mark.parametrize(
    "backend,io",
    [
        pytest.param("cupy", IO(), id="cupy-float32"),
        pytest.param("cupy", BF16_MASTER, id="cupy-bf16-master-scaled"),
        pytest.param(
            "numba-cuda",
            BF16_MASTER,
            id="numba-cuda-bf16-master-scaled",
            marks=pytest.mark.skipif(
                "numba-cuda" not in _AVAIL, reason="numba-cuda is not available here"
            ),
        ),
    ],
)
def test_multi_tensor_launch_equals_per_tensor_launches(backend, io):
    """AdamW over the 196-tensor list, three steps: one multi-tensor launch per step against
    one single-tensor launch per tensor (the same element body), params, state and master
    copies equal to within a rounding (the two kernels may contract multiply-adds apart)."""
    cb = _cuda(backend)
    from fastopt._arrays import as_xp_array

    gen = torch.Generator(device="cuda").manual_seed(0)
    a = _list(io, gen, misaligned={3, 17, 100})
    b = _clone(a)
    hp = _hp("adam", ADAMW)
    table = cb.tensor_table("adam", io, a)
    assert len(a) == 196 and table.nchunks > 196
    inv = {"inv_scale": 1 / 64} if io.scale else {}
    stream = torch.cuda.current_stream().cuda_stream
    for step in (1, 2, 3):
        flags, k = RULES["adam"].variant_and_scalars(hp, step, None)
        cb.launch_table("adam", flags, io, table, k, extras=inv, stream=stream)
        for p, g, sl, m in b:
            views = [as_xp_array(x) for x in (p, g, *sl[:2])]
            cb.launch_mixed(
                "adam",
                flags,
                views[0],
                views[1],
                (views[2], views[3], None),
                k,
                io,
                None if m is None else as_xp_array(m),
                inv,
            )
    torch.cuda.synchronize()
    for i, ((p, _, sl, m), (q, _, tl, n)) in enumerate(zip(a, b)):
        if io.param == "bfloat16":
            assert _ulps16(p, q).max() <= 1, f"tensor {i} param"
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=f"tensor {i} param")
        for x, y in zip(sl[:2] + [m] * (m is not None), tl[:2] + [n] * (n is not None)):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7, msg=f"tensor {i} state")


def _torch_reference(params0, grads, max_norm, scale):
    """torch: GradScaler.unscale_ + clip_grad_norm_ + fused Adam, per step; (params, state,
    norms)."""
    params = [torch.nn.Parameter(p.clone()) for p in params0]
    opt = torch.optim.AdamW(params, lr=ADAMW["lr"], weight_decay=ADAMW["weight_decay"], fused=True)
    scaler = torch.amp.GradScaler("cuda", init_scale=scale, growth_interval=1000)
    norms = []
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g * scale  # what scaler.scale(loss).backward() leaves
        scaler.unscale_(opt)
        norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm))
        scaler.step(opt)
        scaler.update()
    return params, opt, norms


def test_clipping_inside_the_step_equals_torch():
    """fp32 params of the 196-tensor list, loss scale 2^10 on the device, max_norm chosen to
    clip: three steps of GradNorm + a clipped launch against torch's unscale_ +
    clip_grad_norm_ + fused AdamW: the norms, params and both moments within float32
    rounding. A set found-inf flag then changes nothing."""
    cb = _cuda()
    gen = torch.Generator(device="cuda").manual_seed(1)
    io = IO(scale="device", found_inf=True)
    scale = 1024.0
    tensors = _list(IO(), gen)
    params0 = [p.clone() for p, _, _, _ in tensors]
    for _, _, sl, _ in tensors:  # fresh state, as torch's first step creates it
        for s in sl[:2]:
            s.zero_()
    grads = [
        [torch.randn(p.shape, generator=gen, device="cuda") for p in params0] for _ in range(3)
    ]
    total = float(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads[0]])))
    max_norm = 0.25 * total
    ref, ropt, rnorms = _torch_reference(params0, grads, max_norm, scale)
    table = cb.tensor_table("adam", io, tensors)
    norm = cb.GradNorm([table], scale="device")
    gscale = torch.full((), scale, device="cuda")
    found = torch.zeros((), device="cuda")
    hp = _hp("adam", ADAMW)
    stream = torch.cuda.current_stream().cuda_stream
    for step, gs in enumerate(grads, start=1):
        for (_, g, _, _), x in zip(tensors, gs):
            g.copy_(x * scale)
        norm(max_norm, {"scale": gscale}, stream=stream)
        flags, k = RULES["adam"].variant_and_scalars(hp, step, None)
        extras = {"scale": gscale, "found_inf": found}
        cb.launch_table(
            "adam", flags, io, table, k, extras, clip=norm.coef("float32"), stream=stream
        )
        got = float(norm.out[0].get())
        assert abs(got - float(rnorms[step - 1])) <= 1e-5 * float(rnorms[step - 1])
    torch.cuda.synchronize()
    for i, ((p, _, sl, _), q) in enumerate(zip(tensors, ref)):
        st = ropt.state[q]
        torch.testing.assert_close(p, q.detach(), rtol=1e-5, atol=1e-6, msg=f"param {i}")
        torch.testing.assert_close(sl[0], st["exp_avg"], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(sl[1], st["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    before = [p.clone() for p, _, _, _ in tensors]
    found.fill_(1.0)
    flags, k = RULES["adam"].variant_and_scalars(hp, 4, None)
    norm(max_norm, {"scale": gscale}, stream=stream)
    cb.launch_table(
        "adam",
        flags,
        io,
        table,
        k,
        {"scale": gscale, "found_inf": found},
        clip=norm.coef("float32"),
        stream=stream,
    )
    torch.cuda.synchronize()
    assert all(torch.equal(p, b) for (p, _, _, _), b in zip(tensors, before))


def test_clipped_step_is_captured_in_a_cuda_graph():
    """The norm and the clipped bf16 + master update of the list, capturable (scalars, loss
    scale and found-inf flag in device memory), captured once with torch.cuda.graph and
    replayed with new gradients: equal, bit for bit, to the same launches run eagerly. A
    capture fails on any host synchronisation, so none happens in the step."""
    cb = _cuda()
    import cupy

    gen = torch.Generator(device="cuda").manual_seed(2)
    io = IO("bfloat16", "bfloat16", "float32", True, scale="device", found_inf=True, kbuf=True)
    a = _list(dataclasses.replace(io, kbuf=False, found_inf=False, scale=None), gen)
    b = _clone(a)
    hp = _hp("adam", ADAMW)
    flags, k = RULES["adam"].variant_and_scalars(hp, 2, None)
    # device buffers viewed once, before any capture (as a steady step keeps them)
    kbuf = cupy.asarray(torch.tensor(k, dtype=torch.float32, device="cuda"))
    gscale = cupy.asarray(torch.full((1,), 64.0, device="cuda"))
    found = cupy.asarray(torch.zeros(1, device="cuda"))
    extras = {"kbuf": kbuf, "scale": gscale, "found_inf": found}
    steps = []
    for tensors in (a, b):
        table = cb.tensor_table("adam", io, tensors)
        norm = cb.GradNorm([table], scale="device")

        def step(table=table, norm=norm):
            stream = torch.cuda.current_stream().cuda_stream
            norm(1.0, {"scale": gscale}, stream=stream)
            clip = norm.coef("float32")
            cb.launch_table("adam", flags, io, table, k, extras, clip=clip, stream=stream)

        step()  # warm-up: kernels compiled, the table copied to the device
        steps.append(step)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        steps[1]()
    for _ in range(3):
        new = [torch.randn(p.numel(), generator=gen, device="cuda") * 64 for p, _, _, _ in a]
        for (_, ga, _, _), (_, gb, _, _), x in zip(a, b, new):
            ga.copy_(x)
            gb.copy_(x)
        steps[0]()
        graph.replay()
    torch.cuda.synchronize()
    for (p, _, sl, m), (q, _, tl, n) in zip(a, b):
        assert torch.equal(p, q) and torch.equal(m, n)
        assert all(torch.equal(x, y) for x, y in zip(sl[:2], tl[:2]))
