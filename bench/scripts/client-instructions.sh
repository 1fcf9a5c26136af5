#!/usr/bin/env bash
# Instructions the pooled client (nexus-client) spends on small streams, counted by callgrind:
# the client-side twin of server-instructions.sh.
#
#   bench/scripts/client-instructions.sh [NEXUS_BENCH_BINARY] [STREAMS]
#
# Starts this tree's `nexus serve` (epoll, one shard, not under valgrind) on a free port and
# runs `NEXUS_BENCH_BINARY streams ADDRESS STREAMS` (default 5000 synthetic:4KiB streams, 64
# in flight, epoll) under callgrind. Prints the total and per-stream instruction counts.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=$(realpath "${1:-target/release/nexus-bench}")
streams=${2:-5000}
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 2; }
[ -x target/release/nexus ] || cargo build --release --locked -p nexus-cli
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=$(mktemp -d)
BURST_NEXUS_SERVER_PORT=$port BURST_NEXUS_SERVER_THREADS=1 BURST_NEXUS_IO_BACKEND=epoll \
  BURST_NEXUS_ADMIN_ADDRESS= RUST_LOG=warn target/release/nexus serve >"$out/serve.log" 2>&1 &
server=$!
trap 'kill -TERM $server 2>/dev/null || true' EXIT
for _ in $(seq 1 240); do
  (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.5
done
BURST_NEXUS_IO_BACKEND=epoll valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" \
  "$binary" streams "127.0.0.1:$port" "$streams" >"$out/client.log" 2>&1
total=$(awk '/^totals:/ {print $2}' "$out/callgrind.out")
echo "$binary: $total instructions for $streams streams ($((total / streams)) per stream, startup included); profile in $out/callgrind.out"
