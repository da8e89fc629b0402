"""The numba-cuda kernel of quantized state (``fastopt/backends/numba_cuda_quant.py``) under the
simulator, bit for bit against the definition of a quantized step
(``tests/support/quant_cases.py``: the same backend's float32-state step on the dequantized
state, then the oracle's quantization; the simulator runs the rules as Python, whose
``math.sqrt`` rounds some rules' results apart from the compiled CPU loop's, so the CPU loop is
the reference only where both agree: the door's Adam): params, codes and scales, over two tensors
of odd lengths in one buffer (each ending in a short block; the elements outside them
untouched), on a grid of
fewer CUDA blocks than blocks of codes; the multi-tensor kernel (``launch_table`` over a
``tensor_table`` of the two tensors) likewise; and through ``fastopt.functional`` (the door a
numba-cuda step with ``state_dtype=`` takes) against the CPU backend's quantized step.

Run by ``tests/test_cudasim.py`` in a child pytest with ``NUMBA_ENABLE_CUDASIM=1``. One small
case per format by default (the kernel on Adam in int8, the table kernel in float8, both
kernels and the door in int4, the door in float8; every rule and format under ``exhaustive``):
each simulated launch runs 256 Python threads per block (int4: 64, a thread per byte).
"""

import os

import numpy as np
import pytest
from fastopt.kernels import RULES, storage
from support import quant_cases as qc
from support.matrix import RULE_FULL

from fastopt import _quantized as Q
from fastopt import functional as F
from fastopt.backends import numba_cuda_backend as ncb

pytestmark = pytest.mark.skipif(
    os.environ.get("NUMBA_ENABLE_CUDASIM") != "1" or not ncb.available(),
    reason="run by tests/test_cudasim.py with NUMBA_ENABLE_CUDASIM=1",
)

STEPS = 2
#: the default run: the kernel on Adam in int8 and in int4 (three slots, both maps)
DEFAULT = {("adam", "int8"), ("adam", "int4")}


@pytest.mark.parametrize(
    ("rule", "fmt"),
    # (a rule without a quantizable slot never launches this kernel: no state is quantized)
    qc.rule_format_params(DEFAULT, [r for r in RULES if any(s.quantize for s in RULES[r].slots)]),
)
def test_kernel_equals_float32_step_then_oracle_quantization(rule, fmt):
    from fastopt.backends.numba_cuda_quant import launch_quant

    spec, hp = RULES[rule], RULE_FULL[rule]
    rng = np.random.default_rng(3)
    p = rng.standard_normal(qc.LENGTH).astype(np.float32)
    p[qc.OUTSIDE] = qc.POISON
    st = qc.initial(rule, hp, fmt, rng)
    blocks = qc.block_table(fmt)
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(qc.LENGTH).astype(np.float32)
        want_p, want = qc.expected(rule, hp, fmt, p, g, st, t, backend="numba-cuda")
        flags, k = spec.variant_and_scalars(hp, t, spec.replay_host_state(hp, t))
        states = [
            (*st[s.name], blocks) if isinstance(st[s.name], tuple) else st[s.name]
            for s in spec.slots
        ]
        launch_quant(rule, flags, p, g, states, k, storage.IO(quant=fmt))
        qc.assert_same(p, st, want_p, want, f"{rule} {fmt} step {t}", fmt)
    assert np.all(p[qc.OUTSIDE] == qc.POISON)


@pytest.mark.parametrize(
    ("rule", "fmt"),
    qc.rule_format_params(
        {("adam", "float8_e4m3"), ("adam", "int4")},
        [r for r in RULES if any(s.quantize for s in RULES[r].slots)],
    ),
)
def test_table_kernel_equals_float32_step_then_oracle_quantization(rule, fmt):
    """``launch_table`` over a ``tensor_table`` of the buffer's two tensors (the second first,
    each quantized slot a ``(codes, absmax)`` pair of views): per tensor the definition, bit
    for bit, the elements outside the tensors untouched."""
    spec, hp = RULES[rule], RULE_FULL[rule]
    io = storage.IO(quant=fmt)
    rng = np.random.default_rng(4)
    p = rng.standard_normal(qc.LENGTH).astype(np.float32)
    p[qc.OUTSIDE] = qc.POISON
    st = qc.initial(rule, hp, fmt, rng)
    g = np.zeros(qc.LENGTH, np.float32)
    table = ncb.tensor_table(rule, io, qc.tensors(rule, fmt, p, g, st))
    for t in range(1, STEPS + 1):
        g[:] = rng.standard_normal(qc.LENGTH).astype(np.float32)
        want_p, want = qc.expected(rule, hp, fmt, p, g, st, t, backend="numba-cuda")
        flags, k = spec.variant_and_scalars(hp, t, spec.replay_host_state(hp, t))
        ncb.launch_table(rule, flags, io, table, k)
        qc.assert_same(p, st, want_p, want, f"{rule} {fmt} step {t}", fmt)
    assert np.all(p[qc.OUTSIDE] == qc.POISON)


@pytest.mark.parametrize(
    "fmt", [pytest.param("int8", marks=pytest.mark.exhaustive), "float8_e4m3", "int4"]
)
def test_functional_door_equals_the_cpu_backend(fmt):
    """``fastopt.functional.adam(..., state_dtype=fmt, backend="numba-cuda")`` on one tensor
    of 301 elements (a full block and a short one; int4: two full and an odd short one): the
    CPU backend's codes, scales and params, bit for bit."""
    rng = np.random.default_rng(8)
    n = 301
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m = Q.quantize(rng.standard_normal(n).astype(np.float32) * 0.1, fmt, "signed")
    v = Q.quantize(np.abs(rng.standard_normal(n)).astype(np.float32) * 0.01, fmt, "unsigned")
    runs = {}
    for be in ("numba", "numba-cuda"):
        pp, mm, vv = p.copy(), (m[0].copy(), m[1].copy()), (v[0].copy(), v[1].copy())
        F.adam(pp, g, mm, vv, step=2, lr=0.01, state_dtype=fmt, backend=be)
        runs[be] = (pp, mm, vv)
    (p0, m0, v0), (p1, m1, v1) = runs["numba"], runs["numba-cuda"]
    assert np.array_equal(p0.view(np.uint32), p1.view(np.uint32))
    for a, b in ((m0, m1), (v0, v1)):
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(p0, p)  # the step moved the params


@pytest.mark.exhaustive  # a numba compile of the CPU loop of this format besides the simulator
def test_bfloat16_params_stochastic_rounding_and_loss_scale_equal_the_cpu_loop():
    """bfloat16 params and grads, stochastic rounding and a host loss scale through the
    kernel's storage conversions: the CPU backend's quantized loop over the same buffer and
    block table, bit for bit (Adam: the simulator's Python math and the CPU loop agree)."""
    from fastopt.backends.numba_cuda_quant import launch_quant

    def device_step(rule, hp, fmt, t, flags, k, io, p, g, st, blocks, x):
        inv, salt, key = x
        states = [(*st[s.name], blocks) for s in RULES[rule].slots]
        extras = {"inv_scale": inv, "salt": salt, "key": key}
        launch_quant(rule, flags, p, g, states, k, io, extras=extras)

    qc.bf16_sr_scale_against_the_cpu_loop(device_step)
