"""The parity matrix: every optimizer × probe combination × backend × dtype × n × steps.

Each case (``support.matrix.MATRIX`` × ``support.parity``) steps an optimizer on random non-zero
data and compares the parameters, every state buffer (under its PyTorch name) and the host state
with the float64 oracle run on float64 copies of the same inputs. The dict API works on a
parameter sliced out of a guarded array (the guard cells must stay untouched: no write outside
the parameter); the flat API packs the parameter in two segments of a FlatBuffer, so the padding
between segments must stay zero too. The largest size runs only where a backend has a parallel
loop for it to reach (numba's ``PARALLEL_MIN``), for each class's fullest configuration.

Each configuration that reaches a new flag variant costs a compile per dtype. The default run
keeps, at float32, a pairwise cover of each class's probe combinations (``support.cover``: every
probe on and off beside every other probe on and off, the defaults and the fullest configuration
among them) and, at float64, each class's two ends (its defaults and its fullest configuration)
on the serial loop; the rest of the product is the ``exhaustive`` sweep.
"""

import importlib

import numpy as np
import pytest
from conftest import backend_params
from support.cover import marks, matrix_cover, matrix_ends
from support.matrix import FULL, MATRIX, config_id, full_config
from support.oracle import resolve, run_oracle, state_names
from support.parity import DTYPES, SIZES_STEPS, case
from support.tolerances import assert_close

import fastopt
from fastopt.backends import BACKENDS


def _parallel_min(backend):
    try:
        return getattr(importlib.import_module(BACKENDS[backend]), "PARALLEL_MIN", None)
    except ImportError:
        return None


#: indices into MATRIX of the configurations the default run keeps (support.cover): the
#: pairwise cover at float32, each class's ends at float64
COVER = matrix_cover()
ENDS = matrix_ends()


def _kept(cfg, dtype, n):
    """Whether the default run keeps a case: the cover at float32, the ends at float64, and the
    parallel loop (n > 1001) at float32 only (its float64 build is the same loop as the float32
    one at another width, and the float64 serial loop of the same configuration runs)."""
    if np.dtype(dtype) == np.float32:
        return cfg in COVER
    return cfg in ENDS and n <= 1001


def _params():
    """(cfg, dtype, n, steps, backend) of every case, the backend varying fastest (one cached
    oracle run serves them all). Sizes up to 1001 run everywhere; a larger size exists to reach
    a backend's parallel loop, so it runs only on a backend that has one (numba: the same
    generated loop around the same inlined rule as its serial loop), for the fullest
    configuration of each class (every state buffer it can have), at both dtypes and APIs."""
    full = {MATRIX.index(c) for c in FULL}
    out = []
    for cfg, c in enumerate(MATRIX):
        for dtype in DTYPES:
            for n, steps in SIZES_STEPS:
                for p in backend_params():
                    (backend,) = p.values
                    if n > 1001:
                        limit = _parallel_min(backend)
                        if cfg not in full or limit is None or n < limit:
                            continue
                    out.append(
                        pytest.param(
                            cfg,
                            dtype,
                            n,
                            steps,
                            backend,
                            marks=p.marks + marks(_kept(cfg, dtype, n)),
                            id=f"{config_id(c)}-{np.dtype(dtype).name}-{n}-{steps}-{p.id}",
                        )
                    )
    return out


GUARD = 16
POISON = -7.25e3  # a value no step produces near here, so an errant write shows


def _run_dict(name, kwargs, backend, dtype, p0, grads):
    n = p0.size
    store = np.full(n + 2 * GUARD, POISON, dtype=dtype)
    p = store[GUARD : GUARD + n]
    p[...] = p0
    opt = getattr(fastopt, name)(**kwargs, backend=backend)
    for g in grads:
        assert opt.update({"w": p}, {"w": g.astype(dtype)}) is True
    assert (store[:GUARD] == POISON).all() and (store[GUARD + n :] == POISON).all(), (
        "a step wrote outside the parameter"
    )
    state = {s: np.asarray(a).reshape(-1).copy() for s, a in opt.state["w"].items()}
    return p.copy(), state, opt.host_state


