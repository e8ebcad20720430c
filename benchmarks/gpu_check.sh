#!/usr/bin/env bash
# The whole GPU check in one command, for a short lease on a GPU machine (issue 16):
#   1. what the machine is (GPU, driver, torch, CuPy, NVRTC);
#   2. every cuda-marked test, each under a per-test timeout (pytest-timeout where installed), the fused passes
#      eager; then, with them compiled, the compiled-against-eager tests (tests/test_fused.py) and the
#      CUDA-graph step (tests/test_pt2.py);
#   3. the README's main job, `int8fx train --quick`, on the GPU (GPU_CHECK_TRAIN_S seconds at most; 0 skips);
#   4. benchmarks/kernels.py under a time budget (sections stop starting new measurements when it is spent).
# Logs and tables go to $OUT (default ./gpu-check-out): env.txt, pytest.log, junit.xml, train.log,
# kernels.log, kernels.json, profile_int8.json.gz (the profile section's trace). int8fx runs from this
# checkout (PYTHONPATH), on the machine's own torch and CuPy.
#
#   OUT=/tmp/gpu bash benchmarks/gpu_check.sh [test budget s, default 200] [benchmark budget s, default 200] \
#     [compiled-test budget s, default 240: a cold inductor compiles the CUDA-graph test's passes for ~110 s]
#   GPU_CHECK_TESTS="tests/test_kernels_cuda.py -k exact" GPU_CHECK_SECTIONS=conv,train \
#     GPU_CHECK_BENCH_ARGS="--conv-layers stem --models mobilenet_v2 --modes 'tf32;int8 torch, CUDA graph'" \
#     bash benchmarks/gpu_check.sh   # parts
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
TEST_BUDGET=${1:-200}
BENCH_BUDGET=${2:-200}
COMPILED_BUDGET=${3:-240}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export INT8FX_KERNEL_CACHE=${INT8FX_KERNEL_CACHE:-/tmp/int8fx-kernels}
start=$(date +%s)

{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  python3 - <<'EOF'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "cc", f"{p.major}.{p.minor}", "SMs", p.multi_processor_count)
try:
    import cupy
    print("cupy", cupy.__version__)
    from int8fx.kernels.nvrtc import nvrtc_version, supported_archs
    print("nvrtc", nvrtc_version(), "archs", supported_archs())
except Exception as e:
    print("cupy/nvrtc:", type(e).__name__, e)
EOF
} 2>&1 | tee "$OUT/env.txt"

# the tests: fused passes eager (INT8FX_COMPILE=0: the same bits, and no cold inductor compile per signature);
# the benchmark below runs them compiled, as users get them
# (every cuda-marked test of the suite; 4 xdist workers share the GPU where pytest-xdist is installed, and -v
# writes each result as it comes, so a run stopped by the budget still says what passed)
TESTS=${GPU_CHECK_TESTS:-"tests"}
per_test=""
python3 -c "import pytest_timeout" 2>/dev/null && per_test="--timeout 90"
workers=""
python3 -c "import xdist" 2>/dev/null && workers="-n ${GPU_CHECK_WORKERS:-4}"
INT8FX_COMPILE=0 timeout "$TEST_BUDGET" python3 -m pytest $TESTS -m cuda -v -rfEs -p no:cacheprovider \
  -o addopts="" $per_test $workers --durations=10 --junitxml="$OUT/junit.xml" 2>&1 | tee "$OUT/pytest.log"
echo "pytest: rc=${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest.log"
# the cuda tests that need the compiled passes (skipped above), and the CUDA-graph step with them, appended
# to the same log
COMPILED=${GPU_CHECK_COMPILED_TESTS:-"tests/test_fused.py tests/test_pt2.py"}
timeout "$COMPILED_BUDGET" python3 -m pytest $COMPILED -m cuda -v -rfEs -p no:cacheprovider -o addopts="" $per_test \
  2>&1 | tee -a "$OUT/pytest.log"
echo "pytest, compiled passes: rc=${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/pytest.log"

# the README's main job on the GPU (needs Fashion-MNIST: $INT8FX_DATA or the Debian package's folder)
TRAIN_S=${GPU_CHECK_TRAIN_S:-150}
if [ "$TRAIN_S" -gt 0 ]; then
  timeout "$TRAIN_S" python3 -m int8fx train --quick --device cuda --progress lines --out /tmp/gpu-check-train \
    > "$OUT/train.log" 2>&1
  echo "int8fx train --quick --device cuda: rc=$? after $(( $(date +%s) - start )) s" | tee -a "$OUT/train.log"
  tail -n 30 "$OUT/train.log"
fi

# (GPU_CHECK_BENCH_ARGS is parsed as shell words, so a quoted argument keeps its spaces: --modes "fp32;int8 torch")
eval "timeout $(( BENCH_BUDGET + 90 )) python3 benchmarks/kernels.py --budget $BENCH_BUDGET \
  ${GPU_CHECK_SECTIONS:+--sections $GPU_CHECK_SECTIONS} ${GPU_CHECK_BENCH_ARGS:-}" 2>&1 | tee "$OUT/kernels.log"
echo "kernels.py: rc=${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/kernels.log"
