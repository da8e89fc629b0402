"""In-place functional entry points over flat arrays: one per optimizer.

Each function computes the per-step scalars on the host (in float64, cast once to the buffer
dtype) and runs one fused pass of the optimizer's per-element rule (``kernels/``) on the chosen
backend, or the NumPy oracle (``fastopt.reference``) when the backend is ``"numpy"``. ``step`` is
the 1-based step count. Arrays are 1-D, contiguous, of one float dtype, updated in place; optional
state arrays are ``None`` when the variant does not use them.
"""
import math

from . import reference
from .backends import resolve

__all__ = ["sgd", "adagrad", "rmsprop", "adam", "lion"]


def _run(backend, rule, flags, param, grad, states, k, oracle, oracle_kw):
    be = resolve(backend, param)
    if be.NAME == "numpy":
        oracle(param, grad, {n: s for n, s in states.items() if s is not None}, **oracle_kw)
    else:
        be.launch(rule, flags, param, grad, tuple(states.values()), k)


def sgd(param, grad, momentum_buffer=None, *, step, lr=1e-3, momentum=0.0, dampening=0.0,
        weight_decay=0.0, nesterov=False, maximize=False, backend="auto"):
    """SGD / Momentum / Nesterov; ``momentum_buffer`` is required when ``momentum != 0``."""
    first = step == 1
    if first and momentum != 0 and momentum_buffer is not None:
        # the rule computes b = 0·b + g on the first step; 0·NaN is NaN, so an uninitialised
        # buffer (PyTorch has none before step 1) must be cleared for b = g to hold exactly
        momentum_buffer[...] = 0
    k = (weight_decay, 0.0 if first else momentum, 1.0 if first else 1.0 - dampening, momentum, lr)
    flags = dict(maximize=maximize, decay=weight_decay != 0, momentum=momentum != 0,
                 nesterov=nesterov)
    _run(backend, "sgd", flags, param, grad, {"momentum_buffer": momentum_buffer}, k,
         reference.sgd, dict(step=step, lr=lr, momentum=momentum, dampening=dampening,
                             weight_decay=weight_decay, nesterov=nesterov, maximize=maximize))


def adagrad(param, grad, state_sum, *, step, lr=1e-2, lr_decay=0.0, weight_decay=0.0,
            eps=1e-10, maximize=False, backend="auto"):
    """AdaGrad with PyTorch's ``clr = lr / (1 + (t - 1) * lr_decay)``."""
    k = (weight_decay, lr / (1.0 + (step - 1) * lr_decay), eps)
    flags = dict(maximize=maximize, decay=weight_decay != 0)
    _run(backend, "adagrad", flags, param, grad, {"sum": state_sum}, k,
         reference.adagrad, dict(step=step, lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                 eps=eps, maximize=maximize))


def rmsprop(param, grad, square_avg, grad_avg=None, momentum_buffer=None, *, step, lr=1e-2,
            alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=False,
            maximize=False, backend="auto"):
    """RMSProp; ``grad_avg`` is required when centered, ``momentum_buffer`` when momentum > 0."""
    k = (weight_decay, alpha, 1.0 - alpha, eps, momentum, lr)
    flags = dict(maximize=maximize, decay=weight_decay != 0, centered=centered,
                 momentum=momentum > 0)
    _run(backend, "rmsprop", flags, param, grad,
         {"square_avg": square_avg, "grad_avg": grad_avg, "momentum_buffer": momentum_buffer}, k,
         reference.rmsprop, dict(step=step, lr=lr, alpha=alpha, eps=eps,
                                 weight_decay=weight_decay, momentum=momentum,
                                 centered=centered, maximize=maximize))


def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq=None, *, step, lr=1e-3,
         betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False, maximize=False,
         decoupled=False, backend="auto"):
    """Adam (``decoupled=True``: AdamW); ``max_exp_avg_sq`` is required with amsgrad."""
    beta1, beta2 = betas
    bc1 = 1.0 - beta1 ** step
    bc2 = 1.0 - beta2 ** step
    k = (weight_decay, 1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2,
         lr / bc1, 1.0 / math.sqrt(bc2), eps)
    flags = dict(maximize=maximize, decay=weight_decay != 0, decoupled=decoupled,
                 amsgrad=amsgrad)
    _run(backend, "adam", flags, param, grad,
         {"exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq, "max_exp_avg_sq": max_exp_avg_sq}, k,
         reference.adam, dict(step=step, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                              amsgrad=amsgrad, maximize=maximize, decoupled=decoupled))


def lion(param, grad, exp_avg, *, step, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0,
         maximize=False, backend="auto"):
    """Lion: sign of the interpolated momentum, decoupled weight decay."""
    beta1, beta2 = betas
    k = (1.0 - lr * weight_decay, beta1, 1.0 - beta1, beta2, 1.0 - beta2, lr)
    flags = dict(maximize=maximize, decay=weight_decay != 0)
    _run(backend, "lion", flags, param, grad, {"exp_avg": exp_avg}, k,
         reference.lion, dict(step=step, lr=lr, betas=betas, weight_decay=weight_decay,
                              maximize=maximize))
