"""The eight optimizers, with ``torch.optim``'s names, defaults and formulas.

Each class holds hyperparameters and state; the math runs in ``fastopt.functional`` (host
scalars) and ``kernels/`` (the per-element rule). ``t`` counts steps from 1. With
``maximize=True`` the gradient is negated first.
"""
from . import functional as F
from .optimizer import Optimizer

__all__ = ["SGD", "Momentum", "Nesterov", "AdaGrad", "Adagrad", "RMSProp", "RMSprop", "Adam",
           "AdamW", "Lion"]


def _nonneg(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"invalid {name}: {value!r} (expected a number >= 0)")
    return float(value)


def _unit(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1:
        raise ValueError(f"invalid {name}: {value!r} (expected 0 <= {name} < 1)")
    return float(value)


def _betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"invalid betas: {betas!r} (expected a pair (beta1, beta2))")
    return (_unit("beta1", betas[0]), _unit("beta2", betas[1]))


class SGD(Optimizer):
    """Stochastic gradient descent, with optional momentum and Nesterov momentum.

        g = grad + wd·p
        b = g (first step);  b = μ·b + (1−τ)·g (later)
        g = g + μ·b (nesterov)  or  g = b
        p = p − lr·g

    Defaults: lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False
    (``torch.optim.SGD``; Nesterov form of Sutskever et al. 2013 as PyTorch writes it).
    """

    _hyper = ("lr", "momentum", "dampening", "weight_decay")
    _flags = ("nesterov", "maximize")

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                 *, maximize=False, backend="auto"):
        self.lr = _nonneg("lr", lr)
        self.momentum = _nonneg("momentum", momentum)
        self.dampening = float(dampening)
        self.weight_decay = _nonneg("weight_decay", weight_decay)
        if nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        self.nesterov, self.maximize = bool(nesterov), bool(maximize)
        self._has_momentum = self.momentum != 0
        super().__init__(backend)

    def _state_names(self):
        return ("momentum_buffer",) if self._has_momentum else ()

    def _apply(self, param, grad, states, step, backend):
        if (self.momentum != 0) != self._has_momentum:
            raise ValueError("momentum cannot be switched between zero and non-zero after "
                             "construction (it decides whether a momentum buffer exists)")
        F.sgd(param, grad, states.get("momentum_buffer"), step=step, lr=self.lr,
              momentum=self.momentum, dampening=self.dampening, weight_decay=self.weight_decay,
              nesterov=self.nesterov, maximize=self.maximize, backend=backend)


class Momentum(SGD):
    """SGD with heavy-ball momentum (the textbook ``v = μv − ηg; p += v``, PyTorch's form).

        b = μ·b + g;  p = p − lr·b      (b = g on the first step)

    Defaults: lr=0.01, momentum=0.9. Same trajectory as the textbook form at constant lr.
    """

    def __init__(self, lr=0.01, momentum=0.9, dampening=0.0, weight_decay=0.0, *,
                 maximize=False, backend="auto"):
        if momentum <= 0:
            raise ValueError(f"invalid momentum: {momentum!r} (Momentum needs momentum > 0)")
        super().__init__(lr, momentum, dampening, weight_decay, False, maximize=maximize,
                         backend=backend)


class Nesterov(SGD):
    """Nesterov accelerated gradient, in PyTorch's form (SGD with ``nesterov=True``).

        b = μ·b + g;  p = p − lr·(g + μ·b)      (b = g on the first step)

    Defaults: lr=0.01, momentum=0.9.
    """

    def __init__(self, lr=0.01, momentum=0.9, weight_decay=0.0, *, maximize=False,
                 backend="auto"):
        if momentum <= 0:
            raise ValueError(f"invalid momentum: {momentum!r} (Nesterov needs momentum > 0)")
        super().__init__(lr, momentum, 0.0, weight_decay, True, maximize=maximize,
                         backend=backend)


class AdaGrad(Optimizer):
    """AdaGrad (Duchi et al. 2011): per-coordinate steps that shrink with the squared history.

        g = grad + wd·p;  clr = lr / (1 + (t−1)·lr_decay)
        s = s + g²
        p = p − clr · g / (√s + eps)

    Defaults: lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10.
    """

    _hyper = ("lr", "lr_decay", "weight_decay", "eps")
    _flags = ("initial_accumulator_value", "maximize")

    def __init__(self, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10, *, maximize=False, backend="auto"):
        self.lr = _nonneg("lr", lr)
        self.lr_decay = _nonneg("lr_decay", lr_decay)
        self.weight_decay = _nonneg("weight_decay", weight_decay)
        self.initial_accumulator_value = _nonneg("initial_accumulator_value",
                                                 initial_accumulator_value)
        self.eps = _nonneg("eps", eps)
        self.maximize = bool(maximize)
        super().__init__(backend)

    def _state_names(self):
        return ("sum",)

    def _state_fill(self, name):
        return self.initial_accumulator_value

    def _apply(self, param, grad, states, step, backend):
        F.adagrad(param, grad, states["sum"], step=step, lr=self.lr, lr_decay=self.lr_decay,
                  weight_decay=self.weight_decay, eps=self.eps, maximize=self.maximize,
                  backend=backend)


