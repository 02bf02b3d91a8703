//! App families: the metrics an app records through the `metrics` facade,
//! kept in the same files as gpe's own families. The index's app table names
//! each family once (type, gauge mode, buckets, help, unit; first writer
//! wins, under the index lock); series are index entries like any other, so
//! the cap, the `other` series, the fold of dead workers and the merge work
//! as for gpe's families. The facade's `Recorder` (`crate::app_metrics`)
//! validates names and caches handles; this module owns the layout side.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::catalogue::{AppKind, GaugeMode, RejectReason};
use super::index::{Index, Mirror, Resolved};
use super::layout::{AppFamilySlot, Row, CELLS, MAX_APP_FAMILIES, MAX_BUCKETS};
use super::{exemplar, monotonic_ns, DataFile, StoreDir};

/// One process's writer of app series into its worker file. Lives for the
/// life of the process (handles point into its mapping).
#[derive(Debug)]
pub struct AppStore {
    file: DataFile,
    index: Index,
    mirror: Mutex<Mirror>,
}

/// An app family as registered in the index.
#[derive(Debug, Clone)]
pub struct AppFamily {
    index: usize,
    kind: AppKind,
    mode: GaugeMode,
    bounds: Arc<[f64]>,
}

impl AppFamily {
    /// Its type.
    pub fn kind(&self) -> AppKind {
        self.kind
    }

    /// Its gauge merge mode (as the first process that registered it chose).
    pub fn mode(&self) -> GaugeMode {
        self.mode
    }
}

/// Why a family could not be registered.
#[derive(Debug)]
pub enum Refusal {
    /// The registration is refused for this reason (counted).
    Rejected(RejectReason),
    /// The store could not be written (locking failed).
    Store(io::Error),
}

/// What the first process to register a family gives it.
#[derive(Debug, Clone, Copy)]
pub struct FamilySpec<'a> {
    /// The exposed name (counters without `_total`).
    pub name: &'a str,
    /// Its type.
    pub kind: AppKind,
    /// Gauge merge mode.
    pub mode: GaugeMode,
    /// Finite histogram bounds (at most [`MAX_BUCKETS`]).
    pub buckets: &'a [f64],
}

fn write_bytes(words: &[AtomicU64], bytes: &[u8]) -> usize {
    let n = bytes.len().min(words.len() * 8);
    for (w, chunk) in words.iter().zip(bytes[..n].chunks(8)) {
        let mut b = [0u8; 8];
        b[..chunk.len()].copy_from_slice(chunk);
        w.store(u64::from_ne_bytes(b), Ordering::Relaxed);
    }
    n
}

fn read_bytes(words: &[AtomicU64], len: usize) -> Vec<u8> {
    let len = len.min(words.len() * 8);
    let mut out = Vec::with_capacity(len);
    for w in words {
        out.extend_from_slice(&w.load(Ordering::Relaxed).to_ne_bytes());
        if out.len() >= len {
            break;
        }
    }
    out.truncate(len);
    out
}

/// Cuts `s` to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut at = s.len().min(max);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    &s[..at]
}

pub(super) fn slot_name(slot: &AppFamilySlot) -> String {
    let len = slot.name_len.load(Ordering::Relaxed) as usize;
    String::from_utf8_lossy(&read_bytes(&slot.name, len)).into_owned()
}

pub(super) fn slot_help(slot: &AppFamilySlot) -> String {
    let len = slot.help_len.load(Ordering::Acquire) as usize;
    String::from_utf8_lossy(&read_bytes(&slot.help, len)).into_owned()
}

pub(super) fn slot_unit(slot: &AppFamilySlot) -> String {
    let len = slot.unit_len.load(Ordering::Acquire) as usize;
    String::from_utf8_lossy(&read_bytes(&slot.unit, len)).into_owned()
}

pub(super) fn slot_buckets(slot: &AppFamilySlot) -> Vec<f64> {
    let n = (slot.buckets_len.load(Ordering::Relaxed) as usize).min(MAX_BUCKETS);
    slot.buckets[..n]
        .iter()
        .map(|b| f64::from_bits(b.load(Ordering::Relaxed)))
        .collect()
}

fn family_of(index: usize, slot: &AppFamilySlot) -> Option<AppFamily> {
    Some(AppFamily {
        index,
        kind: AppKind::from_code(slot.kind.load(Ordering::Acquire))?,
        mode: GaugeMode::from_code(slot.mode.load(Ordering::Relaxed)).unwrap_or(GaugeMode::Sum),
        bounds: slot_buckets(slot).into(),
    })
}

/// Whether the process has said that its app series are lost.
static LOSS_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

