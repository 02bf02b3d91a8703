//! Black-box tests of `metrics_web_config`, the exporter-toolkit web config:
//! a real Prometheus scraping over TLS with basic auth and with client
//! certificates, curl for exact refusal counts, re-reading without a restart,
//! and the files refused at start-up of `gpe serve` and `gpe exporter`.
//! Certificates are made here with rcgen.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use gpe_tests::*;
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");
const GPE: &str = env!("CARGO_BIN_EXE_gpe-bin");

/// bcrypt cost of the test hashes: the lowest, to keep the tests quick.
const COST: u32 = 4;

/// A CA; a server certificate for 127.0.0.1 and a client certificate it
/// signed; a client certificate of another CA. PEM files in `dir`.
struct Pki {
    dir: tempfile::TempDir,
}

fn ca() -> (String, Issuer<'static, KeyPair>) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // A subject of its own: one equal to the leaf's reads as self-signed.
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "gpe test CA");
    let key = KeyPair::generate().unwrap();
    let pem = p.self_signed(&key).unwrap().pem();
    (pem, Issuer::new(p, key))
}

fn leaf(issuer: &Issuer<'_, KeyPair>, eku: ExtendedKeyUsagePurpose) -> (String, String) {
    let mut p = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    p.extended_key_usages = vec![eku];
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "gpe test leaf");
    let key = KeyPair::generate().unwrap();
    (
        p.signed_by(&key, issuer).unwrap().pem(),
        key.serialize_pem(),
    )
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, issuer) = ca();
        let (cert, key) = leaf(&issuer, ExtendedKeyUsagePurpose::ServerAuth);
        let (ccert, ckey) = leaf(&issuer, ExtendedKeyUsagePurpose::ClientAuth);
        let (_, other) = ca();
        let (scert, skey) = leaf(&other, ExtendedKeyUsagePurpose::ClientAuth);
        for (name, text) in [
            ("ca.pem", ca_pem),
            ("server.pem", cert),
            ("server.key", key),
            ("client.pem", ccert),
            ("client.key", ckey),
            ("stranger.pem", scert),
            ("stranger.key", skey),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Pki { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The `tls_server_config` section for the server certificate.
    fn tls(&self) -> String {
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            self.path("server.pem"),
            self.path("server.key")
        )
    }

    /// Writes `yaml` as the web config (through a rename, as config
    /// managers do) and returns its path.
    fn write(&self, yaml: &str) -> PathBuf {
        let file = self.dir.path().join("web.yml");
        let tmp = self.dir.path().join("web.yml.new");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        file
    }
}

/// Starts gpe-testapp (one sync worker) with `web` as its web config and
/// `extra` flags, and waits until `ready` (a curl of `/metrics`) sees the
/// worker idle.
fn start(web: &Path, extra: &[&str], ready: &[&str]) -> Server {
    for _ in 0..5 {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(TESTAPP)
            .args(["--bind", &addr.to_string()])
            .args(["--metrics-bind", &metrics.to_string()])
            .args(["-w", "1", "-k", "sync"])
            .args([
                "--metrics-dir",
                dir.path().join("metrics").to_str().unwrap(),
            ])
            .args(["--metrics-web-config", web.to_str().unwrap()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut s = Server {
            child: Some(child),
            addr,
            metrics,
            dir,
            workers: 1,
        };
        let ok = wait_until(Duration::from_secs(20), || {
            let exited = s
                .child
                .as_mut()
                .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))));
            exited || scrape(&s, ready).is_some_and(|m| idle(&m))
        });
        if ok && scrape(&s, ready).is_some_and(|m| idle(&m)) {
            return s;
        }
        if !s.log().contains("Address already in use") {
            panic!("server not ready; log:\n{}", s.log());
        }
    }
    panic!("no free pair of ports in 5 tries");
}

fn idle(m: &Metrics) -> bool {
    m.sum("gpe_worker_state", &[("state", "idle")]) == 1.0
}

/// One curl run: its exit code, the HTTP status (0 when there was none),
/// and the body and response headers.
struct Curl {
    code: i32,
    status: u16,
    out: String,
}

fn curl(args: &[&str]) -> Curl {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-D", "-", "-w", "\n%{http_code}"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("curl is required (Debian package `curl`)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status.trim().parse().unwrap_or(0);
    let mut body = body.to_owned();
    if status == 0 {
        // No answer: what curl says is the whole story.
        body = String::from_utf8_lossy(&out.stderr).into_owned();
    }
    Curl {
        code: out.status.code().unwrap_or(-1),
        status,
        out: body,
    }
}

fn url(s: &Server, scheme: &str, path: &str) -> String {
    format!("{scheme}://{}{path}", s.metrics)
}

