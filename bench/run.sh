#!/usr/bin/env bash
# gpe benchmark: one command, one run, regenerates BENCHMARKS.md and docs/bench.png.
#
#   bench/run.sh                     # full run (about 14 minutes on 2 cores)
#   BENCH_SECONDS=3 bench/run.sh     # quick check (shorter load phases)
#   bench/ab.sh OLD_REV              # A/B against an earlier commit (see its header)
#
# What it does (see BENCHMARKS.md for the method):
#  1. installs what it needs (apt-get: wrk, gnuplot-nox, curl, iproute2, procps;
#     a virtualenv in bench/venv with gunicorn + gunicorn-prometheus-exporter,
#     gevent, eventlet from PyPI) and builds gpe and bench/ceiling in release mode;
#  2. loads, one server at a time, with wrk (1 thread, 16 connections, warm-up then
#     BENCH_SECONDS): the bare tokio+hyper ceiling, gpe for each worker type with
#     metrics on and off, the same hello through the axum Router of examples/axum-app
#     (keep-alive types, metrics on), and gunicorn with and without the exporter;
#     then HTTPS keep-alive rows: the ceiling with tokio-rustls right before each
#     keep-alive gpe type served with --certfile/--keyfile (a self-signed
#     certificate made with openssl; wrk speaks HTTP/1.1 over TLS);
#  3. measures the scrape cost of /metrics with 8 workers x 1,000 label sets, then
#     again after 200 worker respawns forced by max_requests = 20, for gpe and the peer;
#  4. counts syscalls, context switches and CPU per request with `perf stat` for the
#     ceiling and the keep-alive worker types (with and without idle_yield; eventloop
#     serving the axum Router too);
#  5. runs the criterion micro-benchmark of the hot path (core/benches/hot_path.rs);
#  6. writes BENCHMARKS.md and docs/bench.png (bench/report.py).
#
# Environment: BENCH_SECONDS (10), BENCH_WARMUP (2), BENCH_CONNECTIONS (16),
# BENCH_PORT (18000), BENCH_METRICS_PORT (19091), BENCH_PEER_METRICS_PORT (19092),
# BENCH_SCRAPES (50), BENCH_RESPAWNS (200), BENCH_REPEAT (3 runs of each gpe row), BENCH_SKIP_PEER=1, BENCH_SKIP_MICRO=1,
# BENCH_SKIP_PROFILE=1, BENCH_SKIP_AXUM=1, BENCH_SKIP_SCRAPE=1, BENCH_SKIP_TLS=1, BENCH_PROFILE_SECONDS (5),
# BENCH_KINDS (gpe worker types to load; default "sync thread eventloop greenlet"),
# CARGO_TARGET_DIR (default: ./target).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=$HERE/out
VENV=$HERE/venv
SECS=${BENCH_SECONDS:-10}
WARM=${BENCH_WARMUP:-2}
CONNS=${BENCH_CONNECTIONS:-16}
PORT=${BENCH_PORT:-18000}
MPORT=${BENCH_METRICS_PORT:-19091}
PPORT=${BENCH_PEER_METRICS_PORT:-19092}
SCRAPES=${BENCH_SCRAPES:-50}
REPEAT=${BENCH_REPEAT:-3}
RESPAWNS=${BENCH_RESPAWNS:-200}
KINDS=${BENCH_KINDS:-sync thread eventloop greenlet}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
GPE=$CARGO_TARGET_DIR/release/gpe
CEILING=$CARGO_TARGET_DIR/release/gpe-bench-ceiling
AXUM=$CARGO_TARGET_DIR/release/gpe-axum-app
URL=http://127.0.0.1:$PORT/

# Peer versions (gunicorn 24+ crashes the exporter 0.2.4).
PEER_PKGS=(gunicorn==23.0.0 gunicorn-prometheus-exporter==0.2.4 gevent eventlet)

log() { printf '\n== %s\n' "$*" >&2; }

