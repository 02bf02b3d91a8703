//! Black-box acceptance tests: the real binaries, real sockets, real signals,
//! promtool and a real Prometheus. Each test asserts exact figures and runs for
//! every worker type.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use gpe_tests::*;
use nix::sys::signal::Signal;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");
/// The `gpe` command line.
const GPE: &str = env!("CARGO_BIN_EXE_gpe-bin");

fn start(worker: &str, workers: u32) -> Server {
    Server::start(TESTAPP, Opts::new(worker, workers))
}

/// The request mix of the counting test: (method, path, route label, status).
fn plan(n: usize) -> (&'static str, &'static str, &'static str, u16) {
    match n % 10 {
        0..=3 => ("GET", "/", "/", 200),
        4 => ("POST", "/", "/", 200),
        5 => ("GET", "/status/503", "/status/{code}", 503),
        6 => ("POST", "/status/201", "/status/{code}", 201),
        // Responses that name no route are labelled `unmatched`.
        7 => ("GET", "/panic", "unmatched", 500),
        8 => ("GET", "/nope", "unmatched", 404),
        _ => ("POST", "/bytes/300", "/bytes/{n}", 200),
    }
}

per_worker!(
    exact_counts,
    errors_keep_the_worker_alive,
    own_memory_and_cpu,
    worker_state_follows_requests,
    hup_replaces_workers_without_failures,
    usr1_reopens_the_access_log,
    killed_worker_is_replaced_and_counts_kept,
    slot_durations_count_every_request_and_survive_kill_9,
    ttin_ttou_scale,
    term_stops_cleanly,
    exposition_passes_promtool,
    real_prometheus_scrapes_exact_totals,
    cardinality_is_capped,
    master_has_one_thread,
    head_limits_answer_414_and_431,
);

fn exact_counts(worker: &str) {
    let s = start(worker, 2);
    let addr = s.addr;
    let results = parallel(4, 250, move |c, i| {
        let (m, p, route, status) = plan(c * 250 + i);
        let r = http(addr, m, p, &[], if m == "POST" { b"body" } else { b"" });
        (m, route, status, r.map(|r| r.status))
    });
    let mut expected: BTreeMap<(&str, &str, String), u64> = BTreeMap::new();
    for (m, route, status, got) in &results {
        assert_eq!(got.as_ref().ok(), Some(status), "{m} {route}");
        *expected.entry((m, route, status.to_string())).or_default() += 1;
    }
    let metrics = s.scrape();
    assert_eq!(metrics.sum("gpe_http_requests_total", &[]), 1000.0);
    for ((m, route, status), n) in &expected {
        assert_eq!(
            metrics.one(
                "gpe_http_requests_total",
                &[("method", m), ("route", route), ("status", status)]
            ),
            *n as f64,
            "{m} {route} {status}"
        );
    }
    let per_worker = metrics.samples("gpe_worker_requests_total");
    assert_eq!(per_worker.len(), 2);
    assert_eq!(metrics.sum("gpe_worker_requests_total", &[]), 1000.0);
    let split: Vec<f64> = per_worker.iter().map(|(_, v)| *v).collect();
    println!("{worker}: per-worker split of 1000 requests: {split:?}");
    // Both take part. How the split falls is the host's scheduling: a sync
    // worker accepts when it is free, and on a busy shared host one process
    // can be kept off the CPU for most of the run (874 to 126 was seen). The
    // balance between workers is tested in workers.rs
    // (`load_spreads_over_workers`), where gpe enforces it.
    for v in split {
        assert!(v > 0.0, "each worker serves: {per_worker:?}");
    }
    assert_eq!(
        metrics.sum("gpe_http_request_duration_seconds_count", &[]),
        1000.0
    );
}

