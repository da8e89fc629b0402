"""The multi-tensor CUDA kernels (``kernels.multi_tensor``) proven on the CPU.

- The update kernel's C text, compiled by g++ (``tests/harness/grid.cpp``), runs over every
  (block, thread) of a grid far smaller than the work, on a table of host arrays built by the
  backend's own checked builder (``_launch.TensorTable``): empty, one-element and misaligned
  tensors, lengths that are no multiple of the vector width, tensors straddling chunk
  boundaries, thousands of tiny tensors. Every tensor must come out bit for bit as the
  single-tensor kernel of the same storage format leaves it (``cuda_source.mixed_source``, itself
  held to the oracle by ``tests/test_cuda_mixed.py``; the float32 case against the float64
  oracle here too), and guard bytes around every buffer must be untouched.
- The chunk mapping and address arithmetic in 64 bits: a table whose lengths sum past 2^31
  (2^33), decoded by the kernel's own function without allocating a byte of it.
- The global gradient norm (partial sums per block, then one block in a fixed order, with real
  threads and barriers) against NumPy, and the clip coefficient bit for bit against torch's
  expression; an update with the coefficient equals the update of pre-clipped gradients.
- NVRTC compiles a few representative kernels for sm_80 and sm_90 under the compile checks'
  gates (registers, spills, no float64 in float32 kernels, 16-byte loads).
- ``cupy_backend.launch_table`` and ``GradNorm`` against a fake CuPy: uploads, grids,
  argument order, refusals before any launch.
"""

import ctypes
import dataclasses
import re
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastopt.kernels import RULES, cuda_source, multi_tensor, storage
from fastopt.kernels.storage import IO
from support.tolerances import assert_close

from fastopt import precision, reference
from fastopt.backends import _launch

ml_dtypes = pytest.importorskip("ml_dtypes")
GXX = shutil.which("g++")
needs_gxx = pytest.mark.skipif(GXX is None, reason="g++ is not installed")

HARNESS = Path(__file__).with_name("harness") / "grid.cpp"
#: the emulated grid (3 blocks of 32 threads) and the chunk the harness tables are cut into:
#: far fewer threads than elements, several chunks per block, tensors across chunk boundaries
GRID, BLOCK, CHUNK = 3, 32, 64
NP = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype("f2"),
    "float32": np.dtype("f4"),
    "float64": np.dtype("f8"),
}
ADAMW = dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True)

#: (rule, hyperparameters, storage format): fp32 Adam (AMSGrad, L2 decay); AdamW on bf16 params
#: with an fp32 master and a host loss scale; Adam on bf16 params rounded stochastically; SGD
#: with Nesterov momentum on fp16, capturable (scalars, loss scale and found-inf flag read
#: from device memory); NAdam (host state) on float64 params with float32 grads and state
CASES = {
    "adam-f32": ("adam", dict(lr=0.01, weight_decay=0.1, amsgrad=True), IO()),
    "adamw-bf16-master": ("adam", ADAMW, IO("bfloat16", "bfloat16", "float32", True, scale="host")),
    "adam-bf16-sr": ("adam", dict(lr=0.01), IO("bfloat16", "bfloat16", "bfloat16", sr=True)),
    "adamw-bf16-remainder": (
        "adam",
        ADAMW,
        IO("bfloat16", "bfloat16", "float32", True, remainder=True),
    ),
    "sgd-f16-capturable": (
        "sgd",
        dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
        IO("float16", "float16", "float16", scale="device", found_inf=True, kbuf=True),
    ),
    "nadam-f64": ("nadam", dict(lr=0.01), IO("float64", "float32", "float32", scale="host")),
}
#: clipping: bf16 params, fp32 master and fp32 grads (GradScaler's host scale), and the same
#: plan without a scale, which the pre-clipped reference steps
CLIP_IO = IO("bfloat16", "float32", "float32", True, scale="host", write_grad=True)
CLIP_REF_IO = dataclasses.replace(CLIP_IO, scale=None)
SCALE, SALT, SEED = 8.0, 0x2545F491, 5


def _hp(rule, hp):
    return RULES[rule].validate(dict(RULES[rule].defaults, **hp))


def _plan(rule, hp, step):
    """(flags, k) of ``step`` (the host state replayed from step 1)."""
    spec = RULES[rule]
    hs = spec.replay_host_state(hp, step) if spec.host_state else None
    flags, k = spec.variant_and_scalars(hp, step, hs)
    return flags, k


# -- the harness library --------------------------------------------------------------------------


def _bind(scalars):
    """C expressions of the kernel arguments ``scalars`` (``[(type, name)]``): pointers from
    ``ptrs``, values from ``k`` (a double array), each in order."""
    out, pi, ki = [], 0, 0
    for t, _ in scalars:
        base = t.replace("__restrict__", "").strip()
        if "*" in t:
            out.append(f"({base})ptrs[{pi}]")
            pi += 1
        else:
            out.append(f"({base.replace('const ', '')})k[{ki}]")
            ki += 1
    return out


def _multi_code(tag, rule, flags, io, clip):
    name = f"{multi_tensor.kernel_name(rule)}_{tag}"
    scalars = multi_tensor.arguments(rule, flags, io, clip)[4:]
    args = ["table", "chunks", "nchunks", "chunk", *_bind(scalars)]
    return "\n".join(
        [
            f"namespace {tag} {{",
            multi_tensor.source(rule, flags, io, clip=clip, name=name),
            f'extern "C" void run_{tag}(const long long *table, const unsigned long long '
            "*chunks, long long nchunks, long long chunk, void *const *ptrs, const double *k) {",
            f"    fastopt_grid_serial({GRID}, {BLOCK}, [&] {{ {name}({', '.join(args)}); }});",
            "}",
            "}",
        ]
        + [f"#undef {m}" for m in cuda_source.defines(rule, flags)]
    )


def _single_code(tag, rule, flags, io):
    """The single-tensor kernel of the same variant and plan (its vector form)."""
    name = f"fastopt_{rule}_{tag}"
    arrays, scalars = cuda_source.mixed_args(rule, flags, io)
    args = [
        f"({cuda_source.STORAGE_CTYPES[k]} *)a[{j}]" for j, (_, k, _) in enumerate(arrays)
    ] + _bind(scalars)
    return "\n".join(
        [
            f"namespace {tag} {{",
            cuda_source.mixed_source(rule, flags, io, name=name),
            f'extern "C" void run_{tag}(void *const *a, void *const *ptrs, const double *k, '
            "long long n) {",
            f"    fastopt_grid_serial({GRID}, {BLOCK}, [&] "
            f"{{ {name}({', '.join(args + ['n'])}); }});",
            "}",
            "}",
        ]
        + [f"#undef {m}" for m in cuda_source.defines(rule, flags)]
    )


def _norm_code(tag, grad, acc, scale):
    name = multi_tensor.norm_name(grad, acc, scale)
    unscale = {"host": ["(C)k[0]"], "device": ["(const float *)ptrs[0]"], None: []}[scale]
    args = ["table", "width", "chunks", "nchunks", "chunk", *unscale, "(C *)partials"]
    return "\n".join(
        [
            f"namespace {tag} {{",
            multi_tensor.norm_source(grad, acc, scale),
            f'extern "C" void run_{tag}(const long long *table, int width, const unsigned '
            "long long *chunks, long long nchunks, long long chunk, void *const *ptrs, "
            "const double *k, void *partials, unsigned grid) {",
            f"    fastopt_grid_threads(grid, {BLOCK}, [&] {{ {name}({', '.join(args)}); }});",
            "}",
            "}",
        ]
    )


