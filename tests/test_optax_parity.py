"""The optimizers torch.optim lacks against their reference, optax 0.2.8 (skipped without jax and
optax: ``pip install "jax[cpu]" optax==0.2.8``).

Each configuration of the matrix (``support.matrix.MATRIX``: the spec's test settings and every
probe), and the class's defaults, runs 100 steps from the same seeded random parameters and
gradients through optax's own transformation (``OPTAX``: the function, and optax's state fields
under fastopt's state names) and through fastopt, on the numba backend and the NumPy oracle, in
float32 and in float64 (jax's x64 mode, switched on for the test and restored after). optax runs
op by op, each operation rounded on its own (``jax.jit`` lets XLA fuse and contract them, which
moves float32 params by a few ulps more). fastopt's hyperparameters reach optax under optax's
names (``lr`` as ``learning_rate``, ``betas`` as ``b1, b2[, b3]``); ``maximize``, which optax
lacks, is optax run on the negated gradients.

Tolerances (``|ours - optax| <= atol + rtol * |optax|``), stated per dtype, for the params and for
every state buffer: the state updates are the same operations in the same order as optax's
(equal bit for bit in these runs); the param update folds lr and the bias corrections into host
scalars computed in float64 (optax: ``1 - b**t`` in float32 for float32 params), which moves each
step's update by an ulp or two and the params, summed over 100 steps, by a few ulps.
"""

import inspect

import numpy as np
import pytest
from support.matrix import MATRIX, config_id
from support.parity import inputs

import fastopt

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jnp = pytest.importorskip("jax.numpy")
contrib = pytest.importorskip("optax.contrib")

#: class -> (optax's function, {optax's state field: fastopt's state name})
OPTAX = {
    "AdaBelief": (optax.adabelief, {"mu": "exp_avg", "nu": "exp_avg_var"}),
    "Adan": (optax.adan, dict(m="exp_avg", v="exp_avg_diff", n="exp_avg_sq", g="prev_grad")),
    "AdEMAMix": (contrib.ademamix, dict(m1="exp_avg_fast", m2="exp_avg_slow", nu="exp_avg_sq")),
}

STEPS = 100
N = 257
BACKENDS = [b for b in ("numpy", "numba") if b in fastopt.available_backends()]
#: (params, state buffers) -> rtol, atol; see the module docstring
TOL = {
    np.dtype(np.float32): dict(params=(2e-6, 2e-6), state=(1e-6, 1e-7)),
    np.dtype(np.float64): dict(params=(1e-12, 1e-14), state=(1e-14, 1e-16)),
}


def _optax_kwargs(hp):
    """fastopt's hyperparameters under optax's names (``maximize`` left out)."""
    out = {}
    for name, value in hp.items():
        if name == "lr":
            out["learning_rate"] = value
        elif name == "betas":
            out.update({f"b{i}": b for i, b in enumerate(value, start=1)})
        elif name != "maximize":
            out[name] = value
    return out


class _X64:
    """jax's x64 mode on (float64) or off (float32) inside the block, restored after."""

    def __init__(self, on):
        self.on = on

    def __enter__(self):
        self.old = jax.config.read("jax_enable_x64")
        jax.config.update("jax_enable_x64", self.on)

    def __exit__(self, *exc):
        jax.config.update("jax_enable_x64", self.old)


def _run_optax(name, hp, p0, grads):
    fn, fields = OPTAX[name]
    tx = fn(**_optax_kwargs(hp))
    params = jnp.asarray(p0)
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(jnp.asarray(-g if hp["maximize"] else g), state, params)
        params = optax.apply_updates(params, updates)
    inner = state[0]  # the scale_by_* transformation's state, first in optax's chain
    return np.asarray(params), {ours: np.asarray(getattr(inner, f)) for f, ours in fields.items()}


def _configs():
    out = []
    for name in OPTAX:
        for cfg in [c for c in MATRIX if c[0] == name] + [(name, {})]:
            for dtype in (np.float32, np.float64):
                label = config_id(cfg) + ("" if cfg[1] else "[defaults]")
                out.append(pytest.param(cfg, dtype, id=f"{label}-{np.dtype(dtype).name}"))
    return out


@pytest.mark.parametrize("cfg, dtype", _configs())
def test_matches_optax(cfg, dtype):
    name, kw = cfg
    cls = getattr(fastopt, name)
    hp = cls(**kw).hyperparams
    rng = np.random.default_rng(21)
    p0, grads = inputs(rng, name, N, STEPS)
    p0, grads = p0.astype(dtype), [g.astype(dtype) for g in grads]
    with _X64(dtype == np.float64):
        want_p, want_state = _run_optax(name, hp, p0, grads)
    assert want_p.dtype == dtype, f"optax ran in {want_p.dtype}"
    tol = TOL[np.dtype(dtype)]
    for backend in BACKENDS:
        opt = cls(**kw, backend=backend)
        p = p0.copy()
        for g in grads:
            opt.update({"w": p}, {"w": g})
        rtol, atol = tol["params"]
        np.testing.assert_allclose(p, want_p, rtol=rtol, atol=atol, err_msg=f"{backend} params")
        assert set(opt.state["w"]) == set(want_state), "state buffers"
        rtol, atol = tol["state"]
        for s, want in want_state.items():
            got = np.asarray(opt.state["w"][s])
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=f"{backend} {s}")


@pytest.mark.parametrize("name", list(OPTAX))
def test_defaults_are_optax_defaults(name):
    """Every hyperparameter but lr (optax leaves it to the caller) defaults to optax's value."""
    theirs = inspect.signature(OPTAX[name][0]).parameters
    cls = getattr(fastopt, name)
    ours = {k: v for k, v in cls().hyperparams.items() if k not in ("lr", "maximize")}
    for k, v in _optax_kwargs(ours).items():
        assert theirs[k].default == v, f"{name}: {k} = {v}, optax's {theirs[k].default}"
