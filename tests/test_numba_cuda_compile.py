"""Every numba-cuda kernel variant compiles for sm_80 and sm_90, without a GPU.

``numba.cuda.compile_ptx`` runs NVVM on the host; nvJitLink (when present) then assembles the
PTX into a cubin, which is what a driver would load. Float32 variants must hold no float64
instruction (a float64 literal or a float64 scalar would promote the whole expression), and
each variant must load and store exactly the buffers it uses: an absent state slot costs no
traffic. The sm_90 assembly's resource report gates registers and spills (``MAX_REGISTERS``).

Needs NVVM and nvJitLink from PyPI, no GPU or driver: ``pip install "numba-cuda[cu13]"``
(nvidia-nvvm, nvidia-nvjitlink, cuda-bindings 13) or ``pip install "numba-cuda[cu12]"``
(the CUDA 12 toolkit wheels, NVVM inside nvidia-cuda-nvcc). Skips cleanly without them.

The default run compiles, per rule, a pairwise cover of its flag variants in float32
(``support.cover``: every flag on and off beside every other flag on and off) and the variants
with no flag and with every flag in float64 (the most registers), and the mixed-precision
kernels of Adam under every plan and of the first rule of each state layout under the 16-bit
and capturable plans; the ``exhaustive`` group compiles every other case. The variants of a
group compile at once, for all its tests, on one xdist worker (``tests/conftest.py``).
"""

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastopt.kernels import RULES
from support.cover import fullest, marks, pairwise_by
from support.matrix import slots_read

CCS = [(8, 0), (9, 0)]
#: at most 64 registers per thread: 4 resident blocks of 256 threads per SM (half the threads an
#: SM holds), ample for a streaming kernel with one load per buffer in flight per thread; a rule
#: change that crosses it would silently cost occupancy (the grid is sized from the real count)
MAX_REGISTERS = 64


def _signature(rule, writes, dtype):
    from numba import types

    t = getattr(types, dtype)
    return (t[::1],) * (2 + len(writes)) + (types.UniTuple(t, len(RULES[rule].scalars)),)


def _toolchain():
    """(numba.cuda, backend module, nvjitlink or None), or a skip reason string."""
    if os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0"):
        return "the CUDA simulator is on: it compiles nothing"
    try:
        from numba import cuda

        from fastopt.backends import numba_cuda_backend as ncb

        rule, flags, writes = ncb.variants(["sgd"])[0]
        # a real variant: numba's built-in CUDA target compiles a trivial kernel without a GPU
        # but needs a driver for one that calls a device function
        cuda.compile_ptx(
            ncb.python_kernel(rule, flags, writes), _signature(rule, writes, "float32"), cc=(8, 0)
        )
    except Exception as exc:  # numba-cuda, NVVM or libdevice missing
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return (
            f"numba-cuda with NVVM is not installed ({type(exc).__name__}: {first}); "
            'pip install "numba-cuda[cu13]"'
        )
    try:
        from cuda.bindings import nvjitlink
    except ImportError:
        nvjitlink = None
    return cuda, ncb, nvjitlink


_TC = _toolchain()
pytestmark = pytest.mark.skipif(isinstance(_TC, str), reason=str(_TC))
VARIANTS = [] if isinstance(_TC, str) else _TC[1].variants()
DTYPES = ("float32", "float64")


def _bare_and_fullest():
    """Indices of each rule's variant with no flag on and its variant with the most on."""
    out = set()
    for rule in dict.fromkeys(r for r, _, _ in VARIANTS):
        idx = [i for i, (r, _, _) in enumerate(VARIANTS) if r == rule]
        on = [sum(VARIANTS[i][1].values()) for i in idx]
        out |= {idx[on.index(min(on))], idx[fullest([VARIANTS[i][1] for i in idx])]}
    return out


#: (variant index, dtype) of the default run: a pairwise cover of each rule's flags in float32,
#: each rule's bare and fullest variants in float64
DEFAULT = {(i, "float32") for i in pairwise_by(VARIANTS, lambda v: v[0], lambda v: v[1])} | {
    (i, "float64") for i in _bare_and_fullest()
}