fn head_limits_answer_414_and_431(worker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let s = Server::start(
        TESTAPP,
        Opts::new(worker, 1).args(&[
            "--limit-request-line",
            "2000",
            "--limit-request-field-size",
            "100",
            "--accesslog",
            log.to_str().unwrap(),
        ]),
    );
    let before = s.worker_pids();
    // "GET /?qqq… HTTP/1.1": 13 bytes around the query.
    let line_at = format!("/?{}", "q".repeat(2000 - 13 - 2));
    let line_over = format!("{line_at}q");
    // "x-a: vvv…\r\n": 5 bytes before the value and 2 after, counted as
    // Gunicorn counts them.
    let field_at = "v".repeat(100 - 5 - 2);
    let field_over = format!("{field_at}v");
    let send = |path: &str, field: &str| http(s.addr, "GET", path, &[("x-a", field)], b"").unwrap();
    assert_eq!(
        send(&line_at, "v").status,
        200,
        "{worker}: line at the limit"
    );
    assert_eq!(
        send("/", &field_at).status,
        200,
        "{worker}: field at the limit"
    );
    // Over a limit: the answer closes even a keep-alive connection.
    let over = |path: &str, field: &str, status: u16| {
        let mut c = KeepAlive::connect(s.addr).unwrap();
        let r = c.request_with("GET", path, &[("x-a", field)], b"").unwrap();
        assert_eq!(r.status, status, "{worker}");
        assert_eq!(r.header("connection"), Some("close"), "{worker}");
        assert!(
            c.closed_by_server_within(Duration::from_secs(10)),
            "{worker}: the connection is closed after {status}"
        );
    };
    over(&line_over, "v", 414);
    over("/", &field_over, 431);
    assert_eq!(s.worker_pids(), before, "{worker}: the worker lives on");
    let m = s.scrape();
    let requests = |route: &str, status: &str| {
        m.one(
            "gpe_http_requests_total",
            &[("method", "GET"), ("route", route), ("status", status)],
        )
    };
    assert_eq!(requests("/", "200"), 2.0);
    assert_eq!(requests("unknown", "414"), 1.0);
    assert_eq!(requests("unknown", "431"), 1.0);
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 4.0);
    assert_eq!(
        m.one(
            "gpe_http_errors_total",
            &[
                ("method", "GET"),
                ("route", "unknown"),
                ("kind", "bad_request")
            ]
        ),
        2.0
    );
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 2.0);
    // The access log keeps the first 256 bytes of the rejected target only.
    let mut rejected = None;
    wait_until(Duration::from_secs(5), || {
        rejected = std::fs::read_to_string(&log)
            .ok()
            .and_then(|t| t.lines().find(|l| l.contains("\" 414 ")).map(str::to_owned));
        rejected.is_some()
    });
    let rejected = rejected.expect("the 414 is logged");
    let q = rejected.matches('q').count();
    assert_eq!(q, 256 - 2, "{worker}: {rejected}");
}

fn errors_keep_the_worker_alive(worker: &str) {
    let s = start(worker, 1);
    let before = s.worker_pids();
    for _ in 0..20 {
        assert_eq!(get(s.addr, "/panic").status, 500);
    }
    for _ in 0..10 {
        assert_eq!(
            http(s.addr, "POST", "/status/500", &[], b"x")
                .unwrap()
                .status,
            500
        );
    }
    for _ in 0..5 {
        assert_eq!(get(s.addr, "/status/503").status, 503);
    }
    assert_eq!(get(s.addr, "/").status, 200, "the worker keeps serving");
    let m = s.scrape();
    let err = |method: &str, route: &str, kind: &str| {
        m.one(
            "gpe_http_errors_total",
            &[("method", method), ("route", route), ("kind", kind)],
        )
    };
    assert_eq!(err("GET", "unmatched", "panic"), 20.0);
    assert_eq!(err("POST", "/status/{code}", "app_error"), 10.0);
    assert_eq!(err("GET", "/status/{code}", "app_error"), 5.0);
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 35.0);
    assert_eq!(s.worker_pids(), before, "no worker was replaced");
    assert_eq!(
        m.one("gpe_master_worker_exits_total", &[("reason", "crash")]),
        0.0
    );
}

