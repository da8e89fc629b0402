"""The mixed-precision CUDA C kernels (``cuda_source.mixed_source``) compiled by g++ and run on the
CPU, against the fp32-math oracle with low-precision storage and, bit for bit, the numba CPU loop.

The kernel text is the one the CuPy backend compiles (the rule's ``.cu`` body, the conversions
of ``kernels/storage.cuh``, the 16-byte vector loop and the scalar tail), run over every
(block, thread) of a grid smaller than the data by ``tests/harness/harness.cpp``. Each case
steps through ``fastopt.functional`` (so scalars, flags and the storage format are the ones a GPU
launch gets) in two forms: host scalars, and the capturable form, where the scalars come from a
device buffer, the loss scale and a zero found-inf flag from device pointers (a found-inf flag
of one must change nothing). Skipped only when g++ is missing.

The cases cross every rule (defaults and every probe on) with the storage formats and both launch
forms. The default run keeps a pairwise cover of that product (``support.cover``: every rule
under every plan, every rule and every plan in both forms, ...) and builds and compiles only
their kernels; the other cases, with a build of every kernel, are the ``exhaustive`` group.
"""

import ctypes
import dataclasses
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fastopt.kernels import RULES, cuda_source, device_scalars, storage
from support.cover import marks, pairwise
from support.tolerances import assert_close

from fastopt import functional, precision

ml_dtypes = pytest.importorskip("ml_dtypes")
GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not installed")

HARNESS = Path(__file__).with_name("harness") / "harness.cpp"
BF16 = np.dtype(ml_dtypes.bfloat16)
NP = {
    "bfloat16": BF16,
    "float16": np.dtype("f2"),
    "float32": np.dtype("f4"),
    "float64": np.dtype("f8"),
}
N, STEPS, GRID, BLOCK = 1001, 3, 3, 32

#: storage formats: (param, grad, state, master, stochastic rounding, grad_scale, unscale_grads)
PLANS = {
    "bf16": ("bfloat16", "bfloat16", "bfloat16", False, False, None, False),
    "f16": ("float16", "float16", "float16", False, False, None, False),
    "bf16-master-f32grad-scaled": ("bfloat16", "float32", "float32", True, False, 8.0, True),
    "bf16-remainder": ("bfloat16", "bfloat16", "float32", "remainder", False, None, False),
    "bf16-sr-f32state": ("bfloat16", "bfloat16", "float32", False, True, None, False),
    "f32-bf16state": ("float32", "float32", "bfloat16", False, False, None, False),
    "f64-f32grad-f32state-scaled": ("float64", "float32", "float32", False, False, 0.25, False),
    "f32-scaled": ("float32", "float32", "float32", False, False, 4.0, False),
}


def _hp(rule, probes):
    """Hyperparameters of ``rule``: the defaults (a larger lr), or with every probe on that the
    rule's constraints allow (each flag variant's terms visible)."""
    spec = RULES[rule]
    hp = dict(spec.defaults, lr=0.05)
    if probes:
        for h in spec.hyper:
            trial = dict(hp, **{h.name: h.probe}) if h.probe is not None else hp
            try:
                spec.validate(trial)
            except ValueError:
                continue
            hp = trial
    return spec.validate(hp)


CASES = [
    (rule, probes, plan)
    for rule in RULES
    for probes in (False, True)
    for plan in PLANS
    if probes or plan in ("bf16", "bf16-master-f32grad-scaled")
]


def _io(rule, hp, plan, device, step=2):
    """The storage format of a case's launches (as functional.run derives it), and the flags of
    its step ``step``."""
    pk, gk, sk, master, sr, scale, unscale = PLANS[plan]
    spec = RULES[rule]
    flags = spec.flags_of(hp, step, spec.replay_host_state(hp, step))
    io = precision.io_of(pk, gk, sk, master, sr, scale="host" if scale else None)
    io = dataclasses.replace(io, write_grad=unscale)
    if device:
        io = dataclasses.replace(io, kbuf=True, found_inf=True, scale="device" if scale else None)
    return flags, io


