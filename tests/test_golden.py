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
from conftest import backend_params
from support.oracle import run_oracle, spec_of
from support.tolerances import tol

import fastopt
from fastopt.optimizers import CLASSES

sqrt = math.sqrt


def _f32(x):
    return float(np.float32(x))


#: RAdam's rectification term at step 6 with β2 = 0.9 (ρ∞ = 19)
_RHO6 = 19 - 12 * 0.9**6 / (1 - 0.9**6)
_RECT6 = sqrt((_RHO6 - 4) * (_RHO6 - 2) * 19 / ((19 - 4) * (19 - 2) * _RHO6))
#: ASGD's params after steps 2 and 3 (η of float32, see the case)
_ASGD_P2 = 0.25 * (1 - 0.5 * _f32(0.5 / 1.25)) - _f32(0.5 / 1.25) * 2.0
_ASGD_P3 = _ASGD_P2 * (1 - 0.5 * _f32(0.5 / 1.5)) - _f32(0.5 / 1.5) * -1.0


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
    # Adamax, β = (0.5, 0.75): u = max(β2·u, |g|) decays (2 → 1.5), clr = lr / (1 − β1^t)
    "adamax": Case(
        "Adamax",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0),
        1.0,
        [2.0, 0.5],
        [
            (1 - (0.1 / 0.5) * 1.0 / 2.0, {"exp_avg": 1.0, "exp_inf": 2.0}),
            (
                0.9 - (0.1 / 0.75) * 0.75 / 1.5,
                {"exp_avg": 0.5 * 1.0 + 0.5 * 0.5, "exp_inf": max(0.75 * 2.0, 0.5)},
            ),
        ],
        wrong=[None, 0.9 - (0.1 / 0.75) * 0.75 / 2.0],  # an undecayed max
    ),
    # NAdam with ψ = 0: μ_t = β1·(1 − 0.5) = 0.25 every step, Π = 0.25, 0.0625 (exact in
    # float32); bc2 = 0.25, 0.4375
    "nadam": Case(
        "NAdam",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0, momentum_decay=0.0),
        1.0,
        [2.0, 1.0],
        [
            (
                1 - 0.1 * 0.75 / 0.75 * 2.0 / 2.0 - 0.1 * 0.25 / (1 - 0.0625) * 1.0 / 2.0,
                {"exp_avg": 1.0, "exp_avg_sq": 1.0},
            ),
            (
                (1 - 0.1 - 0.1 * 0.25 / 0.9375 / 2.0)
                - 0.1 * 0.75 / (1 - 0.0625) * 1.0 / sqrt(1.0 / 0.4375)
                - 0.1 * 0.25 / (1 - 0.0625 * 0.25) * 1.0 / sqrt(1.0 / 0.4375),
                {"exp_avg": 1.0, "exp_avg_sq": 1.0},
            ),
        ],
    ),
    # NAdam's schedule with 0.96^ψ = 0.5: μ1 = 0.5·(1 − 0.25) = 0.375, μ2 = 0.4375; trap: the
    # momentum term takes μ_{t+1} and Π_t·μ_{t+1}, not μ_t and Π_t
    "nadam_schedule": Case(
        "NAdam",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0, momentum_decay=math.log(0.5) / math.log(0.96)),
        1.0,
        [2.0],
        [
            (
                1 - 0.1 * 0.625 / 0.625 * 2.0 / 2.0 - 0.1 * 0.4375 / (1 - 0.375 * 0.4375) / 2.0,
                {"exp_avg": 1.0, "exp_avg_sq": 1.0},
            )
        ],
        wrong=[1 - 0.1 - 0.1 * 0.375 / (1 - 0.375) / 2.0],
    ),
    # RAdam, β = (0.5, 0.9), g = 1 throughout: m/bc1 = 1 and √v/√bc2 = 1, so the step is lr
    # while ρ_t <= 5 (steps 1..5) and lr·r_6 once rectified: ρ∞ = 19, ρ_6 = 19 − 12·0.9⁶/(1 − 0.9⁶)
    "radam_rectification": Case(
        "RAdam",
        dict(lr=0.1, betas=(0.5, 0.9), eps=0.0),
        1.0,
        [1.0] * 6,
        [(1 - 0.1 * t, {"exp_avg": 1 - 0.5**t, "exp_avg_sq": 1 - 0.9**t}) for t in range(1, 6)]
        + [
            (
                0.5 - 0.1 * _RECT6,
                {"exp_avg": 1 - 0.5**6, "exp_avg_sq": 1 - 0.9**6},
            )
        ],
        wrong=[None] * 5 + [0.4],  # unrectified at step 6
    ),
    # RAdam's decoupled decay: p = 2·(1 − 0.1·0.5), then the plain step; the moments never see
    # wd·p (L2 decay would give m = 0.5·3)
    "radam_decoupled": Case(
        "RAdam",
        dict(lr=0.1, betas=(0.5, 0.9), eps=0.0, weight_decay=0.5, decoupled_weight_decay=True),
        2.0,
        [2.0],
        [(2.0 * 0.95 - 0.1 * 1.0 / 0.5, {"exp_avg": 1.0, "exp_avg_sq": 0.1 * 4.0})],
    ),
    # Adadelta, ρ = 0.5, eps = 0.25: Δ = √(a + eps)/√(v + eps)·g = 0.5/1.5·2; trap: eps inside
    # both roots, not added to them
    "adadelta": Case(
        "Adadelta",
        dict(lr=1.0, rho=0.5, eps=0.25),
        1.0,
        [2.0, 1.0],
        [
            (1 - 2.0 / 3.0, {"square_avg": 2.0, "acc_delta": 0.5 * (2.0 / 3.0) ** 2}),
            (
                1 / 3 - sqrt(2.0 / 9.0 + 0.25) / sqrt(1.5 + 0.25),
                {
                    "square_avg": 0.5 * 2.0 + 0.5 * 1.0,
                    "acc_delta": 0.5 * 2.0 / 9.0 + 0.5 * (sqrt(2.0 / 9.0 + 0.25) / sqrt(1.75)) ** 2,
                },
            ),
        ],
        wrong=[1 - 0.25 / (sqrt(2.0) + 0.25) * 2.0],
    ),
    # Rprop, η = (0.5, 2), sizes in [0.1, 1.5], lr = 0.5: grow on the same sign, shrink on a flip
    # (where the gradient counts as 0: no move, prev = 0), clamp at 1.5
    "rprop": Case(
        "Rprop",
        dict(lr=0.5, etas=(0.5, 2.0), step_sizes=(0.1, 1.5)),
        1.0,
        [1.0, 2.0, -1.0, 3.0, 3.0, 3.0],
        [
            (0.5, {"prev": 1.0, "step_size": 0.5}),
            (-0.5, {"prev": 2.0, "step_size": 1.0}),
            (-0.5, {"prev": 0.0, "step_size": 0.5}),
            (-1.0, {"prev": 3.0, "step_size": 0.5}),
            (-2.0, {"prev": 3.0, "step_size": 1.0}),
            (-3.5, {"prev": 3.0, "step_size": 1.5}),
        ],
        wrong=[None, None, 0.0],  # the flipped step taken with the shrunk size
    ),
    # ASGD, lr = 0.5, λ = 0.5, α = 1, t0 = 0: η = 0.5, then f32(0.5/1.25), f32(0.5/1.5) (torch keeps
    # η in float32); μ = 1, 1, then 1/2: ax copies p twice, then averages; trap: step 1 uses the
    # initial η = lr, not the decayed one
    "asgd": Case(
        "ASGD",
        dict(lr=0.5, lambd=0.5, alpha=1.0, t0=0.0),
        1.0,
        [1.0, 2.0, -1.0],
        [
            (0.25, {"ax": 0.25}),
            (_ASGD_P2, {"ax": _ASGD_P2}),
            (_ASGD_P3, {"ax": _ASGD_P2 + (_ASGD_P3 - _ASGD_P2) * 0.5}),
        ],
        wrong=[1.0 * (1 - 0.5 * 0.4) - 0.4],
    ),
    # AdaBelief, β = (0.5, 0.75): s takes (g − m)² of the updated mean m, e = 2 − 1 at step 1;
    # bc1 = 0.5, 0.75; bc2 = 0.25, 0.4375. trap: Adam's g² (or g − m of the old mean, 2 − 0)
    # would give s = 1, √(s/bc2) = 2
    "adabelief": Case(
        "AdaBelief",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0, eps_root=0.0),
        1.0,
        [2.0, 1.0],
        [
            (1 - 0.1 * (1.0 / 0.5) / sqrt(0.25 / 0.25), {"exp_avg": 1.0, "exp_avg_var": 0.25}),
            (
                0.8 - 0.1 * (1.0 / 0.75) / sqrt(0.75 * 0.25 / 0.4375),
                {"exp_avg": 0.5 * 1.0 + 0.5 * 1.0, "exp_avg_var": 0.75 * 0.25 + 0.25 * 0.0},
            ),
        ],
        wrong=[1 - 0.1 * (1.0 / 0.5) / sqrt(1.0 / 0.25)],
    ),
    # trap: eps_root is added to s, which keeps it (0.25 + 0.75), and eps outside the root after
    # the bias correction: an eps_root inside the root only would give √(0.25/0.25 + 0.75)
    "adabelief_eps": Case(
        "AdaBelief",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.5, eps_root=0.75),
        1.0,
        [2.0],
        [(1 - 0.1 * (1.0 / 0.5) / (sqrt(1.0 / 0.25) + 0.5), {"exp_avg": 1.0, "exp_avg_var": 1.0})],
        wrong=[1 - 0.1 * (1.0 / 0.5) / (sqrt(0.25 / 0.25 + 0.75) + 0.5)],
    ),
    # Nesterov: m̂ = β1·m/(1 − β1²) + (1 − β1)·g/(1 − β1) = 0.5/0.75 + 0.5·2/0.5; trap: m/bc1
    "adabelief_nesterov": Case(
        "AdaBelief",
        dict(lr=0.1, betas=(0.5, 0.75), eps=0.0, eps_root=0.0, nesterov=True),
        1.0,
        [2.0],
        [
            (
                1 - 0.1 * (0.5 * 1.0 / 0.75 + 0.5 * 2.0 / 0.5) / 1.0,
                {"exp_avg": 1.0, "exp_avg_var": 0.25},
            )
        ],
        wrong=[0.8],
    ),
    # Adan, β = (0.5, 0.75, 0.5): Δ = 0 at step 1 (no previous gradient), then 1 − 2; bc1 = bc3
    # = 0.5, 0.75 and bc2 = 0.25, 0.4375. trap: Δ = g − 0 at step 1 (the state's prev = 0)
    # moves p alike at step 1 (u = sign(g) either way) but leaves v = 0.5, n = 3.125 behind
    "adan": Case(
        "Adan",
        dict(lr=0.1, betas=(0.5, 0.75, 0.5), eps=0.0, eps_root=0.0),
        1.0,
        [2.0, 1.0],
        [
            (
                1 - 0.1 * (1.0 / 0.5) / sqrt(2.0 / 0.5),
                {"exp_avg": 1.0, "exp_avg_diff": 0.0, "exp_avg_sq": 2.0, "prev_grad": 2.0},
            ),
            (
                0.9
                - 0.1 * (1.0 / 0.75 + 0.25 * -0.25 / 0.4375) / sqrt((0.5 * 0.75**2 + 1.0) / 0.75),
                {
                    "exp_avg": 0.5 * 1.0 + 0.5 * 1.0,
                    "exp_avg_diff": 0.25 * -1.0,
                    "exp_avg_sq": 0.5 * (1.0 + 0.25 * -1.0) ** 2 + 0.5 * 2.0,
                    "prev_grad": 1.0,
                },
            ),
        ],
        wrong=[
            None,
            0.9
            - 0.1 * (1.0 / 0.75 + 0.25 * 0.125 / 0.4375) / sqrt((0.5 * 0.75**2 + 1.5625) / 0.75),
        ],
    ),
    # trap: Adan's decay is added to the update before lr scales it (p −= lr·(u + wd·p)); as L2
    # (g + wd·p) it would vanish into u = sign(g) at step 1
    "adan_weight_decay": Case(
        "Adan",
        dict(lr=0.1, betas=(0.5, 0.75, 0.5), eps=0.0, eps_root=0.0, weight_decay=0.5),
        1.0,
        [2.0],
        [
            (
                1 - 0.1 * (2.0 / 2.0 + 0.5 * 1.0),
                {"exp_avg": 1.0, "exp_avg_diff": 0.0, "exp_avg_sq": 2.0, "prev_grad": 2.0},
            )
        ],
        wrong=[0.9],
    ),
    # trap: eps_root inside the root after the bias correction, eps outside: n̂ = 4 → √(4 + 5)
    # + 0.5; before the bias correction it would be √((2 + 5)/0.5) + 0.5
    "adan_eps": Case(
        "Adan",
        dict(lr=0.1, betas=(0.5, 0.75, 0.5), eps=0.5, eps_root=5.0),
        1.0,
        [2.0],
        [
            (
                1 - 0.1 * 2.0 / (sqrt(2.0 / 0.5 + 5.0) + 0.5),
                {"exp_avg": 1.0, "exp_avg_diff": 0.0, "exp_avg_sq": 2.0, "prev_grad": 2.0},
            )
        ],
        wrong=[1 - 0.1 * 2.0 / (sqrt((2.0 + 5.0) / 0.5) + 0.5)],
    ),
    # AdEMAMix, β = (0.5, 0.75, 0.5), α = 2: bc1 = 0.5, 0.75 and bc2 = 0.25, 0.4375 for the fast
    # average and ν; trap: the slow average m2 is not bias-corrected (m2/(1 − β3) = 2 would
    # give u = (2 + 2·2)/2 = 3)
    "ademamix": Case(
        "AdEMAMix",
        dict(lr=0.1, betas=(0.5, 0.75, 0.5), alpha=2.0, eps=0.0, eps_root=0.0),
        1.0,
        [2.0, 1.0],
        [
            (
                1 - 0.1 * (1.0 / 0.5 + 2.0 * 1.0) / sqrt(1.0 / 0.25),
                {"exp_avg_fast": 1.0, "exp_avg_slow": 1.0, "exp_avg_sq": 1.0},
            ),
            (
                0.8 - 0.1 * (1.0 / 0.75 + 2.0 * 1.0) / sqrt(1.0 / 0.4375),
                {
                    "exp_avg_fast": 0.5 * 1.0 + 0.5 * 1.0,
                    "exp_avg_slow": 0.5 * 1.0 + 0.5 * 1.0,
                    "exp_avg_sq": 0.75 * 1.0 + 0.25 * 1.0,
                },
            ),
        ],
        wrong=[1 - 0.1 * (1.0 / 0.5 + 2.0 * 1.0 / 0.5) / sqrt(1.0 / 0.25)],
    ),
    # trap: the decay is added to the update before lr scales it, p −= lr·(u + wd·p); as L2
    # (g + wd·p) it would scale away: u = (2.5 + 2·1.25)/2.5 = 2
    "ademamix_weight_decay": Case(
        "AdEMAMix",
        dict(lr=0.1, betas=(0.5, 0.75, 0.5), alpha=2.0, eps=0.0, eps_root=0.0, weight_decay=0.5),
        1.0,
        [2.0],
        [
            (
                1 - 0.1 * ((1.0 / 0.5 + 2.0 * 1.0) / sqrt(1.0 / 0.25) + 0.5 * 1.0),
                {"exp_avg_fast": 1.0, "exp_avg_slow": 1.0, "exp_avg_sq": 1.0},
            )
        ],
        wrong=[0.8],
    ),
    # trap: eps_root inside the root after the bias correction, eps outside: ν̂ = 4 → √(4 + 5)
    # + 0.5; before the bias correction it would be √((1 + 5)/0.25) + 0.5
    "ademamix_eps": Case(
        "AdEMAMix",
        dict(lr=0.1, betas=(0.5, 0.75, 0.5), alpha=2.0, eps=0.5, eps_root=5.0),
        1.0,
        [2.0],
        [
            (
                1 - 0.1 * 4.0 / (sqrt(1.0 / 0.25 + 5.0) + 0.5),
                {"exp_avg_fast": 1.0, "exp_avg_slow": 1.0, "exp_avg_sq": 1.0},
            )
        ],
        wrong=[1 - 0.1 * 4.0 / (sqrt((1.0 + 5.0) / 0.25) + 0.5)],
    ),
}


def test_every_optimizer_has_golden_values():
    assert {c.name for c in CASES.values()} == set(CLASSES)


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
            even = spec_of(case.name).slot(s).even  # the spec says which buffers keep a sign
            _close(state[s][1], v if even else -v, f"mirrored {s}")