fn own_memory_and_cpu(worker: &str) {
    const MIB: f64 = (1 << 20) as f64;
    let s = start(worker, 2);
    let pids = s.worker_pids();
    let cpu_before = s.scrape().sum("gpe_worker_cpu_seconds_total", &[]);
    let addr = s.addr;
    parallel(4, 400, move |_, _| get(addr, "/bytes/20000").status);
    let loaded = s.scrape();
    let cpu_after = loaded.sum("gpe_worker_cpu_seconds_total", &[]);
    assert!(
        cpu_after > cpu_before,
        "cpu rises under load: {cpu_before} -> {cpu_after}"
    );
    // One worker takes 64 MiB and keeps it; its request count says which.
    let r = get(s.addr, "/hold/64");
    assert_eq!((r.status, r.body.as_slice()), (200, &b"held"[..]));
    let m = s.scrape();
    let served = |m: &Metrics, slot: &str| m.one("gpe_worker_requests_total", &[("worker", slot)]);
    let rss =
        |m: &Metrics, slot: &str| m.one("gpe_worker_resident_memory_bytes", &[("worker", slot)]);
    let holders: Vec<&String> = pids
        .keys()
        .filter(|slot| served(&m, slot) != served(&loaded, slot))
        .collect();
    assert_eq!(holders.len(), 1, "{worker}: one worker served /hold/64");
    let holder = holders[0].as_str();
    assert_eq!(served(&m, holder), served(&loaded, holder) + 1.0);
    let held = rss(&m, holder);
    let master_rss = m.one("process_resident_memory_bytes", &[]);
    for (slot, pid) in &pids {
        let reported = rss(&m, slot);
        let actual = statm_rss(*pid).unwrap() as f64;
        assert!(
            (reported - actual).abs() <= actual * 0.10,
            "{worker}: worker {slot}: reported {reported}, statm {actual}"
        );
        let rise = reported - rss(&loaded, slot);
        if slot == holder {
            assert!(
                rise >= 64.0 * MIB,
                "{worker}: worker {slot} holds 64 MiB, its gauge rose by {rise}"
            );
        } else {
            assert!(
                rise.abs() < 16.0 * MIB && reported < held - 48.0 * MIB,
                "{worker}: worker {slot} holds nothing: {reported} (rose by {rise}), holder {held}"
            );
        }
    }
    assert!(
        master_rss < held - 48.0 * MIB,
        "{worker}: the master's {master_rss} is not the holder's {held}"
    );
}

fn worker_state_follows_requests(worker: &str) {
    let s = start(worker, 1);
    let addr = s.addr;
    let t0 = unix_now();
    let req = std::thread::spawn(move || get(addr, "/sleep/1500").status);
    let busy = wait_until(Duration::from_secs(5), || {
        s.scrape().one("gpe_worker_state", &[("state", "busy")]) == 1.0
    });
    assert!(busy, "worker shows busy during /sleep/1500");
    let m = s.scrape();
    let since = m.one("gpe_worker_state_since_seconds", &[]);
    let seen = unix_now();
    assert!(
        since >= t0 - 0.05 && since <= seen,
        "busy since {since} lies inside the request [{t0}, {seen}]"
    );
    assert_eq!(m.one("gpe_http_requests_in_flight", &[]), 1.0);
    assert_eq!(req.join().unwrap(), 200);
    let t1 = unix_now();
    let idle = wait_until(Duration::from_secs(5), || {
        s.scrape().one("gpe_worker_state", &[("state", "idle")]) == 1.0
    });
    assert!(idle, "worker idle afterwards");
    let since = s.scrape().one("gpe_worker_state_since_seconds", &[]);
    assert!(
        since >= t0 + 1.4 && since <= t1 + 0.05,
        "idle since {since}"
    );
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn hup_replaces_workers_without_failures(worker: &str) {
    let s = start(worker, 2);
    let before = s.worker_pids();
    let client = Load::start(s.addr, 2, "/");
    assert!(wait_until(Duration::from_secs(10), || client.ok() >= 20));
    s.signal(Signal::SIGHUP);
    let replaced = wait_until(Duration::from_secs(15), || {
        let now = s.worker_pids();
        now.len() == 2 && now.values().all(|p| !before.values().any(|b| b == p))
    });
    assert!(replaced, "new worker pids after HUP; log:\n{}", s.log());
    s.wait_ready(2);
    // The old workers are counted once the master has reaped them.
    s.wait_for(
        "gpe_master_worker_exits_total",
        &[("reason", "reload")],
        2.0,
    );
    let served = client.ok();
    assert!(
        wait_until(Duration::from_secs(10), || client.ok() >= served + 20),
        "the new workers serve"
    );
    let (ok, failed) = client.finish();
    assert!(ok > 0);
    assert_eq!(failed, 0, "no request failed during the reload");
    let m = s.scrape();
    assert_eq!(m.one("gpe_master_signals_total", &[("signal", "HUP")]), 1.0);
    assert_eq!(m.one("gpe_master_reloads_total", &[]), 1.0);
    assert_eq!(
        m.sum("gpe_http_requests_total", &[]),
        ok as f64,
        "every success counted once"
    );
    assert_eq!(
        m.one("gpe_master_worker_exits_total", &[("reason", "reload")]),
        2.0
    );
}

fn usr1_reopens_the_access_log(worker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("access.log");
    let s = Server::start(
        TESTAPP,
        Opts::new(worker, 1).args(&["--accesslog", log.to_str().unwrap()]),
    );
    assert_eq!(get(s.addr, "/status/201").status, 201);
    assert!(wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/status/201"))
    }));
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    s.signal(Signal::SIGUSR1);
    assert!(wait_until(Duration::from_secs(5), || {
        s.scrape()
            .one("gpe_master_signals_total", &[("signal", "USR1")])
            == 1.0
    }));
    // The worker reopens when it handles the forwarded signal; retry until the
    // line lands in the new file.
    let reopened = wait_until(Duration::from_secs(5), || {
        get(s.addr, "/status/202");
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/status/202"))
    });
    assert!(reopened, "a new access.log appears after USR1");
    let old = std::fs::read_to_string(&rotated).unwrap();
    assert!(old.contains("/status/201"));
}

