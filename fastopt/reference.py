"""The NumPy oracle: PyTorch's ``torch.optim`` formulas (optax's for the optimizers torch.optim
lacks), array at a time.

Written independently of the per-element rules in ``kernels/``: whole-array NumPy expressions
in the order ``torch.optim``'s single-tensor code (or optax's) uses, in the arrays' own dtype
(float64 inputs give the float64 reference the tests compare against). Every function updates
``param`` and the arrays of ``state`` in place; ``step`` is the 1-based step count (incremented
before use).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "adabelief",
    "adadelta",
    "adagrad",
    "adam",
    "adamax",
    "adan",
    "ademamix",
    "asgd",
    "lion",
    "nadam",
    "radam",
    "rmsprop",
    "rprop",
    "sgd",
]


def _grad(
    grad: npt.NDArray[Any], param: npt.NDArray[Any], weight_decay: float, maximize: bool
) -> npt.NDArray[Any]:
    g = -grad if maximize else grad.copy()
    if weight_decay != 0:
        g = g + weight_decay * param
    return g


def _decayed_grad(
    grad: npt.NDArray[Any],
    param: npt.NDArray[Any],
    lr: float,
    weight_decay: float,
    decoupled: bool,
    maximize: bool,
) -> npt.NDArray[Any]:
    """The gradient an Adam-family step uses: decoupled, ``p ← p·(1 − lr·λ)`` first (in
    place) and ``g`` as it is; coupled, ``g + λ·p`` (``_grad``)."""
    if decoupled:
        param *= 1 - lr * weight_decay
        return _grad(grad, param, 0.0, maximize)
    return _grad(grad, param, weight_decay, maximize)


def sgd(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    g = _grad(grad, param, weight_decay, maximize)
    if momentum != 0:
        buf = state["momentum_buffer"]
        if step == 1:
            buf[...] = g  # the first step copies the gradient: no dampening
        else:
            buf[...] = momentum * buf + (1 - dampening) * g
        g = g + momentum * buf if nesterov else buf
    param -= lr * g


def adagrad(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    eps: float = 1e-10,
    maximize: bool = False,
) -> None:
    g = _grad(grad, param, weight_decay, maximize)
    clr = lr / (1 + (step - 1) * lr_decay)
    s = state["sum"]
    s += g * g
    param -= clr * (g / (np.sqrt(s) + eps))


def _minus_square(v: npt.NDArray[Any], ga: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``v - ga*ga`` rounded once, as torch's ``v.addcmul(ga, ga, value=-1)`` is (one fused
    multiply-add on FMA hardware): ``inf`` stays ``inf`` where ``ga*ga`` overflows."""
    if v.dtype == np.float32:  # float64 holds the exact square of a float32 and its range
        return (v.astype(np.float64) - np.square(ga.astype(np.float64))).astype(np.float32)
    # float64: Dekker's exact product sq + err = ga*ga (Veltkamp's split), then (v - sq) - err
    with np.errstate(over="ignore", invalid="ignore"):
        sq = ga * ga
        c = 134217729.0 * ga  # 2**27 + 1
        hi = c - (c - ga)
        lo = ga - hi
        err = ((hi * hi - sq) + 2.0 * hi * lo) + lo * lo
        out = (v - sq) - np.where(np.isfinite(err), err, 0.0)
    return np.where(np.isinf(sq) & np.isfinite(ga) & (v == np.inf), np.inf, out)


def rmsprop(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    maximize: bool = False,
) -> None:
    g = _grad(grad, param, weight_decay, maximize)
    v = state["square_avg"]
    v[...] = alpha * v + (1 - alpha) * g * g
    if centered:
        ga = state["grad_avg"]
        ga += (1 - alpha) * (g - ga)
        avg = np.sqrt(_minus_square(v, ga)) + eps
    else:
        avg = np.sqrt(v) + eps
    if momentum > 0:
        buf = state["momentum_buffer"]
        buf[...] = momentum * buf + g / avg
        param -= lr * buf
    else:
        param -= lr * (g / avg)


def adam(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
) -> None:
    beta1, beta2 = betas
    g = _decayed_grad(grad, param, lr, weight_decay, decoupled_weight_decay, maximize)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m[...] = beta1 * m + (1 - beta1) * g
    v[...] = beta2 * v + (1 - beta2) * g * g
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    if amsgrad:
        vmax = state["max_exp_avg_sq"]
        np.maximum(vmax, v, out=vmax)  # NaN in either gives NaN, as torch.maximum
        v = vmax
    denom = np.sqrt(v) / np.sqrt(bc2) + eps
    param -= (lr / bc1) * m / denom


