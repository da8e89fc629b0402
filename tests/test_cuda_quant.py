"""The CUDA C kernel of quantized state (``kernels/quant_cuda.py``: what the CuPy backend
compiles) built by g++ as C++ (``tests/harness/grid.cpp``: every thread of a block a thread of
its own, ``__syncthreads`` a barrier, ``-ffp-contract=off``) and run over a grid smaller than
the block table, against the definition of a quantized step (``tests/support/quant_cases.py``:
the numba CPU backend's float32-state step on the dequantized state, then the oracle's
quantization), bit for bit: params, codes and scales; two tensors in one buffer, each ending
in a short block, and the gap between them untouched.

The default run keeps one small case per format (Adam with every probe on: three quantized
slots, signed and unsigned maps); every rule in both formats is the ``exhaustive`` group.
Skipped only when g++ is missing.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fastopt.kernels import RULES, cuda_source, quant, quant_cuda, storage
from support import quant_cases as qc
from support.matrix import RULE_FULL

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not installed")

HARNESS = Path(__file__).with_name("harness") / "grid.cpp"
GRID = 2  # CUDA blocks: fewer than the 5 blocks of codes, so the block loop takes trips
STEPS = 3
DEFAULT = {("adam", "int8"), ("adam", "float8_e4m3")}
_BUILD = Path(tempfile.mkdtemp(prefix="fastopt_quant_"))


def _cases():
    return [
        pytest.param(
            rule,
            fmt,
            id=f"{rule}-{fmt}",
            marks=() if (rule, fmt) in DEFAULT else (pytest.mark.exhaustive,),
        )
        for rule in RULES
        for fmt in quant.FORMATS
    ]


@functools.cache
def _kernel(rule: str, flags: tuple[tuple[str, bool], ...], io: storage.IO):
    """The g++-built kernel of one variant: ``run(arrays, k, qtab, blocks, nb, grid)``."""
    fl = dict(flags)
    tag = f"k{abs(hash((rule, flags, io))) % 10**12}"
    name = f"{quant_cuda.kernel_name(rule)}_{tag}"
    arrays, scalars = quant_cuda.quant_args(rule, fl, io)
    assert all(t.startswith("const C") for t, _ in scalars), scalars  # host scalars only
    args = [f"({t} *)a[{j}]" for j, (_, t, _) in enumerate(arrays)]
    args += ["qtab", "blocks", "nb"] + [f"(C)k[{j}]" for j in range(len(scalars))]
    code = "\n".join(
        [
            f"namespace {tag} {{",
            quant_cuda.quant_source(rule, fl, io, name=name),
            f'extern "C" void run_{tag}(void *const *a, const double *k, const float *qtab, '
            "const long long *blocks, long long nb, unsigned grid) {",
            f"    fastopt_grid_threads(grid, {quant_cuda.QBLOCK}, [&] "
            f"{{ {name}({', '.join(args)}); }});",
            "}",
            "}",
        ]
        + [f"#undef {m}" for m in cuda_source.defines(rule, fl)]
    )
    (_BUILD / f"{tag}.inc").write_text(code + "\n")
    so = _BUILD / f"{tag}.so"
    cmd = [GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off"]
    cmd += ["-Wall", "-Werror", f'-DFASTOPT_KERNELS="{tag}.inc"', f"-I{_BUILD}", str(HARNESS)]
    res = subprocess.run(cmd + ["-o", str(so)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"g++ failed:\n{res.stderr[:4000]}"
    fn = getattr(ctypes.CDLL(str(so)), f"run_{tag}")
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_longlong, ctypes.c_uint]
    return fn, arrays


def _step(rule, hp, fmt, p, g, st, t):
    """One quantized step of the g++-built kernel over the buffer (in place)."""
    spec = RULES[rule]
    hs = spec.replay_host_state(hp, t)
    flags, k = spec.variant_and_scalars(hp, t, hs)
    io = storage.IO(quant=fmt)
    fn, arrays = _kernel(rule, tuple(sorted(flags.items())), io)
    named = {"grad": g, "param": p}
    for s in spec.slots:
        a = st[s.name]
        if isinstance(a, tuple):
            named[s.name], named[f"{s.name}_absmax"] = a
        else:
            named[s.name] = a
    bufs = [named[a] for a, _, _ in arrays]
    assert all(b is not None for b in bufs)
    ptrs = (ctypes.c_void_p * len(bufs))(*[b.ctypes.data for b in bufs])
    qmaps = tuple(s.quant_map for s, q in zip(spec.slots, quant_cuda.qslots(rule, flags)) if q)
    qtab = quant_cuda.tables(fmt, qmaps)
    blocks = qc.block_table()
    ks = np.array(k, np.float64)
    fn(ptrs, ks.ctypes.data, qtab.ctypes.data, blocks.ctypes.data, blocks.shape[0], GRID)


@pytest.mark.parametrize(("rule", "fmt"), _cases())
def test_cuda_c_kernel_equals_float32_step_then_oracle_quantization(rule, fmt):
    hp = RULE_FULL[rule]
    rng = np.random.default_rng(11)
    p = rng.standard_normal(qc.LENGTH).astype(np.float32)
    p[600:640] = qc.POISON
    st = qc.initial(rule, hp, fmt, rng)
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(qc.LENGTH).astype(np.float32)
        want_p, want = qc.expected(rule, hp, fmt, p, g, st, t)
        _step(rule, hp, fmt, p, g, st, t)
        qc.assert_same(p, st, want_p, want, f"{rule} {fmt} step {t}")
    assert np.all(p[600:640] == qc.POISON)
