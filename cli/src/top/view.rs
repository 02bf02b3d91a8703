//! What `gpe top` shows, computed from one reading of the exposition and the
//! one before it: rates and latency quantiles come from the deltas between
//! the two.

use std::collections::BTreeMap;
use std::time::Instant;

use super::expo::{Exposition, Sample};

/// One exposition and when it was read.
#[derive(Debug, Clone)]
pub struct Reading {
    /// The samples.
    pub expo: Exposition,
    /// When the read finished.
    pub at: Instant,
}

/// One worker slot's row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Slot {
    /// Slot number.
    pub slot: u32,
    /// Pid of the slot's newest process; `None` when the slot has none.
    pub pid: Option<u32>,
    /// `booting`, `idle`, `busy` or `draining`; `None` when no process.
    pub state: Option<String>,
    /// Requests served by the slot, over every process it has had.
    pub requests: f64,
    /// Requests per second over the last interval.
    pub rate: Option<f64>,
    /// Requests in progress in the newest process.
    pub in_flight: Option<f64>,
    /// Open connections of the newest process.
    pub connections: Option<f64>,
    /// Resident memory in bytes.
    pub rss: Option<f64>,
    /// CPU seconds of the slot, over every process it has had.
    pub cpu_seconds: Option<f64>,
    /// CPU use over the last interval, in percent of one core.
    pub cpu_pct: Option<f64>,
    /// Seconds since the newest process started.
    pub uptime: Option<f64>,
    /// Median request duration of the slot in seconds over the last
    /// interval (since start on the first reading), from
    /// `gpe_worker_request_duration_seconds`; `None` without requests.
    pub p50: Option<f64>,
    /// 99th-percentile request duration of the slot, likewise.
    pub p99: Option<f64>,
}

/// One route's row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RouteRow {
    /// The route label.
    pub route: String,
    /// Requests answered on the route.
    pub requests: f64,
    /// Requests per second over the last interval.
    pub rate: Option<f64>,
    /// Failed requests (`gpe_http_errors_total`).
    pub errors: f64,
    /// Errors per request over the last interval (since start on the first
    /// reading).
    pub error_ratio: Option<f64>,
    /// Median latency in seconds over the interval (since start at first).
    pub p50: Option<f64>,
    /// 99th-percentile latency in seconds, likewise.
    pub p99: Option<f64>,
}

/// Everything on one screen.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct View {
    /// One row per slot, by slot number.
    pub slots: Vec<Slot>,
    /// Routes, by name.
    pub routes: Vec<RouteRow>,
    /// All routes together (its `route` is empty).
    pub total: RouteRow,
    /// Requests in progress in the whole server.
    pub in_flight: Option<f64>,
    /// Worker exits by reason.
    pub exits: Vec<(String, f64)>,
    /// Signals the master handled, by signal.
    pub signals: Vec<(String, f64)>,
    /// Workers serving.
    pub workers: Option<f64>,
    /// Workers desired.
    pub desired: Option<f64>,
    /// The master's pid, from `gpe_master_info`.
    pub master_pid: Option<u32>,
    /// The master's start time in Unix seconds, when the exporter could read it.
    pub master_start: Option<f64>,
}

fn per_slot<'a>(e: &'a Exposition, name: &'a str) -> impl Iterator<Item = (u32, &'a Sample)> + 'a {
    e.named(name)
        .filter_map(|s| Some((s.label("worker")?.parse().ok()?, s)))
}

fn slot_values(e: &Exposition, name: &str) -> BTreeMap<u32, f64> {
    per_slot(e, name).map(|(n, s)| (n, s.value)).collect()
}

/// Sum of `name`'s samples grouped by the value of label `by`.
fn sum_by(e: &Exposition, name: &str, by: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for s in e.named(name) {
        if let Some(k) = s.label(by) {
            *out.entry(k.to_owned()).or_default() += s.value;
        }
    }
    out
}

/// Cumulative bucket counts (`le` → count) summed over every series whose
/// `route` is `route` (all series when `None`).
fn buckets(e: &Exposition, route: Option<&str>) -> Vec<(f64, f64)> {
    buckets_where(e, "gpe_http_request_duration_seconds_bucket", |s| {
        route.is_none_or(|r| s.label("route") == Some(r))
    })
}

/// The cumulative buckets of worker slot `slot`'s request durations.
fn slot_buckets(e: &Exposition, slot: u32) -> Vec<(f64, f64)> {
    let slot = slot.to_string();
    buckets_where(e, "gpe_worker_request_duration_seconds_bucket", |s| {
        s.label("worker") == Some(slot.as_str())
    })
}

