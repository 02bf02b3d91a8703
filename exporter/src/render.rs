//! Turns a store [`Snapshot`] plus `/proc` figures into one exposition, through
//! a prometheus-client [`Collector`]: OpenMetrics 1.0 or the Prometheus text
//! format 0.0.4. Every family is written exactly once.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use gpe_core::store::catalogue::{Buckets, Shape, SIZE_BUCKETS};
use gpe_core::store::layout::CELLS;
use gpe_core::store::{ExitReason, Family, MasterSignal, Series, Snapshot, StoreDir, WorkerState};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::exemplar::Exemplar;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::procstat::{self, ProcStat};

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
}

/// `/proc` figures read together with the store, inside its fold window.
#[derive(Debug, Default)]
struct Procs {
    /// Figures of each slot's newest process.
    newest: BTreeMap<u32, ProcStat>,
    /// CPU seconds per slot: retired plus every live process of the slot.
    cpu: BTreeMap<u32, f64>,
    master: Option<ProcStat>,
}

impl Procs {
    fn read(snap: &Snapshot) -> Procs {
        let mut p = Procs::default();
        for s in snap
            .series
            .iter()
            .filter(|s| s.family == Family::WorkerCpuRetired)
        {
            if let Some(slot) = s.labels.first().and_then(|l| l.parse().ok()) {
                *p.cpu.entry(slot).or_default() += s.cells[0] as f64 / 1e9;
            }
        }
        for w in &snap.workers {
            for (i, pid) in w.pids.iter().enumerate() {
                if let Some(st) = procstat::read(*pid) {
                    *p.cpu.entry(w.slot).or_default() += st.cpu_seconds;
                    if i == 0 {
                        p.newest.insert(w.slot, st);
                    }
                }
            }
        }
        p.master = snap.master.as_ref().and_then(|m| procstat::read(m.pid));
        p
    }
}

impl Scrape {
    /// Reads the store and the `/proc` figures of its processes consistently.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn collect(store: &StoreDir) -> std::io::Result<Scrape> {
        let (snap, procs) = Snapshot::read_with(store, Procs::read)?;
        Ok(Scrape {
            snap,
            procs,
            now: gpe_core::store::unix_now_ns() as f64 / 1e9,
        })
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
    fn start_time(&self, w: &gpe_core::store::WorkerView) -> f64 {
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
            let count = s.cells[..=n].iter().sum();
            let sum = s.cells[CELLS - 1] as f64 / scale;
            let labels = labels_of(family, s);
            m.encode_family(&labels)?
                .encode_histogram::<NoLabelSet>(sum, count, &out, None)?;
        }
        Ok(())
    }

    fn encode_http(&self, enc: &mut DescriptorEncoder<'_>) -> std::fmt::Result {
        for family in [
            Family::HttpRequests,
            Family::HttpDuration,
            Family::HttpRequestSize,
            Family::HttpResponseSize,
            Family::HttpErrors,
        ] {
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
        let per_worker = |f: &dyn Fn(&gpe_core::store::WorkerView) -> Option<f64>| {
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
        counter(
            enc,
            "gpe_metrics_series_dropped",
            "Observations recorded into a family's `other` series because it reached its series cap",
            &samples,
        )?;
        info(
            enc,
            "gpe_build",
            "gpe version",
            &[vec![("version", env!("CARGO_PKG_VERSION"))]],
        )
    }
}

/// The name a family is scraped under (counters with `_total`).
pub fn exposed_name(f: Family) -> String {
    match f.shape() {
        Shape::Counter => format!("{}_total", f.name()),
        Shape::Histogram(_) => f.name().to_owned(),
    }
}

#[derive(Debug)]
struct ScrapeCollector(Scrape);

impl Collector for ScrapeCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> std::fmt::Result {
        self.0.encode_http(&mut enc)?;
        self.0.encode_workers(&mut enc)?;
        self.0.encode_master(&mut enc)?;
        self.0.encode_store(&mut enc)
    }
}

/// Renders a collected scrape in `format`.
///
/// # Errors
/// Only formatter errors, which writing to a `String` does not produce.
pub fn render(scrape: Scrape, format: Format) -> Result<String, std::fmt::Error> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ScrapeCollector(scrape)));
    let mut out = String::with_capacity(16 * 1024);
    match format {
        Format::OpenMetrics => prometheus_client::encoding::text::encode(&mut out, &registry)?,
        Format::Text004 => {
            prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?
        }
    }
    Ok(out)
}

/// Writes a one-line summary of a render, for logs and tests.
pub fn describe(text: &str) -> String {
    let mut s = String::new();
    let families = text.lines().filter(|l| l.starts_with("# TYPE")).count();
    let samples = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .count();
    let _ = write!(
        s,
        "{families} families, {samples} samples, {} bytes",
        text.len()
    );
    s
}
