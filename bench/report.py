#!/usr/bin/env python3
"""Turns the raw results of bench/run.sh into BENCHMARKS.md and docs/bench.png.

usage: report.py ROOT OUT   (ROOT = repository, OUT = bench/out)

Reads OUT/results.jsonl (one wrk run per line), OUT/scrape.jsonl, criterion's
OUT/criterion/hot_path/*/new/estimates.json and, through bench/report_peers.py,
OUT/fixed_rate.jsonl, OUT/scaling.jsonl and OUT/scrape.csv; prints the tables
and rewrites ROOT/BENCHMARKS.md, ROOT/docs/bench.png (gnuplot) and
ROOT/docs/bench-scaling.png (matplotlib) completely.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report_peers  # noqa: E402  (bench/report_peers.py)
from report_peers import kept_sections, load_jsonl, rps  # noqa: E402

GPE_KINDS = ["sync", "thread", "eventloop", "greenlet"]
PEER_OF = {"sync": "sync", "thread": "gthread", "eventloop": "gevent", "greenlet": "eventlet"}
CEILING_OF = {"sync": "close", "thread": "keepalive", "eventloop": "keepalive", "greenlet": "keepalive"}

# Targets (the numbers).
T_METRICS_RATIO = 0.97
T_CEILING_RATIO = 0.85
T_PEER_RATIO = 3.0
T_RSS_MIB = 10.0
T_HOT_NS = 50.0
T_SCRAPE_MS = 10.0
T_SCRAPE_SERIES = 8000
T_RESPAWNS = 200
# "Unchanged" after the respawns: size within 5 %, p50 within 20 % (or 0.5 ms).
T_SIZE_DRIFT = 0.05
T_TIME_DRIFT = 0.20
# Issue 9: the axum Router's hello ≥ 95% of gpe's native hello on eventloop.
T_AXUM_RATIO = 0.95
AXUM_KINDS = ["thread", "eventloop", "greenlet"]


def errors(row):
    w = row.get("wrk") or {}
    return sum(w.get(k, 0) for k in ("err_connect", "err_read", "err_write", "err_status", "err_timeout"))


def fmt_ms(us):
    return "–" if us is None else f"{us / 1000:.2f}"


def fmt_ratio(x):
    return "–" if x is None else f"{x:.2f}"


def ratio(a, b):
    return None if a is None or not b else a / b


def sh(cmd, cwd=None):
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def hot_path(out):
    res = {}
    base = out / "criterion" / "hot_path"
    for name in ("one_thread_updates", "one_thread", "one_thread_metrics_off", "four_threads_one_slot"):
        p = base / name / "new" / "estimates.json"
        if p.exists():
            e = json.loads(p.read_text())
            res[name] = {
                "median": e["median"]["point_estimate"],
                "mean": e["mean"]["point_estimate"],
                "lo": e["median"]["confidence_interval"]["lower_bound"],
                "hi": e["median"]["confidence_interval"]["upper_bound"],
            }
    return res


def main():
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    rows = load_jsonl(out / "results.jsonl")
    scrapes = load_jsonl(out / "scrape.jsonl")
    hot = hot_path(out)
    secs = os.environ.get("BENCH_SECONDS", "10")
    warm = os.environ.get("BENCH_WARMUP", "2")
    conns = os.environ.get("BENCH_CONNECTIONS", "16")

    def find(server, kind, variant):
        """The matching row; of repeated runs, the one with the median req/s
        (its note lists every run)."""
        m = [r for r in rows if r["server"] == server and r["kind"] == kind and r["variant"] == variant]
        if not m:
            return None
        done = [r for r in m if rps(r) is not None]
        if len(done) <= 1:
            return done[0] if done else m[0]
        done.sort(key=rps)
        r = dict(done[(len(done) - 1) // 2])
        runs = ", ".join(f"{rps(x) / 1000:.1f}k" for x in m if rps(x) is not None)
        r["note"] = ((r.get("note") or "") + f" median of {len(done)}: {runs}").strip()
        return r

    ceiling = {m: find("ceiling", "hyper-2t", m) for m in ("keepalive", "close")}

    # ---------------------------------------------------------- throughput table
    head = ("| server | worker | variant | req/s | p50 ms | p99 ms | RSS/worker MiB | errors "
            "| gpe/ceiling | gpe/peer | on/off | load |")
    sep = "|" + "---|" * 12
    lines = [head, sep]
    chart = []  # (label, gpe on, gpe off, peer exporter, peer plain, ceiling)

    def add(r, server, kind, variant, vs_ceiling=None, vs_peer=None, onoff=None):
        if r is None:
            return
        w = r.get("wrk")
        note = r.get("note") or ""
        if w is None:
            lines.append(f"| {server} | {kind} | {variant} | {note or 'no result'} | | | | | | | | |")
            return
        rss = r.get("rss_mib")
        rss_s = "–" if rss is None else f"{rss:.1f}"
        if note:
            variant = f"{variant} ({note})"
        lines.append(
            f"| {server} | {kind} | {variant} | {rps(r):,.0f} | {fmt_ms(w['p50_us'])} | {fmt_ms(w['p99_us'])} "
            f"| {rss_s} | {errors(r)} | {fmt_ratio(vs_ceiling)} | {fmt_ratio(vs_peer)} | {fmt_ratio(onoff)} | {r.get('load1', '–')} |")

    for m in ("keepalive", "close"):
        add(ceiling[m], "ceiling (tokio+hyper)", "2 threads", m)
    for kind in GPE_KINDS:
        m = f"{CEILING_OF[kind]} before {kind}"
        add(find("ceiling", "hyper-2t", m), "ceiling (tokio+hyper)", "2 threads", m)

    results = {}
    for kind in GPE_KINDS:
        on, off = find("gpe", kind, "metrics"), find("gpe", kind, "no-metrics")
        pexp, pplain = find("peer", PEER_OF[kind], "exporter"), find("peer", PEER_OF[kind], "plain")
        # The ceiling run right before this type's runs, else the first one.
        ceil = find("ceiling", "hyper-2t", f"{CEILING_OF[kind]} before {kind}") or ceiling[CEILING_OF[kind]]
        c = rps(ceil)
        r_on, r_off = rps(on), rps(off)
        results[kind] = {
            "on": r_on, "off": r_off,
            "onoff": ratio(r_on, r_off),
            "ceiling": ratio(r_on, c),
            "peer": ratio(r_on, rps(pexp)),
            "rss": [x.get("rss_mib") for x in (on, off) if x and x.get("rss_mib") is not None],
            "skipped": (on is None or on.get("wrk") is None),
            "not_run": on is None,
            "note": (on or {}).get("note", "not run"),
        }
        add(on, "gpe", kind, "metrics", ratio(r_on, c), ratio(r_on, rps(pexp)), ratio(r_on, r_off))
        add(off, "gpe", kind, "no-metrics", ratio(r_off, c), ratio(r_off, rps(pplain)))
        ax = find("gpe", kind, "axum")
        if ax is not None and rps(ax) is not None:
            # Median of the per-rotation ratios (axum run i / metrics-on run i).
            ons = [rps(x) for x in rows if x["server"] == "gpe" and x["kind"] == kind and x["variant"] == "metrics"]
            axs = [rps(x) for x in rows if x["server"] == "gpe" and x["kind"] == kind and x["variant"] == "axum"]
            pairs = sorted(b / a for a, b in zip(ons, axs) if a and b)
            results[kind]["axum"] = pairs[(len(pairs) - 1) // 2] if pairs else None
            results[kind]["axum_pairs"] = pairs
            add(ax, "gpe", kind, "axum Router (examples/axum-app, metrics on)", ratio(rps(ax), c),
                ratio(rps(ax), rps(pexp)))
        noy = find("gpe", kind, "no-yield")
        if noy is not None:
            results[kind]["yield_gain"] = ratio(r_on, rps(noy))
            add(noy, "gpe", kind, "no-yield (metrics on, `--idle-yield false`)", ratio(rps(noy), c),
                ratio(rps(noy), rps(pexp)))
        chart.append((kind, r_on, r_off, rps(pexp), rps(pplain), c))
    # HTTPS keep-alive: each type against the TLS ceiling run right before it.
    for kind in GPE_KINDS:
        tceil, tls = find("ceiling", "hyper-2t", f"tls before {kind}"), find("gpe", kind, "tls")
        if tls is None:
            continue
        add(tceil, "ceiling (tokio+hyper+rustls)", "2 threads", f"tls before {kind}")
        add(tls, "gpe", kind, "HTTPS keep-alive (metrics on)", ratio(rps(tls), rps(tceil)))
        results[kind]["tls_ceiling"] = ratio(rps(tls), rps(tceil))
    for kind in GPE_KINDS:
        pk = PEER_OF[kind]
        pexp, pplain = find("peer", pk, "exporter"), find("peer", pk, "plain")
        add(pexp, "gunicorn", pk, "exporter", onoff=ratio(rps(pexp), rps(pplain)))
        add(pplain, "gunicorn", pk, "plain")
    table = "\n".join(lines)

    # ---------------------------------------------------------- scrape table
    slines = ["| server | workers | label sets | scrapes | p50 ms before | size before | respawns "
              "| p50 ms after | size after | growth (time, size) |", "|" + "---|" * 10]
    gpe_scrape = None
    for s in scrapes:
        b, a = s["before"], s["after"]
        if s["server"] == "gpe":
            gpe_scrape = s
        name = "gpe (sync)" if s["server"] == "gpe" else "gunicorn sync + exporter 0.2.4"
        ls = "–" if s.get("label_sets") is None else f"{s['label_sets']:,} (x {s['workers']} workers)"
        grow = f"{a[0] / b[0]:.2f}x, {a[1] / b[1]:.2f}x" if b and a and b[0] and b[1] and a[1] else "–"
        resp = str(s["respawns"]) + (f" ({s['note']})" if s.get("note") else "")

        def ms(x):
            return f"{x[0]:.2f}" if x and x[1] else "–"

        def kib(x):
            return f"{x[1] / 1024:.1f} KiB" if x and x[1] else "no answer"

        slines.append(
            f"| {name} | {s['workers']} | {ls} | {os.environ.get('BENCH_SCRAPES', '50')} | {ms(b)} | {kib(b)} "
            f"| {resp} | {ms(a)} | {kib(a)} | {grow} |")
    stable = "\n".join(slines) if len(slines) > 2 else "(not measured)"

    # ---------------------------------------------------------- hot path
    hlines = ["| benchmark | median ns/request | 95% CI of the median | mean ns |", "|---|---|---|---|"]
    desc = {
        "one_thread_updates": "metric updates alone (begin_at + finish_at), 1 thread, metrics on",
        "one_thread": "begin + finish with their 2 clock reads, 1 thread, metrics on",
        "one_thread_metrics_off": "begin + finish, 1 thread, metrics off (header only)",
        "four_threads_one_slot": "4 threads on one Recorder: wall time per request per thread",
    }
    for k, v in hot.items():
        hlines.append(f"| {desc[k]} | {v['median']:.1f} | {v['lo']:.1f} – {v['hi']:.1f} | {v['mean']:.1f} |")
    if "four_threads_one_slot" in hot:
        agg = hot["four_threads_one_slot"]["median"] / 4
        hlines.append(f"| 4 threads on one Recorder: aggregate (wall / 4 requests) | {agg:.1f} | | |")
    htable = "\n".join(hlines) if hot else "(not measured)"

    # ---------------------------------------------------------- syscall profile
    prof = {p["label"]: p for p in load_jsonl(out / "profile.jsonl")}

    def per_req(p, *events):
        """Events per request; None if wrk or perf has no figure for any of them."""
        n = (p.get("wrk") or {}).get("requests")
        counts = [p["perf"].get(e) for e in events]
        if not n or any(c is None for c in counts):
            return None
        return sum(counts) / n

    pcols = [
        ("syscalls", ["raw_syscalls:sys_enter"]),
        ("recvfrom + read", ["syscalls:sys_enter_recvfrom", "syscalls:sys_enter_read"]),
        ("sendto + writev + write", ["syscalls:sys_enter_sendto", "syscalls:sys_enter_writev",
                                     "syscalls:sys_enter_write"]),
        ("epoll_ctl", ["syscalls:sys_enter_epoll_ctl"]),
        ("epoll_wait + epoll_pwait", ["syscalls:sys_enter_epoll_wait", "syscalls:sys_enter_epoll_pwait"]),
        ("sched_yield", ["syscalls:sys_enter_sched_yield"]),
        ("accept4", ["syscalls:sys_enter_accept4"]),
        ("context switches", ["context-switches"]),
    ]
    plines = ["| server | req/s | " + " | ".join(c for c, _ in pcols)
              + " | CPU µs | server CPUs busy | wrk CPUs busy |",
              "|" + "---|" * (len(pcols) + 5)]
    pnames = {"ceiling keepalive": "ceiling (tokio+hyper, 2 threads)",
              "ceiling close": "ceiling (tokio+hyper, 2 threads), connection close",
              "sync": "gpe sync (connection close)",
              "eventloop axum": "gpe eventloop, axum Router (examples/axum-app)"}

    def busy(p, key):
        """CPUs kept busy over the wrk run: the servers' (task-clock) or wrk's own."""
        secs = ((p.get("wrk") or {}).get("duration_us") or 0) / 1e6
        if not secs:
            return None
        if key == "server":
            ms = p["perf"].get("task-clock")
            return None if ms is None else ms / 1000 / secs
        v = p.get("wrk_cpu_s")
        return None if v is None else v / secs

    def fmt_busy(v):
        return "–" if v is None else f"{v:.2f}"
    for label, p in prof.items():
        if not p.get("wrk"):
            continue
        cells = []
        for _, evs in pcols:
            v = per_req(p, *evs)
            cells.append("–" if v is None else f"{v:.2f}")
        cpu = per_req(p, "task-clock")
        name = pnames.get(label, f"gpe {label}" + (" (`--idle-yield false`)" if "no-yield" in label else ""))
        plines.append(f"| {name} | {rps(p):,.0f} | " + " | ".join(cells)
                      + f" | {'–' if cpu is None else f'{cpu * 1000:.1f}'} | {fmt_busy(busy(p, 'server'))} "
                      f"| {fmt_busy(busy(p, 'wrk'))} |")
    ptable = "\n".join(plines) if len(plines) > 2 else "(not measured: perf could not read syscall tracepoints)"

    def pfig(label, *events):
        p = prof.get(label)
        v = per_req(p, *events) if p and p.get("wrk") else None
        return "?" if v is None else f"{v:.2f}"

    def pbusy(label, key):
        p = prof.get(label)
        return fmt_busy(busy(p, key) if p and p.get("wrk") else None)

    sys_ = ["raw_syscalls:sys_enter"]
    ctl = ["syscalls:sys_enter_epoll_ctl"]
    cs = ["context-switches"]
    ryield = {k: results[k].get("yield_gain") for k in ("thread", "eventloop", "greenlet")}
    ryield_s = ", ".join(f"{k} {'–' if v is None else f'{v:.2f}x'}" for k, v in ryield.items())

    # ---------------------------------------------------------- targets
    def mark(ok):
        return "**met**" if ok else "**missed**"

    tl = []
    measured = [k for k in GPE_KINDS if not results[k]["skipped"]]
    skipped = [k for k in GPE_KINDS if results[k]["skipped"]]
    skip_s = f" (not measured: {', '.join(skipped)})" if skipped else ""

    def per_kind(key, pred, fmt):
        parts, ok = [], True
        for k in measured:
            v = results[k][key]
            good = v is not None and pred(k, v)
            ok = ok and good
            parts.append(f"{k} {fmt(v)}{'' if good else ' ✗'}")
        return ok and bool(measured), "; ".join(parts)

    ok, d = per_kind("onoff", lambda k, v: v >= T_METRICS_RATIO, lambda v: "–" if v is None else f"{v:.1%}")
    tl.append(f"| metrics-on ≥ 97% of metrics-off, every worker type | {d}{skip_s} | {mark(ok)} |")
    ok, d = per_kind("ceiling", lambda k, v: v >= T_CEILING_RATIO, lambda v: "–" if v is None else f"{v:.1%}")
    tl.append(f"| ≥ 85% of the bare hyper server (2-thread runtime; sync vs its connection-close mode; "
              f"medians of the run) | {d}{skip_s} | {mark(ok)} |")
    peers_md, peers_tl = report_peers.sections(root, out, rows, os.environ)
    ok, d = per_kind("peer", lambda k, v: v >= T_PEER_RATIO, lambda v: "–" if v is None else f"{v:.1f}x")
    tl.append(f"| ≥ 3x the peer's matching worker type with exporter | {d}{skip_s} | {mark(ok)} |")
    rss_all = [(k, x) for k in measured for x in results[k]["rss"]]
    rss_max = max((x for _, x in rss_all), default=None)
    ok = rss_max is not None and rss_max <= T_RSS_MIB
    d = "; ".join(f"{k} {max(x for kk, x in rss_all if kk == k):.1f}" for k in measured if results[k]["rss"])
    tl.append(f"| worker RSS ≤ 10 MiB (max of metrics on/off, MiB) | {d}{skip_s} | {mark(ok)} |")
    h1 = hot.get("one_thread_updates", {}).get("median")
    hc = hot.get("one_thread", {}).get("median")
    with_clock = "" if hc is None else f" (with the 2 clock reads: {hc:.1f} ns)"
    tl.append(f"| hot path ≤ 50 ns, single thread (metric updates) | {'–' if h1 is None else f'{h1:.1f} ns'}{with_clock} "
              f"| {mark(h1 is not None and h1 <= T_HOT_NS)} |")
    if gpe_scrape:
        b, a, n = gpe_scrape["before"], gpe_scrape["after"], gpe_scrape["respawns"]
        series = (gpe_scrape.get("label_sets") or 0) * gpe_scrape["workers"]
        same = (abs(a[1] - b[1]) <= T_SIZE_DRIFT * b[1]
                and a[0] <= max(b[0] * (1 + T_TIME_DRIFT), b[0] + 0.5))
        ok = (b[0] <= T_SCRAPE_MS and a[0] <= T_SCRAPE_MS and same
              and n >= T_RESPAWNS and series >= T_SCRAPE_SERIES)
        d = (f"{b[0]:.2f} ms / {b[1] / 1024:.1f} KiB at {series:,} worker series; "
             f"{a[0]:.2f} ms / {a[1] / 1024:.1f} KiB after {n} respawns")
        tl.append(f"| scrape ≤ 10 ms p50 at 8,000 series, unchanged after 200 respawns | {d} | {mark(ok)} |")
    else:
        tl.append("| scrape ≤ 10 ms p50 at 8,000 series, unchanged after 200 respawns | not measured | **missed** |")
    ax_el = results["eventloop"].get("axum")
    ax_all = "; ".join(
        f"{k} {results[k]['axum']:.1%} ({', '.join(f'{x:.3f}' for x in results[k]['axum_pairs'])})"
        for k in AXUM_KINDS if results[k].get("axum") is not None)
    if ax_el is not None:
        tl.append(f"| axum Router ≥ 95% of gpe's native hello on eventloop (metrics on, same run; "
                  f"median of the per-rotation ratios) | {ax_all} | {mark(ax_el >= T_AXUM_RATIO)} |")
    tl += peers_tl
    ttable = "| target | measured | |\n|---|---|---|\n" + "\n".join(tl)

    # ---------------------------------------------------------- chart
    docs = root / "docs"
    docs.mkdir(exist_ok=True)
    dat = out / "bench.dat"
    with dat.open("w") as f:
        f.write("# kind gpe_metrics gpe_no_metrics peer_exporter peer_plain ceiling\n")
        for kind, *vals in chart:
            label = kind
            if kind == "sync":
                label += " (close)"
            if results[kind]["not_run"]:
                label += " (not run)"
            elif results[kind]["skipped"]:
                label += " (not built)"
            label = '"' + label + '"'
            f.write(label + " " + " ".join("0" if v is None else f"{v:.0f}" for v in vals) + "\n")
    gp = out / "bench.gp"
    gp.write_text(f"""set terminal pngcairo size 1000,600 font "sans,10"
