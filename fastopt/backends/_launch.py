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
"""

import sys

__all__ = ["LIMITS", "THREADS", "blocks_per_sm", "grid_size", "plain_view", "producer_stream"]

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
    regs_per_thread, threads=THREADS, limits=None, shared_per_block=0, shared_per_sm=228 * 1024
):
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


def grid_size(items, sms, per_sm, threads=THREADS):
    """Blocks for ``items`` work items (elements or vectors): one full wave of resident blocks
    (``sms * per_sm``), fewer when the work needs fewer; a grid-stride loop covers the rest."""
    return max(1, min(sms * per_sm, -(-int(items) // threads)))


def producer_stream(a):
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


def plain_view(a):
    """``a.detach()`` for a tensor that requires grad (same memory, no copy), else ``a``."""
    if getattr(a, "requires_grad", False) and hasattr(a, "detach"):
        return a.detach()
    return a