/// Cumulative bucket counts (`le` → count) of the histogram samples `name`,
/// summed over the series that `keep` selects.
fn buckets_where(e: &Exposition, name: &str, keep: impl Fn(&Sample) -> bool) -> Vec<(f64, f64)> {
    let mut by_le: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for s in e.named(name) {
        if !keep(s) {
            continue;
        }
        let Some(le) = s.label("le").and_then(|l| match l {
            "+Inf" => Some(f64::INFINITY),
            l => l.parse::<f64>().ok(),
        }) else {
            continue;
        };
        // A total order on the bounds: their bits, since all are >= 0.
        let e = by_le.entry(le.to_bits()).or_insert((le, 0.0));
        e.1 += s.value;
    }
    let mut v: Vec<(f64, f64)> = by_le.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The `q` quantile of cumulative buckets, interpolated within a bucket as
/// Prometheus' `histogram_quantile` does; a rank in the `+Inf` bucket gives
/// the highest finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            if in_bucket <= 0.0 {
                return Some(le);
            }
            return Some(lower.0 + (le - lower.0) * (rank - lower.1) / in_bucket);
        }
        lower = (le, count);
    }
    Some(lower.0)
}

fn delta_buckets(now: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|&(le, c)| {
            let old = before
                .iter()
                .find(|(l, _)| *l == le)
                .map_or(0.0, |(_, c)| *c);
            // A restarted server starts from zero: no negative counts.
            (le, (c - old).max(0.0))
        })
        .collect()
}

impl View {
    /// The view of `now`, with rates against `before` when there is one.
    pub fn new(now: &Reading, before: Option<&Reading>) -> View {
        let e = &now.expo;
        let secs = before
            .map(|b| now.at.duration_since(b.at).as_secs_f64())
            .filter(|s| *s > 0.0);
        let rate = |n: f64, o: Option<f64>| Some((n - o?).max(0.0) / secs?);

        let old = |name: &str| before.map(|b| slot_values(&b.expo, name));
        let requests = slot_values(e, "gpe_worker_requests_total");
        let old_requests = old("gpe_worker_requests_total");
        let cpu = slot_values(e, "gpe_worker_cpu_seconds_total");
        let old_cpu = old("gpe_worker_cpu_seconds_total");
        let in_flight = slot_values(e, "gpe_worker_requests_in_flight");
        let conns = slot_values(e, "gpe_worker_connections");
        let rss = slot_values(e, "gpe_worker_resident_memory_bytes");
        let uptime = slot_values(e, "gpe_worker_uptime_seconds");
        let pids: BTreeMap<u32, u32> = per_slot(e, "gpe_worker_info")
            .filter_map(|(n, s)| Some((n, s.label("pid")?.parse().ok()?)))
            .collect();
        let states: BTreeMap<u32, String> = per_slot(e, "gpe_worker_state")
            .filter(|(_, s)| s.value == 1.0)
            .filter_map(|(n, s)| Some((n, s.label("state")?.to_owned())))
            .collect();
        let mut numbers: Vec<u32> = requests
            .keys()
            .chain(pids.keys())
            .chain(states.keys())
            .copied()
            .collect();
        numbers.sort_unstable();
        numbers.dedup();
        let slots = numbers
            .into_iter()
            .map(|n| {
                let get = |m: &BTreeMap<u32, f64>| m.get(&n).copied();
                let req = get(&requests).unwrap_or(0.0);
                let c = get(&cpu);
                // The slot's histogram keeps its counts across respawns, so
                // the interval's buckets are a plain difference.
                let b = slot_buckets(e, n);
                let d = match before {
                    Some(p) => delta_buckets(&b, &slot_buckets(&p.expo, n)),
                    None => b,
                };
                Slot {
                    slot: n,
                    pid: pids.get(&n).copied(),
                    state: states.get(&n).cloned(),
                    requests: req,
                    rate: rate(req, old_requests.as_ref().and_then(|m| m.get(&n).copied())),
                    in_flight: get(&in_flight),
                    connections: get(&conns),
                    rss: get(&rss),
                    cpu_seconds: c,
                    cpu_pct: c
                        .and_then(|c| rate(c, old_cpu.as_ref().and_then(|m| m.get(&n).copied())))
                        .map(|r| r * 100.0),
                    uptime: get(&uptime),
                    p50: quantile(0.5, &d),
                    p99: quantile(0.99, &d),
                }
            })
            .collect();

        let reqs = sum_by(e, "gpe_http_requests_total", "route");
        let errs = sum_by(e, "gpe_http_errors_total", "route");
        let old_reqs = before.map(|b| sum_by(&b.expo, "gpe_http_requests_total", "route"));
        let old_errs = before.map(|b| sum_by(&b.expo, "gpe_http_errors_total", "route"));
        let row = |route: Option<&str>| {
            let pick = |m: &BTreeMap<String, f64>| match route {
                Some(r) => m.get(r).copied().unwrap_or(0.0),
                // A fold from +0: an empty f64 sum is -0, shown as `-0`.
                None => m.values().fold(0.0, |a, b| a + b),
            };
            let requests = pick(&reqs);
            let errors = pick(&errs);
            let (old_r, old_e) = (
                old_reqs.as_ref().map(pick).unwrap_or(0.0),
                old_errs.as_ref().map(pick).unwrap_or(0.0),
            );
            let d_req = (requests - old_r).max(0.0);
            let d_err = (errors - old_e).max(0.0);
            let b = buckets(e, route);
            let d = match before {
                Some(p) => delta_buckets(&b, &buckets(&p.expo, route)),
                None => b,
            };
            RouteRow {
                route: route.unwrap_or_default().to_owned(),
                requests,
                rate: rate(requests, old_reqs.as_ref().map(pick)),
                errors,
                error_ratio: (d_req > 0.0).then(|| d_err / d_req),
                p50: quantile(0.5, &d),
                p99: quantile(0.99, &d),
            }
        };
        let mut names: Vec<&String> = reqs.keys().chain(errs.keys()).collect();
        names.sort();
        names.dedup();
        let routes = names.into_iter().map(|r| row(Some(r))).collect();
        let total = row(None);

        let labelled = |name: &str, label: &str| -> Vec<(String, f64)> {
            e.named(name)
                .filter_map(|s| Some((s.label(label)?.to_owned(), s.value)))
                .collect()
        };
        View {
            slots,
            routes,
            total,
            in_flight: e.scalar("gpe_http_requests_in_flight"),
            exits: labelled("gpe_master_worker_exits_total", "reason"),
            signals: labelled("gpe_master_signals_total", "signal"),
            workers: e.scalar("gpe_master_workers"),
            desired: e.scalar("gpe_master_workers_desired"),
            master_pid: e
                .named("gpe_master_info")
                .find_map(|s| s.label("pid")?.parse().ok()),
            master_start: e.scalar("process_start_time_seconds"),
        }
    }