set output "{docs / 'bench.png'}"
set title "Hello world, 2 workers, wrk -t1 -c{conns} ({secs}s): requests/s (sync: Connection: close)"
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.9 border -1
set boxwidth 0.9
set key below horizontal
set ylabel "requests/s"
set yrange [0:*]
set grid ytics
set format y "%.0s%c"
set xtics nomirror
set xlabel "gpe worker type (peer: sync, gthread, gevent, eventlet)"
plot "{dat}" using 2:xtic(1) title "gpe, metrics on" lc rgb "#1f77b4", \\
     "" using 3 title "gpe, --no-metrics" lc rgb "#9ecae1", \\
     "" using 4 title "gunicorn + exporter" lc rgb "#d62728", \\
     "" using 5 title "gunicorn plain" lc rgb "#ff9896", \\
     "" using 6 title "bare tokio+hyper, 2 threads (close mode for sync)" lc rgb "#7f7f7f"
""")
    if subprocess.run(["gnuplot", str(gp)], check=False).returncode != 0:
        print("gnuplot failed; docs/bench.png not updated", file=sys.stderr)

    # ---------------------------------------------------------- BENCHMARKS.md
    started = (out / "started").read_text().strip() if (out / "started").exists() else ""
    load0 = (out / "loadavg-start").read_text().strip() if (out / "loadavg-start").exists() else "?"
    # How long bench/run.sh took from its start to the report (builds included).
    took = ""
    if started and (out / "finished").exists():
        fmt = "%Y-%m-%dT%H:%M:%SZ"
        # Its own name: `secs` is the measured seconds per load, used below.
        run_s = int((datetime.datetime.strptime((out / "finished").read_text().strip(), fmt)
                     - datetime.datetime.strptime(started, fmt)).total_seconds())
        took = f", {run_s // 60} min {run_s % 60} s from start to report"
        if (out / "set-up").exists():
            setup = int((datetime.datetime.strptime((out / "set-up").read_text().strip(), fmt)
                         - datetime.datetime.strptime(started, fmt)).total_seconds())
            took += f" ({setup} s of it installing and building)"
    # The commit the run measured (recorded at its start), else the current one.
    commit_file = out / "commit"
    commit = (commit_file.read_text().strip() if commit_file.exists() else "") or sh(
        ["git", "rev-parse", "--short", "HEAD"], cwd=root)
    pyver = sh([str(root / "bench/venv/bin/python"), "-c",
                "import gunicorn, gevent, eventlet, importlib.metadata as m; "
                "print(f'gunicorn {gunicorn.__version__}, gunicorn-prometheus-exporter "
                "{m.version(\"gunicorn-prometheus-exporter\")}, gevent {gevent.__version__}, "
                "eventlet {eventlet.__version__}')"])
    lock = (root / "Cargo.lock").read_text() if (root / "Cargo.lock").exists() else ""

    def locked(name):
        i = lock.find(f'\nname = "{name}"\nversion = "')
        return "?" if i < 0 else lock[i:].split('version = "', 1)[1].split('"', 1)[0]
    rust_peers = (f"actix-web {locked('actix-web')}, actix-web-prom {locked('actix-web-prom')}, "
                  f"axum {locked('axum')}, axum-prometheus {locked('axum-prometheus')}")
    machine = (f"{os.cpu_count()} CPUs (`nproc` = {sh(['nproc'])}), {cpu_model()}, "
               f"Linux {platform.release()}, {sh(['rustc', '--version'])}, {os.environ.get('BENCH_WRK_VERSION', 'wrk')}")
    skipped_note = ""
    refused = [k for k in skipped if not results[k]["not_run"]]
    not_run = [k for k in skipped if results[k]["not_run"]]
    if refused:
        skipped_note += ("\nWorker types refused by the built binary (rows marked *skipped*): "
                         + ", ".join(refused) + ".\n")
    if not_run:
        skipped_note += ("\nWorker types not loaded in this run (`BENCH_KINDS`): "
                         + ", ".join(not_run) + ".\n")
    md = f"""# Benchmarks

