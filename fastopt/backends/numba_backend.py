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
``x = (1/grad_scale, salt, step key)``. A storage format that stores every array as bfloat16 (no
master, no stochastic rounding) walks 4-byte-aligned arrays a 32-bit word, two elements, at a time
(``pair_loop_source``): the same bits with fewer conversion instructions, which is what a
compute-bound bfloat16 step costs.

Both loops vectorise (packed ``vmulps``/``vsqrtps``/``vdivps`` for float32; check with
``kernel(...).inspect_asm(sig)`` on a fresh ``NUMBA_CACHE_DIR``) and hold no float64 math in the
float32 variants. No ``fastmath``: results follow PyTorch's formulas operation by operation. The
parallel loop uses Numba's thread pool (``NUMBA_NUM_THREADS``, by default one thread per core).

The backend is three modules: ``numba_intrinsics`` (the LLVM lowerings), ``numba_codegen`` (the
loops' source and compilation) and this one (the launches: ``prepare``, ``launch``,
``launch_many``, ``launch_many_io``), which also re-exports the other two's public names.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from .._numba_cache import njit_cached
from ..kernels.storage import BITS16
from .numba_codegen import (  # noqa: F401  (re-exported: the backend's public names)
    IO_CELLS,
    PAIR_CELLS,
    _compiled,
    io_cells,
    jitable_rule,
    kernel,
    loop_source,
    many_io_kernel,
    many_io_source,
    many_kernel,
    many_source,
    mixed_loop_source,
    pair_body,
    pair_cells,
    pair_loop_source,
    pairs_fit,
    python_loop,
)
from .numba_intrinsics import (
    address_as,
)
from .protocol import Runner

if TYPE_CHECKING:
    from ..functional import StepPlan
    from ..kernels.storage import IO

NAME = "numba"
DEVICE = "cpu"
#: steps quantized state slots (``kernels/quant.py``, ``IO.quant``)
QUANT_STATE = True
#: and the packed ones (``kernels.quant.PACKED``: two codes per byte, ``numba_quant``)
QUANT_PACKED = True

#: below this many elements a serial loop beats waking the thread pool (measured on 2 cores:
#: the two break even near 2**14 elements for Adam and 2**15 for SGD with momentum)
PARALLEL_MIN = 1 << 15


def available() -> bool:
    return True  # numba is a core dependency (a broken install fails this module's import)


def why_unavailable() -> str:
    return ""


# -- many tensors in one launch ---------------------------------------------------------------
#
# ``launch_many`` runs one variant over many separate tensors (a model's parameter list) in one
# parallel loop: a table holds, per tensor, its length and the addresses of its param, grad and
# state buffers; the loop walks chunks of (tensor, start, stop), so big and small tensors share
# the threads. ``launch_many_io`` does the same for a storage format (16-bit storage, master
# copies, a loss scale), each array read in its own storage dtype. The caller guarantees every
# address (validated, contiguous, native buffers of that length and of the dtypes the storage
# format says, alive for the call): the table is built only by fastopt's own checked code.

#: elements per chunk of ``launch_many``: big enough to amortise the table lookups, small
#: enough to balance the threads over tensors of very different sizes
CHUNK = 1 << 14


def _scalars_at(addresses: Any, like: Any, value: Any, add: bool) -> None:
    for i in range(addresses.shape[0]):
        x = numba.carray(address_as(addresses[i], like), 1)
        x[0] = x[0] + value if add else value


def _at(addresses: np.ndarray, value: float, add: bool) -> None:
    fn = _compiled.get("scalars_at")
    if fn is None:
        fn = _compiled["scalars_at"] = njit_cached(nogil=True)(_scalars_at)
    fn(addresses, np.empty(1, np.float32), np.float32(value), add)


def add_at(addresses: np.ndarray, value: float) -> None:
    """``x += value`` for the float32 scalar at each int64 address of ``addresses``: the 0-d
    step counts of a many-tensor step (``fastopt.torch``), in one call instead of one torch op
    per tensor. Unchecked, like ``launch_many``: the caller guarantees float32 scalars, alive."""
    _at(addresses, value, True)


