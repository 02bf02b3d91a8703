//! Black-box tests of the exporter under abuse: held at its fd limit, flooded
//! with idle connections, fed slow heads and large bodies.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use gpe_tests::*;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");

/// The exporter's default header timeout.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// The exporter's default connection cap.
const MAX_CONNECTIONS: usize = 64;

fn start() -> Server {
    Server::start(TESTAPP, Opts::new("sync", 1))
}

/// Children of `pid` (from `/proc/<pid>/task/<pid>/children`).
fn children_of(pid: i32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The pid of the server's exporter: the master's child that is no worker.
fn exporter_pid(s: &Server) -> i32 {
    let workers: Vec<i32> = s.worker_pids().values().copied().collect();
    children_of(s.pid().as_raw())
        .into_iter()
        .find(|p| !workers.contains(p))
        .expect("the exporter is a child of the master")
}

/// The fd numbers `pid` has open.
fn fds_of(pid: i32) -> Vec<i32> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// User plus system CPU time of `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with the last ')': state is
    // field 3, utime 14 and stime 15.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    rest[11].parse::<u64>().unwrap() + rest[12].parse::<u64>().unwrap()
}

/// Raises this process' soft fd limit to its hard limit.
fn raise_own_fd_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

/// Clients waiting in the accept queue of the loopback listener on `port`
/// (the `rx_queue` of its LISTEN line in `/proc/net/tcp`).
fn accept_queue(port: u16) -> Option<u32> {
    let local = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp")
        .ok()?
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 4 && f[1] == local && f[3] == "0A")
        .and_then(|f| u32::from_str_radix(f[4].split_once(':')?.1, 16).ok())
}

/// Whether the peer has closed `s` by `deadline` (end of stream or reset,
/// with nothing sent before).
fn closed_by(s: &mut TcpStream, deadline: Instant) -> bool {
    let wait = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(wait)).unwrap();
    let mut byte = [0u8; 1];
    match s.read(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    }
}

/// Writes `request` on a new connection to `addr` and reads the status line,
/// the head and everything up to the server's close.
fn exchange(addr: SocketAddr, request: &[u8]) -> (u16, Vec<String>, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut r = BufReader::new(s);
    let mut head = Vec::new();
    loop {
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let line = line.trim_end().to_owned();
        if line.is_empty() {
            break;
        }
        head.push(line);
    }
    let status = head[0].split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    (status, head, rest)
}

#[test]
fn exporter_at_its_fd_limit_backs_off_without_spinning_and_recovers() {
    let s = start();
    let pid = exporter_pid(&s);
    // New fds take the lowest free numbers below the limit: leave room for
    // exactly `ROOM` more, so that further connections stay queued with
    // accept(2) failing EMFILE. (Fds above the limit stay open.)
    const ROOM: usize = 6;
    let fds = fds_of(pid);
    let limit = (0..)
        .find(|l| *l as usize - fds.iter().filter(|f| *f < l).count() == ROOM)
        .unwrap();
    let full = || (0..limit).all(|n| fds_of(pid).contains(&n));
    let out = std::process::Command::new("prlimit")
        .args([
            "--pid",
            &pid.to_string(),
            &format!("--nofile={limit}:{limit}"),
        ])
        .output()
        .expect("prlimit (util-linux) runs");
    assert!(out.status.success(), "{out:?}");

    let conns: Vec<TcpStream> = (0..ROOM + 4)
        .map(|_| TcpStream::connect(s.metrics).unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(5), full),
        "the exporter fills its fd table below {limit}: {:?}",
        fds_of(pid)
    );
    let exhausted = "exporter: accept: Too many open files (os error 24); pausing 100 ms";
    assert!(
        wait_until(Duration::from_secs(2), || s.log().contains(exhausted)),
        "log:\n{}",
        s.log()
    );

    // A measurement window, not a wait for a condition.
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    std::thread::sleep(Duration::from_secs(2));
    let (window, used) = (t0.elapsed(), cpu_ticks(pid) - c0);
    let tick = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .unwrap()
        .unwrap() as f64;
    let share = used as f64 / tick / window.as_secs_f64();
    assert!(full(), "still at the limit");
    assert!(
        share < 0.10,
        "the exporter used {:.1}% of a core",
        share * 100.0
    );
    assert_eq!(
        s.log().matches(exhausted).count(),
        1,
        "logged once per episode, not per retry; log:\n{}",
        s.log()
    );

    drop(conns);
    let t = Instant::now();
    let r = http(s.metrics, "GET", "/metrics", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "answered {:?} after fds freed up",
        t.elapsed()
    );
    assert!(
        wait_until(Duration::from_secs(1), || s
            .log()
            .contains("exporter: accepting again after")),
        "the end of the episode is logged; log:\n{}",
        s.log()
    );
}