Generated by `bench/run.sh` — do not edit by hand; rerun it instead. Every figure
below comes from one run of:

```sh
bench/run.sh                  # full run, under 20 minutes on 2 cores (builds cached)
BENCH_QUICK=1 bench/run.sh    # quick run while working, under 5 minutes
```

It installs what it needs (Debian: `wrk`, `gnuplot-nox`; PyPI into `bench/venv`:
`gunicorn==23.0.0`, `gunicorn-prometheus-exporter==0.2.4`, `gevent`, `eventlet`,
`matplotlib`; `cargo install oha --locked`), builds `gpe`, `examples/axum-app`,
`bench/ceiling` and `bench/peers` in release mode, runs one server at a time on
loopback, and rewrites this file, `docs/bench.png` and `docs/bench-scaling.png`
(and `docs/bench-scrape.png` through `bench/scrape.sh`). Raw output: `bench/out/`.

The rows, each serving the same `GET /` (13-byte `Hello, World!`,
`content-type: text/plain; charset=utf-8`, `content-length`, `date`, `server`):

- **gpe** `serve -k TYPE -w 2`, the built-in `hello` app, metrics on (exporter
  running) or `--no-metrics`; **gpe eventloop + axum Router**: the same hello
  through the axum `Router` of `examples/axum-app` (binary `gpe-axum-app`);
