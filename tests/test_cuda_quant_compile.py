"""Compile checks of the quantized-state kernels without a GPU: the CUDA C kernel
(``kernels/quant_cuda.py``, what the CuPy backend builds) by NVRTC for sm_90 and the
numba-cuda kernel (``backends/numba_cuda_quant.py``) by NVVM for sm_90, each free of float64
instructions (the math is float32: a stray double literal would show as ``.f64``) and with its
shared-memory tables present. By default Adam with every probe on (three quantized slots) in
each format and a bfloat16-param plan (numba-cuda: that plan and int4's multi-tensor kernel);
every rule under ``exhaustive``. Each in two forms: the one-buffer kernel and the multi-tensor
one (``quant_cuda.table_source``, ``numba_cuda_quant.table_kernel_source``, reading the clip
coefficient), the latter by default for the bfloat16-param plan and int4 (a thread per byte:
both kernels of a packed format by NVRTC). Skipped when NVRTC or numba-cuda's NVVM is missing.
"""

from __future__ import annotations

import os
import re

import pytest
from fastopt.kernels import RULES, quant, quant_cuda, storage
from support.matrix import RULE_FULL

F64 = re.compile(r"\.f64\b")
BF16 = storage.IO(param="bfloat16", grad="bfloat16", quant="int8", sr=True)


def _flags(rule):
    spec = RULES[rule]
    hp = RULE_FULL[rule]
    return spec.variant_and_scalars(hp, 2, spec.replay_host_state(hp, 2))[0]


def _cases():
    out = []
    for rule in RULES:
        for fmt in quant.ALL_FORMATS:
            on = rule == "adam"
            out.append(
                pytest.param(
                    rule,
                    storage.IO(quant=fmt),
                    id=f"{rule}-{fmt}",
                    marks=() if on else (pytest.mark.exhaustive,),
                )
            )
    out.append(pytest.param("adam", BF16, id="adam-bf16-sr-int8"))
    return _with_forms(out)


def _with_forms(cases):
    """Each case in the one-buffer form (``table=False``) and the multi-tensor form, the
    latter beyond the bfloat16-param plan ``exhaustive``."""
    out = []
    for c in cases:
        out.append(pytest.param(*c.values, False, id=c.id, marks=c.marks))
        marks = c.marks if c.id in ("adam-bf16-sr-int8", "adam-int4") else (pytest.mark.exhaustive,)
        out.append(pytest.param(*c.values, True, id=f"{c.id}-table", marks=marks))
    return out


def _instructions(ptx):
    return [ln.split("//")[0] for ln in ptx.splitlines() if ln.startswith("\t")]


@pytest.mark.parametrize(("rule", "io", "table"), _cases())
def test_nvrtc_compiles_the_cuda_c_kernel(rule, io, table):
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    try:
        nvrtc.nvrtcVersion()
    except Exception as exc:
        pytest.skip(f"NVRTC cannot be loaded: {exc}")
    if table:
        src = quant_cuda.table_source(rule, _flags(rule), io, clip=True)
        name = quant_cuda.table_kernel_name(rule)
    else:
        src, name = quant_cuda.quant_source(rule, _flags(rule), io), quant_cuda.kernel_name(rule)
    _, prog = nvrtc.nvrtcCreateProgram(src.encode(), b"quant.cu", 0, [], [])
    opts = [b"-arch=sm_90", b"--std=c++17"]
    (res,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if res != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        pytest.fail(f"NVRTC: {res}\n{log.decode(errors='replace')[:4000]}")
    _, n = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * n
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(prog)
    text = ptx.decode().rstrip("\x00 ")
    assert f".entry {name}(" in text
    if any(quant_cuda.qslots(rule, _flags(rule))):  # the tables and the block's reduction
        assert ".shared" in text and "bar.sync" in text
    assert not [ln for ln in _instructions(text) if F64.search(ln)], "float64 in a float32 kernel"


def _numba_cases():
    """``_cases`` with only the bfloat16-param plan and int4's multi-tensor kernel by default
    (the int8 codec and storage conversions in one compile, the packed codec, a thread per
    byte, in another; a numba-cuda compile is most of this module's time)."""
    out = []
    for c in _cases():
        if c.id in ("adam-int8", "adam-float8_e4m3", "adam-int4"):
            c = pytest.param(*c.values, id=c.id, marks=(pytest.mark.exhaustive,))
        if c.id == "adam-bf16-sr-int8":  # one default compile: the multi-tensor form
            c = pytest.param(*c.values, id=c.id, marks=(pytest.mark.exhaustive,))
        out.append(c)
    return out


@pytest.mark.parametrize(("rule", "io", "table"), _numba_cases())
def test_numba_cuda_compiles_the_kernel(rule, io, table):
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        pytest.skip("the CUDA simulator is on: it compiles nothing")
    try:
        from numba import cuda

        from fastopt.backends import numba_cuda_quant as ncq
    except Exception as exc:
        pytest.skip(f"numba-cuda cannot be imported: {exc}")
    flags = _flags(rule)
    try:
        if table:
            fn = ncq.python_kernel(rule, flags, io, table=True, clip=True)
            sig = ncq.table_signature(rule, flags, io, clip=True)
        else:
            fn, sig = ncq.python_kernel(rule, flags, io), ncq.signature(rule, flags, io)
        ptx, _ = cuda.compile_ptx(fn, sig, cc=(9, 0))
    except Exception as exc:
        if "NVVM" in str(exc) or "libdevice" in str(exc):
            pytest.skip(f"numba-cuda needs NVVM: {exc}")
        raise
    if any(quant_cuda.qslots(rule, flags)):
        assert ".shared" in ptx and "bar.sync" in ptx
    assert not [ln for ln in _instructions(ptx) if F64.search(ln)], "float64 in a float32 kernel"
