#!/usr/bin/env bash
# gpe benchmark: one command, one run, regenerates BENCHMARKS.md and the plots
# (docs/bench.png, docs/bench-scaling.png; docs/bench-scrape.png if bench/scrape.sh exists).
#
#   bench/run.sh                     # full run (under 20 minutes on 2 cores, builds cached)
#   BENCH_QUICK=1 bench/run.sh       # quick run for use while working (under 5 minutes)
#   bench/ab.sh OLD_REV              # A/B against an earlier commit (see its header)
#
# What it does (see BENCHMARKS.md for the method):
#  1. installs what it needs (apt-get: wrk, gnuplot-nox, curl, iproute2, procps,
#     valgrind, nghttp2-client;
#     a virtualenv in bench/venv with gunicorn + gunicorn-prometheus-exporter,
#     gevent, eventlet and matplotlib from PyPI; oha with `cargo install --locked`)
#     and builds gpe, bench/ceiling and bench/peers in release mode;
#  2. throughput in interleaved rounds (the order of the servers alternates
#     between rounds), wrk -t1 -cCONNS, warm-up then BENCH_SECONDS: keep-alive:
#     the bare tokio+hyper ceiling (2-thread runtime), the forked ceiling (2
#     processes, a current-thread runtime each, one listener), gpe thread,
#     eventloop and greenlet with metrics on and off, gpe eventloop serving the
#     axum Router of examples/axum-app, actix-web and axum plain and with their
#     Prometheus middleware (bench/peers); close mode: the ceiling and gpe sync;
#     then once more each keep-alive type with `--idle-yield false`;
#  3. HTTPS keep-alive rows: the ceiling with tokio-rustls right before each
#     keep-alive gpe type served with --certfile/--keyfile;
#  4. gunicorn with and without the exporter;
#  5. latency at a fixed rate: oha at 50% of each server's own peak (from step 2);
#  6. scaling: gpe with 1, 2, 4, 8 workers against 16, 256 and 1,024 connections;
#  7. the scrape cost of /metrics with 8 workers x 1,000 label sets, then again
#     after 200 worker respawns, for gpe and gunicorn's exporter; and
#     bench/scrape.sh (exporter scrape time against workers x series) if present;
#  8. counts syscalls, context switches and CPU per request with `perf stat`;
#  9. counts instructions per request by layer under callgrind (bench/instructions.sh;
#     BENCH_SKIP_INSTR=1 leaves it out), and runs the criterion micro-benchmark of
#     the hot path (core/benches/hot_path.rs);
# 10. profiles CPU time per request by layer with perf (bench/layers.sh, which
#     rewrites its own section of BENCHMARKS.md; BENCH_SKIP_LAYERS=1 leaves it out);
# 11. writes BENCHMARKS.md and the plots (bench/report.py).
#
# Environment: BENCH_QUICK=1 (shorter phases, 1 round, no criterion, no
# gunicorn; every default below then changes as noted in brackets),
# BENCH_SECONDS (5 [2]), BENCH_WARMUP (1), BENCH_CONNECTIONS (16),
# BENCH_REPEAT (3 rounds [1]), BENCH_TLS_REPEAT (1 pair per type),
# BENCH_PORT (18000), BENCH_METRICS_PORT (19091), BENCH_PEER_METRICS_PORT (19092),
# BENCH_SCRAPES (50 [10]), BENCH_RESPAWNS (200 [20]), BENCH_PROFILE_SECONDS (5 [2]),
# BENCH_RATE_SECONDS (BENCH_SECONDS), BENCH_RATE_REPEAT (3 rounds [1]), BENCH_SCALE_KINDS ("eventloop thread" ["eventloop"]),
# BENCH_SCALE_WORKERS ("1 2 4 8"), BENCH_SCALE_CONNECTIONS ("16 256 1024"),
# BENCH_SCALE_SECONDS (3 [2]),
# BENCH_SKIP_PEER=1 (gunicorn), BENCH_SKIP_RUST_PEERS=1 (actix, axum), BENCH_SKIP_MICRO=1,
# BENCH_SKIP_PROFILE=1, BENCH_SKIP_AXUM=1, BENCH_SKIP_SCRAPE=1, BENCH_SKIP_TLS=1,
# BENCH_SKIP_RATE=1, BENCH_SKIP_SCALING=1, BENCH_SKIP_PEER_SCRAPE=1, BENCH_SKIP_LAYERS=1,
# BENCH_KINDS (gpe worker types to load; default "sync thread eventloop greenlet"),
# CARGO_TARGET_DIR (default: ./target).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=$HERE/out
VENV=$HERE/venv
QUICK=${BENCH_QUICK:-0}
q() { if [[ $QUICK == 1 ]]; then echo "$2"; else echo "$1"; fi; } # q FULL QUICK
SECS=${BENCH_SECONDS:-$(q 5 2)}
WARM=${BENCH_WARMUP:-1}
CONNS=${BENCH_CONNECTIONS:-16}
PORT=${BENCH_PORT:-18000}
MPORT=${BENCH_METRICS_PORT:-19091}
PPORT=${BENCH_PEER_METRICS_PORT:-19092}
SCRAPES=${BENCH_SCRAPES:-$(q 50 10)}
REPEAT=${BENCH_REPEAT:-$(q 3 1)}
TLS_REPEAT=${BENCH_TLS_REPEAT:-1}
RESPAWNS=${BENCH_RESPAWNS:-$(q 200 20)}
KINDS=${BENCH_KINDS:-sync thread eventloop greenlet}
RATE_SECS=${BENCH_RATE_SECONDS:-$SECS}
RATE_REPEAT=${BENCH_RATE_REPEAT:-$(q 3 1)}
SCALE_KINDS=${BENCH_SCALE_KINDS:-$(q "eventloop thread" eventloop)}
SCALE_WORKERS=${BENCH_SCALE_WORKERS:-1 2 4 8}
SCALE_CONNS=${BENCH_SCALE_CONNECTIONS:-16 256 1024}
SCALE_SECS=${BENCH_SCALE_SECONDS:-$(q 3 2)}
if [[ $QUICK == 1 ]]; then
  : "${BENCH_SKIP_MICRO:=1}" "${BENCH_SKIP_PEER_SCRAPE:=1}" "${BENCH_SKIP_PEER:=1}"
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
GPE=$CARGO_TARGET_DIR/release/gpe
CEILING=$CARGO_TARGET_DIR/release/gpe-bench-ceiling
AXUM=$CARGO_TARGET_DIR/release/gpe-axum-app
PEERS=$CARGO_TARGET_DIR/release
URL=http://127.0.0.1:$PORT/

