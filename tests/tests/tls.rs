//! TLS and HTTP/2 on the app listener, with real clients: `curl --cacert`
//! (HTTPS, `--http2`, client certificates) and `h2load` (many streams over
//! one HTTP/2 connection). The certificates are made here with rcgen.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gpe_tests::*;
use nix::sys::signal::Signal;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");

/// A CA, and the PEM files of certificates it signs, in a temporary directory.
struct Ca {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    dir: PathBuf,
    name: String,
}

impl Ca {
    fn new(dir: &Path, name: &str) -> Ca {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("gpe test CA {name}"));
        let cert = params.self_signed(&key).unwrap();
        let issuer = rcgen::Issuer::new(params, key);
        let ca = Ca {
            cert,
            issuer,
            dir: dir.to_owned(),
            name: name.to_owned(),
        };
        std::fs::write(ca.pem(), ca.cert.pem()).unwrap();
        ca
    }

    /// The CA certificate's file.
    fn pem(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.pem", self.name))
    }

    /// A certificate for 127.0.0.1 (server) or a client, and its key:
    /// written to `<name>.crt` and `<name>.key`.
    fn issue(&self, name: &str) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// A server with TLS from `cert`/`key`, and `extra` arguments.
fn https_server(worker: &str, workers: u32, cert: &Path, key: &Path, extra: &[&str]) -> Server {
    let opts = Opts::new(worker, workers)
        .args(&["--certfile", cert.to_str().unwrap()])
        .args(&["--keyfile", key.to_str().unwrap()])
        .args(extra);
    Server::start(TESTAPP, opts)
}

/// `curl` with a 10 s cap and no retries.
fn curl() -> Command {
    let mut c = Command::new("curl");
    c.args(["-sS", "--max-time", "10"]);
    c
}

/// Runs `cmd`; its stdout when it succeeded, else `Err(stderr)`.
fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd.output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// `GET /` over HTTPS trusting `ca`: "HTTP-VERSION STATUS".
fn https_get(s: &Server, ca: &Path, args: &[&str]) -> Result<String, String> {
    let url = format!("https://{}/", s.addr);
    run(curl()
        .args(["--cacert", ca.to_str().unwrap(), "-o", "/dev/null"])
        .args(["-w", "%{http_version} %{http_code}"])
        .args(args)
        .arg(url))
}

/// Whether `GET /` over HTTPS trusting `ca` gets 200 (any protocol).
fn https_ok(s: &Server, ca: &Path, args: &[&str]) -> bool {
    https_get(s, ca, args).is_ok_and(|o| o.ends_with(" 200"))
}

/// The request mix: (method, path, route label, status).
fn plan(n: usize) -> (&'static str, &'static str, &'static str, u16) {
    match n % 5 {
        0 | 1 => ("GET", "/", "/", 200),
        2 => ("POST", "/status/201", "/status/{code}", 201),
        3 => ("GET", "/nope", "unmatched", 404),
        _ => ("POST", "/bytes/300", "/bytes/{n}", 200),
    }
}

per_worker!(https_counts_exactly);