- **ceiling** (`bench/ceiling`): bare tokio + hyper in one process on a
  2-thread runtime, no master, no metrics (`--close` for the sync comparison);
- **forked ceiling** (`gpe-bench-ceiling --forked 2`): the pre-fork shape
  without gpe's own layers: bind, then fork 2 processes that each run a
  current-thread runtime with hyper accepting on that one listener;
- **actix-web 4** with `.workers(2)` (one single-threaded runtime per worker
  thread), plain and wrapped in **actix-web-prom** (`bench/peers`: `actix-plain`,
  `actix-prom`);
- **axum 0.8** on a 2-thread tokio runtime, plain and with
  **axum-prometheus**'s default layer and a `/metrics` route (`axum-plain`,
  `axum-prom`);
- **gunicorn 23** with the same app as WSGI, plain and with
  gunicorn-prometheus-exporter.

- **Run:** {started} (UTC), gpe commit `{commit}`, {'`BENCH_QUICK=1` (short phases: figures for checking the machinery, not for quoting)' if os.environ.get('BENCH_QUICK') == '1' else 'full run'}{took}
- **Machine:** {machine}
- **Peers:** {pyver or 'gunicorn not installed'}; {rust_peers}; {os.environ.get('BENCH_OHA_VERSION') or 'oha not installed'}
- **Load average at the start** (1, 5, 15 min): {load0}; the *load* column is the
  1-minute load average at the end of each measurement. wrk and the server share
  the 2 CPUs; anything else running on the machine lowers every figure.

