//! Deploying gpe: `/readyz` through boot and stop, and the recipes in
//! `deploy/` (Prometheus rules and their unit tests, the Grafana dashboard's
//! queries against a real Prometheus that scraped gpe under load, the
//! Kubernetes manifests against the Kubernetes schemas), run with the
//! commands docs/deploy.md gives.

use std::time::{Duration, Instant};

use gpe_tests::{get, http, wait_until, Opts, Server};
use nix::sys::signal::Signal;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");

fn readyz(s: &Server) -> u16 {
    http(s.metrics, "GET", "/readyz", &[], b"")
        .unwrap_or_else(|e| panic!("/readyz unreachable: {e}; log:\n{}", s.log()))
        .status
}

#[test]
fn readyz_is_503_while_workers_boot_and_200_once_all_are_up() {
    let mut opts = Opts::new("sync", 3);
    opts.env
        .push(("TESTAPP_BOOT_DELAY_MS".to_owned(), "3000".to_owned()));
    let s = Server::launch(TESTAPP, opts);
    let booting = Instant::now();
    let r = get(s.metrics, "/readyz");
    assert!(
        booting.elapsed() < Duration::from_secs(2),
        "the first answer came too late to be during boot"
    );
    assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
    assert!(String::from_utf8_lossy(&r.body).starts_with("not ready"));
    assert_eq!(
        get(s.metrics, "/healthz").status,
        200,
        "liveness is not readiness"
    );
    assert!(
        wait_until(Duration::from_secs(20), || readyz(&s) == 200),
        "never ready; log:\n{}",
        s.log()
    );
    // Ready means every desired worker has booted: none is still booting.
    let m = s.scrape();
    assert_eq!(m.one("gpe_master_workers", &[]), 3.0);
    assert_eq!(m.sum("gpe_worker_state", &[("state", "booting")]), 0.0);
    assert_eq!(m.sum("gpe_worker_state", &[("state", "idle")]), 3.0);
    assert_eq!(get(s.metrics, "/readyz").body, b"ready\n");
}

#[test]
fn readyz_is_503_after_term_while_the_workers_drain_then_the_listener_closes() {
    let mut s = Server::start(
        TESTAPP,
        Opts::new("thread", 1).args(&["--graceful-timeout", "20"]),
    );
    assert_eq!(readyz(&s), 200);
    let app = s.addr;
    let slow = std::thread::spawn(move || http(app, "GET", "/sleep/3000", &[], b""));
    s.wait_for("gpe_http_requests_in_flight", &[], 1.0);
    s.signal(Signal::SIGTERM);
    assert!(
        wait_until(Duration::from_secs(2), || readyz(&s) == 503),
        "/readyz still 200 after TERM; log:\n{}",
        s.log()
    );
    assert!(
        !slow.is_finished(),
        "503 must come while the request still drains"
    );
    let r = get(s.metrics, "/readyz");
    assert_eq!(r.status, 503);
    assert_eq!(
        get(s.metrics, "/healthz").status,
        200,
        "the exporter lives on"
    );
    let r = slow.join().unwrap().unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"slept"[..]));
    // Once the last worker is gone the exporter stops and the master exits.
    assert!(
        wait_until(Duration::from_secs(10), || http(
            s.metrics,
            "GET",
            "/readyz",
            &[],
            b""
        )
        .is_err()),
        "the metrics listener stays open; log:\n{}",
        s.log()
    );
    let status = s.wait_exit(Duration::from_secs(10)).expect("master exits");
    assert!(status.success(), "{status:?}; log:\n{}", s.log());
}
