"""The CuPy kernel bodies (``kernels/*.cu``) compiled as C++ by g++ and checked against the oracle.

``tests/harness/harness.cpp`` turns every variant of every rule into a CPU loop that binds the
elements the way CuPy's ``ElementwiseKernel`` does and runs the very operation text and body the
CuPy backend compiles (``kernels.cuda_source``). The raw kernels of the same variants (the CuPy
backend's default form: ``cuda_source.raw_source``, scalar and 16-byte-vector widths) are
compiled verbatim too and run over every (block, thread) of a grid smaller than the data, so
their vector loop, scalar tail and grid-stride trips are exercised as well. The loops are driven
through
``fastopt.functional`` (so the host scalars are the ones a GPU launch gets) for T = float and
double, over several steps with a changing lr, and params and every state slot are compared with
the float64 oracle under the shared tolerance table. Skipped only when g++ is missing.
"""

import ctypes
import inspect
import shutil
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from fastopt.kernels import RULES, cuda_source
from support.matrix import RULE_MATRIX, STEPS, rule_config_id
from support.tolerances import assert_close

from fastopt import functional, reference

GXX = shutil.which("g++")
pytestmark = pytest.mark.skipif(GXX is None, reason="g++ is not installed")

HARNESS = Path(__file__).with_name("harness") / "harness.cpp"
KERNELS = Path(cuda_source.__file__).parent
CTYPE = {np.float32: "float", np.float64: "double"}
VARIANTS = [(rule, flags) for rule in RULES for flags in cuda_source.variants(rule)]
N = 1001
#: the kernel forms checked: CuPy's ElementwiseKernel operation, and the raw kernel's scalar
#: (width 1) and vector (16-byte) forms
FORMS = ("elementwise", "raw-scalar", "raw-vector")
#: the small grid the raw kernels run on: 3 blocks of 32 threads, far fewer threads than N
GRID, BLOCK = 3, 32
#: the arrays a launch passes (param, grad and the state slots of the rule with the most)
ARRAYS = 2 + max(len(spec.slots) for spec in RULES.values())


def _key(rule, flags):
    return rule, tuple(sorted((k, bool(v)) for k, v in flags.items()))


def _variant_code(i, rule, flags):
    """One variant: flag macros, the .cu body in a namespace, and a CuPy-style element loop."""
    mod = RULES[rule]
    used = cuda_source.slots_used(rule, flags)
    macros = cuda_source.defines(rule, flags)
    bind = ["const T &grad = a[1][i];", "T &param = a[0][i];"]
    bind += [f"T &{s} = a[{2 + j}][i];" for j, (s, u) in enumerate(zip(mod.state, used)) if u]
    bind += [f"const T {s} = k[{j}];" for j, s in enumerate(mod.scalars)]
    body = "\n".join(bind + [cuda_source.operation(rule, used)])
    return "\n".join(
        [f"#define {m} {v}" for m, v in macros.items()]
        + [
            f"namespace v{i} {{",
            f'#include "{KERNELS / (rule + ".cu")}"',
            f'extern "C" void run_v{i}(T *const *a, const T *k, long n) {{',
            "    for (long i = 0; i < n; ++i) {",
            body,
            "    }",
            "}",
            "}",
        ]
        + [f"#undef {m}" for m in macros]
    )


def _width(ctype, form):
    return cuda_source.VECTOR_WIDTH[ctype] if form == "raw-vector" else 1


