"""The sections of BENCHMARKS.md on the Rust peers, the two ceilings, latency
at a fixed rate, scaling and the exporter's scrape scaling (issue 13), and
their targets. Used by bench/report.py; every figure is computed here from
bench/out, none is typed.

Inputs (bench/out): results.jsonl (rows with a "round" > 0 come from the
interleaved rounds), fixed_rate.jsonl (oha), scaling.jsonl (wrk + RSS),
scrape.csv (bench/scrape.sh: workers,series,p50_ms,p99_ms,bytes).
"""

import csv
import json
import os
import sys
from pathlib import Path

KEEPALIVE = ["thread", "eventloop", "greenlet"]

# The targets.
T_VS_CEILING = 0.90
T_VS_FORKED = 0.97
T_VS_ACTIX = 1.0
T_VS_PROM = 1.3
T_P99_MS = 1.0
T_SCRAPE = {(64, 1000): 5.0, (256, 1000): 15.0}

CEIL_2T = ("ceiling", "hyper-2t", "keepalive")
CEIL_FORKED = ("ceiling", "forked-ct", "keepalive")
CEIL_FORKED_BAL = ("ceiling", "forked-ct-bal", "keepalive")
PEERS = {
    "actix plain": ("rust-peer", "actix", "plain"),
    "actix-web-prom": ("rust-peer", "actix", "prom"),
    "axum plain": ("rust-peer", "axum", "plain"),
    "axum-prometheus": ("rust-peer", "axum", "prom"),
}
NAMES = {
    CEIL_2T: "ceiling: tokio+hyper, 1 process, 2-thread runtime",
    CEIL_FORKED: "forked ceiling: 2 processes, current-thread runtime each, one listener",
    CEIL_FORKED_BAL: "forked ceiling, balanced as gpe balances (`--balanced`)",
    PEERS["actix plain"]: "actix-web 4, 2 workers",
    PEERS["actix-web-prom"]: "actix-web 4 + actix-web-prom, 2 workers",
    PEERS["axum plain"]: "axum 0.8, 2-thread tokio runtime",
    PEERS["axum-prometheus"]: "axum 0.8 + axum-prometheus, 2-thread tokio runtime",
    ("gpe", "eventloop", "axum"): "gpe eventloop, the axum Router of examples/axum-app (metrics on)",
}


def load_jsonl(p):
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def rps(row):
    w = row and row.get("wrk")
    if not w or not w.get("duration_us"):
        return None
    return w["requests"] / (w["duration_us"] / 1e6)


def cpu_us(row):
    """µs of CPU (user + system, every process of the server) per request
    during the measured load, or None (rows of runs before it was recorded)."""
    w = row and row.get("wrk")
    if not w or not w.get("requests") or row.get("cpu_s") is None:
        return None
    return row["cpu_s"] * 1e6 / w["requests"]


# Sections of BENCHMARKS.md that their own scripts write (each with its own
# run and date); bench/report.py keeps them when it rewrites the file.
KEPT_SECTIONS = {
    "ab": "bench/ab.sh",
    "yield": "bench/idle_yield.sh",
    "layers": "bench/layers.sh",
}


def markers(name):
    """The start and end markers of kept section `name`."""
    return (f"<!-- {name}:start ({KEPT_SECTIONS[name]}; kept by bench/report.py) -->",
            f"<!-- {name}:end -->")


def put_section(path, name, md):
    """Replaces kept section `name` of the file at `path` with `md` (which
    carries its markers), appending it if the file has none."""
    start, end = markers(name)
    text = path.read_text() if path.exists() else ""
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + md + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + md + "\n"
    path.write_text(text)


def write_kept_section(name, section, env):
    """The main of a script that owns kept section `name`: prints
    `section(OUT)` and, when environment variable `env` is 1, puts it into
    ROOT/BENCHMARKS.md (argv: ROOT OUT)."""
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    md = section(out)
    print(md)
    if os.environ.get(env) == "1":
        path = root / "BENCHMARKS.md"
        put_section(path, name, md)
        print(f"\nwrote the {name} section of {path}", file=sys.stderr)


def kept_sections(text):
    """The kept sections found in `text`, in KEPT_SECTIONS order, markers included."""
    out = []
    for name in KEPT_SECTIONS:
        start, end = markers(name)
        if start in text and end in text:
            out.append(start + text.split(start, 1)[1].split(end, 1)[0] + end)
    return out


