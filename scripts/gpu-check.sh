#!/usr/bin/env bash
# Builds moelora against the GPU machine's CUDA libtorch and runs every test there (the golden
# tests then also run on CUDA in fp32, bf16 and fp16), plus the demo on the GPU.
# Run through the device tool from the repo root, carrying .device-deps (see ../shared/device):
#   bash scripts/gpu-check.sh            # logs go to $OUT when set, else build-gpu/
set -uo pipefail
source .device-deps/env.sh
log_dir=${OUT:-build-gpu}
mkdir -p "$log_dir"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  git rev-parse --short HEAD 2>/dev/null || true
} | tee "$log_dir/gpu-info.txt"
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release > "$log_dir/gpu-configure.log" 2>&1 \
  || { tail -30 "$log_dir/gpu-configure.log"; exit 1; }
cmake --build build-gpu -j "$(nproc)" > "$log_dir/gpu-build.log" 2>&1 \
  || { grep -E 'error' "$log_dir/gpu-build.log" | head -30; exit 1; }
# The deploy linters (yamllint, promtool) are checked by CI, not installed on the GPU machine.
(cd build-gpu && ctest --output-on-failure -j 4 -LE deploy) > "$log_dir/gpu-ctest.log" 2>&1
ctest_rc=$?
tail -5 "$log_dir/gpu-ctest.log"
./build-gpu/tests/core/golden_test --gtest_filter='*cuda*' 2>&1 | grep -E '^\[ +(OK|FAILED|SKIPPED|PASSED) ' \
  | tee "$log_dir/gpu-golden.log" | tail -60
# The daemon on CUDA (bf16): the whole `make demo` script.
MOELORA_DEMO_DEVICE=cuda bash scripts/demo.sh build-gpu > "$log_dir/gpu-demo.log" 2>&1
demo_rc=$?
tail -25 "$log_dir/gpu-demo.log"
# Continuous batching on CUDA (fp32): 16 concurrent clients get what each gets alone.
bash scripts/gpu-concurrency-check.sh build-gpu > "$log_dir/gpu-concurrency.log" 2>&1
concurrency_rc=$?
tail -5 "$log_dir/gpu-concurrency.log"
echo "ctest=$ctest_rc demo=$demo_rc concurrency=$concurrency_rc"
[ $ctest_rc -eq 0 ] && [ $demo_rc -eq 0 ] && [ $concurrency_rc -eq 0 ]
