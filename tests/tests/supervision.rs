//! Supervision under stress: heartbeat timeouts, recycling, reload storms,
//! binary upgrade, socket activation, sd_notify, chaos and SIGCHLD storms, boot
//! failures. Real processes and signals; every test runs for each worker type.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpe_tests::*;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");
/// The `gpe` command line.
const GPE: &str = env!("CARGO_BIN_EXE_gpe-bin");

per_worker!(
    max_requests_recycles_without_failures,
    hup_storm_drops_nothing,
    usr2_upgrade_then_quit_drops_nothing,
    chaos_kills_keep_counters_monotonic,
    sigchld_storm_keeps_the_master_responsive,
    socket_activation_overrides_bind,
    sd_notify_reports_ready_reloading_stopping,
    failing_app_factory_stops_the_server,
);

fn max_requests_recycles_without_failures(worker: &str) {
    let s = Server::start(
        TESTAPP,
        Opts::new(worker, 2).args(&["--max-requests", "50", "--max-requests-jitter", "10"]),
    );
    let addr = s.addr;
    let results = parallel(4, 500, move |_, _| {
        http(addr, "GET", "/", &[], b"").map(|r| r.status)
    });
    let failed = results.iter().filter(|r| !matches!(r, Ok(200))).count();
    assert_eq!(failed, 0, "no request failed while workers recycled");
    s.wait_ready(2);
    let m = s.scrape();
    let recycled = m.one(
        "gpe_master_worker_exits_total",
        &[("reason", "max_requests")],
    );
    println!("{worker}: {recycled} recycles for 2000 requests");
    assert!(recycled >= 30.0, "at least 30 recycles, saw {recycled}");
    assert_eq!(
        m.sum("gpe_http_requests_total", &[]),
        2000.0,
        "totals exact"
    );
    assert_eq!(m.sum("gpe_worker_requests_total", &[]), 2000.0);
    assert_eq!(
        m.one("gpe_master_worker_exits_total", &[("reason", "crash")]),
        0.0
    );
}

fn hup_storm_drops_nothing(worker: &str) {
    let s = Server::start(TESTAPP, Opts::new(worker, 2));
    let load = Load::start(s.addr, 8, "/");
    let mut hups = 0;
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        s.signal(Signal::SIGHUP);
        hups += 1;
        // Two HUPs pending at once are one signal to the kernel; send the next
        // only after the master took this one.
        let want = f64::from(hups);
        assert!(wait_until(Duration::from_secs(5), || s
            .try_scrape()
            .is_ok_and(|m| {
                m.one("gpe_master_signals_total", &[("signal", "HUP")]) == want
            })));
    }
    s.wait_ready(2);
    let (ok, failed) = load.finish();
    assert!(ok > 0);
    assert_eq!(failed, 0, "{failed} requests failed during {hups} reloads");
    let m = s.scrape();
    assert_eq!(
        m.one("gpe_master_signals_total", &[("signal", "HUP")]),
        f64::from(hups)
    );
    assert_eq!(m.sum("gpe_http_requests_total", &[]), ok as f64);
}

