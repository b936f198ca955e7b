#!/usr/bin/env bash
# 16 concurrent streaming clients against moelora-server on CUDA (fp32): every output must equal
# the same request sent alone. Used by scripts/gpu-check.sh; needs the demo assets' binaries.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
build_dir=${1:-build-gpu}
device=${DEVICE:-cuda}
assets=$build_dir/demo-assets
"$build_dir/tools/moelora-demo-assets" --dir="$assets" >/dev/null
read -r port admin_port < <(free_ports 2)
"$build_dir/server/moelora-server" --model_dir="$assets/model" --manifest="$assets/manifest.json" \
  --listen="127.0.0.1:$port" --admin_listen="127.0.0.1:$admin_port" --device="$device" --dtype=fp32 \
  --max_running_requests=16 --log_requests=false 2>"$build_dir/concurrency-server.log" &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
cli() { "$build_dir/client/moelora-cli" --address="127.0.0.1:$port" "$@"; }
wait_until_serving "$build_dir/client/moelora-cli" "127.0.0.1:$port" "$server" \
  "$build_dir/concurrency-server.log"
out=$(mktemp -d)
requests=()
for i in $(seq 0 15); do
  args="--prompt_ids=$((i + 1)),$((3 * i % 120 + 2)),$((7 * i % 120 + 5)) --max_new_tokens=$((8 + i % 5))"
  case $((i % 4)) in
    1) args="$args --pin=code" ;;
    2) args="$args --weights=math:0.6,chat:0.4" ;;
    3) args="$args --temperature=0.7 --top_p=0.9 --seed=$i" ;;
  esac
  requests+=("$args")
  # shellcheck disable=SC2086
  cli generate --json $args >"$out/alone-$i.json"
done
pids=()
for i in $(seq 0 15); do
  # shellcheck disable=SC2086
  cli generate --json ${requests[$i]} >"$out/together-$i.json" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
# All token ids of a --json stream, in order (messages may merge tokens differently).
tokens() { python3 -c '
import json, sys
ids = []
for line in open(sys.argv[1]):
    ids += json.loads(line).get("token_ids", [])
print(ids)' "$1"; }
failed=0
for i in $(seq 0 15); do
  if [ "$(tokens "$out/alone-$i.json")" != "$(tokens "$out/together-$i.json")" ]; then
    echo "request $i differs: ${requests[$i]}"; failed=1
  fi
done
kill -TERM $server; wait $server; trap - EXIT
[ $failed -eq 0 ] && echo "16 concurrent requests on $device equal their lone runs"
exit $failed
