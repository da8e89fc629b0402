"""The parity matrix on the GPU: both GPU backends against the float64 oracle, and each other.

Every configuration of the optimizer matrix (``support.matrix.MATRIX``: every class × probe
combination) × dtype × (n, steps) of ``support.parity``, with the inputs copied to the GPU once
and the results copied back only to compare: params, every state buffer and the host state.
The dict API steps a parameter sliced out of a guarded device array (the guard
cells must keep their poison); the flat API packs it in two segments of a FlatBuffer built from
CuPy arrays, whose buffers and state must live on the GPU.
"""

import numpy as np
import pytest
from gpu_common import gpu_backend_params, needs_gpu, to_device, to_host
from support.matrix import FULL, MATRIX, STEPS, config_id
from support.oracle import resolve, state_names
from support.parity import DTYPES, SIZES_STEPS, case
from support.tolerances import assert_close

import fastopt

pytestmark = needs_gpu

GUARD = 16
POISON = -7.25e3

#: one xdist group per config: with ``pytest -n N --dist loadgroup`` every test of a config runs
#: in one worker, so each kernel variant is compiled by one process, not by all of them
CFG_PARAMS = [
    pytest.param(i, id=config_id(c), marks=pytest.mark.xdist_group(f"cfg{i}"))
    for i, c in enumerate(MATRIX)
]


def _run_dict(name, kwargs, backend, dtype, p0, grads):
    import cupy

    n = p0.size
    store = cupy.full(n + 2 * GUARD, POISON, dtype=dtype)
    p = store[GUARD : GUARD + n]
    p[...] = to_device(p0)
    opt = getattr(fastopt, name)(**kwargs, backend=backend)
    ptr = p.data.ptr
    for g in grads:
        assert opt.update({"w": p}, {"w": to_device(g.astype(dtype))}) is True
    assert p.data.ptr == ptr
    host = to_host(store)
    assert (host[:GUARD] == POISON).all() and (host[GUARD + n :] == POISON).all(), (
        "a step wrote outside the parameter"
    )
    for s, a in opt.state["w"].items():
        assert isinstance(a, cupy.ndarray), f"state {s} is not on the GPU"
    state = {s: to_host(a).reshape(-1) for s, a in opt.state["w"].items()}
    return host[GUARD : GUARD + n], state, opt.host_state