## Throughput

Hello world (`Hello, World!`, 13 bytes). Same shape for every server: 2 worker
processes, `wrk -t1 -c{conns}`, {warm} s warm-up then {secs} s measured; keep-alive
on, except for sync workers, which close every connection on both sides (wrk
sends `Connection: close`). gpe: `gpe serve -k TYPE -w 2` with the built-in
`hello` app, metrics on (exporter running) and `--no-metrics`. Every keep-alive
server of the list above except gunicorn runs once per round, in
{os.environ.get('BENCH_REPEAT', '3')} interleaved round(s) (odd rounds in one order, even rounds in
reverse), then the close-mode ceiling and gpe sync in their own rounds: a row
shows the run with the median req/s (all runs in brackets). Thread, eventloop
and greenlet then run once more with metrics on and
`--idle-yield false` (the *no-yield* rows: the loop sleeps in epoll without
yielding the CPU first; see docs/workers.md). gunicorn's rows run after
the rounds, once each; gthread has 4 threads, and the exporter serves its
metrics from the master on its own port.
RSS is the mean of `/proc/<pid>/statm` resident pages over the worker processes
(gpe: the master's children except the exporter), read at the end of the load.
*gpe/ceiling* compares the medians with the ceiling's in the matching mode
(close for sync); the next section gives the per-round ratios.
The *HTTPS keep-alive* rows serve the same hello with `--certfile`/`--keyfile`
(a self-signed P-256 certificate; wrk speaks HTTP/1.1 over TLS 1.3), each
against the ceiling with `--tls` (tokio-rustls, same provider) run right
before it (the *tls before TYPE* rows), {os.environ.get('BENCH_TLS_REPEAT', '1')} pair(s) each, the median shown. Target: 0.90 of that ceiling.
*gpe/peer* compares with the peer's matching type (sync–sync, thread–gthread,
eventloop–gevent, greenlet–eventlet), with exporter for metrics-on rows and plain
for no-metrics rows; *on/off* is metrics-on / metrics-off (for the peer:
exporter / plain).
{skipped_note}
{table}