fn killed_worker_is_replaced_and_counts_kept(worker: &str) {
    let s = start(worker, 2);
    for _ in 0..50 {
        assert_eq!(get(s.addr, "/").status, 200);
    }
    let total = s.scrape().sum("gpe_http_requests_total", &[]);
    assert_eq!(total, 50.0);
    let before = s.worker_pids();
    let victim = before["0"];
    let t = Instant::now();
    assert!(signal_child(s.pid().as_raw(), victim, Signal::SIGKILL));
    let replaced = wait_until(Duration::from_secs(5), || {
        s.worker_pids().get("0").is_some_and(|p| *p != victim)
    });
    let took = t.elapsed();
    assert!(replaced, "slot 0 gets a new worker");
    assert!(
        took <= Duration::from_secs(1),
        "replaced within 1 s, took {took:?}"
    );
    s.wait_ready(2);
    let m = s.scrape();
    assert_eq!(
        m.sum("gpe_http_requests_total", &[]),
        total,
        "the dead worker's counts are kept"
    );
    assert_eq!(
        m.one("gpe_master_signals_total", &[("signal", "CHLD")]),
        1.0
    );
    assert_eq!(
        m.one("gpe_master_worker_exits_total", &[("reason", "crash")]),
        1.0
    );
    assert_eq!(s.worker_pids()["1"], before["1"], "slot 1 untouched");
}

/// `gpe_worker_request_duration_seconds{worker}` by slot: its samples
/// (`_bucket` by `le`, `_sum`, `_count`) keyed `worker/name/le`.
fn slot_durations(m: &Metrics) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for part in ["_bucket", "_sum", "_count"] {
        let name = format!("gpe_worker_request_duration_seconds{part}");
        for (l, v) in m.samples(&name) {
            let le = l.get("le").map_or("", String::as_str);
            out.insert(format!("{}/{part}/{le}", l["worker"]), v);
        }
    }
    out
}

