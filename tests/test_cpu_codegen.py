"""What the numba CPU backend compiles: packed math, and no float64 in float32 or 16-bit loops.

The CPU counterpart of the CUDA compile checks (``test_cuda_compile.py``): a stray float64
literal or scalar would promote a whole float32 expression to double (slower, and no longer
torch's float32 arithmetic), and a loop LLVM could not vectorise would run several times slower.
Each loop here is compiled afresh (inspection needs a compile, not the disk cache) from the
same generated source the backend compiles, and its LLVM IR is read: the loop function itself,
not numba's Python wrapper (whose argument unboxing goes through double).

A vectorised loop can still leave part of its body scalar: a lane is taken out of the vector,
run through scalar code and put back, which is what a 16-bit conversion the compiler cannot
widen would cost. In the IR that is ``extractelement``/``insertelement``, scalar operations or
scalar stores in the vector body; an operation the IR keeps packed but the target has no
instruction for is split into lanes only in the machine code (``vpextrd``, ``vpinsrd``, moves
between vector and general registers in the vector loop). The loops hold neither, on this CPU
and in an AVX2 build (what a CPU without AVX-512 runs; compiled for ``AVX2_CPU`` in a child
process, numba reading its target when it is imported).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

numba = pytest.importorskip("numba")

from fastopt.kernels import RULES  # noqa: E402
from fastopt.kernels.storage import IO  # noqa: E402

from fastopt.backends import numba_backend  # noqa: E402

ADAM = {"maximize": False, "decay": False, "decoupled": False, "amsgrad": False}
WRITES = (True, True, False)  # exp_avg, exp_avg_sq; no max_exp_avg_sq
#: float arithmetic or conversions in double
DOUBLE = re.compile(r"\b(fadd|fsub|fmul|fdiv|fneg|fpext|fptrunc|sitofp|uitofp|fcmp)\b.*\bdouble\b")
#: a packed square root (``llvm.sqrt.v4f32``, ``v8f32``, ``v16f32``: the widest the CPU has)
PACKED_SQRT = {
    "float": re.compile(r"@llvm\.sqrt\.v\d+f32"),
    "double": re.compile(r"@llvm\.sqrt\.v\d+f64"),
}


#: an LLVM CPU with AVX2, FMA and F16C and no AVX-512, compiled for with its own features
AVX2_CPU = "haswell"
#: arithmetic, comparisons, casts and calls on one lane's value (not on the i64 loop index)
SCALAR_OP = re.compile(
    r"=\s+(?:tail\s+)?(?:add|sub|mul|and|or|xor|shl|lshr|ashr|select|icmp|fcmp|bitcast|zext|sext"
    r"|trunc|fpext|fptrunc|fadd|fsub|fmul|fdiv|call)\b(?:\s+\w+)*\s+(?:i1|i8|i16|i32|half|float)\b"
)
SCALAR_STORE = re.compile(r"^\s*store\s+(?:i8|i16|i32|half|float)\b")
LANE_MOVES = re.compile(r"\b(?:extractelement|insertelement)\b")


def vector_body(body):
    """The block of the loop's body that LLVM's loop vectorizer emitted (``vector.body``), or
    None when the loop was not vectorised."""
    m = re.search(r"^vector\.body:.*?\n(.*?)(?=^\S|\Z)", body, re.M | re.S)
    return m.group(1) if m else None


def scalar_lines(block):
    """The lines of a vector body that work on single lanes."""
    return [
        ln.strip()
        for ln in block.splitlines()
        if SCALAR_OP.search(ln) or SCALAR_STORE.search(ln) or LANE_MOVES.search(ln)
    ]


#: x86 instructions that move one lane between a vector register and a general one
ASM_LANE_MOVES = re.compile(
    r"^\s+(?:v?pextr[bwdq]|v?pinsr[bwdq]|v?extractps|v?insertps)\s"
    r"|^\s+v?mov[dq]\s+(?:%xmm\d+,\s*%[re]\w+|%[re]\w+,\s*%xmm\d+)"
)
#: a packed square root in a 256- or 512-bit register: the vector loop's math
ASM_PACKED_SQRT = re.compile(r"^\s+vsqrtps\s+[^\n]*%[yz]mm")


#: a packed rounding (floor) in a 256- or 512-bit register: the int8 encode's vector loop
ASM_PACKED_ROUND = re.compile(r"^\s+vround\w*ps\s+[^\n]*%[yz]mm|^\s+vrndscaleps\s+[^\n]*%[yz]mm")


def vector_loop(asm, marker=ASM_PACKED_SQRT):
    """The instructions of the vector loop in ``asm``: the shortest span from a label to a
    jump back to it that holds a packed square root (or another ``marker``; None when there
    is none)."""
    lines = asm.splitlines()
    labels = {}
    best = None
    for i, ln in enumerate(lines):
        m = re.match(r"^(\.LBB\w+):", ln)
        if m:
            labels[m.group(1)] = i
            continue
        m = re.match(r"^\s+j\w+\s+(\.LBB\w+)", ln)
        if m and m.group(1) in labels:
            span = [x for x in lines[labels[m.group(1)] + 1 : i + 1] if x.startswith("\t")]
            has_math = any(marker.search(x) for x in span)
            if has_math and (best is None or len(span) < len(best)):
                best = span
    return best


def assert_packed(what, body, asm):
    """The loop ``what`` (its IR ``body`` and the module's assembly ``asm``) is vectorised and
    no lane of it leaves the vector registers."""
    block = vector_body(body)
    assert block is not None and PACKED_SQRT["float"].search(block), f"{what}: not vectorised"
    assert not scalar_lines(block), f"scalar code in {what}: {scalar_lines(block)[:5]}"
    loop = vector_loop(asm)
    assert loop is not None, f"{what}: no packed 256- or 512-bit loop in the machine code"
    moves = [x.strip() for x in loop if ASM_LANE_MOVES.search(x)]
    assert not moves, f"lanes split in the machine code of {what}: {moves[:5]}"


def _encode_loop():
    """The int8 encode as the quantized loops run it (``numba_quant``: the arithmetic encode of
    the signed dynamic map over a block's row, its flags or-reduced), compiled afresh."""
    from fastopt.kernels import quant

    from fastopt.backends import numba_quant  # noqa: F401  (registers the codec)

    enc = quant.FAST_ENCODE["dynamic_signed"]

    @numba.njit(error_model="numpy")
    def encode_row(r, e, out):
        z = False
        for i in range(r.shape[0]):
            c, w = enc(r[i] * e, None, None, 0, 0, 0)
            out[i] = c
            z |= w
        return z

    encode_row(np.zeros(64, np.float32), np.float32(1), np.zeros(64, np.uint8))
    return encode_row


def _float8_loop():
    """The float8 codec as the quantized loops run it (``kernels.quant.CODECS``, lowered in
    32-bit lanes by ``numba_intrinsics``): a row of e4m3fn and one of e5m2 bytes decoded,
    scaled and encoded again, compiled afresh."""
    from fastopt.kernels import quant

    from fastopt.backends import numba_quant  # noqa: F401  (registers the codec)

    dec4, enc4 = quant.CODECS["float8_e4m3fn"]
    dec5, enc5 = quant.CODECS["float8_e5m2"]

    @numba.njit(error_model="numpy")
    def float8_rows(a, b, e):
        for i in range(a.shape[0]):
            a[i] = enc4(dec4(a[i], None) * e, None, None, 0, 0, 0)
            b[i] = enc5(dec5(b[i], None) * e, None, None, 0, 0, 0)

    float8_rows(np.zeros(64, np.uint8), np.zeros(64, np.uint8), np.float32(1))
    return float8_rows


def _int4_loop():
    """The int4 encode as the quantized loops run it (``kernels.quant.FAST_ENCODE``: fifteen
    comparisons) over a row of each 4-bit map, a code per element, compiled afresh."""
    from fastopt.kernels import quant

    from fastopt.backends import numba_quant  # noqa: F401  (registers the codec)

    es, eu = quant.FAST_ENCODE["dynamic4_signed"], quant.FAST_ENCODE["linear4_unsigned"]

    @numba.njit(error_model="numpy")
    def int4_rows(a, b, e, qa, qb):
        for i in range(a.shape[0]):
            qa[i] = es(a[i] * e, None, None, 0, 0, 0)[0]
            qb[i] = eu(b[i] * e, None, None, 0, 0, 0)[0]

    z, q = np.zeros(64, np.float32), np.zeros(64, np.uint8)
    int4_rows(z, z, np.float32(1), q, q)
    return int4_rows


def _compiled_loop(plan):
    """The serial Adam loop of ``plan``, compiled afresh (no disk cache) and called once."""
    if plan == "int8-encode":
        return _encode_loop()
    if plan == "float8-codec":
        return _float8_loop()
    if plan == "int4-encode":
        return _int4_loop()
    io, pairs = {
        "float32": (None, False),
        "float64": (None, False),
        "bfloat16": (IO(param="bfloat16", grad="bfloat16", state="bfloat16"), False),
        "bfloat16-words": (IO(param="bfloat16", grad="bfloat16", state="bfloat16"), True),
        "float16": (IO(param="float16", grad="float16", state="float16"), False),
        "bfloat16-fp32-state": (IO(param="bfloat16", grad="bfloat16", state="float32"), False),
        "bfloat16-remainder": (
            IO(param="bfloat16", grad="bfloat16", state="float32", master=True, remainder=True),
            False,
        ),
    }[plan]
    fn = numba.njit(error_model="numpy")(
        numba_backend.python_loop(RULES["adam"].make_rule(**ADAM), WRITES, False, io, pairs)
    )
    n = 64
    if io is None:
        dt = np.dtype(plan)
        a = [np.zeros(n, dt) for _ in range(4)]
        fn(*a, a[0], tuple(dt.type(1) for _ in range(9)))
    else:
        bits = np.uint32 if pairs else np.uint16
        state = np.float32 if io.state == "float32" else bits
        p, g = np.zeros(n, bits), np.zeros(n, bits)
        m, v = np.zeros(n, state), np.zeros(n, state)
        k = tuple(np.float32(1) for _ in range(9))
        x = (np.float32(1), np.int64(0), np.int64(0))
        master = np.zeros(n, np.int16) if io.remainder else p
        fn(p, g, m, v, p, k, x) if pairs else fn(p, g, m, v, p, master, k, x)
    return fn


def _loop_ir(plan, fn=None):
    """LLVM IR of the serial Adam loop of ``plan``: the loop function's body only."""
    fn = fn or _compiled_loop(plan)
    (ir,) = fn.inspect_llvm().values()
    body = re.search(
        r"^define [^\n]*@_ZN(?:7fastopt|16test_cpu_codegen)[^\n]*\n(.*?)^}", ir, re.M | re.S
    )
    assert body, "the loop function is not in the module"
    return body.group(1)


@pytest.mark.parametrize(
    "plan",
    [
        "float32",
        "bfloat16",
        "bfloat16-words",
        "float16",
        "bfloat16-fp32-state",
        "bfloat16-remainder",
    ],
)
def test_float32_math_loops_are_packed_and_hold_no_double(plan):
    fn = _compiled_loop(plan)
    body = _loop_ir(plan, fn)
    doubles = [ln.strip() for ln in body.splitlines() if DOUBLE.search(ln)]
    assert not doubles, f"float64 in the {plan} loop: {doubles[:5]}"
    assert PACKED_SQRT["float"].search(body), f"the {plan} loop did not vectorise"
    (asm,) = fn.inspect_asm().values()
    assert_packed(f"the {plan} loop", body, asm)


@pytest.mark.parametrize(
    "fmt",
    [
        pytest.param(f, marks=() if f == "int4" else (pytest.mark.exhaustive,))
        for f in ("int8", "float8_e4m3", "int4")
    ],
)
def test_quantized_fused_loop_is_packed(fmt, monkeypatch):
    """The quantized step's loop over a block (``numba_quant``: decode, Adam's math, the new
    absmax) vectorises: its IR holds a packed square root. A packed format's codes are
    unpacked into a row first for this: decoding ``byte[i >> 1]`` by the index's parity inside
    the loop kept it scalar (int4 runs by default, the byte formats under -m exhaustive)."""
    from fastopt.kernels import quant

    from fastopt import functional as F
    from fastopt import quant_reference as qr
    from fastopt.backends import numba_quant as nq

    spec = RULES["adam"]
    qslots = tuple(w and s.quantize for s, w in zip(spec.slots, WRITES))
    codecs = tuple(quant.table(fmt, s.quant_map).name for s in spec.slots)
    fn = numba.njit(error_model="numpy")(
        nq.python_quant_loop("adam", ADAM, WRITES, qslots, codecs, IO(quant=fmt), False)
    )
    monkeypatch.setattr(nq, "quant_kernel", lambda *a, **k: fn)  # compiled afresh: inspectable
    n = 300
    p = np.zeros(n, np.float32)
    state = {s.name: None for s in spec.slots}
    for s, w in zip(spec.slots, WRITES):
        if w:
            state[s.name] = qr.quantize(np.zeros(n, np.float32), fmt, s.quant_map)
    F.run(
        "adam", p, p.copy(), state, step=1, hp=dict(spec.defaults), backend="numba", state_dtype=fmt
    )
    assert fn.signatures, "the loop under inspection was not the one the step ran"
    (ir,) = fn.inspect_llvm().values()
    assert PACKED_SQRT["float"].search(ir), f"the {fmt} loop over a block did not vectorise"


#: what the child process reports of each loop it compiles for ``AVX2_CPU``
_AVX2_CHILD = """
import json, sys
sys.path.insert(0, {tests!r})
import test_cpu_codegen as t
out = {{}}
for plan in {plans!r}:
    fn = t._compiled_loop(plan)
    (asm,) = fn.inspect_asm().values()
    out[plan] = {{"body": t._loop_ir(plan, fn), "asm": asm}}
print(json.dumps(out))
"""


def avx2_build(plans, cpu=AVX2_CPU):
    """``{plan: {"body": loop IR, "asm": module assembly}}`` of the serial Adam loops of
    ``plans`` compiled for ``cpu`` with that CPU's own features (a child process: numba reads
    its target when it is imported)."""
    code = _AVX2_CHILD.format(tests=os.path.dirname(os.path.abspath(__file__)), plans=plans)
    env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES="")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.splitlines()[-1])