/// 1,000 requests over HTTPS (4 curl processes of 250 requests each, keep-alive
/// where the worker type has it) are counted exactly, by route and status.
fn https_counts_exactly(worker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "a");
    let (cert, key) = ca.issue("server");
    let s = https_server(worker, 2, &cert, &key, &[]);
    let (addr, ca_pem) = (s.addr, ca.pem());
    let results = parallel(4, 1, move |c, _| {
        let mut cmd = curl();
        for i in 0..250 {
            let (m, p, _, _) = plan(c * 250 + i);
            if i > 0 {
                cmd.arg("--next");
            }
            cmd.args([
                "-sS",
                "--cacert",
                ca_pem.to_str().unwrap(),
                "-o",
                "/dev/null",
            ])
            .args(["-w", "%{http_code}\\n", "-X", m])
            .arg(format!("https://{addr}{p}"));
            if m == "POST" {
                cmd.args(["--data-binary", "body"]);
            }
        }
        let codes = run(&mut cmd).unwrap();
        codes
            .lines()
            .map(|l| l.parse::<u16>().unwrap())
            .enumerate()
            .map(|(i, code)| (plan(c * 250 + i), code))
            .collect::<Vec<_>>()
    });
    let results: Vec<_> = results.into_iter().flatten().collect();
    assert_eq!(results.len(), 1000, "{worker}");
    let mut expected: BTreeMap<(&str, &str, String), u64> = BTreeMap::new();
    for ((m, _, route, status), got) in &results {
        assert_eq!(got, status, "{worker}: {m} {route}");
        *expected.entry((m, route, status.to_string())).or_default() += 1;
    }
    let metrics = s.scrape();
    assert_eq!(
        metrics.sum("gpe_http_requests_total", &[]),
        1000.0,
        "{worker}"
    );
    for ((m, route, status), n) in &expected {
        assert_eq!(
            metrics.one(
                "gpe_http_requests_total",
                &[("method", m), ("route", route), ("status", status)]
            ),
            *n as f64,
            "{worker}: {m} {route} {status}"
        );
    }
    assert_eq!(metrics.sum("gpe_worker_requests_total", &[]), 1000.0);
    assert_eq!(metrics.sum("gpe_http_errors_total", &[]), 0.0, "{worker}");
    // Plain HTTP to the TLS port is not served.
    assert!(get_plain(s.addr).is_err() || get_plain(s.addr).is_ok_and(|r| r != 200));
}

/// A plain-HTTP GET's status, if any.
fn get_plain(addr: std::net::SocketAddr) -> Result<u16, String> {
    http(addr, "GET", "/", &[], b"")
        .map(|r| r.status)
        .map_err(|e| e.to_string())
}

#[test]
fn curl_negotiates_h2_by_alpn_and_sync_stays_on_http1() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "a");
    let (cert, key) = ca.issue("server");
    for worker in WORKERS {
        let s = https_server(worker, 1, &cert, &key, &[]);
        let want = if worker == "sync" { "1.1 200" } else { "2 200" };
        assert_eq!(
            https_get(&s, &ca.pem(), &["--http2"]).unwrap(),
            want,
            "{worker}"
        );
        assert_eq!(https_get(&s, &ca.pem(), &["--http1.1"]).unwrap(), "1.1 200");
        s.wait_for("gpe_http_requests_total", &[], 2.0);
        drop(s);
        // `http2 = "off"`: ALPN offers http/1.1 only.
        let s = https_server(worker, 1, &cert, &key, &["--http2", "off"]);
        assert_eq!(https_get(&s, &ca.pem(), &["--http2"]).unwrap(), "1.1 200");
    }
}

#[test]
fn h2c_prior_knowledge_only_with_http2_always() {
    for worker in ["thread", "eventloop", "greenlet"] {
        let s = Server::start(TESTAPP, Opts::new(worker, 1).args(&["--http2", "always"]));
        let url = format!("http://{}/", s.addr);
        let h2c = || {
            run(curl()
                .args(["--http2-prior-knowledge", "-o", "/dev/null"])
                .args(["-w", "%{http_version} %{http_code}"])
                .arg(&url))
        };
        assert_eq!(h2c().unwrap(), "2 200", "{worker}");
        assert_eq!(
            get(s.addr, "/").status,
            200,
            "{worker}: http/1 still served"
        );
        s.wait_for("gpe_http_requests_total", &[], 2.0);
        drop(s);
        // The default (`tls`): no h2c.
        let s = Server::start(TESTAPP, Opts::new(worker, 1));
        assert!(h2c().is_err(), "{worker}");
        assert_eq!(get(s.addr, "/").status, 200);
    }
}

