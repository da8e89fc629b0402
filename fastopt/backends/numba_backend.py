"""CPU backend: each rule from ``kernels/`` inlined into one Numba ``prange`` loop.

One compiled loop per (rule, flag variant, state slots written, parallel or serial), cached on
disk (``fastopt._numba_cache``) so a second process does not recompile. The loop is generated
for any number of state slots (``loop_source``); flags and the slots written are closure
constants, so each variant is branch-free; the host scalars arrive as one tuple in the buffer
dtype. Absent state slots are filled with the param array (read, never written).

Mixed precision (``kernels.storage.IO``): for a launch whose arrays are not all stored in the
compute dtype, or that carries a master copy, stochastic rounding, a loss scale or a grad
write-back, ``loop_source`` generates the loads and stores per array: 16-bit arrays arrive as
``uint16`` views and are converted on their bits (``kernels/storage.py``, exact), float32/float64
arrays are cast; the rule itself sees compute-dtype scalars only. The extras arrive as one tuple
``x = (1/grad_scale, salt, step key)``. A plan that stores every array as bfloat16 (no master,
no stochastic rounding) walks 4-byte-aligned arrays a 32-bit word, two elements, at a time
(``pair_loop_source``): the same bits with fewer conversion instructions, which is what a
compute-bound bfloat16 step costs.

Both loops vectorise (packed ``vmulps``/``vsqrtps``/``vdivps`` for float32; check with
``kernel(...).inspect_asm(sig)`` on a fresh ``NUMBA_CACHE_DIR``) and hold no float64 math in the
float32 variants. No ``fastmath``: results follow PyTorch's formulas operation by operation. The
parallel loop uses Numba's thread pool (``NUMBA_NUM_THREADS``, by default one thread per core).
"""

import numpy as np

from .._numba_cache import njit_cached
from ..kernels import RULES, storage
from ..kernels.fma import fma
from ..kernels.spec import HELPERS
from ..kernels.storage import BITS16, bits_f32, f32_bits

NAME = "numba"
DEVICE = "cpu"

#: below this many elements a serial loop beats waking the thread pool (measured on 2 cores:
#: the two break even near 2**14 elements for Adam and 2**15 for SGD with momentum)
PARALLEL_MIN = 1 << 15


