#!/usr/bin/env bash
# The one prepared GPU run (scripts/gpu_run.py holds the plan): on a machine with an NVIDIA GPU,
# with numpy, numba, numba-cuda, cupy, pytest (and optionally pytest-xdist and torch) installed.
# Installs nothing but this checkout itself (editable, no dependencies) when it is not importable.
#
#   bash scripts/gpu_run.sh              # results under $OUT (default ./gpu-results)
#   bash scripts/gpu_run.sh --dry-run    # the plan with a time estimate per step, checked
#
# Env: PYTHON (default python3), OUT, CUDA_HOME (default /usr/local/cuda when it exists, so
# numba-cuda finds NVVM and libdevice on images that have the toolkit but not its wheels).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda/nvvm ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# fastopt.kernels is the repository's kernels/ folder, mapped by the package configuration: an
# editable install (no dependencies, no build isolation: the image has setuptools) provides it.
# Where that install fails (a setuptools older than the package metadata needs), a link
# fastopt/kernels -> ../kernels stands in for the mapping for this run and is removed after it.
link=""
if ! "$PY" -c "import fastopt.kernels" >/dev/null 2>&1; then
  if ! "$PY" -m pip install -q --no-deps --no-build-isolation -e . ||
    ! "$PY" -c "import fastopt.kernels" >/dev/null 2>&1; then
    if [ ! -e fastopt/kernels ]; then
      ln -s ../kernels fastopt/kernels && link=fastopt/kernels
    fi
    "$PY" -c "import fastopt.kernels" || { [ -n "$link" ] && rm -f "$link"; exit 2; }
    echo "gpu_run.sh: the editable install failed; fastopt/kernels linked for this run" >&2
  fi
fi
# numba's on-disk cache where a reinstall cannot leave it behind
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-${TMPDIR:-/tmp}/fastopt-numba-cache}"
if [ -z "$link" ]; then
  exec "$PY" scripts/gpu_run.py "$@"
fi
"$PY" scripts/gpu_run.py "$@"
rc=$?
rm -f "$link"
exit $rc
