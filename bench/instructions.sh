#!/usr/bin/env bash
# Instructions per request, by layer: a cost figure that does not depend on
# the host's speed or its scheduler (valgrind counts the instructions each
# function executes; the kernel's share, the system calls and context
# switches, is not in it: bench/run.sh's perf-stat profile shows that part).
#
#   bench/instructions.sh            # table on stdout, JSON lines in bench/out/instructions.jsonl
#
# Each server runs under `valgrind --tool=callgrind` with one worker process
# (one runtime thread for the ceiling) and serves BENCH_INSTR_REQUESTS
# keep-alive requests of the hello route over 8 connections (h2load), after
# 200 to warm up. The worker's instruction count is divided by the requests
# it served (start-up is in the count: about 1% of it at 10,000 requests).
# Layers are inclusive costs of the functions that begin them, so each
# request's instructions split into:
#   app              the app's tower service (gpe's hello: routing, the response);
#   instrumentation  gpe around the app: checks of the head (Host, limits,
#                    framing), the in-flight table, the metric updates at the
#                    end of the response, the Server header;
#   deadline watch   the http/1 head and idle deadlines beside hyper;
#   admission        the drain watch of each connection;
#   hyper + runtime  the rest: parsing, dispatch, response head, buffers, the
#                    runtime (tokio, or smol for greenlet) and its IO driver; on
#                    thread also the hand-off to the pool and back.
# On eventloop one more row serves the hello through the axum Router of
# examples/axum-app (its `app` is then the Router).
# Environment: BENCH_INSTR_REQUESTS (10000), BENCH_INSTR_KINDS ("eventloop
# thread greenlet"), CARGO_TARGET_DIR.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
OUT=$HERE/out
N=${BENCH_INSTR_REQUESTS:-10000}
KINDS=${BENCH_INSTR_KINDS:-eventloop thread greenlet}
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
PORT=${BENCH_PORT:-18000}
MPORT=${BENCH_METRICS_PORT:-19091}
URL=http://127.0.0.1:$PORT/
mkdir -p "$OUT/logs" "$OUT/callgrind"

for tool in valgrind callgrind_annotate h2load curl; do
  command -v "$tool" >/dev/null || {
    echo "bench/instructions.sh: $tool is missing (Debian: valgrind, nghttp2-client, curl)" >&2
    exit 1
  }
done
# bench/run.sh built everything at its start (BENCH_BUILT=1): building again
# would measure whatever the tree holds by then.
[[ ${BENCH_BUILT:-0} == 1 ]] ||
  (cd "$ROOT" && cargo build --release -q -p gpe -p gpe-bench-ceiling -p gpe-example-axum-app)
GPE=$TARGET/release/gpe
CEILING=$TARGET/release/gpe-bench-ceiling
AXUM=$TARGET/release/gpe-axum-app

CONNS=8
# shellcheck source=bench/lib.sh
source "$HERE/lib.sh"

# Inclusive instructions of the first function matching $2 in annotate output $1.
incl() {
  grep -m1 -E "$2" "$1" | awk '{v=$1; gsub(",", "", v); print v + 0}' || echo 0
}

