"""CPU backend: each rule from ``kernels/`` inlined into one Numba ``prange`` loop.

One compiled loop per (rule, flag variant, state slots written, parallel or serial), cached on
disk (``cache=True``) so a second process does not recompile. Flags and the slots written are
closure constants, so each variant is branch-free; the host scalars arrive as one tuple in the
buffer dtype. Absent state slots are filled with the param array (read, never written).

Both loops vectorise (packed ``vmulps``/``vsqrtps``/``vdivps`` for float32; check with
``kernel(...).inspect_asm(sig)`` on a fresh ``NUMBA_CACHE_DIR``) and hold no float64 math in the
float32 variants. No ``fastmath``: results follow PyTorch's formulas operation by operation. The
parallel loop uses Numba's thread pool (``NUMBA_NUM_THREADS``, by default one thread per core).
"""
import numpy as np

from ..kernels import RULES
from ..kernels.fma import fma

NAME = "numba"
DEVICE = "cpu"

#: below this many elements a serial loop beats waking the thread pool (measured on 2 cores:
#: the two break even near 2**14 elements for Adam and 2**15 for SGD with momentum)
PARALLEL_MIN = 1 << 15

try:
    import numba
    from numba.core import types
    from numba.extending import intrinsic, overload, register_jitable
except ImportError as _exc:  # numba is a core dependency; this only guards a broken install
    numba = None
    _import_error = _exc
else:
    @intrinsic
    def _llvm_fma(typingctx, a, b, c):
        if isinstance(a, types.Float) and a == b == c:
            def codegen(context, builder, sig, args):
                return builder.fma(*args)

            return a(a, b, c), codegen
        return None

    @overload(fma, target="cpu", inline="always")
    def _fma_cpu(a, b, c):
        # the rules' fused multiply-add (kernels/fma.py): llvm.fma, one rounding
        if isinstance(a, types.Float) and a == b == c:
            return lambda a, b, c: _llvm_fma(a, b, c)
        return None

_compiled = {}


def available():
    return numba is not None


def why_unavailable():
    return "" if numba is not None else f"numba cannot be imported: {_import_error}"


def _loop1(rule, parallel):
    elem = register_jitable(inline="always")(rule)
    rng = numba.prange if parallel else range

    def loop1(p, g, s0, k):
        for i in rng(p.shape[0]):
            p[i], s0[i] = elem(p[i], g[i], s0[i], k)

    return loop1


def _loop3(rule, parallel, w0, w1, w2):
    elem = register_jitable(inline="always")(rule)
    rng = numba.prange if parallel else range

    def loop3(p, g, s0, s1, s2, k):
        for i in rng(p.shape[0]):
            pi, a, b, c = elem(p[i], g[i], s0[i], s1[i], s2[i], k)
            p[i] = pi
            if w0:
                s0[i] = a
            if w1:
                s1[i] = b
            if w2:
                s2[i] = c

    return loop3


def _loop1_nostate(rule, parallel):
    # SGD without momentum: the single slot is a placeholder and is never written
    elem = register_jitable(inline="always")(rule)
    rng = numba.prange if parallel else range

    def loop1_nostate(p, g, s0, k):
        for i in rng(p.shape[0]):
            p[i] = elem(p[i], g[i], s0[i], k)[0]

    return loop1_nostate


def kernel(rule, flags, writes, parallel):
    """The compiled loop for one variant (compiled, or loaded from the disk cache, once)."""
    key = (rule, tuple(sorted(flags.items())), writes, parallel)
    fn = _compiled.get(key)
    if fn is None:
        elem = RULES[rule].make_rule(**flags)
        if len(writes) == 3:
            py = _loop3(elem, parallel, *writes)
        elif writes[0]:
            py = _loop1(elem, parallel)
        else:
            py = _loop1_nostate(elem, parallel)
        # error_model="numpy": x/0 gives inf/nan like NumPy and PyTorch instead of a per-element
        # ZeroDivisionError check, whose branch keeps LLVM from vectorising the serial loop
        # (prange bodies already compile this way).
        fn = _compiled[key] = numba.njit(parallel=parallel, cache=True, nogil=True,
                                         error_model="numpy")(py)
    return fn


def prepare(rule, flags, writes, k, dtype):
    """``run(param, grad, states)`` for one step of one variant on flat ``dtype`` arrays whose
    present state slots are ``writes``: the host scalars are cast once, the serial or parallel
    loop is picked per array by its length. Like ``launch``, it trusts its caller
    (``fastopt.functional`` and the optimizer classes check lengths, dtypes and writability
    before any launch): a loop indexes every array by the param's length."""
    kc = tuple(np.dtype(dtype).type(x) for x in k)
    fns = [None, None]

    def run(param, grad, states):
        n = param.shape[0]
        if n == 0:
            return
        par = n >= PARALLEL_MIN
        fn = fns[par]
        if fn is None:
            fn = fns[par] = kernel(rule, flags, writes, par)
        fn(param, grad, *[param if s is None else s for s in states], kc)

    return run


def launch(rule, flags, param, grad, states, k):
    """One fused pass over flat arrays, unchecked (see ``prepare``)."""
    prepare(rule, flags, tuple(s is not None for s in states), k, param.dtype)(param, grad,
                                                                             states)