fn usr2_upgrade_then_quit_drops_nothing(worker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("gpe.pid");
    let mut s = Server::start(
        TESTAPP,
        Opts::new(worker, 2).args(&["--pidfile", pidfile.to_str().unwrap()]),
    );
    let old = s.pid().as_raw();
    let load = Load::start(s.addr, 8, "/");
    assert!(wait_until(Duration::from_secs(10), || load.ok() >= 20));
    s.signal(Signal::SIGUSR2);
    let pid2 = {
        let mut p = PathBuf::from(pidfile.clone().into_os_string());
        p.set_extension("pid.2");
        p
    };
    let mut new_pid = 0;
    assert!(
        wait_until(Duration::from_secs(15), || {
            new_pid = std::fs::read_to_string(&pid2)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            new_pid > 0
        }),
        "the new master writes {}; log:\n{}",
        pid2.display(),
        s.log()
    );
    // Wait until the new master's workers serve: they count into its own store
    // (`METRICS_DIR.<pid>`), read here through a sidecar exporter.
    let new_store = format!("{}.{new_pid}", s.metrics_dir().display());
    let sidecar_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let sidecar = std::process::Command::new(GPE)
        .args(["exporter", "--metrics-dir", &new_store])
        .args(["--metrics-bind", &sidecar_addr.to_string()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .map(KillChild)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(15), || {
            http(sidecar_addr, "GET", "/metrics", &[], b"").is_ok_and(|r| {
                Metrics::parse(&String::from_utf8_lossy(&r.body))
                    .sum("gpe_http_requests_total", &[])
                    > 0.0
            })
        }),
        "the new master's workers serve; log:\n{}",
        s.log()
    );
    drop(sidecar);
    s.signal(Signal::SIGQUIT);
    let status = s
        .wait_exit(Duration::from_secs(15))
        .expect("old master exits");
    assert_eq!(status.code(), Some(0));
    assert!(
        wait_until(Duration::from_secs(10), || std::fs::read_to_string(
            &pidfile
        )
        .is_ok_and(|t| t.trim() == new_pid.to_string())),
        "the pid file ends up holding the new master's pid"
    );
    let new = Pid::from_raw(new_pid);
    let _guard = KillOnDrop::new(new);
    // The new master serves and its exporter answers on the same port.
    let served_before = load.ok();
    assert!(wait_until(Duration::from_secs(10), || load.ok() > served_before + 20));
    let mut m = None;
    assert!(wait_until(Duration::from_secs(10), || {
        m = s.try_scrape().ok().filter(|m| {
            m.samples("gpe_worker_info").len() == 2 && m.one("gpe_master_workers", &[]) == 2.0
        });
        m.is_some()
    }));
    let (ok, failed) = load.finish();
    assert!(ok > 0);
    assert_eq!(failed, 0, "no request failed across the upgrade");
    let m = s.scrape();
    let served_by_new = m.sum("gpe_http_requests_total", &[]);
    assert!(served_by_new > 0.0 && served_by_new <= ok as f64);
    let pids: Vec<i32> = s.worker_pids().values().copied().collect();
    assert!(
        pids.iter().all(|p| ppid_of(*p) == Some(new_pid)),
        "workers belong to the new master"
    );
    assert_ne!(new_pid, old);
    nix::sys::signal::kill(new, Signal::SIGTERM).unwrap();
    assert!(wait_until(Duration::from_secs(15), || !alive(new_pid)));
    assert!(!pidfile.exists());
}

use std::path::PathBuf;

/// Stops a process on drop: QUIT, then KILL after 5 s. Known by start time
/// too, so that once it has exited its pid (which another process of this
/// shared host may get) is never signalled.
struct KillOnDrop(Option<Process>);

impl KillOnDrop {
    fn new(pid: Pid) -> KillOnDrop {
        KillOnDrop(Process::of(pid.as_raw()))
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            if p.signal(Signal::SIGQUIT) {
                wait_until(Duration::from_secs(5), || !p.signal(Signal::SIGCONT));
                p.signal(Signal::SIGKILL);
            }
        }
    }
}

/// A child process killed and reaped on drop.
struct KillChild(std::process::Child);

impl Drop for KillChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ppid_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')')
        .next()?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Counter-like samples: names ending in _total, _count, _sum or _bucket.
fn counters(m: &Metrics) -> Vec<(String, f64)> {
    m.samples
        .iter()
        .filter(|(n, _, _)| {
            n.ends_with("_total")
                || n.ends_with("_count")
                || n.ends_with("_sum")
                || n.ends_with("_bucket")
        })
        .map(|(n, l, v)| (format!("{n}{l:?}"), *v))
        .collect()
}