def median(v):
    v = sorted(x for x in v if x is not None)
    if not v:
        return None
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def name_of(key):
    if key in NAMES:
        return NAMES[key]
    s, k, v = key
    return f"gpe {k}, " + ("metrics on" if v == "metrics" else "`--no-metrics`" if v == "no-metrics" else v)


def mark(ok):
    return "**met**" if ok else "**missed**"


def f2(x):
    return "–" if x is None else f"{x:.2f}"


class Rounds:
    """req/s per (server, kind, variant) and round, from the interleaved rounds."""

    def __init__(self, rows):
        self.by = {}
        self.cpu = {}
        self.rows = {}
        for r in rows:
            if not r.get("round"):
                continue
            key = (r["server"], r["kind"], r["variant"])
            self.rows.setdefault(key, []).append(r)
            v = rps(r)
            if v is not None:
                self.by.setdefault(key, {})[r["round"]] = v
            c = cpu_us(r)
            if c:
                self.cpu.setdefault(key, {})[r["round"]] = c

    def ratio(self, a, b):
        """Median over the rounds of a's req/s / b's in the same round, and the per-round ratios."""
        ra, rb = self.by.get(a, {}), self.by.get(b, {})
        per = [ra[k] / rb[k] for k in sorted(ra) if k in rb and rb[k]]
        return median(per), per

    def cpu_ratio(self, a, b):
        """Median over the rounds of b's CPU per request / a's in the same
        round (above 1: a serves a request with less CPU), and the per-round ratios."""
        ca, cb = self.cpu.get(a, {}), self.cpu.get(b, {})
        per = [cb[k] / ca[k] for k in sorted(ca) if k in cb and ca[k]]
        return median(per), per

    def cpu_per_request(self, key):
        return median(self.cpu.get(key, {}).values())

    def split(self, key, rnd):
        """How the connections were split over the processes in round `rnd`
        ("13/3", "16/0"), or None. The run lists only processes that held a
        connection; the others are added as zeros."""
        for r in self.rows.get(key, []):
            if r.get("round") == rnd and r.get("split"):
                parts = r["split"].split("/")
                parts += ["0"] * max(0, (r.get("workers") or 0) - len(parts))
                return "/".join(parts)
        return None

    def rate(self, key):
        return median(self.by.get(key, {}).values())

    def rss(self, key, field):
        return median([r.get(field) for r in self.rows.get(key, [])])

    def rounds(self):
        return sorted({k for d in self.by.values() for k in d})


def gpe_keys(rounds, variants=("metrics", "no-metrics")):
    return [("gpe", k, v) for k in KEEPALIVE for v in variants if ("gpe", k, v) in rounds.by]