def _raw_code(i, rule, flags, ctype, width):
    """One raw kernel verbatim (in its own namespace) and a loop launching it over the grid."""
    name = f"fastopt_{rule}__r{i}_w{width}"
    arrays, scalars = cuda_source.raw_args(rule, flags)
    slot = {"param": 0, "grad": 1}
    slot.update({s: 2 + j for j, s in enumerate(RULES[rule].state)})
    args = [f"a[{slot[a]}]" for a, _ in arrays] + [f"k[{j}]" for j in range(len(scalars))]
    return "\n".join(
        [
            f"namespace r{i}_w{width} {{",
            cuda_source.raw_source(rule, flags, ctype, width, name=name),
            "}",
            f'extern "C" void launch_r{i}_w{width}(T *const *a, const T *k, long long n) {{',
            f"    gridDim.x = {GRID}; blockDim.x = {BLOCK};",
            "    for (unsigned b = 0; b < gridDim.x; ++b) {",
            "        for (unsigned t = 0; t < blockDim.x; ++t) {",
            "            blockIdx.x = b; threadIdx.x = t;",
            f"            r{i}_w{width}::{name}({', '.join(args + ['n'])});",
            "        }",
            "    }",
            "}",
        ]
        + [f"#undef {m}" for m in cuda_source.defines(rule, flags)]
    )


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """dtype -> ctypes library holding ``run_v<i>`` (elementwise) and ``launch_r<i>_w<width>``
    (raw, widths 1 and 16 bytes) for every variant."""
    out = tmp_path_factory.mktemp("cuda_harness")
    (out / "variants.inc").write_text(
        "\n\n".join(_variant_code(i, r, f) for i, (r, f) in enumerate(VARIANTS)) + "\n"
    )
    libs = {}
    for dtype, ctype in CTYPE.items():
        raw = [
            _raw_code(i, r, f, ctype, w)
            for i, (r, f) in enumerate(VARIANTS)
            for w in sorted({1, cuda_source.VECTOR_WIDTH[ctype]})
        ]
        (out / f"raw_{ctype}.inc").write_text("\n\n".join(raw) + "\n")
        so = out / f"harness_{ctype}.so"
        cmd = [
            GXX,
            "-std=c++17",
            "-O0",
            "-shared",
            "-fPIC",
            "-ffp-contract=off",
            "-Wall",
            "-Werror",
            f"-DFASTOPT_T={ctype}",
            f'-DFASTOPT_RAW="raw_{ctype}.inc"',
            f"-I{out}",
            str(HARNESS),
            "-o",
            str(so),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        assert res.returncode == 0, f"g++ failed for T={ctype}:\n{res.stderr[:4000]}"
        libs[np.dtype(dtype)] = ctypes.CDLL(str(so))
    return libs


class HarnessBackend:
    """A backend object for ``fastopt.functional``: runs the g++-compiled CuPy operation."""

    NAME = "cuda-c-harness"
    DEVICE = "cpu"

    def __init__(self, libs, form="elementwise"):
        self.libs = libs
        self.form = form
        self.index = {_key(r, f): i for i, (r, f) in enumerate(VARIANTS)}
        self.seen = set()

    def launch(self, rule, flags, param, grad, states, k):
        i = self.index[_key(rule, flags)]
        self.seen.add(i)
        dtype = param.dtype
        used = cuda_source.slots_used(rule, flags)
        arrays = [param, grad] + [s if u else None for s, u in zip(states, used)]
        arrays += [None] * (ARRAYS - len(arrays))
        for a in arrays:
            assert a is None or (a.dtype == dtype and a.flags.c_contiguous)
        ptrs = (ctypes.c_void_p * ARRAYS)(*[None if a is None else a.ctypes.data for a in arrays])
        ks = np.array(k, dtype=dtype)  # one cast of the float64 host scalars, as the GPU gets
        if self.form == "elementwise":
            fn = getattr(self.libs[dtype], f"run_v{i}")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long]
        else:
            width = _width(CTYPE[dtype.type], self.form)
            assert width == 1 or all(a is None or a.ctypes.data % 16 == 0 for a in arrays), (
                "the vector form needs 16-byte aligned buffers"
            )
            fn = getattr(self.libs[dtype], f"launch_r{i}_w{width}")
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong]
        fn(ctypes.cast(ptrs, ctypes.c_void_p), ks.ctypes.data, param.shape[0])


def _initial_state(rule, rng):
    """Random non-zero state: either sign in an odd slot (moments, momentum, the previous
    gradient, the average of the iterates), positive in an even one (a square, a maximum of
    magnitudes, a step size: the spec's ``Slot.even``); v >= ga^2 so centered RMSProp stays
    real, AMSGrad's running max above v."""
    st = {}
    spec = RULES[rule]
    for s in spec.state:
        st[s] = rng.uniform(0.1, 2.0, N) if spec.slot(s).even else rng.standard_normal(N)
    if rule == "rmsprop":
        st["grad_avg"] = 0.5 * rng.standard_normal(N)
        st["square_avg"] = st["grad_avg"] ** 2 + rng.uniform(0.1, 2.0, N)
    if rule == "adam":
        st["max_exp_avg_sq"] = st["exp_avg_sq"] + rng.uniform(0.0, 0.5, N)
    return st


