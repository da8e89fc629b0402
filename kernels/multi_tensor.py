"""Multi-tensor CUDA kernels: one launch steps every tensor of a param group, in place.

The tensors are described by a table in device memory, the model of which is the CPU
many-tensor launch (``numba_backend.launch_many_io``): int64 rows ``(n, param, grad, slot...,
master)``, each tensor's length and the addresses of its arrays (0 where a slot is absent; the
master column only with a master copy). The work is cut into chunks of ``chunk`` elements of
one tensor each (``chunk_size``: a power of two up to ``CHUNK``, chosen per table so that a
small table still spreads over every multiprocessor); a chunk table, built on the host once per
table (``chunk_table``), holds one uint64 per chunk, ``(tensor << 32) | chunk number``. Block
``b`` steps chunks ``b``, ``b + gridDim.x``, ... (one block per chunk where the grid allows,
so the hardware balances chunks of unequal work): one lookup per chunk, the chunk's elements
spread over the block's threads. (A prefix sum over the lengths with a binary search per block
would need no chunk table, but costs log2(tensors) dependent loads per chunk, and a block's
range would straddle tensors; the chunk table costs one load, and its 8 bytes per chunk are
nothing beside the chunk's data.)

Inside a chunk the element body is the single-tensor kernels' (``cuda_source.mixed_lane``: the
same storage format, loads, rule and rounded stores, the stochastic-rounding index counted from
the tensor's start, the loss scale and the found-inf flag read as ``mixed_prologue`` reads
them). A tensor whose used addresses are all 16-byte aligned is walked in 16-byte vectors
(``cuda_source.mixed_width`` elements) with a scalar tail at its end (chunks start at multiples
of the chunk size, a multiple of every vector width); any other tensor takes the scalar loop.
Lengths, chunk starts and addresses are 64-bit: a table may hold more than 2^31 elements, and
so may one tensor. The addresses come out of a table, so the compiler cannot tell they are
global memory: the loads and stores are generic ones (``ld.v4``, as in torch's
``multi_tensor_apply``, whose addresses come out of a kernel argument).

Clipping by the global gradient norm runs in the same pass: ``norm_source`` (per-block partial
sums of the squared, unscaled gradients, grid-stride over the chunks of one table) and
``finish_source`` (one block: the partials summed in a fixed order, so the norm is
deterministic, then torch's ``clip_grad_norm_`` coefficient) write ``[norm, clip_coef]`` into
device memory, and the update kernel built with ``clip=True`` multiplies every unscaled
gradient by ``clip_coef``::

    norm = sqrt(sum over every element of every table of (g / grad_scale)^2)
    clip_coef = min(reciprocal(norm + 1e-6) * max_norm, 1)      (NaN stays NaN, as torch.clamp)

which is ``torch.nn.utils.clip_grad_norm_``'s ``max_norm / (total_norm + 1e-6)`` clamped to 1
as torch evaluates it (``Tensor.__rtruediv__`` is a reciprocal and a product). A non-finite norm
gives a coefficient of 0 (inf) or NaN and the step goes on with the gradients it makes, as
torch's with ``error_if_nonfinite=False``; with a device found-inf flag set (GradScaler saw an
inf), the update kernel writes nothing.

Nothing here imports CuPy: the CPU harness and the compile checks build the same text.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from . import RULES, cuda_source
from .storage import ITEMSIZE

if TYPE_CHECKING:
    from .storage import IO

__all__ = [
    "CHUNK",
    "CHUNKS_PER_BLOCK",
    "MAX_TENSORS",
    "MIN_CHUNK",
    "arguments",
    "chunk_size",
    "chunk_table",
    "columns",
    "decode",
    "finish_name",
    "finish_source",
    "header",
    "kernel_name",
    "norm_name",
    "norm_source",
    "source",
]

#: the largest chunk (elements): large enough to amortise a chunk's lookup over 256 threads
CHUNK = 1 << 16
#: the smallest chunk a table is cut into: 8 elements per thread of a 256-thread block
MIN_CHUNK = 1 << 11
#: chunks per resident block that ``chunk_size`` aims for, so blocks finish close together
CHUNKS_PER_BLOCK = 4
#: tensors a table may hold (the tensor index is the entry's high 32 bits, read as signed)
MAX_TENSORS = 1 << 31
#: chunks a tensor may have (the chunk number is the entry's low 32 bits)
_MAX_CHUNKS = 1 << 32
#: C types of the accumulation dtypes of the norm
_ACC = {"float32": "float", "float64": "double"}


def columns(rule: str, master: bool) -> tuple[str, ...]:
    """The table's column names for ``rule``: ``n``, ``param``, ``grad``, every state slot of
    the rule (present or not), and ``master`` with a master copy."""
    return ("n", "param", "grad", *RULES[rule].state) + (("master",) if master else ())


def chunk_size(total: int, blocks: int) -> int:
    """The chunk size of a table of ``total`` elements on a device holding ``blocks`` resident
    blocks at once: the largest power of two in [``MIN_CHUNK``, ``CHUNK``] that still gives
    ``CHUNKS_PER_BLOCK`` chunks per resident block (tables of 2^20 elements get 2^11, tables
    of 2^28 elements ``CHUNK``)."""
    want = int(total) // max(1, CHUNKS_PER_BLOCK * int(blocks))
    size = MIN_CHUNK
    while size < CHUNK and size * 2 <= want:
        size *= 2
    return size


def chunk_table(lengths: npt.ArrayLike, chunk: int = CHUNK) -> npt.NDArray[np.uint64]:
    """The uint64 chunk entries ``(tensor << 32) | chunk number`` covering every element of
    tensors of ``lengths`` once, in tensor order (none for an empty tensor)."""
    _check_chunk(chunk)
    n = np.asarray(lengths, dtype=np.int64).reshape(-1)
    if n.size >= MAX_TENSORS:
        raise ValueError(f"{n.size} tensors: a table holds fewer than {MAX_TENSORS}")
    if n.size and n.min() < 0:
        raise ValueError(f"a negative length: {int(n.min())}")
    per = -(-n // chunk)
    if per.size and per.max() > _MAX_CHUNKS:
        raise ValueError(f"a tensor of {int(n.max())} elements: more than 2^32 chunks")
    t = np.repeat(np.arange(n.size, dtype=np.uint64), per)
    c = np.arange(t.size, dtype=np.int64) - np.repeat(np.cumsum(per) - per, per)
    return (t << np.uint64(32)) | c.astype(np.uint64)


def decode(
    entries: npt.ArrayLike, lengths: npt.ArrayLike, chunk: int = CHUNK
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """``(tensor, lo, hi)`` int64 arrays of chunk ``entries``: the host's reading of
    ``fastopt_mt_chunk`` (``kernels/multi_tensor.cuh``)."""
    e = np.asarray(entries, dtype=np.uint64)
    t = (e >> np.uint64(32)).astype(np.int64)
    lo = (e & np.uint64(0xFFFFFFFF)).astype(np.int64) * chunk
    n = np.asarray(lengths, dtype=np.int64)[t]
    return t, lo, np.minimum(lo + chunk, n)


def _check_chunk(chunk: object) -> None:
    if not (isinstance(chunk, int) and 8 <= chunk <= 1 << 30 and chunk % 8 == 0):
        raise ValueError(f"chunk={chunk!r}: expected a multiple of 8 in [8, 2^30]")


def header() -> str:
    """The text of ``kernels/multi_tensor.cuh`` (pasted into each multi-tensor kernel)."""
    return Path(__file__).with_name("multi_tensor.cuh").read_text()


def kernel_name(rule: str) -> str:
    """``fastopt_mt_<rule>``."""
    return f"fastopt_mt_{rule}"


def arguments(
    rule: str, flags: Mapping[str, bool], io: IO, clip: bool = False
) -> list[tuple[str, str]]:
    """``[(C type, name)]`` of the update kernel's arguments: the table, the chunk entries and
    their count, then ``cuda_source.mixed_args``' scalars (host scalars or ``kbuf``, the loss
    scale, ``found_inf``, ``salt`` and ``key`` or ``keyp``), then ``clip`` (the device
    ``[norm, clip_coef]``, in the compute dtype) when ``clip``."""
    _, scalars = cuda_source.mixed_args(rule, flags, io)
    out = [
        ("const long long *__restrict__", "table"),
        ("const unsigned long long *__restrict__", "chunks"),
        ("const long long", "nchunks"),
        ("const long long", "chunk"),
    ]
    out += list(scalars)
    if clip:
        out.append(("const C *__restrict__", "clip"))
    return out


def _row_pointers(arrays: Sequence[tuple[str, str, bool]], col: Mapping[str, int]) -> list[str]:
    """Unindented declarations of each array's chunk pointer from the row ``row_``."""
    out = []
    for a, k, w in arrays:
        t = cuda_source.STORAGE_CTYPES[k]
        t = t if w else f"const {t}"
        out.append(f"{t} *const {a} = fastopt_mt_ptr<{t}>(row_[{col[a]}], lo_);")
    return out


