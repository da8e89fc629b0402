"""A fake GPU backend for ``fastopt.torch``'s device path, on the CPU.

It has what ``fastopt.torch`` asks of a GPU backend (``tensor_table``, ``launch_table``,
``GradNorm``, ``scalar_kernel``) and records every call, so a test proves how many tables are
built and launched per step, which storage plan and extras each launch carries, and that the
gradient column follows the gradients. The work itself is done by real code on the CPU:

- ``launch_table`` runs the table through ``numba_backend.launch_many_io`` (the table's rows
  are the CPU many-tensor table's: ``(n, param, grad, slot..., master)``), the device extras
  read from their host memory as a kernel reads them from device memory (the found-inf flag
  skips everything, ``kbuf`` holds the scalars, ``keyp`` the rounding key, ``scale`` the loss
  scale, ``clip`` the coefficient);
- ``GradNorm`` sums the squared unscaled gradients through their table addresses;
- ``scalar_kernel`` runs ``kernels.device_scalars.python_source`` as plain Python.

Nothing here reads a tensor through ``.item()``/``float()``: the arrays are NumPy views.
"""

from __future__ import annotations

import ctypes
import dataclasses
import math
import types
from typing import Any

import numpy as np
from fastopt.kernels import device_scalars, storage

from fastopt.backends import _launch, numba_backend

NAME = "fake-gpu"
DEVICE = "cuda"

_CTYPES = {"float32": ctypes.c_float, "float64": ctypes.c_double, "float16": ctypes.c_uint16}
_CTYPES["bfloat16"] = ctypes.c_uint16


class Recorder:
    def __init__(self) -> None:
        self.tables: list[Any] = []
        self.launches: list[dict[str, Any]] = []
        self.norms = 0
        self.scalar_runs = 0

    def clear(self) -> None:
        self.tables.clear()
        self.launches.clear()
        self.norms = 0
        self.scalar_runs = 0


calls = Recorder()


def available() -> bool:
    return True


def why_unavailable() -> str:
    return ""


def tensor_table(rule: str, io: Any, tensors: Any, chunk: Any = None) -> Any:
    t = _launch.TensorTable(rule, io, tensors, chunk=chunk, blocks=4)
    calls.tables.append(t)
    return t


def _read(a: Any) -> np.ndarray[Any, Any]:
    return np.asarray(a).reshape(-1)


def launch_table(rule, flags, io, table, k, extras=None, clip=None, stream=None):
    table.check(rule, flags, io)
    ex = dict(extras or {})
    calls.launches.append(
        dict(rule=rule, flags=dict(flags), io=io, table=table, grads=table.rows[:, 2].copy(),
             extras=sorted(ex), clip=clip is not None)
    )  # fmt: skip
    if io.found_inf and _read(ex["found_inf"])[0] != 0:
        return
    factor = 1.0
    if io.scale == "host":
        factor = float(ex["inv_scale"])
    elif io.scale == "device":
        factor = 1.0 / float(_read(ex["scale"])[0])
    if clip is not None:
        factor *= float(_read(clip)[1])
    if io.kbuf:
        k = tuple(float(x) for x in _read(ex["kbuf"]))
        key = int(_read(ex["keyp"])[0])
    else:
        key = int(ex.get("key", 0))
    run_io = dataclasses.replace(
        io, scale="host" if (io.scale or clip is not None) else None, found_inf=False, kbuf=False
    )
    writes = tuple(bool(w) for w in _rule(rule).slots_used(flags))
    chunks = numba_backend.chunks_for(table.rows[:, 0].tolist())
    numba_backend.launch_many_io(
        rule, flags, writes, run_io, table.rows, chunks, tuple(k), inv_scale=factor, key=key,
        salt=int(ex.get("salt", 0)),
    )  # fmt: skip


def _rule(rule: str) -> Any:
    from fastopt.kernels import RULES

    return RULES[rule]


def _grad(row: Any, kind: str) -> np.ndarray[Any, Any]:
    n, ptr = int(row[0]), int(row[2])
    if n == 0:
        return np.zeros(0)
    raw = np.ctypeslib.as_array((_CTYPES[kind] * n).from_address(ptr))
    if kind in ("float32", "float64"):
        return raw.astype(np.float64)
    return _widen16(raw, kind)


def _widen16(bits: np.ndarray[Any, Any], kind: str) -> np.ndarray[Any, Any]:
    if kind == "float16":
        return bits.view(np.float16).astype(np.float64)
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


class GradNorm:
    def __init__(self, tables: Any, scale: Any = None) -> None:
        self.tables, self.scale = list(tables), scale
        self.acc = "float64" if any(t.io.compute == "float64" for t in tables) else "float32"
        self.out = np.zeros(2, np.dtype(self.acc))
        self.out_f = np.zeros(2, np.float32)

    def coef(self, compute: str) -> Any:
        return self.out if compute == self.acc else self.out_f

    def __call__(self, max_norm: float, extras: Any = None, stream: Any = None) -> Any:
        calls.norms += 1
        ex = extras or {}
        inv = 1.0
        if self.scale == "host":
            inv = float(ex["inv_scale"])
        elif self.scale == "device":
            inv = 1.0 / float(_read(ex["scale"])[0])
        total = 0.0
        for t in self.tables:
            for row in t.rows:
                total += float(np.sum((_grad(row, t.io.grad) * inv) ** 2))
        norm = math.sqrt(total)
        coef = min((1.0 / (norm + 1e-6)) * max_norm, 1.0) if norm == norm else norm
        self.out[:] = (norm, coef)
        self.out_f[:] = (norm, coef)
        return self.out


def scalar_kernel(program: Any) -> Any:
    src = device_scalars.python_source(program)
    fake_cuda = types.SimpleNamespace(grid=lambda n: 0)
    ns: dict[str, Any] = {"cuda": fake_cuda, "math": math}
    exec(compile(src, "<fake scalar kernel>", "exec"), ns)
    fn = ns["factory"](storage.mix32)

    def run(like, ctl, k32, k64, keyp, fi, seed):
        calls.scalar_runs += 1
        fn(ctl, k32, k64, keyp, _read(fi), seed)

    return run


def use_fake(monkeypatch: Any) -> Recorder:
    """Every device of ``fastopt.torch`` steps through this fake GPU backend (undone with
    ``monkeypatch``); the call log, cleared, is returned."""
    import sys

    import fastopt.torch as fot

    me = sys.modules[__name__]
    monkeypatch.setattr(fot.FusedOptimizer, "_backend_module", lambda self, device: me)
    calls.clear()
    return calls


def cpu_path(device: Any) -> Any:
    """A ``_backend_module`` for a reference optimizer: the real CPU path (numba) on any
    device."""
    return numba_backend