def _finish_code(acc):
    name = multi_tensor.finish_name(acc)
    return "\n".join(
        [
            f"namespace f_{acc} {{",
            multi_tensor.finish_source(acc),
            f'extern "C" void run_f_{acc}(const C *partials, long long count, double max_norm, '
            "C *out, float *out_f) {",
            f"    fastopt_grid_threads(1, {BLOCK}, [&] "
            f"{{ {name}(partials, count, (C)max_norm, out, out_f); }});",
            "}",
            "}",
        ]
    )


MAP_CODE = """
namespace map_ {
typedef float C;
#define FASTOPT_MAP_ONLY
%s
// the chunk decoding and element addresses of every entry, without touching the data
extern "C" void map_chunks(const long long *table, int width, const unsigned long long *chunks,
                           long long nchunks, long long chunk, long long *lo, long long *hi,
                           long long *a16, long long *a32, long long *a64) {
    blockIdx.x = 0; threadIdx.x = 0; blockDim.x = 1; gridDim.x = 1;
    for (long long c = 0; c < nchunks; ++c) {
        const long long *row = fastopt_mt_chunk(table, width, chunks[c], chunk, &lo[c], &hi[c]);
        a16[c] = (long long)fastopt_mt_ptr<unsigned short>(row[1], lo[c]);
        a32[c] = (long long)fastopt_mt_ptr<float>(row[1], lo[c]);
        a64[c] = (long long)fastopt_mt_ptr<double>(row[1], lo[c]);
    }
}
}
"""


def _kernel_keys():
    """Every (tag, kind, rule, flags, io, clip) the tests launch."""
    keys = {}
    for rule, hp, io in CASES.values():
        hp = _hp(rule, hp)
        for step in (2, 3):
            flags, _ = _plan(rule, hp, step)
            keys.setdefault(("multi", rule, tuple(sorted(flags.items())), io, False), None)
            keys.setdefault(("single", rule, tuple(sorted(flags.items())), io, False), None)
    flags, _ = _plan("adam", _hp("adam", ADAMW), 2)
    f = tuple(sorted(flags.items()))
    keys.setdefault(("multi", "adam", f, CLIP_IO, True), None)
    keys.setdefault(("single", "adam", f, CLIP_REF_IO, False), None)
    found = dataclasses.replace(CLIP_IO, scale="device", found_inf=True, kbuf=True)
    keys.setdefault(("multi", "adam", f, found, True), None)
    return {k: f"k{i}" for i, k in enumerate(keys)}


NORMS = [
    ("bfloat16", "float32", "device"),
    ("float32", "float32", "host"),
    ("float32", "float64", None),
]


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    """(ctypes library, kernel tags) of every kernel the tests run."""
    if GXX is None:
        pytest.skip("g++ is not installed")
    out = tmp_path_factory.mktemp("multi_tensor")
    tags = _kernel_keys()
    code = []
    for (kind, rule, flags, io, clip), tag in tags.items():
        if kind == "multi":
            code.append(_multi_code(tag, rule, dict(flags), io, clip))
        else:
            code.append(_single_code(tag, rule, dict(flags), io))
    code += [_norm_code(f"n{i}", *n) for i, n in enumerate(NORMS)]
    code += [_finish_code("float32"), _finish_code("float64")]
    code.append(MAP_CODE % multi_tensor.header())
    (out / "kernels.inc").write_text("\n\n".join(code) + "\n")
    so = out / "multi.so"
    # -fsanitize=alignment: every access checked for its type's alignment (a 16-byte load at
    # an address that is not 16-byte aligned is reported on stderr, which the tests read)
    cmd = [GXX, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-ffp-contract=off"]
    cmd += ["-fsanitize=alignment"]
    cmd += ["-Wall", "-Werror", '-DFASTOPT_KERNELS="kernels.inc"', f"-I{out}", str(HARNESS)]
    res = subprocess.run(cmd + ["-o", str(so)], capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"g++ failed:\n{res.stderr[:4000]}"
    return ctypes.CDLL(str(so)), tags


# -- host buffers with guards ---------------------------------------------------------------------

GUARD = 0xA5


class Arena:
    """Host buffers, each with 64 guard bytes on either side and a chosen offset from a 64-byte
    boundary (a nonzero offset: a buffer that is not 16-byte aligned)."""

    def __init__(self):
        self.blocks = []

    def put(self, values, offset=0):
        values = np.ascontiguousarray(values)
        raw = np.full(values.nbytes + 192, GUARD, np.uint8)
        base = (-raw.ctypes.data) % 64 + 64 + offset
        view = raw[base : base + values.nbytes].view(values.dtype)
        view[...] = values
        self.blocks.append((raw, base, values.nbytes))
        return view

    def intact(self):
        return all(
            (raw[:base] == GUARD).all() and (raw[base + n :] == GUARD).all()
            for raw, base, n in self.blocks
        )


def _ptrs(arrays):
    return (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])


def _values(rule, io, scalars, k, key, clip=None, found_inf=0.0):
    """(pointer arrays, double values) for the kernel arguments ``scalars``, in order."""
    c = np.dtype(io.compute)
    device = {
        "kbuf": lambda: np.array(k, dtype=c),
        "gscale": lambda: np.array([SCALE], np.float32),
        "found_inf": lambda: np.array([found_inf], np.float32),
        "keyp": lambda: np.array([key], np.uint32),
        "clip": lambda: np.asarray(clip, dtype=c),
    }
    host = dict(zip(RULES[rule].scalars, k), inv_scale=1.0 / SCALE, salt=SALT, key=key)
    ptrs, ks = [], []
    for t, n in scalars:
        if "*" in t:
            ptrs.append(device[n]())
        else:
            ks.append(host[n])
    return ptrs, np.array(ks + [0.0], dtype=np.float64)


def _run_multi(lib, rule, flags, io, table, k, key, clip=None, found_inf=0.0):
    so, tags = lib
    tag = tags[("multi", rule, tuple(sorted(flags.items())), io, clip is not None)]
    scalars = multi_tensor.arguments(rule, flags, io, clip is not None)[4:]
    ptrs, ks = _values(rule, io, scalars, k, key, clip, found_inf)
    table.check(rule, flags, io)  # what launch_table checks first
    fn = getattr(so, f"run_{tag}")
    fn.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_longlong] * 2 + [ctypes.c_void_p] * 2
    fn(
        table.rows.ctypes.data,
        table.chunks.ctypes.data,
        table.nchunks,
        table.chunk,
        ctypes.cast(_ptrs(ptrs), ctypes.c_void_p),
        ks.ctypes.data,
    )


def _run_single(lib, rule, flags, io, arrays, k, key):
    """The single-tensor kernel over one tensor's ``arrays`` (name -> array)."""
    so, tags = lib
    tag = tags[("single", rule, tuple(sorted(flags.items())), io, False)]
    names, scalars = cuda_source.mixed_args(rule, flags, io)
    bufs = [arrays[a] for a, _, _ in names]
    ptrs, ks = _values(rule, io, scalars, k, key)
    fn = getattr(so, f"run_{tag}")
    fn.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_longlong]
    n = arrays["param"].shape[0]
    fn(
        ctypes.cast(_ptrs(bufs), ctypes.c_void_p),
        ctypes.cast(_ptrs(ptrs), ctypes.c_void_p),
        ks.ctypes.data,
        n,
    )


# -- tensors --------------------------------------------------------------------------------------

#: lengths around the chunk (64) and the vector widths (4, 8): empty, one element, odd, chunk
#: boundaries, several chunks
LENGTHS = [0, 1, 3, 5, 8, 63, 64, 65, 127, 128, 129, 200, 333, 1000]