def _assemble(nvjitlink, ptx, cc):
    """``(cubin, ptxas resource report)``."""
    arch = f"-arch=sm_{cc[0]}{cc[1]}"
    h = nvjitlink.create(2, [arch, "-verbose"])
    try:
        data = ptx.encode()
        nvjitlink.add_data(h, nvjitlink.InputType.PTX, data, len(data), "fastopt")
        nvjitlink.complete(h)
        cubin = bytearray(nvjitlink.get_linked_cubin_size(h))
        nvjitlink.get_linked_cubin(h, cubin)
        log = bytearray(nvjitlink.get_info_log_size(h))
        nvjitlink.get_info_log(h, log)
    finally:
        nvjitlink.destroy(h)
    return bytes(cubin), bytes(log).decode(errors="replace")


def resources(log):
    """``(registers, spill store bytes, spill load bytes, stack bytes)`` from a ptxas report."""
    regs = re.search(r"[Uu]sed (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    assert regs and spill and stack, f"no resource report in:\n{log[:2000]}"
    return (int(regs.group(1)), int(spill.group(1)), int(spill.group(2)), int(stack.group(1)))


def _instructions(ptx):
    # instruction lines only: drop comments and the header, which may mention any type name
    return [ln.split("//")[0] for ln in ptx.splitlines() if ln.startswith("\t")]


def _variant_id(v):
    rule, flags, _ = v
    return "-".join([rule] + [k for k, on in flags.items() if on])


def _ptx_per_cc(cuda, kernel, sig):
    """The kernel's PTX for each of ``CCS``, as numba-cuda's own dispatcher gets it: one typed,
    lowered code library (the Python front end, most of a compile's time), then NVVM once per
    compute capability (``get_asm_strs(cc)``). Falls back to one ``compile_ptx`` per cc where
    this numba-cuda has no such internal entry point."""
    try:
        from numba.cuda.compiler import _compile_pyfunc_with_fixup

        lib, _ = _compile_pyfunc_with_fixup(kernel, sig, device=False, abi="numba", cc=CCS[0])
        out = [lib.get_asm_strs(cc=cc) for cc in CCS]
    except (ImportError, TypeError, AttributeError):
        return [cuda.compile_ptx(kernel, sig, cc=cc)[0] for cc in CCS]
    assert all(len(p) == 1 for p in out), "one PTX module per compute capability"
    return [p[0] for p in out]


@functools.cache
def _compiled(default):
    """``{(variant index, dtype): ([ptx per cc], [(cubin, log) per cc or None]) or the
    exception}`` for every (variant, dtype) in ``DEFAULT`` (``default``) or not in it: numba's
    front end runs under its compiler lock, NVVM and nvJitLink release the GIL, so one thread
    per core overlaps them."""
    cuda, ncb, nvjitlink = _TC

    def job(i, dtype):
        rule, flags, writes = VARIANTS[i]
        try:
            kernel = ncb.python_kernel(rule, flags, writes)
            ptxs = _ptx_per_cc(cuda, kernel, _signature(rule, writes, dtype))
            links = [
                None if nvjitlink is None else _assemble(nvjitlink, ptx, cc)
                for cc, ptx in zip(CCS, ptxs)
            ]
            return ptxs, links
        except Exception as exc:  # re-raised by the variant's own test
            return exc

    keys = [(i, d) for i in range(len(VARIANTS)) for d in DTYPES if ((i, d) in DEFAULT) == default]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(keys, pool.map(lambda key: job(*key), keys)))


