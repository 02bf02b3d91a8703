#!/usr/bin/env bash
# A/B throughput of gpe against an earlier commit, in one interleaved run.
#
#   bench/ab.sh OLD_REV              # e.g. bench/ab.sh ac01d24
#   BENCH_AB_WRITE=1 bench/ab.sh OLD_REV   # also rewrites BENCHMARKS.md's A/B section
#
# Builds OLD_REV in release in a git worktree of its own (BENCH_AB_DIR, default
# /tmp/gpe-ab-OLD_REV, with its own target dir) and the current tree in release,
# then, for each worker type, serves the built-in hello app with
# `gpe serve -k TYPE -w 2` (metrics on) from each build in turn and loads it with
# the wrk shape of bench/run.sh (wrk -t1 -c16, warm-up then BENCH_SECONDS; sync
# with `Connection: close`). Old and new alternate, BENCH_AB_ROUNDS times each:
# round 1 runs old then new, round 2 new then old, and so on, so a drift of the
# machine's speed does not favour one side. The ratio of each round is new/old
# of its two runs; the table shows the median of those ratios per type.
#
# BENCH_AB_PERF=1 adds, per type and build, one more run of the same shape
# under `perf stat` on the worker processes: CPU µs, context switches and
# syscalls per request.
#
# Environment: BENCH_AB_ROUNDS (3), BENCH_AB_KINDS ("sync thread eventloop
# greenlet"), BENCH_AB_DIR, BENCH_AB_PERF, BENCH_AB_WRITE, BENCH_SECONDS (10),
# BENCH_WARMUP (2), BENCH_CONNECTIONS (16), BENCH_PORT (18000),
# BENCH_METRICS_PORT (19091), CARGO_TARGET_DIR (the new build; default ./target).
# Output: bench/out/ab.jsonl (one run per line), bench/out/ab-perf.jsonl.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=$HERE/out
OLD_REV=${1:?usage: bench/ab.sh OLD_REV}
ROUNDS=${BENCH_AB_ROUNDS:-3}
KINDS=${BENCH_AB_KINDS:-sync thread eventloop greenlet}
SECS=${BENCH_SECONDS:-10}
WARM=${BENCH_WARMUP:-2}
CONNS=${BENCH_CONNECTIONS:-16}
PORT=${BENCH_PORT:-18000}
MPORT=${BENCH_METRICS_PORT:-19091}
URL=http://127.0.0.1:$PORT/
NEW_TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
OLD_SHORT=$(git -C "$ROOT" rev-parse --short "$OLD_REV^{commit}")
OLD_DIR=${BENCH_AB_DIR:-/tmp/gpe-ab-$OLD_SHORT}

# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

log() { printf '\n== %s\n' "$*" >&2; }

build() {
  if [[ ! -e $OLD_DIR/.git ]]; then
    log "git worktree add $OLD_DIR $OLD_SHORT"
    git -C "$ROOT" worktree add --detach "$OLD_DIR" "$OLD_SHORT" >&2
  fi
  [[ $(git -C "$OLD_DIR" rev-parse --short HEAD) == "$OLD_SHORT" ]] ||
    { echo "$OLD_DIR is not at $OLD_SHORT" >&2; exit 1; }
  log "cargo build --release -p gpe at $OLD_SHORT (target $OLD_DIR/target)"
  (cd "$OLD_DIR" && CARGO_TARGET_DIR=$OLD_DIR/target cargo build --release -q -p gpe)
  log "cargo build --release -p gpe of the current tree (target $NEW_TARGET)"
  (cd "$ROOT" && CARGO_TARGET_DIR=$NEW_TARGET cargo build --release -q -p gpe)
}

gpe_bin() { # $1 old or new
  if [[ $1 == old ]]; then echo "$OLD_DIR/target/release/gpe"; else echo "$NEW_TARGET/release/gpe"; fi
}

start_gpe() { # $1 old/new, $2 kind
  start_server "ab-$1-$2" "$(gpe_bin "$1")" serve -k "$2" -w 2 \
    --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT"
  wait_http "$URL" 20 || { echo "   $1 $2 did not start (see $OUT/logs/ab-$1-$2.log)" >&2; return 1; }
  sleep 0.5
}