# Runs "$@" under callgrind, loads it, prints one JSON line.
measure() {
  local name=$1; shift
  rm -f "$OUT/callgrind/$name".*
  start_server "instr-$name" valgrind --tool=callgrind --trace-children=yes \
    --callgrind-out-file="$OUT/callgrind/$name.%p" "$@"
  local i
  for i in $(seq 1 600); do
    curl -s -o /dev/null --max-time 2 "$URL" && break
    sleep 0.2
  done
  h2load --h1 -n 200 -c "$CONNS" "$URL" >/dev/null 2>&1
  local done_
  done_=$(h2load --h1 -n "$N" -c "$CONNS" "$URL" 2>&1 | awk '/^requests:/ {print $8}')
  # valgrind writes a process's counts when it exits: give it time to.
  kill -TERM "$SERVER_PID" 2>/dev/null || true
  for i in $(seq 1 600); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  stop_server
  # The worker's file counts the most instructions (the master and the
  # exporter idle).
  local file f
  file=$(for f in "$OUT/callgrind/$name".*; do
    [[ $f == *.txt ]] || echo "$(awk '/^summary:/ {print $2; exit}' "$f") $f"
  done | sort -n | tail -1 | cut -d' ' -f2)
  callgrind_annotate --inclusive=yes "$file" >"$file.txt" 2>/dev/null
  local total app handle finish select upgr watch admit served
  total=$(awk '/^summary:/ {print $2; exit}' "$file")
  served=$((done_ + 200 + 1))
  app=$(incl "$file.txt" 'ServiceApp<S> as gpe_core::http::app::App>::call::\{\{closure\}\}')
  handle=$(incl "$file.txt" 'Instrumented::handle::\{\{closure\}\}')
  finish=$(incl "$file.txt" 'instrument::Finish as gpe_core::http::body::OnEnd>::ended')
  select=$(incl "$file.txt" 'futures_util::future::select::Select<A,B> as core::future::future::Future>::poll')
  upgr=$(incl "$file.txt" 'hyper::server::conn::http1::UpgradeableConnection<I,S> as core::future::future::Future>::poll')
  watch=$(incl "$file.txt" 'gpe_core::http::conn::Watch::')
  admit=$(incl "$file.txt" 'Admission::drained')
  python3 - "$name" "$served" "$total" "$app" "$handle" "$finish" "$select" "$upgr" "$watch" "$admit" <<'EOF' | tee -a "$OUT/instructions.jsonl"
import json, sys
name, served, total, app, handle, finish, select, upgr, watch, admit = sys.argv[1], *map(int, sys.argv[2:])
per = lambda v: round(v / served)
row = {"server": name, "requests": served, "total": per(total)}
if handle:
    row["app"] = per(app)
    # On thread the app runs on a pool thread, outside the IO thread's
    # instrumentation future; elsewhere it is polled inside it.
    nested = not name.startswith("thread")
    row["instrumentation"] = per(handle - (app if nested else 0) + finish)
    # The select of serve_conn beside hyper's connection is tokio's edge;
    # greenlet has its own loop, where only the watch's functions count.
    tokio_edge = name.startswith(("eventloop", "thread"))
    row["deadline watch"] = per((max(select - upgr, 0) if tokio_edge else 0) + watch)
    row["admission"] = per(admit)
    row["hyper + runtime"] = row["total"] - sum(row[k] for k in ("app", "instrumentation", "deadline watch", "admission"))
print(json.dumps(row))
EOF
}

: >"$OUT/instructions.jsonl"
measure ceiling "$CEILING" --bind "127.0.0.1:$PORT" --threads 1
for kind in $KINDS; do
  for metrics in on off; do
    flags=()
    [[ $metrics == off ]] && flags=(--no-metrics)
    measure "$kind-metrics-$metrics" "$GPE" serve -k "$kind" -w 1 --bind "127.0.0.1:$PORT" \
      --metrics-bind "127.0.0.1:$MPORT" --timeout 120 "${flags[@]}"
  done
  # The same hello through the axum Router of examples/axum-app (metrics on):
  # what serving a tower service costs against the built-in app, counted.
  [[ $kind == eventloop ]] && measure "$kind-axum-router" "$AXUM" -k "$kind" -w 1 \
    --bind "127.0.0.1:$PORT" --metrics-bind "127.0.0.1:$MPORT" --timeout 120
done

python3 - "$OUT/instructions.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cols = ["total", "app", "instrumentation", "deadline watch", "admission", "hyper + runtime"]
base = rows[0]["total"]
print("| server | " + " | ".join(cols) + " | × ceiling |")
print("|---|" + "---:|" * (len(cols) + 1))
for r in rows:
    cells = [f"{r[c]:,}" if c in r else "-" for c in cols]
    print(f"| {r['server']} | " + " | ".join(cells) + f" | {r['total'] / base:.2f} |")
EOF