def _run_flat(name, kwargs, backend, dtype, p0, grads):
    import cupy

    n = p0.size
    cut = max(1, n // 3) if n > 1 else n
    parts = {"a": to_device(p0[:cut].astype(dtype))}
    if cut < n:
        parts["b"] = to_device(p0[cut:].astype(dtype))
    buf = fastopt.FlatBuffer(parts)
    (group,) = buf.groups
    assert isinstance(group.data, cupy.ndarray) and isinstance(group.grad, cupy.ndarray)
    opt = getattr(fastopt, name)(**kwargs, backend=backend)
    for g in grads:
        buf.grads["a"][...] = to_device(g[:cut].astype(dtype))
        if cut < n:
            buf.grads["b"][...] = to_device(g[cut:].astype(dtype))
        assert opt.step(buf) is True
    data = to_host(group.data)
    used = np.zeros(data.size, dtype=bool)
    for off, size, _ in group.slots.values():
        used[off : off + size] = True
    assert (data[~used] == 0).all(), "a step changed the padding between segments"
    for st in opt.state.values():
        for s, a in st.items():
            assert isinstance(a, cupy.ndarray), f"state {s} is not on the GPU"
    cat = lambda d: np.concatenate([to_host(d[k]).reshape(-1) for k in parts])
    state = {s: cat({k: opt.state[k][s] for k in parts}) for s in opt.state["a"]}
    return cat(buf.params), state, opt.host_state


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("api", ["dict", "flat"])
@pytest.mark.parametrize("n, steps", SIZES_STEPS, ids=[f"{n}-{s}" for n, s in SIZES_STEPS])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_gpu_parity(cfg, dtype, n, steps, api, backend):
    name = MATRIX[cfg][0]
    kwargs, p0, grads, (p_ref, state_ref, host_ref) = case(cfg, dtype, n, steps)
    run = _run_dict if api == "dict" else _run_flat
    p, state, host = run(name, kwargs, backend, dtype, p0, grads)
    assert p.dtype == dtype
    assert set(state) == set(state_names(name, resolve(name, kwargs))), "state buffer names"
    assert not np.array_equal(p, p0), "the step did not move the parameters"
    assert_close(p, p_ref, dtype, f"{name} param ({backend})")
    for s, ref in state_ref.items():
        assert state[s].dtype == dtype, f"{s} dtype"
        assert_close(state[s], ref, dtype, f"{name} {s} ({backend})")
    assert host == host_ref, "host state"


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cfg", CFG_PARAMS)
def test_cupy_and_numba_cuda_agree(cfg, dtype):
    if "numba-cuda" not in fastopt.available_backends():
        pytest.skip("backend 'numba-cuda' is not available here")
    name = MATRIX[cfg][0]
    kwargs, p0, grads, _ = case(cfg, dtype, 278011, STEPS)
    p_c, s_c, _ = _run_dict(name, kwargs, "cupy", dtype, p0, grads)
    p_n, s_n, _ = _run_dict(name, kwargs, "numba-cuda", dtype, p0, grads)
    # the same float ops in the same order: the two compilers may still contract a*b+c into
    # an FMA differently, so agreement is to the dtype's tolerance, not bit for bit
    assert_close(p_n, p_c, dtype, f"{name} param: numba-cuda vs cupy")
    assert set(s_c) == set(s_n)
    for s in s_c:
        assert_close(s_n[s], s_c[s], dtype, f"{name} {s}: numba-cuda vs cupy")


#: the fullest configuration of each class
UNALIGNED = [MATRIX.index(c) for c in FULL]


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("offset", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cfg", UNALIGNED, ids=[config_id(MATRIX[i]) for i in UNALIGNED])
def test_gpu_parity_on_misaligned_views(cfg, dtype, offset, backend):
    """Params, grads and state views that start off a 16-byte boundary take the CuPy backend's
    scalar kernel form (and numba-cuda's only form): same results, nothing written outside."""
    import cupy

    name = MATRIX[cfg][0]
    n = 100_003
    kwargs, p0, grads, (p_ref, state_ref, _) = case(cfg, dtype, n, STEPS)
    store = cupy.full(n + 2 * GUARD, POISON, dtype=dtype)
    p = store[offset : offset + n]
    p[...] = to_device(p0)
    assert p.data.ptr % 16
    gstore = cupy.empty(n + offset, dtype=dtype)
    opt = getattr(fastopt, name)(**kwargs, backend=backend)
    for g in grads:
        gv = gstore[offset:]
        gv[...] = to_device(g.astype(dtype))
        assert opt.update({"w": p}, {"w": gv}) is True
    host = to_host(store)
    assert (host[:offset] == POISON).all() and (host[offset + n :] == POISON).all()
    assert_close(host[offset : offset + n], p_ref, dtype, f"{name} param ({backend})")
    for s, ref in state_ref.items():
        assert_close(to_host(opt.state["w"][s]).reshape(-1), ref, dtype, f"{name} {s}")


def test_occupancy_formula_matches_the_driver():
    """The grid of the CuPy raw kernels comes from ``_launch.blocks_per_sm`` and the kernel's
    register count; the driver's own occupancy calculator must agree for every Adam variant."""
    import cupy
    from fastopt.kernels import cuda_source

    from fastopt.backends import _launch, cupy_backend

    occ = getattr(cupy.cuda.driver, "occupancyMaxActiveBlocksPerMultiprocessor", None)
    if occ is None:
        pytest.skip("this CuPy has no driver occupancy binding")
    for flags in cuda_source.variants("adam"):
        for dtype, width in ((np.float32, 4), (np.float32, 1), (np.float64, 2)):
            k = cupy_backend.raw_kernel("adam", flags, dtype, width)
            want = occ(k.kernel.ptr, _launch.THREADS, 0)
            assert _launch.blocks_per_sm(k.num_regs) == want, (flags, dtype, width, k.num_regs)
