"""What the numba CPU backend compiles: packed math, and no float64 in float32 or 16-bit loops.

The CPU counterpart of the CUDA compile checks (``test_cuda_compile.py``): a stray float64
literal or scalar would promote a whole float32 expression to double (slower, and no longer
torch's float32 arithmetic), and a loop LLVM could not vectorise would run several times slower.
Each loop here is compiled afresh (inspection needs a compile, not the disk cache) from the
same generated source the backend compiles, and its LLVM IR is read: the loop function itself,
not numba's Python wrapper (whose argument unboxing goes through double).
"""

import re

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


def _loop_ir(plan):
    """LLVM IR of the serial Adam loop of ``plan``: the loop function's body only."""
    io, pairs = {
        "float32": (None, False),
        "float64": (None, False),
        "bfloat16": (IO(param="bfloat16", grad="bfloat16", state="bfloat16"), False),
        "bfloat16-words": (IO(param="bfloat16", grad="bfloat16", state="bfloat16"), True),
        "float16": (IO(param="float16", grad="float16", state="float16"), False),
        "bfloat16-fp32-state": (IO(param="bfloat16", grad="bfloat16", state="float32"), False),
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
        fn(p, g, m, v, p, k, x) if pairs else fn(p, g, m, v, p, p, k, x)
    (ir,) = fn.inspect_llvm().values()
    body = re.search(r"^define [^\n]*@_ZN7fastopt[^\n]*\n(.*?)^}", ir, re.M | re.S)
    assert body, "the loop function is not in the module"
    return body.group(1)


@pytest.mark.parametrize(
    "plan", ["float32", "bfloat16", "bfloat16-words", "float16", "bfloat16-fp32-state"]
)
def test_float32_math_loops_are_packed_and_hold_no_double(plan):
    body = _loop_ir(plan)
    doubles = [ln.strip() for ln in body.splitlines() if DOUBLE.search(ln)]
    assert not doubles, f"float64 in the {plan} loop: {doubles[:5]}"
    assert PACKED_SQRT["float"].search(body), f"the {plan} loop did not vectorise"


def test_the_double_detector_sees_double():
    body = _loop_ir("float64")
    assert any(DOUBLE.search(ln) for ln in body.splitlines())
    assert PACKED_SQRT["double"].search(body)