def ratio_section(rounds):
    """The throughput of the rounds and the ratio table; returns (markdown, results)."""
    if not rounds.by:
        return "(not measured: no interleaved rounds in this run)", {}
    n = len(rounds.rounds())
    lines = ["| server | req/s (median of the rounds) | rounds | CPU µs per request | RSS per process MiB "
             "| RSS total MiB |",
             "|---|---|---|---|---|---|"]
    order = [CEIL_2T, CEIL_FORKED, CEIL_FORKED_BAL] + gpe_keys(rounds) + [("gpe", "eventloop", "axum")] \
        + list(PEERS.values())
    for key in order:
        if key not in rounds.rows:
            continue
        per = ", ".join(f"{rounds.by.get(key, {}).get(r, 0) / 1000:.1f}k" + split_note(rounds, key, r)
                        for r in rounds.rounds() if r in rounds.by.get(key, {}))
        rate = rounds.rate(key)
        cpu = rounds.cpu_per_request(key)
        lines.append(f"| {name_of(key)} | {'no result' if rate is None else f'{rate:,.0f}'} | {per} "
                     f"| {'–' if cpu is None else f'{cpu:.2f}'} "
                     f"| {f2(rounds.rss(key, 'rss_mib'))} | {f2(rounds.rss(key, 'rss_total_mib'))} |")
    throughput = "\n".join(lines)

    cols = [("/ ceiling 2t", CEIL_2T), ("/ forked ceiling", CEIL_FORKED), ("/ forked balanced", CEIL_FORKED_BAL),
            ("/ actix plain", PEERS["actix plain"]), ("/ axum plain", PEERS["axum plain"]),
            ("/ actix-web-prom", PEERS["actix-web-prom"]), ("/ axum-prometheus", PEERS["axum-prometheus"])]
    head = "| gpe | " + " | ".join(c for c, _ in cols) + " |"
    lines = [head, "|" + "---|" * (len(cols) + 1)]
    res = {}
    cpu_lines = [head, "|" + "---|" * (len(cols) + 1)]
    for key in gpe_keys(rounds) + [("gpe", "eventloop", "axum")]:
        if key not in rounds.by:
            continue
        cells, cpu_cells = [], []
        for c, other in cols:
            m, per = rounds.ratio(key, other)
            res[(key, other)] = (m, per)
            cells.append("–" if m is None else f"{m:.2f}")
            m, per = rounds.cpu_ratio(key, other)
            res[("cpu", key, other)] = (m, per)
            cpu_cells.append("–" if m is None else f"{m:.2f}")
        lines.append(f"| {name_of(key)[4:]} | " + " | ".join(cells) + " |")
        cpu_lines.append(f"| {name_of(key)[4:]} | " + " | ".join(cpu_cells) + " |")
    ratios = "\n".join(lines)
    cpu_ratios = "\n".join(cpu_lines) if rounds.cpu else ""
    md = f"""{n} interleaved round(s): in each round every server below ran once, one
after the other (odd rounds in one order, even rounds in the reverse order), so
that each ratio compares servers measured minutes apart, not a whole run
apart. *RSS per process* is the mean over the worker processes (gpe: the
master's children except the exporter; the forked ceiling: its 2 children;
actix, axum and the ceiling: their one process), *RSS total* the sum of VmRSS
over every process of the server (gpe: the master and the workers), both read
at the end of the load and the median over the rounds. After each round's
req/s of a server with more than one process, in brackets: how many of the 16
connections each process held halfway through the load, largest first.
*CPU µs per request* is the user and system time of every process of the
server (gpe: the master, the workers and the exporter) over the measured
load, from `/proc/PID/stat`, divided by the requests wrk counted; the median
over the rounds.

{throughput}

{split_sentence(rounds)}

Each ratio is the median over the rounds of the two servers' req/s in the
same round (gpe's req/s over the other's):

{ratios}"""
    if cpu_ratios:
        md += f"""

The same pairs by CPU per request: the median over the rounds of the other
server's CPU µs per request over gpe's in the same round (above 1: gpe serves
a request with less CPU). This is a second view of the same rounds: req/s
depends on the share of the 2 CPUs the server got beside wrk, CPU per request
on what a request costs it. It moves between rounds too (a server that gets
less CPU handles more events per wake-up), but it is not the same noise.

{cpu_ratios}"""
    return md, res


def split_note(rounds, key, rnd):
    """" (13/3)" for a multi-process server's round, else ""."""
    sp = rounds.split(key, rnd)
    return f" ({sp})" if sp and "/" in sp else ""


def split_sentence(rounds):
    """What the forked ceiling's rounds show about the split, from the figures."""
    runs = [(rounds.by.get(CEIL_FORKED, {}).get(r), rounds.split(CEIL_FORKED, r)) for r in rounds.rounds()]
    runs = [(v, sp) for v, sp in runs if v and sp and "/" in sp]
    bal = rounds.rate(CEIL_FORKED_BAL)
    if not runs or bal is None:
        return ""
    even = [v for v, sp in runs if len(set(sp.split("/"))) == 1]
    skew = [(v, sp) for v, sp in runs if len(set(sp.split("/"))) > 1]
    text = ", ".join(f"{v / 1000:.1f}k at {sp}" for v, sp in sorted(runs, key=lambda x: -x[0]))
    out = (f"The forked ceiling's connections were split by the kernel ({text}: even in "
           f"{len(even)} of {len(runs)} rounds); balanced as gpe balances (`--balanced`, an even "
           f"split) it ran at {bal / 1000:.1f}k (median).")
    if skew and median([v for v, _ in skew]) > bal:
        out += (" Its uneven rounds ran faster than the balanced ones: with wrk on the same 2 CPUs, "
                "one process holding most connections keeps one CPU for the server and one for "
                "wrk, and seldom sleeps.")
    return out + (" gpe's workers always balance, so the *forked balanced* column compares gpe with "
                  "the same shape under the same split.")


