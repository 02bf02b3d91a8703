//! Black-box tests of slow and silent clients: connections that send nothing
//! or trickle their head never hold a worker, and are closed and counted
//! once `header_timeout` has passed.
#![allow(clippy::unwrap_used)]

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpe_tests::*;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");

const SILENT: usize = 500;
const TRICKLING: usize = 64;
/// Long enough that opening 564 connections and scraping them all, on a
/// loaded 2-core host, ends well before the first of them is due.
const HEADER_TIMEOUT: Duration = Duration::from_secs(6);
/// How late after its deadline a loaded host may close a connection.
const CLOSE_SLACK: Duration = Duration::from_secs(3);

per_worker!(silent_and_trickling_clients_hold_no_worker);

/// Raises this process's soft fd limit (inherited by the server it starts)
/// so that the test's connections and the server's fit.
fn raise_fd_limit(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < want {
        setrlimit(Resource::RLIMIT_NOFILE, want.min(hard), hard).unwrap();
    }
}

/// Whether the server has closed `c` (an EOF or a reset), without waiting.
fn closed(mut c: &TcpStream) -> bool {
    let mut b = [0u8; 16];
    match c.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted),
    }
}

fn silent_and_trickling_clients_hold_no_worker(worker: &str) {
    raise_fd_limit(8192);
    let secs = HEADER_TIMEOUT.as_secs().to_string();
    let s = Server::start(
        TESTAPP,
        Opts::new(worker, 2).args(&["--header-timeout", &secs]),
    );
    let opened = Instant::now();
    let mut conns: Vec<TcpStream> = (0..SILENT + TRICKLING)
        .map(|_| TcpStream::connect(s.addr).unwrap())
        .collect();
    let last_opened = Instant::now();
    for c in &conns {
        c.set_nonblocking(true).unwrap();
    }
    // The tricklers send one byte of a head every 500 ms, never its end.
    let stop = Arc::new(AtomicBool::new(false));
    let tricklers: Vec<TcpStream> = conns[SILENT..]
        .iter()
        .map(|c| c.try_clone().unwrap())
        .collect();
    let trickle = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let head = b"GET /trickle HTTP/1.1\r\nHost: x\r\nX-Slow: ";
            let mut tricklers = tricklers;
            let deadline = Instant::now() + HEADER_TIMEOUT * 3;
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let b = head.get(i).copied().unwrap_or(b'a');
                for c in &mut tricklers {
                    // A closed connection refuses the write: that is expected.
                    let _ = c.write(&[b]);
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    // Every connection is accepted and held open by the workers.
    let all = (SILENT + TRICKLING) as f64;
    let mut seen = 0.0;
    // Only until the first are due: after that they close, as they should.
    let due = (opened + HEADER_TIMEOUT - Duration::from_millis(500))
        .saturating_duration_since(Instant::now());
    let held = wait_until(due, || {
        seen = s
            .try_scrape()
            .map_or(0.0, |m| m.sum("gpe_worker_connections", &[]));
        seen >= all
    });
    assert!(held, "{worker}: {seen} of {all} connections open");
    // A normal request is still answered within 1 s, several times over.
    for _ in 0..5 {
        let start = Instant::now();
        let r = get(s.addr, "/");
        let took = start.elapsed();
        assert_eq!(r.status, 200, "{worker}");
        assert!(
            took < Duration::from_secs(1),
            "{worker}: answered in {took:?}"
        );
    }
    // None is closed before its head is due...
    let early = opened + HEADER_TIMEOUT - Duration::from_millis(500);
    if Instant::now() < early {
        let open = conns.iter().filter(|c| !closed(c)).count();
        assert_eq!(open, SILENT + TRICKLING, "{worker}: closed early");
    }
    // ...and all are closed soon after it.
    let mut left = conns.len();
    let shut = wait_until(
        (last_opened + HEADER_TIMEOUT + CLOSE_SLACK).saturating_duration_since(Instant::now()),
        || {
            conns.retain(|c| !closed(c));
            left = conns.len();
            left == 0
        },
    );
    stop.store(true, Ordering::Relaxed);
    trickle.join().unwrap();
    assert!(
        shut,
        "{worker}: {left} connections still open after header_timeout + {CLOSE_SLACK:?}"
    );
    assert!(
        opened.elapsed() >= HEADER_TIMEOUT - Duration::from_millis(500),
        "{worker}: closed before header_timeout"
    );
    // Each counted once as a timeout, with no request; the normal requests
    // counted exactly.
    wait_sum(&s, "gpe_http_errors_total", &[("kind", "timeout")], all);
    let m = s.scrape();
    assert_eq!(m.sum("gpe_http_errors_total", &[]), all, "{worker}");
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 5.0, "{worker}");
    assert_eq!(m.sum("gpe_worker_connections", &[]), 0.0, "{worker}");
}

