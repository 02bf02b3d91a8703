#!/usr/bin/env python3
"""Turns bench/ab.sh's raw results into a Markdown section and prints it.

usage: ab_report.py ROOT OUT   (ROOT = repository, OUT = bench/out)

Reads OUT/ab.jsonl, OUT/ab.meta and OUT/ab-perf.jsonl (if present). With
BENCH_AB_WRITE=1 it also replaces the section between the A/B markers of
ROOT/BENCHMARKS.md (appending it if the markers are missing); bench/report.py
keeps that section when it rewrites the file.
"""

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_peers import load_jsonl, markers, rps, write_kept_section  # noqa: E402  (bench/report_peers.py)

START, END = markers("ab")
KINDS = ["sync", "thread", "eventloop", "greenlet"]


def errors(row):
    w = row.get("wrk") or {}
    return sum(w.get(k, 0) for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))


def section(out):
    runs = load_jsonl(out / "ab.jsonl")
    meta = dict(line.split("=", 1) for line in (out / "ab.meta").read_text().splitlines() if "=" in line)
    shape = {k: meta.get(k, "?") for k in ("seconds", "warmup", "connections", "rounds")}
    secs = shape["seconds"]
    lines = [
        "| worker | old req/s (runs) | new req/s (runs) | new/old per round | median new/old "
        "| CPU µs/request old → new (median) | CPU new/old | context switches/request old → new "
        "| errors | load (1 min) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in [k for k in KINDS if any(r["kind"] == k for r in runs)]:
        rows = [r for r in runs if r["kind"] == kind]
        old = [r for r in rows if r["side"] == "old"]
        new = [r for r in rows if r["side"] == "new"]
        ratios = []
        for rnd in sorted({r["round"] for r in rows}):
            o = [rps(r) for r in old if r["round"] == rnd]
            n = [rps(r) for r in new if r["round"] == rnd]
            if o and n and o[0] and n[0]:
                ratios.append(n[0] / o[0])

        def runs_s(side):
            v = [rps(r) for r in side if rps(r) is not None]
            if not v:
                return "–"
            return f"{statistics.median(v):,.0f} ({', '.join(f'{x / 1000:.1f}k' for x in v)})"

        med = f"**{statistics.median(ratios):.3f}**" if ratios else "–"

        def per_req(side, ev, scale=1.0):
            v = [r["perf"][ev] * scale / r["wrk"]["requests"] for r in side
                 if r.get("wrk") and r["wrk"].get("requests") and ev in (r.get("perf") or {})]
            return statistics.median(v) if v else None
        cpu_o, cpu_n = per_req(old, "task-clock", 1000), per_req(new, "task-clock", 1000)
        cs_o, cs_n = per_req(old, "context-switches"), per_req(new, "context-switches")
        cpu_s = "–" if cpu_o is None or cpu_n is None else f"{cpu_o:.2f} → {cpu_n:.2f}"
        cpu_r = "–" if not cpu_o or cpu_n is None else f"{cpu_n / cpu_o:.2f}"
        cs_s = "–" if cs_o is None or cs_n is None else f"{cs_o:.2f} → {cs_n:.2f}"
        loads = [r["load1"] for r in rows]
        lines.append(
            f"| {kind}{' (close)' if kind == 'sync' else ''} | {runs_s(old)} | {runs_s(new)} "
            f"| {', '.join(f'{x:.3f}' for x in ratios) or '–'} | {med} | {cpu_s} | {cpu_r} | {cs_s} "
            f"| {sum(errors(r) for r in rows)} "
            f"| {min(loads):.2f}–{max(loads):.2f} |")
    table = "\n".join(lines)

    perf = load_jsonl(out / "ab-perf.jsonl")
    ptable = ""
    if perf:
        pl = ["| worker | build | req/s (under perf) | CPU µs/request | context switches/request "
              "| syscalls/request | futex/request |", "|---|---|---|---|---|---|---|"]
        for p in perf:
            n = (p.get("wrk") or {}).get("requests")
            c = p.get("perf") or {}

            def per(ev, scale=1.0):
                v = c.get(ev)
                return "–" if v is None or not n else f"{v * scale / n:.2f}"
            pl.append(f"| {p['kind']} | {p['side']} | {rps(p) or 0:,.0f} | {per('task-clock', 1000)} "
                      f"| {per('context-switches')} | {per('raw_syscalls:sys_enter')} "
                      f"| {per('syscalls:sys_enter_futex')} |")
        ptable = ("\n\n`perf stat` on the two workers during one more run per type and build "
                  "(same shape): the workers' task-clock, context switches and syscalls divided by "
                  "the requests wrk counted.\n\n" + "\n".join(pl))

    return f"""{START}
## A/B against an earlier commit

`bench/ab.sh {meta.get('old', '?')}`: the built-in hello app, `gpe serve -k TYPE -w 2`,
metrics on, loaded with `wrk -t1 -c{shape.get('connections', '16')}` ({shape.get('warmup', '2')} s warm-up, {secs} s measured;
sync with `Connection: close`), the old and the new build alternating
({shape.get('rounds', '3')} rounds per type: odd rounds run old then new, even rounds new then old).
*new/old per round* divides the two runs of one round; the verdict is their median.
*CPU µs/request* is the two workers' task-clock (`perf stat`, software counters,
during the measured run) over the requests wrk counted, the median of each side's
runs: it moves much less than req/s when other jobs share the CPUs.

- **Run:** {meta.get('started', '?')} (UTC); old = `{meta.get('old', '?')}`, new = `{meta.get('new', '?')}`
- **Load average** (1, 5, 15 min) at the start: {meta.get('loadavg_start', '?')}; at the end: {meta.get('loadavg_end', '?')}.
  Other jobs shared the 2 CPUs during the run; the ratios are the figures to read,
  not the absolute rates.

{table}{ptable}
{END}"""


def main():
    write_kept_section("ab", section, "BENCH_AB_WRITE")


if __name__ == "__main__":
    main()
