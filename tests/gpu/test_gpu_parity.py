"""The parity matrix on the GPU: both GPU backends against the float64 oracle, and each other.

Every optimizer × flag combination × dtype × n × steps of ``tests/test_parity.py``, with the
inputs copied to the GPU once and the results copied back only to compare: params and every
state buffer. The dict API steps a parameter sliced out of a guarded device array (the guard
cells must keep their poison); the flat API packs it in two segments of a FlatBuffer built from
CuPy arrays, whose buffers and state must live on the GPU.
"""
import numpy as np
import pytest

import fastopt
from conftest import resolve, state_names
from gpu_common import gpu_backend_params, needs_gpu, to_device, to_host
from test_parity import CONFIGS, DTYPES, SIZES, STEPS, _case, _config_id
from tolerances import assert_close

pytestmark = needs_gpu

GUARD = 16
POISON = -7.25e3


def _run_dict(name, kwargs, backend, dtype, p0, grads):
    import cupy
    n = p0.size
    store = cupy.full(n + 2 * GUARD, POISON, dtype=dtype)
    p = store[GUARD:GUARD + n]
    p[...] = to_device(p0)
    opt = getattr(fastopt, name)(**kwargs, backend=backend)
    ptr = p.data.ptr
    for g in grads:
        assert opt.update({"w": p}, {"w": to_device(g.astype(dtype))}) is True
    assert p.data.ptr == ptr
    host = to_host(store)
    assert (host[:GUARD] == POISON).all() and (host[GUARD + n:] == POISON).all(), \
        "a step wrote outside the parameter"
    for s, a in opt.state["w"].items():
        assert isinstance(a, cupy.ndarray), f"state {s} is not on the GPU"
    return host[GUARD:GUARD + n], {s: to_host(a).reshape(-1) for s, a in opt.state["w"].items()}


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
        used[off:off + size] = True
    assert (data[~used] == 0).all(), "a step changed the padding between segments"
    for st in opt.state.values():
        for s, a in st.items():
            assert isinstance(a, cupy.ndarray), f"state {s} is not on the GPU"
    cat = lambda d: np.concatenate([to_host(d[k]).reshape(-1) for k in parts])  # noqa: E731
    return cat(buf.params), {s: cat({k: opt.state[k][s] for k in parts})
                             for s in opt.state["a"]}


@pytest.mark.parametrize("backend", gpu_backend_params())
@pytest.mark.parametrize("api", ["dict", "flat"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)), ids=[_config_id(c) for c in CONFIGS])
def test_gpu_parity(cfg, dtype, n, steps, api, backend):
    name = CONFIGS[cfg][0]
    kwargs, p0, grads, (p_ref, state_ref) = _case(cfg, dtype, n, steps)
    run = _run_dict if api == "dict" else _run_flat
    p, state = run(name, kwargs, backend, dtype, p0, grads)
    assert p.dtype == dtype
    assert set(state) == set(state_names(name, resolve(name, kwargs))), "state buffer names"
    assert not np.array_equal(p, p0), "the step did not move the parameters"
    assert_close(p, p_ref, dtype, f"{name} param ({backend})")
    for s, ref in state_ref.items():
        assert state[s].dtype == dtype, f"{s} dtype"
        assert_close(state[s], ref, dtype, f"{name} {s} ({backend})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)), ids=[_config_id(c) for c in CONFIGS])
def test_cupy_and_numba_cuda_agree(cfg, dtype):
    if "numba-cuda" not in fastopt.available_backends():
        pytest.skip("backend 'numba-cuda' is not available here")
    name = CONFIGS[cfg][0]
    kwargs, p0, grads, _ = _case(cfg, dtype, 278011, 7)
    p_c, s_c = _run_dict(name, kwargs, "cupy", dtype, p0, grads)
    p_n, s_n = _run_dict(name, kwargs, "numba-cuda", dtype, p0, grads)
    # the same float ops in the same order: the two compilers may still contract a*b+c into
    # an FMA differently, so agreement is to the dtype's tolerance, not bit for bit
    assert_close(p_n, p_c, dtype, f"{name} param: numba-cuda vs cupy")
    assert set(s_c) == set(s_n)
    for s in s_c:
        assert_close(s_n[s], s_c[s], dtype, f"{name} {s}: numba-cuda vs cupy")
