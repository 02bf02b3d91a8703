//! `gpe top`: the live view under a real terminal (tmux: send-keys to type,
//! capture-pane to read the screen) against a real server under load, and
//! `gpe top --once` against a scrape taken at the same moment.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::Duration;

use gpe_tests::*;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");
/// The `gpe` command line.
const GPE: &str = env!("CARGO_BIN_EXE_gpe-bin");

/// A tmux server of its own (its socket in a temporary directory), one
/// window running `cmd`; the server is killed on drop, and with it
/// everything it started.
struct Tmux {
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmux {
    /// Starts `cmd` in a 120x40 window. When `cmd` exits, the pane prints
    /// `EXIT=<code>` and stays open (bounded) so the test can read it.
    fn start(cmd: &str) -> Tmux {
        let dir = tempfile::tempdir().unwrap();
        let t = Tmux {
            socket: dir.path().join("tmux"),
            _dir: dir,
        };
        let out = t.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-x",
            "120",
            "-y",
            "40",
            &format!("{cmd}; echo EXIT=$?; sleep 120"),
        ]);
        assert!(
            out.status.success(),
            "tmux new-session: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        t
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("tmux is required (Debian package `tmux`)")
    }

    /// The screen as text.
    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p"]).stdout).into_owned()
    }

    fn keys(&self, keys: &str) {
        assert!(self.run(&["send-keys", keys]).status.success());
    }

    /// Waits (up to 20 s) until the screen satisfies `f`; panics with the
    /// last screen otherwise.
    fn wait_for(&self, what: &str, mut f: impl FnMut(&str) -> bool) -> String {
        let mut last = String::new();
        let ok = wait_until(Duration::from_secs(20), || {
            last = self.screen();
            f(&last)
        });
        assert!(ok, "screen never showed {what}:\n{last}");
        last
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// One worker row as drawn: slot, pid, state, requests.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    pid: String,
    state: String,
    requests: u64,
}

const STATES: [&str; 5] = ["booting", "idle", "busy", "draining", "gone"];

/// The worker rows on the screen, by slot.
fn rows(screen: &str) -> BTreeMap<u32, Row> {
    screen
        .lines()
        .filter_map(|l| {
            // SLOT PID STATE REQ/S P50 P99 REQUESTS ...
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 7 || !STATES.contains(&f[2]) {
                return None;
            }
            Some((
                f[0].parse().ok()?,
                Row {
                    pid: f[1].to_owned(),
                    state: f[2].to_owned(),
                    requests: f[6].parse().ok()?,
                },
            ))
        })
        .collect()
}

#[test]
fn top_under_tmux_shows_rising_counts_scales_up_shows_a_crash_and_quits() {
    let s = Server::start(TESTAPP, Opts::new("sync", 4));
    let load = Load::start(s.addr, 4, "/");
    let url = format!("http://{}/metrics", s.metrics);
    let t = Tmux::start(&format!("{GPE} top {url}"));

    let first = t.wait_for("4 worker rows with states", |sc| {
        let r = rows(sc);
        r.len() == 4 && r.values().all(|w| w.state != "gone")
    });
    assert!(first.contains("(local)"), "the master is local:\n{first}");
    let first = rows(&first);
    t.wait_for("every worker's count rising", |sc| {
        let r = rows(sc);
        r.len() == 4 && first.iter().all(|(n, w)| r[n].requests > w.requests)
    });
    let (ok, failed) = load.finish();
    assert!(ok > 0 && failed == 0, "{ok} answered, {failed} failed");

    t.keys("+");
    let sc = t.wait_for("a fifth row after +", |sc| {
        rows(sc).len() == 5 && sc.contains("workers 5/5")
    });
    assert!(sc.contains("sent TTIN to master"), "{sc}");
    s.wait_for("gpe_master_signals_total", &[("signal", "TTIN")], 1.0);

    let victim = s.worker_pids()["2"];
    nix::sys::signal::kill(Pid::from_raw(victim), Signal::SIGKILL).unwrap();
    t.wait_for("the crash and the restarted slot", |sc| {
        let r = rows(sc);
        sc.contains("crash 1 ")
            && r.get(&2)
                .is_some_and(|w| w.pid != victim.to_string() && w.state == "idle")
    });

    t.keys("q");
    t.wait_for("exit status 0", |sc| sc.contains("EXIT=0"));
}