# Processes, readiness checks, run_wrk (the shared wrk shape).
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# Warm-up, measured load, RSS of the workers at the end of the load; appends a row.
# $1 server, $2 kind, $3 variant, $4 close(0/1), $5 pid-lister command, $6 note
measure() {
  local server=$1 kind=$2 variant=$3 close=$4 lister=$5 note=${6:-}
  echo "-- $server $kind $variant (warm-up ${WARM}s, load ${SECS}s)" >&2
  run_wrk "$close" "$WARM" >/dev/null || true
  local res pids rss
  res=$(run_wrk "$close" "$SECS" || true)
  # shellcheck disable=SC2046
  pids=$($lister)
  # shellcheck disable=SC2086
  rss=$(mean_rss_mib $pids)
  [[ -n $res ]] || res=null
  printf '{"server":"%s","kind":"%s","variant":"%s","close":%s,"workers":%s,"rss_mib":%s,"note":"%s","load1":%s,"wrk":%s}\n' \
    "$server" "$kind" "$variant" "$close" "$(wc -w <<<"$pids")" "$rss" "$note" "$(cut -d' ' -f1 /proc/loadavg)" "$res" >>"$OUT/results.jsonl"
  echo "   $res rss=${rss}MiB pids=[$(echo $pids)]" >&2
}
skip_row() {
  printf '{"server":"%s","kind":"%s","variant":"%s","close":0,"workers":0,"rss_mib":null,"note":"%s","wrk":null}\n' \
    "$1" "$2" "$3" "$4" >>"$OUT/results.jsonl"
}

# ---------------------------------------------------------------- setup
setup() {
  local missing=()
  command -v wrk >/dev/null || missing+=(wrk)
  command -v gnuplot >/dev/null || missing+=(gnuplot-nox)
  command -v curl >/dev/null || missing+=(curl)
  command -v openssl >/dev/null || missing+=(openssl)
  command -v ss >/dev/null || missing+=(iproute2)
  command -v pgrep >/dev/null || missing+=(procps)
  [[ -x /usr/bin/time ]] || missing+=(time)
  [[ ${BENCH_SKIP_PROFILE:-0} == 1 ]] || command -v perf >/dev/null || missing+=(linux-perf)
  command -v python3 >/dev/null || missing+=(python3 python3-venv)
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
  if [[ ${BENCH_SKIP_PEER:-0} != 1 ]] && ! "$VENV/bin/python" -c 'import gunicorn, gunicorn_prometheus_exporter, gevent, eventlet, sys; sys.exit(gunicorn.__version__ != "23.0.0")' 2>/dev/null; then
    log "virtualenv $VENV: ${PEER_PKGS[*]}"
    python3 -m venv "$VENV" || { apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv "$VENV"; }
    "$VENV/bin/pip" install -q "${PEER_PKGS[@]}"
  fi
  log "cargo build --release -p gpe; -p gpe-bench-ceiling; -p gpe-example-axum-app (target $CARGO_TARGET_DIR)"
  (cd "$ROOT" && cargo build --release -q -p gpe && cargo build --release -q -p gpe-bench-ceiling &&
    cargo build --release -q -p gpe-example-axum-app)
}

# ---------------------------------------------------------------- throughput
# The ceiling in one mode; $1 keepalive or close, $2 the variant's suffix.
measure_ceiling() {
  local mode=$1 tag=${2:-} close=0 extra=()
  [[ $mode == close ]] && { close=1; extra=(--close); }
  start_server "ceiling-$mode$tag" "$CEILING" --bind "127.0.0.1:$PORT" --threads 2 "${extra[@]}"
  if wait_http "$URL" 10; then
    measure ceiling hyper-2t "$mode$tag" "$close" "echo $SERVER_PID" "1 process, 2-thread tokio runtime"
  else
    skip_row ceiling hyper-2t "$mode$tag" "did not start (see bench/out/logs/ceiling-$mode$tag.log)"
  fi
  stop_server
}

run_ceiling() {
  measure_ceiling keepalive
  measure_ceiling close
}

