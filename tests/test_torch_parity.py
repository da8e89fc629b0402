"""fastopt against ``torch.optim`` itself (skipped when torch is not installed).

Every class with a torch.optim peer (found by name, as the benchmark finds it:
``fastopt.bench.measure._torch_name``) in every configuration of the optimizer matrix that torch
accepts, float32 and float64, several steps with a changing lr, on every CPU backend and both
APIs. The reference is torch (``foreach=False``) in float64 on the inputs rounded to the tested
dtype; fastopt and torch in the tested dtype must both lie within the dtype's tolerance of it.
Parameters, every state buffer (under torch's state names) and the host state torch keeps
(NAdam's ``mu_product``, ASGD's ``eta`` and ``mu``: float32 0-d tensors, equal bit for bit) are
compared.
"""

import functools
import inspect

import numpy as np
import pytest
from conftest import backend_params
from support.matrix import FULL, MATRIX, STEPS, config_id
from support.oracle import class_of, host_names, resolve
from support.parity import DTYPES, inputs
from support.tolerances import assert_close

import fastopt
from fastopt.bench.measure import _torch_name
from fastopt.optimizers import CLASSES

torch = pytest.importorskip("torch")

SHAPES = {"w": (31, 17), "b": (1001,)}
#: lr per step, as factors of the configuration's lr (a schedule: no stale lr anywhere)
LR_FACTORS = [1.0 + 0.1 * t for t in range(STEPS)]


def _torch_kwargs(name, kw):
    """torch's constructor arguments for fastopt's ``name(**kw)``, or None when torch refuses
    them: the class's hyperparameters and pins (Nesterov's nesterov=True), those the torch
    class takes (AdamW is decoupled by its name, not by a keyword)."""
    cls = class_of(name)
    tcls = getattr(torch.optim, _torch_name(cls))
    takes = inspect.signature(tcls.__init__).parameters
    tk = {k: v for k, v in {**resolve(name, kw), **cls._pinned}.items() if k in takes}
    tk["foreach"] = False
    try:
        tcls([torch.zeros(1, requires_grad=True)], **tk)
    except (ValueError, TypeError):
        return None
    return tk


def _cases():
    out = []
    for i, (name, kw) in enumerate(MATRIX):
        if _torch_name(class_of(name)) is None or _torch_kwargs(name, kw) is None:
            continue
        for dtype in DTYPES:
            out.append(pytest.param(i, dtype, id=f"{config_id(MATRIX[i])}-{np.dtype(dtype).name}"))
    return out


@functools.lru_cache(maxsize=1)
def _inputs(cfg, dtype):
    name = MATRIX[cfg][0]
    rng = np.random.default_rng([2024, cfg, np.dtype(dtype).itemsize])
    p0, grads = {}, [{} for _ in range(STEPS)]
    for n, shape in SHAPES.items():
        p, gs = inputs(rng, name, int(np.prod(shape)), STEPS)
        p0[n] = p.reshape(shape).astype(dtype)
        for t, g in enumerate(gs):
            grads[t][n] = g.reshape(shape).astype(dtype)
    return p0, grads


@functools.lru_cache(maxsize=4)
def _torch_run(cfg, dtype, run_dtype):
    """torch.optim's trajectory in ``run_dtype`` from the inputs of ``dtype``: params,
    {name: {state name: array}} (host state included)."""
    name, kw = MATRIX[cfg]
    p0, grads = _inputs(cfg, dtype)
    tdtype = {np.float32: torch.float32, np.float64: torch.float64}[run_dtype]
    ps = {
        n: torch.tensor(a.astype(run_dtype), dtype=tdtype, requires_grad=True)
        for n, a in p0.items()
    }
    tk = _torch_kwargs(name, kw)
    lr = tk["lr"]
    opt = getattr(torch.optim, _torch_name(class_of(name)))(list(ps.values()), **tk)
    for f, g in zip(LR_FACTORS, grads):
        opt.param_groups[0]["lr"] = lr * f
        for n, p in ps.items():
            p.grad = torch.tensor(g[n].astype(run_dtype), dtype=tdtype)
        opt.step()
    state = {
        n: {
            s: v.detach().numpy().copy()
            for s, v in opt.state[p].items()
            if s != "step" and v is not None
        }
        for n, p in ps.items()
    }
    return {n: p.detach().numpy().copy() for n, p in ps.items()}, state