fn slot_durations_count_every_request_and_survive_kill_9(worker: &str) {
    let s = start(worker, 2);
    for i in 0..60 {
        let path = if i % 3 == 0 { "/status/201" } else { "/" };
        assert!(get(s.addr, path).status < 300, "request {i}");
    }
    wait_sum(&s, "gpe_worker_requests_total", &[], 60.0);
    let m = s.scrape();
    // Each slot's histogram counts exactly the slot's requests, over every
    // route, in the buckets of the route histograms.
    for (l, n) in m.samples("gpe_worker_requests_total") {
        let w = [("worker", l["worker"].as_str())];
        let count = m.one("gpe_worker_request_duration_seconds_count", &w);
        assert_eq!(count, n, "slot {}", l["worker"]);
        let inf = [w[0], ("le", "+Inf")];
        assert_eq!(m.one("gpe_worker_request_duration_seconds_bucket", &inf), n);
    }
    assert_eq!(
        m.sum("gpe_worker_request_duration_seconds_count", &[]),
        60.0
    );
    for (l, _) in m.samples("gpe_http_request_duration_seconds_bucket") {
        let le = [("le", l["le"].as_str())];
        assert_eq!(
            m.sum("gpe_worker_request_duration_seconds_bucket", &le),
            m.sum("gpe_http_request_duration_seconds_bucket", &le),
            "le {}",
            l["le"]
        );
    }
    let (slot_sum, route_sum) = (
        m.sum("gpe_worker_request_duration_seconds_sum", &[]),
        m.sum("gpe_http_request_duration_seconds_sum", &[]),
    );
    assert!(
        slot_sum > 0.0 && (slot_sum - route_sum).abs() < 1e-6,
        "{slot_sum} {route_sum}"
    );

    // Kill the busier slot's worker (idle: nothing in flight): its counts
    // stay, exactly.
    let before = slot_durations(&m);
    let busiest = m
        .samples("gpe_worker_requests_total")
        .into_iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|(l, _)| l["worker"].clone())
        .unwrap();
    let victim = s.worker_pids()[&busiest];
    assert!(signal_child(s.pid().as_raw(), victim, Signal::SIGKILL));
    s.wait_for("gpe_master_worker_exits_total", &[("reason", "crash")], 1.0);
    s.wait_ready(2);
    assert_ne!(s.worker_pids()[&busiest], victim);
    assert_eq!(slot_durations(&s.scrape()), before, "kept across kill -9");

    // More requests: every sample only grows, and the counts still equal
    // the requests sent.
    for i in 0..40 {
        assert_eq!(get(s.addr, "/").status, 200, "request {i}");
    }
    wait_sum(&s, "gpe_worker_requests_total", &[], 100.0);
    let m = s.scrape();
    let after = slot_durations(&m);
    for (k, v) in &before {
        assert!(after[k] >= *v, "{k}: {v} -> {}", after[k]);
    }
    assert_eq!(
        m.sum("gpe_worker_request_duration_seconds_count", &[]),
        100.0
    );
    for (l, n) in m.samples("gpe_worker_requests_total") {
        let w = [("worker", l["worker"].as_str())];
        assert_eq!(m.one("gpe_worker_request_duration_seconds_count", &w), n);
    }
}

fn ttin_ttou_scale(worker: &str) {
    let s = start(worker, 2);
    s.signal(Signal::SIGTTIN);
    s.wait_ready(3);
    assert_eq!(s.worker_pids().len(), 3);
    s.signal(Signal::SIGTTOU);
    s.wait_ready(2);
    // The retired worker is counted once the master has reaped it.
    s.wait_for(
        "gpe_master_worker_exits_total",
        &[("reason", "scale_down")],
        1.0,
    );
    assert_eq!(s.worker_pids().len(), 2);
    let m = s.scrape();
    assert_eq!(m.one("gpe_master_workers_desired", &[]), 2.0);
    assert_eq!(
        m.one("gpe_master_signals_total", &[("signal", "TTIN")]),
        1.0
    );
    assert_eq!(
        m.one("gpe_master_signals_total", &[("signal", "TTOU")]),
        1.0
    );
    assert_eq!(
        m.one("gpe_master_worker_exits_total", &[("reason", "scale_down")]),
        1.0
    );
}

fn term_stops_cleanly(worker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("gpe.pid");
    let mut s = Server::start(
        TESTAPP,
        Opts::new(worker, 2).args(&["--pidfile", pidfile.to_str().unwrap()]),
    );
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        s.pid().to_string()
    );
    let pids = s.worker_pids();
    assert_eq!(get(s.addr, "/").status, 200);
    let status = s.stop();
    assert_eq!(status.code(), Some(0), "log:\n{}", s.log());
    assert!(!pidfile.exists(), "pidfile removed");
    assert!(!s.metrics_dir().exists(), "metrics directory removed");
    for pid in pids.values() {
        assert!(!alive(*pid), "worker {pid} is gone");
    }
}

