# Sourced by the scripts that run moelora-server on loopback (demo.sh, gpu-concurrency-check.sh,
# gpu-bench.sh).

# free_ports N: N free loopback ports, picked by the kernel, on one line.
free_ports() {
  python3 -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in socks])' "$1"
}

# wait_until_serving CLI ADDRESS PID LOG [SECONDS]: polls `CLI health` on ADDRESS for up to
# SECONDS (default 60); fails with the server's log when process PID exits first or never answers.
wait_until_serving() {
  local cli=$1 address=$2 pid=$3 log=$4 seconds=${5:-60}
  for _ in $(seq 1 $((seconds * 2))); do
    "$cli" --address="$address" health --timeout=1s >/dev/null 2>&1 && return 0
    if ! kill -0 "$pid" 2>/dev/null; then cat "$log"; echo "the server exited"; return 1; fi
    sleep 0.5
  done
  cat "$log"; echo "the server did not answer health checks in $seconds s"; return 1
}