![requests per second](docs/bench.png)

{peers_md}
## Scrape cost

`/metrics` of a server with 8 sync workers after {conns} connections sent
requests to 1,000 distinct paths (`bench/wrk/paths.lua`; every worker sees every
path, so each worker holds ~1,000 label sets per HTTP family; gpe with
`--metrics-max-series 2000 --unmatched-route path`: the hello app answers
those paths 404 and names no route, so by default they would share one
`unmatched` label set). p50 of {os.environ.get('BENCH_SCRAPES', '50')} sequential scrapes with curl (`time_total`)
and the body size (uncompressed). Then `max_requests = 20` is set in the
config file and the master reloaded (HUP), the same load runs until
≥ {T_RESPAWNS} workers have been recycled for max_requests, `max_requests` goes back to 0
(HUP), and the scrapes are measured again. The peer runs the same procedure
(gunicorn sync + exporter, `GUNICORN_WORKERS=8`; respawns counted from
gunicorn's "Autorestarting worker" log lines).

{stable}

## Hot path (criterion)

`cargo bench -p gpe-core --bench hot_path` (`core/benches/hot_path.rs`): one
request's worth of metric updates on a known label set (request counter,
duration histogram, size histograms, per-worker counter, in-flight gauge,
busy/idle state), in a store in a temporary directory set up like the
recorder's tests, with `RequestRecord {{ GET, "/", 200, 0, 13 bytes }}`.
`begin_at` + `finish_at` take the timestamps the server already has and are
the metric updates alone (the target); `begin` + `finish` add their two
monotonic clock reads, which cost about 30 ns each on this VM and are paid
with metrics off too (the metrics-off row: header only). Recorders are
single-writer, as in every gpe worker (requests are recorded on the IO
thread); the four-thread row shares one multi-writer recorder.