def lion(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.99),
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    beta1, beta2 = betas
    g = -grad if maximize else grad
    param *= 1 - lr * weight_decay
    m = state["exp_avg"]
    param -= lr * np.sign(beta1 * m + (1 - beta1) * g)
    m[...] = beta2 * m + (1 - beta2) * g


def adamax(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    beta1, beta2 = betas
    g = _grad(grad, param, weight_decay, maximize)
    m, u = state["exp_avg"], state["exp_inf"]
    m += (1 - beta1) * (g - m)  # torch's lerp (weight 1 - beta1 < 0.5 for beta1 > 0.5)
    u[...] = np.maximum(beta2 * u, np.abs(g) + eps)  # NaN propagates, as torch.maximum does
    param -= (lr / (1 - beta1**step)) * m / u


def _nadam_mu(beta1: float, momentum_decay: float, step: int) -> float:
    return beta1 * (1.0 - 0.5 * 0.96 ** (step * momentum_decay))


def nadam(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> None:
    """``state["mu_product"]`` is a 0-d array: the product of the momentum schedule so far, in
    torch's scalar dtype (float32 unless torch's default dtype is float64), as torch keeps it."""
    beta1, beta2 = betas
    g = _decayed_grad(grad, param, lr, weight_decay, decoupled_weight_decay, maximize)
    mu = _nadam_mu(beta1, momentum_decay, step)
    mu_next = _nadam_mu(beta1, momentum_decay, step + 1)
    mu_product = state["mu_product"]
    mu_product[...] = mu_product * mu
    mu_product_next = float(mu_product) * mu_next
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m += (1 - beta1) * (g - m)  # torch's lerp (weight 1 - beta1 < 0.5 for beta1 > 0.5)
    v[...] = beta2 * v + (1 - beta2) * g * g
    denom = np.sqrt(v / (1 - beta2**step)) + eps
    param -= (lr * (1 - mu) / (1 - float(mu_product))) * g / denom
    param -= (lr * mu_next / (1 - mu_product_next)) * m / denom


def radam(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    maximize: bool = False,
) -> None:
    beta1, beta2 = betas
    g = _decayed_grad(grad, param, lr, weight_decay, decoupled_weight_decay, maximize)
    m, v = state["exp_avg"], state["exp_avg_sq"]
    m += (1 - beta1) * (g - m)  # torch's lerp (weight 1 - beta1 < 0.5 for beta1 > 0.5)
    v[...] = beta2 * v + (1 - beta2) * g * g
    bc1, bc2 = 1 - beta1**step, 1 - beta2**step
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * step * beta2**step / bc2
    if rho_t > 5.0:
        rect = (
            (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        ) ** 0.5
        param -= (m / bc1) * lr * (bc2**0.5 / (np.sqrt(v) + eps)) * rect
    else:
        param -= (m / bc1) * lr


def adadelta(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    g = _grad(grad, param, weight_decay, maximize)
    v, acc = state["square_avg"], state["acc_delta"]
    v[...] = rho * v + (1 - rho) * g * g
    delta = np.sqrt(acc + eps) / np.sqrt(v + eps) * g
    acc[...] = rho * acc + (1 - rho) * delta * delta
    param -= lr * delta


def rprop(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50.0),
    maximize: bool = False,
) -> None:
    """``state["step_size"]`` starts at lr, ``state["prev"]`` at 0 (torch fills them when it
    creates the state, at the first step)."""
    dt = param.dtype.type  # torch writes the etas and clamps with the bounds in the param dtype
    etaminus, etaplus = dt(etas[0]), dt(etas[1])
    lo, hi = dt(step_sizes[0]), dt(step_sizes[1])
    g = -grad if maximize else grad.copy()
    prev, size = state["prev"], state["step_size"]
    s = _torch_sign(g * prev)
    # torch rewrites the sign in place: > 0 -> etaplus, < 0 -> etaminus, 0 -> 1
    factor = np.where(s > 0, etaplus, np.where(s < 0, etaminus, dt(1)))
    size[...] = np.clip(size * factor, lo, hi)
    g = np.where(factor == etaminus, dt(0), g)  # torch's test: the factor equal to etaminus
    param -= _torch_sign(g) * size
    prev[...] = g


def _torch_sign(x: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """``torch.sign``: NumPy's, except that the sign of NaN is 0."""
    with np.errstate(invalid="ignore"):
        return np.where(np.isnan(x), 0, np.sign(x)).astype(x.dtype)


def asgd(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """``state["eta"]`` and ``state["mu"]`` are 0-d arrays (lr and 1 before the first step) in
    torch's scalar dtype (float32 by default), rewritten at the end of each step as torch does;
    ``state["ax"]`` is the average."""
    g = _grad(grad, param, weight_decay, maximize)
    eta, mu, ax = state["eta"], state["mu"], state["ax"]
    param *= 1 - lambd * float(eta)
    param -= float(eta) * g
    if float(mu) != 1:
        ax += (param - ax) * float(mu)
    else:
        ax[...] = param
    eta[...] = lr / ((1 + lambd * lr * step) ** alpha)
    mu[...] = 1 / max(1, step - t0)


def adabelief(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-16,
    eps_root: float = 1e-16,
    nesterov: bool = False,
    maximize: bool = False,
) -> None:
    """``optax.adabelief`` (0.2.8): ``scale_by_belief`` then ``-lr``; ``exp_avg`` is optax's
    ``mu``, ``exp_avg_var`` its ``nu``."""
    b1, b2 = betas
    g = -grad if maximize else grad
    mu, nu = state["exp_avg"], state["exp_avg_var"]
    mu[...] = (1 - b1) * g + b1 * mu
    nu[...] = (1 - b2) * (g - mu) ** 2 + b2 * nu  # the prediction error of the updated mean
    nu += eps_root
    if nesterov:
        mu_hat = b1 * (mu / (1 - b1 ** (step + 1))) + (1 - b1) * (g / (1 - b1**step))
    else:
        mu_hat = mu / (1 - b1**step)
    nu_hat = nu / (1 - b2**step)
    param += -lr * (mu_hat / (np.sqrt(nu_hat) + eps))


def adan(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float, float] = (0.98, 0.92, 0.99),
    eps: float = 1e-8,
    eps_root: float = 1e-8,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """``optax.adan`` (0.2.8): ``scale_by_adan``, ``add_decayed_weights``, then ``-lr``;
    ``exp_avg``, ``exp_avg_diff``, ``exp_avg_sq``, ``prev_grad`` are optax's ``m``, ``v``,
    ``n``, ``g``."""
    b1, b2, b3 = betas
    g = -grad if maximize else grad
    m, v, n, prev = (state[s] for s in ("exp_avg", "exp_avg_diff", "exp_avg_sq", "prev_grad"))
    diff = np.zeros_like(g) if step == 1 else g - prev  # no previous gradient at step 1
    m[...] = (1 - b1) * g + b1 * m
    v[...] = (1 - b2) * diff + b2 * v
    n[...] = (1 - b3) * (g + (1 - b2) * diff) ** 2 + b3 * n
    m_hat = m / (1 - b1**step)
    v_hat = v / (1 - b2**step)
    n_hat = n / (1 - b3**step)
    u = (m_hat + (1 - b2) * v_hat) / (np.sqrt(n_hat + eps_root) + eps)
    param += -lr * (u + weight_decay * param)
    prev[...] = g


def ademamix(
    param: npt.NDArray[Any],
    grad: npt.NDArray[Any],
    state: dict[str, Any],
    *,
    step: int,
    lr: float,
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    alpha: float = 5.0,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    weight_decay: float = 0.0,
    maximize: bool = False,
) -> None:
    """``optax.contrib.ademamix`` (0.2.8) with constant ``b3`` and ``alpha``:
    ``scale_by_ademamix``, ``add_decayed_weights``, then ``-lr``; ``exp_avg_fast``,
    ``exp_avg_slow``, ``exp_avg_sq`` are optax's ``m1``, ``m2``, ``nu``."""
    b1, b2, b3 = betas
    g = -grad if maximize else grad
    m1, m2, nu = state["exp_avg_fast"], state["exp_avg_slow"], state["exp_avg_sq"]
    m1[...] = (1 - b1) * g + b1 * m1
    m2[...] = (1 - b3) * g + b3 * m2
    nu[...] = (1 - b2) * g**2 + b2 * nu
    m1_hat = m1 / (1 - b1**step)
    nu_hat = nu / (1 - b2**step)  # the slow average m2 is not bias-corrected
    u = (m1_hat + alpha * m2) / (np.sqrt(nu_hat + eps_root) + eps)
    param += -lr * (u + weight_decay * param)