# Peer versions (gunicorn 24+ crashes the exporter 0.2.4).
PEER_PKGS=(gunicorn==23.0.0 gunicorn-prometheus-exporter==0.2.4 gevent eventlet)

log() { printf '\n== %s\n' "$*" >&2; }

# Processes, readiness checks, run_wrk (the shared wrk shape).
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# Warm-up, measured load, RSS of the workers at the end of the load; appends a row
# (with the round number ROUND, 0 outside the rounds).
# $1 server, $2 kind, $3 variant, $4 close(0/1), $5 pid-lister command, $6 note,
# $7 lister of every process of the server (master + workers; default: $5)
ROUND=0
measure() {
  local server=$1 kind=$2 variant=$3 close=$4 lister=$5 note=${6:-} all=${7:-$5}
  echo "-- $server $kind $variant (round $ROUND, warm-up ${WARM}s, load ${SECS}s)" >&2
  run_wrk "$close" "$WARM" >/dev/null || true
  local res pids rss total split=null sampler=""
  # Keep-alive connections stay where they were accepted: halfway through
  # the load, note how many each process holds.
  if [[ $close == 0 ]]; then
    (sleep "$(awk -v s="$SECS" 'BEGIN{print s/2}')"; conn_split) >"$OUT/split.tmp" &
    sampler=$!
  fi
  # The CPU every process of the server uses during the measured load (gpe's
  # exporter included), in seconds: its CPU per request does not depend on
  # how the 2 CPUs were shared with wrk, as req/s does.
  local procs cpu0 cpu=null
  procs=$(tree "$SERVER_PID")
  # shellcheck disable=SC2086
  cpu0=$(cpu_ticks $procs)
  res=$(run_wrk "$close" "$SECS" || true)
  # shellcheck disable=SC2086
  cpu=$(awk -v a="$cpu0" -v b="$(cpu_ticks $procs)" -v hz="$(getconf CLK_TCK)" 'BEGIN{printf "%.3f", (b - a) / hz}')
  if [[ -n $sampler ]]; then
    wait "$sampler" 2>/dev/null || true
    [[ -s $OUT/split.tmp ]] && split="\"$(cat "$OUT/split.tmp")\""
  fi
  # shellcheck disable=SC2046
  pids=$($lister)
  # shellcheck disable=SC2086
  rss=$(mean_rss_mib $pids)
  # shellcheck disable=SC2046,SC2086
  total=$(total_rss_mib $($all))
  [[ -n $res ]] || res=null
  printf '{"server":"%s","kind":"%s","variant":"%s","close":%s,"round":%s,"workers":%s,"rss_mib":%s,"rss_total_mib":%s,"cpu_s":%s,"note":"%s","load1":%s,"split":%s,"wrk":%s}\n' \
    "$server" "$kind" "$variant" "$close" "$ROUND" "$(wc -w <<<"$pids")" "$rss" "$total" "$cpu" "$note" "$(cut -d' ' -f1 /proc/loadavg)" "$split" "$res" >>"$OUT/results.jsonl"
  echo "   $res rss=${rss}MiB total=${total}MiB pids=[$(echo $pids)]" >&2
}
# The established connections to the benchmark port per server process,
# largest first ("13/3"); nothing if none.
conn_split() {
  ss -Htnp state established "( sport = :$PORT )" | grep -o 'pid=[0-9]*' | sort | uniq -c |
    awk '{print $1}' | sort -rn | paste -sd/
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
  [[ ${BENCH_SKIP_PROFILE:-0} == 1 && ${BENCH_SKIP_LAYERS:-0} == 1 ]] || command -v perf >/dev/null || missing+=(linux-perf)
  command -v python3 >/dev/null || missing+=(python3 python3-venv)
  if [[ ${BENCH_SKIP_INSTR:-0} != 1 ]]; then
    command -v valgrind >/dev/null || missing+=(valgrind)
    command -v h2load >/dev/null || missing+=(nghttp2-client)
  fi
  if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
  fi
  if [[ ${BENCH_SKIP_PEER:-0} != 1 ]] && ! "$VENV/bin/python" -c 'import gunicorn, gunicorn_prometheus_exporter, gevent, eventlet, sys; sys.exit(gunicorn.__version__ != "23.0.0")' 2>/dev/null; then
    log "virtualenv $VENV: ${PEER_PKGS[*]}"
    python3 -m venv "$VENV" || { apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv "$VENV"; }
    "$VENV/bin/pip" install -q "${PEER_PKGS[@]}"
  fi
  # matplotlib draws the scaling (and scrape) plots; report.py runs with the
  # venv's python when there is one.
  local py=python3
  [[ -x $VENV/bin/python ]] && py=$VENV/bin/python
  if ! "$py" -c 'import matplotlib' 2>/dev/null; then
    log "pip install matplotlib ($py)"
    "$py" -m pip install -q --disable-pip-version-check matplotlib 2>/dev/null ||
      "$py" -m pip install -q --disable-pip-version-check --break-system-packages matplotlib || true
  fi
  if [[ ${BENCH_SKIP_RATE:-0} != 1 ]] && ! command -v oha >/dev/null; then
    log "cargo install oha --locked"
    cargo install -q oha --locked || true
  fi
  local pkgs=(-p gpe -p gpe-bench-ceiling -p gpe-example-axum-app)
  [[ ${BENCH_SKIP_RUST_PEERS:-0} == 1 ]] || pkgs+=(-p gpe-bench-peers)
  log "cargo build --release ${pkgs[*]} (target $CARGO_TARGET_DIR)"
  (cd "$ROOT" && cargo build --release -q "${pkgs[@]}")
}

