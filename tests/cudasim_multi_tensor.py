"""The numba-cuda multi-tensor kernels under Numba's CUDA simulator (run by
``tests/test_cudasim.py`` with ``NUMBA_ENABLE_CUDASIM=1``, beside ``cudasim_parity.py``).

``numba_cuda_backend.launch_table`` and ``GradNorm`` over a table of host arrays (the
simulator runs each CUDA thread as a Python thread, the chunk views made from the table's
addresses): empty, one-element and misaligned tensors, tensors across chunk boundaries, a grid
(4 blocks of 32 threads) smaller than the chunks. Each tensor must come out bit for bit as the
backend's single-tensor kernel (``launch``, the same element body) leaves it; the norm
must match NumPy and the clipped step the step of pre-clipped gradients; a device found-inf
flag must leave everything as it was.
"""

import dataclasses
import os

import numpy as np
import pytest
from fastopt.kernels import RULES, storage
from fastopt.kernels.storage import IO

from fastopt.backends import _launch
from fastopt.backends import numba_cuda_backend as ncb

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" or not ncb.available(),
    reason="run by tests/test_cudasim.py with NUMBA_ENABLE_CUDASIM=1",
)
ml_dtypes = pytest.importorskip("ml_dtypes")
NP = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float32": np.dtype("f4"),
    "float16": np.dtype("f2"),
}
LENGTHS = [0, 1, 7, 64, 65, 130]
CHUNK = 64
ADAMW = dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)


def _hp(rule, hp):
    return RULES[rule].validate(dict(RULES[rule].defaults, **hp))


def _arrays(rng, rule, io, n, misalign, scale=1.0):
    """A tensor's arrays (name -> host array), the first state slot off 16-byte alignment
    when ``misalign``."""
    out = {"param": rng.standard_normal(n).astype(NP[io.param])}
    out["grad"] = (rng.standard_normal(n) * scale).astype(NP[io.grad])
    for j, s in enumerate(RULES[rule].state):
        a = rng.uniform(0.1, 1.0, n + 1).astype(NP[io.state])
        out[s] = a[1:] if misalign and j == 0 else a[:n]
    if io.master:
        out["master"] = out["param"].astype(np.float32)
    return out


def _table(rule, io, tensors):
    rows = [
        (t["param"], t["grad"], [t[s] for s in RULES[rule].state], t.get("master")) for t in tensors
    ]
    return _launch.TensorTable(rule, io, rows, chunk=CHUNK)


def _copy(t):
    return {k: v.copy() for k, v in t.items()}


def _same(a, b, what):
    assert np.array_equal(a.view(np.uint8), b.view(np.uint8)), what


CASES = {
    "adam-f32": ("adam", dict(lr=0.01, amsgrad=True, weight_decay=0.1), IO()),
    "adamw-bf16-master-scaled": (
        "adam",
        ADAMW,
        IO("bfloat16", "bfloat16", "float32", True, scale="host"),
    ),
    "adam-bf16-sr": ("adam", dict(lr=0.01), IO("bfloat16", "bfloat16", "bfloat16", sr=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_table_launch_equals_single_tensor_launches(case):
    rule, hp, io = CASES[case]
    hp = _hp(rule, hp)
    rng = np.random.default_rng(3)
    scale = 8.0 if io.scale else 1.0
    tensors = [_arrays(rng, rule, io, n, i % 2 == 1, scale) for i, n in enumerate(LENGTHS)]
    refs = [_copy(t) for t in tensors]
    table = _table(rule, io, tensors)
    assert table.nchunks > 4  # more chunks than the simulated grid has blocks
    for step in (2, 3):
        flags, k = RULES[rule].variant_and_scalars(hp, step, None)
        ex = {"inv_scale": 1 / scale, "salt": 9, "key": storage.step_key(1, step)}
        ncb.launch_table(rule, flags, io, table, k, ex)
        for r in refs:
            states = tuple(r[s] for s in RULES[rule].state)
            states = tuple(s if u else None for s, u in zip(states, RULES[rule].slots_used(flags)))
            # the backend's single-tensor launch (a plain format runs its plain kernel)
            ncb.launch(rule, flags, r["param"], r["grad"], states, k, io, r.get("master"), ex)
    for i, (t, r) in enumerate(zip(tensors, refs)):
        for name in t:
            _same(t[name], r[name], f"{case} tensor {i} {name}")


def test_norm_clip_and_found_inf():
    rule, io = "adam", IO("bfloat16", "float32", "float32", True, scale="device", found_inf=True)
    hp = _hp(rule, ADAMW)
    rng = np.random.default_rng(4)
    scale = 8.0
    tensors = [_arrays(rng, rule, io, n, i % 2 == 1, scale) for i, n in enumerate(LENGTHS)]
    table = _table(rule, io, tensors)
    norm = ncb.GradNorm([table], scale="device")
    gs, fi = np.array([scale], np.float32), np.zeros(1, np.float32)
    out = norm(0.5, {"scale": gs})
    want = np.sqrt(sum(float(np.sum((t["grad"].astype(np.float64) / scale) ** 2)) for t in tensors))
    assert abs(out[0] - want) <= 1e-5 * want and out[1] < 1
    coef = np.float32(out[1])
    assert coef == min(np.float32(1) / (np.float32(out[0]) + np.float32(1e-6)) * np.float32(0.5), 1)
    # a found-inf flag: nothing written
    before = [_copy(t) for t in tensors]
    flags, k = RULES[rule].variant_and_scalars(hp, 2, None)
    fi[0] = 1.0
    ncb.launch_table(rule, flags, io, table, k, {"scale": gs, "found_inf": fi}, clip=out)
    for t, b in zip(tensors, before):
        for name in t:
            _same(t[name], b[name], f"found_inf: {name}")
    # the clipped step is the step of gradients unscaled and clipped beforehand
    fi[0] = 0.0
    refs = [_copy(t) for t in tensors]
    ncb.launch_table(rule, flags, io, table, k, {"scale": gs, "found_inf": fi}, clip=out)
    plain = dataclasses.replace(io, scale=None, found_inf=False)
    for r in refs:
        r["grad"] = (r["grad"] * np.float32(1 / scale)) * coef
        states = (r["exp_avg"], r["exp_avg_sq"], None)
        ncb.launch_mixed(rule, flags, r["param"], r["grad"], states, k, plain, r["master"], {})
    for i, (t, r) in enumerate(zip(tensors, refs)):
        for name in ("param", "exp_avg", "exp_avg_sq", "master"):
            _same(t[name], r[name], f"clipped tensor {i} {name}")
