#!/usr/bin/env bash
# Run fastopt's GPU checks on a machine with an NVIDIA GPU: the `gpu` test suite and the GPU
# benchmarks. Installs nothing: python3 must already have numpy, numba, numba-cuda, cupy,
# pytest (and optionally torch for the interop test and the torch.optim peers).
#
#   bash scripts/gpu_run.sh            # results under ./gpu-results/
#   OUT=/some/dir bash scripts/gpu_run.sh
#
# Writes under $OUT: env.txt (device and versions), pytest-gpu.xml (JUnit) and pytest-gpu.log,
# bench-gpu.json (+ bench-gpu.log) and bench-gpu-quick.json. Exit status: the test suite's
# (a benchmark failure is reported but does not fail the script).
# Env: PYTHON (default python3), BENCH_SIZES (default 2^20,2^24,2^28), PYTEST_ARGS (extra),
# ALLOW_NO_GPU=1 (go on without a GPU: everything skips; for checking the script itself).
set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu-results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1

echo "== device and versions" | tee "$OUT/env.txt"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.memory --format=csv 2>&1 || true
  "$PY" - <<'PY'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.platform())
for m in ("numpy", "numba", "numba_cuda", "cupy", "torch", "pytest", "fastopt"):
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, "__version__", "?"))
    except Exception as exc:
        print(m, "MISSING", type(exc).__name__, exc)
try:
    import cupy
    d = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(d.id)
    print("gpu", props["name"].decode(), "cc", d.compute_capability,
          "SMs", props["multiProcessorCount"], "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
except Exception as exc:
    print("cupy sees no GPU:", exc)
import fastopt
print("fastopt backends", fastopt.available_backends())
PY
} 2>&1 | tee -a "$OUT/env.txt"

if ! "$PY" -c "import fastopt, sys; sys.exit(0 if 'cupy' in fastopt.available_backends() else 1)"; then
  echo "ERROR: no GPU backend can run here (see $OUT/env.txt); this script is for a GPU machine"
  [ "${ALLOW_NO_GPU:-0}" = 1 ] || exit 2
fi

echo "== pytest -m gpu"
"$PY" -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/pytest-gpu.xml" \
    ${PYTEST_ARGS:-} tests 2>&1 | tee "$OUT/pytest-gpu.log"
rc=${PIPESTATUS[0]}
echo "pytest -m gpu exit: $rc"

BACKENDS=cupy,numba-cuda,numpy
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  BACKENDS="$BACKENDS,torch"
fi
echo "== benchmarks ($BACKENDS)"
"$PY" -m fastopt bench --quick --backends "$BACKENDS" --json "$OUT/bench-gpu-quick.json" \
    2>&1 | tee "$OUT/bench-gpu-quick.log" || true
"$PY" -m fastopt bench --backends "$BACKENDS" --dtypes float32 \
    --sizes "${BENCH_SIZES:-2^20,2^24,2^28}" --json "$OUT/bench-gpu.json" \
    2>&1 | tee "$OUT/bench-gpu.log"
brc=${PIPESTATUS[0]}
[ "$brc" = 0 ] || echo "WARNING: fastopt bench exited $brc (see $OUT/bench-gpu.log)"

echo "== results in $OUT"; ls -l "$OUT"
exit "$rc"
