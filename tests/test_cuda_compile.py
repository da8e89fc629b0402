"""Compile checks without a GPU: every CuPy kernel variant compiles for sm_80 and sm_90.

The source is what CuPy itself generates for each variant (``cupy_backend.cuda_source_for``:
CuPy's code generator, headers and compiler options), compiled by NVRTC from the PyPI wheels
(``cuda.bindings.nvrtc``) to a cubin for each architecture. The PTX of every float32 variant must
hold no float64 instruction (a stray double literal or ``pow`` would show as ``.f64`` / ``cvt``);
the float64 variants must, which proves the check can see one. Needs ``pip install
cupy-cuda13x numba-cuda[cu13]`` (or ``fastopt[cuda13]``); skipped when the compiler is missing.

The default run compiles a pairwise cover of each rule's flag variants (``support.cover``: every
flag on and off beside every other flag on and off, none and all among them): the raw float
program (the backend's default form) for both architectures, whose register budgets differ,
and the raw double program and the ElementwiseKernel programs for sm_90 alone. That is enough:
the same source, PTX checks (float64 instructions, vector loads) do not depend on the target, and
sm_80's ptxas accepts whatever NVRTC emits for it; the double register budget and the sm_80
ElementwiseKernel cubins are the ``exhaustive`` group's, with the other variants (every program,
both architectures). Each group's programs compile once, for all the tests of the module (one
xdist worker).
"""

import functools
import os
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

cupy = pytest.importorskip("cupy")
nvrtc = pytest.importorskip("cuda.bindings.nvrtc")

from fastopt.kernels import RULES, cuda_source  # noqa: E402
from support.cover import marks, pairwise_by  # noqa: E402
from support.matrix import slots_read  # noqa: E402

from fastopt.backends import cupy_backend  # noqa: E402

ARCHS = ("sm_80", "sm_90")
DTYPES = (np.float32, np.float64)
VARIANTS = [(rule, flags) for rule in RULES for flags in cuda_source.variants(rule)]
_COVER = pairwise_by(VARIANTS, lambda v: v[0], lambda v: v[1])
#: indices into VARIANTS per group: the default run's cover, and the rest (exhaustive)
GROUPS = {"cover": _COVER, "rest": [i for i in range(len(VARIANTS)) if i not in set(_COVER)]}


#: the programs the default run compiles for the cover group, by (form, arch, element type):
#: the raw float program for each architecture, everything else for sm_90 (module docstring)
DEFAULT = {("raw", a, "float") for a in ARCHS} | {
    (form, ARCHS[-1], t)
    for form, types in (("elementwise", ("float32", "float64")), ("raw", ("double",)))
    for t in types
}


def _group_params(form, axes):
    """``pytest.param((*axis values, group))`` for every combination of ``form``'s programs
    (``axes``: ``(arch, element type)`` pairs, or ``()``), marked exhaustive unless the cover
    group's program is in ``DEFAULT``."""
    return [
        pytest.param(
            (*a, g),
            marks=marks(g == "cover" and (not a or (form, *a) in DEFAULT)),
            id="-".join((*a, g)),
        )
        for a in axes
        for g in GROUPS
    ]


#: PTX that computes in double: f64 arithmetic, or any conversion to or from f64
F64 = re.compile(r"\.f64\b")


def _nvrtc_ok():
    try:
        err, _major, _minor = nvrtc.nvrtcVersion()
    except Exception as exc:  # the NVRTC shared library is not installed
        return f"NVRTC cannot be loaded: {exc}"
    return "" if err == nvrtc.nvrtcResult.NVRTC_SUCCESS else f"nvrtcVersion: {err}"


def _tag(i):
    return f"__v{i}"


def _program(dtype, group, index_32_bits=True):
    """One translation unit holding every variant of ``group`` for ``dtype``: each in its own
    namespace (its rule template is redefined per variant), its kernel renamed
    ``fastopt_<rule>__v<i>``, its flag macros undefined after it."""
    parts, options = [], None
    for i in GROUPS[group]:
        rule, flags = VARIANTS[i]
        src, options = cupy_backend.cuda_source_for(rule, flags, dtype, index_32_bits)
        head, sep, code = src.partition("typedef ")  # the CuPy headers, included once
        if not parts:
            parts.append(head)
        name = cuda_source.kernel_name(rule)
        code = re.sub(rf"\b{name}\(", f"{name}{_tag(i)}(", sep + code, count=1)
        undef = "\n".join(f"#undef {m}" for m in cuda_source.defines(rule, flags))
        parts.append(f"namespace fastopt_v{i} {{\n{code}\n}}\n{undef}\n")
    return "\n".join(parts), options