def _cpu_has(flag):
    """Does this CPU report ``flag`` (Linux /proc/cpuinfo; False where unknown)?"""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and flag in line.split() for line in f)
    except OSError:
        return False


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

    @intrinsic
    def _f32_to_bits(typingctx, x):
        if x == types.float32:

            def codegen(context, builder, sig, args):
                i32 = builder.bitcast(args[0], context.get_value_type(types.int32))
                return builder.zext(i32, context.get_value_type(types.int64))

            return types.int64(x), codegen
        return None

    @intrinsic
    def _bits_to_f32(typingctx, u):
        if isinstance(u, types.Integer):

            def codegen(context, builder, sig, args):
                v = context.cast(builder, args[0], sig.args[0], types.int64)
                i32 = builder.trunc(v, context.get_value_type(types.int32))
                return builder.bitcast(i32, context.get_value_type(types.float32))

            return types.float32(u), codegen
        return None

    @overload(f32_bits, target="cpu", inline="always")
    def _f32_bits_cpu(x):
        # kernels/storage.py's bit casts: no instruction, the register read as the other type
        if x == types.float32:
            return lambda x: _f32_to_bits(x)
        return None

    @overload(bits_f32, target="cpu", inline="always")
    def _bits_f32_cpu(u):
        if isinstance(u, types.Integer):
            return lambda u: _bits_to_f32(u)
        return None

    def _same(x):
        return x

    def _to_f32(x):
        return np.float32(x)

    def _to_f64(x):
        return np.float64(x)

    def _p_same(x, i, salt, key):
        return x

    def _p_f32(x, i, salt, key):
        return np.float32(x)

    def _p_bf16(x, i, salt, key):
        return storage.bf16_store(x)

    def _p_bf16_sr(x, i, salt, key):
        return storage.bf16_store_sr(x, storage.sr_bits(i, salt, key))

    def _p_f16(x, i, salt, key):
        return storage.f16_store(x)

    from llvmlite import ir as _ir

    _I16, _I32, _F32, _F16 = _ir.IntType(16), _ir.IntType(32), _ir.FloatType(), _ir.HalfType()

    @intrinsic
    def _bf16_load_ir(typingctx, h):
        # zero-extend, shift up 16, reinterpret: what storage.bf16_load computes, in 32 bits
        if isinstance(h, types.Integer) and h.bitwidth == 16:

            def codegen(context, builder, sig, args):
                u = builder.shl(builder.zext(args[0], _I32), _ir.Constant(_I32, 16))
                return builder.bitcast(u, _F32)

            return types.float32(h), codegen
        return None

    def _bf16_round_ir(builder, x):
        # storage.bf16_store's rounding left in place: the result's high 16 bits are the
        # bfloat16 (round half to even; a NaN gets its quiet bit, payload kept)
        u = builder.bitcast(x, _I32)
        nan = builder.fcmp_unordered("uno", x, x)
        lsb = builder.and_(builder.lshr(u, _ir.Constant(_I32, 16)), _ir.Constant(_I32, 1))
        up = builder.add(builder.add(u, _ir.Constant(_I32, 0x7FFF)), lsb)
        return builder.select(nan, builder.or_(u, _ir.Constant(_I32, 0x400000)), up)

    @intrinsic
    def _bf16_store_ir(typingctx, x):
        # storage.bf16_store in 32-bit lanes: round half to even on the bits, NaN made quiet
        if x == types.float32:

            def codegen(context, builder, sig, args):
                r = _bf16_round_ir(builder, args[0])
                return builder.trunc(builder.lshr(r, _ir.Constant(_I32, 16)), _I16)

            return types.uint16(x), codegen
        return None

    def _is32(w):
        return isinstance(w, types.Integer) and w.bitwidth == 32

    def _word_half(take):
        """An intrinsic ``uint32 word -> float32``: ``take(builder, word)``, then a bit cast."""

        @intrinsic
        def half_ir(typingctx, w):
            if _is32(w):

                def codegen(context, builder, sig, args):
                    return builder.bitcast(take(builder, args[0]), _F32)

                return types.float32(w), codegen
            return None

        return half_ir

    # storage.bf16_lo: the low half shifted up; storage.bf16_hi: the high half in place, the
    # low half cleared
    _bf16_lo_ir = _word_half(lambda b, w: b.shl(w, _ir.Constant(_I32, 16)))
    _bf16_hi_ir = _word_half(lambda b, w: b.and_(w, _ir.Constant(_I32, 0xFFFF0000)))

    @intrinsic
    def _bf16_pair_store_ir(typingctx, a, b):
        # storage.bf16_pair_store: both rounded in 32-bit lanes, the high halves joined
        if a == b == types.float32:

            def codegen(context, builder, sig, args):
                lo = builder.lshr(_bf16_round_ir(builder, args[0]), _ir.Constant(_I32, 16))
                hi = builder.and_(_bf16_round_ir(builder, args[1]), _ir.Constant(_I32, 0xFFFF0000))
                return builder.or_(lo, hi)

            return types.uint32(a, b), codegen
        return None

    @intrinsic
    def _f16_load_ir(typingctx, h):
        # the hardware conversion (F16C: vcvtph2ps), exact like storage.f16_load
        if isinstance(h, types.Integer) and h.bitwidth == 16:

            def codegen(context, builder, sig, args):
                return builder.fpext(builder.bitcast(args[0], _F16), _F32)

            return types.float32(h), codegen
        return None

    @intrinsic
    def _f16_store_ir(typingctx, x):
        # the hardware conversion (F16C: vcvtps2ph), round to nearest even like storage.f16_store
        if x == types.float32:

            def codegen(context, builder, sig, args):
                return builder.bitcast(builder.fptrunc(args[0], _F16), _I16)

            return types.uint16(x), codegen
        return None

    def _overload_with(fn, impl, arg_ok):
        @overload(fn, target="cpu", inline="always")
        def _ov(a):
            if arg_ok(a):
                return lambda a: impl(a)
            return None

    def _is16(a):
        return isinstance(a, types.Integer) and a.bitwidth == 16

    _overload_with(storage.bf16_load, _bf16_load_ir, _is16)
    _overload_with(storage.bf16_lo, _bf16_lo_ir, _is32)
    _overload_with(storage.bf16_hi, _bf16_hi_ir, _is32)

    @overload(storage.bf16_pair_store, target="cpu", inline="always")
    def _bf16_pair_store_cpu(a, b):
        if a == b == types.float32:
            return lambda a, b: _bf16_pair_store_ir(a, b)
        return None

    _overload_with(storage.bf16_store, _bf16_store_ir, lambda a: a == types.float32)
    #: x86 CPUs with F16C convert float16 in hardware (exactly, round to nearest even); others
    #: run kernels/storage.py's bit form
    F16C = _cpu_has("f16c")
    if F16C:
        _overload_with(storage.f16_load, _f16_load_ir, _is16)
        _overload_with(storage.f16_store, _f16_store_ir, lambda a: a == types.float32)
    for _f in (
        storage.bf16_store_sr,
        storage.mix32,
        storage.sr_bits,
        _same,
        _to_f32,
        _to_f64,
        _p_same,
        _p_f32,
        _p_bf16,
        _p_bf16_sr,
        _p_f16,
        *HELPERS,  # the rules' shared per-element pieces (kernels/shared.py)
    ):
        register_jitable(inline="always")(_f)
    if not F16C:
        register_jitable(inline="always")(storage.f16_load)
        register_jitable(inline="always")(storage.f16_store)

    def _loader(kind, compute):
        """The jitable load of one element of storage ``kind`` as a compute-dtype scalar."""
        if kind == compute:
            return _same
        return {
            "bfloat16": storage.bf16_load,
            "float16": storage.f16_load,
            "float32": _to_f32,
            "float64": _to_f64,
        }[kind if kind in BITS16 else compute]

    def _storer(kind, compute):
        if kind == compute:
            return _same
        return {"bfloat16": storage.bf16_store, "float16": storage.f16_store, "float32": _to_f32}[
            kind
        ]

    def _param_storer(kind, compute, sr):
        if kind == compute:
            return _p_same
        if sr:
            return _p_bf16_sr
        return {"bfloat16": _p_bf16, "float16": _p_f16, "float32": _p_f32}[kind]


