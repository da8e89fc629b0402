"""fastopt: fused optimizer update kernels for NumPy, CuPy and PyTorch arrays.

opt = fastopt.Adam(lr=1e-3)
opt.update(params, grads)          # dicts name -> array, updated in place
buf = fastopt.FlatBuffer(params)   # one contiguous buffer per dtype
opt.step(buf)                      # one fused kernel call per dtype
"""

from typing import TYPE_CHECKING

from ._validate import NonFiniteGradientError
from .backends import available_backends
from .base import Optimizer
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .flat import FlatBuffer
from .optimizers import ALIASES, CLASSES

# every optimizer class (generated from its rule spec) and alias, under its name
globals().update(CLASSES)
globals().update({alias: CLASSES[name] for alias, name in ALIASES.items()})

if TYPE_CHECKING:  # the same names for type checkers (tests/test_typing.py holds them to CLASSES)
    from .optimizers import OptimizerClass

    AdaBelief: OptimizerClass
    Adadelta: OptimizerClass
    AdaGrad: OptimizerClass
    Adagrad: OptimizerClass
    Adam: OptimizerClass
    Adamax: OptimizerClass
    AdamW: OptimizerClass
    Adan: OptimizerClass
    AdEMAMix: OptimizerClass
    ASGD: OptimizerClass
    Lion: OptimizerClass
    Momentum: OptimizerClass
    NAdam: OptimizerClass
    Nesterov: OptimizerClass
    RAdam: OptimizerClass
    RMSProp: OptimizerClass
    RMSprop: OptimizerClass
    Rprop: OptimizerClass
    SGD: OptimizerClass

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "FlatBuffer",
    "NonFiniteGradientError",
    "Optimizer",
    "__version__",
    "available_backends",
    "load_checkpoint",
    "save_checkpoint",
    *CLASSES,
    *ALIASES,
]
