//! The reader side of the store: a consistent, merged [`Snapshot`] of every file
//! in a store directory. Counters are summed over live worker files and the
//! retired totals; the master's fold epoch (a sequence lock) makes sure a fold
//! that races the read is retried rather than counted twice or missed. One
//! read's merge of the rows is in `merge.rs`.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use super::catalogue::{AppKind, Family, GaugeMode, WorkerKind, WorkerState};
use super::exemplar::ExemplarView;
use super::layout::{CELLS, MAX_FAMILIES, MAX_REASONS, MAX_REJECT_REASONS, MAX_SIGNALS};
use super::{DataFile, StoreDir};

/// One merged series.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Its family.
    pub family: Family,
    /// Label values, in the family's label order.
    pub labels: Vec<String>,
    /// Summed cells (counter in cell 0; histogram buckets, `+Inf`, sum last).
    pub cells: [u64; CELLS],
    /// Histograms: the newest exemplar of each bucket that has one, as
    /// (bucket, exemplar), over the live workers.
    pub exemplars: Vec<(usize, ExemplarView)>,
}

/// An app family (registered through the `metrics` facade).
#[derive(Debug, Clone, PartialEq)]
pub struct AppFamilyView {
    /// The exposed name (counters without `_total`).
    pub name: String,
    /// Its type.
    pub kind: AppKind,
    /// Gauges: how live workers' values merge.
    pub mode: GaugeMode,
    /// Help text (empty if never described).
    pub help: String,
    /// Unit, as Prometheus spells it (empty if none).
    pub unit: String,
    /// Histograms: finite bucket bounds.
    pub buckets: Vec<f64>,
    /// Observations that went into the family's `other` series.
    pub dropped: u64,
}

/// One gauge value set by one live worker process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GaugeSample {
    /// Its slot.
    pub slot: u32,
    /// Its generation.
    pub generation: u64,
    /// The value.
    pub value: f64,
    /// When it was set (monotonic nanoseconds; `latest` mode only, else 1).
    pub at_ns: u64,
}

/// The merged value of one app series.
#[derive(Debug, Clone, PartialEq)]
pub enum AppValue {
    /// Summed over every process, dead ones included.
    Counter(u64),
    /// The values of the live processes that set it.
    Gauge(Vec<GaugeSample>),
    /// Bucket counts (the finite ones, then `+Inf`) and the sum.
    Histogram {
        /// Per-bucket counts (not cumulative).
        buckets: Vec<u64>,
        /// Sum of the observations.
        sum: f64,
    },
}

/// One app series, merged.
#[derive(Debug, Clone, PartialEq)]
pub struct AppSeries {
    /// Index of its family in [`AppSnapshot::families`].
    pub family: usize,
    /// Label names and values.
    pub labels: Vec<(String, String)>,
    /// Its value.
    pub value: AppValue,
    /// Histograms: the newest exemplar of each bucket that has one.
    pub exemplars: Vec<(usize, ExemplarView)>,
}

/// Every app family and series of the store.
#[derive(Debug, Clone, Default)]
pub struct AppSnapshot {
    /// Families in registration order; series refer to them by position.
    pub families: Vec<AppFamilyView>,
    /// Series in index order.
    pub series: Vec<AppSeries>,
    /// Refused registrations by `RejectReason` code.
    pub rejected: [u64; MAX_REJECT_REASONS],
}

impl GaugeMode {
    /// Merges the values of the live processes: one value for every mode
    /// but [`GaugeMode::PerWorker`], which gives one per slot (the newest
    /// generation's). Nothing when no live process set the gauge.
    pub fn merge(self, samples: &[GaugeSample]) -> Vec<(Option<u32>, f64)> {
        let values = samples.iter().map(|s| s.value);
        let one = match self {
            _ if samples.is_empty() => None,
            GaugeMode::Sum => Some(values.sum()),
            GaugeMode::Max => values.reduce(f64::max),
            GaugeMode::Min => values.reduce(f64::min),
            GaugeMode::Latest => samples
                .iter()
                .max_by_key(|s| (s.at_ns, s.generation))
                .map(|s| s.value),
            GaugeMode::PerWorker => {
                let mut newest: std::collections::BTreeMap<u32, &GaugeSample> =
                    std::collections::BTreeMap::new();
                for s in samples {
                    let e = newest.entry(s.slot).or_insert(s);
                    if s.generation > e.generation {
                        *e = s;
                    }
                }
                return newest
                    .into_iter()
                    .map(|(slot, s)| (Some(slot), s.value))
                    .collect();
            }
        };
        one.map(|v| vec![(None, v)]).unwrap_or_default()
    }
}

