//! The app's own metrics: a `metrics` (0.24) global recorder, installed in
//! every worker after fork (`worker.rs`), that writes the app's counters,
//! gauges and histograms into the worker's store file (`store/app.rs`), so
//! the exporter merges them across workers with gpe's own families. Names
//! are checked here; a bad one is refused once per process, logged and
//! counted in `gpe_metrics_rejected_total{reason}`, and its handle does
//! nothing.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, SharedString, Unit};

use crate::config::AppMetricSettings;
use crate::store::{
    AppCounter, AppFamily, AppGauge, AppHistogram, AppKind, AppStore, FamilySpec, GaugeMode,
    Refusal, RejectReason,
};

/// Longest metric name, in bytes.
const MAX_NAME: usize = crate::store::layout::APP_NAME_BYTES;
/// Most labels on one app series.
const MAX_LABELS: usize = crate::store::index::MAX_KEY_VALUES / 2;
/// Handles one thread caches, and the process-wide cache holds; beyond them
/// a lookup takes the slow path (which stays correct).
const THREAD_CACHE: usize = 4096;
const SHARED_CACHE: usize = 16_384;

/// `metrics::Key` hashes itself to one precomputed `u64`; use it as is.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;

/// A resolved series handle of any type.
#[derive(Clone)]
enum Handle {
    Counter(Arc<AppCounter>),
    Gauge(Arc<AppGauge>),
    Histogram(Arc<AppHistogram>),
    /// Refused: the facade's no-op handle of the asked type.
    Refused(AppKind),
}

impl Handle {
    fn kind(&self) -> AppKind {
        match self {
            Handle::Counter(_) => AppKind::Counter,
            Handle::Gauge(_) => AppKind::Gauge,
            Handle::Histogram(_) => AppKind::Histogram,
            Handle::Refused(k) => *k,
        }
    }
}

#[derive(Default)]
struct ThreadCache {
    owner: u64,
    handles: KeyMap<Handle>,
}

thread_local! {
    static CACHE: RefCell<ThreadCache> = RefCell::new(ThreadCache::default());
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// The recorder installed in this process, for [`record_with_exemplar`].
static INSTALLED: OnceLock<&'static AppRecorder> = OnceLock::new();

/// Per-family settings a worker applies when it registers a family first.
#[derive(Debug, Clone, Default)]
pub struct AppMetricsSpec {
    /// `[app_metrics.NAME]` tables of the config file.
    pub families: BTreeMap<String, AppMetricSettings>,
    /// Histogram bounds of families the config names none for.
    pub default_buckets: Vec<f64>,
}

/// The `metrics` recorder of one worker process.
pub struct AppRecorder {
    store: &'static AppStore,
    spec: AppMetricsSpec,
    id: u64,
    families: Mutex<HashMap<(String, AppKind), Result<AppFamily, RejectReason>>>,
    handles: Mutex<KeyMap<Handle>>,
    refused: Mutex<HashSet<(String, RejectReason)>>,
}

impl std::fmt::Debug for AppRecorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppRecorder").field("id", &self.id).finish()
    }
}

fn valid_metric_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':')
        && n.len() <= MAX_NAME
}

fn valid_label_name(n: &str) -> bool {
    let mut b = n.bytes();
    matches!(b.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_')
        && b.all(|c| c.is_ascii_alphanumeric() || c == b'_')
        && !n.starts_with("__")
}

/// The exposed family name: counters lose a `_total` suffix, which the
/// exposition adds back.
fn family_name(name: &str, kind: AppKind) -> &str {
    match kind {
        AppKind::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    }
}

/// The Prometheus spelling of a `metrics` unit.
fn unit_label(u: Unit) -> &'static str {
    match u {
        Unit::Count => "count",
        Unit::Percent => "percent",
        Unit::Seconds => "seconds",
        Unit::Milliseconds => "milliseconds",
        Unit::Microseconds => "microseconds",
        Unit::Nanoseconds => "nanoseconds",
        Unit::Tebibytes => "tebibytes",
        Unit::Gibibytes => "gibibytes",
        Unit::Mebibytes => "mebibytes",
        Unit::Kibibytes => "kibibytes",
        Unit::Bytes => "bytes",
        Unit::TerabitsPerSecond => "terabits_per_second",
        Unit::GigabitsPerSecond => "gigabits_per_second",
        Unit::MegabitsPerSecond => "megabits_per_second",
        Unit::KilobitsPerSecond => "kilobits_per_second",
        Unit::BitsPerSecond => "bits_per_second",
        Unit::CountPerSecond => "count_per_second",
    }
}