def _tensor(rng, rule, io, n):
    """One tensor's arrays (name -> values), master from the param."""
    p = rng.standard_normal(n)
    out = {"param": p.astype(NP[io.param])}
    for s in RULES[rule].state:
        out[s] = rng.uniform(0.1, 1.0, n).astype(NP[io.state])
    if io.remainder:  # the param the high half of an fp32 master, the int16 remainder its low
        bits, rem = precision.split_master(p.astype(np.float32))
        out["param"], out["master"] = bits, rem
    elif io.master:
        out["master"] = out["param"].astype(np.float32)
    return out


def _grads(rng, io, n, steps, scale):
    return [(rng.standard_normal(n) * (scale or 1.0)).astype(NP[io.grad]) for _ in range(steps)]


def _place(arena, arrays, misalign):
    """Copies of ``arrays`` in ``arena``; with ``misalign``, the first state slot (or the grad)
    is placed off 16-byte alignment, so the whole tensor takes the scalar loop."""
    out = {}
    for j, (name, a) in enumerate(arrays.items()):
        off = a.dtype.itemsize if misalign and j == min(2, len(arrays) - 1) else 0
        out[name] = arena.put(a, off)
    return out


def _row(rule, io, placed):
    slots = [placed.get(s) for s in RULES[rule].state]
    return (placed["param"], placed["grad"], slots, placed.get("master"))


def _same_bits(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, what
    ok = np.array_equal(a.view(np.uint8), b.view(np.uint8))
    if not ok:
        d = np.flatnonzero(a.view(np.uint8) != b.view(np.uint8))[:4] // a.dtype.itemsize
        pytest.fail(f"{what}: differs at {d}: {a[d]} vs {b[d]}")


@needs_gxx
@pytest.mark.parametrize("case", list(CASES))
def test_multi_tensor_kernel_equals_the_single_tensor_kernel(lib, case, capfd):
    """Two steps over a table of tensors of every awkward length, some misaligned: each tensor
    bit for bit as the single-tensor kernel leaves it, the guards untouched, no access at an
    address misaligned for its type (a vector load of a misaligned tensor would be one)."""
    rule, hp, io = CASES[case]
    hp = _hp(rule, hp)
    rng = np.random.default_rng(len(case))
    scale = SCALE if io.scale else None
    tensors = [_tensor(rng, rule, io, n) for n in LENGTHS]
    grads = [_grads(rng, io, n, 2, scale) for n in LENGTHS]
    arena, ref_arena = Arena(), Arena()
    placed = [_place(arena, t, misalign=i % 3 == 1) for i, t in enumerate(tensors)]
    refs = [{k: ref_arena.put(v) for k, v in t.items()} for t in tensors]
    for pl, g in zip(placed, grads):
        pl["grad"] = arena.put(g[0])
    table = _launch.TensorTable(rule, io, [_row(rule, io, pl) for pl in placed], chunk=CHUNK)
    assert table.nchunks > GRID * 4  # every block steps several chunks
    for step in (2, 3):
        flags, k = _plan(rule, hp, step)
        key = storage.step_key(SEED, step)
        for i, pl in enumerate(placed):
            pl["grad"][...] = grads[i][step - 2]
        _run_multi(lib, rule, flags, io, table, k, key)
        for i, r in enumerate(refs):
            r["grad"] = ref_arena.put(grads[i][step - 2])
            _run_single(lib, rule, flags, io, r, k, key)
    assert arena.intact() and ref_arena.intact(), "a write outside a buffer"
    err = capfd.readouterr().err
    assert "runtime error" not in err, err[:2000]
    for i, (pl, r) in enumerate(zip(placed, refs)):
        for name in pl:
            _same_bits(pl[name], r[name], f"{case} tensor {i} (n={LENGTHS[i]}) {name}")
    if case == "adam-f32":  # the plain format against the float64 oracle as well
        for i, t in enumerate(tensors):
            p = t["param"].astype(np.float64)
            st = {s: t[s].astype(np.float64) for s in RULES[rule].state}
            for step in (2, 3):
                g = grads[i][step - 2].astype(np.float64)
                reference.adam(p, g, st, step=step, lr=0.01, weight_decay=0.1, amsgrad=True)
            assert_close(placed[i]["param"], p, np.float32, f"tensor {i} param")
            for s in st:
                assert_close(placed[i][s], st[s], np.float32, f"tensor {i} {s}")


@needs_gxx
def test_thousands_of_tiny_tensors(lib):
    """3000 tensors of 0..6 elements at odd addresses, one element of guard between them,
    stepped in one launch: the same bits as the single-tensor kernel over them packed."""
    rule, hp, io = CASES["adam-f32"]
    hp = _hp(rule, hp)
    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 7, 3000)
    starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]])
    total = int(starts[-1] + lengths[-1] + 1)
    names = ["param", "grad", *RULES[rule].state]
    arena = Arena()
    packed = {n: rng.standard_normal(int(lengths.sum())).astype(np.float32) for n in names}
    for s in RULES[rule].state:
        packed[s] = np.abs(packed[s]) + np.float32(0.1)
    gapped = {}
    for n in names:
        buf = np.full(total, np.nan, np.float32)  # the gaps: NaN, which a step would spread
        for j, (s, m) in enumerate(zip(starts, lengths)):
            o = int(lengths[:j].sum())
            buf[s : s + m] = packed[n][o : o + m]
        gapped[n] = arena.put(buf, 4)
    rows = [
        (
            gapped["param"][s : s + m],
            gapped["grad"][s : s + m],
            [gapped[x][s : s + m] for x in RULES[rule].state],
            None,
        )
        for s, m in zip(starts, lengths)
    ]
    table = _launch.TensorTable(rule, io, rows, chunk=CHUNK)
    assert table.nchunks == int((lengths > 0).sum())
    flags, k = _plan(rule, hp, 2)
    _run_multi(lib, rule, flags, io, table, k, 0)
    ref = {n: Arena().put(packed[n]) for n in names}
    _run_single(lib, rule, flags, io, ref, k, 0)
    assert arena.intact()
    for n in names:
        got = np.concatenate([gapped[n][s : s + m] for s, m in zip(starts, lengths)])
        _same_bits(got, ref[n], f"tiny tensors {n}")
        gaps = np.ones(total, bool)
        for s, m in zip(starts, lengths):
            gaps[s : s + m] = False
        assert np.isnan(gapped[n][gaps]).all(), f"{n}: a gap between tensors was written"


@needs_gxx
def test_chunk_mapping_and_addresses_in_64_bits(lib):
    """Lengths summing to 2^33 + 65543 (tensors of 3 * 2^31 + 7 and 2^32 + 65537 elements
    among small ones), decoded by the kernel's own functions without touching a byte: every
    chunk's range and its element addresses for 2-, 4- and 8-byte elements match the host's
    64-bit arithmetic, and the chunks cover every element once."""
    so, _ = lib
    lengths = np.array([5, 3 * (1 << 31) + 7, 1, 0, (1 << 32) + 65537], dtype=np.int64)
    rows = np.zeros((len(lengths), len(multi_tensor.columns("sgd", False))), np.int64)
    rows[:, 0] = lengths
    rows[:, 1] = 0x7F0000000000 + np.arange(len(lengths)) * (1 << 40)  # never dereferenced
    chunks = multi_tensor.chunk_table(lengths, multi_tensor.CHUNK)
    n = chunks.shape[0]
    out = {x: np.zeros(n, np.int64) for x in ("lo", "hi", "a16", "a32", "a64")}
    fn = so.map_chunks
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p] + [ctypes.c_longlong] * 2
    fn.argtypes += [ctypes.c_void_p] * 5
    fn(
        rows.ctypes.data,
        rows.shape[1],
        chunks.ctypes.data,
        n,
        multi_tensor.CHUNK,
        *(out[x].ctypes.data for x in ("lo", "hi", "a16", "a32", "a64")),
    )
    t, lo, hi = multi_tensor.decode(chunks, lengths, multi_tensor.CHUNK)
    np.testing.assert_array_equal(out["lo"], lo)
    np.testing.assert_array_equal(out["hi"], hi)
    for name, size in (("a16", 2), ("a32", 4), ("a64", 8)):
        np.testing.assert_array_equal(out[name], rows[t, 1] + lo * size)
    assert int((hi - lo).sum()) == int(lengths.sum()) > 1 << 33
    for j, m in enumerate(lengths):  # each tensor's chunks: contiguous from 0 to its length
        mine = np.flatnonzero(t == j)
        if m == 0:
            assert mine.size == 0
            continue
        assert lo[mine[0]] == 0 and hi[mine[-1]] == m
        assert (lo[mine[1:]] == hi[mine[:-1]]).all()
    assert out["lo"].max() > 1 << 32  # ranges past 2^32: the arithmetic is 64-bit


