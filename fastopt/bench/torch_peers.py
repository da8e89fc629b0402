"""``torch.optim`` peers on the same data, when torch is importable (it is never a dependency).

CPU: ``fused=True`` where torch implements it for that optimizer, else ``foreach=True``.
CUDA: both ``fused=True`` (where it exists) and ``foreach=True``. Each on one flat tensor and
on the ~200 parameter tensors of a small transformer with the same total size
(``measure.transformer_shapes``), the list a training loop really hands torch.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np

from .measure import Case, HostTimer, Runner, bytes_per_step, transformer_shapes

__all__ = ["available", "cuda_available", "modes", "torch_runner"]


def available() -> bool:
    return importlib.util.find_spec("torch") is not None


def cuda_available() -> Any:
    if not available():
        return False
    import torch

    return torch.cuda.is_available()


#: the mode that runs fastopt's own ``fastopt.torch`` class on the same tensors (same data,
#: same list, torch's interface)
ADAPTER = "fastopt"


def _make(case, params, mode):
    import torch

    if mode == ADAPTER:
        import fastopt.torch as fot

        return getattr(fot, case.cls)(params, **case.fastopt_kwargs)
    return getattr(torch.optim, case.torch_cls)(params, **dict(case.torch_kwargs), **{mode: True})


def modes(case: Case, device: str) -> Any:
    """The torch implementations to compare with, best first (none: torch lacks the optimizer)."""
    if case.torch_cls is None or not available():
        return []
    import torch

    usable = []
    for mode in ("fused", "foreach"):
        p = torch.nn.Parameter(torch.ones(4, device=device))
        p.grad = torch.ones(4, device=device)
        try:
            _make(case, [p], mode).step()
        except (TypeError, RuntimeError, ValueError):  # this torch has no such implementation
            continue
        usable.append(mode)
    # the CPU gets one peer: the fastest torch has (fused, else foreach)
    return usable if device == "cuda" else usable[:1]


def _tensor(torch, a, device):
    """A torch copy of ``a`` (a NumPy array, or a GPU array through its interface) on
    ``device``."""
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a).to(device=device, copy=True)
    return torch.as_tensor(a, device=device).clone()


def torch_runner(case: Case, mode: str, device: str, p0: Any, g0: Any, layout: str = "flat") -> Any:
    """``torch.optim`` (``mode`` = "fused" or "foreach") stepping copies of ``p0``/``g0`` on
    ``device``, as one tensor (``layout="flat"``) or as a transformer's parameter list
    (``"list"``; None when ``p0`` is too small to hold one)."""
    import torch

    flat_p, flat_g = _tensor(torch, p0, device), _tensor(torch, g0, device)
    if layout == "flat":
        pieces = [(flat_p, flat_g)]
    else:
        shapes = transformer_shapes(p0.size)
        if shapes is None:
            return None
        pieces, off = [], 0
        for shape in shapes:
            size = int(np.prod(shape))
            # clone: each tensor owns its storage, as a model's parameters do
            pieces.append(
                (
                    flat_p[off : off + size].view(shape).clone(),
                    flat_g[off : off + size].view(shape).clone(),
                )
            )
            off += size
        del flat_p, flat_g
    params = []
    for p, g in pieces:
        p = torch.nn.Parameter(p)
        p.grad = g
        params.append(p)
    opt = _make(case, params, mode)
    if device == "cuda":
        from .gpu import timer_for

        timer = timer_for("torch")
    else:
        timer = HostTimer()
    return Runner(
        "fastopt.torch" if mode == ADAPTER else f"torch-{mode}",
        opt.step,
        timer,
        bytes_per_step(case.n_state, p0.size, p0.dtype, n_read=case.n_read),
        info={
            "layout": layout,
            "n_tensors": len(params),
            "peer": f"fastopt.torch.{case.cls}"
            if mode == ADAPTER
            else f"torch.optim.{case.torch_cls}({mode}=True)",
        },
        keep=(params, opt),
    )
