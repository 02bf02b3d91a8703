//! What distinguishes the worker types: keep-alive and pipelining, thread
//! pools running blocking requests at once, connection caps of the async
//! workers, load spread across processes, and cargo features.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gpe_tests::*;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");

/// Worker types that keep connections alive.
const KEEPALIVE: [&str; 3] = ["thread", "eventloop", "greenlet"];

#[test]
fn keepalive_counts_exactly_over_four_connections() {
    // Both ways the event loop can wait for IO: yielding first (the default)
    // or not. A smoke test of each path; core/src/idle.rs tests that a loop
    // built with and without the setting yields or does not.
    for (worker, idle_yield) in KEEPALIVE.iter().flat_map(|w| [(*w, "true"), (*w, "false")]) {
        let s = Server::start(
            TESTAPP,
            Opts::new(worker, 2).args(&["--keepalive", "10", "--idle-yield", idle_yield]),
        );
        let addr = s.addr;
        let results = parallel(4, 1, move |_, _| {
            let mut c = KeepAlive::connect(addr).unwrap();
            (0..250)
                .map(|i| {
                    let path = if i % 5 == 0 { "/status/201" } else { "/" };
                    c.request("GET", path, b"").unwrap().status
                })
                .collect::<Vec<u16>>()
        });
        let statuses: Vec<u16> = results.into_iter().flatten().collect();
        assert_eq!(statuses.len(), 1000);
        assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 200);
        let m = s.scrape();
        assert_eq!(
            m.sum("gpe_http_requests_total", &[]),
            1000.0,
            "{worker}, idle_yield {idle_yield}"
        );
        assert_eq!(
            m.one(
                "gpe_http_requests_total",
                &[("route", "/status/{code}"), ("status", "201")]
            ),
            200.0
        );
        assert_eq!(
            m.sum("gpe_worker_connections_accepted_total", &[]),
            4.0,
            "{worker}: 1000 requests over exactly 4 TCP connections"
        );
    }
}

#[test]
fn idle_connections_close_after_keepalive_and_a_silent_one_is_a_timeout() {
    for worker in KEEPALIVE {
        let s = Server::start(TESTAPP, Opts::new(worker, 1).args(&["--keepalive", "1"]));
        let mut silent = KeepAlive::connect(s.addr).unwrap();
        let mut served = KeepAlive::connect(s.addr).unwrap();
        assert_eq!(served.request("GET", "/", b"").unwrap().status, 200);
        let limit = Duration::from_secs(15);
        assert!(
            silent.closed_by_server_within(limit),
            "{worker}: a connection that never sends a head is closed"
        );
        assert!(
            served.closed_by_server_within(limit),
            "{worker}: an idle keep-alive connection is closed"
        );
        // A connection's errors are counted after its socket closes and
        // before its gauge goes down: wait for the gauge, then read.
        s.wait_for("gpe_worker_connections", &[], 0.0);
        let m = s.scrape();
        let timeouts = m.one(
            "gpe_http_errors_total",
            &[
                ("method", "unknown"),
                ("route", "unknown"),
                ("kind", "timeout"),
            ],
        );
        assert_eq!(timeouts, 1.0, "{worker}: only the silent connection");
        assert_eq!(m.sum("gpe_http_errors_total", &[]), 1.0, "{worker}");
        assert_eq!(m.sum("gpe_http_requests_total", &[]), 1.0, "{worker}");
    }
}

#[test]
fn pipelined_responses_come_in_request_order() {
    for worker in KEEPALIVE {
        let s = Server::start(TESTAPP, Opts::new(worker, 1));
        let mut c = KeepAlive::connect(s.addr).unwrap();
        let paths = [
            "/status/201",
            "/sleep/50",
            "/status/202",
            "/bytes/7",
            "/status/203",
        ];
        let resps = c.pipeline(&paths).unwrap();
        let statuses: Vec<u16> = resps.iter().map(|r| r.status).collect();
        assert_eq!(statuses, vec![201, 200, 202, 200, 203], "{worker}");
        assert_eq!(resps[1].body, b"slept");
        assert_eq!(resps[3].body, b"xxxxxxx");
        let m = s.scrape();
        assert_eq!(m.sum("gpe_http_requests_total", &[]), 5.0);
        assert_eq!(m.sum("gpe_worker_connections_accepted_total", &[]), 1.0);
        assert_eq!(m.one("gpe_worker_connections", &[]), 1.0);
    }
}

#[test]
fn draining_worker_answers_connection_close() {
    for worker in KEEPALIVE {
        let s = Server::start(TESTAPP, Opts::new(worker, 1).args(&["--max-requests", "3"]));
        let mut c = KeepAlive::connect(s.addr).unwrap();
        let r1 = c.request("GET", "/", b"").unwrap();
        let r2 = c.request("GET", "/", b"").unwrap();
        let r3 = c.request("GET", "/", b"").unwrap();
        assert_eq!(r1.header("connection"), None, "{worker}");
        assert_eq!(r2.header("connection"), None, "{worker}");
        assert_eq!(
            r3.header("connection"),
            Some("close"),
            "{worker}: the recycling worker closes politely"
        );
        // The recycled worker is counted once the master has reaped it.
        s.wait_for(
            "gpe_master_worker_exits_total",
            &[("reason", "max_requests")],
            1.0,
        );
        s.wait_ready(1);
    }
}