fn exposition_passes_promtool(worker: &str) {
    let s = start(worker, 2);
    for i in 0..40 {
        let (m, p, _, _) = plan(i);
        http(s.addr, m, p, &[], b"").unwrap();
    }
    for accept in [
        None,
        Some("application/openmetrics-text; version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    ] {
        let headers: Vec<(&str, &str)> = accept.iter().map(|a| ("Accept", *a)).collect();
        let r = http(s.metrics, "GET", "/metrics", &headers, b"").unwrap();
        assert_eq!(r.status, 200);
        let text = String::from_utf8(r.body.clone()).unwrap();
        if accept.is_some() {
            assert!(r
                .header("content-type")
                .unwrap()
                .starts_with("application/openmetrics-text"));
            assert!(text.ends_with("# EOF\n"));
        } else {
            assert!(r.header("content-type").unwrap().contains("version=0.0.4"));
        }
        let (ok, out) = promtool_check(&text);
        if accept.is_none() {
            assert!(
                ok,
                "promtool check metrics failed (text 0.0.4):\n{out}\n{text}"
            );
        } else {
            // promtool 2.42 (Debian 12) parses only the 0.0.4 syntax: an OpenMetrics
            // counter family `x` (samples `x_total`) reads to it as `x_total` without
            // help. That one false positive is allowed; anything else fails.
            let real: Vec<&str> = out
                .lines()
                .filter(|l| {
                    !l.strip_suffix("_total no help text").is_some_and(|fam| {
                        text.contains(&format!("# HELP {fam} "))
                            && text.contains(&format!("# TYPE {fam} counter"))
                    })
                })
                .collect();
            assert!(
                real.is_empty(),
                "promtool check metrics failed (OpenMetrics):\n{out}\n{text}"
            );
        }
        let m = Metrics::parse(&text);
        let mut seen = std::collections::BTreeSet::new();
        for (name, _) in &m.types {
            assert!(seen.insert(name.clone()), "family {name} appears twice");
        }
        for (name, labels, _) in &m.samples {
            for (k, v) in labels {
                let numeric = k != "le" && v.parse::<f64>().is_ok_and(|x| x > 1e6);
                // The identity metrics, one series per process.
                let info = name == "gpe_worker_info" || name == "gpe_master_info";
                assert!(
                    info || (k != "pid" && !numeric),
                    "{name} has label {k}={v}: no pid or timestamp labels"
                );
            }
        }
        assert_eq!(m.one("gpe_build_info", &[]), 1.0);
    }
}

fn real_prometheus_scrapes_exact_totals(worker: &str) {
    let s = start(worker, 2);
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gpe\n    static_configs:\n      - targets: ['{}']\n",
            s.metrics
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
    let mut prom = std::process::Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus is required (Debian package `prometheus`)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _ = prom.stdin.take();
    let prom = Kill(prom);
    let n = 137;
    for _ in 0..n {
        assert_eq!(get(s.addr, "/").status, 200);
    }
    let papi: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut last = String::new();
    let got = wait_until(Duration::from_secs(40), || {
        let Ok(r) = http(
            papi,
            "GET",
            "/api/v1/query?query=sum%28gpe_http_requests_total%29",
            &[],
            b"",
        ) else {
            return false;
        };
        last = String::from_utf8_lossy(&r.body).into_owned();
        last.contains(&format!(",\"{n}\"]"))
    });
    drop(prom);
    assert!(
        got,
        "Prometheus answers sum(gpe_http_requests_total) = {n}; last answer: {last}; log:\n{}",
        std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
    );
}

fn cardinality_is_capped(worker: &str) {
    let cap = 50;
    let s = Server::start(
        TESTAPP,
        // Label by path, so that random paths reach the cap.
        Opts::new(worker, 2).args(&[
            "--metrics-max-series",
            &cap.to_string(),
            "--unmatched-route",
            "path",
        ]),
    );
    let addr = s.addr;
    let statuses = parallel(4, 2500, move |c, i| {
        let r: u64 = rand::random();
        http(addr, "GET", &format!("/random/{c}/{i}/{r:x}"), &[], b"")
            .map(|r| r.status)
            .unwrap_or(0)
    });
    assert!(statuses.iter().all(|s| *s == 404));
    let m = s.scrape();
    let series = m.samples("gpe_http_requests_total");
    assert!(
        series.len() <= cap + 1,
        "{} series, cap {cap} plus other",
        series.len()
    );
    assert_eq!(
        m.sum("gpe_http_requests_total", &[]),
        10_000.0,
        "nothing lost to the cap"
    );
    assert!(
        m.one(
            "gpe_metrics_series_dropped_total",
            &[("family", "gpe_http_requests_total")]
        ) > 0.0
    );
    let mut sizes = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(s.metrics_dir()).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().into_string().unwrap();
        if name.starts_with("worker-") || name == "retired" || name == "master" {
            sizes.insert(e.metadata().unwrap().len());
        }
    }
    assert_eq!(
        sizes.into_iter().collect::<Vec<_>>(),
        vec![gpe_core::data_file_bytes(gpe_core::DEFAULT_CAPACITY) as u64],
        "every data file keeps its fixed size"
    );
}

