#!/usr/bin/env python3
"""Turns bench/idle_yield.sh's results into a Markdown section and prints it.

usage: yield_report.py ROOT OUT   (ROOT = repository, OUT = bench/out)

Reads OUT/idle_yield.jsonl and OUT/idle_yield.meta. With BENCH_YIELD_WRITE=1
it also replaces the section between the yield markers of ROOT/BENCHMARKS.md
(appending it if the markers are missing); bench/report.py keeps that section
when it rewrites the file.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_peers import load_jsonl, markers, median, rps, write_kept_section  # noqa: E402

LOAD_NOTES = {
    "c16": "wrk -c16, 2 workers (bench/run.sh's shape)",
    "c256": "wrk -c256, 2 workers",
    "split": "1 worker pinned to CPU 1, wrk to CPU 0",
}


def lat_ms(row, q):
    v = ((row.get("oha") or {}).get("latencyPercentiles") or {}).get(q)
    return None if v is None else v * 1000


def pairs(rows, kind, load, halt, f):
    """(yield on, yield off) values of f, one pair per round that has both."""
    out = []
    for rnd in sorted({r["round"] for r in rows}):
        side = {}
        for r in rows:
            if (r["kind"], r["load"], r["round"], r.get("halt")) == (kind, load, rnd, halt):
                side[r["yield"]] = f(r)
        if side.get(True) and side.get(False):
            out.append((side[True], side[False]))
    return out


def tables(rows, halt):
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    loads = list(dict.fromkeys(r["load"] for r in rows))
    lines = ["| worker | load | req/s yield on | req/s yield off | on / off | per round |",
             "|---|---|---:|---:|---:|---|"]
    for k in kinds:
        for ld in loads:
            p = pairs(rows, k, ld, halt, rps)
            if ld == "rate" or not p:
                continue
            ratios = [a / b for a, b in p]
            lines.append(f"| {k} | {LOAD_NOTES.get(ld, ld)} | {median([a for a, _ in p]):,.0f} | "
                         f"{median([b for _, b in p]):,.0f} | {median(ratios):.2f} | "
                         f"{', '.join(f'{x:.2f}' for x in ratios)} |")
    if "rate" in loads:
        lines += ["", "| worker | rate asked (req/s) | p50 ms, on / off | p99 ms, on / off |",
                  "|---|---:|---|---|"]
        for k in kinds:
            r50 = pairs(rows, k, "rate", halt, lambda r: lat_ms(r, "p50"))
            r99 = pairs(rows, k, "rate", halt, lambda r: lat_ms(r, "p99"))
            rate = median([r["rate"] for r in rows
                           if (r["kind"], r["load"], r.get("halt")) == (k, "rate", halt)])
            if r50 and r99:
                lines.append(f"| {k} | {rate:,.0f} | {median([a for a, _ in r50]):.2f} / "
                             f"{median([b for _, b in r50]):.2f} | {median([a for a, _ in r99]):.2f} / "
                             f"{median([b for _, b in r99]):.2f} |")
    return "\n".join(lines)


def section(out):
    rows = load_jsonl(out / "idle_yield.jsonl")
    meta = dict(line.split("=", 1) for line in
                (out / "idle_yield.meta").read_text().splitlines() if "=" in line)
    start, end = markers("yield")
    parts = [start, "## Does `idle_yield` win? (bench/idle_yield.sh)", "",
             f"- **Run:** {meta.get('date', '?')} (UTC), gpe commit `{meta.get('commit', '?')}`, "
             f"{meta.get('rounds', '?')} interleaved round(s) of {meta.get('secs', '?')} s: in each "
             "round every worker type and load ran with `--idle-yield true` and `false`, one after "
             "the other (the order alternating by round).",
             f"- **Machine:** {meta.get('machine', '?')}",
             "- req/s are the medians over the rounds; *on / off* is the median of the "
             "per-round ratios. *rate*: oha at 50% of the yield-on peak of the first load, "
             "latency corrected for coordinated omission.",
             "- *guest_halt_poll_ns* is the guest's cpuidle-haltpoll setting: how long an idle "
             "vCPU polls for work before it halts (0: it halts at once, and waking it costs a "
             "VM exit)."]
    for halt in dict.fromkeys(r.get("halt") for r in rows):
        parts += ["", f"**guest_halt_poll_ns = {halt}**", "", tables(rows, halt)]
    parts.append(end)
    return "\n".join(parts)


def main():
    write_kept_section("yield", section, "BENCH_YIELD_WRITE")


if __name__ == "__main__":
    main()