def _oracle_kwargs(rule, hp):
    """The hyperparameters the oracle function of ``rule`` takes."""
    takes = inspect.signature(getattr(reference, rule)).parameters
    return {k: v for k, v in hp.items() if k in takes}


#: every probe combination of every rule (support.matrix.RULE_MATRIX): every compiled variant
CASES = RULE_MATRIX


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float", "double"])
@pytest.mark.parametrize("rule,hp", CASES, ids=[rule_config_id(c) for c in CASES])
def test_body_matches_oracle(harness, rule, hp, dtype, form):
    rng = np.random.default_rng(zlib.crc32(repr((rule, hp, np.dtype(dtype).name)).encode()))
    p0, st0 = rng.standard_normal(N), _initial_state(rule, rng)
    grads = [rng.standard_normal(N) * 2 for _ in range(STEPS)]
    be = HarnessBackend(harness, form)
    spec = RULES[rule]
    p, st = p0.astype(dtype), {s: a.astype(dtype) for s, a in st0.items()}
    # the oracle starts from the very same (rounded) values and host state
    rp, rst = p.astype(np.float64), {s: a.astype(np.float64) for s, a in st.items()}
    hs = spec.initial_host_state(hp)
    rst.update({h: np.array(v, np.float32) for h, v in hs.items()})
    extra = {"host_state": hs} if hs else {}
    fn, ref = getattr(functional, rule), getattr(reference, rule)
    for t in range(1, STEPS + 1):
        kw = dict(hp, lr=hp["lr"] * (1 + 0.1 * t))  # a new lr each step: no stale scalar
        g = grads[t - 1].astype(dtype)
        fn(p, g, *(st[s] for s in spec.state), step=t, backend=be, **kw, **extra)
        ref(rp, g.astype(np.float64), rst, step=t, **_oracle_kwargs(rule, kw))
    assert be.seen, "the harness never ran"
    assert_close(p, rp, dtype, f"{rule} param")
    for s in spec.state:
        assert_close(st[s], rst[s], dtype, f"{rule} {s}")
    assert hs == {h: float(rst[h]) for h in hs}, "host state"


def test_cases_reach_every_variant(harness):
    """The cases above drive every compiled variant of every rule at least once, per-step
    variants (RAdam's rectification, ASGD's averaging) included."""
    be = HarnessBackend(harness)
    rng = np.random.default_rng(0)
    for rule, hp in CASES:
        st = _initial_state(rule, rng)
        hs = RULES[rule].initial_host_state(hp)
        extra = {"host_state": hs} if hs else {}
        p = rng.standard_normal(N)
        for t in range(1, STEPS + 1):
            getattr(functional, rule)(
                p,
                rng.standard_normal(N),
                *(st[s] for s in RULES[rule].state),
                step=t,
                backend=be,
                **hp,
                **extra,
            )
    _device_variants_equal_the_host_variants(be, rng)
    missing = [VARIANTS[i] for i in range(len(VARIANTS)) if i not in be.seen]
    assert not missing, f"variants never exercised: {missing}"


def _device_variants_equal_the_host_variants(be, rng):
    """A rule's device variant (``Rule.device_flags``: every term, selected per step by its
    scalars, which only a device's recorded scalar program launches) is driven here directly:
    at each step of each case, its compiled body with that step's host scalars gives the host
    variant's bits, params and every state buffer, in float32 and float64."""
    for rule, hp in CASES:
        spec = RULES[rule]
        if spec.device_flags is None:
            continue
        hp = spec.validate({**spec.defaults, **hp})
        dev = spec.device_flags(hp)
        hs = spec.initial_host_state(hp) if spec.host_state else None
        for dtype in (np.float32, np.float64):
            p = rng.standard_normal(N).astype(dtype)
            st = [a.astype(dtype) for a in _initial_state(rule, rng).values()]
            for t in range(1, STEPS + 1):
                flags, k = spec.variant_and_scalars(hp, t, hs)
                g = rng.standard_normal(N).astype(dtype)
                host_p, host_st = p.copy(), [a.copy() for a in st]
                be.launch(rule, flags, host_p, g, host_st, k)
                be.launch(rule, dev, p, g, st, k)
                assert p.tobytes() == host_p.tobytes(), (rule, hp, t, "param")
                for name, a, b in zip(spec.state, st, host_st):
                    assert a.tobytes() == b.tobytes(), (rule, hp, t, name)
                if spec.host_state:
                    hs = spec.advance_host_state(hp, t, hs)


