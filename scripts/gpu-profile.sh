#!/usr/bin/env bash
# Per-kernel GPU times of moelora-bench cases (Nsight Compute), to see where a case's time goes
# against another's. Run through the device tool from the repo root, carrying .device-deps:
#   PROFILE_CASES='decode/(base|fused/K=8)/batch=32/graph' bash scripts/gpu-profile.sh
# Knobs: PROFILE_CASES (a --benchmark_filter regex), PROFILE_ARGS (moelora-bench flags; default
# gemma-2b with 2 layers, so one step is a few dozen kernels), PROFILE_NAME (default profile),
# BUILD_DIR (default build-prof). Writes $OUT/$PROFILE_NAME.csv: one row a kernel launch, in
# launch order, with its grid and time; `tools/bench/profile_table.py CSV --tail 60` prints them
# (a decode case's last step ends with the LM head's GEMM). ncu runs each kernel alone (no
# overlap, no programmatic early start), so a step's sum is above its timed step: compare cases
# kernel by kernel.
set -uo pipefail
source .device-deps/env.sh
out=${OUT:-build-prof/out}
name=${PROFILE_NAME:-profile}
build_dir=${BUILD_DIR:-build-prof}
cases=${PROFILE_CASES:-decode/(base|fused/K=8)/batch=32/graph}
args=${PROFILE_ARGS:---preset=gemma-2b --layers=2 --device=cuda --dtype=bf16 --rank=16 --ks=8 \
--decode_ks=8 --decode_batches=32 --decode_context=512 --decode_steps=3}
mkdir -p "$out"
(cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release > "$out/configure.log" 2>&1 &&
  cmake --build "$build_dir" -j "$(nproc)" --target moelora-bench > "$out/build.log" 2>&1) ||
  { grep -iE 'error' "$out/build.log" | head -20; exit 1; }
ncu_bin=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
# shellcheck disable=SC2086  # PROFILE_ARGS is a list of flags
"$ncu_bin" --clock-control none --graph-profiling node --metrics gpu__time_duration.sum \
  --csv --page raw --print-units base --log-file "$out/$name.csv" \
  "$build_dir/tools/moelora-bench" $args --projections=false --work_dir=/tmp/moelora-prof \
  --benchmark_filter="$cases" --benchmark_min_time=0 --benchmark_repetitions=1 \
  > "$out/$name.log" 2>&1 || { tail -20 "$out/$name.log"; exit 1; }
echo "$name: $(grep -c '' "$out/$name.csv") rows"
