"""Gunicorn config for the peer runs of bench/run.sh, driven by environment.

BENCH_PEER_BIND      listen address (HOST:PORT)
BENCH_PEER_KIND      sync | gthread | gevent | eventlet
BENCH_PEER_WORKERS   worker processes (default 2)
BENCH_PEER_EXPORTER  1 = gunicorn-prometheus-exporter on (its worker class and
                     hooks, as its README configures them); otherwise plain gunicorn
BENCH_PEER_MAX_REQUESTS_FILE  optional file holding max_requests (re-read on HUP)

With the exporter on, the exporter's own variables must be set too:
PROMETHEUS_BIND_ADDRESS, PROMETHEUS_METRICS_PORT, GUNICORN_WORKERS,
PROMETHEUS_MULTIPROC_DIR (bench/run.sh sets them).
"""

import os

bind = os.environ["BENCH_PEER_BIND"]
workers = int(os.environ.get("BENCH_PEER_WORKERS", "2"))
_kind = os.environ["BENCH_PEER_KIND"]
threads = 4 if _kind == "gthread" else 1
worker_connections = 1000
keepalive = 2
backlog = 2048
timeout = 30
graceful_timeout = 5
loglevel = "info"
accesslog = None

_mr_file = os.environ.get("BENCH_PEER_MAX_REQUESTS_FILE")
if _mr_file and os.path.exists(_mr_file):
    with open(_mr_file) as f:
        max_requests = int(f.read().strip() or "0")

if os.environ.get("BENCH_PEER_EXPORTER") == "1":
    # Importing the package replaces gunicorn's Arbiter with PrometheusMaster.
    from gunicorn_prometheus_exporter.hooks import (  # noqa: E402
        default_on_exit,
        default_on_starting,
        default_post_fork,
        default_when_ready,
        default_worker_int,
    )

    worker_class = {
        "sync": "gunicorn_prometheus_exporter.PrometheusWorker",
        "gthread": "gunicorn_prometheus_exporter.PrometheusThreadWorker",
        "gevent": "gunicorn_prometheus_exporter.PrometheusGeventWorker",
        "eventlet": "gunicorn_prometheus_exporter.PrometheusEventletWorker",
    }[_kind]
    on_starting = default_on_starting
    when_ready = default_when_ready
    post_fork = default_post_fork
    worker_int = default_worker_int
    on_exit = default_on_exit
else:
    worker_class = _kind
