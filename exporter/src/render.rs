//! Turns a store [`Snapshot`] plus `/proc` figures into one exposition, through
//! a prometheus-client [`Collector`]: OpenMetrics 1.0 or the Prometheus text
//! format 0.0.4. Every family is written exactly once.

use std::collections::BTreeMap;

use gpe_core::CELLS;
use gpe_core::{AppKind, AppSeries, AppValue, ExemplarView, RejectReason};
use gpe_core::{Buckets, Shape, SIZE_BUCKETS};
use gpe_core::{ExitReason, Family, MasterSignal, Series, Snapshot, SnapshotReader, StoreDir};
use gpe_core::{WorkerState, WorkerView};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use prometheus_client::registry::Unit;

use crate::procstat::{self, ProcStat};
use crate::web_config::AuthFailure;

/// The HTTP families, the first of a scrape, in the order they are written.
const HTTP_FAMILIES: [Family; 5] = [
    Family::HttpRequests,
    Family::HttpDuration,
    Family::HttpRequestSize,
    Family::HttpResponseSize,
    Family::HttpErrors,
];

/// Which exposition format to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// OpenMetrics 1.0 text.
    OpenMetrics,
    /// Prometheus text format 0.0.4.
    Text004,
}

impl Format {
    /// The `Content-Type` of this format.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Format::Text004 => prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        }
    }

    /// Chooses by the request's `Accept` header, as Prometheus negotiates.
    pub fn from_accept(accept: Option<&str>) -> Format {
        match accept {
            Some(a) if a.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text004,
        }
    }
}

/// Everything one scrape shows, gathered before encoding.
#[derive(Debug)]
pub struct Scrape {
    snap: Snapshot,
    procs: Procs,
    now: f64,
    /// The exporter's own refusals, by [`AuthFailure`] reason.
    auth_failures: [u64; AuthFailure::ALL.len()],
}

/// `/proc` figures read together with the store, inside its fold window.
/// The highest CPU seconds an exporter has served for each slot
/// ([`Scrape::keep_cpu_monotonic`]).
#[derive(Debug, Default)]
pub struct CpuFloor(BTreeMap<u32, f64>);

#[derive(Debug, Default)]
struct Procs {
    /// Figures of each slot's newest process.
    newest: BTreeMap<u32, ProcStat>,
    /// CPU seconds per slot: retired plus every live process of the slot.
    cpu: BTreeMap<u32, f64>,
    master: Option<ProcStat>,
}

impl Procs {
    /// The `/proc` figures of the live workers and the master (inside the
    /// store's fold window: see [`SnapshotReader::read_with`]).
    fn read(workers: &[WorkerView], master: Option<u32>) -> Procs {
        let mut p = Procs::default();
        for w in workers {
            for (i, pid) in w.pids.iter().enumerate() {
                if let Some(st) = procstat::read_worker(*pid) {
                    *p.cpu.entry(w.slot).or_default() += st.cpu_seconds;
                    if i == 0 {
                        p.newest.insert(w.slot, st);
                    }
                }
            }
        }
        p.master = master.and_then(procstat::read);
        p
    }

    /// Adds the CPU seconds of each slot's exited processes, kept in the
    /// store.
    fn add_retired(mut self, snap: &Snapshot) -> Procs {
        for s in snap
            .series
            .iter()
            .filter(|s| s.family == Family::WorkerCpuRetired)
        {
            if let Some(slot) = s.labels.first().and_then(|l| l.parse().ok()) {
                *self.cpu.entry(slot).or_default() += s.cells[0] as f64 / 1e9;
            }
        }
        self
    }
}

impl Scrape {
    /// Reads the store and the `/proc` figures of its processes consistently.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn collect(store: &StoreDir) -> std::io::Result<Scrape> {
        Self::collect_with(&mut SnapshotReader::new(store.clone()))
    }

    /// As [`Scrape::collect`], through `reader` (which keeps the worker files
    /// mapped for the next scrape).
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn collect_with(reader: &mut SnapshotReader) -> std::io::Result<Scrape> {
        let (snap, procs) = reader.read_with(Procs::read)?;
        let procs = procs.add_retired(&snap);
        Ok(Scrape {
            snap,
            procs,
            now: gpe_core::unix_now_ns() as f64 / 1e9,
            auth_failures: [0; AuthFailure::ALL.len()],
        })
    }

    /// Serves no slot's CPU seconds below what `floor` says was served
    /// before, and raises `floor` to what this scrape serves.
    ///
    /// The figure is the retired CPU the master folded from each reaped
    /// process's rusage plus the live processes' `/proc` times, two sources
    /// that no lock reads together with the kernel's exit accounting. A
    /// counter read a moment apart from each can come out a little lower
    /// than the scrape before (seen in the chaos test after kill -9, by up to
    /// a few tenths of a second), and Prometheus reads any decrease as a
    /// reset. The true figure only grows, so the higher one stands.
    pub fn keep_cpu_monotonic(&mut self, floor: &mut CpuFloor) {
        for (slot, v) in &mut self.procs.cpu {
            let seen = floor.0.entry(*slot).or_insert(*v);
            if *v < *seen {
                *v = *seen;
            } else {
                *seen = *v;
            }
        }
    }

    /// Adds the exporter's refusals by reason, in [`AuthFailure::ALL`] order.
    pub fn with_auth_failures(mut self, counts: [u64; AuthFailure::ALL.len()]) -> Scrape {
        self.auth_failures = counts;
        self
    }
}

type Labels<'a> = Vec<(&'a str, &'a str)>;

fn counter<V: prometheus_client::encoding::EncodeCounterValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        m.encode_family(labels)?
            .encode_counter::<NoLabelSet, V, f64>(v, None::<&Exemplar<NoLabelSet, f64>>)?;
    }
    Ok(())
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[(Labels<'_>, V)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        m.encode_family(labels)?.encode_gauge(v)?;
    }
    Ok(())
}

/// An info metric, written as a gauge of value 1 named `<name>_info` (the
/// form `promtool check metrics` accepts in both formats; Prometheus ingests
/// OpenMetrics info metrics the same way).
fn info(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    samples: &[Labels<'_>],
) -> std::fmt::Result {
    let name = format!("{name}_info");
    let mut m = enc.encode_descriptor(&name, help, None, MetricType::Gauge)?;
    for labels in samples {
        m.encode_family(labels)?.encode_gauge(&1i64)?;
    }
    Ok(())
}

fn labels_of<'a>(family: Family, s: &'a Series) -> Labels<'a> {
    family
        .labels()
        .iter()
        .copied()
        .zip(s.labels.iter().map(String::as_str))
        .collect()
}

impl Scrape {
    /// Start time of a slot's newest process: from `/proc`, else from its store
    /// file (written by the master at fork).
    fn start_time(&self, w: &gpe_core::WorkerView) -> f64 {
        self.procs
            .newest
            .get(&w.slot)
            .map_or(w.start_time, |p| p.start_time)
    }