def _run_flat(name, kwargs, backend, dtype, p0, grads):
    n = p0.size
    cut = max(1, n // 3) if n > 1 else n
    parts = {"a": p0[:cut].astype(dtype)}
    if cut < n:
        parts["b"] = p0[cut:].astype(dtype)
    buf = fastopt.FlatBuffer(parts)
    opt = getattr(fastopt, name)(**kwargs, backend=backend)
    for g in grads:
        buf.grads["a"][...] = g[:cut]
        if cut < n:
            buf.grads["b"][...] = g[cut:]
        assert opt.step(buf) is True
    (group,) = buf.groups
    used = np.zeros(group.data.size, dtype=bool)
    for off, size, _ in group.slots.values():
        used[off : off + size] = True
    assert (group.data[~used] == 0).all(), "a step changed the padding between segments"
    cat = lambda d: np.concatenate([np.asarray(d[k]).reshape(-1) for k in parts])
    state = {s: cat({k: opt.state[k][s] for k in parts}) for s in opt.state["a"]}
    return cat(buf.params), state, opt.host_state


@pytest.mark.parametrize("api", ["dict", "flat"])
@pytest.mark.parametrize("cfg, dtype, n, steps, backend", _params())
def test_parity(cfg, dtype, n, steps, backend, api):
    name = MATRIX[cfg][0]
    kwargs, p0, grads, (p_ref, state_ref, host_ref) = case(cfg, dtype, n, steps)
    run = _run_dict if api == "dict" else _run_flat
    p, state, host = run(name, kwargs, backend, dtype, p0, grads)
    assert p.dtype == dtype
    assert set(state) == set(state_names(name, resolve(name, kwargs))), "state buffer names"
    assert not np.array_equal(p, p0), "the step did not move the parameters"
    assert_close(p, p_ref, dtype, f"{name} param")
    for s, ref in state_ref.items():
        assert state[s].dtype == dtype, f"{s} dtype"
        assert_close(state[s], ref, dtype, f"{name} {s}")
    assert host == host_ref, "host state"  # float32 values, computed alike: exactly equal


def test_default_run_covers_every_pair_of_probes():
    """Within each class, every two probes appear among the kept configurations in each on/off
    combination the class accepts, and every class keeps its fullest configuration."""
    for name in {n for n, _ in MATRIX}:
        probes = fastopt.optimizers.CLASSES[name].probes()
        configs = [(i, kw) for i, (n, kw) in enumerate(MATRIX) if n == name]
        for a, b in [(a, b) for a in probes for b in probes if a < b]:
            every = {(kw[a], kw[b]) for _, kw in configs}
            kept = {(kw[a], kw[b]) for i, kw in configs if i in COVER}
            assert kept == every, f"{name}: {a} x {b} lacks {every - kept}"
    assert {i for i, c in enumerate(MATRIX) if c in FULL} <= ENDS <= COVER
    assert {MATRIX[i][0] for i in COVER} == {n for n, _ in MATRIX}
    for name in {n for n, _ in MATRIX}:  # at float64: each class's defaults and fullest
        first = next(i for i, (n, _) in enumerate(MATRIX) if n == name)
        assert first in ENDS and MATRIX.index(full_config(name)) in ENDS


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize(
    "kw",
    [dict(), dict(dampening=0.5), dict(nesterov=True), dict(weight_decay=0.1, maximize=True)],
    ids=["plain", "dampening", "nesterov", "wd-maximize"],
)
def test_first_momentum_step_overwrites_a_poisoned_buffer(kw, dtype, backend):
    """Step 1 sets b = g (PyTorch creates the buffer then): whatever the buffer held before,
    NaN included, must not leak into the result."""
    rng = np.random.default_rng(7)
    n = 1001
    p0 = rng.uniform(-3.0, 3.0, n).astype(dtype)
    g = (np.where(rng.random(n) < 0.5, -1.0, 1.0) * rng.uniform(0.6, 2.0, n)).astype(dtype)
    p, buf = p0.copy(), np.full(n, np.nan, dtype)
    fastopt.functional.sgd(p, g, buf, step=1, lr=0.05, momentum=0.9, backend=backend, **kw)
    p_ref, s_ref = run_oracle("SGD", dict(lr=0.05, momentum=0.9, **kw), p0, [g])
    assert_close(p, p_ref, dtype, "SGD param")
    assert_close(buf, s_ref["momentum_buffer"], dtype, "SGD momentum_buffer")
