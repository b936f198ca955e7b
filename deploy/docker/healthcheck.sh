#!/usr/bin/env bash
# The image's HEALTHCHECK (installed as /opt/moelora/bin/moelora-healthcheck): a
# grpc.health.v1.Health/Check on the data port through moelora-cli; exits 0 only on SERVING
# (moelora-cli exits 9 on NOT_SERVING: starting up, attaching start-up experts, or draining).
#   MOELORA_HEALTHCHECK_ADDRESS   default 127.0.0.1:<port of MOELORA_LISTEN, else 50051>
#   MOELORA_HEALTHCHECK_TLS_CA_FILE, MOELORA_HEALTHCHECK_TLS_CERT_FILE,
#   MOELORA_HEALTHCHECK_TLS_KEY_FILE   when the server runs with TLS (the address must then
#                                      match a name in its certificate)
set -euo pipefail
listen=${MOELORA_LISTEN:-0.0.0.0:50051}
address=${MOELORA_HEALTHCHECK_ADDRESS:-127.0.0.1:${listen##*:}}
args=(health "--address=$address" --timeout=4s)
[ -z "${MOELORA_HEALTHCHECK_TLS_CA_FILE:-}" ] || args+=("--tls_ca_file=$MOELORA_HEALTHCHECK_TLS_CA_FILE")
[ -z "${MOELORA_HEALTHCHECK_TLS_CERT_FILE:-}" ] || args+=("--tls_cert_file=$MOELORA_HEALTHCHECK_TLS_CERT_FILE")
[ -z "${MOELORA_HEALTHCHECK_TLS_KEY_FILE:-}" ] || args+=("--tls_key_file=$MOELORA_HEALTHCHECK_TLS_KEY_FILE")
exec /opt/moelora/bin/moelora-cli "${args[@]}"