# ---------------------------------------------------------------- throughput
# The servers of the rounds, by id:
#   ceiling-2t, ceiling-close       bench/ceiling, 2-thread runtime (keep-alive, close)
#   ceiling-forked                  bench/ceiling --forked 2
#   ceiling-forked-bal              bench/ceiling --forked 2 --balanced (gpe's balance)
#   gpe:KIND:VARIANT                gpe serve -k KIND -w 2; VARIANT metrics,
#                                   no-metrics, no-yield, or axum (gpe-axum-app)
#   actix-plain, actix-prom, axum-plain, axum-prom   bench/peers, 2 workers
# start_id ID starts one and sets SERVER_PID and the row's fields ROW_SERVER,
# ROW_KIND, ROW_VARIANT, ROW_CLOSE, ROW_NOTE, ROW_LISTER (the workers' pids)
# and ROW_ALL (every process of the server).
start_id() {
  local id=$1 kind variant flags=() cmd=()
  ROW_CLOSE=0; ROW_NOTE=""
  case $id in
    ceiling-2t | ceiling-close)
      local extra=()
      [[ $id == ceiling-close ]] && { extra=(--close); ROW_CLOSE=1; }
      start_server "$id-r$ROUND" "$CEILING" --bind "127.0.0.1:$PORT" --threads 2 "${extra[@]}"
      ROW_SERVER=ceiling; ROW_KIND=hyper-2t; ROW_VARIANT=$([[ $ROW_CLOSE == 1 ]] && echo close || echo keepalive)
      ROW_NOTE="1 process, 2-thread tokio runtime"
      ROW_LISTER="echo $SERVER_PID"; ROW_ALL=$ROW_LISTER ;;
    ceiling-forked | ceiling-forked-bal)
      local bal=()
      [[ $id == ceiling-forked-bal ]] && bal=(--balanced)
      start_server "$id-r$ROUND" "$CEILING" --bind "127.0.0.1:$PORT" --forked 2 "${bal[@]}"
      ROW_SERVER=ceiling; ROW_KIND=forked-ct${bal:+-bal}; ROW_VARIANT=keepalive
      ROW_NOTE="2 forked processes, a current-thread tokio runtime each, one listener"
      ROW_LISTER="children $SERVER_PID"; ROW_ALL="tree $SERVER_PID" ;;
    gpe:*)
      kind=${id#gpe:}; variant=${kind#*:}; kind=${kind%%:*}
      cmd=("$GPE" serve)
      [[ $variant == no-metrics ]] && flags=(--no-metrics)
      [[ $variant == no-yield ]] && flags=(--idle-yield false)
      [[ $variant == axum ]] && cmd=("$AXUM")
      [[ $kind == sync ]] && ROW_CLOSE=1
      start_server "gpe-$kind-$variant-r$ROUND" "${cmd[@]}" -k "$kind" -w 2 \
        --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT" "${flags[@]}"
      ROW_SERVER=gpe; ROW_KIND=$kind; ROW_VARIANT=$variant
      ROW_LISTER="gpe_worker_pids $SERVER_PID"; ROW_ALL="gpe_master_and_workers $SERVER_PID" ;;
    actix-plain | actix-prom | axum-plain | axum-prom)
      start_server "$id-r$ROUND" "$PEERS/$id" --bind "127.0.0.1:$PORT" --workers 2
      ROW_SERVER=rust-peer; ROW_KIND=${id%%-*}; ROW_VARIANT=${id#*-}
      case $id in
        actix-*) ROW_NOTE="actix-web 4, 2 workers" ;;
        *) ROW_NOTE="axum 0.8, 2-thread tokio runtime" ;;
      esac
      ROW_LISTER="echo $SERVER_PID"; ROW_ALL=$ROW_LISTER ;;
    *) echo "unknown server id $id" >&2; return 1 ;;
  esac
}