run_gpe() {
  local kind variant close flags reason
  for kind in $KINDS; do
    printf 'worker = "%s"\n' "$kind" >"$OUT/check-$kind.toml"
    if ! reason=$("$GPE" check -c "$OUT/check-$kind.toml" 2>&1 >/dev/null); then
      reason=$(tr '\n"' ' _' <<<"$reason" | cut -c1-160)
      echo "-- gpe $kind: skipped: $reason" >&2
      skip_row gpe "$kind" metrics "skipped: not in this build ($reason)"
      skip_row gpe "$kind" no-metrics "skipped: not in this build"
      continue
    fi
    close=0; [[ $kind == sync ]] && close=1
    # The machine's speed drifts during a run: each type is compared with the
    # ceiling measured right before it.
    if ((close)); then measure_ceiling close " before $kind"; else measure_ceiling keepalive " before $kind"; fi
    # metrics on and off alternate, REPEAT times; the report takes the median run.
    # Then once with metrics on and `--idle-yield false` (thread, eventloop, greenlet).
    # The keep-alive types also serve the same hello through an axum Router
    # (examples/axum-app, metrics on), in the same rotation.
    local variants axum=""
    [[ $kind == sync || ${BENCH_SKIP_AXUM:-0} == 1 ]] || axum=axum
    variants=$(for _ in $(seq 1 "$REPEAT"); do echo metrics no-metrics $axum; done)
    [[ $kind == sync ]] || variants+=" no-yield"
    for variant in $variants; do
      flags=()
      [[ $variant == no-metrics ]] && flags=(--no-metrics)
      [[ $variant == no-yield ]] && flags=(--idle-yield false)
      local cmd=("$GPE" serve)
      [[ $variant == axum ]] && cmd=("$AXUM")
      start_server "gpe-$kind-$variant" "${cmd[@]}" -k "$kind" -w 2 \
        --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT" "${flags[@]}"
      if wait_http "$URL" 20; then
        sleep 0.5
        measure gpe "$kind" "$variant" "$close" "gpe_worker_pids $SERVER_PID"
      else
        skip_row gpe "$kind" "$variant" "did not start (see bench/out/logs/gpe-$kind-$variant.log)"
      fi
      stop_server
    done
  done
}

# HTTPS keep-alive: for each keep-alive type, the TLS ceiling right before it,
# then gpe with metrics on, REPEAT times alternating.
run_tls() {
  local kind cert=$OUT/tls-cert.pem key=$OUT/tls-key.pem plain_url=$URL i
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 \
    -keyout "$key" -out "$cert" 2>"$OUT/logs/openssl.log"
  URL=https://127.0.0.1:$PORT/
  for kind in $KINDS; do
    [[ $kind == sync ]] && continue
    for i in $(seq 1 "$REPEAT"); do
      start_server "ceiling-tls-before-$kind" "$CEILING" --bind "127.0.0.1:$PORT" --threads 2 --tls "$cert" "$key"
      if wait_http "$URL" 10; then
        measure ceiling hyper-2t "tls before $kind" 0 "echo $SERVER_PID" "1 process, 2-thread tokio runtime, tokio-rustls"
      else
        skip_row ceiling hyper-2t "tls before $kind" "did not start (see bench/out/logs/ceiling-tls-before-$kind.log)"
      fi
      stop_server
      start_server "gpe-$kind-tls" "$GPE" serve -k "$kind" -w 2 --certfile "$cert" --keyfile "$key" \
        --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT"
      if wait_http "$URL" 20; then
        sleep 0.5
        measure gpe "$kind" tls 0 "gpe_worker_pids $SERVER_PID"
      else
        skip_row gpe "$kind" tls "did not start (see bench/out/logs/gpe-$kind-tls.log)"
      fi
      stop_server
    done
  done
  URL=$plain_url
}

peer_env() { # $1 kind, $2 exporter 0/1, $3 workers
  local mp=$OUT/peer-multiproc
  rm -rf "$mp"; mkdir -p "$mp"
  PEER_ENV=(BENCH_PEER_BIND="127.0.0.1:$PORT" BENCH_PEER_KIND="$1" BENCH_PEER_WORKERS="$3"
    BENCH_PEER_EXPORTER="$2" BENCH_PEER_MAX_REQUESTS_FILE="$OUT/peer-max-requests")
  if [[ $2 == 1 ]]; then
    PEER_ENV+=(PROMETHEUS_BIND_ADDRESS=127.0.0.1 PROMETHEUS_METRICS_PORT="$PPORT"
      GUNICORN_WORKERS="$3" PROMETHEUS_MULTIPROC_DIR="$mp")
  fi
}
start_peer() { # $1 name, $2 kind, $3 exporter, $4 workers
  peer_env "$2" "$3" "$4"
  start_server "$1" env "${PEER_ENV[@]}" "$VENV/bin/gunicorn" -c "$HERE/peer/gunicorn_conf.py" \
    --chdir "$HERE/peer" --pid "$OUT/peer.pid" app:app
}