def assert_packed_encode(what, body, asm):
    """The encode loop ``what`` is vectorised (packed floor in the IR's vector body, nothing
    there on one lane) and its machine-code loop keeps every lane in vector registers."""
    block = vector_body(body)
    assert block is not None and re.search(r"@llvm\.floor\.v\d+f32", block), f"{what}: scalar"
    assert not scalar_lines(block), f"scalar code in {what}: {scalar_lines(block)[:5]}"
    loop = vector_loop(asm, ASM_PACKED_ROUND)
    assert loop is not None, f"{what}: no packed 256- or 512-bit loop in the machine code"
    moves = [x.strip() for x in loop if ASM_LANE_MOVES.search(x)]
    assert not moves, f"lanes split in the machine code of {what}: {moves[:5]}"


#: a packed float32 comparison in a 256- or 512-bit register: the int4 encode's vector loop
ASM_PACKED_CMP = re.compile(r"^\s+vcmp\w*ps\s+[^\n]*%[yz]mm")


def assert_packed_int4(what, body, asm):
    """The int4 encode loop ``what`` is vectorised (packed float32 comparisons in the IR's
    vector body, nothing there on one lane) and its machine-code loop keeps every lane in
    vector registers."""
    block = vector_body(body)
    assert block is not None and re.search(r"fcmp \w+ <\d+ x float>", block), f"{what}: scalar"
    assert not scalar_lines(block), f"scalar code in {what}: {scalar_lines(block)[:5]}"
    loop = vector_loop(asm, ASM_PACKED_CMP)
    assert loop is not None, f"{what}: no packed 256- or 512-bit loop in the machine code"
    moves = [x.strip() for x in loop if ASM_LANE_MOVES.search(x)]
    assert not moves, f"lanes split in the machine code of {what}: {moves[:5]}"