def _compile(source, options, arch, what):
    """NVRTC ``source`` for ``arch``: ``(ptx text, cubin size)``; fails with NVRTC's log."""
    (prog,) = _check(
        nvrtc.nvrtcCreateProgram(source.encode(), b"fastopt.cu", 0, [], []),
        None,
        "nvrtcCreateProgram",
    )
    opts = [o.encode() for o in options + (f"-arch={arch}",)]
    _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), prog, what)
    (n,) = _check(nvrtc.nvrtcGetPTXSize(prog), prog, "nvrtcGetPTXSize")
    ptx = b" " * n
    _check(nvrtc.nvrtcGetPTX(prog, ptx), prog, "nvrtcGetPTX")
    (cubin,) = _check(nvrtc.nvrtcGetCUBINSize(prog), prog, "nvrtcGetCUBINSize")
    nvrtc.nvrtcDestroyProgram(prog)
    return ptx.decode().rstrip("\x00 "), cubin


def _check(result, prog, what):
    err = result[0]
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        pytest.fail(f"{what}: {err}\n{log.decode(errors='replace')[:4000]}")
    return result[1:]


def _default(key, group):
    """Is ``key``'s program compiled by the default run for ``group``?"""
    return group == "cover" and key in DEFAULT


@functools.cache
def _all_programs(group, default):
    """Every program this module checks for ``group`` that the default run compiles
    (``default``) or that only the exhaustive run does, compiled at once: the ElementwiseKernel
    program and the raw program of the group's variants, per arch and element type. NVRTC
    releases the GIL, so one thread per core compiles them side by side. ``{key: result or
    exception}``."""
    jobs = {}
    for a in ARCHS:
        for d in DTYPES:
            name = np.dtype(d).name
            jobs[("elementwise", a, name)] = lambda a=a, name=name: _compile(
                *_program(name, group), a, f"NVRTC {a} {name} ({group})"
            )
        for c in ("float", "double"):
            jobs[("raw", a, c)] = lambda a=a, c=c: _raw_compile(a, c, group)
    jobs = {k: job for k, job in jobs.items() if _default(k, group) == default}

    def run(job):
        try:
            return job()
        except BaseException as exc:  # pytest.fail inside a worker: re-raised by its test
            return exc

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return dict(zip(jobs, pool.map(run, jobs.values())))


def _result(key, group):
    out = _all_programs(group, _default(key, group))[key]
    if isinstance(out, BaseException):
        raise out
    return out


@pytest.fixture(
    scope="module",
    params=_group_params("elementwise", [(a, np.dtype(d).name) for a in ARCHS for d in DTYPES]),
)
def compiled(request):
    """``(arch, dtype, group, ptx, cubin size)`` of the group's program."""
    reason = _nvrtc_ok()
    if reason:
        pytest.skip(reason)
    arch, dtype, group = request.param
    ptx, cubin = _result(("elementwise", arch, dtype), group)
    return arch, dtype, group, ptx, cubin


def _entries(ptx):
    """kernel name -> its PTX text (from its ``.entry`` line to the next one)."""
    heads = list(re.finditer(r"\.entry\s+(\w+)\s*\(", ptx))
    ends = [m.start() for m in heads[1:]] + [len(ptx)]
    return {m.group(1): ptx[m.start() : end] for m, end in zip(heads, ends)}


def _describe(entry):
    """``fastopt_adam__v3`` -> ``adam {flags}``, for failure messages."""
    rule, flags = VARIANTS[int(entry.rsplit("__v", 1)[1])]
    return f"{rule} {flags}"


def test_groups_hold_every_variant_once():
    assert sorted(GROUPS["cover"] + GROUPS["rest"]) == list(range(len(VARIANTS)))
    for rule in RULES:  # the cover holds every flag of every rule on and off
        kept = [VARIANTS[i][1] for i in GROUPS["cover"] if VARIANTS[i][0] == rule]
        for flag in RULES[rule].flags:
            assert {f[flag] for f in kept} == {False, True}, (rule, flag)


def test_every_variant_compiles(compiled):
    arch, dtype, group, ptx, cubin = compiled
    assert cubin > 0, f"no {arch} cubin for {dtype}"
    entries = _entries(ptx)
    want = {f"{cuda_source.kernel_name(VARIANTS[i][0])}{_tag(i)}" for i in GROUPS[group]}
    assert set(entries) == want, f"{arch} {dtype}: kernels missing {sorted(want - set(entries))}"
    assert f".target {arch}" in ptx


