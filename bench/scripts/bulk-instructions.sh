#!/usr/bin/env bash
# Instructions per GB on a fixed bulk transfer, counted by callgrind for each end: the server,
# the client, and iperf3's two ends moving the same bytes. Steadier than times on a shared
# machine (issue 20's method).
#
#   bench/scripts/bulk-instructions.sh [NEXUS_BINARY] [PARADATA]
#
# Defaults: target/release/nexus and synthetic:1GiB. Both Nexus ends use epoll (valgrind does
# not follow io_uring) and one thread; the client writes to /dev/null. iperf3 sends the same
# number of bytes (-n) in 1 MiB writes. Callgrind counts user-space instructions only: the
# kernel's socket copies, the bulk of iperf3's work, are not in these figures.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=$(realpath "${1:-target/release/nexus}")
paradata=${2:-synthetic:1GiB}
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 2; }
command -v iperf3 >/dev/null || { echo "iperf3 is needed" >&2; exit 2; }
bytes=$(python3 - "$paradata" <<'EOF'
import re, sys
m = re.search(r'(\d+)(KiB|MiB|GiB)?$', sys.argv[1])
units = {None: 1, 'KiB': 1 << 10, 'MiB': 1 << 20, 'GiB': 1 << 30}
print(int(m.group(1)) * units[m.group(2)])
EOF
)
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
wait_port() {
  for _ in $(seq 1 240); do
    (echo >"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.5
  done
  echo "nothing listens on $1" >&2
  exit 1
}
total() { awk '/^totals:/ {print $2}' "$1"; }
per_gb() { python3 -c "print(f'{$1 / ($bytes / 1e9) / 1e6:.1f}')"; }
out=$(mktemp -d)
grind=(valgrind --tool=callgrind --dump-instr=no)

port=$(free_port)
BURST_NEXUS_SERVER_PORT=$port BURST_NEXUS_SERVER_THREADS=1 BURST_NEXUS_IO_BACKEND=epoll \
  BURST_NEXUS_ADMIN_ADDRESS= RUST_LOG=warn \
  "${grind[@]}" --callgrind-out-file="$out/server.out" "$binary" serve >"$out/serve.log" 2>&1 &
server=$!
wait_port "$port"
BURST_NEXUS_IO_BACKEND=epoll BURST_NEXUS_CLIENT_THREADS=1 RUST_LOG=warn \
  "${grind[@]}" --callgrind-out-file="$out/client.out" "$binary" pull "127.0.0.1:$port" \
  "$paradata" -o /dev/null >"$out/pull.log" 2>&1
kill -TERM "$server"
wait "$server" || true

port=$(free_port)
"${grind[@]}" --callgrind-out-file="$out/iperf3-server.out" iperf3 -s -1 -p "$port" \
  >"$out/iperf3-server.log" 2>&1 &
server=$!
# Not wait_port: a probe connection would be the one test `-1` serves.
for _ in $(seq 1 240); do
  grep -q "Server listening" "$out/iperf3-server.log" && break
  sleep 0.5
done
"${grind[@]}" --callgrind-out-file="$out/iperf3-client.out" iperf3 -c 127.0.0.1 -p "$port" \
  -n "$bytes" -l 1M >"$out/iperf3-client.log" 2>&1
wait "$server" || true

s=$(total "$out/server.out") c=$(total "$out/client.out")
is=$(total "$out/iperf3-server.out") ic=$(total "$out/iperf3-client.out")
echo "user-space instructions per GB ($paradata, $bytes bytes), millions:"
echo "  nexus serve  $(per_gb "$s")"
echo "  nexus pull   $(per_gb "$c")"
echo "  iperf3 -s    $(per_gb "$is")"
echo "  iperf3 -c    $(per_gb "$ic")"
echo "profiles in $out (callgrind_annotate FILE)"