per_worker!(the_head_budget_bounds_a_connection);

/// A request with `fields` header lines of `len` bytes each (with CRLF).
fn head_of(fields: usize, len: usize) -> Vec<u8> {
    let mut h = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".to_vec();
    for i in 0..fields {
        let name = format!("X-{i:03}: ");
        h.extend_from_slice(name.as_bytes());
        h.extend(std::iter::repeat_n(b'v', len - name.len() - 2));
        h.extend_from_slice(b"\r\n");
    }
    h.extend_from_slice(b"\r\n");
    h
}

/// Sends `raw` on a new connection; the status of the answer, if one came.
fn status_for(addr: std::net::SocketAddr, raw: &[u8]) -> Option<u16> {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(raw).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn the_head_budget_bounds_a_connection(worker: &str) {
    let s = Server::start(TESTAPP, Opts::new(worker, 1));
    let pid = s.worker_pids()["0"];
    // Every line within limit_request_field_size (8,190); in all under and
    // over the default head budget of 65,536 bytes.
    let under = head_of(8, 8000);
    let over = head_of(9, 8000);
    assert!(under.len() < 65_536 && over.len() > 65_536);
    for _ in 0..3 {
        assert_eq!(
            status_for(s.addr, &under),
            Some(200),
            "{worker}: under the budget"
        );
        assert_eq!(
            status_for(s.addr, &over),
            Some(431),
            "{worker}: over the budget"
        );
    }
    // Refused by hyper while reading (method and route `unknown`) or by gpe
    // once parsed (route `unknown`, counted as a 431 request): three in all.
    wait_sum(&s, "gpe_http_errors_total", &[("kind", "bad_request")], 3.0);
    let m = s.scrape();
    assert_eq!(m.sum("gpe_http_errors_total", &[("route", "unknown")]), 3.0);
    assert_eq!(m.sum("gpe_http_errors_total", &[]), 3.0, "{worker}");
    assert_eq!(
        m.sum("gpe_http_requests_total", &[("status", "200")]),
        3.0,
        "{worker}"
    );
    assert_eq!(s.worker_pids()["0"], pid, "{worker}: the worker lives on");
}

/// The keep-alive types.
const KEEPALIVE: [&str; 3] = ["thread", "eventloop", "greenlet"];

#[test]
fn the_idle_and_head_deadlines_are_kept_apart() {
    for worker in KEEPALIVE {
        let s = Server::start(
            TESTAPP,
            Opts::new(worker, 1).args(&["--keepalive", "1", "--header-timeout", "3"]),
        );
        let mut silent = KeepAlive::connect(s.addr).unwrap();
        let opened = Instant::now();
        let mut idle = KeepAlive::connect(s.addr).unwrap();
        let mut begun = KeepAlive::connect(s.addr).unwrap();
        assert_eq!(idle.request("GET", "/", b"").unwrap().status, 200);
        let idle_since = Instant::now();
        assert_eq!(begun.request("GET", "/", b"").unwrap().status, 200);
        // The next head begins and stalls.
        begun.send_raw(b"GET / HT").unwrap();
        let begun_at = Instant::now();
        let limit = Duration::from_secs(10);
        // Idle: closed after keepalive (1 s), long before header_timeout.
        assert!(idle.closed_by_server_within(limit), "{worker}: idle");
        let took = idle_since.elapsed();
        assert!(
            took >= Duration::from_millis(800) && took < Duration::from_millis(2500),
            "{worker}: idle keep-alive closed after {took:?}"
        );
        // A head that began, and a fresh silent connection: header_timeout.
        assert!(begun.closed_by_server_within(limit), "{worker}: begun");
        let took = begun_at.elapsed();
        assert!(
            took >= Duration::from_millis(2500) && took < Duration::from_millis(4500),
            "{worker}: a stalled keep-alive head closed after {took:?}"
        );
        assert!(silent.closed_by_server_within(limit), "{worker}: silent");
        let took = opened.elapsed();
        assert!(
            took >= Duration::from_millis(2500) && took < Duration::from_millis(4500),
            "{worker}: a silent connection closed after {took:?}"
        );
        s.wait_for("gpe_worker_connections", &[], 0.0);
        let m = s.scrape();
        assert_eq!(
            m.sum("gpe_http_errors_total", &[("kind", "timeout")]),
            2.0,
            "{worker}: the stalled head and the silent connection"
        );
        assert_eq!(m.sum("gpe_http_errors_total", &[]), 2.0, "{worker}");
        assert_eq!(m.sum("gpe_http_requests_total", &[]), 2.0, "{worker}");
    }
}