/// The newest live process of one worker slot.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerView {
    /// Slot number.
    pub slot: u32,
    /// Generation of this process.
    pub generation: u64,
    /// Process id.
    pub pid: u32,
    /// Worker type.
    pub kind: Option<WorkerKind>,
    /// Current state.
    pub state: WorkerState,
    /// Unix seconds of the last state change.
    pub state_since: f64,
    /// Unix seconds the process started.
    pub start_time: f64,
    /// Open connections.
    pub connections: i64,
    /// Requests in progress.
    pub in_flight: i64,
    /// Pids of every live process of the slot (the newest first); more than one
    /// while an old generation drains.
    pub pids: Vec<u32>,
}

/// The master's own figures.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MasterView {
    /// Master pid.
    pub pid: u32,
    /// Handled signals by signal code.
    pub signals: [u64; MAX_SIGNALS],
    /// Worker exits by reason code.
    pub exits: [u64; MAX_REASONS],
    /// Live workers.
    pub workers: u64,
    /// Desired workers.
    pub workers_desired: u64,
    /// Completed reloads.
    pub reloads: u64,
    /// Running (not stopping) with every desired worker booted.
    pub ready: bool,
}

/// A consistent, merged view of a store directory.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Every series of the index, merged across files.
    pub series: Vec<Series>,
    /// One entry per slot that has a live process, by slot.
    pub workers: Vec<WorkerView>,
    /// The master's figures, if its file exists (not in a bare directory).
    pub master: Option<MasterView>,
    /// Observations that fell into `other` series, by family code.
    pub dropped: [u64; MAX_FAMILIES],
    /// Requests in progress across all workers.
    pub in_flight: i64,
    /// Duration bucket bounds in seconds.
    pub duration_buckets: Vec<f64>,
    /// Per-family series cap.
    pub family_cap: u32,
    /// The app's own families.
    pub app: AppSnapshot,
}

const MAX_ATTEMPTS: u32 = 1000;
/// Longest a fold can take. A fold epoch that stays at one odd value longer
/// was left by a folder that died (or by a foreign write): the reader then
/// reads as if no fold ran, and the master repairs the epoch on its next tick.
pub const FOLD_STALE: Duration = Duration::from_millis(500);

/// From this many live workers on, a read runs the caller's per-process
/// reads (the exporter's `/proc` figures, about 15 µs a process) on a
/// second thread while it sums the files (memory-bound): at 256 workers ×
/// 1,000 routes that takes about 4 ms off a scrape's read. Below it the
/// thread would cost more than it saves.
pub(super) const OVERLAP_WORKERS: usize = 16;

impl Snapshot {
    /// Reads `store` consistently.
    ///
    /// # Errors
    /// The index is missing or invalid, or the directory cannot be listed, or a
    /// fold kept racing the read for too long.
    pub fn read(store: &StoreDir) -> io::Result<Snapshot> {
        // Nothing to read beside the sums, so no second thread.
        SnapshotReader::new(store.clone())
            .read_within(FOLD_STALE, |_, _| (), false)
            .map(|(s, ())| s)
    }

    /// Reads `store` consistently and calls `extra` on each attempt's live
    /// workers and master pid inside the fold window check, so that anything
    /// it reads about live processes (such as `/proc`) is consistent with the
    /// counters: a worker reaped meanwhile makes the attempt start over.
    ///
    /// With 16 live workers or more, `extra` runs on a second thread while
    /// the files are summed.
    ///
    /// # Errors
    /// As [`Snapshot::read`].
    pub fn read_with<T: Send>(
        store: &StoreDir,
        extra: impl Fn(&[WorkerView], Option<u32>) -> T + Sync,
    ) -> io::Result<(Snapshot, T)> {
        SnapshotReader::new(store.clone()).read_with(extra)
    }

    /// As [`Snapshot::read_with`], taking an epoch that stays odd for `stale`
    /// as left by a dead folder.
    #[cfg(test)]
    pub(super) fn read_within<T: Send>(
        store: &StoreDir,
        stale: Duration,
        extra: impl Fn(&[WorkerView], Option<u32>) -> T + Sync,
    ) -> io::Result<(Snapshot, T)> {
        SnapshotReader::new(store.clone()).read_within(stale, extra, true)
    }
}

/// A reader of one store that keeps the worker files it mapped from one
/// read to the next, so that a read maps (and faults in) only the files that
/// are new since the last one. A file is dropped once its name is gone from
/// the directory or names another file.
#[derive(Debug)]
pub struct SnapshotReader {
    store: StoreDir,
    /// Mapped worker files by (slot, generation), with their inodes.
    pub(super) files: HashMap<(u32, u64), (u64, DataFile)>,
}

