"""What both GPU backends need around a launch, kept free of any GPU import (CPU-testable).

- ``blocks_per_sm``: how many blocks of a kernel fit on one multiprocessor at once, from its
  register count (the CUDA occupancy rules for sm_80/sm_90), so a grid-stride grid is exactly
  one full wave: a grid sized for 8 blocks per SM when only 5 fit leaves a tail wave that costs
  ~15-20 % of a memory-bound kernel.
- ``producer_stream``: the CUDA stream the producer of an array orders its work on, so a step
  launched on it runs after the work that wrote the gradient and before the work that reads the
  parameters next (PyTorch reports no stream through ``__cuda_array_interface__``: its current
  stream is asked instead).
- ``plain_view``: a tensor that requires grad as the plain tensor of the same memory (PyTorch's
  optimizers update parameters under ``no_grad``; the interchange protocols refuse them).
- ``TensorTable``: the host side of a multi-tensor launch (``kernels.multi_tensor``): the
  checked table of a list of tensors' lengths and addresses, its chunk entries, and the cheap
  re-checks a steady step makes (``describe`` reads one array of any producer).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..kernels.storage import IO

__all__ = [
    "LIMITS",
    "THREADS",
    "TensorTable",
    "blocks_per_sm",
    "describe",
    "grid_size",
    "plain_view",
    "producer_stream",
]

#: threads per block of every fastopt kernel: a multiple of the warp, 8 warps
THREADS = 256

#: per-multiprocessor limits of sm_80 and sm_90 (CUDA C Programming Guide, compute capabilities)
LIMITS = dict(
    regs_per_sm=65536,
    max_threads_per_sm=2048,
    max_blocks_per_sm=32,
    reg_alloc_unit=256,
    warp=32,
    max_regs_per_thread=255,
)


def blocks_per_sm(
    regs_per_thread: int,
    threads: int = THREADS,
    limits: Mapping[str, int] | None = None,
    shared_per_block: int = 0,
    shared_per_sm: int = 228 * 1024,
) -> int:
    """Resident blocks of ``threads`` threads per multiprocessor for a kernel that uses
    ``regs_per_thread`` registers (registers are allocated per warp in units of 256)."""
    lim = dict(LIMITS, **(limits or {}))
    if not 0 < regs_per_thread <= lim["max_regs_per_thread"]:
        raise ValueError(
            f"regs_per_thread={regs_per_thread}: expected 1..{lim['max_regs_per_thread']}"
        )
    if threads <= 0 or threads % lim["warp"]:
        raise ValueError(f"threads={threads}: expected a positive multiple of {lim['warp']}")
    unit = lim["reg_alloc_unit"]
    regs_per_warp = -(-regs_per_thread * lim["warp"] // unit) * unit
    warps_per_block = threads // lim["warp"]
    by_regs = (lim["regs_per_sm"] // regs_per_warp) // warps_per_block
    by_threads = lim["max_threads_per_sm"] // threads
    by_shared = shared_per_sm // shared_per_block if shared_per_block else lim["max_blocks_per_sm"]
    return min(by_regs, by_threads, by_shared, lim["max_blocks_per_sm"])


def grid_size(items: int, sms: int, per_sm: int, threads: int = THREADS) -> int:
    """Blocks for ``items`` work items (elements or vectors): one full wave of resident blocks
    (``sms * per_sm``), fewer when the work needs fewer; a grid-stride loop covers the rest."""
    return max(1, min(sms * per_sm, -(-int(items) // threads)))


def producer_stream(a: Any) -> int | None:
    """The stream handle (int) work on ``a`` must be ordered on, or None when the producer
    names none (then the default stream, which orders itself with every blocking stream).

    CuPy arrays: CuPy's current stream. PyTorch tensors: torch's current stream on the tensor's
    device. Others: the ``stream`` of ``__cuda_array_interface__`` v3 (1 and 2 are the legacy
    and per-thread default streams, valid handles as they are)."""
    mod = type(a).__module__
    if mod.startswith("cupy"):
        with a.device:  # the current stream of the array's device, not of the current one
            return sys.modules["cupy"].cuda.get_current_stream().ptr
    if mod.startswith("torch"):
        torch = sys.modules["torch"]
        return torch.cuda.current_stream(a.device).cuda_stream
    try:
        s = a.__cuda_array_interface__.get("stream")
    except Exception:
        return None
    return s if isinstance(s, int) and not isinstance(s, bool) and s > 0 else None


def plain_view(a: Any) -> Any:
    """``a.detach()`` for a tensor that requires grad (same memory, no copy), else ``a``."""
    if getattr(a, "requires_grad", False) and hasattr(a, "detach"):
        return a.detach()
    return a


# -- multi-tensor launches: the table of a list of tensors -----------------------------------------

#: torch dtypes a table holds, as storage kinds (``kernels.storage``)
_TORCH_KINDS = {
    "torch.float32": "float32",
    "torch.float64": "float64",
    "torch.float16": "float16",
    "torch.bfloat16": "bfloat16",
    "torch.int16": "int16",  # a master kept as a remainder (kernels/storage.py)
    "torch.uint8": "uint8",  # a quantized slot's codes (kernels/quant.py)
}
#: NumPy dtypes a table holds besides the float storage dtypes
_NUMPY_KINDS = {np.dtype(np.int16): "int16", np.dtype(np.uint8): "uint8"}


def describe(a: Any, what: str) -> tuple[str, int, int, tuple[str, int | None]]:
    """``(storage kind, elements, address, device)`` of one C-contiguous array: a PyTorch
    tensor, a CuPy or NumPy array, or any ``__cuda_array_interface__`` producer (its device
    ``("cuda", index)``, ``("cuda", None)`` where the producer names none, ``("host", None)``
    for NumPy). Raises ``TypeError``/``ValueError`` naming ``what`` for anything a multi-tensor
    kernel cannot address: another dtype, a strided view, an unknown producer."""
    from ..precision import kind as _precision_kind

    def _kind(dt: Any) -> str | None:
        return _NUMPY_KINDS.get(np.dtype(dt)) or _precision_kind(dt)

    mod = type(a).__module__
    if mod.startswith("torch") and hasattr(a, "data_ptr"):
        k = _TORCH_KINDS.get(str(a.dtype))
        contiguous, n, ptr = a.is_contiguous(), a.numel(), a.data_ptr()
        dev = a.device
        device = ("cuda", dev.index) if dev.type == "cuda" else (dev.type, None)
        dtype = a.dtype
    elif isinstance(a, np.ndarray):
        k, dtype = _kind(a.dtype), a.dtype
        contiguous, n, ptr, device = a.flags.c_contiguous, a.size, a.ctypes.data, ("host", None)
    elif mod.startswith("cupy"):
        k, dtype = _kind(a.dtype), a.dtype
        contiguous, n, ptr, device = a.flags.c_contiguous, a.size, a.data.ptr, ("cuda", a.device.id)
    elif hasattr(a, "__cuda_array_interface__"):
        desc = a.__cuda_array_interface__
        dtype = np.dtype(desc["typestr"])
        k = _kind(dtype)
        shape = tuple(desc["shape"])
        n = int(np.prod(shape, dtype=np.int64))
        strides = desc.get("strides")
        contiguous = strides is None or tuple(strides) == _c_strides(shape, dtype.itemsize)
        ptr, device = int(desc["data"][0]), ("cuda", None)
    else:
        raise TypeError(f"{what}: a {type(a).__name__}; expected a tensor or a device array")
    if k is None:
        raise TypeError(
            f"{what}: dtype {dtype}; expected float16, bfloat16, float32 or float64 (uint8 "
            "codes, int16 remainders)"
        )
    if not contiguous:
        raise ValueError(f"{what}: not C-contiguous; a multi-tensor step addresses flat memory")
    return k, int(n), int(ptr), device


def _c_strides(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    out, step = [], itemsize
    for d in reversed(shape):
        out.append(step)
        step *= d
    return tuple(reversed(out))


class TensorTable:
    """The table of one multi-tensor launch (``kernels.multi_tensor``), built and checked on
    the host: ``rows`` (int64, one row ``(n, param, grad, slot..., master)`` per tensor, 0 for
    an absent slot), ``chunks`` (the uint64 chunk entries) and ``chunk`` (their size).

    ``tensors`` is a list of ``(param, grad, slots, master)``: ``slots`` one array or None per
    state slot of ``rule``, ``master`` the fp32 master copy (None without one). Every array is
    checked (``describe``): storage dtypes as the storage format ``io`` says (param
    ``io.param``, grad ``io.grad``, slots ``io.state``, master ``io.kind("master")``
    (float32, or int16 for a remainder) exactly when ``io.master``), as many elements as its
    param, C-contiguous, on the param's device.
    Nothing is launched from a table that failed a check (the constructor raises). The kernels
    trust the table; so the arrays must stay alive, unmoved, for as long as it is launched:
    ``same``/``update`` are the cheap re-checks of a later step (``fastopt.torch`` holds the
    tensors).

    Quantized state (``io.quant`` set, ``kernels/quant_cuda.py``'s multi-tensor kernel): a
    slot the rule lets be quantized (``Slot.quantize``) is a ``(codes, absmax)`` pair, codes
    uint8 of the param's length (``ceil(n / 2)`` bytes for a packed format,
    ``quant.code_bytes``), absmax float32 of one scale per block of ``quant.BLOCKS[io.quant]``
    elements; its column holds the codes' address, the ``<slot>_absmax`` column
    (``quant_cuda.table_columns``) the scales'; the chunks are the tensors' blocks of codes
    (chunk ``quant.BLOCKS[io.quant]``: entry ``(tensor << 32) | block``, the block's scale at
    that index).

    ``blocks``: the blocks the device holds at once (``chunk_size``); ``device_rows`` and
    ``device_chunks`` are the device copies, made by the backend (``stale``/``stale_chunks``:
    the host copy changed since)."""

    def __init__(
        self,
        rule: str,
        io: IO,
        tensors: Sequence[Any],
        chunk: int | None = None,
        blocks: int | None = None,
    ) -> None:
        from ..kernels import multi_tensor

        self.rule, self.io = rule, io
        self.columns = multi_tensor.columns(rule, io.master)
        if io.quant is not None:
            from ..kernels import quant, quant_cuda

            self.columns = quant_cuda.table_columns(rule, io.master)
            block = quant.BLOCKS[io.quant]
            if chunk not in (None, block):
                raise ValueError(f"chunk={chunk}: a {io.quant} table's chunk is {block}")
            chunk = block  # one block of codes per chunk
        self.blocks = blocks
        self.rows, self.device = self._rows(tensors)
        total = int(self.rows[:, 0].sum())
        self.chunk = chunk or multi_tensor.chunk_size(total, blocks or 1)
        self.chunks = multi_tensor.chunk_table(self.rows[:, 0], self.chunk)
        self.device_rows = self.device_chunks = None
        self.stale = self.stale_chunks = True
        self._ok: set[tuple[tuple[str, bool], ...]] = (
            set()
        )  # flag variants whose slots have been found present

    @property
    def nchunks(self) -> int:
        """How many chunk entries the table holds."""
        return int(self.chunks.shape[0])

    @property
    def total(self) -> int:
        """Elements over every tensor (may exceed 2^31)."""
        return int(self.rows[:, 0].sum())

    def _rows(self, tensors: Sequence[Any]) -> tuple[np.ndarray, Any]:
        from ..kernels import RULES
        from ..kernels.quant import code_bytes, nblocks

        io, nslots = self.io, len(RULES[self.rule].state)
        quantized = self._quantized()
        if not len(tensors):
            raise ValueError("an empty list of tensors")
        rows = np.zeros((len(tensors), len(self.columns)), dtype=np.int64)
        device = None
        for i, item in enumerate(tensors):
            if len(item) != 4:
                raise ValueError(f"tensor {i}: expected (param, grad, slots, master)")
            p, g, slots, m = item
            slots = list(slots)
            if len(slots) != nslots:
                raise ValueError(f"tensor {i}: {len(slots)} slots; {self.rule} has {nslots}")
            pk, n, pp, device_i = describe(p, f"tensor {i} param")
            if device is None:
                device = device_i
            if pk != io.param:
                raise TypeError(
                    f"tensor {i} param: {pk}; the storage format {io} stores it as {io.param}"
                )
            if device_i != device:
                raise ValueError(f"tensor {i} param: on {device_i}; tensor 0's on {device}")
            if n and pp == 0:
                raise ValueError(f"tensor {i} param: a null address")
            # (name, array, storage kind, elements) of every column after the param's
            cells: list[tuple[str, Any, str, int]] = [("grad", g, io.grad, n)]
            scales: list[tuple[str, Any, str, int]] = []
            for name, a in zip(RULES[self.rule].state, slots):
                if name in quantized:  # codes in the slot's column, scales in <slot>_absmax
                    if a is not None and not (isinstance(a, tuple) and len(a) == 2):
                        raise TypeError(
                            f"tensor {i} {name}: the storage format {io} stores it quantized; "
                            "expected a (codes, absmax) pair"
                        )
                    codes, absmax = (None, None) if a is None else a
                    assert io.quant is not None
                    cells.append((name, codes, "uint8", code_bytes(n, io.quant)))
                    scales.append((f"{name}_absmax", absmax, "float32", nblocks(n, io.quant)))
                    continue
                if isinstance(a, tuple):
                    raise TypeError(
                        f"tensor {i} {name}: a (codes, absmax) pair; the storage format {io} "
                        "stores it as one array"
                    )
                cells.append((name, a, io.state, n))
                if io.quant is not None:
                    scales.append((f"{name}_absmax", None, "float32", 0))
            if io.master:
                if m is None:
                    raise ValueError(
                        f"tensor {i}: the storage format {io} keeps a master copy; got None"
                    )
                cells.append(("master", m, io.kind("master"), n))
            elif m is not None:
                raise ValueError(
                    f"tensor {i}: a master copy, but the storage format {io} keeps none"
                )
            row = [n, pp]
            for name, a, want, size in cells + scales:
                if a is None:  # an absent slot (a variant that needs it is refused at launch)
                    if name in ("grad", "master"):
                        raise ValueError(f"tensor {i}: no {name}")
                    row.append(0)
                    continue
                k, na, ptr, d = describe(a, f"tensor {i} {name}")
                if k != want:
                    raise TypeError(
                        f"tensor {i} {name}: {k}; the storage format {io} stores it as {want}"
                    )
                if na != size:
                    what = "blocks of codes" if name.endswith("_absmax") else "bytes of codes"
                    raise ValueError(
                        f"tensor {i} {name}: {na} elements; its param has {n}"
                        + (f" ({size} {what})" if size != n else "")
                    )
                if d != device:
                    raise ValueError(f"tensor {i} {name}: on {d}; tensor 0's param on {device}")
                if size and ptr == 0:
                    raise ValueError(f"tensor {i} {name}: a null address")
                row.append(ptr)
            rows[i] = row
        return rows, device

    def _quantized(self) -> set[str]:
        """The slots stored as ``(codes, absmax)`` pairs (none without ``io.quant``)."""
        from ..kernels import RULES

        if self.io.quant is None:
            return set()
        return {s.name for s in RULES[self.rule].slots if s.quantize}

    def check(self, rule: str, flags: Mapping[str, bool], io: IO) -> None:
        """Refuse a launch the table cannot serve: another rule, another storage format (the
        extras aside), or a variant that uses a slot some non-empty tensor lacks."""
        mine, theirs = self.io, io
        if rule != self.rule or (mine.param, mine.grad, mine.state, mine.master, mine.quant) != (
            theirs.param,
            theirs.grad,
            theirs.state,
            theirs.master,
            theirs.quant,
        ):
            raise ValueError(
                f"a table of {self.rule} under {mine} launched as {rule} under {theirs}"
            )
        key = tuple(sorted(flags.items()))
        if key in self._ok:
            return
        from ..kernels import RULES

        used = RULES[rule].slots_used(flags)
        live = self.rows[:, 0] > 0
        for j, (name, u) in enumerate(zip(RULES[rule].state, used)):
            missing: Any = np.flatnonzero(live & (self.rows[:, 3 + j] == 0)) if u else ()
            if len(missing):
                raise ValueError(
                    f"state {name!r}: required by {rule} with {flags}, absent from tensor "
                    f"{int(missing[0])}"
                )
        self._ok.add(key)

    def same(self, tensors: Sequence[Any]) -> bool:
        """Do ``tensors`` give this very table (lengths and addresses)? Checked as the
        constructor checks them."""
        rows, device = self._rows(tensors)
        return device == self.device and np.array_equal(rows, self.rows)

    def update(self, tensors: Sequence[Any]) -> bool:
        """Take ``tensors``' rows (checked) as the table's; the chunks are cut again when a
        length changed. Returns whether anything changed (then the device copy is stale)."""
        rows, device = self._rows(tensors)
        if device != self.device:
            raise ValueError(f"the tensors moved from {self.device} to {device}")
        if rows.shape == self.rows.shape and np.array_equal(rows, self.rows):
            return False
        from ..kernels import multi_tensor

        if rows.shape != self.rows.shape or not np.array_equal(rows[:, 0], self.rows[:, 0]):
            self.chunks = multi_tensor.chunk_table(rows[:, 0], self.chunk)
            self.stale_chunks = True
        self.rows, self.stale = rows, True
        self._ok.clear()  # a slot may have gone: every variant is checked again
        return True

    def set_column(self, name: str, addresses: Any) -> bool:
        """Write one column of addresses (``"grad"``: a step's new gradients), unchecked
        beyond their count and a null address of a non-empty tensor: for a caller that has
        checked the arrays themselves (as ``fastopt.torch``'s steady step does). Returns
        whether it changed."""
        j = self.columns.index(name)
        if j == 0:
            raise ValueError("lengths change through update(), which cuts the chunks again")
        new = np.asarray(addresses, dtype=np.int64).reshape(-1)
        if new.shape[0] != self.rows.shape[0]:
            raise ValueError(f"{new.shape[0]} addresses for a table of {self.rows.shape[0]}")
        if np.array_equal(new, self.rows[:, j]):
            return False
        if ((new == 0) & (self.rows[:, 0] > 0)).any():
            raise ValueError(f"{name}: a null address for a non-empty tensor")
        self.rows[:, j] = new
        self.stale = True
        return True
