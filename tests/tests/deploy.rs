//! Deploying gpe: `/readyz` through boot and stop, and the recipes in
//! `deploy/` (Prometheus rules and their unit tests, the Grafana dashboard's
//! queries against a real Prometheus that scraped gpe under load, the
//! Kubernetes manifests against the Kubernetes schemas), run with the
//! commands docs/deploy.md gives.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpe_tests::{free_port, get, http, wait_sum, wait_until, Load, Opts, Server};
use nix::sys::signal::Signal;
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");
const GPE: &str = env!("CARGO_BIN_EXE_gpe-bin");

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

/// The repository's root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A Prometheus started by a test, killed on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus scraping `target` every second as job `gpe`, with the
    /// rules of deploy/prometheus/gpe-rules.yml evaluated every second.
    fn start(target: SocketAddr) -> Prometheus {
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let rules = root().join("deploy/prometheus/gpe-rules.yml");
            let config = format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {}\n\
                 scrape_configs:\n  - job_name: gpe\n    static_configs:\n      - targets: ['{target}']\n",
                rules.display()
            );
            std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
            let child = Command::new("prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.path().join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("prometheus (Debian package `prometheus`; scripts/test installs it)");
            let mut p = Prometheus {
                child,
                addr,
                _dir: dir,
            };
            let up = wait_until(Duration::from_secs(30), || {
                matches!(http(p.addr, "GET", "/-/ready", &[], b""), Ok(r) if r.status == 200)
                    || matches!(p.child.try_wait(), Ok(Some(_)))
            });
            if up && matches!(p.child.try_wait(), Ok(None)) {
                return p;
            }
            let log = p.log();
            assert!(
                log.contains("address already in use"),
                "prometheus did not start:\n{log}"
            );
        }
        panic!("no free port for prometheus in 5 tries");
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// The result of an instant query, or the error Prometheus gave.
    fn query(&self, expr: &str) -> Result<Vec<serde_json::Value>, String> {
        let q = utf8_percent_encode(expr, NON_ALPHANUMERIC);
        let r = http(
            self.addr,
            "GET",
            &format!("/api/v1/query?query={q}"),
            &[],
            b"",
        )
        .map_err(|e| e.to_string())?;
        let v: serde_json::Value = serde_json::from_slice(&r.body).map_err(|e| e.to_string())?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every `expr` of the dashboard, with the panel it belongs to, rows' panels
/// included.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn walk(panels: &[serde_json::Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((
                    p["title"].as_str().unwrap().to_owned(),
                    t["expr"].as_str().unwrap().to_owned(),
                ));
            }
            walk(p["panels"].as_array().map_or(&[], Vec::as_slice), out);
        }
    }
    let mut out = Vec::new();
    walk(dashboard["panels"].as_array().unwrap(), &mut out);
    out
}

/// What Grafana puts in for the dashboard's variables: the job, every pod,
/// and a rate window of a few scrapes.
fn grafana_substitute(expr: &str) -> String {
    let e = expr
        .replace("$__rate_interval", "10s")
        .replace("$job", "gpe")
        .replace("$instance", ".+");
    assert!(!e.contains('$'), "an unknown variable in {expr}");
    e
}

#[test]
fn every_dashboard_query_returns_data_from_a_prometheus_that_scraped_gpe_under_load() {
    let text = std::fs::read_to_string(root().join("deploy/grafana/gpe.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap() >= 38,
        "Grafana 10 or later"
    );
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "a datasource variable"
    );
    let exprs = dashboard_exprs(&dashboard);
    assert!(exprs.len() >= 15, "{exprs:?}");
    // The HPA's metric, as prometheus-adapter queries it (one pod: job=gpe).
    let adapter =
        std::fs::read_to_string(root().join("deploy/k8s/prometheus-adapter.yaml")).unwrap();
    let metrics_query = adapter
        .lines()
        .find_map(|l| l.trim().strip_prefix("metricsQuery: '")?.strip_suffix('\''))
        .unwrap()
        .replace("<<.Series>>", "gpe_http_requests_in_flight")
        .replace("<<.LabelMatchers>>", "job=\"gpe\"")
        .replace("<<.GroupBy>>", "job");

    let s = Server::start(TESTAPP, Opts::new("thread", 2));
    let loads = [
        Load::start(s.addr, 2, "/"),
        Load::start(s.addr, 1, "/sleep/20"),
        Load::start(s.addr, 1, "/status/500"),
    ];
    let prom = Prometheus::start(s.metrics);
    let mut pending: Vec<(String, String)> = exprs
        .iter()
        .map(|(title, e)| (title.clone(), grafana_substitute(e)))
        .chain([("HPA (prometheus-adapter)".to_owned(), metrics_query)])
        .collect();
    let mut last = String::new();
    let all = wait_until(Duration::from_secs(60), || {
        pending.retain(|(title, e)| match prom.query(e) {
            Ok(r) if !r.is_empty() => false,
            Ok(_) => {
                last = format!("{title}: {e}: no data yet");
                true
            }
            Err(err) => panic!("{title}: {e}: Prometheus refused it: {err}"),
        });
        pending.is_empty()
    });
    let [ok, slept, errors] = loads.map(Load::finish);
    // Everything sent was answered and counted: 200s for `/` and the sleeps,
    // 500s (counted as failures by the load) for `/status/500`.
    assert_eq!(
        (ok.1, slept.1, errors.0),
        (0, 0, 0),
        "{ok:?} {slept:?} {errors:?}"
    );
    wait_sum(
        &s,
        "gpe_http_requests_total",
        &[("status", "200")],
        (ok.0 + slept.0) as f64,
    );
    wait_sum(
        &s,
        "gpe_http_requests_total",
        &[("status", "500")],
        errors.1 as f64,
    );
    assert!(
        all,
        "queries without data after 60 s: {pending:?} (last: {last}); prometheus log:\n{}",
        prom.log()
    );
}

/// The shell commands of the `<!-- ci -->` blocks in docs/deploy.md: the
/// walk-through's checks, which this test runs as written.
fn walkthrough_commands() -> Vec<String> {
    let doc = std::fs::read_to_string(root().join("docs/deploy.md")).unwrap();
    let mut out = Vec::new();
    let mut lines = doc.lines();
    while let Some(l) = lines.next() {
        if l.trim() != "<!-- ci -->" {
            continue;
        }
        assert_eq!(
            lines.next().map(str::trim),
            Some("```sh"),
            "a ci block is a sh block"
        );
        for c in lines.by_ref().take_while(|l| l.trim() != "```") {
            let c = c.trim();
            if !c.is_empty() && !c.starts_with('#') {
                out.push(c.to_owned());
            }
        }
    }
    out
}

#[test]
fn the_walkthroughs_checks_pass_as_written() {
    let commands = walkthrough_commands();
    for want in [
        "promtool check rules deploy/prometheus/gpe-rules.yml",
        "promtool test rules deploy/prometheus/gpe-rules.test.yml",
        "deploy/k8s/validate.py",
    ] {
        assert!(
            commands.iter().any(|c| c.starts_with(want)),
            "docs/deploy.md runs no `{want}`: {commands:?}"
        );
    }
    // `gpe` on PATH is the binary under test.
    let bin = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(GPE, bin.path().join("gpe")).unwrap();
    let path = format!(
        "{}:{}",
        bin.path().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for c in &commands {
        let out = Command::new("bash")
            .args(["-euo", "pipefail", "-c", c])
            .current_dir(root())
            .env("PATH", &path)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "`{c}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