Adagrad = AdaGrad


class RMSProp(Optimizer):
    """RMSProp (Hinton 2012): AdaGrad that forgets, with optional centering and momentum.

        g = grad + wd·p;  v = α·v + (1−α)·g²
        centered: ḡ = ḡ + (1−α)(g − ḡ);  d = √(v − ḡ²) + eps    else d = √v + eps
        μ > 0: b = μ·b + g/d; p = p − lr·b                     else p = p − lr·g/d

    Defaults: lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False.
    """

    _hyper = ("lr", "alpha", "eps", "weight_decay", "momentum")
    _flags = ("centered", "maximize")

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False, *, maximize=False, backend="auto"):
        self.lr = _nonneg("lr", lr)
        self.alpha = _unit("alpha", alpha)
        self.eps = _nonneg("eps", eps)
        self.weight_decay = _nonneg("weight_decay", weight_decay)
        self.momentum = _nonneg("momentum", momentum)
        self.centered, self.maximize = bool(centered), bool(maximize)
        self._has_momentum = self.momentum > 0
        super().__init__(backend)

    def _state_names(self):
        return (("square_avg",) + (("grad_avg",) if self.centered else ())
                + (("momentum_buffer",) if self._has_momentum else ()))

    def _apply(self, param, grad, states, step, backend):
        if (self.momentum > 0) != self._has_momentum:
            raise ValueError("momentum cannot be switched between zero and non-zero after "
                             "construction (it decides whether a momentum buffer exists)")
        F.rmsprop(param, grad, states["square_avg"], states.get("grad_avg"),
                  states.get("momentum_buffer"), step=step, lr=self.lr, alpha=self.alpha,
                  eps=self.eps, weight_decay=self.weight_decay, momentum=self.momentum,
                  centered=self.centered, maximize=self.maximize, backend=backend)


RMSprop = RMSProp


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015): momentum plus RMSProp, with bias correction; AMSGrad optional.

        g = grad + wd·p;  m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²
        amsgrad: v̂ = max(v̂, v)  (of the raw v)
        p = p − (lr / (1−β1^t)) · m / (√(v̂ or v) / √(1−β2^t) + eps)

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False.
    eps is added after the bias correction, outside the root, as PyTorch does.
    """

    _hyper = ("lr", "betas", "eps", "weight_decay")
    _flags = ("amsgrad", "maximize")
    _decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False,
                 *, maximize=False, backend="auto"):
        self.lr = _nonneg("lr", lr)
        self.betas = _betas(betas)
        self.eps = _nonneg("eps", eps)
        self.weight_decay = _nonneg("weight_decay", weight_decay)
        self.amsgrad, self.maximize = bool(amsgrad), bool(maximize)
        super().__init__(backend)

    def _state_names(self):
        return ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def _apply(self, param, grad, states, step, backend):
        F.adam(param, grad, states["exp_avg"], states["exp_avg_sq"],
               states.get("max_exp_avg_sq"), step=step, lr=self.lr, betas=tuple(self.betas),
               eps=self.eps, weight_decay=self.weight_decay, amsgrad=self.amsgrad,
               maximize=self.maximize, decoupled=self._decoupled, backend=backend)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay.

        p = p · (1 − lr·wd)      then Adam without the L2 term

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False.
    """

    _decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 *, maximize=False, backend="auto"):
        super().__init__(lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         backend=backend)


class Lion(Optimizer):
    """Lion (Chen et al. 2023): the sign of interpolated momentum; one state buffer.

        p = p · (1 − lr·wd)
        p = p − lr · sign(β1·m + (1−β1)·g)
        m = β2·m + (1−β2)·g

    Defaults: lr=1e-4, betas=(0.9, 0.99), weight_decay=0.
    """

    _hyper = ("lr", "betas", "weight_decay")
    _flags = ("maximize",)

    def __init__(self, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False,
                 backend="auto"):
        self.lr = _nonneg("lr", lr)
        self.betas = _betas(betas)
        self.weight_decay = _nonneg("weight_decay", weight_decay)
        self.maximize = bool(maximize)
        super().__init__(backend)

    def _state_names(self):
        return ("exp_avg",)

    def _apply(self, param, grad, states, step, backend):
        F.lion(param, grad, states["exp_avg"], step=step, lr=self.lr, betas=tuple(self.betas),
               weight_decay=self.weight_decay, maximize=self.maximize, backend=backend)