#: a packed int32 -> float32 conversion in a 256- or 512-bit register: the float8 decode's
#: subnormals, in the codec's vector loop
ASM_PACKED_CVT = re.compile(r"^\s+vcvtdq2ps\s+[^\n]*%[yz]mm")


def assert_packed_float8(what, body, asm):
    """The float8 codec loop ``what`` is vectorised in 32-bit lanes (no 64-bit integer vector,
    nothing on one lane) and its machine-code loop keeps every lane in vector registers."""
    block = vector_body(body)
    packed_cvt = block and re.search(r"[su]itofp [^\n]*<\d+ x i(?:8|16|32)>", block)
    assert packed_cvt, f"{what}: scalar"
    assert not scalar_lines(block), f"scalar code in {what}: {scalar_lines(block)[:5]}"
    wide = [ln.strip() for ln in block.splitlines() if re.search(r"x i64>", ln)]
    assert not wide, f"64-bit lanes in {what}: {wide[:5]}"
    loop = vector_loop(asm, ASM_PACKED_CVT)
    assert loop is not None, f"{what}: no packed 256- or 512-bit loop in the machine code"
    moves = [x.strip() for x in loop if ASM_LANE_MOVES.search(x)]
    assert not moves, f"lanes split in the machine code of {what}: {moves[:5]}"


