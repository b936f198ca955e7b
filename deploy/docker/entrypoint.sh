#!/usr/bin/env bash
# The image's entrypoint (installed as /opt/moelora/bin/moelora-entrypoint).
#
#   (no arguments) / --flag ...   runs moelora-server; MOELORA_<FLAG> variables become --<flag>
#                                 arguments placed first, so explicit arguments win
#   any other command ...         runs it (moelora-cli health, moelora-demo-assets, bash, ...)
#
# With no model directory (neither MOELORA_MODEL_DIR nor --model_dir), the built-in demo model,
# experts, router and manifest are written into MOELORA_DEMO_DIR and served.
# The server is exec'ed, so it is PID 1 and receives SIGTERM itself (it drains, then exits 0).
set -euo pipefail

if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then
  exec "$@"
fi

# Only these variables are read: a Kubernetes Service named "moelora" injects MOELORA_PORT and
# the like, which must not turn into flags.
flags=(
  model_dir device dtype listen admin_listen admin_on_data_port metrics_listen
  pool_capacity pool_max_rank wide_room_layout max_running_requests max_seq_len kv_cache_bytes
  max_batch_tokens max_queued_requests drain_timeout admin_token_file tls_cert_file tls_key_file
  tls_client_ca_file max_message_bytes experts routers default_router manifest log_requests
)
args=()
for flag in "${flags[@]}"; do
  var="MOELORA_${flag^^}"
  if [ -n "${!var+x}" ] && [ -n "${!var}" ]; then args+=("--${flag}=${!var}"); fi
done

has_model_dir=0
[ -n "${MOELORA_MODEL_DIR:-}" ] && has_model_dir=1
for arg in "$@"; do
  case "$arg" in
    --model_dir=* | -model_dir=* | --model_dir | -model_dir) has_model_dir=1 ;;
  esac
done

if [ "$has_model_dir" -eq 0 ]; then
  demo=${MOELORA_DEMO_DIR:-/var/lib/moelora/demo}
  echo "moelora-entrypoint: no --model_dir / MOELORA_MODEL_DIR: serving the demo model in $demo" >&2
  /opt/moelora/bin/moelora-demo-assets --dir="$demo" >/dev/null
  args+=("--model_dir=$demo/model")
  [ -n "${MOELORA_MANIFEST:-}" ] || args+=("--manifest=$demo/manifest.json")
fi

exec /opt/moelora/bin/moelora-server "${args[@]}" "$@"
