"""The parity matrix: every optimizer × flag combination × backend × dtype × n × steps.

Each case steps an optimizer on random non-zero data and compares the parameters and every
state buffer (under its PyTorch name) with the float64 oracle run on float64 copies of the
same inputs. The dict API works on a parameter sliced out of a guarded array (the guard cells
must stay untouched: no write outside the parameter); the flat API packs the parameter in two
segments of a FlatBuffer, so the padding between segments must stay zero too.
"""

import functools
import itertools

import numpy as np
import pytest
from conftest import backend_params, resolve, run_oracle, state_names
from tolerances import assert_close

import fastopt

SIZES = (1, 1001, 278011)
STEPS = (1, 7)
DTYPES = (np.float32, np.float64)

#: hyperparameters that make every term of every update visible (lr large enough to move p)
BASE = {
    "SGD": dict(lr=0.05),
    "Momentum": dict(lr=0.05),
    "Nesterov": dict(lr=0.05),
    "AdaGrad": dict(lr=0.05),
    "RMSProp": dict(lr=0.01, alpha=0.9),
    "Adam": dict(lr=0.01, betas=(0.8, 0.95)),
    "AdamW": dict(lr=0.01, betas=(0.8, 0.95)),
    "Lion": dict(lr=0.01, betas=(0.8, 0.95)),
}


def _configs():
    """(name, kwargs) for every flag combination of every optimizer."""
    out = []
    wd_max = list(itertools.product((0.0, 0.1), (False, True)))
    for wd, mx in wd_max:
        common = dict(weight_decay=wd, maximize=mx)
        out.append(("SGD", dict(common)))
        out.append(("SGD", dict(common, momentum=0.9)))
        out.append(("SGD", dict(common, momentum=0.9, dampening=0.3)))
        out.append(("SGD", dict(common, momentum=0.9, nesterov=True)))
        out.append(("Momentum", dict(common, dampening=0.3 if mx else 0.0)))
        out.append(("Nesterov", dict(common)))
        for lr_decay, iav in itertools.product((0.0, 0.3), (0.0, 0.2)):
            out.append(("AdaGrad", dict(common, lr_decay=lr_decay, initial_accumulator_value=iav)))
        for centered, mom in itertools.product((False, True), (0.0, 0.8)):
            out.append(("RMSProp", dict(common, centered=centered, momentum=mom)))
        for ams in (False, True):
            out.append(("Adam", dict(common, amsgrad=ams)))
            out.append(("AdamW", dict(common, amsgrad=ams)))
        out.append(("Lion", dict(common)))
    return out


CONFIGS = _configs()


def _config_id(cfg):
    name, kw = cfg
    flags = [k if v is True else f"{k}={v}" for k, v in kw.items() if v not in (False, 0.0)]
    return name + ("[" + ",".join(flags) + "]" if flags else "")


def _inputs(rng, name, n, steps):
    """Parameters and a gradient per step, random and bounded away from zero.

    Why bounded: at step 1 the normalising optimizers move by about ±lr·g/|g| (Adam, AdaGrad,
    RMSProp) or ±lr (Lion), so where g = ±grad + wd·p cancels to a few ulps the float32 and
    float64 results legitimately step in different directions. |grad| >= 0.6 > |wd·p| (wd <= 0.1,
    |p| <= 3 plus a small drift) rules that out. Lion's gradients also keep one sign per element
    across steps, so sign(β1·m + (1−β1)·g) never sits on a rounding tie in later steps either.
    """
    p0 = rng.uniform(-3.0, 3.0, n)

    def sign():
        return np.where(rng.random(n) < 0.5, -1.0, 1.0)

    fixed = sign()
    grads = [(fixed if name == "Lion" else sign()) * rng.uniform(0.6, 2.0, n) for _ in range(steps)]
    return p0, grads


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
    return p.copy(), {s: np.asarray(a).reshape(-1).copy() for s, a in opt.state["w"].items()}


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
    return cat(buf.params), {s: cat({k: opt.state[k][s] for k in parts}) for s in opt.state["a"]}


@functools.lru_cache(maxsize=1)
def _case(cfg_index, dtype, n, steps):
    """Inputs and the float64 oracle's result for one case, shared by every backend and API
    (the parametrization varies those fastest, so one cached case serves them all)."""
    name, kw = CONFIGS[cfg_index]
    kwargs = dict(BASE[name], **kw)
    rng = np.random.default_rng([cfg_index, np.dtype(dtype).itemsize, n, steps])
    p0, grads = _inputs(rng, name, n, steps)
    # the oracle sees the inputs the backend sees: rounded to dtype, then widened
    p0, grads = p0.astype(dtype), [g.astype(dtype) for g in grads]
    return kwargs, p0, grads, run_oracle(name, kwargs, p0, grads)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("api", ["dict", "flat"])
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("cfg", range(len(CONFIGS)), ids=[_config_id(c) for c in CONFIGS])
def test_parity(cfg, dtype, n, steps, api, backend):
    name = CONFIGS[cfg][0]
    kwargs, p0, grads, (p_ref, state_ref) = _case(cfg, dtype, n, steps)
    run = _run_dict if api == "dict" else _run_flat
    p, state = run(name, kwargs, backend, dtype, p0, grads)
    assert p.dtype == dtype
    assert set(state) == set(state_names(name, resolve(name, kwargs))), "state buffer names"
    assert not np.array_equal(p, p0), "the step did not move the parameters"
    assert_close(p, p_ref, dtype, f"{name} param")
    for s, ref in state_ref.items():
        assert state[s].dtype == dtype, f"{s} dtype"
        assert_close(state[s], ref, dtype, f"{name} {s}")


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
