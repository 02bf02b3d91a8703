#!/usr/bin/env bash
# Scrape time against workers x series: runs the exporter's scrape_grid bench
# (exporter/benches/scrape_grid.rs: one full scrape of a store filled through
# the store's own writer API, timed many times per point), writes
# bench/out/scrape.csv (workers,series,p50_ms,p99_ms,bytes) and draws
# docs/bench-scrape.png (scrape p50 against workers, one line per series
# count).
#
# BENCH_QUICK=1: workers 1, 16, 64, 256 at 1,000 series, 1 s a point (under
# a minute once built). SCRAPE_SECONDS sets the time a point is measured
# (default 3, quick 1).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
OUT=$HERE/out
CSV=$OUT/scrape.csv
PNG=$ROOT/docs/bench-scrape.png
mkdir -p "$OUT"
export CARGO_INCREMENTAL=0

args=()
if [ "${BENCH_QUICK:-0}" = 1 ]; then args+=(--quick); fi
cd "$ROOT"
cargo bench -q -p gpe-exporter --bench scrape_grid -- "${args[@]}" >"$CSV.tmp"
head -1 "$CSV.tmp" | grep -qx 'workers,series,p50_ms,p99_ms,bytes'
mv "$CSV.tmp" "$CSV"
echo "wrote $CSV"
cat "$CSV"

if ! python3 -c 'import matplotlib' 2>/dev/null; then
  python3 -m pip install -q matplotlib 2>/dev/null \
    || python3 -m pip install -q --break-system-packages matplotlib
fi
python3 - "$CSV" "$PNG" <<'PY'
import csv, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

rows = list(csv.DictReader(open(sys.argv[1])))
fig, ax = plt.subplots(figsize=(7, 4.5))
for series in sorted({int(r["series"]) for r in rows}):
    pts = sorted((int(r["workers"]), float(r["p50_ms"])) for r in rows if int(r["series"]) == series)
    ax.plot([w for w, _ in pts], [p for _, p in pts], marker="o", label=f"{series:,} series per worker")
ax.set_xscale("log", base=2)
ticks = sorted({int(r["workers"]) for r in rows})
ax.set_xticks(ticks, [str(t) for t in ticks])
ax.set_xlabel("workers")
ax.set_ylabel("scrape p50 (ms)")
ax.set_title("gpe exporter: one scrape (read the store and /proc, merge, encode text)")
ax.grid(True, which="both", alpha=0.3)
ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
print("wrote", sys.argv[2])
PY