def ratio_targets(rounds, res):
    tl = []

    def row(label, pairs, target, fmt=lambda v: f"{v:.2f}"):
        parts, ok = [], bool(pairs)
        for name, key, other in pairs:
            m, per = res.get((key, other), (None, []))
            good = m is not None and m >= target
            ok = ok and good
            per_s = ", ".join(f"{x:.2f}" for x in per)
            parts.append(f"{name} {'–' if m is None else fmt(m)} ({per_s}){'' if good else ' ✗'}")
        tl.append(f"| {label} | {'; '.join(parts) or 'not measured'} | {mark(ok)} |")

    on = [(k, ("gpe", k, "metrics")) for k in KEEPALIVE if ("gpe", k, "metrics") in rounds.by]
    row("thread, eventloop, greenlet / bare hyper 2-thread ceiling ≥ 0.90 (metrics on; per-round ratios)",
        [(k, key, CEIL_2T) for k, key in on], T_VS_CEILING)
    row("thread, eventloop, greenlet / the forked current-thread ceiling ≥ 0.97",
        [(k, key, CEIL_FORKED) for k, key in on], T_VS_FORKED)
    row("(context, not a target of the issue) the same, against the forked ceiling balanced as gpe balances",
        [(k, key, CEIL_FORKED_BAL) for k, key in on], T_VS_FORKED)
    row("gpe eventloop / actix-web plain ≥ 1.0 (metrics on)",
        [(k, key, PEERS["actix plain"]) for k, key in on if k == "eventloop"], T_VS_ACTIX)
    row("gpe with metrics / axum + axum-prometheus ≥ 1.3×",
        [(k, key, PEERS["axum-prometheus"]) for k, key in on], T_VS_PROM, lambda v: f"{v:.2f}×")
    row("gpe with metrics / actix-web + actix-web-prom ≥ 1.3×",
        [(k, key, PEERS["actix-web-prom"]) for k, key in on], T_VS_PROM, lambda v: f"{v:.2f}×")
    if rounds.cpu:
        def cpu_row(label, other, target, fmt=lambda v: f"{v:.2f}"):
            parts = []
            for k, key in on:
                m, per = res.get(("cpu", key, other), (None, []))
                per_s = ", ".join(f"{x:.2f}" for x in per)
                parts.append(f"{k} {'–' if m is None else fmt(m)} ({per_s}){'' if m is not None and m >= target else ' ✗'}")
            tl.append(f"| (context, not a target of the issue) {label}, by CPU per request (the other's "
                      f"CPU µs per request / gpe's) | {'; '.join(parts) or 'not measured'} | – |")
        cpu_row("thread, eventloop, greenlet / bare hyper 2-thread ceiling ≥ 0.90", CEIL_2T, T_VS_CEILING)
        cpu_row("gpe with metrics / axum + axum-prometheus ≥ 1.3×", PEERS["axum-prometheus"], T_VS_PROM,
                lambda v: f"{v:.2f}×")
        cpu_row("gpe with metrics / actix-web + actix-web-prom ≥ 1.3×", PEERS["actix-web-prom"], T_VS_PROM,
                lambda v: f"{v:.2f}×")
    return tl


def oha_lat(o, q):
    """Latency percentile q (as oha names it, e.g. "p99.9") in ms, or None."""
    try:
        v = (o.get("latencyPercentiles") or {}).get(q)
    except AttributeError:
        return None
    return None if v is None else v * 1000