fn chaos_kills_keep_counters_monotonic(worker: &str) {
    let s = Server::start(TESTAPP, Opts::new(worker, 2));
    let load = Load::start(s.addr, 8, "/");
    let scraping = Arc::new(AtomicBool::new(true));
    let scraper = {
        let scraping = scraping.clone();
        let metrics = s.metrics;
        std::thread::spawn(move || {
            let mut last: std::collections::BTreeMap<String, f64> = Default::default();
            let mut scrapes = 0;
            let mut violations = Vec::new();
            let mut failures = Vec::new();
            while scraping.load(Ordering::Relaxed) {
                match http(metrics, "GET", "/metrics", &[], b"") {
                    Ok(r) if r.status == 200 => {
                        scrapes += 1;
                        let m = Metrics::parse(&String::from_utf8_lossy(&r.body));
                        for (k, v) in counters(&m) {
                            if let Some(prev) = last.get(&k) {
                                if v < *prev {
                                    violations.push(format!("{k}: {prev} -> {v}"));
                                }
                            }
                            last.insert(k, v);
                        }
                    }
                    Ok(r) => failures.push(format!(
                        "{} {}",
                        r.status,
                        String::from_utf8_lossy(&r.body).trim()
                    )),
                    Err(e) => failures.push(e.to_string()),
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (scrapes, failures, violations)
        })
    };
    let mut kills = 0u64;
    let mut killed = std::collections::HashSet::new();
    let mut progress = Vec::new();
    let end = Instant::now() + Duration::from_secs(20);
    let mut last_ok = 0;
    let mut tick = Instant::now();
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(200));
        let pids: Vec<i32> = s
            .try_scrape()
            .map(|m| {
                m.samples("gpe_worker_info")
                    .iter()
                    .map(|(l, _)| l["pid"].parse().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        if let Some(pid) = pids.get(rand::random_range(0..pids.len().max(1))) {
            // A worker killed a moment ago may still be listed (exiting, or a
            // zombie not yet reaped); killing it again would count a death twice.
            // Its pid may even name another process of this shared host by
            // now: only a live child of this master is signalled.
            if alive(*pid)
                && killed.insert(*pid)
                && signal_child(s.pid().as_raw(), *pid, Signal::SIGKILL)
            {
                kills += 1;
            }
        }
        if tick.elapsed() >= Duration::from_secs(2) {
            let now = load.ok();
            progress.push(now - last_ok);
            last_ok = now;
            tick = Instant::now();
        }
    }
    s.wait_ready(2);
    // The last killed worker may still wait to be reaped, and only then counted.
    s.wait_for(
        "gpe_master_worker_exits_total",
        &[("reason", "crash")],
        kills as f64,
    );
    let (ok, failed) = load.finish();
    scraping.store(false, Ordering::Relaxed);
    let (scrapes, scrape_failures, violations) = scraper.join().unwrap();
    let m = s.scrape();
    let total = m.sum("gpe_http_requests_total", &[]);
    // Every attempt ended as a success or a failure once the clients joined.
    let attempts = ok + failed;
    println!(
        "{worker}: {kills} kills, {ok} ok, {failed} failed, {attempts} attempts, counted {total}, {scrapes} scrapes, progress per 2 s {progress:?}"
    );
    assert!(violations.is_empty(), "counters went down: {violations:?}");
    assert!(
        scrape_failures.is_empty(),
        "every scrape answered: {scrape_failures:?}"
    );
    assert!(scrapes > 100);
    assert!(
        progress.iter().all(|p| *p > 0),
        "the server never stopped answering: {progress:?}"
    );
    assert!(kills >= 50);
    // Only requests in flight on a killed worker may fail.
    assert!(failed <= kills * 8, "{failed} failures for {kills} kills");
    assert!(total >= (ok.saturating_sub(kills)) as f64 && total <= attempts as f64);
    assert_eq!(
        m.one("gpe_master_worker_exits_total", &[("reason", "crash")]),
        kills as f64
    );
    // The per-slot duration histograms were among the counters checked
    // above. A request is counted there just before the slot's request
    // counter, so a kill between the two leaves it at most one ahead.
    assert_eq!(
        m.samples("gpe_worker_request_duration_seconds_count").len(),
        2
    );
    let (slot_count, slot_reqs) = (
        m.sum("gpe_worker_request_duration_seconds_count", &[]),
        m.sum("gpe_worker_requests_total", &[]),
    );
    assert!(
        slot_reqs <= slot_count && slot_count <= slot_reqs + kills as f64,
        "{slot_count} in the slot histograms, {slot_reqs} requests, {kills} kills"
    );
}

fn sigchld_storm_keeps_the_master_responsive(worker: &str) {
    let s = Server::start(TESTAPP, Opts::new(worker, 4).args(&["--max-requests", "5"]));
    let shape = |m: &Metrics| -> BTreeSet<String> {
        m.samples
            .iter()
            .map(|(n, l, _)| {
                let mut l = l.clone();
                l.remove("pid");
                format!("{n}{l:?}")
            })
            .collect()
    };
    for _ in 0..8 {
        get(s.addr, "/");
    }
    s.wait_ready(4);
    let before = shape(&s.scrape());
    let load = Load::start(s.addr, 4, "/");
    let end = Instant::now() + Duration::from_secs(30);
    let mut usr1 = 0;
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1000));
        s.signal(Signal::SIGUSR1);
        usr1 += 1;
        let want = f64::from(usr1);
        assert!(
            wait_until(Duration::from_secs(5), || s.try_scrape().is_ok_and(|m| {
                m.one("gpe_master_signals_total", &[("signal", "USR1")]) == want
            })),
            "the master handles USR1 #{usr1} during the storm: {:?}; log tail:\n{}",
            s.try_scrape()
                .map(|m| m.one("gpe_master_signals_total", &[("signal", "USR1")])),
            s.log()
                .lines()
                .rev()
                .take(15)
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let (ok, failed) = load.finish();
    s.wait_ready(4);
    // A worker that served its fifth request among the last ones can still be
    // idle for a moment before it exits and its slot is refilled: wait until
    // the scrape settles on the series it had before the storm.
    let mut last = None;
    wait_until(Duration::from_secs(20), || {
        last = s.try_scrape().ok();
        last.as_ref().is_some_and(|m| shape(m) == before)
    });
    let m = last.unwrap_or_else(|| s.scrape());
    let respawns = m.one(
        "gpe_master_worker_exits_total",
        &[("reason", "max_requests")],
    );
    println!("{worker}: {respawns} respawns, {ok} ok, {failed} failed");
    assert!(respawns >= 200.0, "hundreds of respawns, saw {respawns}");
    assert_eq!(failed, 0);
    assert_eq!(m.one("gpe_master_workers", &[]), 4.0);
    let after = shape(&m);
    assert_eq!(
        before, after,
        "the scrape has the same series after the storm"
    );
}

fn socket_activation_overrides_bind(worker: &str) {
    let port = free_port();
    let ignored = free_port();
    let mport = free_port();
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("log")).unwrap();
    let mut child = std::process::Command::new("systemd-socket-activate")
        .args(["-l", &format!("127.0.0.1:{port}")])
        .arg(TESTAPP)
        .args(["-k", worker, "-w", "2"])
        .args(["--bind", &format!("127.0.0.1:{ignored}")])
        .args(["--metrics-bind", &format!("127.0.0.1:{mport}")])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate (Debian package systemd) is required");
    let pid = Pid::from_raw(child.id() as i32);
    let _guard = KillOnDrop::new(pid);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || std::net::TcpStream::connect(
            addr
        )
        .is_ok()),
        "systemd-socket-activate listens"
    );
    let r = http(addr, "GET", "/status/202", &[], b"").unwrap();
    assert_eq!(r.status, 202);
    for _ in 0..9 {
        assert_eq!(get(addr, "/").status, 200);
    }
    let other: std::net::SocketAddr = format!("127.0.0.1:{ignored}").parse().unwrap();
    assert!(
        std::net::TcpStream::connect(other).is_err(),
        "--bind is ignored under socket activation"
    );
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || http(
        metrics,
        "GET",
        "/metrics",
        &[],
        b""
    )
    .is_ok_and(|r| Metrics::parse(&String::from_utf8_lossy(&r.body))
        .sum("gpe_http_requests_total", &[])
        == 10.0)));
    nix::sys::signal::kill(pid, Signal::SIGTERM).unwrap();
    assert_eq!(child.wait().unwrap().code(), Some(0));
}