impl AppRecorder {
    /// A recorder writing into `store` with `spec`'s per-family settings.
    pub fn new(store: &'static AppStore, spec: AppMetricsSpec) -> AppRecorder {
        AppRecorder {
            store,
            spec,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            families: Mutex::new(HashMap::new()),
            handles: Mutex::new(KeyMap::default()),
            refused: Mutex::new(HashSet::new()),
        }
    }

    /// Installs `self` as the process's global `metrics` recorder (once per
    /// process; a worker does it after fork, before the app factory runs).
    ///
    /// # Errors
    /// A global recorder is installed already.
    pub fn install(self) -> Result<(), String> {
        let me: &'static AppRecorder = Box::leak(Box::new(self));
        metrics::set_global_recorder(Installed(me)).map_err(|e| e.to_string())?;
        let _ = INSTALLED.set(me);
        Ok(())
    }

    /// Counts and logs a refusal, once per name and reason in this process.
    fn refuse(&self, name: &str, kind: AppKind, reason: RejectReason, why: &str) {
        let first = self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((name.to_owned(), reason));
        if first {
            self.store.reject(reason);
            crate::log_error!(
                "app metric {name:?} ({}) refused ({}): {why}; it records nothing, counted in \
                 gpe_metrics_rejected_total",
                kind.label(),
                reason.label()
            );
        }
    }

    /// The settings the config gives family `name` (as the app spells it,
    /// or its exposed name).
    fn settings(&self, name: &str, exposed: &str) -> Option<&AppMetricSettings> {
        self.spec
            .families
            .get(name)
            .or_else(|| self.spec.families.get(exposed))
    }

    /// The family `name` of `kind`, registering it if new; `None` if refused
    /// (and counted).
    fn family(&self, name: &str, kind: AppKind) -> Option<AppFamily> {
        let exposed = family_name(name, kind);
        let mut fams = self.families.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = fams.get(&(exposed.to_owned(), kind)) {
            return r.as_ref().ok().cloned();
        }
        let verdict = if exposed.starts_with("gpe_") {
            Err((
                RejectReason::GpeCollision,
                "names starting with gpe_ are gpe's own",
            ))
        } else if exposed.is_empty() || !valid_metric_name(name) {
            Err((
                RejectReason::InvalidName,
                "not a valid Prometheus metric name ([a-zA-Z_:][a-zA-Z0-9_:]*, at most 96 bytes)",
            ))
        } else if kind != AppKind::Counter && name.ends_with("_total") {
            Err((
                RejectReason::InvalidName,
                "only counters are named ..._total",
            ))
        } else {
            let conf = self.settings(name, exposed);
            let mode = conf.and_then(|c| c.gauge).unwrap_or(GaugeMode::Sum);
            let buckets = conf
                .and_then(|c| c.buckets.as_deref())
                .unwrap_or(&self.spec.default_buckets);
            match self.store.family(FamilySpec {
                name: exposed,
                kind,
                mode,
                buckets,
            }) {
                Ok(f) => Ok(f),
                Err(Refusal::Rejected(RejectReason::TypeClash)) => Err((
                    RejectReason::TypeClash,
                    "the name is registered with another type",
                )),
                Err(Refusal::Rejected(r)) => Err((r, "the store holds no more app families")),
                Err(Refusal::Store(e)) => {
                    crate::log_warn!("app metric {name:?}: the metric store failed: {e}");
                    return None;
                }
            }
        };
        match verdict {
            Ok(f) => {
                fams.insert((exposed.to_owned(), kind), Ok(f.clone()));
                Some(f)
            }
            Err((reason, why)) => {
                fams.insert((exposed.to_owned(), kind), Err(reason));
                drop(fams);
                self.refuse(name, kind, reason, why);
                None
            }
        }
    }

    /// Resolves `key` as a series of `kind`, through the caches.
    fn handle(&self, key: &Key, kind: AppKind) -> Handle {
        let cached = CACHE.with(|c| {
            let c = c.borrow();
            if c.owner == self.id {
                c.handles.get(key).filter(|h| h.kind() == kind).cloned()
            } else {
                None
            }
        });
        if let Some(h) = cached {
            return h;
        }
        let h = self.slow_handle(key, kind);
        CACHE.with(|c| {
            let mut c = c.borrow_mut();
            if c.owner != self.id {
                c.owner = self.id;
                c.handles.clear();
            }
            if c.handles.len() < THREAD_CACHE {
                c.handles.insert(key.clone(), h.clone());
            }
        });
        h
    }