def fixed_rate_section(out, secs, conns):
    runs = load_jsonl(out / "fixed_rate.jsonl")
    if not runs:
        return "(not measured: oha was not installed, or the rounds gave no peaks)", {}
    lines = ["| server | peak req/s (rounds) | rate asked | achieved req/s | success | p50 ms | p99 ms | p99.9 ms "
             "| p99 ms of each round |",
             "|---|---|---|---|---|---|---|---|---|"]
    p99 = {}
    by = {}
    for r in runs:
        by.setdefault((r["server"], r["kind"], r["variant"]), []).append(r)
    n = max(len(v) for v in by.values())
    for key, rs in by.items():
        summ = [(r.get("oha") or {}).get("summary") or {} for r in rs]
        ach = median([x.get("requestsPerSec") for x in summ])
        succ = median([x.get("successRate") for x in summ])
        lat = {q: median([oha_lat(r.get("oha") or {}, q) for r in rs]) for q in ("p50", "p99", "p99.9")}
        p99[key] = lat["p99"]
        each = ", ".join(f2(oha_lat(r.get("oha") or {}, "p99")) for r in rs)
        lines.append(f"| {name_of(key)} | {rs[0]['peak']:,} | {rs[0]['rate']:,} | {'–' if ach is None else f'{ach:,.0f}'} "
                     f"| {'–' if succ is None else f'{succ:.1%}'} | {f2(lat['p50'])} | {f2(lat['p99'])} "
                     f"| {f2(lat['p99.9'])} | {each} |")
    md = f"""`oha --latency-correction -q RATE -c {conns} -z {secs}s` against each server
started afresh (after a wrk warm-up), RATE being half of that server's own peak:
the median req/s of its interleaved rounds above. With `--latency-correction`
each request's latency counts from when it was due, not from when it was sent,
so a stall shows in the percentiles instead of lowering the rate. {n} round(s),
odd ones in the order below and even ones reversed; each figure is the median
over the rounds (a stall of the host moves one round, not the median).

""" + "\n".join(lines)
    return md, p99


def fixed_rate_target(p99):
    gpe = {k: v for k, v in p99.items() if k[0] == "gpe"}
    peers = {k: v for k, v in p99.items() if k[0] == "rust-peer" and v is not None}
    if not gpe:
        return ["| p99 at 50% load, every keep-alive type ≤ 1 ms, and ≤ each peer's p99 | not measured | **missed** |"]
    best_peer = min(peers.values()) if peers else None
    parts, ok = [], True
    for k, v in gpe.items():
        good = v is not None and v <= T_P99_MS and (best_peer is None or v <= best_peer)
        ok = ok and good
        parts.append(f"{k[1]} {f2(v)} ms{'' if good else ' ✗'}")
    peer_s = "; ".join(f"{name_of(k).split(',')[0]} {f2(v)} ms" for k, v in peers.items()) or "no peer measured"
    return [f"| p99 at 50% load, every keep-alive type ≤ 1 ms, and ≤ each peer's p99 | {'; '.join(parts)} "
            f"(peers: {peer_s}) | {mark(ok and bool(peers))} |"]


def fit(xs, ys):
    """Least-squares slope and intercept of ys over xs, or None."""
    pts = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if not sxx:
        return None
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
    return slope, my - slope * mx


def scaling_section(root, out, secs):
    runs = load_jsonl(out / "scaling.jsonl")
    if not runs:
        return "(not measured)"
    lines = ["| worker | workers | connections | req/s | p50 ms | p99 ms | errors | RSS total MiB (master + workers) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        w = r.get("wrk") or {}
        v = rps(r)
        errs = sum(w.get(k, 0) for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))
        lines.append(f"| {r['kind']} | {r['workers']} | {r['conns']:,} | {'–' if v is None else f'{v:,.0f}'} "
                     f"| {f2(w.get('p50_us', 0) / 1000 if w else None)} | {f2(w.get('p99_us', 0) / 1000 if w else None)} "
                     f"| {errs if w else '–'} | {f2(r.get('rss_total_mib'))} |")
    # How cost grows, from the data.
    notes = []
    for kind in sorted({r["kind"] for r in runs}):
        mine = [r for r in runs if r["kind"] == kind]
        cmin = min(r["conns"] for r in mine)
        cmax = max(r["conns"] for r in mine)
        at = [r for r in mine if r["conns"] == cmin]
        f = fit([r["workers"] for r in at], [r.get("rss_total_mib") for r in at])
        wmax = max(r["workers"] for r in mine)
        hi = [r for r in mine if r["workers"] == wmax]
        g = fit([r["conns"] for r in hi], [r.get("rss_total_mib") for r in hi])
        p = {r["conns"]: (r.get("wrk") or {}).get("p99_us") for r in mine if r["workers"] == 2}
        t = {r["workers"]: rps(r) for r in at}
        parts = []
        if f:
            parts.append(f"total RSS grows by {f[0]:.2f} MiB per added worker (least-squares over "
                         f"{len(at)} runs at {cmin} connections)")
        if g:
            parts.append(f"by {g[0] * 1000:.2f} MiB per 1,000 connections at {wmax} workers")
        if p.get(cmin) and p.get(cmax):
            parts.append(f"p99 goes from {p[cmin] / 1000:.2f} ms at {cmin} to {p[cmax] / 1000:.2f} ms at "
                         f"{cmax:,} connections with 2 workers ({p[cmax] / p[cmin]:.1f}×, against "
                         f"{cmax / cmin:.0f}× the connections)")
        if t.get(1) and t.get(wmax):
            parts.append(f"req/s at {cmin} connections with {wmax} workers is {t[wmax] / t[1]:.2f}× that with 1 "
                         f"worker (2 CPUs, shared with wrk)")
        if parts:
            notes.append(f"- **{kind}:** " + "; ".join(parts) + ".")
    plot(root, runs)
    return f"""gpe `serve -k TYPE -w W --worker-connections N` (N above the largest
connection count, so that one worker can hold every connection), the
built-in hello, metrics on; for each W, wrk `-t1 -cC` for each C (1 s warm-up,
{secs} s measured) against the same server. RSS: the sum of VmRSS
(`/proc/PID/status`) over the master and the workers (by pid; not the
exporter), read at the end of each load. *p99* is wrk's latency percentile at
saturation, so at 1,024 connections it is mostly queueing.

{chr(10).join(lines)}

How cost grows (computed from the table):

{chr(10).join(notes)}

![scaling](docs/bench-scaling.png)"""


