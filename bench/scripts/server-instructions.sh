#!/usr/bin/env bash
# Instructions a `nexus serve` spends on small streams, counted by callgrind: steadier than
# times on a shared machine, and comparable between two builds in one sitting.
#
#   bench/scripts/server-instructions.sh NEXUS_BINARY [STREAMS_PER_ROUND] [ROUNDS]
#
# Starts NEXUS_BINARY serve (epoll: valgrind does not follow io_uring; one shard) under
# valgrind on a free port, pulls ROUNDS x STREAMS_PER_ROUND synthetic:4KiB streams with this
# tree's `nexus-bench pull` (built if missing), stops the server with SIGTERM and prints the
# total instruction count. Repeat runs of one binary differ by about 0.4% (read batches
# depend on timing). Needs valgrind.
set -euo pipefail
cd "$(dirname "$0")/../.."
binary=$(realpath "$1")
per_round=${2:-1000}
rounds=${3:-5}
command -v valgrind >/dev/null || { echo "valgrind is needed" >&2; exit 2; }
[ -x target/release/nexus-bench ] || cargo build --release --locked -p nexus-bench
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=$(mktemp -d)
BURST_NEXUS_SERVER_PORT=$port BURST_NEXUS_SERVER_THREADS=1 BURST_NEXUS_SERVER_BACKEND=epoll \
  BURST_NEXUS_ADMIN_ADDRESS= RUST_LOG=warn \
  valgrind --tool=callgrind --callgrind-out-file="$out/callgrind.out" "$binary" serve \
  >"$out/serve.log" 2>&1 &
server=$!
for _ in $(seq 1 240); do
  (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
  sleep 0.5
done
paradata=()
for _ in $(seq 1 "$per_round"); do paradata+=("synthetic:4KiB"); done
for _ in $(seq 1 "$rounds"); do
  target/release/nexus-bench pull "127.0.0.1:$port" "${paradata[@]}" >/dev/null
done
kill -TERM "$server"
wait "$server" || true
total=$(awk '/^totals:/ {print $2}' "$out/callgrind.out")
echo "$binary: $total instructions for $((per_round * rounds)) streams ($((total / (per_round * rounds))) per stream, startup included); profile in $out/callgrind.out"