run_peer() {
  local kind exp variant close note
  echo 0 >"$OUT/peer-max-requests"
  for kind in sync gthread gevent eventlet; do
    close=0; [[ $kind == sync ]] && close=1
    for exp in 1 0; do
      variant=plain; [[ $exp == 1 ]] && variant=exporter
      start_peer "peer-$kind-$variant" "$kind" "$exp" 2
      if wait_http "$URL" 30; then
        sleep 1
        note=""
        [[ $kind == gthread ]] && note="4 threads"
        measure peer "$kind" "$variant" "$close" "children $SERVER_PID" "$note"
        if [[ $exp == 1 ]] && ! curl -s --max-time 5 "http://127.0.0.1:$PPORT/metrics" | grep -q '^gunicorn_worker_requests_total'; then
          echo "   WARNING: the peer's exporter did not answer on :$PPORT" >&2
        fi
      else
        skip_row peer "$kind" "$variant" "did not start (see bench/out/logs/peer-$kind-$variant.log)"
      fi
      stop_server
    done
  done
}

# ---------------------------------------------------------------- scrape cost
# Prints "p50_ms size_bytes" of $SCRAPES scrapes of $1.
scrape_stats() {
  local url=$1 i
  for i in $(seq 1 "$SCRAPES"); do
    curl -s -o /dev/null --max-time 10 -w '%{time_total} %{size_download}\n' "$url"
  done | awk '$2 > 0' | sort -n | awk '{t[NR]=$1; s=$2} END{if (NR) printf "%.3f %d", t[int((NR+1)/2)]*1000, s; else printf "0 0"}'
}

# Loads 1,000 distinct paths for $1 seconds.
load_paths() {
  BENCH_PATHS=1000 BENCH_CLOSE=$2 timeout $(($1 + 30)) wrk -t1 -c"$CONNS" -d"${1}s" --timeout 5s \
    -s "$HERE/wrk/paths.lua" "$URL" >>"$OUT/logs/wrk-paths.log" 2>&1 || true
}

gpe_respawns() {
  curl -s --max-time 10 "http://127.0.0.1:$MPORT/metrics" |
    awk '/^gpe_master_worker_exits_total\{reason="max_requests"\}/{print int($2); f=1} END{if(!f) print 0}'
}

scrape_gpe() {
  local conf=$OUT/scrape-gpe.toml murl=http://127.0.0.1:$MPORT/metrics
  local before after series n deadline fill=$((SECS < 5 ? SECS : 5))
  echo 'max_requests = 0' >"$conf"
  log "scrape cost: gpe, 8 sync workers, 1,000 paths"
  start_server gpe-scrape "$GPE" serve -k sync -w 8 -c "$conf" --metrics-max-series 2000 \
    --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT"
  if ! wait_http "$URL" 20; then stop_server; return 0; fi
  sleep 1
  load_paths "$fill" 1
  sleep 1
  series=$(curl -s "$murl" | grep -c '^gpe_http_requests_total{' || true)
  before=$(scrape_stats "$murl")
  echo "   before: p50 ms, bytes = $before; label sets = $series" >&2
  # max_requests = 20 for the new workers (a HUP re-reads the config file).
  echo 'max_requests = 20' >"$conf"
  kill -HUP "$SERVER_PID"; sleep 2
  n=0; deadline=$((SECONDS + 90))
  while ((n < RESPAWNS && SECONDS < deadline)); do
    load_paths 1 1
    n=$(gpe_respawns)
  done
  echo 'max_requests = 0' >"$conf"
  kill -HUP "$SERVER_PID"; sleep 3
  n=$(gpe_respawns)
  after=$(scrape_stats "$murl")
  echo "   after $n respawns: p50 ms, bytes = $after" >&2
  printf '{"server":"gpe","kind":"sync","workers":8,"label_sets":%s,"before":[%s],"after":[%s],"respawns":%s}\n' \
    "$series" "${before/ /,}" "${after/ /,}" "$n" >>"$OUT/scrape.jsonl"
  stop_server
}

