"""``fastopt.torch`` in real process groups (gloo, 2 CPU processes on localhost, spawned by
``torch.multiprocessing``): DDP, ``ZeroRedundancyOptimizer`` with ``consolidate_state_dict``,
and FSDP2 (``fully_shard``: DTensor parameters stepped through their local shards, state as
DTensors) with a ``torch.distributed.checkpoint`` save, new processes, load and continue. The
workers (``tests/support/distributed.py``) compare each fastopt run with the same run with
``torch.optim`` and the resumed FSDP2 run with the uninterrupted one. FSDP2 with quantized
state (``phase_quant``) is compared with one process stepping the full tensors with the same
gradients (every shard holds whole blocks), bit for bit, through a state dict and a DCP round
trip; a state of another layout is refused.

Marked ``distributed``: the spawns take tens of seconds on two slow cores, so the default run
skips them; ``python -m pytest -q -m distributed tests/test_torch_distributed.py`` runs them.
"""

import json
import socket

import pytest

torch = pytest.importorskip("torch")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch without gloo", allow_module_level=True)

from support import distributed as worker  # noqa: E402

pytestmark = pytest.mark.distributed
WORLD = 2
#: float32 runs of the same math in another order (torch's lerp and addcdiv, fastopt's FMAs)
TOL = 1e-6


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, folder, name, opt_kw):
    torch.multiprocessing.spawn(
        fn, args=(WORLD, _port(), str(folder), name, opt_kw), nprocs=WORLD, join=True
    )


def _read(folder, phase):
    return [json.loads((folder / f"{phase}-{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize(
    "name,opt_kw", [("AdamW", {}), ("NAdam", {"decoupled_weight_decay": True})]
)
def test_ddp_zero_and_fsdp2_with_dcp_resume_equal_torch(tmp_path, name, opt_kw):
    _spawn(worker.phase_train, tmp_path, name, opt_kw)
    for m in _read(tmp_path, "train"):
        assert m["ddp"] <= TOL and m["zero"] <= TOL and m["fsdp"] <= TOL, m
    _spawn(worker.phase_resume, tmp_path, name, opt_kw)  # new processes
    for m in _read(tmp_path, "resume"):
        assert m["fastopt"] == 0.0, m  # bit for bit (also asserted in the workers)
        assert m["torch"] <= TOL, m


@pytest.mark.parametrize("name,fmt", [("Adam", "int8")])
def test_fsdp2_quantized_state_equals_the_full_tensor_step(tmp_path, name, fmt):
    """FSDP2 with quantized state: codes like the parameter, a row of block scales per shard
    (blocks start at each shard's first element), bit for bit the single-process step where
    the blocks coincide; state dict and DCP round trips; another layout refused
    (``tests/support/distributed.py``, ``phase_quant``)."""
    _spawn(worker.phase_quant, tmp_path, name, {"state_dtype": fmt})
    assert all(m["ok"] for m in _read(tmp_path, "quant"))
