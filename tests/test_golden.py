"""Golden values: a few steps of every optimizer worked out by hand on tiny float64 inputs.

Each expected value is written as the arithmetic done on paper (the numbers plugged into the
formulas of the README's Conventions), with hyperparameters chosen so most of it is exact in
binary. Every case is checked against the oracle (``fastopt.reference``) and against the optimizers
on every backend. The ``trap`` cases pin the places where a plausible implementation differs from
PyTorch: each also states the value the wrong formula would give, and asserts it is not that.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from conftest import backend_params, run_oracle
from tolerances import tol

import fastopt

sqrt = math.sqrt


@dataclass
class Case:
    name: str
    kwargs: dict
    p0: float
    grads: list
    #: per step: (param, {state name: value}) after that step
    expected: list
    #: per step: a param value a wrong formula would give (None: no claim)
    wrong: list = field(default_factory=list)


CASES = {
    # p -= lr*g, three times
    "sgd": Case(
        "SGD",
        dict(lr=0.1),
        1.0,
        [0.5, 0.25, 1.0],
        [(1 - 0.1 * 0.5, {}), (0.95 - 0.1 * 0.25, {}), (0.925 - 0.1 * 1.0, {})],
    ),
    # L2 decay: g = grad + wd*p, with p of that step
    "sgd_wd": Case(
        "SGD",
        dict(lr=0.1, weight_decay=0.5),
        1.0,
        [0.5, 0.25, 1.0],
        [
            (1 - 0.1 * (0.5 + 0.5 * 1.0), {}),  # 0.9
            (0.9 - 0.1 * (0.25 + 0.5 * 0.9), {}),  # 0.83
            (0.83 - 0.1 * (1.0 + 0.5 * 0.83), {}),
        ],
    ),  # 0.6885
    # trap: the first momentum step copies g (no dampening): b = 1, not (1 - 0.5)*1
    "sgd_momentum_dampening": Case(
        "SGD",
        dict(lr=0.1, momentum=0.5, dampening=0.5),
        1.0,
        [1.0, 1.0, 2.0],
        [
            (1 - 0.1 * 1.0, {"momentum_buffer": 1.0}),
            (0.9 - 0.1 * 1.0, {"momentum_buffer": 0.5 * 1.0 + 0.5 * 1.0}),
            (0.8 - 0.1 * 1.5, {"momentum_buffer": 0.5 * 1.0 + 0.5 * 2.0}),
        ],
        wrong=[1 - 0.1 * 0.5],
    ),
    # Momentum: b = μ·b + g; p -= lr·b  (textbook v = μv − lr·g; p += v: v = −0.1, −0.25)
    "momentum": Case(
        "Momentum",
        dict(lr=0.1, momentum=0.5),
        1.0,
        [1.0, 2.0],
        [
            (1 - 0.1, {"momentum_buffer": 1.0}),
            (1 - 0.1 - 0.25, {"momentum_buffer": 0.5 * 1.0 + 2.0}),
        ],
    ),
    # PyTorch's Nesterov: p -= lr·(g + μ·b) with the updated b
    "nesterov": Case(
        "Nesterov",
        dict(lr=0.1, momentum=0.5),
        1.0,
        [1.0, 2.0],
        [
            (1 - 0.1 * (1.0 + 0.5 * 1.0), {"momentum_buffer": 1.0}),
            (0.85 - 0.1 * (2.0 + 0.5 * 2.5), {"momentum_buffer": 0.5 * 1.0 + 2.0}),
        ],
    ),
    # trap: clr = lr / (1 + (t−1)·lr_decay): the first step uses the full lr
    "adagrad_lr_decay": Case(
        "AdaGrad",
        dict(lr=0.5, lr_decay=1.0, eps=0.0),
        1.0,
        [3.0, 4.0],
        [
            (1 - 0.5 / (1 + 0 * 1.0) * 3.0 / sqrt(9.0), {"sum": 9.0}),
            (0.5 - 0.5 / (1 + 1 * 1.0) * 4.0 / sqrt(25.0), {"sum": 9.0 + 16.0}),
        ],
        wrong=[1 - 0.5 / (1 + 1 * 1.0) * 3.0 / 3.0],
    ),
    "adagrad_initial_accumulator": Case(
        "AdaGrad",
        dict(lr=0.5, initial_accumulator_value=7.0, eps=0.0),
        1.0,
        [3.0],
        [(1 - 0.5 * 3.0 / sqrt(7.0 + 9.0), {"sum": 16.0})],
    ),
    # trap: eps outside the root: s = 1, eps = 1 -> d = √1 + 1 = 2 (inside: √2)
    "adagrad_eps_outside": Case(
        "AdaGrad",
        dict(lr=0.5, eps=1.0),
        1.0,
        [1.0],
        [(1 - 0.5 * 1.0 / (sqrt(1.0) + 1.0), {"sum": 1.0})],
        wrong=[1 - 0.5 * 1.0 / sqrt(1.0 + 1.0)],
    ),
    # v = α·v + (1−α)·g²;  p -= lr·g/(√v + eps)
    "rmsprop": Case(
        "RMSProp",
        dict(lr=0.1, alpha=0.75, eps=0.0),
        1.0,
        [2.0, 4.0],
        [
            (1 - 0.1 * 2.0 / sqrt(0.25 * 4.0), {"square_avg": 1.0}),
            (0.8 - 0.1 * 4.0 / sqrt(0.75 + 0.25 * 16.0), {"square_avg": 4.75}),
        ],
    ),
    # trap: eps outside the root: v = 1, eps = 1 -> d = 2
    "rmsprop_eps_outside": Case(
        "RMSProp",
        dict(lr=0.1, alpha=0.75, eps=1.0),
        1.0,
        [2.0],
        [(1 - 0.1 * 2.0 / (sqrt(1.0) + 1.0), {"square_avg": 1.0})],
        wrong=[1 - 0.1 * 2.0 / sqrt(1.0 + 1.0)],
    ),
    # centered: ḡ = ḡ + (1−α)(g − ḡ); d = √(v − ḡ²) + eps
    "rmsprop_centered": Case(
        "RMSProp",
        dict(lr=0.1, alpha=0.75, eps=0.0, centered=True),
        1.0,
        [2.0, -2.0],
        [
            (1 - 0.1 * 2.0 / sqrt(1.0 - 0.5**2), {"square_avg": 1.0, "grad_avg": 0.5}),
            (
                1 - 0.1 * 2.0 / sqrt(0.75) - 0.1 * -2.0 / sqrt(1.75 - (0.5 + 0.25 * -2.5) ** 2),
                {"square_avg": 0.75 + 0.25 * 4.0, "grad_avg": 0.5 + 0.25 * (-2.0 - 0.5)},
            ),
        ],
    ),
    # momentum: b = μ·b + g/d; p -= lr·b
    "rmsprop_momentum": Case(
        "RMSProp",
        dict(lr=0.1, alpha=0.75, eps=0.0, momentum=0.5),
        1.0,
        [2.0, 1.0],
        [
            (1 - 0.1 * 2.0, {"square_avg": 1.0, "momentum_buffer": 2.0 / 1.0}),
            (
                0.8 - 0.1 * (0.5 * 2.0 + 1.0 / 1.0),
                {"square_avg": 0.75 + 0.25 * 1.0, "momentum_buffer": 2.0},
            ),
        ],
    ),
    # Adam, β = (0.5, 0.75): bc1 = 0.5, 0.75; bc2 = 0.25, 0.4375
    "adam": Case(
        "Adam",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0),
        1.0,
        [2.0, 1.0],
        [
            (
                1 - (0.1 / 0.5) * 1.0 / (sqrt(1.0) / sqrt(0.25)),
                {"exp_avg": 0.5 * 2.0, "exp_avg_sq": 0.25 * 4.0},
            ),
            (
                0.9 - (0.1 / 0.75) * 1.0 / (sqrt(1.0) / sqrt(0.4375)),
                {"exp_avg": 0.5 * 1.0 + 0.5 * 1.0, "exp_avg_sq": 0.75 * 1.0 + 0.25 * 1.0},
            ),
        ],
    ),
    # trap: eps after the bias correction: d = √v/√bc2 + eps = 2 + 1, not (√v + eps)/√bc2 = 4
    "adam_eps_after_bias_correction": Case(
        "Adam",
        dict(lr=0.1, betas=(0.5, 0.75), eps=1.0),
        1.0,
        [2.0],
        [
            (
                1 - (0.1 / 0.5) * 1.0 / (sqrt(1.0) / sqrt(0.25) + 1.0),
                {"exp_avg": 1.0, "exp_avg_sq": 1.0},
            )
        ],
        wrong=[1 - (0.1 / 0.5) * 1.0 / ((sqrt(1.0) + 1.0) / sqrt(0.25))],
    ),
    # trap: AMSGrad keeps the max of the raw v (1.0 after step 1), not of v/bc2 (4.0)
    "adam_amsgrad_raw_max": Case(
        "Adam",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0, amsgrad=True),
        1.0,
        [2.0, 0.5],
        [
            (0.9, {"exp_avg": 1.0, "exp_avg_sq": 1.0, "max_exp_avg_sq": 1.0}),
            (
                0.9 - (0.1 / 0.75) * 0.75 / (sqrt(1.0) / sqrt(0.4375)),
                {
                    "exp_avg": 0.5 * 1.0 + 0.5 * 0.5,
                    "exp_avg_sq": 0.75 * 1.0 + 0.25 * 0.25,
                    "max_exp_avg_sq": 1.0,
                },
            ),
        ],
        wrong=[None, 0.9 - (0.1 / 0.75) * 0.75 / (sqrt(0.8125) / sqrt(0.4375))],
    ),
    # Adam's L2 decay enters the moments: g = 2 + 0.5·1 = 2.5
    "adam_l2": Case(
        "Adam",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.5),
        1.0,
        [2.0],
        [
            (
                1 - 0.2 * 1.25 / (sqrt(0.25 * 6.25) / 0.5),
                {"exp_avg": 1.25, "exp_avg_sq": 0.25 * 6.25},
            )
        ],
    ),
    # trap: AdamW decays by lr·wd (p *= 1 − 0.1·0.5), not by wd, and before the Adam step
    "adamw_decay_scaled_by_lr": Case(
        "AdamW",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0, weight_decay=0.5),
        1.0,
        [2.0, 1.0],
        [
            (1.0 * (1 - 0.1 * 0.5) - 0.1, {"exp_avg": 1.0, "exp_avg_sq": 1.0}),
            (
                0.85 * (1 - 0.1 * 0.5) - (0.1 / 0.75) * 1.0 / (sqrt(1.0) / sqrt(0.4375)),
                {"exp_avg": 1.0, "exp_avg_sq": 1.0},
            ),
        ],
        wrong=[1.0 * (1 - 0.5) - 0.1],
    ),
    # Lion: c uses β1, the stored momentum β2
    "lion": Case(
        "Lion",
        dict(lr=0.1, betas=(0.5, 0.75), weight_decay=0.5),
        1.0,
        [2.0, -8.0],
        [
            (1.0 * 0.95 - 0.1 * np.sign(0.5 * 0.0 + 0.5 * 2.0), {"exp_avg": 0.25 * 2.0}),
            (
                0.85 * 0.95 - 0.1 * np.sign(0.5 * 0.5 + 0.5 * -8.0),
                {"exp_avg": 0.75 * 0.5 + 0.25 * -8.0},
            ),
        ],
    ),
    # trap: maximize negates the gradient before the L2 term: g = −1 + 0.5·1 (not −(1 + 0.5))
    "sgd_maximize_wd": Case(
        "SGD",
        dict(lr=0.1, weight_decay=0.5, maximize=True),
        1.0,
        [1.0],
        [(1 - 0.1 * (-1.0 + 0.5 * 1.0), {})],
        wrong=[1 + 0.1 * 1.5],
    ),
    "adam_maximize": Case(
        "Adam",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0, maximize=True),
        1.0,
        [2.0],
        [(1 + 0.1, {"exp_avg": -1.0, "exp_avg_sq": 1.0})],
    ),
    "lion_maximize": Case(
        "Lion",
        dict(lr=0.1, betas=(0.5, 0.75), maximize=True),
        1.0,
        [2.0],
        [(1 + 0.1, {"exp_avg": -0.5})],
    ),
    "adagrad_maximize": Case(
        "AdaGrad", dict(lr=0.5, eps=0.0, maximize=True), 1.0, [3.0], [(1 + 0.5, {"sum": 9.0})]
    ),
    "rmsprop_maximize": Case(
        "RMSProp",
        dict(lr=0.1, alpha=0.75, eps=0.0, maximize=True),
        1.0,
        [2.0],
        [(1 + 0.2, {"square_avg": 1.0})],
    ),
}

EIGHT = {"SGD", "Momentum", "Nesterov", "AdaGrad", "RMSProp", "Adam", "AdamW", "Lion"}


def test_every_optimizer_has_golden_values():
    assert {c.name for c in CASES.values()} == EIGHT


def _close(actual, expected, what):
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol(np.float64))


def _check(case, t, p, state):
    want_p, want_state = case.expected[t]
    _close(p, want_p, f"param after step {t + 1}")
    for s, v in want_state.items():
        _close(state[s], v, f"{s} after step {t + 1}")
    assert set(state) == set(want_state), f"state buffers {sorted(state)}"
    if t < len(case.wrong) and case.wrong[t] is not None:
        assert not np.isclose(p, case.wrong[t], rtol=1e-9, atol=0), "the wrong formula's value"


@pytest.mark.parametrize("key", CASES)
def test_oracle_matches_hand_computation(key):
    case = CASES[key]
    for t in range(len(case.grads)):
        p, state = run_oracle(
            case.name,
            case.kwargs,
            np.array([case.p0]),
            [np.array([g]) for g in case.grads[: t + 1]],
        )
        _check(case, t, p[0], {s: a[0] for s, a in state.items()})


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("key", CASES)
def test_optimizer_matches_hand_computation(key, backend):
    """Two elements (the value and its negation, for the sign symmetry), step by step."""
    case = CASES[key]
    opt = getattr(fastopt, case.name)(**case.kwargs, backend=backend)
    p = np.array([case.p0, -case.p0])
    for t, g in enumerate(case.grads):
        opt.update({"x": p}, {"x": np.array([g, -g])})
        state = {s: np.asarray(a) for s, a in opt.state["x"].items()}
        _check(case, t, p[0], {s: a[0] for s, a in state.items()})
        # every update is odd in (p, g): negating both negates p and the odd state buffers
        want_p, want_state = case.expected[t]
        _close(p[1], -want_p, "mirrored param")
        for s, v in want_state.items():
            even = s in ("sum", "square_avg", "exp_avg_sq", "max_exp_avg_sq")
            _close(state[s][1], v if even else -v, f"mirrored {s}")
