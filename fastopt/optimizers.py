"""The optimizers, with ``torch.optim``'s names, defaults and formulas.

Each class holds hyperparameters and state; the math runs in ``fastopt.functional`` (host
scalars) and ``kernels/`` (the per-element rule). ``t`` counts steps from 1. With
``maximize=True`` the gradient is negated first.
"""

from ._validate import check_number
from .base import Optimizer

__all__ = [
    "CLASSES",
    "SGD",
    "AdaGrad",
    "Adagrad",
    "Adam",
    "AdamW",
    "Lion",
    "Momentum",
    "Nesterov",
    "RMSProp",
    "RMSprop",
]


class SGD(Optimizer):
    """Stochastic gradient descent, with optional momentum and Nesterov momentum.

        g = grad + wd·p
        b = g (first step);  b = μ·b + (1−τ)·g (later)
        g = g + μ·b (nesterov)  or  g = b
        p = p − lr·g

    Defaults: lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False
    (``torch.optim.SGD``; Nesterov form of Sutskever et al. 2013 as PyTorch writes it).
    """

    _rule = "sgd"

    def __init__(
        self,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        nonfinite: str | None = None,
    ) -> None:
        self._init(
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": nesterov,
                "maximize": maximize,
            }
        )
        super().__init__(backend, nonfinite=nonfinite)


class Momentum(SGD):
    """SGD with heavy-ball momentum (the textbook ``v = μv − ηg; p += v``, PyTorch's form).

        b = μ·b + g;  p = p − lr·b      (b = g on the first step)

    Defaults: lr=0.01, momentum=0.9. Same trajectory as the textbook form at constant lr.
    """

    _pinned = {"nesterov": False}

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.9,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        nonfinite: str | None = None,
    ) -> None:
        check_number("momentum", momentum, lo=0, lo_open=True)
        super().__init__(
            lr,
            momentum,
            dampening,
            weight_decay,
            False,
            maximize=maximize,
            backend=backend,
            nonfinite=nonfinite,
        )


class Nesterov(SGD):
    """Nesterov accelerated gradient, in PyTorch's form (SGD with ``nesterov=True``).

        b = μ·b + g;  p = p − lr·(g + μ·b)      (b = g on the first step)

    Defaults: lr=0.01, momentum=0.9.
    """

    _pinned = {"nesterov": True, "dampening": 0.0}

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        nonfinite: str | None = None,
    ) -> None:
        check_number("momentum", momentum, lo=0, lo_open=True)
        super().__init__(
            lr,
            momentum,
            0.0,
            weight_decay,
            True,
            maximize=maximize,
            backend=backend,
            nonfinite=nonfinite,
        )


class AdaGrad(Optimizer):
    """AdaGrad (Duchi et al. 2011): per-coordinate steps that shrink with the squared history.

        g = grad + wd·p;  clr = lr / (1 + (t−1)·lr_decay)
        s = s + g²
        p = p − clr · g / (√s + eps)

    Defaults: lr=1e-2, lr_decay=0, weight_decay=0, initial_accumulator_value=0, eps=1e-10.
    """

    _rule = "adagrad"

    def __init__(
        self,
        lr: float = 1e-2,
        lr_decay: float = 0.0,
        weight_decay: float = 0.0,
        initial_accumulator_value: float = 0.0,
        eps: float = 1e-10,
        *,
        maximize: bool = False,
        backend: str = "auto",
        nonfinite: str | None = None,
    ) -> None:
        self._init(
            {
                "lr": lr,
                "lr_decay": lr_decay,
                "weight_decay": weight_decay,
                "eps": eps,
                "initial_accumulator_value": initial_accumulator_value,
                "maximize": maximize,
            }
        )
        super().__init__(backend, nonfinite=nonfinite)


Adagrad = AdaGrad


class RMSProp(Optimizer):
    """RMSProp (Hinton 2012): AdaGrad that forgets, with optional centering and momentum.

        g = grad + wd·p;  v = α·v + (1−α)·g²
        centered: ḡ = ḡ + (1−α)(g − ḡ);  d = √(v − ḡ²) + eps    else d = √v + eps
        μ > 0: b = μ·b + g/d; p = p − lr·b                     else p = p − lr·g/d

    Defaults: lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0, momentum=0, centered=False.
    """

    _rule = "rmsprop"

    def __init__(
        self,
        lr: float = 1e-2,
        alpha: float = 0.99,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        centered: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        nonfinite: str | None = None,
    ) -> None:
        self._init(
            {
                "lr": lr,
                "alpha": alpha,
                "eps": eps,
                "weight_decay": weight_decay,
                "momentum": momentum,
                "centered": centered,
                "maximize": maximize,
            }
        )
        super().__init__(backend, nonfinite=nonfinite)


RMSprop = RMSProp


class Adam(Optimizer):
    """Adam (Kingma & Ba 2015): momentum plus RMSProp, with bias correction; AMSGrad optional.

        g = grad + wd·p;  m = β1·m + (1−β1)·g;  v = β2·v + (1−β2)·g²
        amsgrad: v̂ = max(v̂, v)  (of the raw v)
        p = p − (lr / (1−β1^t)) · m / (√(v̂ or v) / √(1−β2^t) + eps)

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
    decoupled_weight_decay=False (True: AdamW). eps is added after the bias correction, outside
    the root, as PyTorch does.
    """

    _rule = "adam"

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        decoupled_weight_decay: bool = False,
        backend: str = "auto",
        nonfinite: str | None = None,
    ) -> None:
        self._init(
            {
                "lr": lr,
                "betas": betas,
                "eps": eps,
                "weight_decay": weight_decay,
                "amsgrad": amsgrad,
                "maximize": maximize,
                "decoupled_weight_decay": decoupled_weight_decay,
            }
        )
        super().__init__(backend, nonfinite=nonfinite)


class AdamW(Adam):
    """AdamW (Loshchilov & Hutter 2019): Adam with decoupled weight decay.

        p = p · (1 − lr·wd)      then Adam without the L2 term

    Defaults: lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False.
    """

    _pinned = {"decoupled_weight_decay": True}

    def __init__(
        self,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        backend: str = "auto",
        nonfinite: str | None = None,
    ) -> None:
        super().__init__(
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            backend=backend,
            nonfinite=nonfinite,
        )


class Lion(Optimizer):
    """Lion (Chen et al. 2023): the sign of interpolated momentum; one state buffer.

        p = p · (1 − lr·wd)
        p = p − lr · sign(β1·m + (1−β1)·g)
        m = β2·m + (1−β2)·g

    Defaults: lr=1e-4, betas=(0.9, 0.99), weight_decay=0.
    """

    _rule = "lion"

    def __init__(
        self,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        *,
        maximize: bool = False,
        backend: str = "auto",
        nonfinite: str | None = None,
    ) -> None:
        self._init({"lr": lr, "betas": betas, "weight_decay": weight_decay, "maximize": maximize})
        super().__init__(backend, nonfinite=nonfinite)


def _registry():
    """Every optimizer class of this module by its own name (aliases such as ``Adagrad`` are
    left out): what the benchmark, the demo and the tests sweep."""
    return {
        name: obj
        for name, obj in globals().items()
        if isinstance(obj, type)
        and issubclass(obj, Optimizer)
        and obj.__name__ == name
        and obj._rule is not None
    }


#: class name -> class, in definition order
CLASSES = _registry()
