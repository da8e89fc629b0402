"""The CUDA C kernel of quantized state (``kernels/quant_cuda.py``: what the CuPy backend
compiles) built by g++ as C++ (``tests/harness/grid.cpp``: every thread of a block a thread of
its own, ``__syncthreads`` a barrier, ``-ffp-contract=off``) and run over a grid smaller than
the block table, against the definition of a quantized step (``tests/support/quant_cases.py``:
the numba CPU backend's float32-state step on the dequantized state, then the oracle's
quantization), bit for bit: params, codes and scales; two tensors of odd lengths in one buffer,
each ending in a short block, and the elements outside them untouched.

The default run keeps one small case per format (Adam with every probe on: three quantized
slots, signed and unsigned maps; int4's packed codes, a thread per byte, in both kernels);
every rule in every format is the ``exhaustive`` group.
Skipped only when g++ is missing.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from fastopt.kernels import RULES, cuda_source, quant_cuda, storage
from support import quant_cases as qc
from support.matrix import RULE_FULL

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not installed")

HARNESS = Path(__file__).with_name("harness") / "grid.cpp"
GRID = 2  # CUDA blocks: fewer than the 5 blocks of codes, so the block loop takes trips
STEPS = 3
DEFAULT = {("adam", "int8"), ("adam", "float8_e4m3"), ("adam", "int4")}
#: the g++ builds of this process (removed at exit)
_BUILD = Path(tempfile.mkdtemp(prefix="fastopt_quant_"))
atexit.register(shutil.rmtree, _BUILD, True)


@functools.cache
def _kernel(
    rule: str,
    flags: tuple[tuple[str, bool], ...],
    io: storage.IO,
    table: bool = False,
    clip: bool = False,
):
    """The g++-built kernel of one variant: ``run(arrays, k, d, qtab, blocks, nb, grid)``;
    with ``table`` the multi-tensor kernel (``quant_cuda.table_source``): ``arrays[0]`` the
    table's rows, ``blocks`` its chunk entries, ``nb`` their count, and with ``clip`` the clip
    buffer the last of ``d``."""
    fl = dict(flags)
    tag = f"k{abs(hash((rule, flags, io, table, clip))) % 10**12}"
    arrays, scalars = quant_cuda.quant_args(rule, fl, io)
    if table:
        name = f"{quant_cuda.table_kernel_name(rule)}_{tag}"
        src = quant_cuda.table_source(rule, fl, io, clip, name=name)
        args = ["(const long long *)a[0]", "(const unsigned long long *)blocks", "nb", "qtab"]
    else:
        name = f"{quant_cuda.kernel_name(rule)}_{tag}"
        src = quant_cuda.quant_source(rule, fl, io, name=name)
        args = [f"({t} *)a[{j}]" for j, (_, t, _) in enumerate(arrays)]
        args += ["qtab", "blocks", "nb"]
    if clip:
        scalars = [*scalars, ("const C *", "clip")]
    nk = nd = 0
    for t, _ in scalars:  # host values from k, device buffers from d, in declared order
        if "*" in t:
            args.append(f"({t.split('*')[0]} *)d[{nd}]")
            nd += 1
        else:
            args.append(f"({t.replace('const ', '')})k[{nk}]")
            nk += 1
    code = "\n".join(
        [
            f"namespace {tag} {{",
            src,
            f'extern "C" void run_{tag}(void *const *a, const double *k, void *const *d, '
            "const float *qtab, const long long *blocks, long long nb, unsigned grid) {",
            f"    fastopt_grid_threads(grid, {quant_cuda.threads(io.quant)}, [&] "
            f"{{ {name}({', '.join(args)}); }});",
            "}",
            "}",
        ]
        + [f"#undef {m}" for m in cuda_source.defines(rule, fl)]
    )
    fn = _build(tag, code)
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_longlong, ctypes.c_uint]
    return fn, arrays


def _build(tag: str, code: str):
    """``run_<tag>`` of ``code`` (a namespace and its extern "C" driver) built into the harness
    by g++."""
    (_BUILD / f"{tag}.inc").write_text(code + "\n")
    so = _BUILD / f"{tag}.so"
    cmd = [GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off"]
    cmd += ["-Wall", "-Werror", f'-DFASTOPT_KERNELS="{tag}.inc"', f"-I{_BUILD}", str(HARNESS)]
    res = subprocess.run(cmd + ["-o", str(so)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"g++ failed:\n{res.stderr[:4000]}"
    return getattr(ctypes.CDLL(str(so)), f"run_{tag}")


def _step(rule, hp, fmt, p, g, st, t, io=None, extras=(), dev=()):
    """One quantized step of the g++-built kernel over the buffer (in place); ``io``: the
    storage format (default float32 params), ``extras``: the values of its host scalars after
    the rule's (``inv_scale``, ``salt``, ``key`` as it declares them; none with ``io.kbuf``
    but these), ``dev``: its device buffers in declared order (``kbuf``, ``gscale``,
    ``found_inf``)."""
    spec = RULES[rule]
    hs = spec.replay_host_state(hp, t)
    flags, k = spec.variant_and_scalars(hp, t, hs)
    io = io or storage.IO(quant=fmt)
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
    blocks = qc.block_table(fmt)
    ks = np.array([*([] if io.kbuf else k), *extras, 0.0], np.float64)
    dp = (ctypes.c_void_p * max(1, len(dev)))(*[a.ctypes.data for a in dev])
    fn(ptrs, ks.ctypes.data, dp, qtab.ctypes.data, blocks.ctypes.data, blocks.shape[0], GRID)


def _table_step(rule, hp, fmt, p, g, st, t, clip=None):
    """One step of the g++-built multi-tensor kernel over the buffer's tensors as a table
    holds them (``qc.tensors``: the table and its chunk entries made and checked by
    ``_launch.TensorTable``), in place; ``clip``: the ``[norm, clip_coef]`` it reads."""
    from fastopt.backends._launch import TensorTable

    spec = RULES[rule]
    flags, k = spec.variant_and_scalars(hp, t, spec.replay_host_state(hp, t))
    io = storage.IO(quant=fmt)
    table = TensorTable(rule, io, qc.tensors(rule, fmt, p, g, st))
    table.check(rule, flags, io)
    key = tuple(sorted(flags.items()))
    fn, _ = _kernel(rule, key, io, True, clip is not None)
    ptrs = (ctypes.c_void_p * 1)(table.rows.ctypes.data)
    qmaps = tuple(s.quant_map for s, q in zip(spec.slots, quant_cuda.qslots(rule, flags)) if q)
    qtab = quant_cuda.tables(fmt, qmaps)
    ks = np.array([*k, 0.0], np.float64)
    dev = [] if clip is None else [clip]
    dp = (ctypes.c_void_p * max(1, len(dev)))(*[a.ctypes.data for a in dev])
    chunks = table.chunks
    fn(ptrs, ks.ctypes.data, dp, qtab.ctypes.data, chunks.ctypes.data, table.nchunks, GRID)


@pytest.mark.parametrize(("rule", "fmt"), qc.rule_format_params(DEFAULT))
def test_cuda_c_kernel_equals_float32_step_then_oracle_quantization(rule, fmt):
    _held_to_the_definition(rule, fmt, 11, _step)


def _held_to_the_definition(rule, fmt, seed, step):
    """``STEPS`` steps of ``step(rule, hp, fmt, p, g, state, t)`` over the case's buffer, each
    bit for bit the definition (``qc.expected``), the elements outside the tensors untouched;
    returns ``(rng, p, state)`` for more."""
    hp = RULE_FULL[rule]
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(qc.LENGTH).astype(np.float32)
    p[qc.OUTSIDE] = qc.POISON
    st = qc.initial(rule, hp, fmt, rng)
    for t in range(1, STEPS + 1):
        g = rng.standard_normal(qc.LENGTH).astype(np.float32)
        want_p, want = qc.expected(rule, hp, fmt, p, g, st, t)
        step(rule, hp, fmt, p, g, st, t)
        qc.assert_same(p, st, want_p, want, f"{rule} {fmt} step {t}", fmt)
    assert np.all(p[qc.OUTSIDE] == qc.POISON)
    return rng, p, st


@pytest.mark.parametrize(
    ("rule", "fmt"), qc.rule_format_params({("adam", "int8"), ("adam", "int4")})
)
def test_multi_tensor_kernel_equals_float32_step_then_oracle_quantization(rule, fmt):
    """The multi-tensor kernel (``quant_cuda.table_source``: one launch over a table of
    tensors, a CUDA block per block of codes, each tensor's scales from its own row) over the
    buffer's two tensors, the second first in the table: per tensor the definition, bit for
    bit (params, codes, scales; the gap untouched); then a step reading a clip coefficient
    equals the step on the gradients times it."""
    hp = RULE_FULL[rule]
    rng, p, st = _held_to_the_definition(rule, fmt, 12, _table_step)
    coef = np.float32(0.375)
    g = rng.standard_normal(qc.LENGTH).astype(np.float32)
    want_p, want = qc.expected(rule, hp, fmt, p, g * coef, st, STEPS + 1)
    _table_step(rule, hp, fmt, p, g, st, STEPS + 1, clip=np.array([9.0, coef], np.float32))
    qc.assert_same(p, st, want_p, want, f"{rule} {fmt} clipped", fmt)


@pytest.mark.exhaustive  # a numba compile of the CPU loop of this format besides g++
def test_bfloat16_params_stochastic_rounding_and_loss_scale_equal_the_cpu_loop():
    """bfloat16 params and grads, stochastic rounding and a host loss scale (the storage
    format's loads and stores around the same codec): the CPU backend's quantized loop over
    the same buffer and block table, bit for bit."""

    def device_step(rule, hp, fmt, t, flags, k, io, p, g, st, blocks, x):
        _step(rule, hp, fmt, p.view(np.uint16), g.view(np.uint16), st, t, io, x)

    qc.bf16_sr_scale_against_the_cpu_loop(device_step)


@pytest.mark.exhaustive  # two more g++ builds
def test_capturable_form_equals_the_host_form():
    """The capturable form (the scalars from a device buffer, the loss scale and a found-inf
    flag from device pointers): with the flag clear, the host form's codes, scales and params
    bit for bit; with it set, nothing written."""
    import dataclasses

    rule, fmt, hp = "adam", "float8_e4m3", RULE_FULL["adam"]
    spec = RULES[rule]
    host = storage.IO(quant=fmt, scale="host")
    cap = dataclasses.replace(host, scale="device", found_inf=True, kbuf=True)
    rng = np.random.default_rng(6)
    p = rng.standard_normal(qc.LENGTH).astype(np.float32)
    st = qc.initial(rule, hp, fmt, rng)
    p2, st2 = p.copy(), qc.copy(st)
    g = rng.standard_normal(qc.LENGTH).astype(np.float32) * 8
    k = spec.variant_and_scalars(hp, 2, spec.replay_host_state(hp, 2))[1]
    kbuf, scale = np.array(k, np.float32), np.array([8.0], np.float32)
    _step(rule, hp, fmt, p, g, st, 2, host, (0.125,))
    _step(rule, hp, fmt, p2, g, st2, 2, cap, (), (kbuf, scale, np.array([0.0], np.float32)))
    qc.assert_same(p2, st2, p, st, "capturable", fmt)
    before = p2.copy(), qc.copy(st2)
    _step(rule, hp, fmt, p2, g, st2, 3, cap, (), (kbuf, scale, np.array([1.0], np.float32)))
    qc.assert_same(p2, st2, *before, "found inf", fmt)


@pytest.mark.parametrize("qm", ["signed", "unsigned"])
def test_int4_encode_source_equals_the_lookup(qm):
    """The int4 encode of the CUDA C kernels (``quant_cuda.encode4_source``: the CPU loops'
    fifteen comparisons, from ``quant.int4_encode_constants``) built by g++ gives the lookup's
    code (``quant.encode``, the definition the CPU's encodes are held to) of every threshold
    and its 4 float32 neighbours each way, every value of the map and its neighbours, ±0,
    ±inf, NaN, the lookup's limit (2) and its neighbours, subnormals, and 20000 random float32
    of every sign and exponent."""
    from fastopt.kernels import quant

    t = quant.table("int4", qm)
    tag = f"enc4_{qm}"
    code = "\n".join(
        [
            f"namespace {tag} {{",
            quant_cuda.encode4_source(qm),
            f'extern "C" void run_{tag}(const float *y, unsigned int *out, long long n) {{',
            f"    for (long long i = 0; i < n; ++i) out[i] = {quant_cuda.encode4_name(qm)}(y[i]);",
            "}",
            "}",
        ]
    )
    fn = _build(tag, code)
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
    f = np.float32
    thr = t.thr[np.isfinite(t.thr)]
    pts = np.concatenate([thr, t.dec, [f(2), f(1), f(0)]]).astype(np.float32)
    near = [pts]
    up, down = pts.copy(), pts.copy()
    for _ in range(4):
        up, down = np.nextafter(up, f(np.inf)), np.nextafter(down, f(-np.inf))
        near += [up, down]
    rng = np.random.default_rng(5)
    bits = rng.integers(0, 2**32, 20000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-39, 3.0, 1e30], np.float32)
    y = np.concatenate([*near, -np.concatenate(near), bits, special]).astype(np.float32)
    got = np.zeros(y.size, np.uint32)
    fn(y.ctypes.data, got.ctypes.data, y.size)
    want = np.array([quant.encode(v, t.base, t.bthr, t.e_lo, t.e_hi, t.mb) for v in y], np.uint32)
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{bad.size} codes differ, first at {y[bad[:5]]}: {got[bad[:5]]}"


@pytest.mark.exhaustive  # 2^32 codes per map by g++ and by the compiled lookup, ~1 min
def test_int4_encode_source_equals_the_lookup_on_every_float32():
    """The CUDA C int4 encode (``quant_cuda.encode4_source``, built by g++) gives the lookup's
    code (``quant.CODECS``' encode, compiled by numba) of all 2^32 float32 bit patterns, both
    maps."""
    import numba
    from fastopt.kernels import quant

    import fastopt.backends.numba_quant  # noqa: F401  (registers the codec for numba)

    bits_f32 = storage.bits_f32
    for qm in ("signed", "unsigned"):
        tag = f"enc4_all_{qm}"
        code = "\n".join(
            [
                f"namespace {tag} {{",
                quant_cuda.encode4_source(qm),
                f'extern "C" void run_{tag}(unsigned int first, long long n, unsigned char *out) '
                "{",
                "    for (long long i = 0; i < n; ++i) out[i] = (unsigned char)"
                f"{quant_cuda.encode4_name(qm)}(__uint_as_float(first + (unsigned int)i));",
                "}",
                "}",
            ]
        )
        fn = _build(tag, code)
        fn.argtypes = [ctypes.c_uint, ctypes.c_longlong, ctypes.c_void_p]
        lookup = quant.CODECS[quant.table("int4", qm).name][1]

        @numba.njit(error_model="numpy")
        def mismatches(first, got, lookup=lookup):
            bad = 0
            for i in range(got.size):
                bad += got[i] != lookup(bits_f32(first + i), None, None, 0, 0, 0)
            return bad

        step = 1 << 26
        got = np.empty(step, np.uint8)
        bad = 0
        for first in range(0, 1 << 32, step):
            fn(first, step, got.ctypes.data)
            bad += mismatches(first, got)
        assert bad == 0, (qm, bad)
