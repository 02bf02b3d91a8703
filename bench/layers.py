#!/usr/bin/env python3
"""CPU time of each layer of a request, from a perf profile (bench/layers.sh).

    perf script -F comm,tid,period,ip,sym,dso | layers.py attribute --server NAME --requests N
    layers.py report ROOT OUT      (OUT/layers.jsonl -> a Markdown section)

`attribute` reads `perf script` output of a profile recorded with call
graphs (`perf record -e cpu-clock --call-graph dwarf`) and gives each sample
to the innermost layer found on its stack, leaf first, so nested layers are
not counted twice: a sample inside the app, called from gpe's
instrumentation, is the app's. A sample whose stack matches no layer goes to
`other`. Each layer's CPU time is the sum of its samples' periods (ns of
cpu-clock); divided by the N requests served while perf recorded, it is
microseconds of CPU per request. One JSON line is printed.

`report` prints the section of BENCHMARKS.md, and with BENCH_LAYERS_WRITE=1
writes it there (bench/report.py keeps it when it rewrites the file).

The layers are the ones issue 13 names (balancer, gate, instrumentation,
body handling, response building, date header) plus what a request costs
outside gpe: the socket system calls (the kernel's loopback TCP is spent
inside them), epoll and the wake-ups between threads and processes, hyper's
parser and dispatcher, the runtime's loop, the allocator, and the app.
"""
import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_peers import load_jsonl, write_kept_section  # noqa: E402

# (layer, pattern on a frame's symbol). A frame is tested against the
# patterns in this order; the innermost frame that matches any decides.
LAYERS = [
    ("socket syscalls", r"__GI___writev|__libc_recv|__libc_send|__libc_read\b|__libc_write\b|\bwritev\b|\brecv\b"),
    ("epoll, yield, wake-ups", r"epoll_wait|epoll_ctl|eventfd|mio::poll::Poll::poll|futex|sched_yield|Parker|Unparker|park\b|unpark"),
    ("date header", r"hyper::common::date|httpdate"),
    ("response building", r"Http1Transaction>::encode|Conn<I,B,T>::write_head|write_headers|HeaderMap.*(append|insert)"),
    ("request parsing", r"Http1Transaction>::parse|httparse|Buffered<T,B>::parse"),
    ("app", r"App>::call|Handler<F> as tower_service::Service|gpe_core::http::app::(text|buffered|full)|gpe::builtin|testapp|gpe_bench_ceiling::hello"),
    ("instrumentation", r"gpe_core::http::instrument|gpe_core::store::|Recorder::|claim_in_flight|clock_gettime|Timespec>::now|Instant::now"),
    ("body handling", r"gpe_core::http::body|Watched<B>|http_body_util|OnEnd|Incoming as http_body"),
    ("deadline watch", r"gpe_core::http::conn::Watch|gpe_core::http::deadline|tokio::time::|Deadlines"),
    ("balancer", r"gpe_core::balance"),
    ("gate", r"gpe_core::async_worker::(Gate|Admission)|Admission::"),
    ("accept", r"accept4|TcpListener.*accept|accept_loop"),
    ("hyper dispatch", r"hyper::proto::h1::dispatch|hyper::proto::h1::conn|hyper::proto::h1::io|UpgradeableConnection|hyper_io::"),
    ("runtime", r"tokio::runtime|tokio::task|LocalSet|futures_util|futures_executor|async_executor|async_task|async_io|smol|polling::|crossbeam"),
    ("allocator", r"\bmalloc\b|\bfree\b|cfree|_int_malloc|_int_free|realloc|malloc_consolidate|__rust_alloc|__rust_dealloc|__rdl_"),
]
COMPILED = [(name, re.compile(pat)) for name, pat in LAYERS]
ORDER = [name for name, _ in LAYERS] + ["other"]
FRAME = re.compile(r"^\s+[0-9a-f]+\s+(.*?)\s+\(([^)]*)\)\s*$")


def layer_of(stack):
    """The innermost layer on `stack` (leaf first)."""
    for sym in stack:
        for name, pat in COMPILED:
            if pat.search(sym):
                return name
    return "other"


def samples(lines):
    """(period in ns, stack leaf first) of each sample of `perf script` output."""
    period, stack = None, []
    for line in lines:
        if line.strip() and not line.startswith((" ", "\t")):
            if period is not None and stack:
                yield period, stack
            nums = [t for t in line.split() if t.isdigit()]
            period, stack = (int(nums[-1]) if nums else None), []
            continue
        m = FRAME.match(line)
        if m:
            stack.append(m.group(1))
    if period is not None and stack:
        yield period, stack