fn master_has_one_thread(worker: &str) {
    let s = start(worker, 2);
    for _ in 0..20 {
        get(s.addr, "/");
    }
    s.signal(Signal::SIGTTIN);
    s.wait_ready(3);
    assert_eq!(threads_of(s.pid().as_raw()), Some(1));
}

#[test]
fn bad_settings_exit_nonzero_naming_the_setting() {
    let gpe = PathBuf::from(GPE);
    let dir = tempfile::tempdir().unwrap();
    let unreadable = dir.path().join("missing.toml");
    let port = free_port().to_string();
    let bind = format!("127.0.0.1:{port}");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["-w".into(), "0".into()], "`workers`"),
        (vec!["--bind".into(), "nonsense".into()], "`bind`"),
        (vec!["-k".into(), "fibers".into()], "`worker`"),
        (
            vec!["-c".into(), unreadable.to_str().unwrap().into()],
            "config file",
        ),
        (vec!["--timeout=abc".into()], "--timeout"),
        (
            vec![
                "--accesslog".into(),
                dir.path()
                    .join("no-such-dir/access.log")
                    .to_str()
                    .unwrap()
                    .into(),
            ],
            "`accesslog`",
        ),
    ];
    for (args, needle) in cases {
        let marker = format!("gpe-bad-{}", rand::random::<u64>());
        let out = std::process::Command::new(&gpe)
            .arg("serve")
            .args(["--bind", &bind, "--metrics-bind", "127.0.0.1:0"])
            .args(&args)
            .env("TEST_MARKER", &marker)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
        assert!(
            processes_with_env(&marker).is_empty(),
            "{args:?} left processes running"
        );
    }
}

fn processes_with_env(marker: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
            if env.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn builtin_hello_serves_app_and_metrics() {
    let gpe = PathBuf::from(GPE);
    let s = Server::start(
        TESTAPP,
        Opts {
            bin: Some(gpe),
            ..Opts::new("sync", 2)
        },
    );
    let r = get(s.addr, "/");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"Hello, World!");
    let m = s.scrape();
    assert_eq!(
        m.one(
            "gpe_http_requests_total",
            &[("method", "GET"), ("route", "/"), ("status", "200")]
        ),
        1.0
    );
}

#[test]
fn malformed_requests_get_4xx_and_the_worker_lives() {
    use std::io::{Read, Write};
    let s = start("sync", 1);
    let before = s.worker_pids();
    let send = |raw: &[u8]| -> String {
        let mut c = std::net::TcpStream::connect(s.addr).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        c.write_all(raw).unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    assert!(send(b"GARBAGE\r\n\r\n").starts_with("HTTP/1.1 400"));
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(2 << 20)
    );
    assert!(send(huge.as_bytes()).starts_with("HTTP/1.1 431"));
    let r = http(s.addr, "POST", "/", &[], &vec![b'x'; 2048]).unwrap();
    assert_eq!(r.status, 200);
    let s2 = Server::start(
        TESTAPP,
        Opts::new("sync", 1).args(&["--max-body-size", "1024"]),
    );
    let r = http(s2.addr, "POST", "/", &[], &vec![b'x'; 2048]).unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(get(s.addr, "/").status, 200);
    assert_eq!(s.worker_pids(), before, "the worker lives on");
    // A head hyper refuses is counted once its connection has closed.
    s.wait_for(
        "gpe_http_errors_total",
        &[
            ("method", "unknown"),
            ("route", "unknown"),
            ("kind", "bad_request"),
        ],
        2.0,
    );
    assert_eq!(s.scrape().sum("gpe_http_errors_total", &[]), 2.0);
}