def source(
    rule: str, flags: Mapping[str, bool], io: IO, clip: bool = False, name: str | None = None
) -> str:
    """The complete CUDA C translation unit of the multi-tensor kernel of one variant under the
    storage format ``io`` (``kernels.storage.IO``), with the clip coefficient when ``clip``:
    the compute type ``C``, the flag ``#define``s, the rule's body, the storage conversions,
    ``multi_tensor.cuh`` and ``extern "C" __global__ void name(arguments(...))`` (default name
    ``fastopt_mt_<rule>``)."""
    arrays, _ = cuda_source.mixed_args(rule, flags, io)
    names = columns(rule, io.master)
    col = {c: j for j, c in enumerate(names)}
    width = cuda_source.mixed_width(io, rule, flags)
    factors = ("clip_",) if clip else ()

    def lane(ref: Callable[[str], str], index: str) -> list[str]:
        return cuda_source.mixed_lane(rule, flags, io, ref, index, factors)

    params = ", ".join(f"{t} {n}" for t, n in arguments(rule, flags, io, clip))
    addresses = " | ".join(f"row_[{col[a]}]" for a, _, _ in arrays)
    out = [f'extern "C" __global__ void {name or kernel_name(rule)}({params})', "{"]
    out += [f"    {ln}" for ln in cuda_source.mixed_prologue(rule, io)]
    if clip:
        out.append("    const C clip_ = clip[1];")
    out += [
        "    for (long long c_ = blockIdx.x; c_ < nchunks; c_ += gridDim.x) {",
        "        long long lo_, hi_;",
        f"        const long long *const row_ = fastopt_mt_chunk(table, {len(names)}, "
        "chunks[c_], chunk, &lo_, &hi_);",
        "        const int cnt_ = (int)(hi_ - lo_);",
    ]
    out += [f"        {ln}" for ln in _row_pointers(arrays, col)]
    out += [
        "        int tail_ = 0;",
        f"        if ((({addresses}) & 15) == 0) {{  // every array 16-byte aligned: vectors",
        f"            const int nv_ = cnt_ / {width};",
        "            for (int v = threadIdx.x; v < nv_; v += blockDim.x) {",
    ]
    out += [f"                {ln}" for ln in cuda_source.vector_loads(arrays, width, "v")]
    out += ["                FASTOPT_UNROLL"]
    out.append(f"                for (int l = 0; l < {width}; ++l) {{")
    out += [
        f"                    {ln}"
        for ln in lane(lambda a: f"{a}_v[l]", f"lo_ + (long long)v * {width} + l")
    ]
    out.append("                }")
    out += [f"                {ln}" for ln in cuda_source.vector_stores(arrays, width, "v")]
    out += ["            }", f"            tail_ = nv_ * {width};", "        }"]
    out.append("        for (int i = tail_ + threadIdx.x; i < cnt_; i += blockDim.x) {")
    out += [f"            {ln}" for ln in lane(lambda a: f"{a}[i]", "lo_ + i")]
    out += ["        }", "    }", "}"]
    head = f"typedef {'double' if io.compute == 'float64' else 'float'} C;\n"
    return "\n".join(
        [
            head + cuda_source.preamble(rule, flags),
            cuda_source.storage_source(),
            header(),
            "\n".join(out),
            "",
        ]
    )


