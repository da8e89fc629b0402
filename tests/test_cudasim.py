"""The Numba CUDA kernels under Numba's CUDA simulator, in a separate pytest process.

``NUMBA_ENABLE_CUDASIM=1`` swaps ``numba.cuda`` for a Python simulator for the whole process, so
``tests/cudasim_parity.py`` (every optimizer and flag variant through ``backend="numba-cuda"``
against the float64 oracle, params and every state buffer, n <= 1001) and
``tests/cudasim_multi_tensor.py`` (the multi-tensor launch and the gradient norm) and
``tests/cudasim_quant.py`` (quantized state) run in a child pytest.
Needs a ``numba.cuda`` with a simulator: numba <= 0.6x's built-in target or the ``numba-cuda``
package (``pip install numba-cuda``); no GPU, driver or CUDA toolkit.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _has_simulator():
    # look without importing numba.cuda here: the parent process must stay a plain CPU process
    if importlib.util.find_spec("numba_cuda") is not None:
        return True  # the numba-cuda package (it ships the simulator)
    spec = importlib.util.find_spec("numba")
    return spec is not None and any(
        (Path(p) / "cuda" / "simulator").is_dir() for p in spec.submodule_search_locations or ()
    )


def _run_child(select, files=("cudasim_parity.py", "cudasim_multi_tensor.py", "cudasim_quant.py")):
    """``tests/cudasim_parity.py`` in a child pytest under the simulator, its cases chosen by
    the marker expression ``select``; it must pass and run cases, skipping none."""
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "--rootdir",
            str(ROOT),
            "-m",
            select,
            *(str(HERE / f) for f in files),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"simulator suite failed (exit {proc.returncode}):\n{out[-6000:]}"
    # the child must have run the matrix, not skipped it (a missing simulator would skip all)
    assert " passed" in out and " skipped" not in out, out[-3000:]


_needs_simulator = pytest.mark.skipif(
    not _has_simulator(), reason="no Numba CUDA simulator: pip install numba-cuda"
)


@_needs_simulator
def test_numba_cuda_kernels_under_the_simulator():
    _run_child("not exhaustive")


@_needs_simulator
@pytest.mark.exhaustive
def test_numba_cuda_kernels_under_the_simulator_every_variant():
    """The simulator cases beyond the default run's pairwise cover (every configuration of the
    variant cover, every kernel variant)."""
    _run_child("exhaustive")


@_needs_simulator
def test_fastopt_torch_gpu_path_under_the_simulator():
    """``fastopt.torch``'s GPU path (tables, clipping, capturable steps) through numba-cuda
    (``tests/cudasim_torch.py``)."""
    pytest.importorskip("torch")
    _run_child("not exhaustive", ("cudasim_torch.py",))
