#!/usr/bin/env bash
# The GPU performance harness (issue 7): builds, checks and times everything in one device call
# and prints one table. Run from the repo root through the device tool, carrying .device-deps:
#   bash scripts/gpu-bench.sh                  # results under $OUT (else build-gpu/bench)
# Steps, each logged to its own file:
#   1. build moelora-bench, moelora-server, moelora-loadgen and decode_graphs_test (CUDA libtorch)
#      and run decode_graphs_test: graph replays must equal eager steps before anything is timed;
#   2. moelora-bench on every preset (random weights, real shapes, bf16 HF checkpoints and r = 16
#      PEFT experts written once, loaded through the real loaders): prefill base / fused / K-pass,
#      decode eager and through CUDA graphs at batch 1/8/32/64, peak device memory;
#   3. tools/bench/hf_peer.py on the same Gemma-2B checkpoint and experts: HF transformers base,
#      one PEFT adapter, the K-pass method through PEFT, PEFT's all-adapters loop, PEFT X-LoRA;
#   4. the real daemon on that checkpoint with K = 8 experts: moelora-loadgen with concurrent
#      clients (time to first token, tokens/s), base routing and all 8 experts mixed, then while
#      an r = 16 expert is attached and detached over and over (attach latency, token gaps);
#   5. tools/bench/report.py: the table, with the targets checked.
# The whole run takes longer than one 10-minute device call: BENCH_STAGES picks stages (default
# "build bench peer server report"; build always runs first, and is quick on a warm machine whose
# build-gpu/ is still there). Other knobs: BENCH_PRESETS (default "gemma-2b llama-3.2-1b
# llama-3-8b"), BENCH_8B_LAYERS (default 32), BENCH_FILTER (a --benchmark_filter regex),
# BENCH_ARGS (more moelora-bench flags, e.g. --adapter_room=false for the A/B of the layout),
# PEER_BUDGET_S (hf_peer.py's time budget, default 480).
set -uo pipefail
source .device-deps/env.sh
source scripts/lib.sh
out=${OUT:-build-gpu/bench}
stages=" ${BENCH_STAGES:-build bench peer server report} "
stage() { [[ "$stages" == *" $1 "* ]]; }
mkdir -p "$out"
work=build-gpu/bench-work  # kept with build-gpu/ on a warm machine
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)'
  echo "commit ${MOELORA_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)} (pass MOELORA_COMMIT: the device copy's .git may be stale)"
} | tee "$out/info.txt"

# 1. Build and check.
cmake -S . -B build-gpu -DCMAKE_BUILD_TYPE=Release -DMOELORA_BUILD_TESTS=ON > "$out/configure.log" 2>&1 \
  || { tail -30 "$out/configure.log"; exit 1; }
cmake --build build-gpu -j "$(nproc)" --target moelora-bench moelora-server moelora-loadgen moelora-cli \
  decode_graphs_test > "$out/build.log" 2>&1 || { grep -E 'error' "$out/build.log" | head -30; exit 1; }
./build-gpu/tests/core/decode_graphs_test > "$out/decode_graphs_test.log" 2>&1 \
  || { tail -30 "$out/decode_graphs_test.log"; exit 1; }
tail -1 "$out/decode_graphs_test.log"

