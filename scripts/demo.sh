#!/usr/bin/env bash
# The demo: the daemon on loopback with the built-in tiny llama, four LoRA experts and a
# token-level router (trained on first run, a few seconds), driven by moelora-cli: streamed generations with
# the routing weights of every token, an expert attached and detached live, the routing lines of
# the metrics endpoint, and a clean SIGTERM shutdown.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
build_dir=${1:-build}
device=${MOELORA_DEMO_DEVICE:-cpu}   # cuda on a GPU machine (scripts/gpu-check.sh)
bin=$build_dir
assets=$build_dir/demo-assets
log=$build_dir/demo-server.log

"$bin/tools/moelora-demo-assets" --dir="$assets" >/dev/null
token_file=$assets/admin-token
[ -s "$token_file" ] || { echo "demo-admin-token" >"$token_file"; chmod 600 "$token_file"; }

# Three free loopback ports (the kernel picks them; the demo never collides with a running one).
read -r port admin_port metrics_port < <(free_ports 3)

cli() { "$bin/client/moelora-cli" --address="127.0.0.1:$port" \
          --admin_address="127.0.0.1:$admin_port" --admin_token_file="$token_file" "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "starting moelora-server (log: $log)"
"$bin/server/moelora-server" \
  --model_dir="$assets/model" --manifest="$assets/manifest.json" \
  --listen="127.0.0.1:$port" --admin_listen="127.0.0.1:$admin_port" \
  --metrics_listen="127.0.0.1:$metrics_port" --admin_token_file="$token_file" \
  --device="$device" --max_running_requests=8 --drain_timeout=10s 2>"$log" &
server_pid=$!
trap 'kill "$server_pid" 2>/dev/null || true' EXIT

wait_until_serving "$bin/client/moelora-cli" "127.0.0.1:$port" "$server_pid" "$log"
cli health

step "model, experts and routers"
cli info

step "four requests at once, one per domain (one batch), with the routing weights behind every token"
# The demo's experts and router were trained on four synthetic domains (core/demo_assets.h):
# a prompt from one domain should be routed to its expert.
declare -A prompts=([math]=8,10,12,20,13 [code]=38,47,54,41 [chat]=68,75,84,80 [poetry]=98,112,110,101)
pids=()
for domain in math code chat poetry; do
  extra=()
  [ "$domain" = chat ] && extra=(--temperature=0.8 --seed=7)
  cli generate --prompt_ids="${prompts[$domain]}" --max_new_tokens=6 --show_routing "${extra[@]}" \
    >"$build_dir/demo-$domain.txt" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done
for domain in math code chat poetry; do
  echo "-- a $domain prompt: ${prompts[$domain]}"
  cat "$build_dir/demo-$domain.txt"
done

step "attach the expert 'extra' while serving, use it, detach it"
cli experts attach --name=extra --path="$assets/experts/extra"
cli generate --prompt_ids=8,10,12 --max_new_tokens=4 --pin=extra
cli experts detach --name=extra
cli experts list

step "routing metrics (http://127.0.0.1:$metrics_port/metrics)"
python3 - "$metrics_port" <<'EOF'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
wanted = ("moelora_expert_routing_weight_total", "moelora_expert_top1_selections_total",
          "moelora_routing_load_imbalance", "moelora_routed_tokens_total",
          "moelora_requests_total")
for line in text.splitlines():
    if line.startswith(wanted):
        print(line)
EOF

step "SIGTERM: drain and exit"
kill -TERM "$server_pid"
set +e
wait "$server_pid"
code=$?
set -e
trap - EXIT
tail -n 3 "$log"
echo "moelora-server exited with status $code"
exit "$code"
