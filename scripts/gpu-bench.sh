#!/usr/bin/env bash
# On the GPU machine (after scripts/gpu-check.sh built build-gpu/): prefill of base, fused single
# pass and K-pass baseline at K = 2, 4, 8 on Gemma-2B-like layers (hidden 2048, intermediate
# 16384, MQA with head_dim 256, r = 16 on all seven projections), bf16. Numbers go to
# docs/BENCHMARKS.md.
set -uo pipefail
source .device-deps/env.sh
log_dir=${OUT:-build-gpu}
./build-gpu/tools/moelora-bench --device=cuda --dtype=bf16 --hidden=2048 --intermediate=16384 \
  --heads=8 --kv_heads=1 --head_dim=256 --layers=${BENCH_LAYERS:-4} --vocab=32000 --rank=16 \
  --batch=${BENCH_BATCH:-4} --seq_len=${BENCH_SEQ_LEN:-512} --work_dir=/tmp/moelora-bench \
  --benchmark_min_time=1 --benchmark_repetitions=3 --benchmark_report_aggregates_only=true \
  --benchmark_out="$log_dir/gpu-bench.json" --benchmark_out_format=json 2>&1 | tee "$log_dir/gpu-bench.txt"