scrape_peer() {
  local murl=http://127.0.0.1:$PPORT/metrics before after n deadline fill=$((SECS < 5 ? SECS : 5))
  log "scrape cost: peer (gunicorn sync + exporter), 8 workers, 1,000 paths"
  echo 0 >"$OUT/peer-max-requests"
  start_peer peer-scrape sync 1 8
  if ! wait_http "$URL" 30; then stop_server; return 0; fi
  sleep 2
  load_paths "$fill" 1
  sleep 1
  before=$(scrape_stats "$murl")
  echo "   before: p50 ms, bytes = $before" >&2
  echo 20 >"$OUT/peer-max-requests"
  kill -HUP "$(cat "$OUT/peer.pid")"; sleep 3
  # Bounded: the exporter's master replaces recycled workers slowly (and can
  # stall), so stop after 120 s, or after 30 s without a new respawn.
  local last=0 progress=$SECONDS note=""
  n=0; deadline=$((SECONDS + 120))
  while ((n < RESPAWNS && SECONDS < deadline)); do
    load_paths 2 1
    n=$(grep -c 'Autorestarting worker' "$OUT/logs/peer-scrape.log" || true)
    if ((n > last)); then last=$n; progress=$SECONDS
    elif ((SECONDS - progress > 30)); then note="stalled: no respawn for 30 s"; break; fi
  done
  ((n < RESPAWNS)) && [[ -z $note ]] && note="only $n respawns within 120 s"
  echo 0 >"$OUT/peer-max-requests"
  kill -HUP "$(cat "$OUT/peer.pid")" 2>/dev/null || true; sleep 4
  n=$(grep -c 'Autorestarting worker' "$OUT/logs/peer-scrape.log" || true)
  after=$(scrape_stats "$murl")
  echo "   after $n respawns: p50 ms, bytes = $after ${note}" >&2
  [[ $after == *" "* ]] || after="0 0"
  printf '{"server":"peer","kind":"sync","workers":8,"label_sets":null,"before":[%s],"after":[%s],"respawns":%s,"note":"%s"}\n' \
    "${before/ /,}" "${after/ /,}" "$n" "$note" >>"$OUT/scrape.jsonl"
  stop_server
}

# ---------------------------------------------------------------- syscall profile
# Kernel-side cost per request: `perf stat` counts syscalls (tracepoints),
# context switches and CPU time of the server processes while one wrk run of
# PROFILE_SECS loads them (same shape as the throughput runs).
PROFILE_SECS=${BENCH_PROFILE_SECONDS:-5}
PROFILE_EVENTS=raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_read,syscalls:sys_enter_sendto,syscalls:sys_enter_writev,syscalls:sys_enter_write,syscalls:sys_enter_epoll_ctl,syscalls:sys_enter_epoll_wait,syscalls:sys_enter_epoll_pwait,syscalls:sys_enter_sched_yield,syscalls:sys_enter_accept4,context-switches,task-clock

# $1 label, $2 space-separated pids, $3 1 for Connection: close; appends a
# line to profile.jsonl (wrk's own CPU seconds too, from /usr/bin/time).
profile_one() {
  local label=$1 pids close=${3:-0} out res counts wrk_cpu hdr=()
  pids=$(tr ' ' ',' <<<"$2")
  [[ $close == 1 ]] && hdr=(-H 'Connection: close')
  run_wrk "$close" "$WARM" >/dev/null || true
  out=$(timeout $((PROFILE_SECS + 30)) perf stat -x, -o "$OUT/logs/perf-${label// /-}.csv" -e "$PROFILE_EVENTS" -p "$pids" -- \
    /usr/bin/time -f 'WRKCPU %U %S' wrk -t1 -c"$CONNS" -d"${PROFILE_SECS}s" --timeout 5s \
    -s "$HERE/wrk/report.lua" "${hdr[@]}" "$URL" 2>&1 | tee -a "$OUT/logs/wrk.log" || true)
  res=$(sed -n 's/^WRKJSON //p' <<<"$out")
  wrk_cpu=$(awk '/^WRKCPU/ {print $2 + $3}' <<<"$out")
  # CSV lines: count,unit,event,...; unsupported events have no number.
  counts=$(awk -F, '$1 ~ /^[0-9.]+$/ {printf "%s\"%s\":%s", (n++ ? "," : ""), $3, $1}' \
    "$OUT/logs/perf-${label// /-}.csv" 2>/dev/null || true)
  [[ -n $res ]] || res=null
  printf '{"label":"%s","processes":%s,"close":%s,"wrk":%s,"wrk_cpu_s":%s,"perf":{%s}}\n' \
    "$label" "$(wc -w <<<"$2")" "$close" "$res" "${wrk_cpu:-null}" "$counts" >>"$OUT/profile.jsonl"
  echo "   $label: wrk ${wrk_cpu:-?} CPU s; $counts" >&2
}