#[test]
fn unix_socket_and_sidecar_exporter() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("gpe.sock");
    let s = Server::start(
        TESTAPP,
        Opts::new("sync", 1).args(&["--bind", &format!("unix:{}", sock.display())]),
    );
    for i in 0..7 {
        let mut c = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        c.write_all(
            format!("GET /status/20{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with(&format!("HTTP/1.1 20{i}")), "{out}");
    }
    // The same counts through a sidecar exporter reading the metrics directory.
    let port = free_port();
    let mut sidecar = std::process::Command::new(PathBuf::from(GPE))
        .args([
            "exporter",
            "--metrics-dir",
            s.metrics_dir().to_str().unwrap(),
        ])
        .args(["--metrics-bind", &format!("127.0.0.1:{port}")])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut seen = None;
    wait_until(Duration::from_secs(10), || {
        seen = http(addr, "GET", "/metrics", &[], b"")
            .ok()
            .map(|r| Metrics::parse(&String::from_utf8_lossy(&r.body)));
        seen.is_some()
    });
    let _ = sidecar.kill();
    let _ = sidecar.wait();
    let m = seen.expect("sidecar answers");
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 7.0);
    assert_eq!(
        m.sum("gpe_http_requests_total", &[]),
        s.scrape().sum("gpe_http_requests_total", &[])
    );
    drop(s);
    assert!(!sock.exists(), "the unix socket file is removed on exit");
}

#[test]
fn check_validates_config_files() {
    let gpe = PathBuf::from(GPE);
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "workers = 3\nbind = [\"127.0.0.1:8123\"]\n").unwrap();
    let out = std::process::Command::new(&gpe)
        .args(["check", "-c", good.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("workers: 3"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "workers = 0\n").unwrap();
    let out = std::process::Command::new(&gpe)
        .args(["check", "-c", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("`workers`"));
}

#[test]
fn a_live_servers_metrics_dir_is_not_taken_over() {
    let s = start("sync", 1);
    get(s.addr, "/");
    let out = std::process::Command::new(TESTAPP)
        .args(["--bind", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-bind", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-dir", s.metrics_dir().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("`metrics_dir`") && stderr.contains("in use"),
        "{stderr}"
    );
    assert_eq!(
        s.scrape().sum("gpe_http_requests_total", &[]),
        1.0,
        "the live store is intact"
    );
}

/// Children of `pid` (from `/proc/<pid>/task/<pid>/children`).
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

#[test]
fn a_dead_exporter_is_respawned_and_scrapes_never_hang() {
    let s = start("sync", 2);
    get(s.addr, "/");
    let workers: Vec<i32> = s.worker_pids().values().copied().collect();
    let exporter = children_of(s.pid().as_raw())
        .into_iter()
        .find(|p| !workers.contains(p))
        .expect("the exporter is a child of the master");
    assert!(signal_child(s.pid().as_raw(), exporter, Signal::SIGKILL));
    // The master keeps the metrics socket, so a scrape right now waits in the
    // backlog for the new exporter instead of being refused or hanging.
    let t = Instant::now();
    let m = s.scrape();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answered in {:?}",
        t.elapsed()
    );
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 1.0, "no count lost");
    let respawned = children_of(s.pid().as_raw())
        .into_iter()
        .any(|p| !workers.contains(&p) && p != exporter);
    assert!(respawned, "a new exporter runs");
    assert_eq!(
        s.worker_pids().values().copied().collect::<Vec<_>>(),
        workers
    );
}