@pytest.mark.parametrize(
    "variant,dtype",
    [
        pytest.param(i, d, marks=marks((i, d) in DEFAULT), id=f"{_variant_id(v)}-{d}")
        for d in DTYPES
        for i, v in enumerate(VARIANTS)
    ],
)
def test_variant_compiles_for_sm80_and_sm90(variant, dtype):
    rule, flags, writes = VARIANTS[variant]
    out = _compiled((variant, dtype) in DEFAULT)[(variant, dtype)]
    if isinstance(out, Exception):
        raise out
    ptxs, links = out
    for cc, ptx, link in zip(CCS, ptxs, links):
        assert f".target sm_{cc[0]}{cc[1]}" in ptx
        body = _instructions(ptx)
        f64 = [ln.strip() for ln in body if re.search(r"\.f64\b", ln)]
        if dtype == "float32":
            assert not f64, f"float64 instructions in a float32 kernel: {f64[:5]}"
        else:
            assert f64, "a float64 kernel without float64 arithmetic"
        # NVVM unrolls the grid-stride loop, so count per trip: each trip loads param, grad and
        # each slot the variant reads once and stores param and each present slot once
        loads = sum(bool(re.search(r"\bld\.global\.", ln)) for ln in body)
        stores = sum(bool(re.search(r"\bst\.global\.", ln)) for ln in body)
        w, r = sum(writes), len(slots_read(rule, flags))
        assert loads and stores
        assert loads * (1 + w) == stores * (2 + r), (
            f"{loads} loads / {stores} stores: not (2 + {r}) loads per (1 + {w}) stores"
        )
        if link is not None:
            cubin, log = link
            assert cubin[:4] == b"\x7fELF"
            regs, spill_st, spill_ld, stack = resources(log)
            assert regs <= MAX_REGISTERS, f"{regs} registers > {MAX_REGISTERS} (sm_{cc[0]}{cc[1]})"
            assert (spill_st, spill_ld, stack) == (0, 0, 0), f"spills or stack:\n{log[-800:]}"


def test_every_rule_and_flag_has_a_variant():
    """The backend compiles every variant of every rule spec: each flag combination, less
    those the spec excludes (SGD's nesterov without momentum)."""
    assert {r for r, _, _ in VARIANTS} == set(RULES)
    for rule, spec in RULES.items():
        flags = [f for r, f, _ in VARIANTS if r == rule]
        assert sorted(map(sorted, map(dict.items, flags))) == sorted(
            map(sorted, map(dict.items, spec.variants()))
        ), rule


#: storage formats of the mixed-precision kernels (kernels.storage.IO keyword arguments)
MIXED_PLANS = {
    "bf16": dict(param="bfloat16", grad="bfloat16", state="bfloat16"),
    "f16": dict(param="float16", grad="float16", state="float16"),
    "bf16-master-capturable": dict(
        param="bfloat16",
        grad="float32",
        state="float32",
        master=True,
        scale="device",
        found_inf=True,
        kbuf=True,
    ),
    "bf16-sr-scaled": dict(
        param="bfloat16", grad="bfloat16", state="float32", sr=True, scale="host", write_grad=True
    ),
    "f32-bf16-state": dict(param="float32", grad="float32", state="bfloat16"),
    "f64-f32": dict(param="float64", grad="float32", state="float32"),
}


#: every rule under the 16-bit and capturable plans, Adam under all of them
MIXED_CASES = [
    (rule, plan)
    for plan in MIXED_PLANS
    for rule in RULES
    if rule == "adam" or plan in ("bf16", "bf16-master-capturable")
]


def _layout(rule):
    spec = RULES[rule]
    return len(spec.slots), tuple(spec.slots_used(dict.fromkeys(spec.flags, False)))


#: the rules the default run compiles under every plan it compiles: Adam, and the first rule of
#: each state layout (the loads and stores a plan generates depend on the layout; the rule's
#: own code is the one the float32 variants above hold free of float64)
MIXED_RULES = {"adam"} | set({_layout(r): r for r in reversed(RULES)}.values())


@pytest.mark.parametrize(
    "rule,plan",
    [pytest.param(r, p, marks=marks(r in MIXED_RULES), id=f"{r}-{p}") for r, p in MIXED_CASES],
)
def test_mixed_kernels_compile_without_float64(rule, plan):
    """The kernels generated per storage format compile for sm_90; where the math is float32
    (16-bit and float32 storage) no float64 instruction appears, and each trip loads param,
    grad and every present slot (and the master) once."""
    from fastopt.kernels.storage import IO

    cuda, ncb, _ = _TC
    io = IO(**MIXED_PLANS[plan])
    flags = dict.fromkeys(RULES[rule].flags, False)
    writes = RULES[rule].slots_used(flags)
    ptx, _ = cuda.compile_ptx(
        ncb.python_kernel(rule, flags, writes, io), ncb.mixed_signature(rule, writes, io), cc=(9, 0)
    )
    body = _instructions(ptx)
    f64 = [ln.strip() for ln in body if re.search(r"\.f64\b", ln)]
    if io.compute == "float32":
        assert not f64, f"float64 instructions in a float32-math kernel: {f64[:5]}"
    else:
        assert f64
    assert any(re.search(r"\bst\.global\.", ln) for ln in body)