_compiled = {}


def available():
    return numba is not None


def why_unavailable():
    return "" if numba is not None else f"numba cannot be imported: {_import_error}"


#: the closure cells of a storage plan's loops: its loads and stores (``io_cells``)
IO_CELLS = ("lp", "lg", "ls", "sp", "sg", "ss")
#: the closure cells of the word loops: a word's two halves and their join
PAIR_CELLS = ("lo", "hi", "join")


def _factory_source(cells, args, index, body):
    """Python source of ``factory(elem, rng, *cells)`` returning ``loop(*args)``, whose loop
    runs ``index`` over ``rng(p.shape[0])`` through the ``body`` lines: the frame every
    one-array loop generator below fills."""
    lines = [
        f"def factory(elem, rng{''.join(', ' + c for c in cells)}):",
        f"    def loop({', '.join(args)}):",
        f"        for {index} in rng(p.shape[0]):",
        *("            " + b for b in body),
        "    return loop",
    ]
    return "\n".join(lines) + "\n"


def loop_source(nslots, writes):
    """Python source of the loop factory for a rule with ``nslots`` state slots, of which the
    ones marked in ``writes`` are present (read and written back); an absent slot's argument is
    the param array, read as a placeholder the rule never uses and never written. One source
    per (slot count, present slots): rules of any arity share the generator."""
    slots = [f"s{j}" for j in range(nslots)]
    outs = ["pi"] + [f"o{j}" for j in range(nslots)]
    body = [
        f"{', '.join(outs)}{',' if nslots == 0 else ''} = elem("
        f"p[i], g[i], {''.join(s + '[i], ' for s in slots)}k)",
        "p[i] = pi",
    ]
    body += [f"{s}[i] = o{j}" for j, s in enumerate(slots) if writes[j]]
    return _factory_source((), ["p", "g", *slots, "k"], "i", body)