#[test]
fn top_shows_an_unreachable_url_or_a_missing_directory_and_lives_on() {
    let port = free_port();
    let t = Tmux::start(&format!("{GPE} top http://127.0.0.1:{port}/metrics"));
    t.wait_for("the connect error", |sc| {
        sc.contains("error:") && sc.contains("cannot connect")
    });
    t.keys("+");
    t.wait_for("no master to signal", |sc| {
        sc.contains("no local master to signal")
    });
    t.keys("q");
    t.wait_for("exit status 0", |sc| sc.contains("EXIT=0"));

    // A listener that never answers: the reader waits out its 3 s timeout
    // while the screen still redraws and answers keys.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = silent.local_addr().unwrap();
    let t = Tmux::start(&format!("{GPE} top http://{addr}/metrics"));
    t.wait_for("the timeout", |sc| sc.contains("no answer within 3 s"));
    t.keys("s");
    t.wait_for("the sort changed while the reader waits", |sc| {
        sc.contains("sort: req/s")
    });
    t.keys("q");
    t.wait_for("exit status 0", |sc| sc.contains("EXIT=0"));
    drop(silent);

    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("gone");
    let t = Tmux::start(&format!("{GPE} top {}", missing.display()));
    t.wait_for("the missing directory", |sc| {
        sc.contains("gone: no such directory")
    });
    t.keys("q");
    t.wait_for("exit status 0", |sc| sc.contains("EXIT=0"));

    let out = Command::new(GPE)
        .args(["top", "--once", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("gone: no such directory"));
}

/// One `--once` line: pid, state, requests, p50 and p99 (as printed).
type Line = (String, String, f64, String, String);

/// `gpe top --once SOURCE`: slot → its line.
fn once(source: &str) -> BTreeMap<String, Line> {
    once_with(&[source])
}

/// `gpe top --once ARGS...`, which must succeed: slot → its line.
fn once_with(args: &[&str]) -> BTreeMap<String, Line> {
    let out = Command::new(GPE)
        .args(["top", "--once"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines = text.lines();
    assert!(lines
        .next()
        .unwrap()
        .starts_with("# slot state pid requests"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 11, "{l}");
            assert!(
                f[0].parse::<u32>().is_ok(),
                "a line starts with its slot: {l}"
            );
            (
                f[0].to_owned(),
                (
                    f[2].to_owned(),
                    f[1].to_owned(),
                    f[3].parse().unwrap(),
                    f[9].to_owned(),
                    f[10].to_owned(),
                ),
            )
        })
        .collect()
}

/// The `q` quantile of `slot`'s `gpe_worker_request_duration_seconds` as
/// Prometheus' `histogram_quantile` computes it (linear inside the bucket,
/// the highest finite bound in `+Inf`), printed as `--once` prints it.
fn slot_quantile(m: &Metrics, slot: &str, q: f64) -> String {
    let mut b: Vec<(f64, f64)> = m
        .samples("gpe_worker_request_duration_seconds_bucket")
        .into_iter()
        .filter(|(l, _)| l["worker"] == slot)
        .map(|(l, v)| (l["le"].parse().unwrap(), v))
        .collect();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last().unwrap().1;
    if total == 0.0 {
        return "-".to_owned();
    }
    let rank = q * total;
    let (mut lo, mut below) = (0.0, 0.0);
    for (le, c) in b {
        if c >= rank {
            let v = if le == f64::INFINITY {
                lo
            } else {
                lo + (le - lo) * (rank - below) / (c - below)
            };
            return format!("{v:.6}");
        }
        (lo, below) = (le, c);
    }
    unreachable!("+Inf holds every request")
}

fn scraped(m: &Metrics) -> BTreeMap<String, Line> {
    let state = |slot: &str| {
        m.samples("gpe_worker_state")
            .into_iter()
            .find(|(l, v)| l["worker"] == slot && *v == 1.0)
            .map(|(l, _)| l["state"].clone())
            .unwrap()
    };
    m.samples("gpe_worker_info")
        .into_iter()
        .map(|(l, _)| {
            let slot = l["worker"].clone();
            let req = m.one("gpe_worker_requests_total", &[("worker", &slot)]);
            let line = (
                l["pid"].clone(),
                state(&slot),
                req,
                slot_quantile(m, &slot, 0.5),
                slot_quantile(m, &slot, 0.99),
            );
            (slot, line)
        })
        .collect()
}

#[test]
fn top_once_equals_a_scrape_taken_at_the_same_moment() {
    let s = Server::start(TESTAPP, Opts::new("sync", 4));
    let url = format!("http://{}/metrics", s.metrics);
    let dir = s.metrics_dir();

    // Under load: each slot's count lies between a scrape just before and
    // one just after.
    let load = Load::start(s.addr, 4, "/");
    assert!(wait_until(Duration::from_secs(20), || load.ok() >= 200));
    for source in [url.as_str(), dir.to_str().unwrap()] {
        let before = scraped(&s.scrape());
        let got = once(source);
        let after = scraped(&s.scrape());
        assert_eq!(got.len(), 4, "{got:?}");
        for (slot, (pid, _, n, p50, p99)) in &got {
            // A slot that has served requests has both quantiles.
            for q in [p50, p99].into_iter().filter(|_| *n > 0.0) {
                assert!(q.parse::<f64>().is_ok_and(|v| v > 0.0), "slot {slot}: {q}");
            }
            assert_eq!(pid, &before[slot].0);
            assert!(
                before[slot].2 <= *n && *n <= after[slot].2,
                "slot {slot}: {} <= {n} <= {}",
                before[slot].2,
                after[slot].2
            );
        }
    }
    let (ok, failed) = load.finish();
    assert_eq!(failed, 0);

    // At rest: the same figures exactly, from the URL and from the directory.
    s.wait_ready(4);
    assert!(wait_until(Duration::from_secs(20), || {
        s.scrape().sum("gpe_worker_requests_total", &[]) == ok as f64
    }));
    let m = s.scrape();
    let want = scraped(&m);
    // The p50/p99 columns are the scrape's per-slot histograms, which count
    // every request of their slot.
    for (slot, (_, _, n, _, _)) in &want {
        let w = [("worker", slot.as_str())];
        assert_eq!(m.one("gpe_worker_request_duration_seconds_count", &w), *n);
    }
    assert_eq!(once(&url), want);
    assert_eq!(once(dir.to_str().unwrap()), want);
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate it
/// signed, and a CA of a stranger: PEM files in a temporary directory.
fn pki() -> tempfile::TempDir {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose as Eku, IsCa};
    use rcgen::{Issuer, KeyPair};
    let ca = |cn: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let pem = p.self_signed(&key).unwrap().pem();
        (pem, Issuer::new(p, key))
    };
    let leaf = |issuer: &Issuer<'_, KeyPair>, eku| {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        p.extended_key_usages = vec![eku];
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "gpe test leaf");
        let key = KeyPair::generate().unwrap();
        (
            p.signed_by(&key, issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, issuer) = ca("gpe test CA");
    let (stranger, _) = ca("another CA");
    let (cert, key) = leaf(&issuer, Eku::ServerAuth);
    let (ccert, ckey) = leaf(&issuer, Eku::ClientAuth);
    for (name, text) in [
        ("ca.pem", ca_pem),
        ("stranger.pem", stranger),
        ("server.pem", cert),
        ("server.key", key),
        ("client.pem", ccert),
        ("client.key", ckey),
    ] {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// `/metrics` through curl with `opts`; `None` unless it answers 200.
fn curl_scrape(url: &str, opts: &[&str]) -> Option<Metrics> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-f"])
        .args(opts)
        .arg(url)
        .output()
        .expect("curl is required (Debian package `curl`)");
    out.status
        .success()
        .then(|| Metrics::parse(&String::from_utf8_lossy(&out.stdout)))
}

#[test]
fn top_once_reads_an_https_exporter_with_client_certificate_and_basic_auth() {
    let pki = pki();
    let path = |n: &str| pki.path().join(n).display().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("client.pem"), path("client.key"));
    let hash = bcrypt::hash("s3cret", 4).unwrap();
    let web = pki.path().join("web.yml");
    std::fs::write(
        &web,
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca}\nbasic_auth_users:\n  top: '{hash}'\n",
            path("server.pem"),
            path("server.key"),
        ),
    )
    .unwrap();
    let creds = [
        "--cacert",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
        "-u",
        "top:s3cret",
    ];
    let s = Server::launch_until(
        TESTAPP,
        Opts::new("sync", 2).args(&["--metrics-web-config", web.to_str().unwrap()]),
        |s| {
            let url = format!("https://{}/metrics", s.metrics);
            curl_scrape(&url, &creds)
                .is_some_and(|m| m.sum("gpe_worker_state", &[("state", "idle")]) == 2.0)
        },
    );
    let url = format!("https://{}/metrics", s.metrics);
    let scrape = || curl_scrape(&url, &creds).unwrap();
    for i in 0..5 {
        let r = http(s.addr, "GET", "/", &[], b"").unwrap();
        assert_eq!(r.status, 200, "request {i}");
    }
    assert!(wait_until(Duration::from_secs(20), || {
        let m = scrape();
        m.sum("gpe_worker_requests_total", &[]) == 5.0
            && m.sum("gpe_worker_state", &[("state", "idle")]) == 2.0
    }));
    let want = scraped(&scrape());
    assert_eq!(want.len(), 2);
    let good = format!("https://top:s3cret@{}/metrics", s.metrics);
    let tls = ["--cacert", ca.as_str(), "--cert", &cert, "--key", &key];
    assert_eq!(once_with(&[&tls[..], &[&good]].concat()), want);

    // Each failure is one clear line on stderr and exit status 2.
    let fails = |args: &[&str]| {
        let out = Command::new(GPE)
            .args(["top", "--once"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
        err
    };
    let wrong = format!("https://top:wrong@{}/metrics", s.metrics);
    let e = fails(&[&tls[..], &[&wrong]].concat());
    assert!(e.contains("answered 401 Unauthorized"), "{e}");
    assert!(!e.contains("wrong"), "the password is not shown: {e}");
    let stranger = path("stranger.pem");
    let e = fails(&["--cacert", &stranger, "--cert", &cert, "--key", &key, &good]);
    assert!(e.contains("TLS handshake failed"), "{e}");
    let e = fails(&["--cacert", "/nonexistent/ca.pem", &good]);
    assert!(e.contains("--cacert /nonexistent/ca.pem"), "{e}");
    let e = fails(&[&good]);
    assert!(e.contains("needs --cacert"), "{e}");
    // Without the client certificate the server ends the handshake: a
    // message, never rows.
    fails(&["--cacert", &ca, &good]);
}