def test_chunk_table_and_chunk_size():
    lengths = [0, 1, 64, 65, 3 * 64, 7]
    e = multi_tensor.chunk_table(lengths, 64)
    t, lo, hi = multi_tensor.decode(e, lengths, 64)
    assert t.tolist() == [1, 2, 3, 3, 4, 4, 4, 5]
    assert lo.tolist() == [0, 0, 0, 64, 0, 64, 128, 0]
    assert hi.tolist() == [1, 64, 64, 65, 64, 128, 192, 7]
    assert multi_tensor.chunk_table([], 64).shape == (0,)
    for bad in ([-1], [1 << 50]):
        with pytest.raises(ValueError):
            multi_tensor.chunk_table(bad, 64)
    with pytest.raises(ValueError, match="chunk"):
        multi_tensor.chunk_table([5], 12)
    assert multi_tensor.chunk_size(1 << 20, 528) == multi_tensor.MIN_CHUNK
    assert multi_tensor.chunk_size(1 << 24, 528) == 1 << 12
    assert multi_tensor.chunk_size(1 << 28, 528) == multi_tensor.CHUNK


# -- found-inf and clipping -----------------------------------------------------------------------


def _clip_tables(rng, io, lengths, arena, scale=SCALE):
    """Tensors under ``io`` (fp32 grads scaled by ``scale``), placed in ``arena``: (table,
    placed arrays, unscaled fp32 grads)."""
    rule = "adam"
    placed, grads = [], []
    for i, n in enumerate(lengths):
        t = _tensor(rng, rule, io, n)
        g = rng.standard_normal(n).astype(np.float32)
        t["grad"] = (g * np.float32(scale)).astype(np.float32)
        placed.append(_place(arena, t, misalign=i % 4 == 3))
        grads.append(g)
    table = _launch.TensorTable(rule, io, [_row(rule, io, p) for p in placed], chunk=CHUNK)
    return table, placed, grads


@needs_gxx
def test_found_inf_on_the_device_writes_nothing(lib):
    io = dataclasses.replace(CLIP_IO, scale="device", found_inf=True, kbuf=True)
    arena = Arena()
    table, placed, _ = _clip_tables(np.random.default_rng(3), io, LENGTHS, arena)
    before = [{k: v.copy() for k, v in p.items()} for p in placed]
    flags, k = _plan("adam", _hp("adam", ADAMW), 2)
    _run_multi(lib, "adam", flags, io, table, k, 0, clip=[1.0, 0.5], found_inf=1.0)
    assert arena.intact()
    for p, b in zip(placed, before):
        for name in p:
            _same_bits(p[name], b[name], f"found_inf set: {name}")


def _norm(lib, tables, acc, max_norm, scale_form, scale=SCALE):
    """[norm, coef] (accumulation dtype) and its float32 copy, through the harness kernels."""
    so, _ = lib
    dt = np.dtype(acc)
    parts = []
    for t in tables:
        i = NORMS.index((t.io.grad, acc, scale_form))
        grid = min(t.nchunks, GRID)
        partial = np.full(max(grid, 1), np.nan, dt)
        ptrs = [np.array([scale], np.float32)]
        ks = np.array([1.0 / scale, 0.0])
        fn = getattr(so, f"run_n{i}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_longlong]
        fn.argtypes += [ctypes.c_longlong] + [ctypes.c_void_p] * 3 + [ctypes.c_uint]
        if grid:
            fn(
                t.rows.ctypes.data,
                t.rows.shape[1],
                t.chunks.ctypes.data,
                t.nchunks,
                t.chunk,
                ctypes.cast(_ptrs(ptrs), ctypes.c_void_p),
                ks.ctypes.data,
                partial.ctypes.data,
                grid,
            )
            parts.append(partial[:grid])
    partials = np.concatenate(parts) if parts else np.zeros(1, dt)
    out, out_f = np.full(2, np.nan, dt), np.full(2, np.nan, np.float32)
    fn = getattr(so, f"run_f_{acc}")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_longlong, ctypes.c_double]
    fn.argtypes += [ctypes.c_void_p] * 2
    fn(
        partials.ctypes.data,
        sum(p.size for p in parts),
        max_norm,
        out.ctypes.data,
        out_f.ctypes.data,
    )
    return out, out_f


def _torch_coef(norm, max_norm):
    """torch.nn.utils.clip_grad_norm_'s coefficient from a float32 norm, by torch itself."""
    torch = pytest.importorskip("torch")
    total = torch.tensor(norm, dtype=torch.float32)
    return float(torch.clamp(max_norm / (total + 1e-6), max=1.0))


@pytest.mark.torch  # torch is imported by the code under test
@needs_gxx
def test_global_norm_and_clip_coefficient(lib):
    """The norm of the unscaled gradients over two tables (fp32 grads, host scale; bf16 grads,
    device scale) against NumPy in float64; the coefficient bit for bit as torch computes it
    from that norm; float64 accumulation as well; non-finite norms as torch leaves them."""
    rng = np.random.default_rng(11)
    arena = Arena()
    t32, _, g32 = _clip_tables(rng, CLIP_IO, LENGTHS, arena)
    out, out_f = _norm(lib, [t32], "float32", 1.0, "host")
    want = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in g32))
    assert abs(out[0] - want) <= 2e-6 * want and out_f[0] == out[0]
    assert out[1] < 1 and np.float32(out[1]) == np.float32(_torch_coef(out[0], 1.0))
    big, _ = _norm(lib, [t32], "float32", 1e9, "host")
    assert big[1] == 1.0  # clamped: a small norm never amplifies
    # bf16 grads with a device scale, beside the fp32 table, in float64
    io16 = IO("bfloat16", "bfloat16", "float32", True, scale="device")
    placed = [_tensor(rng, "adam", io16, n) for n in LENGTHS[::-1]]
    g16 = [(rng.standard_normal(n) * SCALE).astype(NP["bfloat16"]) for n in LENGTHS[::-1]]
    for p, g in zip(placed, g16):
        p["grad"] = arena.put(g)
    t16 = _launch.TensorTable("adam", io16, [_row("adam", io16, p) for p in placed], chunk=CHUNK)
    out, _ = _norm(lib, [t16], "float32", 0.5, "device")
    want16 = np.sqrt(sum(float(np.sum((g.astype(np.float64) / SCALE) ** 2)) for g in g16))
    assert abs(out[0] - want16) <= 2e-6 * want16
    # float64 accumulation over the fp32 table (no scale: the gradients as they are)
    out64, out64_f = _norm(lib, [t32], "float64", 1.0, None)
    want32 = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in g32)) * SCALE
    assert abs(out64[0] - want32) <= 1e-12 * want32 and out64_f[0] == np.float32(out64[0])
    # non-finite: an inf gives norm inf, coefficient 0; a NaN gives NaN, NaN (torch alike)
    g = arena.put(np.array([1.0, np.inf, 2.0], np.float32))
    tab = _launch.TensorTable(
        "adam",
        CLIP_IO,
        [
            (
                arena.put(np.zeros(3, NP["bfloat16"])),
                g,
                [arena.put(np.zeros(3, np.float32)) for _ in range(3)],
                arena.put(np.zeros(3, np.float32)),
            )
        ],
        chunk=CHUNK,
    )
    out, _ = _norm(lib, [tab], "float32", 1.0, "host")
    assert np.isinf(out[0]) and out[1] == 0.0 == _torch_coef(np.inf, 1.0)
    g[1] = np.nan
    out, _ = _norm(lib, [tab], "float32", 1.0, "host")
    assert np.isnan(out[0]) and np.isnan(out[1]) and np.isnan(_torch_coef(np.nan, 1.0))
    assert arena.intact()


