"""The host side of a step, measured alone: a backend whose launch does nothing.

``opt.step(buf)`` costs host time before any kernel runs (checks, per-step scalars, the call
into the backend). On a GPU that time hides behind the previous step's kernel only when it is
shorter than the kernel; for small models it *is* the step. ``null_backend()`` registers, for
the duration of a ``with`` block, a backend named ``"null"`` that accepts everything and
launches nothing, so ``host_runner`` times exactly the Python path of ``step(buf)`` (or of
``update()`` over a dict of arrays) with the same optimizer code a real backend goes through.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from .measure import Case, HostTimer, Runner

__all__ = ["NAME", "host_runner", "null_backend"]

NAME = "null"


class _Null:
    """A backend module stand-in: host arrays, no work."""

    NAME = NAME
    DEVICE = "cpu"

    @staticmethod
    def available():
        return True

    @staticmethod
    def why_unavailable():
        return ""

    @staticmethod
    def launch(rule, flags, param, grad, states, k):
        pass


@contextlib.contextmanager
def null_backend() -> Iterator[type]:
    """Make ``backend="null"`` resolvable inside the block (and only there)."""
    from .. import backends

    backends.BACKENDS[NAME] = __name__
    backends._loaded[NAME] = _Null
    try:
        yield _Null
    finally:
        backends.BACKENDS.pop(NAME, None)
        backends._loaded.pop(NAME, None)


def host_runner(
    case: Case, n_params: int = 1, size: int = 256, api: str = "step", dtype: Any = "float32"
) -> Runner:
    """Host time of one step of ``case`` over ``n_params`` parameters of ``size`` elements,
    through ``opt.step(buf)`` (``api="step"``) or ``opt.update(params, grads)`` (``"update"``),
    on the null backend. Call inside ``null_backend()``."""
    import numpy as np

    import fastopt

    rng = np.random.default_rng(0)
    params = {f"p{i}": rng.standard_normal(size).astype(dtype) for i in range(n_params)}
    grads = {k: rng.standard_normal(size).astype(dtype) for k in params}
    opt = getattr(fastopt, case.cls)(**case.fastopt_kwargs, backend=NAME)
    if api == "step":
        buf = fastopt.FlatBuffer(params)
        for k, g in grads.items():
            buf.grads[k][...] = g
        fn, keep = (lambda: opt.step(buf)), (buf, opt)
    elif api == "update":
        fn, keep = (lambda: opt.update(params, grads)), (params, grads, opt)  # type: ignore[assignment]
    else:
        raise ValueError(f"api={api!r}; expected 'step' or 'update'")
    return Runner(
        f"host:{api}",
        fn,
        HostTimer(),
        0,
        info={"n_params": n_params, "size": size, "api": api},
        keep=keep,
    )