# 2. moelora-bench per preset.
stage bench && for preset in ${BENCH_PRESETS:-gemma-2b llama-3.2-1b llama-3-8b}; do
  layers=0
  ks="2,4,8,16"
  decode_ks="2,8,16,64"  # 64 vs 2: the many-experts target (top-2 routing costs the dense pass)
  if [ "$preset" = llama-3-8b ]; then layers=${BENCH_8B_LAYERS:-32}; ks="8"; decode_ks="8,16"; fi
  echo "== moelora-bench $preset" | tee -a "$out/progress.txt"
  ./build-gpu/tools/moelora-bench --preset="$preset" --layers="$layers" --device=cuda --dtype=bf16 \
    --rank=16 --batch=8 --seq_len=512 --ks="$ks" --decode_ks="$decode_ks" --decode_batches=1,8,32,64 \
    --decode_context=512 --decode_steps=64 --projections=false --work_dir="$work" \
    --benchmark_min_time=0.5 --benchmark_repetitions=3 --benchmark_enable_random_interleaving=true \
    --benchmark_report_aggregates_only=true \
    ${BENCH_ARGS:-} --benchmark_filter="${BENCH_FILTER:-.}" --benchmark_out="$out/bench-$preset.json" --benchmark_out_format=json > "$out/bench-$preset.log" 2>&1 \
    || { tail -20 "$out/bench-$preset.log"; exit 1; }
done

gemma_dir=$(ls -d "$work"/gemma-2b_* 2>/dev/null | head -1)
# 3. The HF + PEFT peer on the same checkpoint and experts.
if stage peer && [ -n "$gemma_dir" ]; then
  echo "== hf_peer" | tee -a "$out/progress.txt"
  adapters=$(ls -d "$gemma_dir"/expert* | sort -V | head -16 | paste -sd, -)
  python3 tools/bench/hf_peer.py --model_dir="$gemma_dir/base" --adapter_dirs="$adapters" \
    --ks=2,4,8 --prefill_batch=8 --prefill_len=512 --decode_batches=1,8,32,64 \
    --decode_context=512 --decode_steps=32 --reps=5 --decode_reps=2 --time_budget_s="${PEER_BUDGET_S:-480}" \
    --json_out="$out/hf-gemma-2b.json" \
    > "$out/hf_peer.log" 2>&1 || tail -20 "$out/hf_peer.log"
fi

# 4. The daemon through moelora-loadgen.
if stage server && [ -n "$gemma_dir" ]; then
  echo "== server" | tee -a "$out/progress.txt"
  read -r port admin_port < <(free_ports 2)
  experts="" weights=""
  for i in 0 1 2 3 4 5 6 7; do
    experts="${experts:+$experts,}expert$i=$gemma_dir/expert$i"
    weights="${weights:+$weights,}expert$i:0.125"
  done
  ./build-gpu/server/moelora-server --model_dir="$gemma_dir/base" --device=cuda --dtype=bf16 \
    --experts="$experts" --pool_capacity=16 --pool_max_rank=16 --max_running_requests=64 \
    --max_seq_len=1024 --listen="127.0.0.1:$port" --admin_listen="127.0.0.1:$admin_port" \
    --tokenizer=none --log_requests=false > "$out/server.log" 2>&1 &
  server_pid=$!
  wait_until_serving ./build-gpu/client/moelora-cli "127.0.0.1:$port" $server_pid \
    "$out/server.log" 240 || { kill $server_pid 2>/dev/null; exit 1; }
  load() {  # name, then loadgen flags
    local name=$1; shift
    ./build-gpu/tools/loadgen/moelora-loadgen --address="127.0.0.1:$port" \
      --admin_address="127.0.0.1:$admin_port" --prompt_tokens=512 --max_tokens=128 --warmup_requests=1 \
      --json_out="$out/server-$name.json" "$@" > "$out/server-$name.log" 2>&1 \
      || tail -5 "$out/server-$name.log"
  }
  for clients in 1 8 32; do
    load "base-c$clients" --clients=$clients --requests=3
    load "fused8-c$clients" --clients=$clients --requests=3 --weights="$weights"
  done
  load attach --clients=8 --duration_s=20 --weights="$weights" \
    --attach_dir="$gemma_dir/expert15" --attach_cycles=20 --attach_interval_ms=500
  kill -TERM $server_pid; wait $server_pid
  echo "server exit $?" >> "$out/server.log"
fi

# 5. The table (of whatever $out holds: pass one folder holding every stage's files).
stage report && python3 tools/bench/report.py "$out" | tee "$out/report.md"