#[test]
fn thread_pool_runs_blocking_requests_at_once() {
    let s = Server::start(TESTAPP, Opts::new("thread", 2).args(&["--threads", "4"]));
    let addr = s.addr;
    let clients =
        std::thread::spawn(move || parallel(8, 1, move |_, _| get(addr, "/sleep/1000").status));
    let all_in_flight = wait_until(Duration::from_secs(5), || {
        s.scrape().one("gpe_http_requests_in_flight", &[]) == 8.0
    });
    assert!(
        all_in_flight,
        "8 requests in flight at once on 2 workers x 4 threads"
    );
    assert_eq!(
        s.scrape()
            .samples("gpe_worker_state")
            .iter()
            .filter(|(l, v)| l["state"] == "busy" && *v == 1.0)
            .count(),
        2
    );
    let statuses = clients.join().unwrap();
    assert_eq!(statuses, vec![200; 8]);
    assert_eq!(s.scrape().one("gpe_http_requests_in_flight", &[]), 0.0);
}

#[test]
fn async_workers_hold_500_idle_connections_and_serve() {
    for worker in ["eventloop", "greenlet"] {
        let s = Server::start(TESTAPP, Opts::new(worker, 1).args(&["--keepalive", "60"]));
        let mut idle: Vec<KeepAlive> = (0..500)
            .map(|_| KeepAlive::connect(s.addr).unwrap())
            .collect();
        // Each idle connection did one request so the worker has surely accepted it.
        for c in idle.iter_mut() {
            assert_eq!(c.request("GET", "/", b"").unwrap().status, 200);
        }
        assert_eq!(get(s.addr, "/status/204").status, 204, "{worker}");
        // The one-shot connection of that request closes after its response
        // has reached us; wait (bounded) for the worker to have counted that.
        s.wait_for("gpe_worker_connections", &[], 500.0);
        assert_eq!(s.scrape().sum("gpe_http_requests_total", &[]), 501.0);
        drop(idle);
    }
}

#[test]
fn async_worker_connections_cap_waits_instead_of_refusing() {
    for worker in ["eventloop", "greenlet"] {
        let s = Server::start(
            TESTAPP,
            Opts::new(worker, 1).args(&["--worker-connections", "50", "--keepalive", "60"]),
        );
        let mut held: Vec<KeepAlive> = (0..50)
            .map(|_| {
                let mut c = KeepAlive::connect(s.addr).unwrap();
                assert_eq!(c.request("GET", "/", b"").unwrap().status, 200);
                c
            })
            .collect();
        let addr = s.addr;
        let waiting = std::thread::spawn(move || get(addr, "/status/202").status);
        std::thread::sleep(Duration::from_millis(500));
        assert!(!waiting.is_finished(), "{worker}: the 51st client waits");
        let m = s.scrape();
        assert_eq!(m.one("gpe_worker_connections", &[]), 50.0, "{worker}");
        held.truncate(49);
        assert_eq!(waiting.join().unwrap(), 202, "{worker}: then it is served");
        drop(held);
    }
}

#[test]
fn load_spreads_over_workers() {
    for worker in KEEPALIVE {
        let s = Server::start(TESTAPP, Opts::new(worker, 2).args(&["--keepalive", "10"]));
        let addr = s.addr;
        parallel(16, 1, move |_, _| {
            let mut c = KeepAlive::connect(addr).unwrap();
            for _ in 0..200 {
                assert_eq!(c.request("GET", "/", b"").unwrap().status, 200);
            }
        });
        let m = s.scrape();
        let split: Vec<f64> = m
            .samples("gpe_worker_requests_total")
            .iter()
            .map(|(_, v)| *v)
            .collect();
        println!("{worker}: per-worker split of 3200 keep-alive requests: {split:?}");
        assert_eq!(split.iter().sum::<f64>(), 3200.0);
        assert_eq!(split.len(), 2);
        for v in &split {
            assert!(
                *v >= 800.0,
                "{worker}: each worker serves at least 25%: {split:?}"
            );
        }
    }
}

#[test]
fn client_leaving_mid_request_is_not_left_in_flight() {
    use std::io::Write;
    for worker in KEEPALIVE {
        let s = Server::start(TESTAPP, Opts::new(worker, 1));
        let mut c = std::net::TcpStream::connect(s.addr).unwrap();
        // Mid-body: a FIN after a whole request would be a half-close, and
        // that request is answered.
        c.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            .unwrap();
        assert!(wait_until(Duration::from_secs(5), || {
            s.scrape().one("gpe_http_requests_in_flight", &[]) == 1.0
        }));
        drop(c);
        let settled = wait_until(Duration::from_secs(5), || {
            let m = s.scrape();
            m.one("gpe_http_requests_in_flight", &[]) == 0.0
                && m.one("gpe_worker_state", &[("state", "idle")]) == 1.0
        });
        assert!(settled, "{worker}: the abandoned request leaves in-flight");
        let m = s.scrape();
        assert_eq!(
            m.one(
                "gpe_http_errors_total",
                &[("route", "unmatched"), ("kind", "client_disconnect")]
            ),
            1.0,
            "{worker}"
        );
        // The app's answer to the cut body (400 from `gpe::blocking`) is
        // counted, with the disconnect as its error.
        assert_eq!(m.sum("gpe_http_requests_total", &[]), 1.0, "{worker}");
        assert_eq!(
            m.sum("gpe_http_requests_total", &[("status", "400")]),
            1.0,
            "{worker}"
        );
        assert_eq!(get(s.addr, "/").status, 200);
    }
}