def attribute(args):
    ns = {}
    count = 0
    for period, stack in samples(sys.stdin):
        name = layer_of(stack)
        ns[name] = ns.get(name, 0) + period
        count += 1
    if count == 0:
        sys.exit("layers.py: no samples with call stacks on stdin")
    us = {k: v / 1000 / args.requests for k, v in ns.items()}
    print(json.dumps({"server": args.server, "requests": args.requests, "samples": count,
                      "us_per_req": us}))


SERVER_NAMES = {
    "ceiling": "ceiling (1 process, 2-thread runtime)",
    "forked": "forked ceiling (2 processes)",
    "forked-bal": "forked ceiling, balanced",
    "eventloop": "gpe eventloop",
    "thread": "gpe thread",
    "greenlet": "gpe greenlet",
}


def section(out):
    rows = load_jsonl(out / "layers.jsonl")
    meta = dict(line.split("=", 1) for line in (out / "layers.meta").read_text().splitlines() if "=" in line)
    used = [name for name in ORDER if any(r["us_per_req"].get(name, 0) >= 0.005 for r in rows)]
    lines = [
        "<!-- layers:start (bench/layers.sh; kept by bench/report.py) -->",
        "## CPU time per request, by layer",
        "",
        f"`bench/layers.sh`: each server alone, `wrk -t1 -c16` for {meta.get('secs', '?')} s "
        f"under `perf record -e cpu-clock -F {meta.get('freq', '?')} --call-graph dwarf` "
        "on the server's own processes (gpe: the 2 workers, metrics on). Each sample "
        "goes to the innermost layer on its stack (the patterns are in bench/layers.py); "
        "a layer's CPU time over the requests wrk counted is its µs of CPU per request, "
        "kernel included. The table's *total* is the servers' CPU per request under the "
        "profiler, which taking stacks raises by a few percent.",
        "",
        f"- **Run:** {meta.get('date', '?')} (UTC), gpe commit `{meta.get('commit', '?')}`",
        "",
        "| layer | " + " | ".join(SERVER_NAMES.get(r["server"], r["server"]) for r in rows) + " |",
        "|---|" + "---:|" * len(rows),
    ]
    for name in used:
        cells = [f"{r['us_per_req'].get(name, 0):.2f}" for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    totals = [f"**{sum(r['us_per_req'].values()):.2f}**" for r in rows]
    lines.append("| **total** | " + " | ".join(totals) + " |")
    lines.append("| requests (samples) | " + " | ".join(f"{r['requests']:,} ({r['samples']:,})" for r in rows) + " |")
    lines.append("")
    lines.extend(differences(rows))
    lines.append("<!-- layers:end -->")
    return "\n".join(lines)


def differences(rows):
    """A line per gpe server: its CPU per request over the forked ceiling's
    (the balanced one if measured: gpe's workers balance too), and the three
    layers that differ most."""
    by = {r["server"]: r for r in rows}
    base = by.get("forked-bal") or by.get("forked")
    if base is None:
        return []
    base_name = SERVER_NAMES[base["server"]]
    b = base["us_per_req"]
    out = []
    for r in rows:
        if r["server"] in ("ceiling", "forked", "forked-bal"):
            continue
        u = r["us_per_req"]
        diff = {k: u.get(k, 0) - b.get(k, 0) for k in set(u) | set(b)}
        top = sorted(diff.items(), key=lambda kv: -abs(kv[1]))[:3]
        parts = ", ".join(f"{k} {v:+.2f}" for k, v in top)
        extra = sum(u.values()) - sum(b.values())
        out.append(f"- **{SERVER_NAMES.get(r['server'], r['server'])}** uses {extra:+.2f} µs of CPU "
                   f"per request against the {base_name}; the layers that differ most: {parts}.")
    return out


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "report":
        sys.argv = [sys.argv[0], *sys.argv[2:]]
        write_kept_section("layers", section, "BENCH_LAYERS_WRITE")
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("attribute", help="perf script on stdin -> one JSON line")
    a.add_argument("--server", required=True)
    a.add_argument("--requests", type=int, required=True)
    attribute(ap.parse_args())


if __name__ == "__main__":
    main()