# -- the global gradient norm ---------------------------------------------------------------------


def norm_name(grad: str, acc: str, scale: str | None) -> str:
    """The name of the partial-sum kernel of one gradient storage dtype, accumulation dtype and
    loss-scale form."""
    return f"fastopt_mt_sumsq_{grad}_{acc}_{scale or 'none'}"


def norm_source(
    grad: str, acc: str = "float32", scale: str | None = None, name: str | None = None
) -> str:
    """The CUDA C translation unit of the partial sums of the squared unscaled gradients of one
    table: ``name(table, width, chunks, nchunks, chunk, [inv_scale | gscale], partials)``, the
    table cut into chunks of ``chunk`` elements, writes the sum over the chunks block ``b``
    visits (``b``, ``b + gridDim.x``, ...) into ``partials[b]``. ``grad``: the gradients'
    storage dtype (the table's column 2, ``width`` int64 per row); ``acc``: the accumulation
    dtype ``C``, float32 or float64; ``scale``: None, "host" (``inv_scale``, 1/grad_scale) or
    "device" (``gscale``, a pointer to grad_scale).
    Each thread sums a chunk's squares apart and adds the chunk's sum to its total (two levels,
    less rounding than one running sum); the block then sums its threads in a fixed order."""
    if acc not in _ACC or grad not in ITEMSIZE or scale not in (None, "host", "device"):
        raise ValueError(f"norm_source({grad!r}, {acc!r}, {scale!r})")
    width = 16 // ITEMSIZE[grad]
    t = cuda_source.STORAGE_CTYPES[grad]
    ld = cuda_source._ld
    params = [
        "const long long *__restrict__ table",
        "const int width",
        "const unsigned long long *__restrict__ chunks",
        "const long long nchunks",
        "const long long chunk",
    ]
    if scale == "host":
        params.append("const C inv_scale")
    elif scale == "device":
        params.append("const float *__restrict__ gscale")
    params.append("C *__restrict__ partials")
    unscale = " * inv_scale_" if scale else ""
    out = [f'extern "C" __global__ void {name or norm_name(grad, acc, scale)}({", ".join(params)})']
    out.append("{")
    if scale == "device":
        out.append("    const C inv_scale_ = C(1) / (C)(*gscale);")
    elif scale == "host":
        out.append("    const C inv_scale_ = inv_scale;")
    out += [
        "    C acc_ = C(0);",
        "    for (long long c_ = blockIdx.x; c_ < nchunks; c_ += gridDim.x) {",
        "        long long lo_, hi_;",
        "        const long long *const row_ = "
        "fastopt_mt_chunk(table, width, chunks[c_], chunk, &lo_, &hi_);",
        "        const int cnt_ = (int)(hi_ - lo_);",
        f"        const {t} *const grad = fastopt_mt_ptr<const {t}>(row_[2], lo_);",
        "        C part_ = C(0);",
        "        int tail_ = 0;",
        "        if ((row_[2] & 15) == 0) {",
        f"            const int nv_ = cnt_ / {width};",
        "            for (int v = threadIdx.x; v < nv_; v += blockDim.x) {",
    ]
    out += [
        f"                {ln}"
        for ln in cuda_source.vector_loads([("grad", grad, False)], width, "v")
    ]
    out += [
        "                FASTOPT_UNROLL",
        f"                for (int l = 0; l < {width}; ++l) {{",
        f"                    const C x_ = {ld(grad, acc, 'grad_v[l]')}{unscale};",
        "                    part_ += x_ * x_;",
        "                }",
        "            }",
        f"            tail_ = nv_ * {width};",
        "        }",
        "        for (int i = tail_ + threadIdx.x; i < cnt_; i += blockDim.x) {",
        f"            const C x_ = {ld(grad, acc, 'grad[i]')}{unscale};",
        "            part_ += x_ * x_;",
        "        }",
        "        acc_ += part_;",
        "    }",
        "    acc_ = fastopt_mt_block_sum(acc_);",
        "    if (threadIdx.x == 0) {",
        "        partials[blockIdx.x] = acc_;",
        "    }",
        "}",
    ]
    return "\n".join(
        [f"typedef {_ACC[acc]} C;", cuda_source.storage_source(), header(), "\n".join(out), ""]
    )