fn sd_notify_reports_ready_reloading_stopping(worker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut opts = Opts::new(worker, 2);
    opts.env
        .push(("NOTIFY_SOCKET".into(), sock_path.to_str().unwrap().into()));
    let mut s = Server::start(TESTAPP, opts);
    let recv = || {
        let mut buf = [0u8; 512];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(recv(), "READY=1\n");
    s.signal(Signal::SIGHUP);
    assert!(recv().starts_with("RELOADING=1\n"));
    assert_eq!(recv(), "READY=1\n");
    s.stop();
    assert_eq!(recv(), "STOPPING=1\n");
}

fn failing_app_factory_stops_the_server(worker: &str) {
    let marker = format!("gpe-boot-{}", rand::random::<u64>());
    let gpe_port = free_port();
    let start = Instant::now();
    let out = std::process::Command::new(TESTAPP)
        .args(["-k", worker, "-w", "2"])
        .args(["--bind", &format!("127.0.0.1:{gpe_port}")])
        .args(["--metrics-bind", &format!("127.0.0.1:{}", free_port())])
        .env("TESTAPP_BOOT_FAIL", "1")
        .env("TEST_MARKER", &marker)
        .output()
        .unwrap();
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(took <= Duration::from_secs(10), "exited in {took:?}");
    assert!(stderr.contains("failed to boot"), "{stderr}");
    assert!(
        stderr.contains("TESTAPP_BOOT_FAIL"),
        "the factory's error is shown: {stderr}"
    );
    let mut left = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() {
            if std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.windows(marker.len()).any(|w| w == marker.as_bytes()))
                && alive(pid)
            {
                left.push(pid);
            }
        }
    }
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[test]
fn live_pidfile_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("gpe.pid");
    std::fs::write(&pidfile, format!("{}\n", std::process::id())).unwrap();
    let out = std::process::Command::new(TESTAPP)
        .args(["--bind", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-bind", &format!("127.0.0.1:{}", free_port())])
        .args(["--pidfile", pidfile.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("`pidfile`"));
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        std::process::id().to_string(),
        "someone else's pid file is left alone"
    );
}
