"""fastopt against ``torch.optim`` itself (skipped when torch is not installed).

For every option PyTorch has, both fastopt and torch step the same parameters with the same
gradients for several steps. The reference is torch in float64 on the inputs rounded to the
tested dtype; fastopt (every CPU backend, dict API) and torch in the tested dtype must both lie
within the dtype's tolerance of it. Parameters and every state buffer are compared, under
torch's state names.
"""

import numpy as np
import pytest
from conftest import backend_params
from support.tolerances import assert_close

import fastopt

torch = pytest.importorskip("torch")

STEPS = 5
SHAPES = {"w": (31, 17), "b": (1001,)}

#: (fastopt class, torch class, kwargs understood by both)
CASES = [
    ("SGD", "SGD", dict(lr=0.05)),
    ("SGD", "SGD", dict(lr=0.05, momentum=0.9)),
    ("SGD", "SGD", dict(lr=0.05, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    ("SGD", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True)),
    ("SGD", "SGD", dict(lr=0.05, weight_decay=0.1, maximize=True)),
    ("Momentum", "SGD", dict(lr=0.05, momentum=0.9)),
    ("Nesterov", "SGD", dict(lr=0.05, momentum=0.9, nesterov=True)),
    ("Adagrad", "Adagrad", dict(lr=0.05)),
    (
        "Adagrad",
        "Adagrad",
        dict(
            lr=0.05,
            lr_decay=0.3,
            weight_decay=0.1,
            initial_accumulator_value=0.2,
            eps=1e-6,
            maximize=True,
        ),
    ),
    ("RMSprop", "RMSprop", dict(lr=0.01)),
    ("RMSprop", "RMSprop", dict(lr=0.01, alpha=0.9, centered=True)),
    ("RMSprop", "RMSprop", dict(lr=0.01, alpha=0.9, momentum=0.8, weight_decay=0.1)),
    (
        "RMSprop",
        "RMSprop",
        dict(
            lr=0.01,
            alpha=0.9,
            centered=True,
            momentum=0.8,
            weight_decay=0.1,
            eps=1e-6,
            maximize=True,
        ),
    ),
    ("Adam", "Adam", dict(lr=0.01)),
    ("Adam", "Adam", dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, maximize=True)),
    ("Adam", "Adam", dict(lr=0.01, betas=(0.8, 0.95), amsgrad=True, eps=1e-6)),
    ("AdamW", "AdamW", dict(lr=0.01)),
    (
        "AdamW",
        "AdamW",
        dict(lr=0.01, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True, maximize=True),
    ),
]


def _case_id(case):
    ours, _theirs, kw = case
    flags = [k if v is True else f"{k}={v}" for k, v in kw.items() if k != "lr"]
    return ours + ("[" + ",".join(flags) + "]" if flags else "")


def _inputs(dtype):
    # bounded away from zero: see test_parity._inputs for why near-zero g is ill-conditioned
    rng = np.random.default_rng(2024)
    p0 = {n: rng.uniform(-3.0, 3.0, s).astype(dtype) for n, s in SHAPES.items()}
    grads = [
        {
            n: (np.where(rng.random(s) < 0.5, -1.0, 1.0) * rng.uniform(0.6, 2.0, s)).astype(dtype)
            for n, s in SHAPES.items()
        }
        for _ in range(STEPS)
    ]
    return p0, grads


def _torch_run(cls, kw, p0, grads, dtype):
    """torch.optim's trajectory; returns (params, {name: {state name: array}})."""
    tdtype = {np.float32: torch.float32, np.float64: torch.float64}[dtype]
    ps = {n: torch.tensor(a.astype(dtype), dtype=tdtype, requires_grad=True) for n, a in p0.items()}
    opt = getattr(torch.optim, cls)(list(ps.values()), **kw)
    for g in grads:
        for n, p in ps.items():
            p.grad = torch.tensor(g[n].astype(dtype), dtype=tdtype)
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


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_matches_torch_optim(case, dtype, backend):
    ours, theirs, kw = case
    p0, grads = _inputs(dtype)
    ref_p, ref_state = _torch_run(theirs, kw, p0, grads, np.float64)

    fo_kw = {
        k: v for k, v in kw.items() if not (ours in ("Momentum", "Nesterov") and k == "nesterov")
    }
    opt = getattr(fastopt, ours)(**fo_kw, backend=backend)
    params = {n: a.copy() for n, a in p0.items()}
    for g in grads:
        opt.update(params, g)

    t_p, t_state = _torch_run(theirs, kw, p0, grads, dtype)
    for n in SHAPES:
        assert set(opt.state[n]) == set(ref_state[n]), f"state names of {n}"
        assert_close(params[n], ref_p[n], dtype, f"fastopt {ours} param {n}")
        assert_close(t_p[n], ref_p[n], dtype, f"torch {theirs} param {n} (tolerance check)")
        for s, ref in ref_state[n].items():
            assert_close(opt.state[n][s], ref, dtype, f"fastopt {ours} {s} of {n}")
            assert_close(t_state[n][s], ref, dtype, f"torch {theirs} {s} of {n}")


@pytest.mark.parametrize(
    "ours, theirs",
    [
        ("SGD", "SGD"),
        ("Adagrad", "Adagrad"),
        ("RMSprop", "RMSprop"),
        ("Adam", "Adam"),
        ("AdamW", "AdamW"),
    ],
)
def test_defaults_match_torch(ours, theirs):
    """The constructor defaults are torch.optim's (Momentum, Nesterov and Lion have none there)."""
    import inspect

    ours_sig = inspect.signature(getattr(fastopt, ours)).parameters
    theirs_sig = inspect.signature(getattr(torch.optim, theirs)).parameters
    shared = [k for k in ours_sig if k in theirs_sig and k not in ("params", "backend")]
    assert "lr" in shared
    for k in shared:
        a, b = ours_sig[k].default, theirs_sig[k].default
        if isinstance(b, torch.Tensor):
            b = b.item()
        assert a == b or (isinstance(a, tuple) and tuple(a) == tuple(b)), f"{ours}.{k}: {a} != {b}"