def _devices(rule, hp):
    """The launch forms a case runs: host scalars, and the capturable form where the device
    can compute the rule's scalars (not for a variant chosen per step: RAdam, ASGD)."""
    return (False, True) if device_scalars.capturable(rule, hp) else (False,)


def _key(rule, flags, io):
    return rule, tuple(sorted(flags.items())), io


def _arg_cast(t, j, pointer):
    base = t.replace("__restrict__", "").strip()
    return f"({base})ptrs[{j}]" if pointer else f"({base.replace('const ', '')})k[{j}]"


def _kernel_code(i, rule, flags, io):
    name = f"fastopt_{rule}__m{i}"
    arrays, scalars = cuda_source.mixed_args(rule, flags, io)
    args = [f"({cuda_source.STORAGE_CTYPES[k]} *)a[{j}]" for j, (_, k, _) in enumerate(arrays)]
    pi = ki = 0
    for t, _ in scalars:
        if "*" in t:
            args.append(_arg_cast(t, pi, True))
            pi += 1
        else:
            args.append(_arg_cast(t, ki, False))
            ki += 1
    return "\n".join(
        [
            f"namespace m{i} {{",
            cuda_source.mixed_source(rule, flags, io, name=name),
            f'extern "C" void launch_m{i}(void *const *a, void *const *ptrs, const double *k, '
            "long long n) {",
            f"    gridDim.x = {GRID}; blockDim.x = {BLOCK};",
            "    for (unsigned b = 0; b < gridDim.x; ++b) {",
            "        for (unsigned t = 0; t < blockDim.x; ++t) {",
            "            blockIdx.x = b; threadIdx.x = t;",
            f"            {name}({', '.join(args + ['n'])});",
            "        }",
            "    }",
            "}",
            "}",
        ]
        + [f"#undef {m}" for m in cuda_source.defines(rule, flags)]
    )