    /// The master's pid when it runs on this machine, in this pid namespace:
    /// the process with that pid here started when the scrape says the
    /// master started. Keys that signal the master need it.
    pub fn local_master(&self) -> Option<u32> {
        let pid = self.master_pid?;
        let here = gpe_exporter::procstat::read(pid)?;
        ((here.start_time - self.master_start?).abs() < 1.5).then_some(pid)
    }
}

fn or_dash(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_owned(), f)
}

/// The `--once` table: a header line starting with `#`, then one line per
/// worker slot starting with the slot number, raw numbers for scripts
/// (`-` where a slot has no process, and for the quantiles of a slot
/// without requests).
pub fn once_table(v: &View) -> String {
    let mut out = String::from(
        "# slot state pid requests in_flight connections rss_bytes cpu_seconds uptime_seconds \
         p50_seconds p99_seconds\n",
    );
    for s in &v.slots {
        let int = |v: Option<f64>| or_dash(v, |x| format!("{x:.0}"));
        out.push_str(&format!(
            "{} {} {} {:.0} {} {} {} {} {} {} {}\n",
            s.slot,
            s.state.as_deref().unwrap_or("-"),
            s.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            s.requests,
            int(s.in_flight),
            int(s.connections),
            int(s.rss),
            or_dash(s.cpu_seconds, |x| format!("{x:.3}")),
            or_dash(s.uptime, |x| format!("{x:.1}")),
            or_dash(s.p50, |x| format!("{x:.6}")),
            or_dash(s.p99, |x| format!("{x:.6}")),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const ONE: &str = r#"
gpe_http_requests_total{method="GET",route="/",status="200"} 10
gpe_http_requests_total{method="GET",route="/u/{id}",status="500"} 4
gpe_http_errors_total{method="GET",route="/u/{id}",kind="app_error"} 4
gpe_http_request_duration_seconds_bucket{method="GET",route="/",le="0.1"} 10
gpe_http_request_duration_seconds_bucket{method="GET",route="/",le="1"} 10
gpe_http_request_duration_seconds_bucket{method="GET",route="/",le="+Inf"} 10
gpe_http_request_duration_seconds_bucket{method="GET",route="/u/{id}",le="0.1"} 0
gpe_http_request_duration_seconds_bucket{method="GET",route="/u/{id}",le="1"} 4
gpe_http_request_duration_seconds_bucket{method="GET",route="/u/{id}",le="+Inf"} 4
gpe_http_requests_in_flight 1
gpe_worker_requests_total{worker="0"} 6
gpe_worker_requests_total{worker="1"} 8
gpe_worker_requests_total{worker="2"} 0
gpe_worker_cpu_seconds_total{worker="0"} 1.0
gpe_worker_requests_in_flight{worker="0"} 1.0
gpe_worker_connections{worker="0"} 2.0
gpe_worker_resident_memory_bytes{worker="0"} 5242880.0
gpe_worker_uptime_seconds{worker="0"} 61.5
gpe_worker_request_duration_seconds_bucket{worker="0",le="0.1"} 6
gpe_worker_request_duration_seconds_bucket{worker="0",le="1"} 6
gpe_worker_request_duration_seconds_bucket{worker="0",le="+Inf"} 6
gpe_worker_request_duration_seconds_bucket{worker="1",le="0.1"} 2
gpe_worker_request_duration_seconds_bucket{worker="1",le="1"} 8
gpe_worker_request_duration_seconds_bucket{worker="1",le="+Inf"} 8
gpe_worker_state{worker="0",state="idle"} 0
gpe_worker_state{worker="0",state="busy"} 1
gpe_worker_state{worker="1",state="idle"} 1
gpe_worker_info{worker="0",pid="100",kind="sync"} 1
gpe_worker_info{worker="1",pid="101",kind="sync"} 1
gpe_master_worker_exits_total{reason="crash"} 1
gpe_master_signals_total{signal="TTIN"} 2
gpe_master_workers 2
gpe_master_workers_desired 2
gpe_master_info{pid="99"} 1
"#;

    fn reading(text: &str, at: Instant) -> Reading {
        Reading {
            expo: Exposition::parse(text),
            at,
        }
    }

    #[test]
    fn one_reading_gives_counts_states_and_since_start_quantiles() {
        let v = View::new(&reading(ONE, Instant::now()), None);
        assert_eq!(v.slots.len(), 3);
        let s0 = &v.slots[0];
        assert_eq!(
            (s0.slot, s0.pid, s0.state.as_deref(), s0.requests),
            (0, Some(100), Some("busy"), 6.0)
        );
        assert_eq!((s0.in_flight, s0.connections), (Some(1.0), Some(2.0)));
        assert_eq!((s0.rate, s0.cpu_pct), (None, None));
        // Slot 0's 6 requests all took (0, 0.1]: rank 3 interpolates to
        // 0.05, rank 5.94 to 0.099. Slot 1: 2 fast, 6 in (0.1, 1]; rank 4
        // is 2/6 into the second bucket (0.4), rank 7.92 is 5.92/6 (0.988).
        // Slot 2 has no histogram: no quantiles.
        assert!((s0.p50.unwrap() - 0.05).abs() < 1e-9);
        assert!((s0.p99.unwrap() - 0.099).abs() < 1e-9);
        assert!((v.slots[1].p50.unwrap() - 0.4).abs() < 1e-9);
        assert!((v.slots[1].p99.unwrap() - 0.988).abs() < 1e-9);
        assert_eq!((v.slots[2].p50, v.slots[2].p99), (None, None));
        // Slot 2 has counters but no process.
        assert_eq!((v.slots[2].pid, v.slots[2].state.as_deref()), (None, None));
        assert_eq!(v.total.requests, 14.0);
        assert_eq!(v.total.errors, 4.0);
        let u = v.routes.iter().find(|r| r.route == "/u/{id}").unwrap();
        assert_eq!(u.error_ratio, Some(1.0));
        // 4 requests in (0.1, 1]: the median interpolates to 0.55.
        assert!((u.p50.unwrap() - 0.55).abs() < 1e-9);
        assert_eq!(v.exits, [("crash".to_owned(), 1.0)]);
        assert_eq!(v.signals, [("TTIN".to_owned(), 2.0)]);
        assert_eq!((v.workers, v.master_pid), (Some(2.0), Some(99)));
        assert_eq!(
            once_table(&v),
            "# slot state pid requests in_flight connections rss_bytes cpu_seconds uptime_seconds \
             p50_seconds p99_seconds\n\
             0 busy 100 6 1 2 5242880 1.000 61.5 0.050000 0.099000\n\
             1 idle 101 8 - - - - - 0.400000 0.988000\n\
             2 - - 0 - - - - - - -\n"
        );
    }

    #[test]
    fn two_readings_give_rates_and_interval_quantiles() {
        let t0 = Instant::now();
        let later = ONE
            .replace(r#"{worker="0"} 6"#, r#"{worker="0"} 26"#)
            .replace(
                r#"cpu_seconds_total{worker="0"} 1.0"#,
                r#"cpu_seconds_total{worker="0"} 1.5"#,
            )
            .replace(
                r#"route="/",status="200"} 10"#,
                r#"route="/",status="200"} 30"#,
            )
            .replace(r#"route="/",le="1"} 10"#, r#"route="/",le="1"} 30"#)
            .replace(r#"route="/",le="+Inf"} 10"#, r#"route="/",le="+Inf"} 30"#)
            // Slot 0's 20 new requests: 10 in (0, 0.1], 10 in (0.1, 1].
            .replace(r#"worker="0",le="0.1"} 6"#, r#"worker="0",le="0.1"} 16"#)
            .replace(r#"worker="0",le="1"} 6"#, r#"worker="0",le="1"} 26"#)
            .replace(r#"worker="0",le="+Inf"} 6"#, r#"worker="0",le="+Inf"} 26"#);
        let v = View::new(
            &reading(&later, t0 + Duration::from_secs(2)),
            Some(&reading(ONE, t0)),
        );
        assert_eq!(v.slots[0].rate, Some(10.0));
        assert_eq!(v.slots[0].cpu_pct, Some(25.0));
        assert_eq!(v.slots[1].rate, Some(0.0));
        // Over the interval only: rank 10 of 20 ends the fast bucket (0.1),
        // rank 19.8 is 9.8/10 into (0.1, 1].
        assert!((v.slots[0].p50.unwrap() - 0.1).abs() < 1e-9);
        assert!((v.slots[0].p99.unwrap() - 0.982).abs() < 1e-9);
        // Slot 1 served nothing in the interval: `-`, not its older figure.
        assert_eq!((v.slots[1].p50, v.slots[1].p99), (None, None));
        let root = v.routes.iter().find(|r| r.route == "/").unwrap();
        assert_eq!(root.rate, Some(10.0));
        assert_eq!(root.error_ratio, Some(0.0));
        // The 20 new requests all took (0.1, 1]: not the 10 older fast ones.
        assert!((root.p50.unwrap() - 0.55).abs() < 1e-9);
        // No request on /u/{id} in the interval: no ratio, no quantile.
        let u = v.routes.iter().find(|r| r.route == "/u/{id}").unwrap();
        assert_eq!((u.error_ratio, u.p50), (None, None));
    }

    #[test]
    fn an_empty_reading_gives_zeroes_not_minus_zero() {
        let v = View::new(&reading("", Instant::now()), None);
        assert!(v.total.requests.is_sign_positive() && v.total.errors.is_sign_positive());
        assert_eq!(format!("{:.0}", v.total.errors), "0");
        assert!(v.slots.is_empty() && v.routes.is_empty());
    }

    #[test]
    fn quantiles_follow_histogram_quantile() {
        let b = [(0.1, 50.0), (1.0, 90.0), (f64::INFINITY, 100.0)];
        assert!((quantile(0.5, &b).unwrap() - 0.1).abs() < 1e-9);
        assert!((quantile(0.7, &b).unwrap() - 0.55).abs() < 1e-9);
        // In the +Inf bucket: the highest finite bound.
        assert_eq!(quantile(0.99, &b), Some(1.0));
        assert_eq!(quantile(0.5, &[(0.1, 0.0), (f64::INFINITY, 0.0)]), None);
        assert_eq!(quantile(0.5, &[]), None);
    }

    #[test]
    fn the_master_is_local_only_when_its_start_time_matches() {
        let me = std::process::id();
        let start = gpe_exporter::procstat::read(me).unwrap().start_time;
        let mut v = View {
            master_pid: Some(me),
            master_start: Some(start),
            ..View::default()
        };
        assert_eq!(v.local_master(), Some(me));
        v.master_start = Some(start - 100.0);
        assert_eq!(v.local_master(), None);
        v.master_start = None;
        assert_eq!(v.local_master(), None);
    }
}