impl SnapshotReader {
    /// A reader of `store` that has mapped nothing yet.
    pub fn new(store: StoreDir) -> SnapshotReader {
        SnapshotReader {
            store,
            files: HashMap::new(),
        }
    }

    /// The store it reads.
    pub fn store(&self) -> &StoreDir {
        &self.store
    }

    /// As [`Snapshot::read_with`].
    ///
    /// # Errors
    /// As [`Snapshot::read`].
    pub fn read_with<T: Send>(
        &mut self,
        extra: impl Fn(&[WorkerView], Option<u32>) -> T + Sync,
    ) -> io::Result<(Snapshot, T)> {
        self.read_within(FOLD_STALE, extra, true)
    }

    /// As [`Snapshot::read_with`]; `overlap` allows running `extra` on a
    /// second thread (from [`OVERLAP_WORKERS`] live workers on).
    fn read_within<T: Send>(
        &mut self,
        stale: Duration,
        extra: impl Fn(&[WorkerView], Option<u32>) -> T + Sync,
        overlap: bool,
    ) -> io::Result<(Snapshot, T)> {
        let store = self.store.clone();
        let index = store.open_index()?;
        let retired = store.open_data(&store.retired_path()).ok();
        let master = store.open_data(&store.master_path()).ok();
        let mut odd: Option<(u64, Instant)> = None;
        let mut attempts = 0;
        while attempts < MAX_ATTEMPTS {
            let begin = retired
                .as_ref()
                .map_or(0, |r| r.header().epoch.load(Ordering::Acquire));
            if begin % 2 == 1 {
                let dead = match odd {
                    Some((e, since)) if e == begin => since.elapsed() >= stale,
                    _ => {
                        odd = Some((begin, Instant::now()));
                        false
                    }
                };
                if !dead {
                    std::thread::sleep(Duration::from_micros(100));
                    continue;
                }
            }
            attempts += 1;
            let (snap, more) =
                self.read_once(&index, retired.as_ref(), master.as_ref(), &extra, overlap)?;
            fence(Ordering::Acquire);
            let end = retired
                .as_ref()
                .map_or(0, |r| r.header().epoch.load(Ordering::Relaxed));
            if begin == end {
                return Ok((snap, more));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            "the master kept folding while the store was read",
        ))
    }

    /// The worker files listed now, mapped: those mapped before under the
    /// same name and inode are kept, the others opened (a file that cannot
    /// be opened, such as a half-created one, is left out this time).
    pub(super) fn worker_files(&mut self) -> io::Result<Vec<(u32, u64)>> {
        let listed = self.store.worker_entries()?;
        // As a fresh open would, refuse a kept file sized for another index.
        let capacity = self.store.capacity()?;
        let mut keep: HashMap<(u32, u64), (u64, DataFile)> = HashMap::with_capacity(listed.len());
        let mut names = Vec::with_capacity(listed.len());
        for (slot, generation, path, ino) in listed {
            let file = match self.files.remove(&(slot, generation)) {
                Some((i, f)) if i == ino && f.whole() && f.rows() == capacity => (i, f),
                _ => match self.store.open_data(&path) {
                    Ok(f) => (f.ino().unwrap_or(ino), f),
                    Err(_) => continue,
                },
            };
            keep.insert((slot, generation), file);
            names.push((slot, generation));
        }
        self.files = keep;
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::index::{Index, Key, Mirror};
    use crate::store::{WorkerFile, WorkerKind};

    fn requests(s: &Snapshot) -> u64 {
        s.series
            .iter()
            .filter(|s| s.family == Family::WorkerRequests)
            .map(|s| s.cells[0])
            .sum()
    }

    /// A store of `workers` workers in which slot `s` answered `s + 1`
    /// requests on `/`.
    fn busy_store(dir: &std::path::Path, workers: u32) -> StoreDir {
        use crate::store::{Recorder, RequestRecord};
        let store = StoreDir::new(dir.join(format!("w{workers}"))).with_capacity(256);
        store.prepare().unwrap();
        Index::create(&store.index_path(), 256, 100, &[1.0]).unwrap();
        for slot in 0..workers {
            WorkerFile::create(&store, slot, 1, WorkerKind::Thread).unwrap();
            let rec = Recorder::open(&store, slot, 1, true, true).unwrap();
            rec.ready();
            for _ in 0..=slot {
                rec.begin_at(1_000);
                rec.finish_at(1_000, 2_000, &RequestRecord::hello());
            }
        }
        store
    }

    #[test]
    fn many_workers_are_summed_exactly_while_their_processes_are_read_beside() {
        let dir = tempfile::tempdir().unwrap();
        let here = || std::thread::current().name().map(str::to_owned);
        for workers in [OVERLAP_WORKERS as u32 - 1, OVERLAP_WORKERS as u32 + 4] {
            let store = busy_store(dir.path(), workers);
            // A foreign write to another slot's per-slot row in slot 0's file
            // is not counted: only a slot's own processes write its rows.
            let index = store.open_index().unwrap();
            let slot5 = Mirror::default()
                .resolve(&index, &Key::new(Family::WorkerRequests, &["5"]))
                .unwrap()
                .id();
            let file0 = store.open_data(&store.worker_path(0, 1)).unwrap();
            file0.row(slot5)[0].fetch_add(1_000, Ordering::Relaxed);

            let (snap, (thread, seen)) = Snapshot::read_with(&store, |views, master| {
                assert_eq!(master, None);
                (here(), views.iter().map(|v| v.pids.len()).sum::<usize>())
            })
            .unwrap();
            assert_eq!(seen, workers as usize);
            let beside = thread.as_deref() == Some("gpe-read");
            assert_eq!(
                beside,
                workers as usize >= OVERLAP_WORKERS,
                "{workers} workers"
            );
            for slot in 0..workers {
                let label = slot.to_string();
                let n: u64 = snap
                    .series
                    .iter()
                    .filter(|s| s.family == Family::WorkerRequests && s.labels == [label.clone()])
                    .map(|s| s.cells[0])
                    .sum();
                assert_eq!(n, u64::from(slot) + 1, "slot {slot} of {workers}");
            }
            let http: u64 = snap
                .series
                .iter()
                .filter(|s| s.family == Family::HttpRequests)
                .map(|s| s.cells[0])
                .sum();
            assert_eq!(http, u64::from(workers * (workers + 1) / 2));
        }
    }

    #[test]
    fn a_reader_that_keeps_files_mapped_sees_what_a_fresh_read_sees() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path().join("m"));
        store.prepare().unwrap();
        let index = Index::create(&store.index_path(), 1024, 100, &[1.0]).unwrap();
        let id = Mirror::default()
            .resolve(&index, &Key::new(Family::WorkerRequests, &["1"]))
            .unwrap()
            .id();
        let count = |generation: u64, n: u64| {
            let f = store.open_data(&store.worker_path(1, generation)).unwrap();
            f.row(id)[0].fetch_add(n, Ordering::Relaxed);
        };
        let mut reader = SnapshotReader::new(store.clone());
        let read = |r: &mut SnapshotReader| r.read_with(|_, _| ()).map(|(s, ())| s).unwrap();