{htable}

## Targets

{ttable}

## Syscalls per request

`perf stat` on the server processes (the ceiling's one process; gpe's two
workers) during one more {os.environ.get('BENCH_PROFILE_SECONDS', '5')} s wrk run of the same shape, divided by
the requests wrk counted (so *req/s* here is under perf). *server CPUs busy*
is their task-clock over the run's length, *wrk CPUs busy* wrk's own user and
system time (from `/usr/bin/time`) over the same length. Counted with the
`raw_syscalls` and `syscalls` tracepoints and the `context-switches` software
event; *CPU µs* is the servers' task-clock per request. `recvfrom + read` and
`sendto + writev + write` include smol's reactor notifier (an eventfd).

{ptable}

## What bounds each worker type

- **Sleeping in epoll.** On this machine wrk and the two workers share two
  cores. A worker whose connections (about {int(conns) // 2} each) are all waiting for wrk sleeps in
  `epoll_wait`, and wrk's next request wakes it: a context switch each way,
  many times per millisecond. Yielding the CPU once before that sleep
  (`idle_yield`, on by default) lets wrk run first, so the loop more often
  finds work and does not sleep: context switches per request fall from
  {pfig('eventloop no-yield', *cs)} to {pfig('eventloop', *cs)} (eventloop) and from
  {pfig('greenlet no-yield', *cs)} to {pfig('greenlet', *cs)} (greenlet); the ceiling
  makes {pfig('ceiling keepalive', *cs)}. Throughput with / without it (metrics on; the
  median of the metrics-on runs against the single no-yield run): {ryield_s}.
- **The thread worker's hand-off.** Each request crosses from the IO thread
  to a pool thread and back (the app may block, so it never runs on the IO
  thread): {pfig('thread', *cs)} context switches and {pfig('thread', "syscalls:sys_enter_sched_yield")}
  `sched_yield` calls per request, against {pfig('eventloop', *cs)} and
  {pfig('eventloop', "syscalls:sys_enter_sched_yield")} for eventloop. Most of those yields are the
  pool's idle threads: crossbeam's receivers yield a few times before they
  sleep, and `perf sched timehist` shows the idle pool threads of both
  processes taking turns on one CPU for 3 to 5 µs each while the IO threads
  and wrk share the other; `perf record` puts about a third of the workers'
  samples in `finish_task_switch`. Tried by hand on 2026-12-01 (interleaved,
  not part of this run): a pool whose threads sleep at once ran at 0.71 to
  0.77 of this one (a futex wake per request instead); one spinning thread,
  or wakes deferred to the end of the IO thread's turn, at 0.90 to 1.05 (no
  change). Only running the app on the IO thread removes the hand-off, which a
  blocking app forbids: choose eventloop for apps that never block.
- **The greenlet worker's IO layer.** smol (async-io) registers sockets in
  one-shot mode, so every wait re-arms a socket with `epoll_ctl`
  ({pfig('greenlet', *ctl)} per request, against {pfig('eventloop', *ctl)} for tokio, which
  keeps edge-triggered registrations), and hyper's per-request header-read
  timer (the keep-alive idle timeout) notifies the reactor through its eventfd.
  In all, greenlet makes {pfig('greenlet', *sys_)} syscalls per request against
  eventloop's {pfig('eventloop', *sys_)}. gpe's greenlet stream waits for readiness
  after a short read instead of calling `recv` only to get `EAGAIN`
  (`worker-greenlet/src/eager.rs`), and its accept loops are polled only when
  their own listener wakes them (a `FuturesUnordered`): async-io takes any
  poll after a wake-up as readiness, which cost a failed `accept4` and an
  `epoll_ctl` per reactor wake-up. Choose eventloop for the highest request
  rate on async apps; greenlet for smol-based code.
- **The sync worker is bound by wrk.** With a new connection per request, wrk
  keeps {pbusy('sync', 'wrk')} CPUs busy (of the 2) while the two sync workers use
  {pbusy('sync', 'server')}: gpe sync answers faster than this client can open
  connections (and faster than the bare server in close mode). Against the
  peer, the sync ratio is therefore bounded by wrk's connection rate. A sync worker
  serves the clients waiting on a socket one after another without polling
  in between ({pfig('sync', *sys_)} syscalls per request).
- **The ceiling moves.** The bare server itself varies from run to run on this
  shared VM, and every ratio above moves with it.
{report_peers.axum_bound(out)}"""
    # Keep the sections of bench/ab.sh and bench/idle_yield.sh (their own runs).
    old_md = (root / "BENCHMARKS.md").read_text() if (root / "BENCHMARKS.md").exists() else ""
    for kept in kept_sections(old_md):
        md = md.rstrip("\n") + "\n\n" + kept + "\n"
    (root / "BENCHMARKS.md").write_text(md)
    print("\n" + table + "\n\n" + stable + "\n\n" + htable + "\n\n" + ttable)


if __name__ == "__main__":
    main()