# Starts, loads and stops server ID (see start_id); a server that does not
# answer gets a row without figures.
measure_id() {
  local id=$1
  start_id "$id"
  if wait_http "$URL" 20; then
    [[ $ROW_SERVER == gpe ]] && sleep 0.5
    measure "$ROW_SERVER" "$ROW_KIND" "$ROW_VARIANT" "$ROW_CLOSE" "$ROW_LISTER" "$ROW_NOTE" "$ROW_ALL"
  else
    skip_row "$ROW_SERVER" "$ROW_KIND" "$ROW_VARIANT" "did not start (see bench/out/logs/)"
  fi
  stop_server
}

# Is gpe worker type $1 in this build? (else a skipped row says why)
kind_built() {
  local kind=$1 reason
  printf 'worker = "%s"\n' "$kind" >"$OUT/check-$kind.toml"
  if ! reason=$("$GPE" check -c "$OUT/check-$kind.toml" 2>&1 >/dev/null); then
    reason=$(tr '\n"' ' _' <<<"$reason" | cut -c1-160)
    echo "-- gpe $kind: skipped: $reason" >&2
    skip_row gpe "$kind" metrics "skipped: not in this build ($reason)"
    skip_row gpe "$kind" no-metrics "skipped: not in this build"
    return 1
  fi
}