run_profile() {
  if ! perf stat -e "$PROFILE_EVENTS" -- true >/dev/null 2>&1; then
    echo "-- syscall profile skipped: perf cannot count $PROFILE_EVENTS here" >&2
    return 0
  fi
  log "syscall profile: perf stat over ${PROFILE_SECS}s of wrk load"
  local mode close extra
  for mode in keepalive close; do
    close=0; extra=()
    [[ $mode == close ]] && { close=1; extra=(--close); }
    start_server "profile-ceiling-$mode" "$CEILING" --bind "127.0.0.1:$PORT" --threads 2 "${extra[@]}"
    wait_http "$URL" 10 && profile_one "ceiling $mode" "$SERVER_PID" "$close"
    stop_server
  done
  local kind flags label cmd axum=""
  [[ ${BENCH_SKIP_AXUM:-0} == 1 ]] || axum=eventloop:axum
  for kind in sync thread eventloop greenlet eventloop:no-yield greenlet:no-yield $axum; do
    label=${kind/:/ }; flags=(); cmd=("$GPE" serve)
    [[ $kind == *:no-yield ]] && flags=(--idle-yield false)
    [[ $kind == *:axum ]] && cmd=("$AXUM")
    kind=${kind%%:*}
    close=0; [[ $kind == sync ]] && close=1
    start_server "profile-${label/ /-}" "${cmd[@]}" -k "$kind" -w 2 \
      --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT" "${flags[@]}"
    if wait_http "$URL" 20; then
      sleep 0.5
      profile_one "$label" "$(gpe_worker_pids "$SERVER_PID" | tr '\n' ' ')" "$close"
    fi
    stop_server
  done
}

# ---------------------------------------------------------------- micro-benchmark
run_micro() {
  log "criterion: cargo bench -p gpe-core --bench hot_path"
  rm -rf "$OUT/criterion"
  (cd "$ROOT" && CRITERION_HOME=$OUT/criterion cargo bench -q -p gpe-core --bench hot_path) \
    >"$OUT/logs/hot_path.log" 2>&1 || { echo "   micro-benchmark failed: see $OUT/logs/hot_path.log" >&2; return 0; }
  grep -E '^hot_path|time:|thrpt:' "$OUT/logs/hot_path.log" >&2 || true
}

# ---------------------------------------------------------------- main
main() {
  mkdir -p "$OUT/logs"
  rm -f "$OUT"/results.jsonl "$OUT"/scrape.jsonl "$OUT"/profile.jsonl "$OUT"/logs/*.log "$OUT"/logs/*.csv
  : >"$OUT/results.jsonl"; : >"$OUT/scrape.jsonl"; : >"$OUT/profile.jsonl"
  date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/started"
  # The commit measured; "dirty" if tracked sources differ from it (the
  # generated BENCHMARKS.md and docs/bench.png do not count).
  {
    git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || true
    git -C "$ROOT" update-index -q --refresh >/dev/null 2>&1 || true
    git -C "$ROOT" diff-index --quiet HEAD -- ':!BENCHMARKS.md' ':!docs/bench.png' 2>/dev/null || echo dirty
  } | paste -sd' ' >"$OUT/commit"
  cut -d' ' -f1-3 /proc/loadavg >"$OUT/loadavg-start"
  setup
  for p in "$PORT" "$MPORT" "$PPORT"; do
    ss -Hltn "sport = :$p" | grep -q . && { echo "port $p is busy; set BENCH_*PORT" >&2; exit 1; }
  done
  log "throughput: wrk -t1 -c$CONNS, ${WARM}s warm-up + ${SECS}s"
  run_ceiling
  run_gpe
  [[ ${BENCH_SKIP_TLS:-0} == 1 ]] || run_tls
  [[ ${BENCH_SKIP_PEER:-0} == 1 ]] || run_peer
  [[ ${BENCH_SKIP_PROFILE:-0} == 1 ]] || run_profile
  [[ ${BENCH_SKIP_SCRAPE:-0} == 1 ]] || scrape_gpe
  [[ ${BENCH_SKIP_PEER:-0} == 1 || ${BENCH_SKIP_SCRAPE:-0} == 1 ]] || scrape_peer
  [[ ${BENCH_SKIP_MICRO:-0} == 1 ]] || run_micro
  log "report: BENCHMARKS.md, docs/bench.png"
  wrk_version=$(wrk -v 2>&1 | head -1 || true)
  BENCH_PROFILE_SECONDS=$PROFILE_SECS BENCH_SECONDS=$SECS BENCH_WARMUP=$WARM BENCH_REPEAT=$REPEAT BENCH_SCRAPES=$SCRAPES BENCH_CONNECTIONS=$CONNS BENCH_WRK_VERSION="$wrk_version" \
    "$([[ -x $VENV/bin/python ]] && echo "$VENV/bin/python" || echo python3)" "$HERE/report.py" "$ROOT" "$OUT"
}
main "$@"
