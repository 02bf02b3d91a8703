#!/usr/bin/env bash
# Does `idle_yield` (sched_yield before the event loop sleeps in epoll) win
# on this host? One interleaved run of `--idle-yield true` against `false`
# for each keep-alive worker type, on four kinds of load:
#
#   c16        wrk -c16, as in bench/run.sh: wrk shares the 2 workers' CPUs;
#   c256       wrk -c256: a loop that rarely runs out of work;
#   split      1 worker pinned to CPU 1, wrk pinned to CPU 0: nothing else
#              is runnable on the worker's CPU, so a yield returns at once
#              and the loop sleeps anyway (the host where it cannot help);
#   rate       oha at 50% of the yield-on c16 peak: p50 and p99 latency.
#
#   bench/idle_yield.sh              # about 12 minutes; rewrites its section of BENCHMARKS.md
#   BENCH_QUICK=1 bench/idle_yield.sh   # 1 round, under 2 minutes; table on stdout only
#   BENCH_HALT_POLL_NS="0 200000" bench/idle_yield.sh   # once per cpuidle-haltpoll setting
#
# Each round runs every (type, load) pair with the yield on, then off (odd
# rounds) or off, then on (even rounds); ratios are the median over rounds of
# on / off in the same round, so host drift between minutes cancels out.
# Environment: BENCH_YIELD_KINDS ("thread eventloop greenlet"),
# BENCH_YIELD_LOADS ("c16 c256 split rate"), BENCH_YIELD_ROUNDS (3; quick 1),
# BENCH_SECONDS (5; quick 3), BENCH_HALT_POLL_NS (a list; if the guest's
# cpuidle-haltpoll parameter /sys/module/haltpoll/parameters/guest_halt_poll_ns
# is writable, the whole run is repeated with it set to each value, and the
# old value is restored at the end: idle vCPUs then poll that long before
# they halt), BENCH_YIELD_WRITE (1; quick 0: write BENCHMARKS.md's section),
# CARGO_TARGET_DIR. Raw rows: bench/out/idle_yield.jsonl.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=$HERE/out
QUICK=${BENCH_QUICK:-0}
q() { if [[ $QUICK == 1 ]]; then echo "$2"; else echo "$1"; fi; }
KINDS=${BENCH_YIELD_KINDS:-thread eventloop greenlet}
LOADS=${BENCH_YIELD_LOADS:-c16 c256 split rate}
ROUNDS=${BENCH_YIELD_ROUNDS:-$(q 3 1)}
SECS=${BENCH_SECONDS:-$(q 5 3)}
PORT=${BENCH_PORT:-18000}
MPORT=${BENCH_METRICS_PORT:-19091}
URL=http://127.0.0.1:$PORT/
CONNS=16
JSONL=$OUT/idle_yield.jsonl
WRITE=${BENCH_YIELD_WRITE:-$(q 1 0)}
mkdir -p "$OUT/logs"
: >"$JSONL"

for tool in wrk curl taskset; do
  command -v "$tool" >/dev/null || { echo "bench/idle_yield.sh: $tool is missing" >&2; exit 1; }
done
[[ $LOADS != *rate* ]] || command -v oha >/dev/null || {
  echo "bench/idle_yield.sh: oha is missing (cargo install oha --locked), or drop rate from BENCH_YIELD_LOADS" >&2
  exit 1
}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
(cd "$ROOT" && cargo build --release -q -p gpe)
GPE=$CARGO_TARGET_DIR/release/gpe
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

HALT=/sys/module/haltpoll/parameters/guest_halt_poll_ns
HALT_WAS=$(cat "$HALT" 2>/dev/null || echo "n/a")
HALTS=${BENCH_HALT_POLL_NS:-}
if [[ -n $HALTS && ! -w $HALT ]]; then
  echo "bench/idle_yield.sh: $HALT is not writable; BENCH_HALT_POLL_NS ignored" >&2
  HALTS=""
fi
if [[ -n $HALTS ]]; then
  trap 'echo "$HALT_WAS" >"$HALT"; cleanup' EXIT
else
  HALTS=$HALT_WAS
fi

# One measurement: kind $1, load $2, yield $3 (true|false), round $4.
one() {
  local kind=$1 load=$2 yield=$3 round=$4 workers=2 pin=() wpin=() conns=16 res
  case $load in
    c256) conns=256 ;;
    split) workers=1; pin=(taskset -c 1); wpin=(taskset -c 0) ;;
  esac
  start_server "yield-$kind-$load-$yield-r$round" "${pin[@]}" "$GPE" serve -k "$kind" -w "$workers" \
    --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT" --idle-yield "$yield"
  if ! wait_http "$URL" 20; then
    echo "-- $kind $load yield=$yield: did not start (see bench/out/logs/)" >&2
    stop_server
    return 0
  fi
  CONNS=$conns run_wrk 0 1 >/dev/null || true
  if [[ $load == rate ]]; then
    local peak=${PEAK[$kind]:-0}
    if ((peak == 0)); then stop_server; return 0; fi
    res=$(timeout $((SECS + 30)) oha --no-tui --output-format json --latency-correction \
      -z "${SECS}s" -c "$CONNS" -q $((peak / 2)) "$URL" 2>>"$OUT/logs/oha.log" | tr -d '\n' || true)
    [[ -n $res ]] || res=null
    printf '{"kind":"%s","load":"%s","yield":%s,"round":%s,"halt":"%s","rate":%s,"oha":%s}\n' \
      "$kind" "$load" "$yield" "$round" "$HALT_NOW" $((peak / 2)) "$res" >>"$JSONL"
  else
    res=$(CONNS=$conns WRK_PREFIX="${wpin[*]}" run_wrk 0 "$SECS" || true)
    [[ -n $res ]] || res=null
    printf '{"kind":"%s","load":"%s","yield":%s,"round":%s,"halt":"%s","conns":%s,"workers":%s,"wrk":%s}\n' \
      "$kind" "$load" "$yield" "$round" "$HALT_NOW" "$conns" "$workers" "$res" >>"$JSONL"
    if [[ $load == c16 && $yield == true && $res != null ]]; then
      PEAK[$kind]=$(python3 -c 'import json,sys; w=json.loads(sys.argv[1]); print(int(w["requests"]/(w["duration_us"]/1e6)))' "$res")
    fi
  fi
  stop_server
}

declare -A PEAK
for HALT_NOW in $HALTS; do
  [[ $HALT_NOW == "$HALT_WAS" && ${BENCH_HALT_POLL_NS:-} == "" ]] || echo "$HALT_NOW" >"$HALT"
  PEAK=()
  echo "-- idle_yield: kinds [$KINDS], loads [$LOADS], $ROUNDS round(s) of ${SECS}s, guest_halt_poll_ns $HALT_NOW" >&2
  for r in $(seq 1 "$ROUNDS"); do
    for kind in $KINDS; do
      for load in $LOADS; do
        if ((r % 2)); then order="true false"; else order="false true"; fi
        for y in $order; do one "$kind" "$load" "$y" "$r"; done
      done
    done
  done
done

{
  echo "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "rounds=$ROUNDS"
  echo "secs=$SECS"
  echo "machine=$(nproc) CPUs, $(lscpu 2>/dev/null | sed -n 's/^Model name: *//p' | head -1), Linux $(uname -r)"
} >"$OUT/idle_yield.meta"
BENCH_YIELD_WRITE=$WRITE python3 "$HERE/yield_report.py" "$ROOT" "$OUT"