    fn series(&self, family: Family) -> impl Iterator<Item = &Series> {
        self.snap.series.iter().filter(move |s| s.family == family)
    }

    fn counter_family(&self, enc: &mut DescriptorEncoder<'_>, family: Family) -> std::fmt::Result {
        let samples: Vec<_> = self
            .series(family)
            .map(|s| (labels_of(family, s), s.cells[0]))
            .collect();
        counter(enc, family.name(), family.help(), &samples)
    }

    fn histogram_family(
        &self,
        enc: &mut DescriptorEncoder<'_>,
        family: Family,
        buckets: Buckets,
    ) -> std::fmt::Result {
        let (bounds, scale): (Vec<f64>, f64) = match buckets {
            Buckets::Duration => (self.snap.duration_buckets.clone(), 1e9),
            Buckets::Size => (SIZE_BUCKETS.to_vec(), 1.0),
        };
        let mut m =
            enc.encode_descriptor(family.name(), family.help(), None, MetricType::Histogram)?;
        for s in self.series(family) {
            // prometheus-client takes per-bucket counts and accumulates them.
            let n = bounds.len().min(CELLS - 2);
            let mut out: Vec<(f64, u64)> = bounds[..n]
                .iter()
                .zip(&s.cells)
                .map(|(b, c)| (*b, *c))
                .collect();
            out.push((f64::INFINITY, s.cells[n]));
            let count = s.cells[..=n].iter().fold(0u64, |a, c| a.wrapping_add(*c));
            let sum = s.cells[CELLS - 1] as f64 / scale;
            let labels = labels_of(family, s);
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &out, None)?;
        }
        Ok(())
    }

    /// The HTTP families through prometheus-client: what [`Scrape::write_http`]
    /// writes by hand, kept as the reference the tests compare it with.
    #[cfg(test)]
    fn encode_http(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        for family in HTTP_FAMILIES {
            match family.shape() {
                Shape::Counter => self.counter_family(enc, family)?,
                Shape::Histogram(b) => self.histogram_family(enc, family, b)?,
            }
        }
        gauge(
            enc,
            "gpe_http_requests_in_flight",
            "Requests in progress across all workers",
            &[(vec![], self.snap.in_flight)],
        )
    }

    fn encode_workers(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        self.counter_family(enc, Family::WorkerRequests)?;
        self.counter_family(enc, Family::WorkerAccepted)?;
        let slots: Vec<String> = self
            .snap
            .workers
            .iter()
            .map(|w| w.slot.to_string())
            .collect();
        let per_worker = |f: &dyn Fn(&gpe_core::WorkerView) -> Option<f64>| {
            self.snap
                .workers
                .iter()
                .zip(&slots)
                .filter_map(|(w, s)| f(w).map(|v| (vec![("worker", s.as_str())], v)))
                .collect::<Vec<_>>()
        };
        gauge(
            enc,
            "gpe_worker_connections",
            "Open connections of each worker",
            &per_worker(&|w| Some(w.connections as f64)),
        )?;
        gauge(
            enc,
            "gpe_worker_requests_in_flight",
            "Requests in progress in each worker's newest process",
            &per_worker(&|w| Some(w.in_flight as f64)),
        )?;
        self.histogram_family(enc, Family::WorkerDuration, Buckets::Duration)?;
        gauge(
            enc,
            "gpe_worker_resident_memory_bytes",
            "Resident memory of each worker's own process",
            &per_worker(&|w| {
                self.procs
                    .newest
                    .get(&w.slot)
                    .map(|p| p.resident_bytes as f64)
            }),
        )?;
        let cpu_slots: Vec<String> = self.procs.cpu.keys().map(u32::to_string).collect();
        let cpu: Vec<_> = self
            .procs
            .cpu
            .values()
            .zip(&cpu_slots)
            .map(|(v, s)| (vec![("worker", s.as_str())], *v))
            .collect();
        counter(
            enc,
            Family::WorkerCpuRetired.name(),
            Family::WorkerCpuRetired.help(),
            &cpu,
        )?;
        gauge(
            enc,
            "gpe_worker_open_fds",
            "Open file descriptors of each worker",
            &per_worker(&|w| self.procs.newest.get(&w.slot).map(|p| p.open_fds as f64)),
        )?;
        gauge(
            enc,
            "gpe_worker_start_time_seconds",
            "Start time of each worker's process in Unix seconds",
            &per_worker(&|w| Some(self.start_time(w))),
        )?;
        gauge(
            enc,
            "gpe_worker_uptime_seconds",
            "Seconds since each worker's process started",
            &per_worker(&|w| Some((self.now - self.start_time(w)).max(0.0))),
        )?;
        let mut states = Vec::new();
        for (w, s) in self.snap.workers.iter().zip(&slots) {
            for st in WorkerState::ALL {
                states.push((
                    vec![("worker", s.as_str()), ("state", st.label())],
                    i64::from(w.state == *st),
                ));
            }
        }
        gauge(
            enc,
            "gpe_worker_state",
            "1 for each worker's current state, 0 for the others",
            &states,
        )?;
        gauge(
            enc,
            "gpe_worker_state_since_seconds",
            "Unix time at which each worker entered its current state",
            &per_worker(&|w| Some(w.state_since)),
        )?;
        let pids: Vec<String> = self
            .snap
            .workers
            .iter()
            .map(|w| w.pid.to_string())
            .collect();
        let infos: Vec<Labels<'_>> = self
            .snap
            .workers
            .iter()
            .zip(&slots)
            .zip(&pids)
            .map(|((w, s), p)| {
                vec![
                    ("worker", s.as_str()),
                    ("pid", p.as_str()),
                    ("kind", w.kind.map_or("unknown", |k| k.label())),
                ]
            })
            .collect();
        info(
            enc,
            "gpe_worker",
            "Identity of each worker slot's newest process",
            &infos,
        )
    }

    fn encode_master(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let Some(m) = &self.snap.master else {
            return Ok(());
        };
        let signals: Vec<_> = MasterSignal::ALL
            .iter()
            .map(|s| (vec![("signal", s.label())], m.signals[s.code() as usize]))
            .collect();
        counter(
            enc,
            "gpe_master_signals",
            "Signals handled by the master",
            &signals,
        )?;
        let exits: Vec<_> = ExitReason::ALL
            .iter()
            .map(|r| (vec![("reason", r.label())], m.exits[r.code() as usize]))
            .collect();
        counter(
            enc,
            "gpe_master_worker_exits",
            "Worker process exits by reason",
            &exits,
        )?;
        gauge(
            enc,
            "gpe_master_workers",
            "Workers serving now",
            &[(vec![], m.workers)],
        )?;
        gauge(
            enc,
            "gpe_master_workers_desired",
            "Workers the master aims to keep",
            &[(vec![], m.workers_desired)],
        )?;
        counter(
            enc,
            "gpe_master_reloads",
            "Reloads (HUP) completed",
            &[(vec![], m.reloads)],
        )?;
        let pid = m.pid.to_string();
        info(
            enc,
            "gpe_master",
            "Identity of the master process",
            &[vec![("pid", pid.as_str())]],
        )?;
        if let Some(p) = &self.procs.master {
            counter(
                enc,
                "process_cpu_seconds",
                "Total user and system CPU time of the master in seconds",
                &[(vec![], p.cpu_seconds)],
            )?;
            gauge(
                enc,
                "process_resident_memory_bytes",
                "Resident memory size of the master in bytes",
                &[(vec![], p.resident_bytes)],
            )?;
            gauge(
                enc,
                "process_virtual_memory_bytes",
                "Virtual memory size of the master in bytes",
                &[(vec![], p.virtual_bytes)],
            )?;
            gauge(
                enc,
                "process_open_fds",
                "Open file descriptors of the master",
                &[(vec![], p.open_fds)],
            )?;
            gauge(
                enc,
                "process_max_fds",
                "Maximum open file descriptors of the master",
                &[(vec![], p.max_fds as f64)],
            )?;
            gauge(
                enc,
                "process_start_time_seconds",
                "Start time of the master in Unix seconds",
                &[(vec![], p.start_time)],
            )?;
        }
        Ok(())
    }

    fn encode_store(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let names: Vec<String> = Family::ALL
            .iter()
            .filter(|f| **f != Family::WorkerCpuRetired)
            .map(|f| exposed_name(*f))
            .collect();
        let samples: Vec<_> = Family::ALL
            .iter()
            .filter(|f| **f != Family::WorkerCpuRetired)
            .zip(&names)
            .map(|(f, n)| {
                (
                    vec![("family", n.as_str())],
                    self.snap.dropped[f.code() as usize],
                )
            })
            .collect();
        let app_names: Vec<String> = self
            .snap
            .app
            .families
            .iter()
            .map(|f| match f.kind {
                AppKind::Counter => format!("{}_total", f.name),
                _ => f.name.clone(),
            })
            .collect();
        let samples: Vec<_> = samples
            .into_iter()
            .chain(
                self.snap
                    .app
                    .families
                    .iter()
                    .zip(&app_names)
                    .map(|(f, n)| (vec![("family", n.as_str())], f.dropped)),
            )
            .collect();
        counter(
            enc,
            "gpe_metrics_series_dropped",
            "Observations recorded into a family's `other` series because it reached its series cap",
            &samples,
        )?;
        let failures: Vec<_> = AuthFailure::ALL
            .iter()
            .map(|r| (vec![("reason", r.label())], self.auth_failures[*r as usize]))
            .collect();
        counter(
            enc,
            "gpe_exporter_auth_failures",
            "Clients the exporter refused under metrics_web_config, by reason",
            &failures,
        )?;
        let rejected: Vec<_> = RejectReason::ALL
            .iter()
            .map(|r| {
                (
                    vec![("reason", r.label())],
                    self.snap.app.rejected[r.code() as usize],
                )
            })
            .collect();
        counter(
            enc,
            "gpe_metrics_rejected",
            "App metric registrations refused, by reason (each once per worker process)",
            &rejected,
        )?;
        info(
            enc,
            "gpe_build",
            "gpe version",
            &[vec![("version", env!("CARGO_PKG_VERSION"))]],
        )
    }
}