@needs_gxx
def test_clipped_update_equals_the_update_of_clipped_gradients(lib):
    """The update kernel with ``clip=`` (the device ``[norm, coef]``) leaves every array, the
    written-back gradient included, as the same kernel without a scale does on gradients
    unscaled and clipped beforehand, in torch's order: (g * inv_scale) * coef in float32."""
    rng = np.random.default_rng(5)
    arena = Arena()
    table, placed, _ = _clip_tables(rng, CLIP_IO, LENGTHS, arena)
    ref_arena = Arena()
    refs = [{k: ref_arena.put(v) for k, v in p.items()} for p in placed]
    out, _ = _norm(lib, [table], "float32", 0.75, "host")
    coef = np.float32(out[1])
    assert 0 < coef < 1
    inv = np.float32(1.0 / SCALE)
    flags, k = _plan("adam", _hp("adam", ADAMW), 2)
    _run_multi(lib, "adam", flags, CLIP_IO, table, k, 0, clip=out)
    for r in refs:
        r["grad"][...] = (r["grad"] * inv) * coef
        _run_single(lib, "adam", flags, CLIP_REF_IO, r, k, 0)
    assert arena.intact() and ref_arena.intact()
    for i, (p, r) in enumerate(zip(placed, refs)):
        for name in p:
            _same_bits(p[name], r[name], f"clipped tensor {i} {name}")


# -- NVRTC: representative kernels for the GPU ----------------------------------------------------

ARCHS = ("sm_80", "sm_90")
#: the compile checks' register budget (tests/test_cuda_compile.py)
MAX_REGISTERS = 64
F64 = re.compile(r"\.f64\b")
#: 16-byte loads and stores, generic or global (4 x 32 bits or 2 x 64 bits)
VLD = r"\bld(\.global)?(\.nc)?\.(v4\.(u32|b32|f32)|v2\.(u64|b64|f64))"
VST = r"\bst(\.global)?\.(v4\.(u32|b32|f32)|v2\.(u64|b64|f64))"


def _representative():
    """name -> (source, float32 math?, 16-byte loads expected?)."""
    adamw = _plan("adam", _hp("adam", ADAMW), 2)[0]
    ams = _plan("adam", _hp("adam", dict(amsgrad=True, weight_decay=0.1)), 2)[0]
    sgd = _plan("sgd", _hp("sgd", CASES["sgd-f16-capturable"][1]), 2)[0]
    # GradScaler's protocol as fastopt.torch follows it: the gradient keeps its scale (a plan
    # that also writes the unscaled gradient back takes 70-74 registers, as its single-tensor
    # kernel does)
    dev = IO("bfloat16", "bfloat16", "float32", True, scale="device", found_inf=True, kbuf=True)
    sr = IO("bfloat16", "bfloat16", "bfloat16", sr=True, kbuf=True, found_inf=True)
    out = {
        "adam_f32_amsgrad": (multi_tensor.source("adam", ams, IO()), True),
        "adamw_bf16_master_clip_capturable": (
            multi_tensor.source("adam", adamw, dev, clip=True),
            True,
        ),
        "adam_bf16_sr_capturable": (multi_tensor.source("adam", adamw, sr), True),
        "sgd_f16_capturable": (
            multi_tensor.source("sgd", sgd, CASES["sgd-f16-capturable"][2]),
            True,
        ),
        "adam_f64": (
            multi_tensor.source("adam", adamw, IO("float64", "float64", "float64")),
            False,
        ),
        "sumsq_bf16": (multi_tensor.norm_source("bfloat16", "float32", "device"), True),
        "sumsq_f32": (multi_tensor.norm_source("float32", "float32", "host"), True),
        "norm_f32": (multi_tensor.finish_source("float32"), True),
    }
    return out