def finish_name(acc: str) -> str:
    """The name of the one-block kernel that turns partial sums into ``[norm, clip_coef]``."""
    return f"fastopt_mt_norm_{acc}"


def finish_source(acc: str = "float32", name: str | None = None) -> str:
    """The CUDA C translation unit of ``name(partials, count, max_norm, out, out_f)``, launched
    as one block: the ``count`` partial sums added in a fixed order, then ``out[0] = norm``,
    ``out[1] = clip_coef`` in the accumulation dtype, and the same rounded to float32 into
    ``out_f`` (what the float32 update kernels of a launch whose norm is float64 read)."""
    if acc not in _ACC:
        raise ValueError(f"finish_source({acc!r})")
    eps = "1e-6f" if acc == "float32" else "1e-6"
    body = f"""extern "C" __global__ void {name or finish_name(acc)}(
    const C *__restrict__ partials, const long long count, const C max_norm,
    C *__restrict__ out, float *__restrict__ out_f)
{{
    C acc_ = C(0);
    for (long long i = threadIdx.x; i < count; i += blockDim.x) {{
        acc_ += partials[i];
    }}
    acc_ = fastopt_mt_block_sum(acc_);
    if (threadIdx.x == 0) {{
        const C norm = sqrt(acc_);
        // torch: clip_coef = max_norm / (total_norm + 1e-6), evaluated as
        // reciprocal(total_norm + 1e-6) * max_norm, then clamp(max=1): NaN stays NaN
        C coef = (C(1) / (norm + C({eps}))) * max_norm;
        coef = coef > C(1) ? C(1) : coef;
        out[0] = norm;
        out[1] = coef;
        out_f[0] = (float)norm;
        out_f[1] = (float)coef;
    }}
}}
"""
    return "\n".join([f"typedef {_ACC[acc]} C;", header(), body])