def mixed_loop_source(nslots, writes, io):
    """``loop_source`` for a launch with the storage plan ``io`` (``kernels.storage.IO``): the
    loop takes ``(p, g, s0.., m, k, x)``, ``m`` the fp32 master (the param array when there is
    none), ``x = (1/grad_scale, salt, step key)``; each array is loaded into a compute-dtype
    local once and stored once through the factory's conversions (``lp``/``lg``/``ls`` load,
    ``sp``/``sg``/``ss`` store: closure cells, so the disk cache tells storage plans apart).
    Absent slots are placeholders holding the param's value, never read or written."""
    slots = [f"s{j}" for j in range(nslots)]
    body = storage.element_source(nslots, writes, io, "x[0]", "x[2]", 0)
    return _factory_source(IO_CELLS, ["p", "g", *slots, "m", "k", "x"], "i", body)


def pairs_fit(io, writes):
    """Does the plan ``io`` store every array the loop touches as bfloat16 (param, grad and the
    present state slots), with no master and no stochastic rounding? Then the loop may walk the
    arrays a 32-bit word (two elements) at a time (``pair_loop_source``)."""
    return (
        io.param == io.grad == "bfloat16"
        and (io.state == "bfloat16" or not any(writes))
        and not (io.master or io.sr)
    )


def pair_body(nslots, writes, io, suffix=""):
    """The body of one 32-bit word of an all-bfloat16 plan (``pair_loop_source``), as source
    lines: word ``w`` of the uint32 arrays ``p{suffix}``, ``g{suffix}``, ``s0{suffix}``.. split
    into its two elements (``lo``/``hi``), the rule (``elem``) run on each, the results joined
    (``join``)."""
    slots = [f"s{j}{suffix}" for j in range(nslots)]
    p, g = f"p{suffix}", f"g{suffix}"
    body = []
    for h, half in (("0", "lo"), ("1", "hi")):
        body += [
            f"pv{h} = {half}({p}[w])",
            f"gv{h} = {half}({g}[w]){' * x[0]' if io.scale else ''}",
        ]
        body += [
            f"a{j}{h} = {half}({s}[w])" if wr else f"a{j}{h} = pv{h}"
            for j, (s, wr) in enumerate(zip(slots, writes))
        ]
        outs = ", ".join([f"pi{h}"] + [f"o{j}{h}" for j in range(nslots)])
        body.append(
            f"{outs}{',' if nslots == 0 else ''} = elem("
            f"pv{h}, gv{h}, {''.join(f'a{j}{h}, ' for j in range(nslots))}k)"
        )
    if io.write_grad:
        body.append(f"{g}[w] = join(gv0, gv1)")
    body.append(f"{p}[w] = join(pi0, pi1)")
    body += [f"{s}[w] = join(o{j}0, o{j}1)" for j, s in enumerate(slots) if writes[j]]
    return body


def pair_loop_source(nslots, writes, io):
    """``mixed_loop_source`` for an all-bfloat16 plan (``pairs_fit``), a word at a time: the
    loop takes the arrays as ``uint32`` views (``(p, g, s0.., k, x)``; no master), splits each
    word into its two elements (``lo``/``hi``: a shift and a mask, no shuffle), runs the rule on
    each and joins the two rounded results (``join``: ``storage.bf16_pair_store``). The
    element-at-a-time loop widens each 16-bit element into a 32-bit lane and narrows it back;
    here a vector of words is two vectors of elements in place, which takes about a quarter of
    the conversions' instructions off a compute-bound step. Results are bit for bit the
    element loop's (the index ``i`` is used by stochastic rounding only, which is excluded)."""
    slots = [f"s{j}" for j in range(nslots)]
    body = pair_body(nslots, writes, io)
    return _factory_source(PAIR_CELLS, ["p", "g", *slots, "k", "x"], "w", body)


def io_cells(io):
    """The jitable loads and stores of ``IO_CELLS`` for the storage plan ``io``."""
    c = io.compute
    return (
        _loader(io.param, c),
        _loader(io.grad, c),
        _loader(io.state, c),
        _param_storer(io.param, c, io.sr),
        _storer(io.grad, c),
        _storer(io.state, c),
    )