#[test]
fn a_thousand_requests_over_one_h2_connection_with_100_streams_are_counted_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "a");
    let (cert, key) = ca.issue("server");
    for worker in ["thread", "eventloop", "greenlet"] {
        let s = https_server(worker, 1, &cert, &key, &[]);
        let out = run(Command::new("h2load")
            .args(["-n", "1000", "-c", "1", "-m", "100", "-t", "1"])
            .arg(format!("https://{}/", s.addr)))
        .unwrap();
        assert!(
            out.contains("1000 succeeded, 0 failed") && out.contains("Application protocol: h2"),
            "{worker}: {out}"
        );
        assert!(out.contains("status codes: 1000 2xx"), "{worker}: {out}");
        s.wait_for("gpe_http_requests_total", &[("status", "200")], 1000.0);
        let m = s.scrape();
        assert_eq!(m.sum("gpe_http_requests_total", &[]), 1000.0, "{worker}");
        assert_eq!(
            m.sum("gpe_http_request_duration_seconds_count", &[]),
            1000.0
        );
        assert_eq!(
            m.sum("gpe_worker_connections_accepted_total", &[]),
            1.0,
            "{worker}: one connection"
        );
        assert_eq!(m.sum("gpe_http_errors_total", &[]), 0.0, "{worker}");
    }
}

/// Clients that `GET /` over HTTPS in a loop, each call a new connection
/// trusting `ca`, until stopped (at most 90 s).
struct HttpsLoad {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<std::sync::Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl HttpsLoad {
    fn start(addr: std::net::SocketAddr, ca: &Path, clients: usize) -> HttpsLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failed, errors) =
                    (stop.clone(), ok.clone(), failed.clone(), errors.clone());
                let ca = ca.to_owned();
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(90);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let got = run(curl()
                            .args(["--cacert", ca.to_str().unwrap(), "-o", "/dev/null"])
                            .args(["-w", "%{http_code}"])
                            .arg(format!("https://{addr}/")));
                        match got {
                            Ok(code) if code == "200" => ok.fetch_add(1, Ordering::Relaxed),
                            other => {
                                errors.lock().unwrap().push(format!("{other:?}"));
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                })
            })
            .collect();
        HttpsLoad {
            stop,
            ok,
            failed,
            errors,
            threads,
        }
    }

    fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        let errors = self.errors.lock().unwrap().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

per_worker!(hup_rotates_the_certificate_without_failures);

/// The certificate files are replaced by ones from another CA, then HUP: new
/// connections get the new certificate, and no request fails meanwhile.
fn hup_rotates_the_certificate_without_failures(worker: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (old_ca, new_ca) = (Ca::new(dir.path(), "old"), Ca::new(dir.path(), "new"));
    let (cert, key) = old_ca.issue("server");
    let both = dir.path().join("both.pem");
    let pems = [old_ca.pem(), new_ca.pem()].map(|p| std::fs::read_to_string(p).unwrap());
    std::fs::write(&both, pems.concat()).unwrap();
    let s = https_server(worker, 2, &cert, &key, &[]);
    assert!(https_ok(&s, &old_ca.pem(), &[]));
    assert!(!https_ok(&s, &new_ca.pem(), &[]), "not yet the new one");
    let before = s.worker_pids();
    let load = HttpsLoad::start(s.addr, &both, 2);
    assert!(wait_until(Duration::from_secs(20), || load.ok() >= 10));
    // Swap the files (each replaced whole, by rename), then HUP.
    let (new_cert, new_key) = new_ca.issue("next");
    std::fs::rename(&new_key, &key).unwrap();
    std::fs::rename(&new_cert, &cert).unwrap();
    s.signal(Signal::SIGHUP);
    let replaced = wait_until(Duration::from_secs(20), || {
        let now = s.worker_pids();
        now.len() == 2 && now.values().all(|p| !before.values().any(|b| b == p))
    });
    assert!(
        replaced,
        "{worker}: new workers after HUP; log:\n{}",
        s.log()
    );
    s.wait_ready(2);
    s.wait_for(
        "gpe_master_worker_exits_total",
        &[("reason", "reload")],
        2.0,
    );
    let served = load.ok();
    assert!(
        wait_until(Duration::from_secs(20), || load.ok() >= served + 10),
        "{worker}: the new workers serve"
    );
    let (ok, failed, errors) = load.finish();
    assert_eq!(failed, 0, "{worker}: no request failed: {errors:?}");
    assert!(https_ok(&s, &new_ca.pem(), &[]));
    assert!(
        !https_ok(&s, &old_ca.pem(), &[]),
        "{worker}: new connections see the new certificate"
    );
    let m = s.scrape();
    assert_eq!(
        m.sum("gpe_http_requests_total", &[]),
        (ok + 2) as f64,
        "{worker}: every success counted once"
    );
}

