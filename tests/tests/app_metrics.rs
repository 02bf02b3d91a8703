//! The app's own metrics through the `metrics` facade, black-box: the testapp
//! records counters, gauges and histograms in every worker; the scrape (and a
//! real Prometheus) shows them merged, exact, after `kill -9`, per gauge mode,
//! capped, with refusals counted and `traceparent` exemplars. Every test runs
//! for every worker type.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use gpe_tests::*;
use nix::sys::signal::Signal;
use nix::unistd::Pid;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");

per_worker!(
    counters_and_histograms_are_exact_after_kill_9,
    gauge_sum_loses_a_killed_worker,
    gauge_max,
    gauge_min,
    gauge_latest,
    gauge_per_worker,
    cardinality_is_capped_with_other,
    refusals_are_counted_and_the_worker_serves_on,
    prometheus_stores_exemplars_and_app_figures,
);

const KINDS: [&str; 3] = ["book", "pen", "ink"];

/// A config file with one gauge family per mode (`app_level_<mode>`).
fn config(dir: &std::path::Path) -> String {
    let path = dir.join("gpe.toml");
    std::fs::write(
        &path,
        "[app_metrics.app_level_max]\ngauge = \"max\"\n\
         [app_metrics.app_level_min]\ngauge = \"min\"\n\
         [app_metrics.app_level_latest]\ngauge = \"latest\"\n\
         [app_metrics.app_level_each]\ngauge = \"per_worker\"\n\
         [app_metrics.app_order_value]\nbuckets = [10, 25, 40]\n",
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

fn start(worker: &str, workers: u32, conf: &tempfile::TempDir) -> Server {
    Server::start(
        TESTAPP,
        Opts::new(worker, workers).args(&["-c", &config(conf.path())]),
    )
}

/// Kills one worker with SIGKILL and waits until its slot serves again.
fn kill_9(s: &Server, slot: &str) {
    let pid = s.worker_pids()[slot];
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || s
            .worker_pids()
            .get(slot)
            .is_some_and(|p| *p != pid)),
        "slot {slot} is not replaced; log:\n{}",
        s.log()
    );
    s.wait_ready(s.workers);
}

/// Sends `n` orders from 4 clients, numbered from `first`; returns the
/// (kind, value) of each, all answered 200.
fn orders(s: &Server, first: usize, n: usize) -> Vec<(&'static str, u64)> {
    let addr = s.addr;
    let sent = parallel(4, n / 4, move |c, i| {
        let k = first + c * (n / 4) + i;
        let (kind, value) = (KINDS[k % 3], (k % 50) as u64);
        let r = http(addr, "GET", &format!("/order/{kind}/{value}"), &[], b"").unwrap();
        assert_eq!(r.status, 200);
        (kind, value)
    });
    assert_eq!(sent.len(), n);
    sent
}

fn counters_and_histograms_are_exact_after_kill_9(worker: &str) {
    let conf = tempfile::tempdir().unwrap();
    let s = start(worker, 4, &conf);
    let mut sent = orders(&s, 0, 800);
    kill_9(&s, "1");
    sent.extend(orders(&s, 800, 600));
    kill_9(&s, "3");
    sent.extend(orders(&s, 1400, 600));
    assert_eq!(sent.len(), 2000);
    let mut per_kind: BTreeMap<&str, f64> = BTreeMap::new();
    for (k, _) in &sent {
        *per_kind.entry(k).or_default() += 1.0;
    }
    let sum: u64 = sent.iter().map(|(_, v)| v).sum();
    s.wait_for("app_order_value_count", &[], 2000.0);
    let m = s.scrape();
    for (kind, n) in &per_kind {
        assert_eq!(m.one("app_orders_total", &[("kind", kind)]), *n, "{kind}");
    }
    assert_eq!(m.one("app_order_value_sum", &[]), sum as f64);
    // Values 0..49: 11 of each 50 are <= 10, 26 <= 25, 41 <= 40.
    assert_eq!(
        m.one("app_order_value_bucket", &[("le", "10")]),
        11.0 * 40.0
    );
    assert_eq!(
        m.one("app_order_value_bucket", &[("le", "25")]),
        26.0 * 40.0
    );
    assert_eq!(m.one("app_order_value_bucket", &[("le", "+Inf")]), 2000.0);
    assert_eq!(
        m.one("gpe_master_worker_exits_total", &[("reason", "crash")]),
        2.0
    );
    assert!(m
        .text
        .contains("# HELP app_orders_total Orders the testapp took, by kind"));
    let (ok, out) = promtool_check(&m.text);
    assert!(ok, "promtool: {out}\n{}", m.text);
}

