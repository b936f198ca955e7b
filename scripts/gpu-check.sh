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
(cd build-gpu && ctest --output-on-failure -j 4) > "$log_dir/gpu-ctest.log" 2>&1
ctest_rc=$?
tail -5 "$log_dir/gpu-ctest.log"
./build-gpu/tests/core/golden_test --gtest_filter='*cuda*' 2>&1 | grep -E '^\[ +(OK|FAILED|SKIPPED|PASSED) ' \
  | tee "$log_dir/gpu-golden.log" | tail -60
./build-gpu/tools/moelora-generate --default_model_dir=build-gpu/default-model --device=cuda \
  --dtype=bf16 --prompt="1,17,42,99,7;3,8,64" --max_new_tokens=12 2>&1 | tee "$log_dir/gpu-demo.log"
exit $ctest_rc