def test_float32_kernels_hold_no_float64(compiled):
    arch, dtype, _, ptx, _ = compiled
    entries = _entries(ptx)
    f64 = {name: F64.findall(text) for name, text in entries.items()}
    if dtype == "float32":
        bad = {
            _describe(n): f"{len(v)} f64 ops, e.g. "
            + next(line.strip() for line in entries[n].splitlines() if F64.search(line))
            for n, v in f64.items()
            if v
        }
        assert not bad, f"float32 kernels with float64 instructions ({arch}): {bad}"
    else:  # the detector sees double math where there is some
        none = [n for n, v in f64.items() if not v]
        assert all(f64.values()), f"float64 kernels without f64 ops? {none}"


@pytest.mark.parametrize("rule", list(RULES))
def test_slots_unused_by_a_variant_are_not_parameters(rule):
    """A variant passes only the state it reads and writes: no placeholder traffic."""
    for flags in cuda_source.variants(rule):
        used = cuda_source.slots_used(rule, flags)
        src, _ = cupy_backend.cuda_source_for(rule, flags, np.float32)
        for slot, u in zip(RULES[rule].state, used):
            assert (f"_raw_{slot}" in src) == u, (rule, flags, slot)


def test_source_depends_on_variant_not_on_scalars():
    """Scalars are kernel arguments: one source (one compile) per variant and dtype, whatever
    lr or the step; and distinct variants really differ."""
    rule = "adam"
    sources = {
        cupy_backend.cuda_source_for(rule, f, np.float32)[0] for f in cuda_source.variants(rule)
    }
    assert len(sources) == len(cuda_source.variants(rule))
    src = cupy_backend.cuda_source_for(rule, dict(amsgrad=True), np.float32)[0]
    for name in RULES[rule].scalars:
        assert re.search(rf"const float {name}\b", src), f"scalar {name} is not a float parameter"


@pytest.mark.parametrize("group", _group_params("elementwise", [()]))
def test_64_bit_indexing_variants_compile(group):
    """Arrays of 2**31 elements or more get CuPy's 64-bit index form: it compiles too, and its
    float32 kernels stay free of float64."""
    reason = _nvrtc_ok()
    if reason:
        pytest.skip(reason)
    (group,) = group
    ptx, cubin = _compile(*_program("float32", group, False), "sm_90", "NVRTC 64-bit")
    assert cubin > 0 and len(_entries(ptx)) == len(GROUPS[group])
    assert not F64.search(ptx), "float64 instructions in 64-bit-index float32 kernels"


# -- the raw kernels (the CuPy backend's default form) -------------------------------------------

#: at most 64 registers per thread: 4 resident blocks of 256 threads per SM (half the threads an
#: SM holds), ample for a streaming kernel with one 16-byte load per buffer in flight per thread
MAX_REGISTERS = 64
#: double kernels: each value takes two registers, and Adan's (six arrays, three betas) hold
#: 66-72 on sm_80/sm_90 with no spill; 80 still keeps 3 blocks of 256 threads per SM resident
MAX_REGISTERS_DOUBLE = 80


def _raw_program(ctype, group):
    """The raw kernel of every variant of ``group`` in both widths, for element type ``ctype``,
    in one unit."""
    parts, names = [], {}
    for i in GROUPS[group]:
        rule, flags = VARIANTS[i]
        for width in sorted({1, cuda_source.VECTOR_WIDTH[ctype]}):
            name = f"fastopt_{rule}__r{i}_w{width}"
            names[name] = (rule, flags, width)
            src = cuda_source.raw_source(rule, flags, ctype, width, name=name)
            undef = "\n".join(f"#undef {m}" for m in cuda_source.defines(rule, flags))
            parts.append(f"namespace r{i}_w{width} {{\n{src}\n}}\n{undef}\n")
    return "\n".join(parts), names


def _compile_log(source, arch, what):
    """NVRTC ``source`` for ``arch`` with ptxas' resource report: ``(ptx, log)``."""
    (prog,) = _check(
        nvrtc.nvrtcCreateProgram(source.encode(), b"fastopt_raw.cu", 0, [], []),
        None,
        "nvrtcCreateProgram",
    )
    opts = [f"-arch={arch}".encode(), b"--ptxas-options=-v"]
    _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), prog, what)
    (n,) = _check(nvrtc.nvrtcGetPTXSize(prog), prog, "nvrtcGetPTXSize")
    ptx = b" " * n
    _check(nvrtc.nvrtcGetPTX(prog, ptx), prog, "nvrtcGetPTX")
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    nvrtc.nvrtcDestroyProgram(prog)
    return ptx.decode().rstrip("\x00 "), log.decode(errors="replace")


def _report(log):
    """kernel name -> (registers, spill stores, spill loads, stack bytes)."""
    out = {}
    for m in re.finditer(
        r"Compiling entry function '(\w+)'.*?(\d+) bytes stack frame, (\d+) "
        r"bytes spill stores, (\d+) bytes spill loads.*?Used (\d+) registers",
        log,
        re.S,
    ):
        out[m.group(1)] = (int(m.group(5)), int(m.group(3)), int(m.group(4)), int(m.group(2)))
    return out


