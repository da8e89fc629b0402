"""CPU backend: each rule from ``kernels/`` inlined into one Numba ``prange`` loop.

One compiled loop per (rule, flag variant, state slots written, parallel or serial), cached on
disk (``fastopt._numba_cache``) so a second process does not recompile. The loop is generated
for any number of state slots (``loop_source``); flags and the slots written are closure
constants, so each variant is branch-free; the host scalars arrive as one tuple in the buffer
dtype. Absent state slots are filled with the param array (read, never written).

Both loops vectorise (packed ``vmulps``/``vsqrtps``/``vdivps`` for float32; check with
``kernel(...).inspect_asm(sig)`` on a fresh ``NUMBA_CACHE_DIR``) and hold no float64 math in the
float32 variants. No ``fastmath``: results follow PyTorch's formulas operation by operation. The
parallel loop uses Numba's thread pool (``NUMBA_NUM_THREADS``, by default one thread per core).
"""

import numpy as np

from .._numba_cache import njit_cached
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


def loop_source(nslots, writes):
    """Python source of the loop factory for a rule with ``nslots`` state slots, of which the
    ones marked in ``writes`` are present (read and written back); an absent slot's argument is
    the param array, read as a placeholder the rule never uses and never written. One source
    per (slot count, present slots): rules of any arity share the generator."""
    slots = [f"s{j}" for j in range(nslots)]
    outs = ["pi"] + [f"o{j}" for j in range(nslots)]
    lines = [
        "def factory(elem, rng):",
        f"    def loop(p, g, {''.join(s + ', ' for s in slots)}k):",
        "        for i in rng(p.shape[0]):",
        f"            {', '.join(outs)}{',' if nslots == 0 else ''} = elem("
        f"p[i], g[i], {''.join(s + '[i], ' for s in slots)}k)",
        "            p[i] = pi",
    ]
    lines += [f"            {s}[i] = o{j}" for j, s in enumerate(slots) if writes[j]]
    lines += ["    return loop"]
    return "\n".join(lines) + "\n"


def python_loop(elem, writes, parallel):
    """The uncompiled loop of one variant: the generated source, with the rule and the range
    (``prange`` or ``range``) as closure cells, so that numba's disk cache tells variants apart
    by their cell contents (the flags live in the rule's own closure)."""
    ns = {"__name__": __name__}  # the cache resolves the function's module by this name
    exec(compile(loop_source(len(writes), writes), __file__, "exec"), ns)
    return ns["factory"](
        register_jitable(inline="always")(elem), numba.prange if parallel else range
    )


def kernel(rule, flags, writes, parallel):
    """The compiled loop for one variant (compiled, or loaded from the disk cache, once)."""
    key = (rule, tuple(sorted(flags.items())), writes, parallel)
    fn = _compiled.get(key)
    if fn is None:
        py = python_loop(RULES[rule].make_rule(**flags), writes, parallel)
        # error_model="numpy": x/0 gives inf/nan like NumPy and PyTorch instead of a per-element
        # ZeroDivisionError check, whose branch keeps LLVM from vectorising the serial loop
        # (prange bodies already compile this way). The cache lives per user, never in the
        # installed package (fastopt._numba_cache).
        fn = _compiled[key] = njit_cached(parallel=parallel, nogil=True, error_model="numpy")(py)
    return fn


# -- many tensors in one launch ---------------------------------------------------------------
#
# ``launch_many`` runs one variant over many separate tensors (a model's parameter list) in one
# parallel loop: a table holds, per tensor, its length and the addresses of its param, grad and
# state buffers; the loop walks chunks of (tensor, start, stop), so big and small tensors share
# the threads. The caller guarantees every address (validated, contiguous, native float buffers
# of that length, alive for the call): the table is built only by fastopt's own checked code.

#: elements per chunk of ``launch_many``: big enough to amortise the table lookups, small
#: enough to balance the threads over tensors of very different sizes
CHUNK = 1 << 14

if numba is not None:

    @intrinsic
    def _address_as(typingctx, address, like):
        # an int64 address as a typed pointer to ``like``'s element type
        if not isinstance(like, types.Array) or not isinstance(address, types.Integer):
            return None
        ptr = types.CPointer(like.dtype)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))

        return ptr(address, like), codegen


def many_source(nslots, writes):
    """Python source of the many-tensor loop factory (see ``loop_source``): the table's row of
    a tensor is ``(n, param address, grad address, slot addresses...)``."""
    # each chunk is viewed as arrays that start at 0, so the element loop runs over
    # range(m) like the one-tensor loop: no negative-index wraparound, and it vectorises
    lines = [
        "def factory(elem, rng):",
        "    def loop(table, chunks, like, k):",
        "        for c in rng(chunks.shape[0]):",
        "            j = chunks[c, 0]",
        "            off = chunks[c, 1] * like.itemsize",
        "            m = chunks[c, 2] - chunks[c, 1]",
        "            p = carray(address_as(table[j, 1] + off, like), m)",
        "            g = carray(address_as(table[j, 2] + off, like), m)",
    ]
    for j in range(nslots):
        lines.append(
            f"            s{j} = carray(address_as(table[j, {3 + j}] + off, like), m)"
            if writes[j]
            else f"            s{j} = p"
        )
    outs = ", ".join(["pi"] + [f"o{j}" for j in range(nslots)])
    lines += [
        "            for i in range(m):",
        f"                {outs}{',' if nslots == 0 else ''} = elem("
        f"p[i], g[i], {''.join(f's{j}[i], ' for j in range(nslots))}k)",
        "                p[i] = pi",
    ]
    lines += [f"                s{j}[i] = o{j}" for j in range(nslots) if writes[j]]
    lines += ["    return loop"]
    return "\n".join(lines) + "\n"


def many_kernel(rule, flags, writes, parallel):
    """The compiled many-tensor loop of one variant (compiled, or loaded from the cache, once)."""
    key = ("many", rule, tuple(sorted(flags.items())), writes, parallel)
    fn = _compiled.get(key)
    if fn is None:
        ns = {"__name__": __name__, "carray": numba.carray, "address_as": _address_as}
        exec(compile(many_source(len(writes), writes), __file__, "exec"), ns)
        py = ns["factory"](
            register_jitable(inline="always")(RULES[rule].make_rule(**flags)),
            numba.prange if parallel else range,
        )
        fn = _compiled[key] = njit_cached(parallel=parallel, nogil=True, error_model="numpy")(py)
    return fn


def chunks_for(lengths, chunk=CHUNK):
    """``(tensor, start, stop)`` rows covering every element of tensors of ``lengths``."""
    rows = [(t, lo, min(lo + chunk, n)) for t, n in enumerate(lengths) for lo in range(0, n, chunk)]
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def launch_many(rule, flags, writes, dtype, table, chunks, k):
    """One fused pass of one variant over every tensor of ``table`` (int64 rows ``(n, param,
    grad, slot...)`` of addresses; absent slots' columns are ignored) in ``chunks`` (from
    ``chunks_for``). Unchecked: the caller owns the table's validity (see above)."""
    if chunks.shape[0] == 0:
        return
    dtype = np.dtype(dtype)
    total = int(table[:, 0].sum())
    fn = many_kernel(rule, flags, tuple(writes), total >= PARALLEL_MIN)
    fn(table, chunks, np.empty(1, dtype), tuple(dtype.type(x) for x in k))


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
    prepare(rule, flags, tuple(s is not None for s in states), k, param.dtype)(param, grad, states)