def _nvrtc(source, arch):
    """(ptx, ptxas log) of ``source`` for ``arch``."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    try:
        nvrtc.nvrtcVersion()
    except Exception as exc:
        pytest.skip(f"NVRTC cannot be loaded: {exc}")
    _, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"multi.cu", 0, [], [])
    opts = [f"-arch={arch}".encode(), b"--ptxas-options=-v"]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        pytest.fail(f"NVRTC {arch}: {err}\n{log.decode(errors='replace')[:4000]}")
    _, n = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * n
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(prog)
    return ptx.decode().rstrip("\x00 "), log.decode(errors="replace")


def test_kernels_compile_under_the_register_and_spill_gates():
    """Each representative kernel compiles for sm_80 and sm_90 in at most 64 registers with
    no spill and no stack, holds no float64 instruction where the math is float32 (the
    float64 kernel does: the check sees them), and moves 16 bytes per load and store in its
    vector loop (generic loads: the addresses come from the table)."""
    kernels = _representative()
    jobs = [(name, arch) for name in kernels for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = dict(zip(jobs, pool.map(lambda j: _nvrtc(kernels[j[0]][0], j[1]), jobs)))
    for (name, arch), (ptx, log) in results.items():
        regs = [int(x) for x in re.findall(r"Used (\d+) registers", log)]
        spills = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+)", log)
        assert len(regs) == 1 and regs[0] <= MAX_REGISTERS, f"{name} {arch}: {regs} registers"
        assert spills and all(s == ("0", "0", "0") for s in spills), f"{name} {arch}: {spills}"
        f32 = kernels[name][1]
        assert bool(F64.search(ptx)) != f32, f"{name} {arch}: float64 instructions: {not f32}"
        if not name.startswith("norm"):
            assert re.search(VLD, ptx), f"{name}: no 16-byte loads"
        if not name.startswith(("norm", "sumsq")):
            assert re.search(VST, ptx), f"{name}: no 16-byte stores"


def test_numba_cuda_kernels_compile_under_the_gates():
    """The numba-cuda forms (``numba_cuda_backend.table_kernel``, the norm's two kernels) of a
    capturable, clipped AdamW step on bf16 params with an fp32 master, through NVVM for sm_80
    and sm_90 (and nvJitLink's resource report where installed): no float64, at most 64
    registers, no spills (the simulator proves their indexing: tests/cudasim_multi_tensor.py)."""
    tc = pytest.importorskip("test_numba_cuda_compile")
    if isinstance(tc._TC, str):
        pytest.skip(tc._TC)
    cuda, ncb, nvjitlink = tc._TC
    from numba import types

    io = IO("bfloat16", "bfloat16", "float32", True, scale="device", found_inf=True, kbuf=True)
    flags, _ = _plan("adam", _hp("adam", ADAMW), 2)
    writes = tuple(RULES["adam"].slots_used(flags))
    sumsq, finish = ncb._norm_factory(
        storage.make_converters(lambda f: cuda.jit(device=True, inline="always")(f), "float32")[
            "load"
        ]["bfloat16"],
        np.float32,
        ncb._view_fn(),
        "device",
        _launch.THREADS,
    )
    f32 = types.float32[::1]
    table = (types.int64[:, ::1], types.int64, types.int64[::1], types.int64, types.int64)
    jobs = {
        "update": (
            ncb.table_python_kernel("adam", flags, writes, io, clip=True),
            ncb.table_signature("adam", writes, io, clip=True),
        ),
        "sumsq": (
            sumsq,
            table + (types.uint16[::1], types.int64, types.UniTuple(types.float32, 1), f32, f32),
        ),
        "finish": (finish, (f32, types.int64, types.float32, f32, f32)),
    }
    for name, (kernel, sig) in jobs.items():
        for cc, ptx in zip(tc.CCS, tc._ptx_per_cc(cuda, kernel, sig)):
            body = tc._instructions(ptx)
            assert not [ln for ln in body if F64.search(ln)], f"{name} {cc}: float64"
            if nvjitlink is not None:
                regs, *rest = tc.resources(tc._assemble(nvjitlink, ptx, cc)[1])
                assert regs <= MAX_REGISTERS and rest == [0, 0, 0], f"{name} {cc}: {regs} {rest}"


# -- the table builder and the CuPy launch logic --------------------------------------------------


def _f32_tensors(rng, lengths, nslots=3, present=(True, True, False)):
    out = []
    for n in lengths:
        p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        slots = [np.zeros(n, np.float32) if present[j] else None for j in range(nslots)]
        out.append((p, g, slots, None))
    return out


def test_table_builder_checks_every_array():
    rng = np.random.default_rng(0)
    io = IO()
    good = _f32_tensors(rng, [3, 0, 70])
    table = _launch.TensorTable("adam", io, good, chunk=64)
    assert table.rows.shape == (3, 6) and table.rows[:, 0].tolist() == [3, 0, 70]
    assert table.rows[0, 1] == good[0][0].ctypes.data and table.rows[2, 2] == good[2][1].ctypes.data
    assert table.rows[0, 5] == 0 and table.nchunks == 3 and table.total == 73
    p0, g0, s0, _ = good[0]
    bad = {
        "a float64 param": ((p0.astype(np.float64), g0, s0, None), TypeError),
        "a short grad": ((p0, g0[:2], s0, None), ValueError),
        "a strided grad": ((p0, np.zeros(6, np.float32)[::2], s0, None), ValueError),
        "a master without a plan for one": ((p0, g0, s0, np.zeros(3, np.float32)), ValueError),
        "one slot for three": ((p0, g0, [None], None), ValueError),
        "no grad": ((p0, None, s0, None), ValueError),
        "a list for a param": (([1.0, 2.0, 3.0], g0, s0, None), TypeError),
    }
    for what, (row, exc) in bad.items():
        with pytest.raises(exc):
            _launch.TensorTable("adam", io, [row, *good[1:]], chunk=64)
            pytest.fail(what)
    with pytest.raises(ValueError, match="empty"):
        _launch.TensorTable("adam", io, [], chunk=64)
    with pytest.raises(ValueError, match="master"):
        _launch.TensorTable("adam", dataclasses.replace(io, master=True), good, chunk=64)
    # a variant that needs an absent slot is refused; one that does not passes
    table.check("adam", dict(maximize=False, decay=False, decoupled=False, amsgrad=False), io)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        table.check("adam", dict(maximize=False, decay=False, decoupled=False, amsgrad=True), io)
    with pytest.raises(ValueError, match="launched as"):
        table.check("adam", {}, IO("float64", "float64", "float64"))
    # re-checks: same tensors, new gradients, a new length
    assert table.same(good) and not table.update(good)
    table.stale = table.stale_chunks = False
    new_g = [(p, g.copy(), s, m) for p, g, s, m in good]
    assert not table.same(new_g) and table.update(new_g)
    assert table.stale and not table.stale_chunks
    assert not table.set_column("grad", [t[1].ctypes.data for t in new_g])
    assert table.set_column("grad", [t[1].ctypes.data for t in good])
    with pytest.raises(ValueError, match="null"):
        table.set_column("grad", [0, 0, 0])
    # a slot gone from a tensor: the variant that uses it is refused again
    ams = dict(maximize=False, decay=False, decoupled=False, amsgrad=True)
    full = _f32_tensors(rng, [3, 0, 70], present=(True, True, True))
    assert table.update(full)
    table.check("adam", ams, io)
    assert table.update([full[0], full[1], (*full[2][:2], [*full[2][2][:2], None], None)])
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        table.check("adam", ams, io)
    longer = _f32_tensors(rng, [3, 0, 200])
    assert table.update(longer) and table.stale_chunks and table.nchunks == 5


class FakeCupy:
    """What cupy_backend asks of CuPy for a multi-tensor launch, recorded: kernels (40
    registers), host-to-device copies, devices and streams."""

    ndarray = np.ndarray

    def __init__(self, sms=132):
        self.launches, self.copies, self.streams, self.sources = [], [], [], []
        fake = self

        class Device:
            def __init__(self, i=0):
                self.id = i
                self.attributes = {"MultiProcessorCount": sms}

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

        class Stream:
            def __init__(self, ptr):
                self.ptr = ptr

            def __enter__(self):
                fake.streams.append(self.ptr)

            def __exit__(self, *exc):
                return False

        class RawKernel:
            num_regs = 40

            def __init__(self, src, name):
                fake.sources.append(name)
                self.name = name

            def __call__(self, grid, block, args):
                fake.launches.append((self.name, grid, block, args))

        def asarray(a):
            fake.copies.append(a.shape)
            return np.array(a)

        self.RawKernel, self.asarray = RawKernel, asarray
        self.zeros = np.zeros
        self.cuda = types.SimpleNamespace(
            Device=Device,
            ExternalStream=Stream,
            get_current_stream=lambda: types.SimpleNamespace(ptr=0x1234),
        )


class CAI:
    """A device array (its memory a host array's) exporting the CUDA array interface."""

    def __init__(self, host):
        self.host = host

    @property
    def __cuda_array_interface__(self):
        return {
            "shape": self.host.shape,
            "typestr": self.host.dtype.str,
            "data": (self.host.ctypes.data, False),
            "strides": None,
            "version": 3,
        }


@pytest.fixture
def fake_cupy(monkeypatch):
    from fastopt.backends import cupy_backend as cb

    fake = FakeCupy()
    monkeypatch.setattr(cb, "cupy", fake)
    for cache in ("_mt", "_grid", "_streams"):
        monkeypatch.setattr(cb, cache, {})
    return cb, fake


def test_launch_table_logic_against_a_fake_cupy(fake_cupy):
    cb, fake = fake_cupy
    rng = np.random.default_rng(1)
    host = _f32_tensors(rng, [5, 0, 1 << 13])
    tensors = [
        (CAI(p), CAI(g), [CAI(s) if s is not None else None for s in sl], None)
        for p, g, sl, _ in host
    ]
    io = IO()
    table = cb.tensor_table("adam", io, tensors)
    assert table.device == ("cuda", None) and table.chunk == multi_tensor.MIN_CHUNK
    flags = dict(maximize=False, decay=True, decoupled=True, amsgrad=False)
    _, k = _plan("adam", _hp("adam", ADAMW), 3)
    cb.launch_table("adam", flags, io, table, k, stream=0xBEEF)
    name, grid, block, args = fake.launches[-1]
    assert name == "fastopt_mt_adam" and grid == (table.nchunks,) and block == (256,)
    assert fake.copies == [table.rows.shape, table.chunks.shape] and fake.streams == [0xBEEF]
    np.testing.assert_array_equal(args[0], table.rows)
    assert args[2] == table.nchunks and args[3] == table.chunk
    assert [type(a) for a in args[4:]] == [np.float32] * len(k)
    assert list(args[4:]) == [np.float32(x) for x in k]
    # the steady step: no copy; new gradient addresses: the rows again, written into the same
    # device array (a captured launch keeps its address), not the chunks
    cb.launch_table("adam", flags, io, table, k)
    assert len(fake.copies) == 2 and len(fake.launches) == 2
    rows = table.device_rows
    table.set_column("grad", [1 + t[1].ctypes.data for t in host])
    cb.launch_table("adam", flags, io, table, k)
    assert len(fake.copies) == 2 and table.device_rows is rows and not table.stale
    assert fake.launches[-1][3][0] is rows
    np.testing.assert_array_equal(rows, table.rows)
    # refused before anything: a variant needing an absent slot, a wrong clip buffer
    n = len(fake.launches)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        cb.launch_table("adam", dict(flags, amsgrad=True), io, table, k)
    with pytest.raises(ValueError, match="clip"):
        cb.launch_table("adam", flags, io, table, k, clip=np.zeros(2, np.float64))
    with pytest.raises(ValueError, match="found_inf"):
        cb.launch_table("adam", flags, dataclasses.replace(io, found_inf=True), table, k)
    with pytest.raises(ValueError, match="scalars"):
        cb.launch_table("adam", flags, io, table, k[:-1])
    assert len(fake.launches) == n
    # the clip buffer and device extras go last, in the kernel's order
    dev = dataclasses.replace(io, kbuf=True, found_inf=True, scale="device")
    kbuf, fi, sc = np.zeros(9, np.float32), np.zeros(1, np.float32), np.ones(1, np.float32)
    clip = np.zeros(2, np.float32)
    cb.launch_table(
        "adam", flags, dev, table, k, dict(kbuf=kbuf, found_inf=fi, scale=sc), clip=clip
    )
    args = fake.launches[-1][3]
    assert args[4] is kbuf and args[5] is sc and args[6] is fi and args[7] is clip
    assert len(args) == 8


def _quant_tensors(rng, lengths, slots=(True, True, False), fmt="int8"):
    """Adam's tensors with ``fmt`` state: ``(codes, absmax)`` pairs where ``slots`` says."""
    from fastopt.kernels import quant

    out = []
    for n in lengths:
        p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
        pairs = [
            (
                np.zeros(quant.code_bytes(n, fmt), np.uint8),
                np.zeros(quant.nblocks(n, fmt), np.float32),
            )
            if on
            else None
            for on in slots
        ]
        out.append((p, g, pairs, None))
    return out


def test_quantized_table_checks_codes_and_scales():
    """A table of quantized state (``io.quant``): each quantized slot a ``(codes, absmax)``
    pair, its codes' and scales' addresses in the row (``quant_cuda.table_columns``), one chunk
    per block of codes; every wrong pair refused when the table is built."""
    from fastopt.kernels import quant_cuda

    rng = np.random.default_rng(3)
    io = IO(quant="int8")
    good = _quant_tensors(rng, [300, 0, 1, 512])
    table = _launch.TensorTable("adam", io, good)
    assert table.columns == quant_cuda.table_columns("adam", False)
    col = {c: j for j, c in enumerate(table.columns)}
    assert table.chunk == 256 and table.nchunks == 2 + 0 + 1 + 2
    t, lo, hi = multi_tensor.decode(table.chunks, table.rows[:, 0], table.chunk)
    assert t.tolist() == [0, 0, 2, 3, 3] and lo.tolist() == [0, 256, 0, 0, 256]
    assert hi.tolist() == [256, 300, 1, 256, 512]
    codes, absmax = good[3][2][1]
    assert table.rows[3, col["exp_avg_sq"]] == codes.ctypes.data
    assert table.rows[3, col["exp_avg_sq_absmax"]] == absmax.ctypes.data
    assert table.rows[3, col["max_exp_avg_sq"]] == table.rows[3, col["max_exp_avg_sq_absmax"]] == 0
    table.check("adam", dict(maximize=False, decay=False, decoupled=False, amsgrad=False), io)
    with pytest.raises(ValueError, match="launched as"):
        table.check("adam", {}, IO(quant="float8_e4m3"))
    p0, g0, (m0, v0, _), _ = good[0]
    bad = {
        "codes of another dtype": ((m0[0].astype(np.int8), m0[1]), TypeError),
        "short codes": ((m0[0][:299], m0[1]), ValueError),
        "one scale for 300 elements": ((m0[0], m0[1][:1]), ValueError),
        "float64 scales": ((m0[0], m0[1].astype(np.float64)), TypeError),
        "a float32 slot": (np.zeros(300, np.float32), TypeError),
        "a triple": ((*m0, m0[1]), TypeError),
    }
    for what, (slot, exc) in bad.items():
        with pytest.raises(exc):
            _launch.TensorTable("adam", io, [(p0, g0, [slot, v0, None], None), *good[1:]])
            pytest.fail(what)
    with pytest.raises(TypeError, match="pair"):  # a pair where the format keeps floats
        _launch.TensorTable("adam", IO(), good)
    with pytest.raises(ValueError, match="chunk"):
        _launch.TensorTable("adam", io, good, chunk=512)
    # a new gradient column, a new length: the chunks follow the blocks
    assert table.set_column("grad", [1 + x[1].ctypes.data for x in good])
    longer = _quant_tensors(rng, [300, 0, 1, 513])
    assert table.update(longer) and table.stale_chunks and table.nchunks == 6


def test_quantized_launch_table_logic_against_a_fake_cupy(fake_cupy):
    """``cupy_backend.launch_table`` on a quantized table: ``cupy_quant``'s multi-tensor kernel,
    one block of ``QBLOCK`` threads per block of codes (a grid of one wave at most), the
    table, its chunks and the packed codec tables copied once: a steady step copies nothing."""
    from fastopt.kernels import quant_cuda

    cb, fake = fake_cupy
    from fastopt.backends import cupy_quant

    rng = np.random.default_rng(4)
    host = _quant_tensors(rng, [300, 0, 1, 1 << 12])
    cai = [
        (CAI(p), CAI(g), [None if x is None else (CAI(x[0]), CAI(x[1])) for x in sl], None)
        for p, g, sl, _ in host
    ]
    io = IO(quant="int8")
    table = cb.tensor_table("adam", io, cai)
    flags = dict(maximize=False, decay=True, decoupled=True, amsgrad=False)
    _, k = _plan("adam", _hp("adam", ADAMW), 3)
    uploads = dict(cupy_quant._uploads)
    try:
        cb.launch_table("adam", flags, io, table, k, stream=0xBEEF)
        name, grid, block, args = fake.launches[-1]
        assert name == quant_cuda.table_kernel_name("adam") and block == (quant_cuda.QBLOCK,)
        assert grid == (min(table.nchunks, 132 * _launch.blocks_per_sm(40)),)
        assert table.nchunks == 2 + 1 + 16
        np.testing.assert_array_equal(args[0], table.rows)
        assert args[2] == table.nchunks
        np.testing.assert_array_equal(args[3], quant_cuda.tables("int8", ("signed", "unsigned")))
        assert list(args[4:]) == [np.float32(x) for x in k] and fake.streams == [0xBEEF]
        copies = len(fake.copies)
        assert copies == 3  # the rows, the chunks, the codec tables
        cb.launch_table("adam", flags, io, table, k, stream=0xBEEF)
        assert len(fake.copies) == copies and len(fake.launches) == 2
        clip = np.zeros(2, np.float32)
        cb.launch_table("adam", flags, io, table, k, clip=clip)
        assert fake.launches[-1][3][-1] is clip and len(fake.copies) == copies
        with pytest.raises(ValueError, match="launched as"):
            cb.launch_table("adam", flags, IO(quant="float8_e4m3"), table, k)
        assert len(fake.launches) == 3
    finally:
        cupy_quant._uploads.clear()
        cupy_quant._uploads.update(uploads)


def test_int4_table_takes_packed_codes_and_launches_a_thread_per_byte(fake_cupy):
    """A table of int4 state: codes of ``ceil(n/2)`` bytes and a scale per 128 elements (one
    code per byte refused, as are scales per 256), one chunk per block of 128; its launch is
    ``cupy_quant``'s multi-tensor kernel with ``quant_cuda.threads("int4")`` = 64 threads per
    block (a thread per byte), a grid of one wave of such blocks at most."""
    from fastopt.kernels import quant_cuda

    cb, fake = fake_cupy
    from fastopt.backends import cupy_quant

    rng = np.random.default_rng(5)
    io = IO(quant="int4")
    good = _quant_tensors(rng, [301, 0, 1, 1 << 12], fmt="int4")
    table = _launch.TensorTable("adam", io, good)
    assert table.chunk == 128 and table.nchunks == 3 + 0 + 1 + 32
    t, lo, hi = multi_tensor.decode(table.chunks, table.rows[:, 0], table.chunk)
    assert t.tolist()[:5] == [0, 0, 0, 2, 3] and lo.tolist()[:5] == [0, 128, 256, 0, 0]
    assert hi.tolist()[:5] == [128, 256, 301, 1, 128]
    p0, g0, (m0, v0, _), _ = good[0]
    for slot in (
        (np.zeros(301, np.uint8), m0[1]),  # a code per byte
        (m0[0], np.zeros(2, np.float32)),  # scales per 256 elements
    ):
        with pytest.raises(ValueError, match="exp_avg"):
            _launch.TensorTable("adam", io, [(p0, g0, [slot, v0, None], None), *good[1:]])
    with pytest.raises(ValueError, match="chunk"):
        _launch.TensorTable("adam", io, good, chunk=256)
    cai = [
        (CAI(p), CAI(g), [None if x is None else (CAI(x[0]), CAI(x[1])) for x in sl], None)
        for p, g, sl, _ in good
    ]
    dev = cb.tensor_table("adam", io, cai)
    flags = dict(maximize=False, decay=True, decoupled=True, amsgrad=False)
    _, k = _plan("adam", _hp("adam", ADAMW), 3)
    uploads = dict(cupy_quant._uploads)
    try:
        cb.launch_table("adam", flags, io, dev, k)
        name, grid, block, args = fake.launches[-1]
        assert name == quant_cuda.table_kernel_name("adam") and block == (64,)
        assert quant_cuda.threads("int4") == 64
        assert grid == (min(dev.nchunks, 132 * _launch.blocks_per_sm(40, 64)),)
        np.testing.assert_array_equal(args[3], quant_cuda.tables("int4", ("signed", "unsigned")))
    finally:
        cupy_quant._uploads.clear()
        cupy_quant._uploads.update(uploads)


def test_grad_norm_logic_against_a_fake_cupy(fake_cupy):
    cb, fake = fake_cupy
    rng = np.random.default_rng(2)
    tables = []
    for lengths in ([5, 1 << 20], [1 << 14], [0]):
        host = _f32_tensors(rng, lengths)
        tensors = [
            (CAI(p), CAI(g), [CAI(s) if s is not None else None for s in sl], None)
            for p, g, sl, _ in host
        ]
        tables.append(cb.tensor_table("adam", IO(), tensors))
    norm = cb.GradNorm(tables, scale="host")
    wave = 132 * _launch.blocks_per_sm(40)
    assert norm.grids == [min(t.nchunks, wave) for t in tables] and norm.grids[2] == 0
    assert norm.coef("float32") is norm.out and norm.partials.size == sum(norm.grids)
    out = norm(0.5, dict(inv_scale=0.125), stream=0x77)
    assert out is norm.out and fake.streams == [0x77]
    launches = fake.launches
    assert [x[0] for x in launches] == [
        multi_tensor.norm_name("float32", "float32", "host")
    ] * 2 + [multi_tensor.finish_name("float32")]
    offset = 0
    for (_, grid, block, args), t in zip(launches[:2], tables[:2]):
        assert grid == (min(t.nchunks, wave),) and block == (256,)
        assert args[1] == len(t.columns) and args[3] == t.nchunks and args[4] == t.chunk
        assert args[5] == np.float32(0.125) and args[6].size == grid[0]
        assert np.shares_memory(args[6], norm.partials[offset:])
        offset += grid[0]
    _, grid, block, args = launches[-1]
    assert grid == (1,) and args[1] == offset and args[2] == np.float32(0.5)
    assert args[3] is norm.out and args[4] is norm.out_f


class FakeNumbaCuda:
    """What numba_cuda_backend asks of numba.cuda for a multi-tensor launch, recorded."""

    def __init__(self):
        self.copies, self.configs, self.launches = [], [], []

    def get_current_device(self):
        return types.SimpleNamespace(id=0, MULTIPROCESSOR_COUNT=132)

    def to_device(self, a, stream=None):
        self.copies.append((a.shape, stream))
        return np.array(a)

    def default_stream(self):
        return ("stream", 0)

    def external_stream(self, ptr):
        return ("stream", ptr)

    def from_cuda_array_interface(self, cai, owner=None, sync=True):
        return ("view", cai["data"][0])

    def is_cuda_array(self, a):
        return False

    def kernel(self):
        fake = self

        class Kernel:
            def __getitem__(self, config):
                fake.configs.append(config)
                return lambda *args: fake.launches.append((config, args))

        return Kernel()


def test_numba_cuda_launch_table_logic_against_a_fake(monkeypatch):
    from fastopt.backends import numba_cuda_backend as ncb

    fake = FakeNumbaCuda()
    kern = fake.kernel()
    monkeypatch.setattr(ncb, "cuda", fake)
    monkeypatch.setattr(ncb, "SIMULATOR", False)
    monkeypatch.setattr(ncb, "table_kernel", lambda *a: kern)
    for cache in ("_streams", "_views", "_configs", "_placeholders"):
        monkeypatch.setattr(ncb, cache, {})
    rng = np.random.default_rng(3)
    host = _f32_tensors(rng, [5, 0, 1 << 13])
    rows = [
        (CAI(p), CAI(g), [None if s is None else CAI(s) for s in sl], None) for p, g, sl, _ in host
    ]
    io = IO(scale="device", found_inf=True)
    table = _launch.TensorTable("adam", io, rows, blocks=528)
    flags = dict(maximize=False, decay=True, decoupled=True, amsgrad=False)
    _, k = _plan("adam", _hp("adam", ADAMW), 2)
    gs, fi = CAI(np.ones(1, np.float32)), CAI(np.zeros(1, np.float32))
    with pytest.raises(ValueError, match="found_inf"):
        ncb.launch_table("adam", flags, io, table, k, {"scale": gs}, stream=0xCAFE)
    assert not fake.launches and not fake.copies  # refused before any copy or launch
    ncb.launch_table("adam", flags, io, table, k, {"scale": gs, "found_inf": fi}, stream=0xCAFE)
    ncb.launch_table("adam", flags, io, table, k, {"scale": gs, "found_inf": fi}, stream=0xCAFE)
    # the table copied once (rows, chunks) on the step's stream; one block per chunk
    assert [c for c, _ in fake.copies if c != (1,)] == [table.rows.shape, table.chunks.shape]
    assert all(st == ("stream", 0xCAFE) for c, st in fake.copies if c != (1,))
    assert fake.configs[-1] == (table.nchunks, 256, ("stream", 0xCAFE)) and len(fake.launches) == 2
    args = fake.launches[-1][1]
    np.testing.assert_array_equal(args[0], table.rows)
    np.testing.assert_array_equal(args[1], table.chunks.view(np.int64))
    assert args[2:4] == (table.nchunks, table.chunk)
    assert args[8] == tuple(np.float32(x) for x in k) and type(args[8][0]) is np.float32
    assert args[11] == ("view", gs.host.ctypes.data) and args[12] == ("view", fi.host.ctypes.data)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