@pytest.mark.parametrize("api", ["dict", "flat"])
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("cfg, dtype", _cases())
def test_matches_torch_optim(cfg, dtype, backend, api):
    name, kw = MATRIX[cfg]
    p0, grads = _inputs(cfg, dtype)
    ref_p, ref_state = _torch_run(cfg, dtype, np.float64)
    t_p, t_state = _torch_run(cfg, dtype, dtype)

    opt = getattr(fastopt, name)(**kw, backend=backend)
    lr = resolve(name, kw)["lr"]
    params = {n: a.copy() for n, a in p0.items()}
    buf = fastopt.FlatBuffer(params) if api == "flat" else None
    for f, g in zip(LR_FACTORS, grads):
        opt.lr = lr * f
        if buf is None:
            opt.update(params, g)
        else:
            for n, a in g.items():
                buf.grads[n][...] = a
            opt.step(buf)
    if buf is not None:
        params = buf.params

    hnames = host_names(name)
    sd = opt.state_dict()["state"]
    for n in SHAPES:
        assert set(sd[n]) == set(ref_state[n]), f"state names of {n}"
        assert_close(params[n], ref_p[n], dtype, f"fastopt {name} param {n}")
        assert_close(t_p[n], ref_p[n], dtype, f"torch param {n} (tolerance check)")
        for s, ref in ref_state[n].items():
            if s in hnames:  # torch's float32 host state, computed alike: bit for bit
                assert sd[n][s].dtype == ref.dtype == np.float32 and sd[n][s].shape == ()
                assert sd[n][s] == t_state[n][s] == ref, f"host state {s} of {n}"
                continue
            assert_close(opt.state[n][s], ref, dtype, f"fastopt {name} {s} of {n}")
            assert_close(t_state[n][s], ref, dtype, f"torch {s} of {n}")


PEERS = [n for n, c in CLASSES.items() if (_torch_name(c) or "").lower() == n.lower()]


@pytest.mark.parametrize("name", PEERS)
def test_defaults_match_torch(name):
    """The constructor defaults are torch.optim's, for every class that has torch's name
    (Momentum and Nesterov are SGD with defaults of their own; Lion has no peer)."""
    ours_sig = inspect.signature(getattr(fastopt, name)).parameters
    theirs_sig = inspect.signature(getattr(torch.optim, _torch_name(CLASSES[name]))).parameters
    shared = [k for k in ours_sig if k in theirs_sig and k not in ("params", "backend")]
    assert set(CLASSES[name]._hyper + CLASSES[name]._flags) <= set(shared)
    for k in shared:
        a, b = ours_sig[k].default, theirs_sig[k].default
        if isinstance(b, torch.Tensor):
            b = b.item()
        assert a == b or (isinstance(a, tuple) and tuple(a) == tuple(b)), f"{name}.{k}: {a} != {b}"


FULL_PEERED = [c for c in FULL if _torch_name(class_of(c[0])) and _torch_kwargs(*c) is not None]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("cfg", FULL_PEERED, ids=[config_id(c) for c in FULL_PEERED])
def test_nonfinite_values_like_torch(cfg, backend):
    """NaN, +inf and -inf in the gradients flow through every optimizer as through torch's
    (a max or a clamp that dropped NaN, or a sign that made it 0, would show): the same
    non-finite entries in params and state after a few steps (NaN where torch has NaN in the
    params), the finite ones close. A state buffer may hold inf where torch holds NaN: torch
    updates the first moment with ``lerp``, m + w·(g − m), which turns an inf moment into
    inf − inf on the next finite gradient; the rules write β·m + (1 − β)·g (Adam's form)."""
    name, kw = cfg
    rng = np.random.default_rng(5)
    n, steps = 64, 4
    p0 = rng.uniform(-3.0, 3.0, n)
    grads = [
        np.where(rng.random(n) < 0.5, -1.0, 1.0) * rng.uniform(0.6, 2.0, n) for _ in range(steps)
    ]
    for t, (i, v) in enumerate([(3, np.nan), (7, np.inf), (11, -np.inf), (3, 1.0)]):
        grads[t % steps][i] = v
    grads[2][20] = np.nan  # a later one, into state that has history

    tk = _torch_kwargs(name, kw)
    tp = torch.tensor(p0.copy(), requires_grad=True)
    topt = getattr(torch.optim, _torch_name(class_of(name)))([tp], **tk)
    opt = getattr(fastopt, name)(**kw, backend=backend)
    p = p0.copy()
    with np.errstate(all="ignore"):
        for g in grads:
            tp.grad = torch.tensor(g)
            topt.step()
            opt.update({"w": p}, {"w": g})
    pairs = [("param", p, tp.detach().numpy())]
    pairs += [
        (s, opt.state["w"][s], v.detach().numpy())
        for s, v in topt.state[tp].items()
        if s in opt.state["w"]
    ]
    for what, ours, theirs in pairs:
        fin = np.isfinite(theirs)
        assert np.array_equal(np.isfinite(ours), fin), f"{name} {what}: non-finite entries"
        if what == "param":
            assert np.array_equal(np.isnan(ours), np.isnan(theirs)), f"{name} param: NaN"
        assert_close(ours[fin], theirs[fin], np.float64, f"{name} {what} (finite entries)")
