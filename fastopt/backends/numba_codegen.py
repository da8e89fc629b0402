"""Code generation of the CPU backend: the Python source of each loop, compiled by numba.

A loop is generated per (rule, flag variant, state slots written, parallel or serial, storage
format, word pairs) as Python source (``loop_source``, ``mixed_loop_source``,
``pair_loop_source``, and the many-tensor ``many_source``/``many_io_source``), executed into a
factory whose closure cells are the rule, the range (``prange`` or ``range``) and the storage
conversions (``numba_intrinsics``), and compiled once (``kernel``, ``many_kernel``,
``many_io_kernel``; on disk through ``fastopt._numba_cache``). ``numba_backend`` launches them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numba
from numba.extending import register_jitable

from .._numba_cache import njit_cached
from ..kernels import RULES, storage
from .numba_intrinsics import address_as, loader, master_cells, param_storer, storer

if TYPE_CHECKING:
    from ..kernels.storage import IO

_compiled: dict[Any, Any] = {}


#: the closure cells of a storage format's loops: its loads and stores (``io_cells``)
IO_CELLS = ("lp", "lg", "ls", "sp", "sg", "ss", "lm", "sm")
#: the closure cells of the word loops: a word's two halves and their join
PAIR_CELLS = ("lo", "hi", "join")


def _factory_source(
    cells: Sequence[str], args: Sequence[str], index: str, body: Sequence[str]
) -> str:
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


def loop_source(nslots: int, writes: Sequence[bool]) -> str:
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


def mixed_loop_source(nslots: int, writes: Sequence[bool], io: IO) -> str:
    """``loop_source`` for a launch with the storage format ``io`` (``kernels.storage.IO``): the
    loop takes ``(p, g, s0.., m, k, x)``, ``m`` the fp32 master or a remainder's int16 array (the
    param array when there is none), ``x = (1/grad_scale, salt, step key)``; each array is loaded
    into a compute-dtype local once and stored once through the factory's conversions
    (``lp``/``lg``/``ls`` load, ``sp``/``sg``/``ss`` store, ``lm``/``sm`` a remainder's join and
    split: closure cells, so the disk cache tells storage formats apart).
    Absent slots are placeholders holding the param's value, never read or written."""
    slots = [f"s{j}" for j in range(nslots)]
    body = storage.element_source(nslots, writes, io, "x[0]", "x[2]", 0)
    return _factory_source(IO_CELLS, ["p", "g", *slots, "m", "k", "x"], "i", body)


def pairs_fit(io: IO, writes: Sequence[bool]) -> bool:
    """Does the storage format ``io`` store every array the loop touches as bfloat16 (param,
    grad and the present state slots), with no master and no stochastic rounding? Then the loop
    may walk the arrays a 32-bit word (two elements) at a time (``pair_loop_source``)."""
    return (
        io.param == io.grad == "bfloat16"
        and (io.state == "bfloat16" or not any(writes))
        and not (io.master or io.sr)
    )


def pair_body(nslots: int, writes: Sequence[bool], io: IO, suffix: str = "") -> list[str]:
    """The body of one 32-bit word of an all-bfloat16 format (``pair_loop_source``), as source
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


def pair_loop_source(nslots: int, writes: Sequence[bool], io: IO) -> str:
    """``mixed_loop_source`` for an all-bfloat16 format (``pairs_fit``), a word at a time: the
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


def io_cells(io: IO) -> tuple[Callable[..., Any], ...]:
    """The jitable loads and stores of ``IO_CELLS`` for the storage format ``io``."""
    c = io.compute
    return (
        loader(io.param, c),
        loader(io.grad, c),
        loader(io.state, c),
        param_storer(io.param, c, io.sr, io.remainder),
        storer(io.grad, c),
        storer(io.state, c),
        *master_cells(io.remainder),
    )


def pair_cells() -> tuple[Callable[..., Any], ...]:
    """The jitable conversions of ``PAIR_CELLS``."""
    return storage.bf16_lo, storage.bf16_hi, storage.bf16_pair_store