#[test]
fn a_bad_certificate_at_hup_keeps_the_old_workers_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "a");
    let (cert, key) = ca.issue("server");
    let s = https_server("eventloop", 2, &cert, &key, &[]);
    let before = s.worker_pids();
    std::fs::write(&cert, "not a certificate\n").unwrap();
    s.signal(Signal::SIGHUP);
    s.wait_for("gpe_master_signals_total", &[("signal", "HUP")], 1.0);
    assert!(
        wait_until(Duration::from_secs(10), || s
            .log()
            .contains("the running workers keep serving")),
        "{}",
        s.log()
    );
    assert!(s.log().contains("setting `certfile`"), "{}", s.log());
    for _ in 0..5 {
        assert!(https_ok(&s, &ca.pem(), &[]));
    }
    assert_eq!(s.worker_pids(), before, "the old workers go on");
    let m = s.scrape();
    assert_eq!(m.one("gpe_master_reloads_total", &[]), 0.0);
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 5.0);
}

#[test]
fn bad_tls_settings_stop_start_up_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "a");
    let (cert, key) = ca.issue("server");
    let (_, other_key) = ca.issue("other");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "junk\n").unwrap();
    let missing = dir.path().join("missing.pem");
    let p = |p: &Path| p.to_str().unwrap().to_owned();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec![
                "--certfile".into(),
                p(&missing),
                "--keyfile".into(),
                p(&key),
            ],
            "`certfile`",
        ),
        (
            vec!["--certfile".into(), p(&junk), "--keyfile".into(), p(&key)],
            "`certfile`",
        ),
        (
            vec!["--certfile".into(), p(&cert), "--keyfile".into(), p(&junk)],
            "`keyfile`",
        ),
        (
            vec![
                "--certfile".into(),
                p(&cert),
                "--keyfile".into(),
                p(&other_key),
            ],
            "`keyfile`",
        ),
        (vec!["--certfile".into(), p(&cert)], "`keyfile`"),
        (
            vec![
                "--certfile".into(),
                p(&cert),
                "--keyfile".into(),
                p(&key),
                "--cert-reqs".into(),
                "required".into(),
            ],
            "`ca_certs`",
        ),
        (
            vec![
                "--certfile".into(),
                p(&cert),
                "--keyfile".into(),
                p(&key),
                "--ciphers".into(),
                "RC4-MD5".into(),
            ],
            "`ciphers`",
        ),
        (vec!["--http2".into(), "sometimes".into()], "`http2`"),
    ];
    for (args, setting) in cases {
        let port = free_port();
        let out = Command::new(TESTAPP)
            .args([
                "--bind",
                &format!("127.0.0.1:{port}"),
                "--no-metrics",
                "-w",
                "1",
            ])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(setting), "{args:?}: {stderr}");
    }
}

#[test]
fn cert_reqs_required_refuses_a_client_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new(dir.path(), "a");
    let (cert, key) = ca.issue("server");
    let (client_cert, client_key) = ca.issue("client");
    for (reqs, without) in [("required", false), ("optional", true)] {
        let s = https_server(
            "eventloop",
            1,
            &cert,
            &key,
            &[
                "--cert-reqs",
                reqs,
                "--ca-certs",
                ca.pem().to_str().unwrap(),
            ],
        );
        let with = [
            "--cert",
            client_cert.to_str().unwrap(),
            "--key",
            client_key.to_str().unwrap(),
        ];
        assert!(https_ok(&s, &ca.pem(), &with), "{reqs}");
        assert_eq!(https_ok(&s, &ca.pem(), &[]), without, "{reqs}");
    }
}
