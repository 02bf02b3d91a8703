#!/usr/bin/env python3
"""Cost of each layer of a request, from a perf profile.

    perf script -i perf.data | bench/layers.py --us-per-req 13.7 [--json]

Reads `perf script` output of a profile recorded with call graphs
(`perf record --call-graph dwarf`) and gives each sample to the innermost
layer found on its stack, leaf first, so nested layers are not counted
twice: a sample inside the app, called from gpe's instrumentation, is the
app's. A sample whose stack matches no layer goes to `other`. With
`--us-per-req` (the CPU time per request measured beside the profile) each
share is also given in microseconds per request.

The layers are the ones issue 13 names (balancer, gate, instrumentation,
body handling, response building, date header) plus what a request costs
outside gpe: the socket system calls (the kernel's loopback TCP is spent
inside them), hyper's parser and dispatcher, the runtime's loop, and the app.
"""
import argparse
import json
import re
import sys

# (layer, pattern on a frame's symbol). Order does not matter: the innermost
# matching frame of a stack decides.
LAYERS = [
    ("socket syscalls", r"__GI___writev|__libc_recv|__libc_send|__libc_read\b|__libc_write\b|\bwritev\b|\brecv\b"),
    ("epoll and wakeups", r"epoll_wait|eventfd|mio::poll::Poll::poll|futex|sched_yield"),
    ("date header", r"hyper::common::date|httpdate"),
    ("response building", r"Http1Transaction>::encode|Conn<I,B,T>::write_head|write_headers|HeaderMap.*(append|insert)"),
    ("request parsing", r"Http1Transaction>::parse|httparse|Buffered<T,B>::parse"),
    ("app", r"App>::call|Handler<F> as tower_service::Service|gpe_core::http::app::(text|buffered|full)|gpe::builtin|testapp"),
    ("instrumentation", r"gpe_core::http::instrument|gpe_core::store::|Recorder::|claim_in_flight|clock_gettime|Timespec>::now|Instant::now"),
    ("body handling", r"gpe_core::http::body|Watched<B>|http_body_util|OnEnd|Incoming as http_body"),
    ("deadline watch", r"gpe_core::http::conn::Watch|tokio::time::|Deadlines"),
    ("balancer", r"gpe_core::balance"),
    ("gate", r"gpe_core::.*[Gg]ate\b|Gate::|admission"),
    ("accept", r"accept4|TcpListener.*accept|serve_worker::\{\{closure\}\}::\{\{closure\}\}$"),
    ("hyper dispatch", r"hyper::proto::h1::dispatch|hyper::proto::h1::conn|hyper::proto::h1::io|UpgradeableConnection"),
    ("runtime", r"tokio::runtime|tokio::task|LocalSet|futures_util|async_executor|async_io|smol|polling::"),
    ("allocator", r"\bmalloc\b|\bfree\b|cfree|_int_malloc|_int_free|realloc|malloc_consolidate"),
]
COMPILED = [(name, re.compile(pat)) for name, pat in LAYERS]
FRAME = re.compile(r"^\s+[0-9a-f]+\s+(.*?)\s+\(([^)]*)\)\s*$")


def layer_of(stack):
    """The innermost layer on `stack` (leaf first)."""
    for sym in stack:
        for name, pat in COMPILED:
            if pat.search(sym):
                return name
    return "other"


def samples(lines):
    stack = []
    for line in lines:
        if not line.strip():
            if stack:
                yield stack
            stack = []
            continue
        m = FRAME.match(line)
        if m:
            stack.append(m.group(1))
        elif not line.startswith((" ", "\t")):
            if stack:
                yield stack
            stack = []
    if stack:
        yield stack


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--us-per-req", type=float, default=None)
    ap.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    args = ap.parse_args()
    counts = {}
    total = 0
    for stack in samples(sys.stdin):
        name = layer_of(stack)
        counts[name] = counts.get(name, 0) + 1
        total += 1
    if total == 0:
        sys.exit("layers.py: no samples with call stacks on stdin")
    rows = sorted(counts.items(), key=lambda kv: -kv[1])
    if args.json:
        out = {"samples": total, "us_per_req": args.us_per_req,
               "layers": {k: v / total for k, v in rows}}
        print(json.dumps(out))
        return
    print(f"{'layer':<20} {'share':>7} {'µs/req':>7}")
    for name, n in rows:
        share = n / total
        us = f"{share * args.us_per_req:7.2f}" if args.us_per_req else "      -"
        print(f"{name:<20} {share:7.1%} {us}")
    print(f"{'(samples)':<20} {total:>7}")


if __name__ == "__main__":
    main()
