#!/usr/bin/env bash
# A/B of two trees in one run: the working tree against a base tree, each built with its own
# moelora-bench and timed in turn, so both see the same machine, clocks and checkpoint. Timings
# from different device calls are not comparable; this is how docs/BENCHMARKS.md's A/B tables
# were measured.
#
# On the CPU machine, pack the base tree (any git ref) where the device tool may carry it:
#   mkdir -p build-ab && git archive REF | gzip > build-ab/base.tar.gz
# then, through the device tool with carry [".device-deps", "build-ab"]:
#   bash scripts/bench-ab.sh
# Knobs: AB_BASE (the tarball, default build-ab/base.tar.gz), AB_ROUNDS (default 2), AB_FILTER
# (a --benchmark_filter regex, default the graph-replayed decode steps), AB_ARGS (moelora-bench
# flags, default gemma-2b decode at batch 1 and 32, base and K = 2 / 8), AB_TESTS (test targets
# of the working tree, e.g. "skinny_linear_test decode_graphs_test": built beside its bench and
# run first; a failure stops the run before any timing). On a machine without a GPU,
# AB_ARGS='--device=cpu' AB_FILTER='decode/.*/eager' smoke-tests it on the tiny custom model.
# Prints each run's medians as it ends (so a call cut short keeps what ran), then one table: the
# median of each case per run (ms), base runs then working-tree runs.
set -uo pipefail
[ -f .device-deps/env.sh ] && source .device-deps/env.sh
out=${OUT:-build-ab/out}
base_tar=${AB_BASE:-build-ab/base.tar.gz}
rounds=${AB_ROUNDS:-2}
filter=${AB_FILTER:-decode/.*/graph}
read -r -a tests <<< "${AB_TESTS:-}"
args=${AB_ARGS:---preset=gemma-2b --device=cuda --dtype=bf16 --rank=16 --decode_ks=2,8 \
--decode_batches=1,32 --decode_context=512 --decode_steps=64}
[ -f "$base_tar" ] || { echo "no base tree at $base_tar (see the header)"; exit 1; }
mkdir -p "$out"
base_dir=$(mktemp -d)
tar xzf "$base_tar" -C "$base_dir"
jobs=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))

build() {  # source dir, log, extra targets: configures and builds moelora-bench (and them)
  local dir=$1 log=$2
  shift 2
  (cmake -S "$dir" -B "$dir/build-ab-bench" -DCMAKE_BUILD_TYPE=Release > "$log" 2>&1 &&
    cmake --build "$dir/build-ab-bench" -j "$jobs" --target moelora-bench "$@" >> "$log" 2>&1) ||
    { grep -iE 'error|no rule' "$log" | head -20; echo "building $dir failed: $log"; return 1; }
}
build . "$out/build-work.log" "${tests[@]}" & work_pid=$!
build "$base_dir" "$out/build-base.log" & base_pid=$!
wait $work_pid || exit 1
wait $base_pid || exit 1

if [ ${#tests[@]} -gt 0 ]; then  # CTest names each test after its target
  pattern="^($(IFS='|'; echo "${tests[*]}"))\$"
  (cd build-ab-bench && ctest --output-on-failure -R "$pattern") > "$out/tests.log" 2>&1 ||
    { echo "tests failed:"; tail -40 "$out/tests.log"; exit 1; }
  grep -E 'tests passed' "$out/tests.log"
fi

run() {  # tree dir, tag
  # shellcheck disable=SC2086  # AB_ARGS is a list of flags
  "$1/build-ab-bench/tools/moelora-bench" $args --projections=false --work_dir=build-ab/work \
    --benchmark_filter="$filter" --benchmark_min_time=0.3 --benchmark_repetitions=3 \
    --benchmark_report_aggregates_only=true --benchmark_out="$out/$2.json" \
    --benchmark_out_format=json > "$out/$2.log" 2>&1 || { tail -20 "$out/$2.log"; return 1; }
  echo "$2: $(grep -E '_median' "$out/$2.log" | awk '{printf "%s %s %s | ", $1, $2, $3}')"
}
for round in $(seq 1 "$rounds"); do
  run "$base_dir" "base-$round" || exit 1
  run . "work-$round" || exit 1
done

python3 - "$out" "$rounds" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
tags = [f"base-{r}" for r in range(1, rounds + 1)] + [f"work-{r}" for r in range(1, rounds + 1)]
rows = {}
for tag in tags:
    for entry in json.load(open(f"{out}/{tag}.json"))["benchmarks"]:
        if entry.get("aggregate_name") == "median":
            rows.setdefault(entry["run_name"], {})[tag] = entry["real_time"]
width = max(len(name) for name in rows) if rows else 4
print("case".ljust(width), *(tag.rjust(8) for tag in tags))
for name, times in rows.items():
    print(name.ljust(width), *(f"{times[t]:8.3f}" if t in times else " " * 8 for t in tags))
PY
rm -rf "$base_dir"