@pytest.fixture(
    scope="module",
    params=_group_params("raw", [(a, c) for a in ARCHS for c in ("float", "double")]),
)
def raw_compiled(request):
    reason = _nvrtc_ok()
    if reason:
        pytest.skip(reason)
    arch, ctype, group = request.param
    names, ptx, log = _result(("raw", arch, ctype), group)
    return arch, ctype, names, ptx, log


def _raw_compile(arch, ctype, group):
    source, names = _raw_program(ctype, group)
    ptx, log = _compile_log(source, arch, f"NVRTC raw {arch} {ctype}")
    return names, ptx, log


def test_raw_kernels_compile_without_spills(raw_compiled):
    arch, ctype, names, ptx, log = raw_compiled
    entries = _entries(ptx)
    # extern "C" inside a namespace keeps the plain name
    assert set(entries) == set(names), f"missing: {sorted(set(names) - set(entries))}"
    report = _report(log)
    assert set(report) == set(names), f"no ptxas report for {sorted(set(names) - set(report))}"
    budget = MAX_REGISTERS_DOUBLE if ctype == "double" else MAX_REGISTERS
    bad = {n: r for n, r in report.items() if r[0] > budget or r[1:] != (0, 0, 0)}
    assert not bad, f"{arch} {ctype}: (registers, spill st, spill ld, stack) over budget: {bad}"


def test_raw_kernels_use_16_byte_loads_and_no_float64_in_float(raw_compiled):
    _arch, ctype, names, ptx, _ = raw_compiled
    entries = _entries(ptx)
    vec = {"float": r"\.v4\.(f32|b32|u32)", "double": r"\.v2\.(f64|b64|u64)"}[ctype]
    for name, (rule, flags, width) in names.items():
        text = entries[name]
        arrays, _ = cuda_source.raw_args(rule, flags)
        loads = len(re.findall(rf"\bld\.global(\.nc)?{vec}", text))
        stores = len(re.findall(rf"\bst\.global{vec}", text))
        if width > 1:
            # per trip of the (unrolled) vector loop: one 16-byte load per buffer read (param,
            # grad, each slot the variant reads) and one 16-byte store per written buffer
            read = 2 + len(slots_read(rule, flags))
            written = sum(w for _, w in arrays)
            if flags.get("select"):
                # a device variant (``Rule.device_flags``) selects its term by a comparison of
                # two scalars, one value for every element: NVRTC may unswitch the loop into
                # one copy per term, and a slot only one term reads is loaded in that copy only
                assert loads and stores, f"{rule} {flags}: {loads} loads, {stores} stores"
                assert stores * (read - 1) <= loads * written <= stores * read, (
                    f"{rule} {flags}: {loads} loads / {stores} stores, not {read - 1}..{read} "
                    f"loads per {written} stores"
                )
            else:
                assert loads and loads % read == 0, f"{rule} {flags}: {loads} vector loads"
                assert stores * read == loads * written, f"{rule} {flags}: {stores} stores"
        else:
            assert loads == stores == 0, f"{rule} {flags}: vector access in the scalar form"
        if ctype == "float":
            assert not F64.search(text), f"{rule} {flags} w={width}: float64 instructions"


@pytest.mark.parametrize("rule", list(RULES))
def test_cuda_body_takes_the_specs_slots_and_scalars(rule):
    """The hand-written CUDA C body (kernels/<rule>.cu) takes one reference per state slot of the
    rule spec and the spec's host scalars by name, in order: the Python rule and the C body
    cannot drift apart in what they are handed."""
    slots, scalars = cuda_source.body_signature(rule)
    spec = RULES[rule]
    assert len(slots) == len(spec.slots), f"{rule}.cu takes state {slots}, spec {spec.state}"
    assert tuple(scalars) == spec.scalars, f"{rule}.cu takes scalars {scalars}, spec {spec.scalars}"


@pytest.mark.parametrize("rule", list(RULES))
def test_python_rule_unpacks_the_specs_scalars(rule):
    """The Python rule unpacks ``k`` into the spec's scalar names, in order (the CUDA C body's
    parameter names, checked above), so all three read ``k`` alike."""
    import ast
    import inspect
    import textwrap

    spec = RULES[rule]
    tree = ast.parse(textwrap.dedent(inspect.getsource(spec.make_rule)))
    unpacks = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and isinstance(n.value, ast.Name) and n.value.id == "k"
    ]
    assert len(unpacks) == 1, f"{rule}: expected one '<names> = k' line"
    names = tuple(t.id for t in unpacks[0].targets[0].elts)
    assert names == spec.scalars, f"{rule}: unpacks {names}, spec {spec.scalars}"
