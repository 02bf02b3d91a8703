# Shared by bench/run.sh and bench/ab.sh (sourced): process handling, readiness
# checks and the one wrk shape every throughput figure uses. Expects HERE, OUT,
# CONNS, PORT, MPORT and URL to be set.

# ---------------------------------------------------------------- processes
PIDS=()
descendants() {
  local k
  for k in $(cat /proc/"$1"/task/*/children 2>/dev/null || true); do
    echo "$k"; descendants "$k"
  done
}
stop_pid() {
  local pid=$1 i k kids
  kill -0 "$pid" 2>/dev/null || return 0
  kids=$(descendants "$pid")
  kill -TERM "$pid" 2>/dev/null || true
  for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  # Descendants that outlived their master (they should not; a stuck peer master does).
  for k in $kids $(descendants "$pid"); do kill -KILL "$k" 2>/dev/null || true; done
}
cleanup() {
  local p
  for p in "${PIDS[@]}"; do stop_pid "$p"; done
  PIDS=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Starts "$@" in the background, logging to $OUT/logs/$1.log; sets SERVER_PID.
start_server() {
  local name=$1; shift
  "$@" >"$OUT/logs/$name.log" 2>&1 &
  SERVER_PID=$!
  PIDS+=("$SERVER_PID")
}
stop_server() {
  stop_pid "$SERVER_PID"
  local keep=() p
  for p in "${PIDS[@]}"; do [[ $p == "$SERVER_PID" ]] || keep+=("$p"); done
  PIDS=("${keep[@]}")
  wait_port_free "$PORT"
}

wait_port_free() {
  local i
  for i in $(seq 1 100); do
    ss -Hltn "sport = :$1" | grep -q . || return 0
    sleep 0.1
  done
  echo "port $1 still in use" >&2
  return 1
}

# Waits until $1 answers 200 (up to $2 seconds) while $SERVER_PID lives
# (an https URL's self-signed certificate is not checked).
wait_http() {
  local url=$1 limit=${2:-20} i
  for i in $(seq 1 $((limit * 10))); do
    kill -0 "$SERVER_PID" 2>/dev/null || return 1
    if [[ $(curl -sk -o /dev/null -w '%{http_code}' --max-time 1 "$url" || true) == 200 ]]; then
      return 0
    fi
    sleep 0.1
  done
  return 1
}

children() { cat /proc/"$1"/task/*/children 2>/dev/null | tr ' ' '\n' | grep . || true; }

# gpe worker pids: the master's children except the exporter (the child that
# listens on the metrics port).
gpe_worker_pids() {
  local master=$1 exp k
  exp=$(ss -Hltnp "sport = :$MPORT" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort -u || true)
  for k in $(children "$master"); do
    grep -qx "$k" <<<"$exp" || echo "$k"
  done
}

# Mean resident set (MiB) of the given pids, from /proc/<pid>/statm.
mean_rss_mib() {
  local page n=0 sum=0 p r
  page=$(getconf PAGESIZE)
  for p in "$@"; do
    r=$(awk '{print $2}' /proc/"$p"/statm 2>/dev/null || true)
    [[ -n $r ]] || continue
    sum=$((sum + r * page)); n=$((n + 1))
  done
  if ((n == 0)); then echo null; else awk -v s="$sum" -v n="$n" 'BEGIN{printf "%.2f", s/n/1048576}'; fi
}

# wrk with the shared shape; $1 = 1 for Connection: close; prints the WRKJSON
# object. WRK_PREFIX, if set, is a command wrk runs under (taskset -c 0).
run_wrk() {
  local close=$1 secs=$2; shift 2
  local hdr=() pre=()
  [[ $close == 1 ]] && hdr=(-H 'Connection: close')
  [[ -z ${WRK_PREFIX:-} ]] || read -ra pre <<<"$WRK_PREFIX"
  timeout $((secs + 30)) "${pre[@]}" wrk -t1 -c"$CONNS" -d"${secs}s" --timeout 5s \
    -s "$HERE/wrk/report.lua" "${hdr[@]}" "$@" "$URL" 2>&1 |
    tee -a "$OUT/logs/wrk.log" | sed -n 's/^WRKJSON //p'
}


# $1 and its descendants (by pid).
tree() { echo "$1"; descendants "$1"; }

# gpe's master and its workers (not the exporter).
gpe_master_and_workers() { echo "$1"; gpe_worker_pids "$1"; }

# CPU time (user + system, in clock ticks) the given pids have used so far,
# all their threads included (/proc/<pid>/stat fields 14 and 15).
cpu_ticks() {
  local p sum=0 t
  for p in "$@"; do
    t=$(awk '{print $14 + $15}' /proc/"$p"/stat 2>/dev/null || true)
    [[ -n $t ]] && sum=$((sum + t))
  done
  echo "$sum"
}

# Total resident set (MiB) of the given pids: the sum of VmRSS in /proc/<pid>/status.
total_rss_mib() {
  local sum=0 n=0 p r
  for p in "$@"; do
    r=$(awk '/^VmRSS:/ {print $2}' /proc/"$p"/status 2>/dev/null || true)
    [[ -n $r ]] || continue
    sum=$((sum + r)); n=$((n + 1))
  done
  if ((n == 0)); then echo null; else awk -v s="$sum" 'BEGIN{printf "%.2f", s/1024}'; fi
}