def plot(root, runs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing; docs/bench-scaling.png not updated")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    styles = {"eventloop": "-", "thread": "--", "greenlet": ":", "sync": "-."}
    for kind in sorted({r["kind"] for r in runs}):
        for c in sorted({r["conns"] for r in runs}):
            pts = sorted((r["workers"], r) for r in runs if r["kind"] == kind and r["conns"] == c)
            xs = [w for w, _ in pts]
            label = f"{kind}, {c} conns"
            ls = styles.get(kind, "-")
            axes[0].plot(xs, [(rps(r) or 0) / 1000 for _, r in pts], ls, marker="o", label=label)
            axes[1].plot(xs, [((r.get("wrk") or {}).get("p99_us") or 0) / 1000 for _, r in pts], ls,
                         marker="o", label=label)
            axes[2].plot(xs, [r.get("rss_total_mib") or 0 for _, r in pts], ls, marker="o", label=label)
    for ax, t in zip(axes, ["req/s (thousands)", "p99 latency (ms, wrk)", "RSS, master + workers (MiB)"]):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8])
        ax.set_xticklabels(["1", "2", "4", "8"])
        ax.set_xlabel("workers")
        ax.set_title(t)
        ax.grid(True, alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.suptitle("gpe scaling: hello world, wrk -t1, 2 CPUs")
    fig.tight_layout()
    (root / "docs").mkdir(exist_ok=True)
    fig.savefig(root / "docs" / "bench-scaling.png", dpi=90)
    plt.close(fig)


def scrape_scaling(out):
    """bench/scrape.sh's CSV as a table, and the scrape targets."""
    p = out / "scrape.csv"
    if not p.exists():
        return None, []
    with p.open() as f:
        rows = list(csv.DictReader(f))
    lines = ["| workers | series per worker | p50 ms | p99 ms | body |", "|---|---|---|---|---|"]
    got = {}
    for r in rows:
        try:
            w, s = int(r["workers"]), int(r["series"])
            p50, p99, b = float(r["p50_ms"]), float(r["p99_ms"]), int(float(r["bytes"]))
        except (KeyError, ValueError):
            continue
        got[(w, s)] = p50
        lines.append(f"| {w:,} | {s:,} | {p50:.2f} | {p99:.2f} | {b / 1024:.1f} KiB |")
    tl = []
    for (w, s), t in T_SCRAPE.items():
        v = got.get((w, s))
        tl.append(f"| scrape at {w} workers × {s:,} series ≤ {t:g} ms p50 | "
                  f"{'not measured' if v is None else f'{v:.2f} ms'} | {mark(v is not None and v <= t)} |")
    md = ("`bench/scrape.sh` (its own method: see its header); `bench/out/scrape.csv`.\n\n"
          + "\n".join(lines) + "\n\n![scrape](docs/bench-scrape.png)")
    return md, tl


def axum_bound(out):
    """A bullet for "What bounds each worker type" on the axum Router row,
    from bench/instructions.sh's counts, or "" without them."""
    p = out / "instructions.jsonl"
    rows = {}
    for line in (p.read_text().splitlines() if p.exists() else []):
        try:
            r = json.loads(line)
        except ValueError:
            continue
        rows[r.get("server")] = r
    axum, native = rows.get("eventloop-axum-router"), rows.get("eventloop-metrics-on")
    if not (axum and native and axum.get("app") and native.get("app")):
        return ""
    extra = axum["total"] - native["total"]
    in_app = axum["app"] - native["app"]
    return (f"- **The axum Router row.** Under callgrind the hello through the Router takes "
            f"{axum['total']:,} user-space instructions per request against the built-in hello's "
            f"{native['total']:,} (+{extra:,}); {in_app:,} of them are inside the app, that is axum's own "
            f"routing, extractors and boxed route futures (and gpe's `MatchedPathLayer`, whose future "
            f"only moves the matched path into the response). gpe's layers around the app cost the "
            f"same for both. Its target (0.95 of the native hello) is bound by that difference.\n")


def instructions_section(out):
    """bench/instructions.sh's table (instructions per request by layer)."""
    p = out / "instructions.jsonl"
    if not p.exists():
        return None
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    if not rows or rows[0].get("server") != "ceiling" or not rows[0].get("total"):
        return None
    cols = ["total", "app", "instrumentation", "deadline watch", "admission", "hyper + runtime"]
    base = rows[0]["total"]
    lines = ["| server | " + " | ".join(cols) + " | × ceiling |", "|---|" + "---:|" * (len(cols) + 1)]
    for r in rows:
        cells = [f"{r[c]:,}" if c in r else "-" for c in cols]
        lines.append(f"| {r['server']} | " + " | ".join(cells) + f" | {r['total'] / base:.2f} |")
    by = {r["server"]: r for r in rows}
    axum, native = by.get("eventloop-axum-router"), by.get("eventloop-metrics-on")
    note = ""
    if axum and native and axum.get("app") and native.get("app"):
        note = (f"\n\nThrough the axum Router of examples/axum-app (`eventloop-axum-router`, metrics "
                f"on) the hello takes {axum['total']:,} instructions, {axum['total'] / native['total']:.2f}× "
                f"the built-in hello's {native['total']:,}; its app layer (the Router, its matched-path "
                f"layer and the handler) takes {axum['app']:,} against {native['app']:,}. Every other "
                f"layer differs by under {max(abs(axum[c] - native[c]) for c in cols[2:]):,}.")
    return ("`bench/instructions.sh`: user-space instructions per keep-alive request of the hello "
            "route under callgrind, one worker (one runtime thread for the ceiling), "
            f"{rows[0].get('requests', 0):,} requests over 8 connections. The count does not "
            "depend on the host's speed or its scheduler; the kernel's share (system calls, "
            "context switches) is not in it, and the syscall profile above shows that part. "
            "Layers are inclusive costs of the functions that begin them (see the script's "
            "header).\n\n" + "\n".join(lines) + note)


def sections(root, out, rows, env):
    """Markdown of the new sections and their target rows."""
    rounds = Rounds(rows)
    ratio_md, res = ratio_section(rounds)
    tl = ratio_targets(rounds, res)
    fr_md, p99 = fixed_rate_section(out, env.get("BENCH_RATE_SECONDS", "6"), env.get("BENCH_CONNECTIONS", "16"))
    tl += fixed_rate_target(p99)
    sc_md = scaling_section(root, out, env.get("BENCH_SCALE_SECONDS", "3"))
    scr_md, scr_tl = scrape_scaling(out)
    tl += scr_tl or [f"| scrape at {w} workers × {s:,} series ≤ {t:g} ms p50 | not measured (no bench/scrape.sh) "
                     f"| **missed** |" for (w, s), t in T_SCRAPE.items()]
    md = f"""## Against the Rust peers and the two ceilings

{ratio_md}

## Latency at a fixed rate

{fr_md}

## Scaling

{sc_md}
"""
    ins_md = instructions_section(out)
    if ins_md:
        md += f"""
## Instructions per request, by layer

{ins_md}
"""
    if scr_md:
        md += f"""
## Exporter scrape scaling

{scr_md}
"""
    return md, tl