        let first = WorkerFile::create(&store, 1, 1, WorkerKind::Sync).unwrap();
        count(1, 5);
        assert_eq!(requests(&read(&mut reader)), 5);
        // Counted again on the next read, from the kept mapping.
        count(1, 1);
        assert_eq!(requests(&read(&mut reader)), 6);
        // A second generation joins; the newest leads the slot's view.
        let second = WorkerFile::create(&store, 1, 2, WorkerKind::Sync).unwrap();
        count(2, 7);
        let s = read(&mut reader);
        assert_eq!(requests(&s), 13);
        assert_eq!((s.workers.len(), s.workers[0].generation), (1, 2));
        assert_eq!(s.workers[0].pids.len(), 2);
        // A removed file is dropped.
        first.remove();
        assert_eq!(requests(&read(&mut reader)), 7);
        assert_eq!(reader.files.len(), 1);
        // Another file under the same name (a new inode, since this reader
        // still maps the old one) is mapped afresh.
        std::fs::remove_file(store.worker_path(1, 2)).unwrap();
        let third = WorkerFile::create(&store, 1, 2, WorkerKind::Sync).unwrap();
        count(2, 3);
        let s = read(&mut reader);
        assert_eq!(requests(&s), 3);
        assert_eq!(requests(&Snapshot::read(&store).unwrap()), 3);
        // A file whose magic a foreign write broke is left out, as by a
        // fresh read.
        let raw = store.open_data(&store.worker_path(1, 2)).unwrap();
        raw.header().magic.store(0, Ordering::Relaxed);
        assert_eq!(requests(&read(&mut reader)), 0);
        assert!(reader.files.is_empty());
        // A kept file sized for an index that was since replaced by one of
        // another capacity is let go, as a fresh open refuses it.
        let fourth = WorkerFile::create(&store, 1, 3, WorkerKind::Sync).unwrap();
        assert_eq!(read(&mut reader).workers.len(), 1);
        assert_eq!(reader.files.len(), 1);
        let other = dir.path().join("index2");
        Index::create(&other, 2048, 100, &[1.0]).unwrap();
        std::fs::rename(&other, store.index_path()).unwrap();
        assert!(read(&mut reader).workers.is_empty());
        assert!(reader.files.is_empty());
        drop((second, third, fourth));
    }
}