# One measured run; appends a line to ab.jsonl. With perf, the measured run
# also counts the workers' task-clock and context switches (software
# counters): CPU per request moves far less than req/s when other jobs share
# the machine.
CPU_EVENTS=task-clock,context-switches
ab_run() { # $1 old/new, $2 kind, $3 round
  local side=$1 kind=$2 round=$3 close=0 res pids counts="" csv=$OUT/logs/ab-$1-$2-$3.csv
  [[ $kind == sync ]] && close=1
  if start_gpe "$side" "$kind"; then
    run_wrk "$close" "$WARM" >/dev/null || true
    if ((HAVE_PERF)); then
      pids=$(gpe_worker_pids "$SERVER_PID" | paste -sd,)
      perf stat -x, -o "$csv" -e "$CPU_EVENTS" -p "$pids" -- sleep $((SECS + 1)) 2>/dev/null &
      local perf_pid=$!
      res=$(run_wrk "$close" "$SECS" || true)
      kill -INT "$perf_pid" 2>/dev/null || true
      wait "$perf_pid" 2>/dev/null || true
      counts=$(awk -F, '$1 ~ /^[0-9.]+$/ {printf "%s\"%s\":%s", (n++ ? "," : ""), $3, $1}' "$csv" 2>/dev/null || true)
    else
      res=$(run_wrk "$close" "$SECS" || true)
    fi
  fi
  [[ -n ${res:-} ]] || res=null
  printf '{"side":"%s","kind":"%s","round":%s,"load1":%s,"wrk":%s,"perf":{%s}}\n' \
    "$side" "$kind" "$round" "$(cut -d' ' -f1 /proc/loadavg)" "$res" "$counts" >>"$OUT/ab.jsonl"
  echo "   round $round $side $kind: $res $counts" >&2
  stop_server
}

# One run under perf stat on the workers; appends a line to ab-perf.jsonl.
PERF_EVENTS=task-clock,context-switches,raw_syscalls:sys_enter,syscalls:sys_enter_futex
ab_perf() { # $1 old/new, $2 kind
  local side=$1 kind=$2 close=0 hdr=() pids csv res counts
  [[ $kind == sync ]] && { close=1; hdr=(-H 'Connection: close'); }
  start_gpe "$side" "$kind" || { stop_server; return 0; }
  pids=$(gpe_worker_pids "$SERVER_PID" | paste -sd,)
  csv=$OUT/logs/ab-perf-$side-$kind.csv
  run_wrk "$close" "$WARM" >/dev/null || true
  res=$(timeout $((SECS + 30)) perf stat -x, -o "$csv" -e "$PERF_EVENTS" -p "$pids" -- \
    wrk -t1 -c"$CONNS" -d"${SECS}s" --timeout 5s -s "$HERE/wrk/report.lua" "${hdr[@]}" "$URL" 2>&1 |
    sed -n 's/^WRKJSON //p' || true)
  counts=$(awk -F, '$1 ~ /^[0-9.]+$/ {printf "%s\"%s\":%s", (n++ ? "," : ""), $3, $1}' "$csv" 2>/dev/null || true)
  printf '{"side":"%s","kind":"%s","load1":%s,"wrk":%s,"perf":{%s}}\n' \
    "$side" "$kind" "$(cut -d' ' -f1 /proc/loadavg)" "${res:-null}" "$counts" >>"$OUT/ab-perf.jsonl"
  echo "   perf $side $kind: $counts" >&2
  stop_server
}

main() {
  mkdir -p "$OUT/logs"
  rm -f "$OUT/ab.jsonl" "$OUT/ab-perf.jsonl"
  : >"$OUT/ab.jsonl"
  build
  HAVE_PERF=0
  perf stat -e "$CPU_EVENTS" -- true >/dev/null 2>&1 && HAVE_PERF=1
  for p in "$PORT" "$MPORT"; do
    ss -Hltn "sport = :$p" | grep -q . && { echo "port $p is busy; set BENCH_*PORT" >&2; exit 1; }
  done
  local new_commit kind round
  new_commit=$(git -C "$ROOT" rev-parse --short HEAD)
  git -C "$ROOT" diff-index --quiet HEAD -- ':!BENCHMARKS.md' ':!docs/bench.png' ':!bench' 2>/dev/null ||
    new_commit+=" dirty"
  {
    echo "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "old=$OLD_SHORT"
    echo "new=$new_commit"
    echo "loadavg_start=$(cut -d' ' -f1-3 /proc/loadavg)"
    printf 'seconds=%s\nwarmup=%s\nconnections=%s\nrounds=%s\n' "$SECS" "$WARM" "$CONNS" "$ROUNDS"
  } >"$OUT/ab.meta"
  log "A/B $OLD_SHORT (old) vs $new_commit (new): $ROUNDS rounds, wrk -t1 -c$CONNS, ${WARM}s + ${SECS}s"
  for kind in $KINDS; do
    for round in $(seq 1 "$ROUNDS"); do
      if ((round % 2)); then ab_run old "$kind" "$round"; ab_run new "$kind" "$round"
      else ab_run new "$kind" "$round"; ab_run old "$kind" "$round"; fi
    done
  done
  if [[ ${BENCH_AB_PERF:-0} == 1 ]]; then
    : >"$OUT/ab-perf.jsonl"
    log "perf stat: one more run per type and build"
    for kind in $KINDS; do ab_perf old "$kind"; ab_perf new "$kind"; done
  fi
  echo "loadavg_end=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/ab.meta"
  python3 "$HERE/ab_report.py" "$ROOT" "$OUT"
}
main "$@"