/// Raises gauge `app_level_<name>` by 1 with each of `n` requests from 3
/// clients; returns how many each slot served (all of them were these).
fn raise(s: &Server, name: &'static str, n: usize) -> BTreeMap<String, f64> {
    let addr = s.addr;
    parallel(3, n / 3, move |_, _| {
        let r = http(addr, "GET", &format!("/gauge/{name}/inc/1"), &[], b"").unwrap();
        assert_eq!(r.status, 200);
    });
    s.wait_for("gpe_http_requests_total", &[("status", "200")], n as f64);
    s.scrape()
        .samples("gpe_worker_requests_total")
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(l, v)| (l["worker"].clone(), v))
        .collect()
}

fn gauge_sum_loses_a_killed_worker(worker: &str) {
    let conf = tempfile::tempdir().unwrap();
    let s = start(worker, 3, &conf);
    let served = raise(&s, "sum", 60);
    s.wait_for("app_level_sum", &[], 60.0);
    let (victim, lost) = served
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(w, v)| (w.clone(), *v))
        .unwrap();
    kill_9(&s, &victim);
    s.wait_for("app_level_sum", &[], 60.0 - lost);
}

fn gauge_max(worker: &str) {
    let conf = tempfile::tempdir().unwrap();
    let s = start(worker, 3, &conf);
    let served = raise(&s, "max", 60);
    let want = served.values().copied().fold(f64::MIN, f64::max);
    s.wait_for("app_level_max", &[], want);
}

fn gauge_min(worker: &str) {
    let conf = tempfile::tempdir().unwrap();
    let s = start(worker, 3, &conf);
    let served = raise(&s, "min", 60);
    // Only workers that set the gauge count.
    let want = served.values().copied().fold(f64::MAX, f64::min);
    s.wait_for("app_level_min", &[], want);
}

fn gauge_latest(worker: &str) {
    let conf = tempfile::tempdir().unwrap();
    let s = start(worker, 3, &conf);
    for v in 1..=30 {
        let r = http(s.addr, "GET", &format!("/gauge/latest/set/{v}"), &[], b"").unwrap();
        assert_eq!(r.status, 200);
    }
    s.wait_for("app_level_latest", &[], 30.0);
}

fn gauge_per_worker(worker: &str) {
    let conf = tempfile::tempdir().unwrap();
    let s = start(worker, 3, &conf);
    let served = raise(&s, "each", 60);
    let mut got = BTreeMap::new();
    let ok = wait_until(Duration::from_secs(10), || {
        got = s
            .scrape()
            .samples("app_level_each")
            .into_iter()
            .map(|(l, v)| (l["worker"].clone(), v))
            .collect();
        got == served
    });
    assert!(ok, "per-worker gauge {got:?}, served {served:?}");
}

fn cardinality_is_capped_with_other(worker: &str) {
    let conf = tempfile::tempdir().unwrap();
    let s = Server::start(
        TESTAPP,
        Opts::new(worker, 2).args(&["-c", &config(conf.path()), "--metrics-max-series", "100"]),
    );
    let addr = s.addr;
    let statuses = parallel(4, 2500, move |c, i| {
        http(addr, "GET", &format!("/user/{c}-{i}"), &[], b"")
            .map(|r| r.status)
            .unwrap_or(0)
    });
    assert!(statuses.iter().all(|s| *s == 200));
    s.wait_for("app_users_total", &[("user", "other")], 9_900.0);
    let m = s.scrape();
    let series = m.samples("app_users_total");
    assert_eq!(series.len(), 101, "the cap plus `other`");
    assert_eq!(m.sum("app_users_total", &[]), 10_000.0, "nothing lost");
    assert_eq!(
        m.one(
            "gpe_metrics_series_dropped_total",
            &[("family", "app_users_total")]
        ),
        9_900.0
    );
}