def jitable_rule(elem: Callable[..., Any], pairs: bool) -> Callable[..., Any]:
    """The rule as the loops call it: a numba function of its own, which LLVM's inliner puts
    into the loop (the machine code is the same as numba's IR inlining gives:
    tests/test_cpu_codegen.py). Numba's IR inlining (``inline="always"``) would re-type the
    rule and every helper it calls at each call site of each loop, which took about a third of
    a loop's compile; a word loop calls the rule twice, where IR inlining also trips numba's SSA
    checks' warnings. ``pairs`` is kept for the callers' symmetry."""
    del pairs
    return register_jitable(elem)


def python_loop(
    elem: Callable[..., Any],
    writes: Sequence[bool],
    parallel: bool,
    io: IO | None = None,
    pairs: bool = False,
) -> Callable[..., Any]:
    """The uncompiled loop of one variant: the generated source, with the rule and the range
    (``prange`` or ``range``) as closure cells, so that numba's disk cache tells variants apart
    by their cell contents (the flags live in the rule's own closure)."""
    # the cache resolves the function's module by this name
    ns: dict[str, Any] = {"__name__": __name__}
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


def kernel(
    rule: str,
    flags: Mapping[str, bool],
    writes: tuple[bool, ...],
    parallel: bool,
    io: IO | None = None,
    pairs: bool = False,
) -> Any:
    """The compiled loop for one variant (compiled, or loaded from the disk cache, once);
    ``pairs``: the word-at-a-time loop of an all-bfloat16 format (``pair_loop_source``)."""
    if io is not None and io.plain:
        io = None
    if pairs and (io is None or not pairs_fit(io, writes)):
        raise ValueError(f"no word-pair loop for the storage format {io}")
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


def many_source(nslots: int, writes: Sequence[bool]) -> str:
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


def many_kernel(
    rule: str, flags: Mapping[str, bool], writes: tuple[bool, ...], parallel: bool
) -> Any:
    """The compiled many-tensor loop of one variant (compiled, or loaded from the cache, once)."""
    key = ("many", rule, tuple(sorted(flags.items())), writes, parallel)
    fn = _compiled.get(key)
    if fn is None:
        ns = {"__name__": __name__, "carray": numba.carray, "address_as": address_as}
        exec(compile(many_source(len(writes), writes), __file__, "exec"), ns)
        py = ns["factory"](
            register_jitable(RULES[rule].make_rule(**flags)),
            numba.prange if parallel else range,
        )
        fn = _compiled[key] = njit_cached(parallel=parallel, nogil=True, error_model="numpy")(py)
    return fn


def many_io_source(nslots: int, writes: Sequence[bool], io: IO, pairs: bool) -> str:
    """``many_source`` for a storage format ``io`` (``kernels.storage.IO``): the table's row of
    a tensor is ``(n, param, grad, slot..., master)`` (addresses; 0 where absent) and each
    array is read through a typed pointer of its storage dtype (``p_like``.. ``m_like``:
    1-element arrays of the dtypes the loop is compiled for); the per-element body is
    ``storage.element_source``'s (the index stochastic rounding hashes is the element's index
    in its tensor). With ``pairs`` (an all-bfloat16 format, every address 4-byte aligned) a chunk
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

    def view(col: int | str, like: str, size: str = "cnt", item: str | None = None) -> str:
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


def many_io_kernel(
    rule: str,
    flags: Mapping[str, bool],
    writes: tuple[bool, ...],
    io: IO,
    parallel: bool,
    pairs: bool,
) -> Any:
    """The compiled many-tensor loop of one variant and storage format (compiled, or loaded from
    the cache, once)."""
    key = ("many-io", rule, tuple(sorted(flags.items())), writes, io, parallel, pairs)
    fn = _compiled.get(key)
    if fn is None:
        ns = {"__name__": __name__, "carray": numba.carray, "address_as": address_as}
        exec(compile(many_io_source(len(writes), writes, io, pairs), __file__, "exec"), ns)
        py = ns["factory"](
            jitable_rule(RULES[rule].make_rule(**flags), pairs),
            numba.prange if parallel else range,
            *io_cells(io),
            *pair_cells(),
        )
        fn = _compiled[key] = njit_cached(parallel=parallel, nogil=True, error_model="numpy")(py)
    return fn
