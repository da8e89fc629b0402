"""``fastopt.torch``: ``torch.optim`` drop-ins running fastopt's fused kernels.

    import fastopt.torch as fot
    opt = fot.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
    scaler = torch.amp.GradScaler("cuda")      # or "cpu"
    ...
    scaler.scale(loss).backward(); scaler.step(opt); scaler.update(); opt.zero_grad()

Every fastopt optimizer (``fastopt.optimizers.CLASSES``) has a class here of the same name: a
subclass of ``torch.optim.Optimizer`` with ``torch.optim``'s signature (``params`` as tensors or
param-group dicts, the same keyword names and defaults) plus ``backend="auto"`` (numba for CPU
tensors, cupy for CUDA tensors; "numba-cuda" on request). Param groups, ``add_param_group``,
``zero_grad``, every learning-rate scheduler, closures and hooks are torch's own.

The state is torch's: ``state[p]`` holds the same keys, shapes and dtypes (``step`` a float32
0-d tensor where torch keeps one), so ``state_dict()`` loads into ``torch.optim`` and the
reverse, mid-run. Parameters whose ``.grad`` is None are skipped and keep their state and step.

A step launches once per (device, dtype, variant, step count, master copy or not, host state)
over all the parameters of a param group that have a gradient, in place: on the CPU one
parallel loop walks a table of the tensors' addresses (``numba_backend.launch_many``, or
``launch_many_io`` for 16-bit storage, master copies and loss scales); on a GPU one
multi-tensor kernel walks a device table of them (``_device``; CuPy or numba-cuda).
Parameters stay where they are: nothing is repacked, so ``zero_grad``, ``.to()``,
``load_state_dict`` and parameters added later need no care. Like
torch's in-place ops, a step bumps the autograd version counters of everything it writes, so
a graph built on the old weights refuses ``backward()``. DTensor parameters (FSDP2) are
stepped through their local shards, with DTensor state (``_dtensor``).

Nothing is written before every group is checked (``_memory``, ``_plan_group``, ``_steady``; a
state dict at load: ``_compat``): each tensor a kernel touches (parameter, gradient, state,
master copy, the 0-d step counts and host state written through their addresses) is a plain
``torch.Tensor``/``nn.Parameter`` (a DTensor's local shard; other subclasses and meta tensors,
which have no memory, are refused with a TypeError naming the parameter), strided, alike in
device, dtype and shape, and backed by its storage (``untyped_storage().nbytes()`` holds
``storage_offset`` and the tensor: a storage freed or shrunk by ``resize_`` is refused); no
written tensor shares memory with another tensor of the step, in any group (the same tensor
twice, a gradient that is a parameter, a state tensor that is its parameter). A gradient that is
not contiguous (expanded, transposed) is read through a contiguous copy and never written. A
parameter's state must hold what its step reads: a step count that is a whole number >= 0, its
buffers and host state (KeyError, TypeError or ValueError, as torch.optim raises at load or in
its step); numbers that an older state dict holds are converted at load, as torch.optim converts
them. Every host value (the variant, the scalars, the host state after the step) is computed
before the first write: a step that cannot be computed (ASGD's ``eta`` overflowing, a zero or
non-finite loss scale) is refused with nothing changed. A group stepped before over the same
tensors re-checks all of this in a few attribute reads per tensor (``_steady``).

AMP: the classes declare ``_step_supports_amp_scaling``, so ``torch.amp.GradScaler`` hands
them its scale and found-inf flag instead of unscaling the gradients itself; a step with
``found_inf`` set changes nothing (params, state, step counts), and the gradients are
unscaled in the same pass as the update (``p.grad`` keeps GradScaler's scale, as with torch's
fused optimizers). On a GPU the step counts live on the device and the scale and the flag are
read by the kernels: no host synchronisation (RAdam and Adan, whose host variant depends on
the step, run their ``Rule.device_flags`` variant there, selecting per step; not ASGD, whose
variant depends on its host state); with ``capturable=True`` the step can be captured in a
CUDA graph (a keyword of the classes torch lacks too: Lion, AdaBelief, Adan, AdEMAMix). A
group whose parameters fall into several launches keeps one cached launch per part
(``_steady.SteadyParts``).
``max_grad_norm=`` clips by the global gradient norm inside the step (the norm of the unscaled
gradients under GradScaler).

float16 and bfloat16 parameters are stepped in their storage dtype (math in float32, round to
nearest even) with state in the parameter's dtype, or, with ``master_weights=True``, through an
fp32 copy (``state[p]["master_param"]``) with fp32 state, the parameter stored from the copy in
the same pass. A 16-bit parameter written between steps (``w.fill_(3.0)``: its version counter
moved) is seen: where it no longer equals its master rounded, the master takes the written
value. A write that bypasses the version counter (through ``w.data`` or a NumPy view) is not
seen, and the master's value wins. ``master_weights="remainder"`` keeps that master of a
bfloat16 parameter as the parameter (its high half) and an int16 ``state[p]["master_remainder"]``
(its low half), the same master bit for bit in 2 bytes instead of 4 (``_master``; float16
parameters refused, state dicts of either form converted).

The core classes' other precision keywords are taken as the core checks them
(``_check_precision``): ``state_dtype`` ("float32" or "bfloat16": the state buffers' storage
dtype, ``precision.resolve_state_kind``; a value the core accepts beyond the storage dtypes is
refused until this path keeps it), ``stochastic_rounding`` and ``seed`` (bfloat16 parameters
without a master copy rounded from a hash of (seed, step, index), the index counted from each
tensor's start, salt 0, on the CPU and GPU paths alike; SGD, which keeps no step count in
torch's state, hashes the steps this object took for the group). ``state_dict`` carries the
state in its storage dtype; ``load_state_dict`` converts each saved state buffer to it
(``_compat.state_keeps``).
"""

from .. import optimizers as _optimizers
from ._classes import CLASSES as _CLASSES
from ._optimizer import FusedOptimizer
from ._quantized import full_precision_state_dict

__all__ = [
    "CPUOffload",
    "FusedOptimizer",
    *_optimizers.CLASSES,
    "Adagrad",
    "RMSprop",
    "full_precision_state_dict",
]

globals().update(_CLASSES)
Adagrad = globals()["AdaGrad"]
RMSprop = globals()["RMSProp"]

from .offload import CPUOffload  # noqa: E402  (it subclasses the classes above)