fn refusals_are_counted_and_the_worker_serves_on(worker: &str) {
    let conf = tempfile::tempdir().unwrap();
    let s = start(worker, 1, &conf);
    let pid = s.worker_pids()["0"];
    for _ in 0..3 {
        for what in ["bad_name", "gpe", "clash"] {
            let r = http(s.addr, "GET", &format!("/refuse/{what}"), &[], b"").unwrap();
            assert_eq!((r.status, r.body.as_slice()), (200, &b"recorded"[..]));
        }
    }
    for reason in ["invalid_name", "gpe_collision", "type_clash"] {
        s.wait_for("gpe_metrics_rejected_total", &[("reason", reason)], 1.0);
    }
    let m = s.scrape();
    assert_eq!(
        m.one(
            "gpe_metrics_rejected_total",
            &[("reason", "too_many_families")]
        ),
        0.0
    );
    assert!(!m.text.contains("app-bad-name") && !m.text.contains("gpe_app_total"));
    assert_eq!(get(s.addr, "/").status, 200);
    assert_eq!(s.worker_pids()["0"], pid, "the worker serves on");
    let log = s.log();
    for reason in ["invalid_name", "gpe_collision", "type_clash"] {
        assert_eq!(
            log.matches(&format!("refused ({reason})")).count(),
            1,
            "one error line per refusal:\n{log}"
        );
    }
}

/// A Prometheus server killed on drop.
struct Prometheus {
    child: std::process::Child,
    api: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts Prometheus with exemplar storage, scraping `target` each second.
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gpe\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--enable-feature=exemplar-storage")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("prometheus is required (Debian package `prometheus`)");
        Prometheus {
            child,
            api: format!("127.0.0.1:{port}").parse().unwrap(),
            dir,
        }
    }

    fn get(&self, path: &str) -> String {
        http(self.api, "GET", path, &[], b"")
            .map(|r| String::from_utf8_lossy(&r.body).into_owned())
            .unwrap_or_default()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

/// The values of `"trace_id":"..."` in a Prometheus answer.
fn trace_ids(body: &str) -> BTreeSet<String> {
    body.split("\"trace_id\":\"")
        .skip(1)
        .filter_map(|rest| rest.split('"').next())
        .map(str::to_owned)
        .collect()
}

fn prometheus_stores_exemplars_and_app_figures(worker: &str) {
    let conf = tempfile::tempdir().unwrap();
    let s = start(worker, 2, &conf);
    let prom = Prometheus::start(s.metrics);
    let mut sent = BTreeSet::new();
    for i in 0..30u64 {
        let trace: u128 = rand::random::<u128>() | 1;
        let hex = format!("{trace:032x}");
        let tp = format!("00-{hex}-00f067aa0ba902b7-01");
        let r = http(
            s.addr,
            "GET",
            &format!("/order/{}/{}", KINDS[(i % 3) as usize], i),
            &[("traceparent", tp.as_str())],
            b"",
        )
        .unwrap();
        assert_eq!(r.status, 200);
        sent.insert(hex);
    }
    let now = gpe_core::unix_now_ns() / 1_000_000_000;
    let window = format!("start={}&end={}", now - 3600, now + 3600);
    let (mut duration, mut app, mut orders) = (String::new(), String::new(), String::new());
    let got = wait_until(Duration::from_secs(40), || {
        duration = prom.get(&format!(
            "/api/v1/query_exemplars?query=gpe_http_request_duration_seconds_bucket&{window}"
        ));
        app = prom.get(&format!(
            "/api/v1/query_exemplars?query=app_order_value_bucket&{window}"
        ));
        orders = prom.get("/api/v1/query?query=sum%28app_orders_total%29");
        !trace_ids(&duration).is_empty()
            && !trace_ids(&app).is_empty()
            && orders.contains(",\"30\"]")
    });
    assert!(
        got,
        "exemplars and app figures in Prometheus; duration: {duration}; app: {app}; \
         orders: {orders}; log:\n{}",
        prom.log()
    );
    for ids in [trace_ids(&duration), trace_ids(&app)] {
        assert!(ids.is_subset(&sent), "{ids:?} not all sent");
    }
    let per_kind = prom.get("/api/v1/query?query=app_orders_total%7Bkind%3D%22pen%22%7D");
    assert!(per_kind.contains(",\"10\"]"), "{per_kind}");
}
