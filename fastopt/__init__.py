"""fastopt: fused optimizer update kernels for NumPy, CuPy and PyTorch arrays.

    opt = fastopt.Adam(lr=1e-3)
    opt.update(params, grads)          # dicts name -> array, updated in place
    buf = fastopt.FlatBuffer(params)   # one contiguous buffer per dtype
    opt.step(buf)                      # one fused kernel call per dtype
"""
import os as _os

# A source checkout keeps the per-element rules in ../kernels; a wheel installs them as
# fastopt/kernels. Let ``fastopt.kernels`` resolve in both.
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")):
    _root = _os.path.dirname(_os.path.abspath(__path__[0]))
    if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
        __path__.append(_root)

from ._validate import NonFiniteGradientError  # noqa: E402
from .backends import available_backends  # noqa: E402
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from .flat import FlatBuffer  # noqa: E402
from .optimizer import Optimizer  # noqa: E402
from .optimizers import (SGD, AdaGrad, Adagrad, Adam, AdamW, Lion, Momentum,  # noqa: E402
                         Nesterov, RMSProp, RMSprop)

__version__ = "0.1.0"

__all__ = ["SGD", "Momentum", "Nesterov", "AdaGrad", "Adagrad", "RMSProp", "RMSprop", "Adam",
           "AdamW", "Lion", "FlatBuffer", "Optimizer", "available_backends",
           "save_checkpoint", "load_checkpoint", "CheckpointError", "NonFiniteGradientError",
           "__version__"]