def test_avx2_builds_of_the_16_bit_loops_are_packed():
    """Compiled for an AVX2 CPU (no AVX-512: no zmm register anywhere), the bfloat16 element
    and word loops and the float16 loop run 256-bit packed math and convert every lane in
    vector registers, in the IR and in the machine code. Without AVX-512's masked operations
    the NaN select of the bfloat16 rounding becomes a compare and a blend (``vcmpunordps``,
    ``vblendvps``), still packed. So does the int8 encode the quantized loops run
    (``kernels.quant.FAST_ENCODE``: no lookup, whose gathers AVX2 code would split into
    lanes), the float8 decode and encode, in eight 32-bit lanes (the bit arithmetic as
    numba types it, in int64, held four 64-bit lanes and an int64 conversion AVX2 lacks), and
    the int4 encode (fifteen packed comparisons, no lookup)."""
    plans = ["bfloat16", "bfloat16-words", "float16", "int8-encode", "float8-codec", "int4-encode"]
    checks = {
        "int8-encode": assert_packed_encode,
        "float8-codec": assert_packed_float8,
        "int4-encode": assert_packed_int4,
    }
    for plan, built in avx2_build(plans).items():
        assert "zmm" not in built["asm"], f"AVX-512 code in the AVX2 build of {plan}"
        check = checks.get(plan, assert_packed)
        check(f"the AVX2 build of the {plan} loop", built["body"], built["asm"])


def test_the_double_detector_sees_double():
    body = _loop_ir("float64")
    assert any(DOUBLE.search(ln) for ln in body.splitlines())
    assert PACKED_SQRT["double"].search(body)