    fn slow_handle(&self, key: &Key, kind: AppKind) -> Handle {
        if let Some(h) = self
            .handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .filter(|h| h.kind() == kind)
        {
            return h.clone();
        }
        let h = self.resolve(key, kind);
        let mut shared = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        if shared.len() < SHARED_CACHE {
            shared.insert(key.clone(), h.clone());
        }
        h
    }

    fn resolve(&self, key: &Key, kind: AppKind) -> Handle {
        let refused = Handle::Refused(kind);
        let Some(fam) = self.family(key.name(), kind) else {
            return refused;
        };
        let labels: Vec<(&str, &str)> = key.labels().map(|l| (l.key(), l.value())).collect();
        let mut names = HashSet::new();
        let reserved = |n: &str| match kind {
            AppKind::Histogram => n == "le",
            AppKind::Gauge => fam.mode() == GaugeMode::PerWorker && n == "worker",
            AppKind::Counter => false,
        };
        if labels.len() > MAX_LABELS
            || labels
                .iter()
                .any(|(k, _)| !valid_label_name(k) || reserved(k) || !names.insert(*k))
        {
            self.refuse(
                key.name(),
                kind,
                RejectReason::InvalidName,
                "a label name is invalid, reserved (le; worker in per_worker gauges) or repeated, \
                 or there are more than 8 labels",
            );
            return refused;
        }
        let store = self.store;
        let h = match kind {
            AppKind::Counter => store
                .counter(&fam, &labels)
                .map(|c| Handle::Counter(c.into())),
            AppKind::Gauge => store.gauge(&fam, &labels).map(|g| Handle::Gauge(g.into())),
            AppKind::Histogram => store
                .histogram(&fam, &labels)
                .map(|h| Handle::Histogram(h.into())),
        };
        h.unwrap_or(refused)
    }

    fn describe(&self, key: &KeyName, kind: AppKind, unit: Option<Unit>, help: &str) {
        if let Some(fam) = self.family(key.as_str(), kind) {
            self.store.describe(&fam, help, unit.map(unit_label));
        }
    }
}

/// The installed form: `metrics` takes its recorder by value.
struct Installed(&'static AppRecorder);

impl metrics::Recorder for Installed {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_counter(key, unit, description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_gauge(key, unit, description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.0.describe_histogram(key, unit, description);
    }

    fn register_counter(&self, key: &Key, m: &Metadata<'_>) -> Counter {
        self.0.register_counter(key, m)
    }

    fn register_gauge(&self, key: &Key, m: &Metadata<'_>) -> Gauge {
        self.0.register_gauge(key, m)
    }

    fn register_histogram(&self, key: &Key, m: &Metadata<'_>) -> Histogram {
        self.0.register_histogram(key, m)
    }
}

/// Also usable directly (`metrics::with_local_recorder`), as tests and
/// benchmarks do.
impl metrics::Recorder for AppRecorder {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(&key, AppKind::Counter, unit, &description);
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(&key, AppKind::Gauge, unit, &description);
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.describe(&key, AppKind::Histogram, unit, &description);
    }

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        match self.handle(key, AppKind::Counter) {
            Handle::Counter(c) => Counter::from_arc(c),
            _ => Counter::noop(),
        }
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        match self.handle(key, AppKind::Gauge) {
            Handle::Gauge(g) => Gauge::from_arc(g),
            _ => Gauge::noop(),
        }
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        match self.handle(key, AppKind::Histogram) {
            Handle::Histogram(h) => Histogram::from_arc(h),
            _ => Histogram::noop(),
        }
    }
}

/// Records `value` into the app histogram `key` and keeps `trace_id` (a W3C
/// trace id, see [`trace_id_of`](crate::trace_id_of)) as the newest exemplar
/// of the bucket it falls into, shown in OpenMetrics scrapes. Outside a gpe
/// worker (no recorder installed) it does nothing.
pub fn record_with_exemplar(key: &Key, value: f64, trace_id: u128) {
    if let Some(r) = INSTALLED.get() {
        if let Handle::Histogram(h) = r.handle(key, AppKind::Histogram) {
            h.record_with_exemplar(value, trace_id);
        }
    }
}

#[cfg(test)]
#[path = "app_metrics_tests.rs"]
mod tests;