def pair_cells():
    """The jitable conversions of ``PAIR_CELLS``."""
    return storage.bf16_lo, storage.bf16_hi, storage.bf16_pair_store


def jitable_rule(elem, pairs):
    """The rule as the loops call it: inlined by numba, or, in a word loop (which calls it
    more than once), left to LLVM's inliner: numba's IR inlining of a rule twice into one
    function trips its SSA checks' warnings, and the loop vectorises the same."""
    return register_jitable(elem) if pairs else register_jitable(inline="always")(elem)


def python_loop(elem, writes, parallel, io=None, pairs=False):
    """The uncompiled loop of one variant: the generated source, with the rule and the range
    (``prange`` or ``range``) as closure cells, so that numba's disk cache tells variants apart
    by their cell contents (the flags live in the rule's own closure)."""
    ns = {"__name__": __name__}  # the cache resolves the function's module by this name
    rng = numba.prange if parallel else range
    elem = jitable_rule(elem, pairs)
    if pairs:
        exec(compile(pair_loop_source(len(writes), writes, io), __file__, "exec"), ns)
        return ns["factory"](elem, rng, *pair_cells())
    if io is None or io.plain:
        exec(compile(loop_source(len(writes), writes), __file__, "exec"), ns)
        return ns["factory"](elem, rng)
    exec(compile(mixed_loop_source(len(writes), writes, io), __file__, "exec"), ns)
    return ns["factory"](elem, rng, *io_cells(io))


def kernel(rule, flags, writes, parallel, io=None, pairs=False):
    """The compiled loop for one variant (compiled, or loaded from the disk cache, once);
    ``pairs``: the word-at-a-time loop of an all-bfloat16 plan (``pair_loop_source``)."""
    if io is not None and io.plain:
        io = None
    if pairs and (io is None or not pairs_fit(io, writes)):
        raise ValueError(f"no word-pair loop for the storage plan {io}")
    key = (rule, tuple(sorted(flags.items())), writes, parallel, io, pairs)
    fn = _compiled.get(key)
    if fn is None:
        py = python_loop(RULES[rule].make_rule(**flags), writes, parallel, io, pairs)
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
# the threads. ``launch_many_io`` does the same for a storage plan (16-bit storage, master
# copies, a loss scale), each array read in its own storage dtype. The caller guarantees every
# address (validated, contiguous, native buffers of that length and of the dtypes the plan says,
# alive for the call): the table is built only by fastopt's own checked code.

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


def _scalars_at(addresses, like, value, add):
    for i in range(addresses.shape[0]):
        x = numba.carray(_address_as(addresses[i], like), 1)
        x[0] = x[0] + value if add else value


def _at(addresses, value, add):
    fn = _compiled.get("scalars_at")
    if fn is None:
        fn = _compiled["scalars_at"] = njit_cached(nogil=True)(_scalars_at)
    fn(addresses, np.empty(1, np.float32), np.float32(value), add)


def add_at(addresses, value):
    """``x += value`` for the float32 scalar at each int64 address of ``addresses``: the 0-d
    step counts of a many-tensor step (``fastopt.torch``), in one call instead of one torch op
    per tensor. Unchecked, like ``launch_many``: the caller guarantees float32 scalars, alive."""
    _at(addresses, value, True)


def fill_at(addresses, value):
    """``x = value`` for the float32 scalar at each int64 address of ``addresses`` (a
    many-tensor step's host state, ``fastopt.torch``); unchecked, like ``add_at``."""
    _at(addresses, value, False)