# REPEAT rounds; odd rounds run the servers in order, even rounds in reverse,
# so that no server always follows the same one. Keep-alive servers, then the
# close-mode pair; then each keep-alive type once with `--idle-yield false`.
run_rounds() {
  local ids=(ceiling-2t ceiling-forked ceiling-forked-bal) close_ids=() kind r i order
  for kind in $KINDS; do
    kind_built "$kind" || continue
    if [[ $kind == sync ]]; then
      close_ids+=(ceiling-close gpe:sync:metrics gpe:sync:no-metrics)
    else
      ids+=("gpe:$kind:metrics" "gpe:$kind:no-metrics")
      [[ $kind == eventloop && ${BENCH_SKIP_AXUM:-0} != 1 ]] && ids+=(gpe:eventloop:axum)
    fi
  done
  [[ ${BENCH_SKIP_RUST_PEERS:-0} == 1 ]] || ids+=(actix-plain actix-prom axum-plain axum-prom)
  echo "${ids[*]} ${close_ids[*]}" >"$OUT/round-servers"
  for r in $(seq 1 "$REPEAT"); do
    ROUND=$r
    log "round $r of $REPEAT"
    for order in ids close_ids; do
      local -n list=$order
      ((${#list[@]})) || continue
      if ((r % 2)); then
        for i in "${list[@]}"; do measure_id "$i"; done
      else
        for ((i = ${#list[@]} - 1; i >= 0; i--)); do measure_id "${list[i]}"; done
      fi
      unset -n list
    done
  done
  ROUND=0
  for kind in $KINDS; do
    [[ $kind == sync ]] && continue
    grep -q "gpe:$kind:metrics" "$OUT/round-servers" && measure_id "gpe:$kind:no-yield"
  done
  return 0
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
    for i in $(seq 1 "$TLS_REPEAT"); do
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

# ---------------------------------------------------------------- fixed rate
# Latency at a fixed rate: for each keep-alive gpe type (metrics on) and each
# Rust peer, oha at 50% of that server's own peak (the median req/s of its
# rounds), CONNS connections, RATE_SECS, latency corrected for coordinated
# omission (measured from when each request was due). One line per server in
# fixed_rate.jsonl: the peak, the rate asked, and oha's JSON summary.
median_rps() { # $1 server $2 kind $3 variant: median req/s of the rounds, or nothing
  python3 - "$OUT/results.jsonl" "$@" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
v = sorted(r["wrk"]["requests"] / (r["wrk"]["duration_us"] / 1e6) for r in rows
           if (r["server"], r["kind"], r["variant"]) == tuple(sys.argv[2:5])
           and r.get("round") and r.get("wrk") and r["wrk"].get("duration_us"))
if v:
    print(int(v[(len(v) - 1) // 2]))
PY
}

run_fixed_rate() {
  if ! command -v oha >/dev/null; then
    echo "-- fixed rate skipped: oha is not installed (cargo install oha --locked)" >&2
    return 0
  fi
  log "fixed rate: oha at 50% of each server's peak, -c$CONNS, ${RATE_SECS}s"
  local id ids=() i r
  for id in thread eventloop greenlet; do
    grep -q "gpe:$id:metrics" "$OUT/round-servers" 2>/dev/null && ids+=("gpe:$id:metrics")
  done
  [[ ${BENCH_SKIP_RUST_PEERS:-0} == 1 ]] || ids+=(actix-plain actix-prom axum-plain axum-prom)
  # RATE_REPEAT rounds, odd ones in order and even ones reversed: one bad
  # second of the host moves one round's p99, not the median of the rounds.
  for r in $(seq 1 "$RATE_REPEAT"); do
    if ((r % 2)); then
      for i in "${ids[@]}"; do fixed_rate_one "$i" "$r"; done
    else
      for ((i = ${#ids[@]} - 1; i >= 0; i--)); do fixed_rate_one "${ids[i]}" "$r"; done
    fi
  done
}

# One oha run of server ID at half its peak, as round $2.
fixed_rate_one() {
  local id=$1 round=$2 peak rate res
  start_id "$id"
  peak=$(median_rps "$ROW_SERVER" "$ROW_KIND" "$ROW_VARIANT")
  if [[ -z $peak ]] || ! wait_http "$URL" 20; then
    echo "-- $id: no peak or did not start; skipped" >&2
    stop_server
    return 0
  fi
  rate=$((peak / 2))
  echo "-- $ROW_SERVER $ROW_KIND $ROW_VARIANT (round $round): peak $peak req/s, oha -q $rate" >&2
  run_wrk 0 "$WARM" >/dev/null || true
  res=$(timeout $((RATE_SECS + 30)) oha --no-tui --output-format json --latency-correction \
    -z "${RATE_SECS}s" -c "$CONNS" -q "$rate" "$URL" 2>>"$OUT/logs/oha.log" || true)
  [[ -n $res ]] || res=null
  printf '{"server":"%s","kind":"%s","variant":"%s","round":%s,"peak":%s,"rate":%s,"seconds":%s,"conns":%s,"load1":%s,"oha":%s}\n' \
    "$ROW_SERVER" "$ROW_KIND" "$ROW_VARIANT" "$round" "$peak" "$rate" "$RATE_SECS" "$CONNS" \
    "$(cut -d' ' -f1 /proc/loadavg)" "$(tr -d '\n' <<<"$res")" >>"$OUT/fixed_rate.jsonl"
  stop_server
}

# ---------------------------------------------------------------- scaling
# gpe KIND with each of SCALE_WORKERS workers, loaded by wrk with each of
# SCALE_CONNS connections (1 s warm-up, SCALE_SECS measured), RSS of the
# master and the workers (VmRSS) at the end of each load. --worker-connections
# is raised above the largest connection count, so that one worker holds them all.
run_scaling() {
  log "scaling: gpe $SCALE_KINDS, workers $SCALE_WORKERS x connections $SCALE_CONNS, ${SCALE_SECS}s each"
  local kind w c res max=0 total
  for c in $SCALE_CONNS; do ((c > max)) && max=$c; done
  for kind in $SCALE_KINDS; do
    for w in $SCALE_WORKERS; do
      start_server "scale-$kind-$w" "$GPE" serve -k "$kind" -w "$w" --worker-connections $((max + 64)) \
        --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT"
      if ! wait_http "$URL" 20; then
        echo "-- scaling $kind -w $w did not start" >&2
        stop_server
        continue
      fi
      sleep 0.5
      for c in $SCALE_CONNS; do
        CONNS=$c run_wrk 0 1 >/dev/null || true
        res=$(CONNS=$c run_wrk 0 "$SCALE_SECS" || true)
        # shellcheck disable=SC2046
        total=$(total_rss_mib $(gpe_master_and_workers "$SERVER_PID"))
        [[ -n $res ]] || res=null
        printf '{"kind":"%s","workers":%s,"conns":%s,"processes":%s,"rss_total_mib":%s,"load1":%s,"wrk":%s}\n' \
          "$kind" "$w" "$c" "$(gpe_master_and_workers "$SERVER_PID" | wc -l)" "$total" \
          "$(cut -d' ' -f1 /proc/loadavg)" "$res" >>"$OUT/scaling.jsonl"
        echo "   $kind -w $w -c $c: $res rss=${total}MiB" >&2
      done
      stop_server
    done
  done
}

# ---------------------------------------------------------------- exporter scrape scaling
# bench/scrape.sh (when present) writes bench/out/scrape.csv and docs/bench-scrape.png.
run_scrape_scaling() {
  [[ -x $HERE/scrape.sh || -f $HERE/scrape.sh ]] || return 0
  log "exporter scrape scaling: bench/scrape.sh"
  BENCH_QUICK=$QUICK bash "$HERE/scrape.sh" || echo "   bench/scrape.sh failed" >&2
}

# ---------------------------------------------------------------- instructions
# bench/instructions.sh (valgrind): instructions per request by layer, into
# bench/out/instructions.jsonl.
run_instructions() {
  command -v valgrind >/dev/null || { echo "   valgrind missing: no instruction counts" >&2; return 0; }
  log "instructions per request: bench/instructions.sh"
  BENCH_BUILT=1 BENCH_INSTR_REQUESTS=$(q 10000 3000) BENCH_PORT=$PORT BENCH_METRICS_PORT=$MPORT \
    bash "$HERE/instructions.sh" >/dev/null || echo "   bench/instructions.sh failed" >&2
}

# ---------------------------------------------------------------- layers
# bench/layers.sh (perf record): CPU time per request by layer; it writes its
# own section of BENCHMARKS.md, which report.py keeps.
run_layers() {
  log "CPU time per request by layer: bench/layers.sh"
  BENCH_BUILT=1 BENCH_LAYERS_WRITE=1 BENCH_SECONDS=$(q 4 2) BENCH_LAYERS_FREQ=${BENCH_LAYERS_FREQ:-999} BENCH_PORT=$PORT BENCH_METRICS_PORT=$MPORT \
    bash "$HERE/layers.sh" >/dev/null || echo "   bench/layers.sh failed" >&2
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
  # `--unmatched-route path`: the hello app answers /p/N with 404 and names no
  # route, so without it all 1,000 paths would be one `unmatched` label set.
  start_server gpe-scrape "$GPE" serve -k sync -w 8 -c "$conf" --metrics-max-series 2000 --unmatched-route path \
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
PROFILE_SECS=${BENCH_PROFILE_SECONDS:-$(q 5 2)}
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
  rm -f "$OUT"/finished "$OUT"/set-up "$OUT"/results.jsonl "$OUT"/scrape.jsonl "$OUT"/profile.jsonl "$OUT"/fixed_rate.jsonl \
    "$OUT"/scaling.jsonl "$OUT"/scrape.csv "$OUT"/instructions.jsonl "$OUT"/round-servers "$OUT"/logs/*.log "$OUT"/logs/*.csv
  : >"$OUT/results.jsonl"; : >"$OUT/scrape.jsonl"; : >"$OUT/profile.jsonl"
  : >"$OUT/fixed_rate.jsonl"; : >"$OUT/scaling.jsonl"
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
  date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/set-up"
  for p in "$PORT" "$MPORT" "$PPORT"; do
    ss -Hltn "sport = :$p" | grep -q . && { echo "port $p is busy; set BENCH_*PORT" >&2; exit 1; }
  done
  # wrk and the servers need a descriptor per connection of the scaling runs.
  ulimit -n 8192 2>/dev/null || true
  log "throughput: wrk -t1 -c$CONNS, ${WARM}s warm-up + ${SECS}s, $REPEAT interleaved round(s)"
  run_rounds
  [[ ${BENCH_SKIP_TLS:-0} == 1 ]] || run_tls
  [[ ${BENCH_SKIP_PEER:-0} == 1 ]] || run_peer
  [[ ${BENCH_SKIP_RATE:-0} == 1 ]] || run_fixed_rate
  [[ ${BENCH_SKIP_SCALING:-0} == 1 ]] || run_scaling
  [[ ${BENCH_SKIP_PROFILE:-0} == 1 ]] || run_profile
  [[ ${BENCH_SKIP_SCRAPE:-0} == 1 ]] || scrape_gpe
  [[ ${BENCH_SKIP_PEER:-0} == 1 || ${BENCH_SKIP_SCRAPE:-0} == 1 || ${BENCH_SKIP_PEER_SCRAPE:-0} == 1 ]] || scrape_peer
  [[ ${BENCH_SKIP_SCRAPE:-0} == 1 ]] || run_scrape_scaling
  [[ ${BENCH_SKIP_INSTR:-0} == 1 ]] || run_instructions
  [[ ${BENCH_SKIP_LAYERS:-0} == 1 ]] || run_layers
  [[ ${BENCH_SKIP_MICRO:-0} == 1 ]] || run_micro
  log "report: BENCHMARKS.md and the plots"
  # The report states how long the measurements took (item 6 of issue 13:
  # the whole run within 20 minutes on 2 cores).
  date -u +%Y-%m-%dT%H:%M:%SZ >"$OUT/finished"
  wrk_version=$(wrk -v 2>&1 | head -1 || true)
  BENCH_PROFILE_SECONDS=$PROFILE_SECS BENCH_SECONDS=$SECS BENCH_WARMUP=$WARM BENCH_REPEAT=$REPEAT BENCH_SCRAPES=$SCRAPES BENCH_CONNECTIONS=$CONNS BENCH_WRK_VERSION="$wrk_version" \
    BENCH_TLS_REPEAT=$TLS_REPEAT BENCH_RATE_SECONDS=$RATE_SECS BENCH_RATE_REPEAT=$RATE_REPEAT BENCH_SCALE_SECONDS=$SCALE_SECS BENCH_QUICK=$QUICK \
    BENCH_RESPAWNS=$RESPAWNS BENCH_OHA_VERSION="$(oha --version 2>/dev/null | head -1 || true)" \
    "$([[ -x $VENV/bin/python ]] && echo "$VENV/bin/python" || echo python3)" "$HERE/report.py" "$ROOT" "$OUT"
}
main "$@"