def test_first_sgd_momentum_step_ignores_dampening(harness):
    """PyTorch's trap: on step 1 the buffer is the gradient itself, whatever the dampening."""
    rng = np.random.default_rng(1)
    p, g, b = rng.standard_normal(N), rng.standard_normal(N), rng.standard_normal(N)
    p0 = p.copy()
    functional.sgd(
        p, g, b, step=1, lr=0.1, momentum=0.9, dampening=0.5, backend=HarnessBackend(harness)
    )
    np.testing.assert_array_equal(b, g)
    np.testing.assert_allclose(p, p0 - 0.1 * g, rtol=1e-15)


def _same_nonfinite(actual, ref, dtype, what):
    """NaN, +inf and -inf in the same places, the finite values within tolerance."""
    actual, ref = np.asarray(actual, np.float64), np.asarray(ref, np.float64)
    for test in (np.isnan, np.isposinf, np.isneginf):
        assert np.array_equal(test(actual), test(ref)), f"{what}: {test.__name__} differs"
    fin = np.isfinite(ref)
    assert_close(actual[fin], ref[fin], dtype, what)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float", "double"])
def test_nonfinite_values_like_torch(harness, dtype):
    """torch's non-finite behaviour in the C bodies: centered RMSProp computes v - ga*ga as one
    fused multiply-add (v = inf stays inf where ga*ga overflows, so the param stays finite),
    and AMSGrad's max propagates NaN from either operand (CUDA's max/fmax would drop it). The
    oracle runs in the same dtype, so both overflow alike."""
    be, n = HarnessBackend(harness), 8
    big = dtype(1e20 if dtype == np.float32 else 1e160)
    p = np.linspace(1, 2, n).astype(dtype)
    st = {
        "square_avg": np.full(n, np.inf, dtype),
        "grad_avg": np.full(n, big * dtype(0.9)),
        "momentum_buffer": np.zeros(n, dtype),
    }
    g = np.full(n, big, dtype)
    rp, rst = p.copy(), {s: a.copy() for s, a in st.items()}
    with np.errstate(over="ignore", invalid="ignore"):
        assert np.isinf(st["grad_avg"] * st["grad_avg"]).all()  # the square overflows
        functional.rmsprop(
            p, g, *st.values(), step=3, lr=0.01, centered=True, momentum=0.5, backend=be
        )
        reference.rmsprop(rp, g, rst, step=3, lr=0.01, centered=True, momentum=0.5)
    assert np.isfinite(p).all()
    _same_nonfinite(p, rp, dtype, "centered rmsprop param")
    for s, a in st.items():
        _same_nonfinite(a, rst[s], dtype, f"centered rmsprop {s}")
    rng = np.random.default_rng(11)
    p = rng.standard_normal(n).astype(dtype)
    st = {
        "exp_avg": rng.standard_normal(n).astype(dtype),
        "exp_avg_sq": rng.uniform(0.1, 1, n).astype(dtype),
        "max_exp_avg_sq": rng.uniform(1, 2, n).astype(dtype),
    }
    st["max_exp_avg_sq"][1] = np.nan  # NaN in the running max, a finite v
    st["exp_avg_sq"][2] = np.nan  # NaN in v, a finite running max
    g = rng.standard_normal(n).astype(dtype)
    g[3] = np.nan  # NaN in the gradient
    rp, rst = p.copy(), {s: a.copy() for s, a in st.items()}
    functional.adam(p, g, *st.values(), step=2, lr=0.01, amsgrad=True, backend=be)
    reference.adam(rp, g, rst, step=2, lr=0.01, amsgrad=True)
    assert np.isnan(st["max_exp_avg_sq"][1:4]).all() and np.isnan(p[1:4]).all()
    _same_nonfinite(p, rp, dtype, "amsgrad param")
    for s, a in st.items():
        _same_nonfinite(a, rst[s], dtype, f"amsgrad {s}")