def _build(tmp_path_factory, cases):
    """(ctypes library, index (rule, flags, io) -> kernel number) of the kernels of ``cases``
    ((rule, probes, plan, device) tuples)."""
    out = tmp_path_factory.mktemp("cuda_mixed")
    index = {}
    for rule, probes, plan, device in cases:
        hp = _hp(rule, probes)
        for step in range(2, 2 + STEPS):  # every variant _run's steps reach
            key = _key(rule, *_io(rule, hp, plan, device, step))
            index.setdefault(key, len(index))
    code = [_kernel_code(i, r, dict(f), io) for (r, f, io), i in index.items()]
    (out / "variants.inc").write_text("\n")
    (out / "mixed.inc").write_text("\n\n".join(code) + "\n")
    so = out / "mixed.so"
    cmd = [GXX, "-std=c++17", "-O0", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Werror"]
    cmd += [
        "-DFASTOPT_T=float",
        '-DFASTOPT_RAW="mixed.inc"',
        f"-I{out}",
        str(HARNESS),
        "-o",
        str(so),
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"g++ failed:\n{res.stderr[:4000]}"
    return ctypes.CDLL(str(so)), index


class MixedHarness:
    """A backend for ``fastopt.functional``: runs the g++-compiled mixed kernel of a launch.
    ``device=True``: the capturable form (scalars from a buffer, device-pointer loss scale and
    found-inf flag); ``found_inf`` is the flag it passes."""

    NAME = "cuda-c-mixed"
    DEVICE = "cpu"

    def __init__(self, harness, device=False, found_inf=0.0):
        self.lib, self.index = harness
        self.device, self.found_inf = device, found_inf
        self.seen = set()

    def launch(self, rule, flags, param, grad, states, k, io=None, master=None, extras=None):
        extras = extras or {}
        if io is None:
            io = storage.IO(*(precision.kind(a.dtype) for a in (param, grad, param)))
            io = dataclasses.replace(
                io,
                state=precision.kind(next((s.dtype for s in states if s is not None), param.dtype)),
            )
        if self.device:
            io = dataclasses.replace(
                io, kbuf=True, found_inf=True, scale="device" if io.scale else None
            )
        i = self.index[_key(rule, flags, io)]
        self.seen.add(i)
        arrays, scalars = cuda_source.mixed_args(rule, flags, io)
        named = {"grad": grad, "param": param, "master": master}
        named.update({s: a for s, a in zip(RULES[rule].state, states) if a is not None})
        bufs = [named[a] for a, _, _ in arrays]
        for b in bufs:
            assert b.flags.c_contiguous and b.ctypes.data % 16 == 0, "16-byte aligned buffers"
        c = np.dtype(io.compute)
        values = {
            "kbuf": np.array(k, dtype=c),
            "gscale": np.array([1.0 / (extras.get("inv_scale") or 1.0)], np.float32),
            "found_inf": np.array([self.found_inf], np.float32),
            "keyp": np.array([extras.get("key", 0)], np.uint32),
            "inv_scale": extras.get("inv_scale"),
            "salt": extras.get("salt", 0),
            "key": extras.get("key", 0),
        }
        ptrs, ks = [], [] if io.kbuf else list(k)
        for t, n in scalars:
            if "*" in t:
                ptrs.append(values[n])
            elif n not in RULES[rule].scalars:
                ks.append(values[n])
        pa = (ctypes.c_void_p * len(bufs))(*[b.ctypes.data for b in bufs])
        pp = (ctypes.c_void_p * max(1, len(ptrs)))(*[p.ctypes.data for p in ptrs])
        kk = np.array(ks + [0.0], dtype=np.float64)
        fn = getattr(self.lib, f"launch_m{i}")
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
        fn(
            ctypes.cast(pa, ctypes.c_void_p),
            ctypes.cast(pp, ctypes.c_void_p),
            kk.ctypes.data,
            param.shape[0],
        )


def _aligned(a):
    """A 64-byte aligned copy of ``a`` (the vector loop's 16-byte loads need aligned buffers)."""
    raw = np.empty(a.nbytes + 64, np.uint8)
    off = -raw.ctypes.data % 64
    out = raw[off : off + a.nbytes].view(a.dtype)
    out[...] = a
    return out


def _inputs(rule, plan, seed):
    pk, gk, sk, master, *_ = PLANS[plan]
    rng = np.random.default_rng(seed)
    p = rng.standard_normal(N)
    st = {s: rng.uniform(0.1, 1.0, N) for s in RULES[rule].state}
    if "grad_avg" in st:  # centered RMSProp: square_avg >= grad_avg**2 keeps the root real
        st["grad_avg"] = 0.3 * rng.standard_normal(N)
        st["square_avg"] = st["grad_avg"] ** 2 + rng.uniform(0.1, 1.0, N)
    grads = [rng.standard_normal(N) for _ in range(STEPS)]
    arrs = {"param": _aligned(p.astype(NP[pk]))}
    arrs.update({s: _aligned(a.astype(NP[sk])) for s, a in st.items()})
    arrs["master"] = None
    if master == "remainder":  # the low half of the fp32 master, the param its high half
        arrs["master"] = _aligned(precision.split_master(p.astype(np.float32))[1])
        arrs["param"][...] = precision.split_master(p.astype(np.float32))[0]
    elif master:
        arrs["master"] = _aligned(arrs["param"].astype(np.float32))
    return arrs, [g.astype(NP[gk]) for g in grads]


def _run(rule, hp, plan, backend, arrs, grads):
    _, _, _, master, sr, scale, unscale = PLANS[plan]
    spec = RULES[rule]
    out = []
    key = "master_remainder" if master == "remainder" else "master_param"
    for t, g0 in enumerate(grads, start=2):  # from step 2: no fresh-slot reset
        g = _aligned(g0 * (scale or 1.0)) if scale else _aligned(g0)
        ok = functional.run(
            rule,
            arrs["param"],
            g,
            {s: arrs[s] for s in spec.state},
            step=t,
            hp=dict(hp, lr=hp["lr"] * (1 + 0.1 * t)),
            backend=backend,
            **{key: arrs["master"]},
            stochastic_rounding=sr,
            seed=7,
            salt=3,
            grad_scale=scale,
            unscale_grads=unscale,
        )
        assert ok
        out.append(g)
    return out


def _compare(a, b, what, pa=None, pb=None):
    if a.dtype == np.int16:  # a remainder: the fp32 masters it holds with its params
        a, b = precision.join_master(pa, a), precision.join_master(pb, b)
    kind = precision.kind(a.dtype)
    assert not np.isnan(a.astype(np.float32)).any(), f"{what}: NaN"
    if kind in storage.BITS16:
        sa, sb = (x.view(np.uint16).astype(np.int64) for x in (a, b))
        d = np.abs(np.where(sa >> 15, -(sa & 0x7FFF), sa) - np.where(sb >> 15, -(sb & 0x7FFF), sb))
        assert d.max() <= 1 and (d > 0).sum() <= N // 50, f"{what}: {d.max()} ulps, {(d > 0).sum()}"
    else:
        assert_close(a, b.astype(np.float64), np.dtype(kind), what)


DEVICE_CASES = [
    (rule, probes, plan, device)
    for rule, probes, plan in CASES
    for device in _devices(rule, _hp(rule, probes))
]

#: the cases the tests below run besides the matrix (in the default run's build)
FIXED = [("adam", True, "bf16-master-f32grad-scaled", True)] + [
    ("adam", True, plan, False)
    for plan in ("bf16", "bf16-sr-f32state", "bf16-master-f32grad-scaled", "bf16-remainder")
]
_OPTIONS = [dict(rule=r, probes=p, plan=pl, device=d) for r, p, pl, d in DEVICE_CASES]
#: the default run's cases: a pairwise cover of (rule, probes, plan, launch form), FIXED among them
KEPT = [
    DEVICE_CASES[i] for i in pairwise(_OPTIONS, seeds=[0] + [DEVICE_CASES.index(c) for c in FIXED])
]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The default run's build: the kernels of ``KEPT``."""
    return _build(tmp_path_factory, KEPT)


@pytest.fixture(scope="module")
def harness_every(tmp_path_factory):
    """The exhaustive build: the kernels of every case."""
    return _build(tmp_path_factory, DEVICE_CASES)


@pytest.mark.parametrize(
    "rule,probes,plan,device",
    [
        pytest.param(
            *c,
            marks=marks(c in KEPT),
            id=f"{c[0]}-{'probes' if c[1] else 'defaults'}-{c[2]}-"
            f"{'capturable' if c[3] else 'host-scalars'}",
        )
        for c in DEVICE_CASES
    ],
)
def test_mixed_kernel_matches_the_oracle(request, rule, probes, plan, device):
    harness = request.getfixturevalue(
        "harness" if (rule, probes, plan, device) in KEPT else "harness_every"
    )
    hp = _hp(rule, probes)
    arrs, grads = _inputs(rule, plan, seed=len(rule) + 10 * probes)
    ref, _ = _inputs(rule, plan, seed=len(rule) + 10 * probes)
    be = MixedHarness(harness, device)
    got_g = _run(rule, hp, plan, be, arrs, grads)
    want_g = _run(rule, hp, plan, "numpy", ref, grads)
    assert be.seen, "the harness never ran"
    for name in arrs:
        if arrs[name] is not None:
            _compare(arrs[name], ref[name], f"{rule} {plan} {name}", arrs["param"], ref["param"])
    for a, b in zip(got_g, want_g):  # the unscaled grads, where they were written back
        _compare(a, b, f"{rule} {plan} grad")


def test_found_inf_on_the_device_changes_nothing(harness):
    rule, plan = "adam", "bf16-master-f32grad-scaled"
    hp = _hp(rule, True)
    arrs, grads = _inputs(rule, plan, seed=1)
    before = {k: None if v is None else v.copy() for k, v in arrs.items()}
    got = _run(rule, hp, plan, MixedHarness(harness, device=True, found_inf=1.0), arrs, grads)
    for k, v in arrs.items():
        if v is not None:
            assert np.array_equal(v.view(np.uint8), before[k].view(np.uint8)), k
    assert all(np.array_equal(g, g0 * 8.0) for g, g0 in zip(got, grads))  # grads untouched


@pytest.mark.parametrize(
    "plan", ["bf16", "bf16-sr-f32state", "bf16-master-f32grad-scaled", "bf16-remainder"]
)
def test_mixed_kernel_is_bit_identical_to_the_cpu_loop(harness, plan):
    """The C body and the Python rule run the same operations in the same order, and the
    conversions are exact: the CUDA C kernel and the numba CPU loop agree bit for bit."""
    rule, hp = "adam", _hp("adam", True)
    a, grads = _inputs(rule, plan, seed=2)
    b, _ = _inputs(rule, plan, seed=2)
    _run(rule, hp, plan, MixedHarness(harness), a, grads)
    _run(rule, hp, plan, "numba", b, grads)
    for k, v in a.items():
        if v is not None:
            assert np.array_equal(v.view(np.uint8), b[k].view(np.uint8)), k


# -- NVRTC: the same kernels compile for the GPU, no float64 where the math is float32 ------------

F64 = r"\.f64\b"


def _nvrtc(source, arch):
    """PTX of ``source`` compiled by NVRTC for ``arch`` (skips without NVRTC)."""
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc")
    try:
        err, *_ = nvrtc.nvrtcVersion()
    except Exception as exc:  # the NVRTC shared library is not installed
        pytest.skip(f"NVRTC cannot be loaded: {exc}")
    err, prog = nvrtc.nvrtcCreateProgram(source.encode(), b"mixed.cu", 0, [], [])
    opts = [f"-arch={arch}".encode()]
    (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        _, size = nvrtc.nvrtcGetProgramLogSize(prog)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        pytest.fail(f"NVRTC {arch}: {err}\n{log.decode(errors='replace')[:4000]}")
    _, n = nvrtc.nvrtcGetPTXSize(prog)
    ptx = b" " * n
    nvrtc.nvrtcGetPTX(prog, ptx)
    nvrtc.nvrtcDestroyProgram(prog)
    return ptx.decode().rstrip("\x00 ")


@pytest.mark.parametrize(
    "build",
    [pytest.param(b, marks=marks(b == "harness"), id=b) for b in ("harness", "harness_every")],
)
def test_mixed_kernels_compile_without_float64_and_with_16_byte_loads(request, build):
    """Every kernel of the harness matrix (vector forms; scalar forms of a few), for sm_90: the
    float32-math ones (float16, bfloat16, float32 storage) hold no float64 instruction (the
    float64 ones do: the check sees them), the vector forms load 16 bytes at a time."""
    import re

    arch = "sm_90"
    _, index = request.getfixturevalue(build)
    parts, names = [], {}
    for (rule, flags, io), i in index.items():
        # the vector form holds the scalar tail too; the scalar-only form of a few suffices
        for vector in (True, False) if i < 6 else (True,):
            name = f"fastopt_{rule}__m{i}_{'v' if vector else 's'}"
            names[name] = (rule, dict(flags), io, vector)
            src = cuda_source.mixed_source(rule, dict(flags), io, vector=vector, name=name)
            undef = "\n".join(f"#undef {m}" for m in cuda_source.defines(rule, dict(flags)))
            parts.append(f"namespace m{i}{'v' if vector else 's'} {{\n{src}\n}}\n{undef}\n")
    ptx = _nvrtc("\n".join(parts), arch)
    heads = list(re.finditer(r"\.entry\s+(\w+)\s*\(", ptx))
    ends = [m.start() for m in heads[1:]] + [len(ptx)]
    entries = {m.group(1): ptx[m.start() : e] for m, e in zip(heads, ends)}
    assert set(entries) == set(names)
    for name, (rule, _flags, io, vector) in names.items():
        text = entries[name]
        bad = [ln.strip() for ln in text.splitlines() if re.search(F64, ln)]
        if io.compute == "float32":
            assert not bad, f"{name} ({rule} {io}): float64 instructions {bad[:3]}"
        else:
            assert bad, f"{name}: a float64 kernel without float64 instructions?"
        loads = len(re.findall(r"\bld\.global(\.nc)?\.v4\.(u32|b32|f32)", text))
        assert (loads > 0) == vector, f"{name}: {loads} 16-byte loads (vector={vector})"


# -- the scalar kernel of capturable steps (kernels.device_scalars.c_source) ----------------------


def test_scalar_kernel_in_c_computes_the_host_scalars(tmp_path):
    """Every rule's recorded program as CUDA C, compiled by g++ and run step after step: the
    scalars it writes (float64 and float32) are the host's, the step key is the host's, and a
    found-inf flag leaves the count where it was."""
    import math

    from fastopt.kernels import device_scalars

    rng = np.random.default_rng(0)
    cases = []
    for rule, spec in RULES.items():
        hp = dict(_hp(rule, True))
        for h in spec.hyper:
            if h.name == "lr":
                hp["lr"] = float(rng.uniform(1e-3, 0.1))
        if device_scalars.capturable(rule, spec.validate(hp)):  # RAdam, ASGD: not on a device
            cases.append((rule, spec.validate(hp)))
    code = []
    for i, (rule, hp) in enumerate(cases):
        src = device_scalars.c_source(device_scalars.trace(rule, hp), name=f"scalars_{i}")
        code.append(
            f"namespace s{i} {{\n{src}\n"
            f'extern "C" void run_s{i}(double *c, float *k32, double *k64, unsigned int *kp, '
            "const float *fi, unsigned int seed) {\n"
            "    gridDim.x = 1; blockDim.x = 1; blockIdx.x = 0; threadIdx.x = 0;\n"
            f"    scalars_{i}(c, k32, k64, kp, fi, seed);\n}}\n}}"
        )
    out = tmp_path
    (out / "variants.inc").write_text("\n")
    (out / "scalars.inc").write_text("\n\n".join(code) + "\n")
    so = out / "scalars.so"
    cmd = [GXX, "-std=c++17", "-O0", "-shared", "-fPIC", "-ffp-contract=off", "-Wall", "-Werror"]
    cmd += ["-Wno-unused-variable", "-DFASTOPT_T=float", '-DFASTOPT_RAW="scalars.inc"']
    cmd += [f"-I{out}", str(HARNESS), "-o", str(so)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"g++ failed:\n{res.stderr[:4000]}"
    lib = ctypes.CDLL(str(so))
    for i, (rule, hp) in enumerate(cases):
        spec = RULES[rule]
        fn = getattr(lib, f"run_s{i}")
        ctl = np.array(device_scalars.ctl_values(rule, hp, 0), np.float64)
        m = len(spec.scalars)
        k32, k64, kp = np.zeros(m, np.float32), np.zeros(m), np.zeros(1, np.uint32)
        hs = spec.initial_host_state(hp) if spec.host_state else None
        for t, fi in [(t, 0.0) for t in range(1, 25)] + [(24, 1.0)]:
            flag = np.array([fi], np.float32)
            fn(
                *(ctypes.c_void_p(a.ctypes.data) for a in (ctl, k32, k64, kp, flag)),
                ctypes.c_uint(9),
            )
            if fi:
                assert ctl[0] == 24, f"{rule}: a skipped step counted"
                continue
            _, k = spec.variant_and_scalars(hp, t, hs)
            # glibc's pow/sqrt: the same functions as Python's, so the same bits
            assert np.array_equal(k64, np.array(k)), (rule, t, k64, k)
            assert np.array_equal(k32, np.array(k, np.float32)), (rule, t)
            assert kp[0] == storage.step_key(9, t) and ctl[0] == t
            if spec.host_state:
                hs = spec.advance(hp, t, hs)
        assert math.isfinite(float(k64.sum()))
