"""Backend registry.

A backend module speaks one protocol (``fastopt.backends.protocol``): ``NAME``, ``DEVICE``
(``"cpu"`` or ``"cuda"``), ``available()``, ``why_unavailable()`` and ``step_runner(plan,
dtype, writes, io)``, which gives the ``run(param, grad, states, master=None, salt=0)`` of one
planned step (``fastopt.functional.StepPlan``) over flat arrays in one fused pass. The numba
backends also run per-element functions that are no spec rule (``element_runner``, for
``fastopt.textbook``). Modules are imported only when asked for, so ``import fastopt`` imports
no optional dependency.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["BACKENDS", "available_backends", "get_backend", "is_device_array", "resolve"]

#: backend name -> module, in the order ``available_backends()`` lists them
BACKENDS = {
    "numpy": "fastopt.backends.numpy_backend",
    "numba": "fastopt.backends.numba_backend",
    "numba-cuda": "fastopt.backends.numba_cuda_backend",
    "cupy": "fastopt.backends.cupy_backend",
}
#: name -> its module, the ImportError that kept it from loading, or a stand-in registered in
#: its place (the benchmark's null backend, ``fastopt.bench.host``)
_loaded: dict[str, Any] = {}


def _module(name: str) -> Any:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(BACKENDS[name])
        except ImportError as exc:  # a backend whose module cannot even import is unavailable
            _loaded[name] = exc
    return _loaded[name]


def available_backends() -> list[str]:
    """Names of the backends that can run here, e.g. ``["numpy", "numba"]``."""
    out = []
    for name in BACKENDS:
        mod = _module(name)
        if not isinstance(mod, ImportError) and mod.available():
            out.append(name)
    return out


def get_backend(name: str) -> ModuleType:
    """The backend module called ``name``; raises if it is unknown or cannot run here."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected 'auto' or one of {list(BACKENDS)}")
    mod = _module(name)
    if isinstance(mod, ImportError):
        raise RuntimeError(f"backend {name!r} is not available: {mod}")
    if not mod.available():
        raise RuntimeError(f"backend {name!r} is not available: {mod.why_unavailable()}")
    return mod


def is_device_array(a: object) -> bool:
    """True for GPU arrays (CuPy, Numba device arrays, anything with __cuda_array_interface__)."""
    return hasattr(a, "__cuda_array_interface__")


def resolve(backend: str | ModuleType, array: object = None) -> ModuleType:
    """A backend module from a name, ``"auto"`` (chosen from the array's type) or a module."""
    if not isinstance(backend, str):
        return backend
    if backend != "auto":
        return get_backend(backend)
    if array is not None and is_device_array(array):
        return get_backend("cupy")
    mod = _module("numba")
    if not isinstance(mod, ImportError) and mod.available():
        return mod
    return get_backend("numpy")