#[test]
fn two_thousand_idle_connections_leave_a_scrape_answered_within_1s() {
    assert!(raise_own_fd_limit() >= 2_200, "2,000 sockets fit");
    let s = start();
    let pid = exporter_pid(&s);
    let base = fds_of(pid).len();
    let mut most = 0;
    let mut idle: Vec<(Instant, TcpStream)> = Vec::with_capacity(2_000);
    let flood = Instant::now();
    for i in 0..2_000 {
        assert!(
            flood.elapsed() < Duration::from_secs(60),
            "the exporter absorbs the flood: {i} connections in 60 s"
        );
        // A flood outpaces the exporter's accept loop now and then; a client
        // that finds the backlog full retries its SYN after 1 s, 3 s, ...
        let c = TcpStream::connect_timeout(&s.metrics, Duration::from_secs(30)).unwrap();
        idle.push((Instant::now(), c));
        if i % 50 == 0 {
            most = most.max(fds_of(pid).len());
        }
    }
    // The last clients of the flood may still queue for the accept loop,
    // and a SYN that finds the queue full is retried only after 1 s.
    assert!(
        wait_until(Duration::from_secs(10), || accept_queue(s.metrics.port())
            == Some(0)),
        "the exporter drains its backlog: {:?} waiting",
        accept_queue(s.metrics.port())
    );
    let t = Instant::now();
    let r = http(s.metrics, "GET", "/metrics", &[], b"").unwrap();
    let took = t.elapsed();
    assert_eq!(r.status, 200);
    assert!(took < Duration::from_secs(1), "answered in {took:?}");
    assert!(
        most <= base + MAX_CONNECTIONS,
        "at most {MAX_CONNECTIONS} connections open: {most} fds against {base} before"
    );
    for (i, (opened, c)) in idle.iter_mut().enumerate() {
        assert!(
            closed_by(c, *opened + HEADER_TIMEOUT + Duration::from_secs(1)),
            "idle connection {i} closed within the header timeout + 1 s"
        );
    }
    assert_eq!(r.status, get(s.metrics, "/metrics").status);
}

#[test]
fn slow_heads_and_idle_keep_alive_connections_close_after_the_header_timeout() {
    let s = start();
    let mut keep = KeepAlive::connect(s.metrics).unwrap();
    assert_eq!(keep.request("GET", "/metrics", b"").unwrap().status, 200);
    let idle_since = Instant::now();

    let mut slow = TcpStream::connect(s.metrics).unwrap();
    let slow_since = Instant::now();
    let mut writer = slow.try_clone().unwrap();
    let trickle = std::thread::spawn(move || {
        // Two bytes a second: the 37-byte head would take 18 s.
        for b in b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" {
            if writer.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let silent = TcpStream::connect(s.metrics).unwrap();
    let silent_since = Instant::now();

    let bound = HEADER_TIMEOUT + Duration::from_secs(1);
    assert!(keep.closed_by_server_within(bound));
    let keep_after = idle_since.elapsed();
    assert!(closed_by(&mut slow, slow_since + bound));
    let slow_after = slow_since.elapsed();
    let mut silent = silent;
    assert!(closed_by(&mut silent, silent_since + bound));
    let silent_after = silent_since.elapsed();
    for (what, after) in [
        ("idle keep-alive", keep_after),
        ("trickling", slow_after),
        ("silent", silent_after),
    ] {
        assert!(
            after >= HEADER_TIMEOUT - Duration::from_millis(500) && after <= bound,
            "the {what} connection closed after {after:?}"
        );
    }
    trickle.join().unwrap();
    assert_eq!(get(s.metrics, "/metrics").status, 200);
}

#[test]
fn a_large_body_on_metrics_gets_413() {
    let s = start();
    // Refused on its Content-Length, before the body is read.
    let mut req = b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n".to_vec();
    req.extend_from_slice(&[b'x'; 1024]);
    let (status, head, _) = exchange(s.metrics, &req);
    assert_eq!(status, 413);
    assert!(
        head.iter()
            .any(|h| h.eq_ignore_ascii_case("connection: close")),
        "{head:?}"
    );

    // A chunked body is refused once it passes 4 KiB.
    let mut req =
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1388\r\n".to_vec();
    req.extend_from_slice(&[b'x'; 5000]);
    req.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_eq!(exchange(s.metrics, &req).0, 413);

    // At the limit the body is read and the method decides.
    let r = http(s.metrics, "POST", "/metrics", &[], &[b'x'; 4096]).unwrap();
    assert_eq!(r.status, 405);
    let r = http(s.metrics, "POST", "/metrics", &[], &[b'x'; 4097]).unwrap();
    assert_eq!(r.status, 413);
    let r = http(s.metrics, "GET", "/metrics", &[], &[b'x'; 100]).unwrap();
    assert_eq!(r.status, 200);
    assert!(String::from_utf8_lossy(&r.body).contains("gpe_build_info"));
}