fn app_labels(s: &AppSeries) -> Labels<'_> {
    s.labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

impl Scrape {
    /// The app's own families, merged: counters and histograms summed over
    /// every process, gauges over the live ones by their mode.
    fn encode_app(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        let app = &self.snap.app;
        for (i, f) in app.families.iter().enumerate() {
            let series = app.series.iter().filter(|s| s.family == i);
            // A unit is declared only when the name already ends in it, so
            // that the exposed name is the one the app chose.
            let unit = (!f.unit.is_empty())
                .then(|| f.name.strip_suffix(&format!("_{}", f.unit)))
                .flatten();
            let (name, unit) = match unit {
                Some(stem) => (stem, Some(prom_unit(&f.unit))),
                None => (f.name.as_str(), None),
            };
            let help = if f.help.is_empty() {
                "An app metric without a description"
            } else {
                f.help.as_str()
            };
            let kind = match f.kind {
                AppKind::Counter => MetricType::Counter,
                AppKind::Gauge => MetricType::Gauge,
                AppKind::Histogram => MetricType::Histogram,
            };
            let mut m = enc.encode_descriptor(name, help, unit.as_ref(), kind)?;
            for s in series {
                let labels = app_labels(s);
                match &s.value {
                    AppValue::Counter(v) => {
                        m.encode_family(&labels)?
                            .encode_counter::<NoLabelSet, u64, f64>(
                                v,
                                None::<&Exemplar<NoLabelSet, f64>>,
                            )?;
                    }
                    AppValue::Gauge(samples) => {
                        for (slot, v) in f.mode.merge(samples) {
                            let slot = slot.map(|s| s.to_string());
                            let mut l = labels.clone();
                            if let Some(w) = &slot {
                                l.push(("worker", w.as_str()));
                            }
                            m.encode_family(&l)?.encode_gauge(&v)?;
                        }
                    }
                    AppValue::Histogram { buckets, sum } => {
                        let n = f.buckets.len().min(buckets.len().saturating_sub(1));
                        let mut out: Vec<(f64, u64)> = f.buckets[..n]
                            .iter()
                            .copied()
                            .zip(buckets.iter().copied())
                            .collect();
                        out.push((f64::INFINITY, buckets.get(n).copied().unwrap_or(0)));
                        let count = buckets.iter().fold(0u64, |a, c| a.wrapping_add(*c));
                        m.encode_family(&labels)?
                            .encode_histogram::<NoLabelSet>(*sum, count, &out, None)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// The exemplars to add to the OpenMetrics bucket lines: per histogram
    /// family that has any, the bucket lines per series and, for each series
    /// in encoding order, its (bucket, exemplar) pairs.
    fn exemplar_notes(&self) -> Vec<ExemplarNote> {
        let mut notes = Vec::new();
        let app = &self.snap.app;
        for (i, f) in app.families.iter().enumerate() {
            if f.kind != AppKind::Histogram {
                continue;
            }
            let series: Vec<_> = app
                .series
                .iter()
                .filter(|s| s.family == i)
                .map(|s| s.exemplars.clone())
                .collect();
            if series.iter().any(|e| !e.is_empty()) {
                notes.push(ExemplarNote {
                    bucket_prefix: format!("{}_bucket{{", f.name),
                    lines_per_series: f.buckets.len().min(CELLS - 2) + 1,
                    series,
                });
            }
        }
        notes
    }
}

/// Writes the HTTP families by hand, byte for byte as prometheus-client
/// would (`tests::hand_written_http_families_match_prometheus_client`).
/// They hold nearly every line of a large scrape, and prometheus-client
/// formats every bucket bound and label set again on each line; here each
/// series' labels and each family's bounds are formatted once.
mod http_text {
    use super::*;

    /// `v` as a label value: `\`, `"` and newlines escaped.
    fn push_label_value(out: &mut String, v: &str) {
        if !v.bytes().any(|b| matches!(b, b'\\' | b'"' | b'\n')) {
            out.push_str(v);
            return;
        }
        for c in v.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
    }

    /// `k="v",…` for a series of `family` (no braces).
    fn label_list(family: Family, s: &Series) -> String {
        let mut out = String::new();
        for (i, (k, v)) in family.labels().iter().zip(&s.labels).enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(k);
            out.push_str("=\"");
            push_label_value(&mut out, v);
            out.push('"');
        }
        out
    }

    /// `{labels}`, or nothing without labels.
    fn push_braced(out: &mut String, labels: &str) {
        if !labels.is_empty() {
            out.push('{');
            out.push_str(labels);
            out.push('}');
        }
    }

    fn push_u64(out: &mut String, v: u64) {
        out.push_str(itoa::Buffer::new().format(v));
    }

    /// A histogram sum as each format writes an `f64`.
    fn push_f64(out: &mut String, v: f64, format: Format) {
        match format {
            Format::OpenMetrics => out.push_str(dtoa::Buffer::new().format(v)),
            Format::Text004 if v.is_finite() => out.push_str(dtoa::Buffer::new().format_finite(v)),
            Format::Text004 if v.is_nan() => out.push_str("NaN"),
            Format::Text004 if v > 0.0 => out.push_str("+Inf"),
            Format::Text004 => out.push_str("-Inf"),
        }
    }

    /// A bucket bound as the `le` label of text 0.0.4 (Go's `%g`-like
    /// form prometheus-client's `GoFloat` writes).
    fn go_float(v: f64) -> String {
        if v.fract() == 0.0 && v.abs() < 1e6 {
            return itoa::Buffer::new().format(v as i64).to_owned();
        }
        if (1e-4..1e6).contains(&v.abs()) {
            return format!("{v}");
        }
        if !v.is_finite() {
            return match v {
                _ if v.is_nan() => "NaN".to_owned(),
                _ if v > 0.0 => "+Inf".to_owned(),
                _ => "-Inf".to_owned(),
            };
        }
        let sci = format!("{v:e}");
        match sci.split_once('e') {
            Some((mantissa, exp)) => match exp.parse::<i32>() {
                Ok(e) => format!("{mantissa}e{e:+03}"),
                Err(_) => sci,
            },
            None => sci,
        }
    }

    /// `# HELP` and `# TYPE` of a family named `name` (counters without
    /// `_total`).
    fn descriptor(out: &mut String, name: &str, help: &str, kind: &str, format: Format) {
        let total = if kind == "counter" && format == Format::Text004 {
            "_total"
        } else {
            ""
        };
        out.push_str("# HELP ");
        out.push_str(name);
        out.push_str(total);
        out.push(' ');
        match format {
            Format::Text004 => {
                for c in help.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        c => out.push(c),
                    }
                }
            }
            Format::OpenMetrics => out.push_str(help),
        }
        out.push_str("\n# TYPE ");
        out.push_str(name);
        out.push_str(total);
        out.push(' ');
        out.push_str(kind);
        out.push('\n');
    }

    impl Scrape {
        /// The HTTP families (the first of a scrape) in `format`, appended
        /// to `out`; in OpenMetrics with the duration exemplars.
        pub(super) fn write_http(&self, out: &mut String, format: Format) {
            for family in HTTP_FAMILIES {
                match family.shape() {
                    Shape::Counter => self.write_counter(out, family, format),
                    Shape::Histogram(b) => self.write_histogram(out, family, b, format),
                }
            }
            descriptor(
                out,
                "gpe_http_requests_in_flight",
                "Requests in progress across all workers",
                "gauge",
                format,
            );
            out.push_str("gpe_http_requests_in_flight ");
            out.push_str(itoa::Buffer::new().format(self.snap.in_flight));
            out.push('\n');
        }

        fn write_counter(&self, out: &mut String, family: Family, format: Format) {
            descriptor(out, family.name(), family.help(), "counter", format);
            for s in self.series(family) {
                out.push_str(family.name());
                out.push_str("_total");
                push_braced(out, &label_list(family, s));
                out.push(' ');
                push_u64(out, s.cells[0]);
                out.push('\n');
            }
        }

        fn write_histogram(
            &self,
            out: &mut String,
            family: Family,
            buckets: Buckets,
            format: Format,
        ) {
            let (bounds, scale): (&[f64], f64) = match buckets {
                Buckets::Duration => (&self.snap.duration_buckets, 1e9),
                Buckets::Size => (&SIZE_BUCKETS, 1.0),
            };
            let n = bounds.len().min(CELLS - 2);
            // The `le` values, the same for every series.
            let les: Vec<String> = bounds[..n]
                .iter()
                .map(|b| match format {
                    Format::Text004 => go_float(*b),
                    Format::OpenMetrics => dtoa::Buffer::new().format(*b).to_owned(),
                })
                .chain(std::iter::once("+Inf".to_owned()))
                .collect();
            let name = family.name();
            let exemplars = format == Format::OpenMetrics && family == Family::HttpDuration;
            descriptor(out, name, family.help(), "histogram", format);
            for s in self.series(family) {
                let labels = label_list(family, s);
                let count = s.cells[..=n].iter().fold(0u64, |a, c| a.wrapping_add(*c));
                let sum = s.cells[CELLS - 1] as f64 / scale;
                let sum_count = |out: &mut String| {
                    out.push_str(name);
                    out.push_str("_sum");
                    push_braced(out, &labels);
                    out.push(' ');
                    push_f64(out, sum, format);
                    out.push('\n');
                    out.push_str(name);
                    out.push_str("_count");
                    push_braced(out, &labels);
                    out.push(' ');
                    push_u64(out, count);
                    out.push('\n');
                };
                if format == Format::OpenMetrics {
                    sum_count(out);
                }
                let mut cumulative = 0u64;
                for (i, (le, c)) in les.iter().zip(&s.cells[..=n]).enumerate() {
                    cumulative = cumulative.wrapping_add(*c);
                    out.push_str(name);
                    out.push_str("_bucket{");
                    match format {
                        Format::Text004 => {
                            out.push_str(&labels);
                            if !labels.is_empty() {
                                out.push(',');
                            }
                            out.push_str("le=\"");
                            out.push_str(le);
                            out.push('"');
                        }
                        Format::OpenMetrics => {
                            out.push_str("le=\"");
                            out.push_str(le);
                            out.push('"');
                            if !labels.is_empty() {
                                out.push(',');
                                out.push_str(&labels);
                            }
                        }
                    }
                    out.push_str("} ");
                    push_u64(out, cumulative);
                    if exemplars {
                        if let Some((_, e)) = s.exemplars.iter().find(|(b, _)| *b == i) {
                            use std::fmt::Write;
                            let _ =
                                write!(out, " # {{trace_id=\"{}\"}} {}", e.trace_hex(), e.value);
                        }
                    }
                    out.push('\n');
                }
                if format == Format::Text004 {
                    sum_count(out);
                }
            }
        }
    }
}

/// The Prometheus unit of an app family.
fn prom_unit(unit: &str) -> Unit {
    match unit {
        "seconds" => Unit::Seconds,
        "bytes" => Unit::Bytes,
        other => Unit::Other(other.to_owned()),
    }
}

/// Exemplars of one histogram family, placed by line position.
#[derive(Debug)]
struct ExemplarNote {
    bucket_prefix: String,
    lines_per_series: usize,
    series: Vec<Vec<(usize, ExemplarView)>>,
}

/// Appends each exemplar to its bucket line of an OpenMetrics exposition.
///
/// prometheus-client encodes exemplars but offers no way to build one from
/// stored values (its `Exemplar` has no public constructor), so they are
/// added here: the encoder writes the bucket lines of a series together and
/// in bucket order, series in the order given, which places each one.
fn add_exemplars(text: String, notes: &[ExemplarNote]) -> String {
    if notes.is_empty() {
        return text;
    }
    let mut seen = vec![0usize; notes.len()];
    let mut out = String::with_capacity(text.len() + 128 * notes.len());
    for line in text.split_inclusive('\n') {
        let body = line.strip_suffix('\n').unwrap_or(line);
        out.push_str(body);
        if let Some(i) = notes
            .iter()
            .position(|n| body.starts_with(&n.bucket_prefix))
        {
            let n = &notes[i];
            let k = seen[i];
            seen[i] += 1;
            let (series, bucket) = (k / n.lines_per_series, k % n.lines_per_series);
            if let Some((_, e)) = n
                .series
                .get(series)
                .and_then(|s| s.iter().find(|(b, _)| *b == bucket))
            {
                use std::fmt::Write;
                let _ = write!(out, " # {{trace_id=\"{}\"}} {}", e.trace_hex(), e.value);
            }
        }
        if line.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// The name a family is scraped under (counters with `_total`).
pub fn exposed_name(f: Family) -> String {
    match f.shape() {
        Shape::Counter => format!("{}_total", f.name()),
        Shape::Histogram(_) => f.name().to_owned(),
    }
}

/// Every family after the HTTP ones, through prometheus-client.
#[derive(Debug)]
struct ScrapeCollector(Scrape);

impl Collector for ScrapeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        self.0.encode_rest(&mut enc)
    }
}

impl Scrape {
    /// Every family after the HTTP ones.
    fn encode_rest(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        self.encode_workers(enc)?;
        self.encode_master(enc)?;
        self.encode_store(enc)?;
        self.encode_app(enc)
    }
}

/// Renders a collected scrape in `format`.
///
/// # Errors
/// Only formatter errors, which writing to a `String` does not produce.
pub fn render(scrape: Scrape, format: Format) -> Result<String, std::fmt::Error> {
    let notes = match format {
        Format::OpenMetrics => scrape.exemplar_notes(),
        Format::Text004 => Vec::new(),
    };
    // The HTTP families come first; about 80 bytes a line.
    let lines: usize = scrape.snap.series.len() * (CELLS - 1);
    let mut out = String::with_capacity(16 * 1024 + lines * 80);
    scrape.write_http(&mut out, format);
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ScrapeCollector(scrape)));
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
        Format::Text004 => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?
        }
    }
    Ok(add_exemplars(out, &notes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpe_core::OTHER;
    use gpe_core::{MasterView, WorkerKind, WorkerView};

    fn series(family: Family, labels: &[&str], cells: &[u64]) -> Series {
        let mut c = [0; CELLS];
        c[..cells.len()].copy_from_slice(cells);
        Series {
            family,
            labels: labels.iter().map(|l| (*l).to_owned()).collect(),
            cells: c,
            exemplars: vec![],
        }
    }

    /// One sync worker in slot 0 (pid 4242) that answered 7 `GET /` and two
    /// requests folded into `other`, a master, and fixed `/proc` figures.
    fn scrape() -> Scrape {
        let mut duration = [0; CELLS];
        // 3 requests under 0.1 s, 1 under 1 s, 1 above; 2.5 s in total.
        duration[..3].copy_from_slice(&[3, 1, 1]);
        duration[CELLS - 1] = 2_500_000_000;
        let mut size = [0; CELLS];
        size[0] = 2; // two bodies of at most 64 bytes
        size[9] = 1; // one above the largest bucket
        size[CELLS - 1] = 100_070;
        let mut dropped = [0; gpe_core::MAX_FAMILIES];
        dropped[Family::HttpRequests.code() as usize] = 2;
        let mut master = MasterView {
            pid: 4200,
            workers: 1,
            workers_desired: 2,
            reloads: 3,
            ..MasterView::default()
        };
        master.signals[MasterSignal::Hup.code() as usize] = 3;
        master.exits[ExitReason::Crash.code() as usize] = 1;
        let snap = Snapshot {
            series: vec![
                series(Family::HttpRequests, &["GET", "/", "200"], &[7]),
                series(Family::HttpRequests, &[OTHER, OTHER, OTHER], &[2]),
                Series {
                    family: Family::HttpDuration,
                    labels: vec!["GET".into(), "/".into()],
                    cells: duration,
                    exemplars: vec![],
                },
                Series {
                    family: Family::HttpRequestSize,
                    labels: vec![],
                    cells: size,
                    exemplars: vec![],
                },
                series(Family::HttpErrors, &["GET", "/", "app_error"], &[1]),
                series(Family::WorkerRequests, &["0"], &[9]),
                series(Family::WorkerAccepted, &["0"], &[4]),
                series(Family::WorkerCpuRetired, &["0"], &[500_000_000]),
                Series {
                    family: Family::WorkerDuration,
                    labels: vec!["0".into()],
                    cells: duration,
                    exemplars: vec![],
                },
            ],
            workers: vec![WorkerView {
                slot: 0,
                generation: 1,
                pid: 4242,
                kind: Some(WorkerKind::Sync),
                state: WorkerState::Busy,
                state_since: 1_000.5,
                start_time: 990.0,
                connections: 1,
                in_flight: 1,
                pids: vec![4242],
            }],
            master: Some(master),
            dropped,
            in_flight: 1,
            duration_buckets: vec![0.1, 1.0],
            family_cap: 100,
            app: gpe_core::AppSnapshot::default(),
        };
        let worker = ProcStat {
            resident_bytes: 8_388_608,
            virtual_bytes: 1 << 30,
            cpu_seconds: 0.75,
            open_fds: 9,
            max_fds: 1024,
            start_time: 995.0,
        };
        let procs = Procs {
            newest: BTreeMap::from([(0, worker)]),
            // Retired 0.5 s plus the live process' 0.75 s.
            cpu: BTreeMap::from([(0, 1.25)]),
            master: Some(ProcStat {
                resident_bytes: 4_194_304,
                cpu_seconds: 0.5,
                open_fds: 12,
                start_time: 980.0,
                ..worker
            }),
        };
        Scrape {
            snap,
            procs,
            now: 1_001.0,
            auth_failures: [0, 2, 1, 0, 0],
        }
    }

    #[test]
    fn cpu_seconds_never_go_down_across_scrapes() {
        let cpu_line = |s: Scrape| {
            let text = render(s, Format::Text004).unwrap();
            family(&text, "gpe_worker_cpu_seconds_total")[2].to_string()
        };
        let mut floor = CpuFloor::default();
        // Read, then read between a reap and its fold (lower than the true
        // figure), then read after more work.
        for (read, served) in [(1.25, "1.25"), (1.1, "1.25"), (1.5, "1.5")] {
            let mut s = scrape();
            s.procs.cpu.insert(0, read);
            s.keep_cpu_monotonic(&mut floor);
            assert_eq!(
                cpu_line(s),
                format!(r#"gpe_worker_cpu_seconds_total{{worker="0"}} {served}"#)
            );
        }
    }

    /// The lines of family `name` in `text`: its HELP and TYPE lines and its
    /// samples, up to the next family.
    fn family<'t>(text: &'t str, name: &str) -> Vec<&'t str> {
        let help = format!("# HELP {name} ");
        let mut lines = text.lines().skip_while(|l| !l.starts_with(&help));
        let first = lines
            .next()
            .unwrap_or_else(|| panic!("no {name} in\n{text}"));
        std::iter::once(first)
            .chain(lines.take_while(|l| !l.starts_with("# HELP") && *l != "# EOF"))
            .collect()
    }

    #[test]
    fn counters_and_the_other_series_in_both_encodings() {
        let text = render(scrape(), Format::Text004).unwrap();
        assert_eq!(
            family(&text, "gpe_http_requests_total"),
            [
                "# HELP gpe_http_requests_total HTTP requests answered, by method, route and status",
                "# TYPE gpe_http_requests_total counter",
                r#"gpe_http_requests_total{method="GET",route="/",status="200"} 7"#,
                r#"gpe_http_requests_total{method="other",route="other",status="other"} 2"#,
            ]
        );
        let om = render(scrape(), Format::OpenMetrics).unwrap();
        assert_eq!(
            family(&om, "gpe_http_requests"),
            [
                "# HELP gpe_http_requests HTTP requests answered, by method, route and status",
                "# TYPE gpe_http_requests counter",
                r#"gpe_http_requests_total{method="GET",route="/",status="200"} 7"#,
                r#"gpe_http_requests_total{method="other",route="other",status="other"} 2"#,
            ]
        );
        for (t, name) in [
            (&text, "gpe_metrics_series_dropped_total"),
            (&om, "gpe_metrics_series_dropped"),
        ] {
            assert_eq!(
                family(t, name)[2..4],
                [
                    r#"gpe_metrics_series_dropped_total{family="gpe_http_requests_total"} 2"#,
                    r#"gpe_metrics_series_dropped_total{family="gpe_http_request_duration_seconds"} 0"#,
                ]
            );
            // One sample per family except the CPU one.
            assert_eq!(family(t, name).len(), 2 + Family::ALL.len() - 1);
        }
        assert_eq!(
            family(&text, "gpe_worker_cpu_seconds_total")[2..],
            [r#"gpe_worker_cpu_seconds_total{worker="0"} 1.25"#]
        );
        assert_eq!(
            family(&om, "gpe_master_signals")[2..4],
            [
                r#"gpe_master_signals_total{signal="HUP"} 3"#,
                r#"gpe_master_signals_total{signal="USR1"} 0"#,
            ]
        );
    }

    #[test]
    fn per_worker_gauges_come_from_the_store_and_proc() {
        for format in [Format::Text004, Format::OpenMetrics] {
            let text = render(scrape(), format).unwrap();
            let samples = |name| family(&text, name)[2..].to_vec();
            assert_eq!(
                samples("gpe_worker_connections"),
                [r#"gpe_worker_connections{worker="0"} 1.0"#]
            );
            assert_eq!(
                samples("gpe_worker_requests_in_flight"),
                [r#"gpe_worker_requests_in_flight{worker="0"} 1.0"#]
            );
            assert_eq!(
                samples("gpe_master_info"),
                [r#"gpe_master_info{pid="4200"} 1"#]
            );
            assert_eq!(
                samples("gpe_worker_resident_memory_bytes"),
                [r#"gpe_worker_resident_memory_bytes{worker="0"} 8388608.0"#]
            );
            assert_eq!(
                samples("gpe_worker_open_fds"),
                [r#"gpe_worker_open_fds{worker="0"} 9.0"#]
            );
            // From /proc, not the store's 990.
            assert_eq!(
                samples("gpe_worker_start_time_seconds"),
                [r#"gpe_worker_start_time_seconds{worker="0"} 995.0"#]
            );
            assert_eq!(
                samples("gpe_worker_uptime_seconds"),
                [r#"gpe_worker_uptime_seconds{worker="0"} 6.0"#]
            );
            assert_eq!(
                samples("gpe_worker_state"),
                [
                    r#"gpe_worker_state{worker="0",state="booting"} 0"#,
                    r#"gpe_worker_state{worker="0",state="idle"} 0"#,
                    r#"gpe_worker_state{worker="0",state="busy"} 1"#,
                    r#"gpe_worker_state{worker="0",state="draining"} 0"#,
                ]
            );
            assert_eq!(
                samples("gpe_worker_info"),
                [r#"gpe_worker_info{worker="0",pid="4242",kind="sync"} 1"#]
            );
            assert_eq!(
                family(&text, "gpe_worker_info")[1],
                "# TYPE gpe_worker_info gauge"
            );
            assert_eq!(
                samples("gpe_http_requests_in_flight"),
                ["gpe_http_requests_in_flight 1"]
            );
        }
    }

    #[test]
    fn histograms_are_cumulative_in_both_encodings() {
        let text = render(scrape(), Format::Text004).unwrap();
        assert_eq!(
            family(&text, "gpe_http_request_duration_seconds"),
            [
                "# HELP gpe_http_request_duration_seconds Time from request head to response, by method and route",
                "# TYPE gpe_http_request_duration_seconds histogram",
                r#"gpe_http_request_duration_seconds_bucket{method="GET",route="/",le="0.1"} 3"#,
                r#"gpe_http_request_duration_seconds_bucket{method="GET",route="/",le="1"} 4"#,
                r#"gpe_http_request_duration_seconds_bucket{method="GET",route="/",le="+Inf"} 5"#,
                r#"gpe_http_request_duration_seconds_sum{method="GET",route="/"} 2.5"#,
                r#"gpe_http_request_duration_seconds_count{method="GET",route="/"} 5"#,
            ]
        );
        let om = render(scrape(), Format::OpenMetrics).unwrap();
        assert_eq!(
            family(&om, "gpe_http_request_duration_seconds")[2..],
            [
                r#"gpe_http_request_duration_seconds_sum{method="GET",route="/"} 2.5"#,
                r#"gpe_http_request_duration_seconds_count{method="GET",route="/"} 5"#,
                r#"gpe_http_request_duration_seconds_bucket{le="0.1",method="GET",route="/"} 3"#,
                r#"gpe_http_request_duration_seconds_bucket{le="1.0",method="GET",route="/"} 4"#,
                r#"gpe_http_request_duration_seconds_bucket{le="+Inf",method="GET",route="/"} 5"#,
            ]
        );
        // The slot's own histogram, over every route, in the same buckets.
        assert_eq!(
            family(&text, "gpe_worker_request_duration_seconds"),
            [
                "# HELP gpe_worker_request_duration_seconds Time from request head to response in each worker slot, over every route",
                "# TYPE gpe_worker_request_duration_seconds histogram",
                r#"gpe_worker_request_duration_seconds_bucket{worker="0",le="0.1"} 3"#,
                r#"gpe_worker_request_duration_seconds_bucket{worker="0",le="1"} 4"#,
                r#"gpe_worker_request_duration_seconds_bucket{worker="0",le="+Inf"} 5"#,
                r#"gpe_worker_request_duration_seconds_sum{worker="0"} 2.5"#,
                r#"gpe_worker_request_duration_seconds_count{worker="0"} 5"#,
            ]
        );
        // Size buckets are fixed; the last cell before the sum is +Inf.
        let size = family(&om, "gpe_http_request_size_bytes");
        assert_eq!(size.len(), 2 + 2 + SIZE_BUCKETS.len() + 1);
        assert_eq!(
            size[2..5],
            [
                "gpe_http_request_size_bytes_sum 100070.0",
                "gpe_http_request_size_bytes_count 3",
                r#"gpe_http_request_size_bytes_bucket{le="64.0"} 2"#,
            ]
        );
        assert_eq!(
            size[size.len() - 2..],
            [
                r#"gpe_http_request_size_bytes_bucket{le="4194304.0"} 2"#,
                r#"gpe_http_request_size_bytes_bucket{le="+Inf"} 3"#,
            ]
        );
        // A family without series is still described.
        assert_eq!(
            family(&text, "gpe_http_response_size_bytes"),
            [
                "# HELP gpe_http_response_size_bytes Response body sizes in bytes",
                "# TYPE gpe_http_response_size_bytes histogram",
            ]
        );
    }

    #[test]
    fn both_encodings_describe_the_same_families_in_the_same_order() {
        let text = render(scrape(), Format::Text004).unwrap();
        let om = render(scrape(), Format::OpenMetrics).unwrap();
        let types = |t: &str| -> Vec<String> {
            t.lines()
                .filter_map(|l| l.strip_prefix("# TYPE "))
                .map(|l| l.replace("_total ", " "))
                .collect()
        };
        assert_eq!(types(&text), types(&om));
        // 6 HTTP, 13 worker, 6 master, 6 process, 3 store and 1 exporter
        // families.
        assert_eq!(types(&text).len(), 35);
        for t in [&text, &om] {
            assert!(t.contains(r#"gpe_exporter_auth_failures_total{reason="wrong_credentials"} 2"#));
            assert!(
                t.contains(r#"gpe_exporter_auth_failures_total{reason="missing_client_cert"} 1"#)
            );
            assert!(t.contains(r#"gpe_exporter_auth_failures_total{reason="tls_handshake"} 0"#));
        }
        assert!(om.ends_with("# EOF\n"));
        assert!(!text.contains("# EOF"));
        assert_eq!(
            Format::OpenMetrics.content_type(),
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        );
        assert_eq!(
            Format::Text004.content_type(),
            "text/plain; version=0.0.4; charset=utf-8"
        );
        assert_eq!(
            Format::from_accept(Some("application/openmetrics-text;version=1.0.0,*/*;q=0.1")),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Text004);
        assert_eq!(Format::from_accept(None), Format::Text004);
    }

    /// The fixture plus app families (a counter, a max gauge, a per-worker
    /// gauge, a histogram with a unit) and exemplars.
    fn app_scrape() -> Scrape {
        use gpe_core::{AppFamilyView, AppKind, AppSeries, AppValue, GaugeMode, GaugeSample};
        let mut s = scrape();
        let trace = |t: u128, v: f64| ExemplarView {
            trace_id: t,
            value: v,
            at_ns: 1,
        };
        for series in &mut s.snap.series {
            if series.family == Family::HttpDuration {
                series.exemplars = vec![(1, trace(0xab, 0.5))];
            }
        }
        let fam = |name: &str, kind, mode, unit: &str, buckets: Vec<f64>| AppFamilyView {
            name: name.to_owned(),
            kind,
            mode,
            help: format!("{name} help"),
            unit: unit.to_owned(),
            buckets,
            dropped: 0,
        };
        let g = |slot, value| GaugeSample {
            slot,
            generation: 1,
            value,
            at_ns: 1,
        };
        s.snap.app.families = vec![
            fam("app_orders", AppKind::Counter, GaugeMode::Sum, "", vec![]),
            fam("app_depth", AppKind::Gauge, GaugeMode::Max, "", vec![]),
            fam("app_each", AppKind::Gauge, GaugeMode::PerWorker, "", vec![]),
            fam(
                "app_wait_seconds",
                AppKind::Histogram,
                GaugeMode::Sum,
                "seconds",
                vec![1.0, 2.0],
            ),
        ];
        s.snap.app.families[3].dropped = 4;
        let series = |family, labels: &[(&str, &str)], value| AppSeries {
            family,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
            exemplars: vec![],
        };
        s.snap.app.series = vec![
            series(0, &[("kind", "book")], AppValue::Counter(5)),
            series(1, &[], AppValue::Gauge(vec![g(0, 2.0), g(1, 7.0)])),
            series(2, &[], AppValue::Gauge(vec![g(0, 2.0), g(1, 7.0)])),
            AppSeries {
                exemplars: vec![(2, trace(0xcd, 3.5))],
                ..series(
                    3,
                    &[],
                    AppValue::Histogram {
                        buckets: vec![1, 2, 3],
                        sum: 15.5,
                    },
                )
            },
        ];
        s.snap.app.rejected[RejectReason::TypeClash.code() as usize] = 2;
        s
    }

    #[test]
    fn app_families_merge_and_carry_exemplars_in_openmetrics_only() {
        let text = render(app_scrape(), Format::Text004).unwrap();
        assert_eq!(
            family(&text, "app_orders_total")[1..],
            [
                "# TYPE app_orders_total counter",
                r#"app_orders_total{kind="book"} 5"#
            ]
        );
        assert_eq!(family(&text, "app_depth")[2..], ["app_depth 7.0"]);
        assert_eq!(
            family(&text, "app_each")[2..],
            [r#"app_each{worker="0"} 2.0"#, r#"app_each{worker="1"} 7.0"#]
        );
        assert_eq!(
            family(&text, "app_wait_seconds")[2..],
            [
                r#"app_wait_seconds_bucket{le="1"} 1"#,
                r#"app_wait_seconds_bucket{le="2"} 3"#,
                r#"app_wait_seconds_bucket{le="+Inf"} 6"#,
                "app_wait_seconds_sum 15.5",
                "app_wait_seconds_count 6",
            ]
        );
        assert!(!text.contains("trace_id"));
        assert!(text.contains(r#"gpe_metrics_rejected_total{reason="type_clash"} 2"#));
        assert!(text.contains(r#"gpe_metrics_series_dropped_total{family="app_wait_seconds"} 4"#));
        assert!(text.contains(r#"gpe_metrics_series_dropped_total{family="app_orders_total"} 0"#));

        let om = render(app_scrape(), Format::OpenMetrics).unwrap();
        let wait = family(&om, "app_wait_seconds");
        assert_eq!(wait[2], "# UNIT app_wait_seconds seconds");
        assert_eq!(
            wait[wait.len() - 1],
            r#"app_wait_seconds_bucket{le="+Inf"} 6 # {trace_id="000000000000000000000000000000cd"} 3.5"#
        );
        let duration = family(&om, "gpe_http_request_duration_seconds");
        assert_eq!(
            duration[2..],
            [
                r#"gpe_http_request_duration_seconds_sum{method="GET",route="/"} 2.5"#,
                r#"gpe_http_request_duration_seconds_count{method="GET",route="/"} 5"#,
                r#"gpe_http_request_duration_seconds_bucket{le="0.1",method="GET",route="/"} 3"#,
                r#"gpe_http_request_duration_seconds_bucket{le="1.0",method="GET",route="/"} 4 # {trace_id="000000000000000000000000000000ab"} 0.5"#,
                r#"gpe_http_request_duration_seconds_bucket{le="+Inf",method="GET",route="/"} 5"#,
            ]
        );
        assert!(om.ends_with("# EOF\n"));
    }

    /// The exposition as prometheus-client alone wrote it, HTTP families
    /// included (their exemplars added afterwards, as for the app's).
    fn render_reference(scrape: Scrape, format: Format) -> String {
        #[derive(Debug)]
        struct Reference(Scrape);
        impl Collector for Reference {
            fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
                self.0.encode_http(&mut enc)?;
                self.0.encode_rest(&mut enc)
            }
        }
        let mut notes = Vec::new();
        if format == Format::OpenMetrics {
            let duration: Vec<Vec<(usize, ExemplarView)>> = scrape
                .series(Family::HttpDuration)
                .map(|s| s.exemplars.clone())
                .collect();
            if duration.iter().any(|e| !e.is_empty()) {
                notes.push(ExemplarNote {
                    bucket_prefix: format!("{}_bucket{{", Family::HttpDuration.name()),
                    lines_per_series: scrape.snap.duration_buckets.len().min(CELLS - 2) + 1,
                    series: duration,
                });
            }
            notes.extend(scrape.exemplar_notes());
        }
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Reference(scrape)));
        let mut out = String::new();
        match format {
            Format::OpenMetrics => {
                prometheus_client::encoding::text::encode(&mut out, &registry).unwrap()
            }
            Format::Text004 => {
                prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap()
            }
        }
        add_exemplars(out, &notes)
    }

    /// Many HTTP series with awkward labels, values and bounds.
    fn awkward_scrape() -> Scrape {
        let mut s = app_scrape();
        s.snap.duration_buckets = vec![1e-5, 0.005, 0.25, 1.0, 2.5, 10.0, 999_999.5, 2e6, 1e21];
        let routes = [
            "/",
            "/a\"quote",
            "/back\\slash",
            "/new\nline",
            "/ünïcödé/{id}",
            "",
            "/x\\\"\n\\",
        ];
        for (i, route) in routes.iter().enumerate() {
            let mut cells = [0u64; CELLS];
            for (k, c) in cells.iter_mut().enumerate() {
                *c = (i as u64 + 1) * (k as u64 * 37 + 1);
            }
            // Large, but a cumulative count that does not overflow (the
            // reference adds without wrapping).
            cells[0] = (1 << 62) - i as u64;
            cells[CELLS - 1] = 123_456_789_012 * (i as u64 + 1);
            s.snap.series.push(Series {
                family: Family::HttpDuration,
                labels: vec!["POST".into(), (*route).into()],
                cells,
                exemplars: vec![
                    (
                        i % 10,
                        ExemplarView {
                            trace_id: 0xfeed + i as u128,
                            value: 0.125 * i as f64,
                            at_ns: 3,
                        },
                    ),
                    (
                        9,
                        ExemplarView {
                            trace_id: 1,
                            value: 3e-7,
                            at_ns: 3,
                        },
                    ),
                ],
            });
            s.snap.series.push(series(
                Family::HttpRequests,
                &["POST", route, "503"],
                &[u64::MAX / (i as u64 + 1)],
            ));
            s.snap.series.push(series(
                Family::HttpErrors,
                &["POST", route, "client_disconnect"],
                &[i as u64],
            ));
            s.snap.series.push(Series {
                family: Family::HttpResponseSize,
                labels: vec![],
                cells,
                exemplars: vec![],
            });
        }
        s.snap.in_flight = -3;
        s
    }

    #[test]
    fn hand_written_http_families_match_prometheus_client() {
        for format in [Format::Text004, Format::OpenMetrics] {
            for (name, fixture) in [
                ("scrape", scrape as fn() -> Scrape),
                ("app_scrape", app_scrape),
                ("awkward_scrape", awkward_scrape),
            ] {
                let ours = render(fixture(), format).unwrap();
                let reference = render_reference(fixture(), format);
                if ours != reference {
                    let first = ours.lines().zip(reference.lines()).find(|(a, b)| a != b);
                    panic!("{name} in {format:?} differs, first at {first:?}");
                }
            }
        }
        // The awkward labels are escaped, not passed through.
        let text = render(awkward_scrape(), Format::Text004).unwrap();
        assert!(text.contains(r#"route="/a\"quote""#), "{text}");
        assert!(text.contains(r#"le="2e+06""#), "{text}");
    }

    #[test]
    fn without_a_master_its_families_are_left_out() {
        let mut s = scrape();
        s.snap.master = None;
        s.procs.master = None;
        let text = render(s, Format::Text004).unwrap();
        assert!(!text.contains("gpe_master_"), "{text}");
        assert!(!text.contains("process_"), "{text}");
        assert_eq!(
            family(&text, "gpe_build_info")[2..],
            [format!(
                r#"gpe_build_info{{version="{}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            )]
        );
    }
}