def fill_at(addresses: np.ndarray, value: float) -> None:
    """``x = value`` for the float32 scalar at each int64 address of ``addresses`` (a
    many-tensor step's host state, ``fastopt.torch``); unchecked, like ``add_at``."""
    _at(addresses, value, False)


def chunks_for(lengths: Any, chunk: int = CHUNK) -> np.ndarray:
    """``(tensor, start, stop)`` rows covering every element of tensors of ``lengths``."""
    n = np.asarray(lengths, dtype=np.int64).reshape(-1)
    per = -(-n // chunk)  # chunks of each tensor (none for an empty one)
    t = np.repeat(np.arange(n.size, dtype=np.int64), per)
    lo = (np.arange(t.size, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)) * chunk
    return np.stack([t, lo, np.minimum(lo + chunk, n[t])], axis=1).reshape(-1, 3)


def launch_many(
    rule: str,
    flags: Mapping[str, bool],
    writes: Sequence[bool],
    dtype: Any,
    table: np.ndarray,
    chunks: np.ndarray,
    k: Sequence[float],
) -> None:
    """One fused pass of one variant over every tensor of ``table`` (int64 rows ``(n, param,
    grad, slot...)`` of addresses; absent slots' columns are ignored) in ``chunks`` (from
    ``chunks_for``). Unchecked: the caller owns the table's validity (see above)."""
    if chunks.shape[0] == 0:
        return
    dtype = np.dtype(dtype)
    total = int(table[:, 0].sum())
    fn = many_kernel(rule, flags, tuple(writes), total >= PARALLEL_MIN)
    fn(table, chunks, np.empty(1, dtype), tuple(dtype.type(x) for x in k))


def _like(kind: str) -> np.ndarray:
    """A 1-element array of the dtype a loop reads storage ``kind`` as (16-bit: uint16)."""
    return np.empty(1, np.uint16 if kind in BITS16 else np.dtype(kind))


def launch_many_io(
    rule: str,
    flags: Mapping[str, bool],
    writes: Sequence[bool],
    io: IO,
    table: np.ndarray,
    chunks: np.ndarray,
    k: Sequence[float],
    inv_scale: float = 1.0,
    key: int = 0,
    salt: int = 0,
) -> None:
    """``launch_many`` with the storage format ``io``: one fused pass over every tensor of
    ``table`` (int64 rows ``(n, param, grad, slot..., master)`` of addresses, 0 where absent)
    in ``chunks``; ``inv_scale`` is 1/grad_scale, ``key`` the step key and ``salt`` the salt
    of stochastic rounding (one for every tensor). All-bfloat16 formats walk 32-bit words when
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
        _like(io.kind("master")),
        np.empty(1, np.uint32),
    )


def prepare(
    rule: str,
    flags: Mapping[str, bool],
    writes: tuple[bool, ...],
    k: Sequence[float],
    dtype: Any,
    io: IO | None = None,
    extras: tuple[Any, ...] | None = None,
) -> Runner:
    """``run(param, grad, states)`` for one step of one variant on flat ``dtype`` arrays whose
    present state slots are ``writes``: the host scalars are cast once, the serial or parallel
    loop is picked per array by its length. Like ``launch``, it trusts its caller
    (``fastopt.functional`` and the optimizer classes check lengths, dtypes and writability
    before any launch): a loop indexes every array by the param's length.

    With a storage format ``io`` that is not plain, ``run(param, grad, states, master=None,
    salt=0)`` takes the arrays in their storage dtypes (16-bit ones are viewed as uint16 here)
    and ``extras`` is ``(1/grad_scale, step key)`` of this step (host values)."""
    if io is not None and not io.plain:
        return _prepare_mixed(rule, flags, writes, k, io, extras)
    kc = tuple(np.dtype(dtype).type(x) for x in k)
    fns: list[Any] = [None, None]

    def run(
        param: Any, grad: Any, states: Sequence[Any], master: Any = None, salt: int = 0
    ) -> None:
        n = param.shape[0]
        if n == 0:
            return
        par = n >= PARALLEL_MIN
        fn = fns[par]
        if fn is None:
            fn = fns[par] = kernel(rule, flags, writes, par)
        fn(param, grad, *[param if s is None else s for s in states], kc)

    return run


def _bits(a: np.ndarray) -> np.ndarray:
    """A 16-bit float array as the uint16 view the loops convert; others as they are."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _words(arrays: Sequence[np.ndarray], n: int) -> list[np.ndarray] | None:
    """The first ``n`` (even) elements of each 16-bit array as ``uint32`` words, or None when
    one of them does not start on a 4-byte boundary (the word loop's loads are aligned)."""
    out = []
    for a in arrays:
        w = a[:n].view(np.uint32)
        if not w.flags.aligned:
            return None
        out.append(w)
    return out


def _prepare_mixed(
    rule: str,
    flags: Mapping[str, bool],
    writes: tuple[bool, ...],
    k: Sequence[float],
    io: IO,
    extras: tuple[Any, ...] | None,
) -> Runner:
    ct = np.dtype(io.compute).type
    kc = tuple(ct(x) for x in k)
    inv_scale, key = extras if extras is not None else (1.0, 0)
    fns: list[Any] = [None, None]
    pair_fns: list[Any] | None = [None, None] if pairs_fit(io, writes) else None

    def run(
        param: Any, grad: Any, states: Sequence[Any], master: Any = None, salt: int = 0
    ) -> None:
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


def launch(
    rule: str,
    flags: Mapping[str, bool],
    param: Any,
    grad: Any,
    states: Sequence[Any],
    k: Sequence[float],
) -> None:
    """One fused pass over flat arrays, unchecked (see ``prepare``)."""
    prepare(rule, flags, tuple(s is not None for s in states), k, param.dtype)(param, grad, states)


def step_runner(plan: StepPlan, dtype: Any, writes: tuple[bool, ...], io: IO | None) -> Runner:
    """The backend protocol's runner (``backends.protocol``): ``prepare`` for the plan's
    variant and scalars, with its loss-scale and rounding extras for a storage format ``io``."""
    if io is None:
        return prepare(plan.rule, plan.flags, writes, plan.k, dtype)
    if io.quant:
        from .numba_quant import prepare_quant

        return prepare_quant(
            plan.rule, plan.flags, writes, plan.k, io, extras=(plan.inv_scale, plan.key)
        )
    return prepare(
        plan.rule, plan.flags, writes, plan.k, dtype, io=io, extras=(plan.inv_scale, plan.key)
    )


#: (name, parallel) -> the compiled loop of a per-element function that is no spec rule
_element_loops: dict[Any, Any] = {}


def element_runner(
    name: str, make_elem: Callable[[], Callable[..., Any]], nslots: int
) -> Callable[..., None]:
    """``run(param, grad, states, k)`` for a per-element function that is no spec rule (the
    textbook's chapters: ``make_elem()`` gives ``elem(p, g, s0, .., k) -> (p, s0, ..)``) over
    flat arrays with all ``nslots`` slots present; ``k`` arrives typed as the caller wants
    it. The serial or parallel loop is picked by length; ``name`` keys the compiled loops.
    Unchecked, like ``prepare``."""

    def run(param: Any, grad: Any, states: Sequence[Any], k: Any) -> None:
        n = param.shape[0]
        if n == 0:
            return
        par = n >= PARALLEL_MIN
        fn = _element_loops.get((name, par))
        if fn is None:
            py = python_loop(make_elem(), (True,) * nslots, par)
            # error_model="numpy": x/0 is inf/nan as in NumPy (no exception)
            fn = _element_loops[(name, par)] = njit_cached(
                parallel=par, nogil=True, error_model="numpy"
            )(py)
        fn(param, grad, *states, k)

    return run
