#!/usr/bin/env bash
# CPU time per request, by layer: where a keep-alive request's time goes on
# each server, kernel included (bench/instructions.sh counts user-space
# instructions only).
#
#   bench/layers.sh                       # table on stdout
#   BENCH_LAYERS_WRITE=1 bench/layers.sh  # also rewrites its section of BENCHMARKS.md
#
# Each server of BENCH_LAYERS_SERVERS runs alone on loopback and is loaded
# with bench/run.sh's wrk shape (wrk -t1 -c16, 1 s warm-up, then
# BENCH_SECONDS measured). The measured run happens under
# `perf record -e cpu-clock --call-graph dwarf -p PIDS`, attached to the
# server's own processes (gpe: its workers, by pid; the forked ceiling: its
# children; the ceiling: its one process) for exactly as long as wrk runs.
# bench/layers.py gives each sample to the innermost layer on its stack and
# divides each layer's CPU time (the samples' periods) by the requests wrk
# counted: microseconds of CPU per request, by layer. The sum is the
# servers' CPU per request under the profiler (a few percent above the
# perf-stat figure of bench/run.sh: taking a sample's stack costs time).
#
# Servers: ceiling (bench/ceiling, 2-thread runtime), forked (its
# `--forked 2`), forked-bal (`--forked 2 --balanced`: connections split as
# gpe's workers split them), and gpe thread, eventloop and greenlet
# (`serve -k TYPE -w 2`, the built-in hello, metrics on).
# Environment: BENCH_LAYERS_SERVERS ("ceiling forked forked-bal eventloop
# thread greenlet"), BENCH_SECONDS (5), BENCH_LAYERS_FREQ (sampling Hz per CPU, 1999),
# BENCH_LAYERS_WRITE, BENCH_PORT, BENCH_METRICS_PORT, CARGO_TARGET_DIR, BENCH_BUILT (1: do
# not build first).
# Output: bench/out/layers.jsonl (one server per line), bench/out/layers/.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=$HERE/out
SERVERS=${BENCH_LAYERS_SERVERS:-ceiling forked forked-bal eventloop thread greenlet}
SECS=${BENCH_SECONDS:-5}
FREQ=${BENCH_LAYERS_FREQ:-1999}
PORT=${BENCH_PORT:-18000}
MPORT=${BENCH_METRICS_PORT:-19091}
CONNS=16
URL=http://127.0.0.1:$PORT/
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
mkdir -p "$OUT/logs" "$OUT/layers"

command -v perf >/dev/null || { echo "bench/layers.sh: perf is missing (Debian: linux-perf)" >&2; exit 1; }
# bench/run.sh built everything at its start (BENCH_BUILT=1): building again
# would measure whatever the tree holds by then.
[[ ${BENCH_BUILT:-0} == 1 ]] ||
  (cd "$ROOT" && cargo build --release -q -p gpe && cargo build --release -q -p gpe-bench-ceiling)
GPE=$TARGET/release/gpe
CEILING=$TARGET/release/gpe-bench-ceiling

# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# The pids to profile of server $1 (started as $SERVER_PID).
profiled_pids() {
  case $1 in
    ceiling) echo "$SERVER_PID" ;;
    forked | forked-bal) children "$SERVER_PID" ;;
    *) gpe_worker_pids "$SERVER_PID" ;;
  esac
}

measure() {
  local name=$1 pids res data=$OUT/layers/$1.data
  case $name in
    ceiling) start_server "layers-$name" "$CEILING" --bind "127.0.0.1:$PORT" ;;
    forked) start_server "layers-$name" "$CEILING" --bind "127.0.0.1:$PORT" --forked 2 ;;
    forked-bal) start_server "layers-$name" "$CEILING" --bind "127.0.0.1:$PORT" --forked 2 --balanced ;;
    *) start_server "layers-$name" "$GPE" serve -k "$name" -w 2 \
      --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT" ;;
  esac
  wait_http "$URL" 20 || { echo "   $name did not start (see $OUT/logs/layers-$name.log)" >&2; stop_server; return 1; }
  run_wrk 0 1 >/dev/null
  pids=$(profiled_pids "$name" | paste -sd, -)
  [[ -n $pids ]] || { echo "   $name: no processes to profile" >&2; stop_server; return 1; }
  # perf profiles the pids for as long as its command (the measured wrk) runs.
  res=$(perf record -q -e cpu-clock -F "$FREQ" --call-graph dwarf,16384 -p "$pids" -o "$data" -- \
    bash -c "source '$HERE/lib.sh'; HERE='$HERE' OUT='$OUT' CONNS=$CONNS URL='$URL' run_wrk 0 $SECS" \
    2>>"$OUT/logs/layers-$name.log")
  stop_server
  [[ -n $res ]] || { echo "   $name: wrk gave no result" >&2; return 1; }
  local requests
  requests=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["requests"])' "$res")
  echo "   $name: $requests requests, profiling $pids" >&2
  perf script -i "$data" -F comm,tid,period,ip,sym,dso 2>/dev/null |
    python3 "$HERE/layers.py" attribute --server "$name" --requests "$requests" |
    tee -a "$OUT/layers.jsonl"
  rm -f "$data"
}

: >"$OUT/layers.jsonl"
for s in $SERVERS; do measure "$s" || true; done
{
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "secs=$SECS"
  echo "freq=$FREQ"
} >"$OUT/layers.meta"
BENCH_LAYERS_WRITE=${BENCH_LAYERS_WRITE:-0} python3 "$HERE/layers.py" report "$ROOT" "$OUT"