/// `/metrics` over HTTPS with the curl options `opts`, parsed; `None`
/// unless it answers 200.
fn scrape(s: &Server, opts: &[&str]) -> Option<Metrics> {
    let scheme = if opts.contains(&"--cacert") {
        "https"
    } else {
        "http"
    };
    let target = url(s, scheme, "/metrics");
    let mut args = opts.to_vec();
    args.push(&target);
    let c = curl(&args);
    (c.status == 200).then(|| Metrics::parse(&c.out))
}

fn failures(m: &Metrics, reason: &str) -> f64 {
    m.one("gpe_exporter_auth_failures_total", &[("reason", reason)])
}

/// A Prometheus scraping gpe's exporter with `jobs` (scrape_config bodies,
/// the target added), killed on drop.
struct Prometheus {
    child: Child,
    api: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: SocketAddr, jobs: &[(&str, String)]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut config =
            String::from("global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n");
        for (name, body) in jobs {
            config.push_str(&format!(
                "  - job_name: {name}\n    scheme: https\n    static_configs:\n      - targets: ['{target}']\n{body}"
            ));
        }
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={api}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus is required (Debian package `prometheus`)");
        Prometheus { child, api, dir }
    }

    /// The value of the one sample `query` returns, if any.
    fn value(&self, query: &str) -> Option<String> {
        let q: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        let r = http(
            self.api,
            "GET",
            &format!("/api/v1/query?query={q}"),
            &[],
            b"",
        )
        .ok()?;
        let body = String::from_utf8_lossy(&r.body).into_owned();
        let (_, rest) = body.rsplit_once("\"value\":[")?;
        let (_, v) = rest.split_once(",\"")?;
        Some(v.split('"').next()?.to_owned())
    }

    /// Waits (up to 40 s) until `query` returns the value `want`.
    fn wait_for(&self, query: &str, want: &str) {
        let mut last = None;
        let ok = wait_until(Duration::from_secs(40), || {
            last = self.value(query);
            last.as_deref() == Some(want)
        });
        assert!(
            ok,
            "Prometheus: {query} stays {last:?}, expected {want}; log:\n{}",
            std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
        );
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn prometheus_scrapes_over_tls_with_basic_auth_and_each_refusal_is_counted() {
    let pki = Pki::new();
    let hash = bcrypt::hash("s3cret", COST).unwrap();
    let web = pki.write(&format!(
        "{}basic_auth_users:\n  prometheus: '{hash}'\nhttp_server_config:\n  headers:\n    X-Content-Type-Options: nosniff\n",
        pki.tls()
    ));
    let ca = pki.path("ca.pem");
    let auth = ["--cacert", &ca, "-u", "prometheus:s3cret"];
    let s = start(&web, &[], &auth);
    let target = url(&s, "https", "/metrics");

    let ok = curl(&[&auth[..], &[&target]].concat());
    assert_eq!(ok.status, 200, "{}", ok.out);
    assert!(ok
        .out
        .to_ascii_lowercase()
        .contains("x-content-type-options: nosniff"));
    // Exact counts: 3 requests without credentials (one of them /healthz,
    // which is not public by default), 2 with a wrong password, 1 unknown
    // user, 1 plain-HTTP request to the TLS port.
    let health = url(&s, "https", "/healthz");
    for t in [&target, &target, &health] {
        let c = curl(&["--cacert", &ca, t]);
        assert_eq!(c.status, 401, "{}", c.out);
        assert!(c
            .out
            .to_ascii_lowercase()
            .contains("www-authenticate: basic"));
        assert!(c
            .out
            .to_ascii_lowercase()
            .contains("x-content-type-options: nosniff"));
    }
    for user in ["prometheus:wrong", "prometheus:s3cre", "eve:s3cret"] {
        assert_eq!(curl(&["--cacert", &ca, "-u", user, &target]).status, 401);
    }
    assert!(http(s.metrics, "GET", "/metrics", &[], b"").map_or(true, |r| r.status != 200));
    let m = scrape(&s, &auth).unwrap();
    assert_eq!(failures(&m, "missing_credentials"), 3.0);
    assert_eq!(failures(&m, "wrong_credentials"), 3.0);
    assert_eq!(failures(&m, "missing_client_cert"), 0.0);
    let ok = wait_until(Duration::from_secs(10), || {
        scrape(&s, &auth).is_some_and(|m| failures(&m, "tls_handshake") == 1.0)
    });
    assert!(ok, "the plain-HTTP request is counted once");

    let tls = format!("    tls_config:\n      ca_file: {ca}\n");
    let prom = Prometheus::start(
        s.metrics,
        &[
            (
                "right",
                format!(
                    "{tls}    basic_auth:\n      username: prometheus\n      password: s3cret\n"
                ),
            ),
            (
                "wrong",
                format!("{tls}    basic_auth:\n      username: prometheus\n      password: nope\n"),
            ),
        ],
    );
    prom.wait_for("up{job=\"right\"}", "1");
    prom.wait_for("up{job=\"wrong\"}", "0");
    // Prometheus itself sees the wrong password counted, beyond the 3 above.
    let ok = wait_until(Duration::from_secs(40), || {
        prom.value(
            "gpe_exporter_auth_failures_total{job=\"right\",reason=\"wrong_credentials\"} > 3",
        )
        .is_some()
    });
    assert!(
        ok,
        "Prometheus scrapes the failures of its wrong-password job"
    );
    drop(prom);
    assert!(!s.log().contains("exporter failed"), "{}", s.log());
}

#[test]
fn mtls_refuses_a_handshake_without_a_client_certificate_and_admits_one_with() {
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let web = pki.write(&format!(
        "{}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {ca}\n",
        pki.tls()
    ));
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let with_cert = ["--cacert", &ca, "--cert", &cert, "--key", &key];
    let s = start(&web, &[], &with_cert);
    let target = url(&s, "https", "/metrics");

    for _ in 0..2 {
        let c = curl(&["--cacert", &ca, &target]);
        assert_ne!(c.code, 0, "no certificate: the handshake fails");
        assert_eq!(c.status, 0, "no HTTP answer without a certificate");
    }
    let (other, other_key) = (pki.path("stranger.pem"), pki.path("stranger.key"));
    let c = curl(&[
        "--cacert", &ca, "--cert", &other, "--key", &other_key, &target,
    ]);
    assert_eq!(c.status, 0, "a certificate of another CA is refused");
    let ok = wait_until(Duration::from_secs(10), || {
        scrape(&s, &with_cert).is_some_and(|m| {
            failures(&m, "missing_client_cert") == 2.0 && failures(&m, "bad_client_cert") == 1.0
        })
    });
    assert!(
        ok,
        "{:?}",
        scrape(&s, &with_cert).map(|m| failures(&m, "missing_client_cert"))
    );

    let prom = Prometheus::start(
        s.metrics,
        &[
            (
                "cert",
                format!("    tls_config:\n      ca_file: {ca}\n      cert_file: {cert}\n      key_file: {key}\n"),
            ),
            ("nocert", format!("    tls_config:\n      ca_file: {ca}\n")),
        ],
    );
    prom.wait_for("up{job=\"cert\"}", "1");
    prom.wait_for("up{job=\"nocert\"}", "0");
    let ok = wait_until(Duration::from_secs(40), || {
        prom.value(
            "gpe_exporter_auth_failures_total{job=\"cert\",reason=\"missing_client_cert\"} > 2",
        )
        .is_some()
    });
    assert!(
        ok,
        "Prometheus scrapes the refusals of its job without a certificate"
    );
}

#[test]
fn the_web_config_is_read_again_when_it_changes_without_a_restart() {
    let pki = Pki::new();
    let users = |pass: &str| {
        format!(
            "basic_auth_users:\n  alice: '{}'\n",
            bcrypt::hash(pass, COST).unwrap()
        )
    };
    // Plain HTTP with basic auth; /healthz public.
    let web = pki.write(&users("one"));
    let s = start(
        &web,
        &["--metrics-health-public", "true"],
        &["-u", "alice:one"],
    );
    let plain = url(&s, "http", "/metrics");
    assert_eq!(curl(&["-u", "alice:one", &plain]).status, 200);
    assert_eq!(curl(&[&plain]).status, 401);
    assert_eq!(curl(&[&url(&s, "http", "/healthz")]).status, 200, "public");
    // The readiness probe is public too (200 or, while a worker boots, 503).
    let ready = curl(&[&url(&s, "http", "/readyz")]).status;
    assert!(ready == 200 || ready == 503, "/readyz answered {ready}");
    let exporter = exporter_pid(&s, &["-u", "alice:one"]);

    // A new password takes effect at the next request, on the same exporter.
    pki.write(&users("two"));
    assert_eq!(curl(&["-u", "alice:one", &plain]).status, 401);
    assert_eq!(curl(&["-u", "alice:two", &plain]).status, 200);

    // Adding TLS: the next connection must speak it.
    pki.write(&format!("{}{}", pki.tls(), users("two")));
    let ca = pki.path("ca.pem");
    let https = url(&s, "https", "/metrics");
    let c = curl(&["--cacert", &ca, "-u", "alice:two", &https]);
    assert_eq!(c.status, 200, "{}", c.out);
    assert_eq!(
        curl(&["-u", "alice:two", &plain]).status,
        0,
        "no plain HTTP any more"
    );

    // A broken file is logged and the config in force stays.
    pki.write("tls_server_config:\n  cert_file: /nonexistent.pem\n  key_file: /nonexistent.key\n");
    assert_eq!(
        curl(&["--cacert", &ca, "-u", "alice:two", &https]).status,
        200
    );
    assert!(wait_until(Duration::from_secs(10), || s.log().contains(
        "tls_server_config.cert_file: cannot read /nonexistent.pem"
    )));
    assert_eq!(
        exporter_pid(&s, &["--cacert", &ca, "-u", "alice:two"]),
        exporter,
        "no restart"
    );
    let m = scrape(&s, &["--cacert", &ca, "-u", "alice:two"]).unwrap();
    assert_eq!(failures(&m, "missing_credentials"), 1.0);
    assert_eq!(failures(&m, "wrong_credentials"), 1.0);
}

/// The pid of the server's exporter: the master's child that is no worker
/// (the workers' pids from a scrape with the curl options `opts`).
fn exporter_pid(s: &Server, opts: &[&str]) -> i32 {
    let m = scrape(s, opts).unwrap();
    let workers: Vec<String> = m
        .samples("gpe_worker_info")
        .into_iter()
        .map(|(l, _)| l["pid"].clone())
        .collect();
    let master = s.pid().as_raw();
    std::fs::read_to_string(format!("/proc/{master}/task/{master}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .find(|p| !workers.iter().any(|w| w == p))
        .and_then(|p| p.parse().ok())
        .expect("the exporter is a child of the master")
}

/// Starts `cmd` (with `web` as its web config), waits for its exit and
/// returns its status code and stderr.
fn refused(mut cmd: Command) -> (i32, String) {
    let mut child = Some(
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut stderr = child.as_mut().unwrap().stderr.take().unwrap();
    let status = wait_child(&mut child, Duration::from_secs(20));
    if let Some(mut c) = child {
        let _ = c.kill();
        let _ = c.wait();
        panic!("a refused web config does not stop start-up");
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut text).unwrap();
    (status.unwrap().code().unwrap_or(-1), text)
}

#[test]
fn refused_web_configs_stop_start_up_of_serve_exporter_and_check_naming_the_field() {
    let pki = Pki::new();
    let tls = |cert: &str, key: &str| {
        format!(
            "tls_server_config:\n  cert_file: {}\n  key_file: {}\n",
            pki.path(cert),
            pki.path(key)
        )
    };
    let cases = [
        ("basic_auth_users: [\n", "basic_auth_users"),
        (
            "tls_server_config:\n  certfile: x\n",
            "tls_server_config: unknown field `certfile`",
        ),
        (
            &tls("missing.pem", "server.key"),
            "tls_server_config.cert_file: cannot read",
        ),
        (
            &tls("server.pem", "client.key"),
            "tls_server_config.key_file: ",
        ),
    ];
    let store = tempfile::tempdir().unwrap();
    for (yaml, field) in cases {
        let web = pki.write(yaml);
        let mut serve = Command::new(TESTAPP);
        serve
            .args(["--bind", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-bind", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-dir", store.path().join("m").to_str().unwrap()])
            .args(["--metrics-web-config", web.to_str().unwrap()]);
        let mut exporter = Command::new(GPE);
        exporter
            .args(["exporter", "--metrics-dir", store.path().to_str().unwrap()])
            .args(["--metrics-bind", &format!("127.0.0.1:{}", free_port())])
            .args(["--metrics-web-config", web.to_str().unwrap()]);
        let toml = store.path().join("gpe.toml");
        std::fs::write(
            &toml,
            format!("metrics_web_config = {:?}\n", web.to_str().unwrap()),
        )
        .unwrap();
        let mut check = Command::new(GPE);
        check.args(["check", "-c", toml.to_str().unwrap()]);
        for (what, cmd) in [("serve", serve), ("exporter", exporter), ("check", check)] {
            let (code, stderr) = refused(cmd);
            assert_eq!(code, 2, "{what} {yaml:?}: {stderr}");
            assert!(
                stderr.contains("setting `metrics_web_config`") && stderr.contains(field),
                "{what} {yaml:?}: {stderr}"
            );
        }
    }
    let web = pki.write(&tls("server.pem", "client.key"));
    let mut cmd = Command::new(GPE);
    cmd.args(["exporter", "--metrics-dir", store.path().to_str().unwrap()])
        .args(["--metrics-web-config", web.to_str().unwrap()]);
    assert!(refused(cmd).1.contains("does not match the certificate"));
}