impl AppStore {
    /// Opens the data file of `slot`/`generation` and the index of `store`
    /// for app series. The store is leaked: handles point into it for the
    /// life of the process.
    ///
    /// # Errors
    /// The files are missing or invalid.
    pub fn open(store: &StoreDir, slot: u32, generation: u64) -> io::Result<&'static AppStore> {
        let file = store.open_data(&store.worker_path(slot, generation))?;
        let index = store.open_index()?;
        Ok(Box::leak(Box::new(AppStore {
            file,
            index,
            mirror: Mutex::new(Mirror::default()),
        })))
    }

    /// Finds the family named `spec.name`, registering it if it is new.
    ///
    /// # Errors
    /// The name is used with another type, the table is full, or the index
    /// lock failed.
    pub fn family(&self, spec: FamilySpec<'_>) -> Result<AppFamily, Refusal> {
        let find = |t: &super::layout::AppTable| {
            let used = (t.used.load(Ordering::Acquire) as usize).min(MAX_APP_FAMILIES);
            (0..used).find(|i| {
                let s = &t.families[*i];
                s.kind.load(Ordering::Acquire) != 0 && slot_name(s) == spec.name
            })
        };
        let found = match find(self.index.app_table()) {
            Some(i) => Some(i),
            None => self
                .index
                .locked(|t| {
                    if let Some(i) = find(t) {
                        return Ok(i);
                    }
                    let used = t.used.load(Ordering::Acquire) as usize;
                    if used >= MAX_APP_FAMILIES {
                        return Err(RejectReason::TooManyFamilies);
                    }
                    let s = &t.families[used];
                    let n = write_bytes(&s.name, spec.name.as_bytes());
                    s.name_len.store(n as u32, Ordering::Relaxed);
                    s.mode.store(spec.mode.code(), Ordering::Relaxed);
                    let b = &spec.buckets[..spec.buckets.len().min(MAX_BUCKETS)];
                    for (cell, v) in s.buckets.iter().zip(b) {
                        cell.store(v.to_bits(), Ordering::Relaxed);
                    }
                    s.buckets_len.store(b.len() as u32, Ordering::Relaxed);
                    s.kind.store(spec.kind.code(), Ordering::Release);
                    t.used.store(used as u32 + 1, Ordering::Release);
                    Ok(used)
                })
                .map_err(Refusal::Store)?
                .map(Some)
                .map_err(Refusal::Rejected)?,
        };
        let i = found.ok_or(Refusal::Rejected(RejectReason::TooManyFamilies))?;
        let fam = self
            .index
            .app_slot(i)
            .and_then(|s| family_of(i, s))
            .ok_or(Refusal::Rejected(RejectReason::TooManyFamilies))?;
        if fam.kind != spec.kind {
            return Err(Refusal::Rejected(RejectReason::TypeClash));
        }
        Ok(fam)
    }

    /// Gives `fam` its help text and unit unless it has them already.
    pub fn describe(&self, fam: &AppFamily, help: &str, unit: Option<&str>) {
        let Some(slot) = self.index.app_slot(fam.index) else {
            return;
        };
        let _ = self.index.locked(|_| {
            if slot.help_len.load(Ordering::Relaxed) == 0 && !help.is_empty() {
                let n = write_bytes(&slot.help, cut(help, slot.help.len() * 8).as_bytes());
                slot.help_len.store(n as u32, Ordering::Release);
            }
            if let Some(unit) = unit.filter(|u| u.len() <= slot.unit.len() * 8) {
                if slot.unit_len.load(Ordering::Relaxed) == 0 {
                    let n = write_bytes(&slot.unit, unit.as_bytes());
                    slot.unit_len.store(n as u32, Ordering::Release);
                }
            }
        });
    }

    /// Counts one refused registration.
    pub fn reject(&self, reason: RejectReason) {
        if let Some(c) = self.index.app_table().rejected.get(reason.code() as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The row of the series `labels` of `fam`, and the family's dropped
    /// counter when the series is the family's `other` one.
    fn row(
        &'static self,
        fam: &AppFamily,
        labels: &[(&str, &str)],
    ) -> Option<(u32, &'static Row, Option<&'static AtomicU64>)> {
        let slot: &'static AppFamilySlot = &self.index.app_table().families[fam.index];
        let mut mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        match mirror.resolve_app(&self.index, fam.index, labels) {
            Ok(Resolved::Own(id)) => Some((id, self.file.row(id), None)),
            Ok(Resolved::Other(id)) => Some((id, self.file.row(id), Some(&slot.dropped))),
            Err(e) => {
                slot.dropped.fetch_add(1, Ordering::Relaxed);
                if !LOSS_LOGGED.swap(true, Ordering::Relaxed) {
                    crate::log_warn!(
                        "the metric store refused a new app label set ({e}); new label sets of \
                         this process are dropped and counted in gpe_metrics_series_dropped_total"
                    );
                }
                None
            }
        }
    }

    /// The handle of counter series `labels` of `fam`.
    pub fn counter(&'static self, fam: &AppFamily, labels: &[(&str, &str)]) -> Option<AppCounter> {
        let (_, row, dropped) = self.row(fam, labels)?;
        Some(AppCounter {
            cell: &row[0],
            dropped,
        })
    }

    /// The handle of gauge series `labels` of `fam`.
    pub fn gauge(&'static self, fam: &AppFamily, labels: &[(&str, &str)]) -> Option<AppGauge> {
        let (_, row, dropped) = self.row(fam, labels)?;
        Some(AppGauge {
            row,
            latest: fam.mode == GaugeMode::Latest,
            dropped,
        })
    }

    /// The handle of histogram series `labels` of `fam`.
    pub fn histogram(
        &'static self,
        fam: &AppFamily,
        labels: &[(&str, &str)],
    ) -> Option<AppHistogram> {
        let (id, row, dropped) = self.row(fam, labels)?;
        Some(AppHistogram {
            id,
            row,
            file: &self.file,
            bounds: fam.bounds.clone(),
            dropped,
        })
    }
}

/// A counter series of an app family: cell 0 of its row.
#[derive(Debug)]
pub struct AppCounter {
    cell: &'static AtomicU64,
    dropped: Option<&'static AtomicU64>,
}

impl metrics::CounterFn for AppCounter {
    fn increment(&self, value: u64) {
        self.cell.fetch_add(value, Ordering::Relaxed);
        if let Some(d) = self.dropped {
            d.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn absolute(&self, value: u64) {
        self.cell.fetch_max(value, Ordering::Relaxed);
        if let Some(d) = self.dropped {
            d.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Adds `v` to an `f64` kept as bits in `cell`.
fn add_f64(cell: &AtomicU64, v: f64) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |b| {
        Some((f64::from_bits(b) + v).to_bits())
    });
}

/// A gauge series of an app family: the value as `f64` bits in cell 0, and
/// in cell 1 when it was last set (monotonic nanoseconds for `latest`, else
/// 1): 0 means this process never set it.
#[derive(Debug)]
pub struct AppGauge {
    row: &'static Row,
    latest: bool,
    dropped: Option<&'static AtomicU64>,
}

impl AppGauge {
    fn stamp(&self) {
        let at = if self.latest {
            monotonic_ns().max(1)
        } else {
            1
        };
        self.row[1].store(at, Ordering::Relaxed);
        if let Some(d) = self.dropped {
            d.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl metrics::GaugeFn for AppGauge {
    fn increment(&self, value: f64) {
        add_f64(&self.row[0], value);
        self.stamp();
    }

    fn decrement(&self, value: f64) {
        add_f64(&self.row[0], -value);
        self.stamp();
    }

    fn set(&self, value: f64) {
        self.row[0].store(value.to_bits(), Ordering::Relaxed);
        self.stamp();
    }
}

/// A histogram series of an app family: bucket counts, then the sum as
/// `f64` bits in the last cell.
#[derive(Debug)]
pub struct AppHistogram {
    id: u32,
    row: &'static Row,
    file: &'static DataFile,
    bounds: Arc<[f64]>,
    dropped: Option<&'static AtomicU64>,
}

impl AppHistogram {
    /// Records `value` and returns its bucket; `None` for NaN (not recorded).
    fn observe(&self, value: f64) -> Option<usize> {
        if value.is_nan() {
            return None;
        }
        let bucket = self
            .bounds
            .iter()
            .position(|b| value <= *b)
            .unwrap_or(self.bounds.len())
            .min(CELLS - 2);
        self.row[bucket].fetch_add(1, Ordering::Relaxed);
        add_f64(&self.row[CELLS - 1], value);
        if let Some(d) = self.dropped {
            d.fetch_add(1, Ordering::Relaxed);
        }
        Some(bucket)
    }

    /// Records `value` with `trace_id` as its bucket's newest exemplar.
    pub fn record_with_exemplar(&self, value: f64, trace_id: u128) {
        if let Some(bucket) = self.observe(value) {
            if trace_id != 0 {
                exemplar::put(
                    self.file,
                    self.id,
                    bucket,
                    trace_id,
                    value,
                    monotonic_ns(),
                    false,
                );
            }
        }
    }
}

impl metrics::HistogramFn for AppHistogram {
    fn record(&self, value: f64) {
        self.observe(value);
    }
}
