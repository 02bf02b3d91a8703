#!/usr/bin/env bash
# The axum Router's hello (examples/axum-app) against gpe's native hello, in
# one interleaved run: KIND (eventloop) -w 2, metrics on, wrk -t1 -c16, 2 s
# warm-up then 8 s, 4 rounds alternating which goes first. Prints one line per
# run: variant, req/s, 1-minute load average. Build first:
#   cargo build --release -p gpe -p gpe-example-axum-app
set -u
T=${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/release
KIND=${KIND:-eventloop}
run() { # $1 label, rest command
  local label=$1; shift
  local dir; dir=$(mktemp -d)
  "$@" -k "$KIND" -w 2 --bind 127.0.0.1:18100 --metrics-bind 127.0.0.1:19100 --metrics-dir "$dir/m" >"$dir/log" 2>&1 &
  local pid=$!
  for i in $(seq 1 100); do curl -s -o /dev/null http://127.0.0.1:18100/ && break; sleep 0.1; done
  wrk -t1 -c16 -d2s http://127.0.0.1:18100/ >/dev/null 2>&1
  local out; out=$(wrk -t1 -c16 -d8s http://127.0.0.1:18100/ 2>&1 | awk '/Requests\/sec/ {print $2}')
  kill -TERM $pid; wait $pid 2>/dev/null
  echo "$label $out $(cut -d' ' -f1 /proc/loadavg)"
}
for r in 1 2 3 4; do
  if (( r % 2 )); then run native $T/gpe serve; run axum $T/gpe-axum-app; else run axum $T/gpe-axum-app; run native $T/gpe serve; fi
done
