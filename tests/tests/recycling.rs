//! Black-box tests of memory-based recycling (`max_worker_memory`) and of
//! the master's log when it aborts a worker for a missed heartbeat.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use gpe_tests::*;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");

per_worker!(a_worker_above_max_worker_memory_is_retired_without_failures);

fn a_worker_above_max_worker_memory_is_retired_without_failures(worker: &str) {
    let limit = (48u64 << 20).to_string();
    let s = Server::start(
        TESTAPP,
        Opts::new(worker, 2).args(&["--max-worker-memory", &limit]),
    );
    let memory_exits = |s: &Server| {
        s.try_scrape().map_or(0.0, |m| {
            m.one("gpe_master_worker_exits_total", &[("reason", "memory")])
        })
    };
    assert_eq!(get(s.addr, "/hold/64").status, 200, "{worker}");
    // Requests go on while the worker that holds 64 MiB is retired.
    let (mut sent, mut failed) = (1u32, 0u32);
    let deadline = Instant::now() + Duration::from_secs(20);
    while memory_exits(&s) < 1.0 && Instant::now() < deadline {
        match http(s.addr, "GET", "/", &[], b"") {
            Ok(r) if r.status == 200 => {}
            _ => failed += 1,
        }
        sent += 1;
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        memory_exits(&s),
        1.0,
        "{worker}: retired; log:\n{}",
        s.log()
    );
    // And on once its replacement serves in its slot.
    s.wait_ready(2);
    for _ in 0..20 {
        match http(s.addr, "GET", "/", &[], b"") {
            Ok(r) if r.status == 200 => {}
            _ => failed += 1,
        }
        sent += 1;
    }
    assert_eq!(failed, 0, "{worker}: failed requests");
    assert!(
        s.log().contains("is above max_worker_memory"),
        "{worker}: {}",
        s.log()
    );
    wait_sum(&s, "gpe_http_requests_total", &[], f64::from(sent));
    let m = s.scrape();
    assert_eq!(
        m.sum("gpe_http_requests_total", &[("route", "/hold/{mib}")]),
        1.0
    );
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 0.0, "{worker}");
    assert_eq!(
        m.sum("gpe_master_worker_exits_total", &[]),
        1.0,
        "{worker}: only the one worker exited"
    );
}

/// The age the master's log gives for `path` when it aborts a worker.
fn logged_age(log: &str, method_path: &str) -> Option<f64> {
    let at = log.find(&format!("in flight: {method_path} for "))?;
    let rest = &log[at..];
    let age = rest.split(" for ").nth(1)?.split('s').next()?;
    age.parse().ok()
}

fn timeout_names_the_request_in_flight(worker: &str, path: &str) {
    let s = Server::start(TESTAPP, Opts::new(worker, 1).args(&["--timeout", "2"]));
    let addr = s.addr;
    let p = path.to_owned();
    let stuck = std::thread::spawn(move || http(addr, "GET", &p, &[], b"").ok());
    let want = format!("GET {path}");
    let logged = wait_until(Duration::from_secs(15), || {
        logged_age(&s.log(), &want).is_some()
    });
    assert!(
        logged,
        "{worker}: the abort names the request; log:\n{}",
        s.log()
    );
    let age = logged_age(&s.log(), &want).unwrap();
    // The loop's last beat may be up to a tick (500 ms) older than the request.
    assert!(
        (1.4..6.0).contains(&age),
        "{worker}: logged age {age}s; log:\n{}",
        s.log()
    );
    assert!(stuck.join().unwrap().is_none(), "the stuck request failed");
}

#[test]
fn sync_timeout_names_the_request_in_flight() {
    timeout_names_the_request_in_flight("sync", "/sleep/60000");
}

#[test]
fn eventloop_timeout_names_the_blocking_request() {
    // An async handler that blocks the loop.
    timeout_names_the_request_in_flight("eventloop", "/spin/60000");
}

#[test]
fn greenlet_timeout_names_the_blocking_request() {
    timeout_names_the_request_in_flight("greenlet", "/spin/60000");
}
