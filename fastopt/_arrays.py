"""Array-module helpers: NumPy on the host, CuPy for device arrays (imported only when met)."""
import numpy as np

from .backends import is_device_array

__all__ = ["array_module", "to_numpy", "is_device_array"]


def array_module(a):
    """``numpy`` for host arrays, ``cupy`` for device arrays."""
    if is_device_array(a) and not isinstance(a, np.ndarray):
        import cupy  # a device array can only be handled through CuPy

        return cupy
    return np


def to_numpy(a):
    """A host copy of ``a`` (NumPy, CuPy or any __cuda_array_interface__ array)."""
    if isinstance(a, np.ndarray):
        return a.copy()
    xp = array_module(a)
    return xp.asnumpy(xp.asarray(a))