def chunks_for(lengths, chunk=CHUNK):
    """``(tensor, start, stop)`` rows covering every element of tensors of ``lengths``."""
    n = np.asarray(lengths, dtype=np.int64).reshape(-1)
    per = -(-n // chunk)  # chunks of each tensor (none for an empty one)
    t = np.repeat(np.arange(n.size, dtype=np.int64), per)
    lo = (np.arange(t.size, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)) * chunk
    return np.stack([t, lo, np.minimum(lo + chunk, n[t])], axis=1).reshape(-1, 3)


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


def many_io_source(nslots, writes, io, pairs):
    """``many_source`` for a storage plan ``io`` (``kernels.storage.IO``): the table's row of
    a tensor is ``(n, param, grad, slot..., master)`` (addresses; 0 where absent) and each
    array is read through a typed pointer of its storage dtype (``p_like``.. ``m_like``:
    1-element arrays of the dtypes the loop is compiled for); the per-element body is
    ``storage.element_source``'s (the index stochastic rounding hashes is the element's index
    in its tensor). With ``pairs`` (an all-bfloat16 plan, every address 4-byte aligned) a chunk
    walks 32-bit words like ``pair_loop_source`` and its odd last element, if any, goes
    through the element body."""
    lines = [
        f"def factory(elem, rng, {', '.join(IO_CELLS + PAIR_CELLS)}):",
        "    def loop(table, chunks, k, x, p_like, g_like, s_like, m_like, w_like):",
        "        for c in rng(chunks.shape[0]):",
        "            j = chunks[c, 0]",
        "            base = chunks[c, 1]",
        "            cnt = chunks[c, 2] - base",
    ]

    def view(col, like, size="cnt", item=None):
        item = item or f"{like}.itemsize"
        return f"carray(address_as(table[j, {col}] + base * {item}, {like}), {size})"

    lines += [f"            p = {view(1, 'p_like')}", f"            g = {view(2, 'g_like')}"]
    lines += [
        f"            s{j} = {view(3 + j, 's_like')}" if writes[j] else f"            s{j} = p"
        for j in range(nslots)
    ]
    lines.append("            m = " + (view(3 + nslots, "m_like") if io.master else "p"))
    if pairs:
        # the chunk's words (chunks start at multiples of CHUNK, an even number of elements)
        lines.append("            half = cnt // 2")
        lines += [
            f"            pw = {view(1, 'w_like', 'half', '2')}",
            f"            gw = {view(2, 'w_like', 'half', '2')}",
        ]
        lines += [
            f"            s{j}w = {view(3 + j, 'w_like', 'half', '2')}"
            if writes[j]
            else f"            s{j}w = pw"
            for j in range(nslots)
        ]
        lines.append("            for w in range(half):")
        lines += ["                " + b for b in pair_body(nslots, writes, io, "w")]
        lines.append("            for i in range(2 * half, cnt):")
    else:
        lines.append("            for i in range(cnt):")
    lines += storage.element_source(nslots, writes, io, "x[0]", "x[2]", 16, index="base + i")
    lines.append("    return loop")
    return "\n".join(lines) + "\n"


def many_io_kernel(rule, flags, writes, io, parallel, pairs):
    """The compiled many-tensor loop of one variant and storage plan (compiled, or loaded from
    the cache, once)."""
    key = ("many-io", rule, tuple(sorted(flags.items())), writes, io, parallel, pairs)
    fn = _compiled.get(key)
    if fn is None:
        ns = {"__name__": __name__, "carray": numba.carray, "address_as": _address_as}
        exec(compile(many_io_source(len(writes), writes, io, pairs), __file__, "exec"), ns)
        py = ns["factory"](
            jitable_rule(RULES[rule].make_rule(**flags), pairs),
            numba.prange if parallel else range,
            *io_cells(io),
            *pair_cells(),
        )
        fn = _compiled[key] = njit_cached(parallel=parallel, nogil=True, error_model="numpy")(py)
    return fn


def _like(kind):
    """A 1-element array of the dtype a loop reads storage ``kind`` as (16-bit: uint16)."""
    return np.empty(1, np.uint16 if kind in BITS16 else np.dtype(kind))


def launch_many_io(rule, flags, writes, io, table, chunks, k, inv_scale=1.0, key=0, salt=0):
    """``launch_many`` with the storage plan ``io``: one fused pass over every tensor of
    ``table`` (int64 rows ``(n, param, grad, slot..., master)`` of addresses, 0 where absent)
    in ``chunks``; ``inv_scale`` is 1/grad_scale, ``key`` the step key and ``salt`` the salt
    of stochastic rounding (one for every tensor). All-bfloat16 plans walk 32-bit words when
    every address is 4-byte aligned. Unchecked, like ``launch_many``."""
    if chunks.shape[0] == 0:
        return
    writes = tuple(writes)
    total = int(table[:, 0].sum())
    pairs = pairs_fit(io, writes) and not (table[:, 1:] & 3).any()
    fn = many_io_kernel(rule, flags, writes, io, total >= PARALLEL_MIN, pairs)
    ct = np.dtype(io.compute).type
    fn(
        table,
        chunks,
        tuple(ct(v) for v in k),
        (ct(inv_scale), np.int64(salt), np.int64(key)),
        _like(io.param),
        _like(io.grad),
        _like(io.state),
        _like("float32"),
        np.empty(1, np.uint32),
    )


def prepare(rule, flags, writes, k, dtype, io=None, extras=None):
    """``run(param, grad, states)`` for one step of one variant on flat ``dtype`` arrays whose
    present state slots are ``writes``: the host scalars are cast once, the serial or parallel
    loop is picked per array by its length. Like ``launch``, it trusts its caller
    (``fastopt.functional`` and the optimizer classes check lengths, dtypes and writability
    before any launch): a loop indexes every array by the param's length.

    With a storage plan ``io`` that is not plain, ``run(param, grad, states, master=None,
    salt=0)`` takes the arrays in their storage dtypes (16-bit ones are viewed as uint16 here)
    and ``extras`` is ``(1/grad_scale, step key)`` of this step (host values)."""
    if io is not None and not io.plain:
        return _prepare_mixed(rule, flags, writes, k, io, extras)
    kc = tuple(np.dtype(dtype).type(x) for x in k)
    fns = [None, None]

    def run(param, grad, states, master=None, salt=0):
        n = param.shape[0]
        if n == 0:
            return
        par = n >= PARALLEL_MIN
        fn = fns[par]
        if fn is None:
            fn = fns[par] = kernel(rule, flags, writes, par)
        fn(param, grad, *[param if s is None else s for s in states], kc)

    return run


def _bits(a):
    """A 16-bit float array as the uint16 view the loops convert; others as they are."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _words(arrays, n):
    """The first ``n`` (even) elements of each 16-bit array as ``uint32`` words, or None when
    one of them does not start on a 4-byte boundary (the word loop's loads are aligned)."""
    out = []
    for a in arrays:
        w = a[:n].view(np.uint32)
        if not w.flags.aligned:
            return None
        out.append(w)
    return out


def _prepare_mixed(rule, flags, writes, k, io, extras):
    ct = np.dtype(io.compute).type
    kc = tuple(ct(x) for x in k)
    inv_scale, key = extras if extras is not None else (1.0, 0)
    fns = [None, None]
    pair_fns = [None, None] if pairs_fit(io, writes) else None

    def run(param, grad, states, master=None, salt=0):
        n = param.shape[0]
        if n == 0:
            return
        x = (ct(inv_scale), np.int64(salt), np.int64(key))
        if pair_fns is not None and n >= 2:
            h = n & ~1
            present = [s for s in states if s is not None]
            words = _words([param, grad, *present], h)
            if words is not None:
                par = h >= PARALLEL_MIN
                fn = pair_fns[par]
                if fn is None:
                    fn = pair_fns[par] = kernel(rule, flags, writes, par, io, pairs=True)
                it = iter(words[2:])
                fn(
                    words[0],
                    words[1],
                    *[words[0] if s is None else next(it) for s in states],
                    kc,
                    x,
                )
                if h == n:
                    return
                # an odd length leaves one element for the element loop (no index is used)
                param, grad = param[h:], grad[h:]
                states = [None if s is None else s[h:] for s in states]
                n = 1
        par = n >= PARALLEL_MIN
        fn = fns[par]
        if fn is None:
            fn = fns[par] = kernel(rule, flags, writes, par, io)
        p = _bits(param)
        fn(
            p,
            _bits(grad),
            *[p if s is None else _bits(s) for s in states],
            p if master is None else master,
            kc,
            x,
        )

    return run


def launch(rule, flags, param, grad, states, k):
    """One fused pass over flat arrays, unchecked (see ``prepare``)."""
    prepare(rule, flags, tuple(s is not None for s in states), k, param.dtype)(param, grad, states)
