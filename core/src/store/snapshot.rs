//! The reader side of the store: a consistent, merged [`Snapshot`] of every file
//! in a store directory. Counters are summed over live worker files and the
//! retired totals; the master's fold epoch (a sequence lock) makes sure a fold
//! that races the read is retried rather than counted twice or missed.

use std::io;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use super::catalogue::{Family, WorkerKind, WorkerState};
use super::index::Index;
use super::layout::{FileKind, CELLS, MAX_FAMILIES, MAX_REASONS, MAX_SIGNALS};
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
}

const MAX_ATTEMPTS: u32 = 1000;
/// Longest a fold can take. A fold epoch that stays at one odd value longer
/// was left by a folder that died (or by a foreign write): the reader then
/// reads as if no fold ran, and the master repairs the epoch on its next tick.
pub const FOLD_STALE: Duration = Duration::from_millis(500);

impl Snapshot {
    /// Reads `store` consistently.
    ///
    /// # Errors
    /// The index is missing or invalid, or the directory cannot be listed, or a
    /// fold kept racing the read for too long.
    pub fn read(store: &StoreDir) -> io::Result<Snapshot> {
        Self::read_with(store, |_| ()).map(|(s, ())| s)
    }

    /// Reads `store` consistently and calls `extra` on each attempt's view
    /// inside the fold window check, so that anything it reads about live
    /// processes (such as `/proc`) is consistent with the counters: a worker
    /// reaped meanwhile makes the attempt start over.
    ///
    /// # Errors
    /// As [`Snapshot::read`].
    pub fn read_with<T>(
        store: &StoreDir,
        extra: impl FnMut(&Snapshot) -> T,
    ) -> io::Result<(Snapshot, T)> {
        Self::read_within(store, FOLD_STALE, extra)
    }

    /// As [`Snapshot::read_with`], taking an epoch that stays odd for `stale`
    /// as left by a dead folder.
    pub(super) fn read_within<T>(
        store: &StoreDir,
        stale: Duration,
        mut extra: impl FnMut(&Snapshot) -> T,
    ) -> io::Result<(Snapshot, T)> {
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
            let snap = read_once(store, &index, retired.as_ref(), master.as_ref())?;
            let more = extra(&snap);
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
}

fn read_once(
    store: &StoreDir,
    index: &Index,
    retired: Option<&DataFile>,
    master: Option<&DataFile>,
) -> io::Result<Snapshot> {
    let used = index.used();
    let mut cells = vec![[0u64; CELLS]; used as usize];
    let mut dropped = [0u64; MAX_FAMILIES];
    let mut sum_file = |f: &DataFile, dropped: &mut [u64; MAX_FAMILIES]| {
        for (id, acc) in cells.iter_mut().enumerate() {
            let row = f.row(id as u32);
            for (a, c) in acc.iter_mut().zip(row) {
                *a = a.wrapping_add(c.load(Ordering::Relaxed));
            }
        }
        for (d, c) in dropped.iter_mut().zip(&f.header().dropped) {
            *d = d.wrapping_add(c.load(Ordering::Relaxed));
        }
    };
    if let Some(r) = retired {
        sum_file(r, &mut dropped);
    }
    let mut workers: Vec<WorkerView> = Vec::new();
    let mut in_flight: i64 = 0;
    for (slot, generation, path) in store.worker_files()? {
        // A file that vanished or is half-created is skipped: its counts are in
        // `retired` (folded) or still zero.
        let Ok(file) = store.open_data(&path) else {
            continue;
        };
        let h = file.header();
        if h.folded.load(Ordering::Acquire) != 0
            || h.kind.load(Ordering::Relaxed) != FileKind::Worker as u32
        {
            continue;
        }
        sum_file(&file, &mut dropped);
        let pid = h.pid.load(Ordering::Relaxed);
        let inf = h.in_flight.load(Ordering::Relaxed).max(0);
        in_flight = in_flight.saturating_add(inf);
        let mut state =
            WorkerState::from_code(h.state.load(Ordering::Relaxed)).unwrap_or(WorkerState::Booting);
        if matches!(state, WorkerState::Idle | WorkerState::Busy) {
            state = if inf > 0 {
                WorkerState::Busy
            } else {
                WorkerState::Idle
            };
        }
        let view = WorkerView {
            slot,
            generation,
            pid,
            kind: WorkerKind::from_code(h.worker_kind.load(Ordering::Relaxed)),
            state,
            state_since: (h.state_since_ns.load(Ordering::Relaxed) as i64)
                .wrapping_add(h.clock_offset_ns.load(Ordering::Relaxed))
                as f64
                / 1e9,
            start_time: h.start_time_ns.load(Ordering::Relaxed) as f64 / 1e9,
            connections: h.connections.load(Ordering::Relaxed).max(0),
            in_flight: inf,
            pids: vec![pid],
        };
        match workers.iter_mut().find(|w| w.slot == slot) {
            Some(w) if w.generation < generation => {
                let mut pids = std::mem::take(&mut w.pids);
                pids.insert(0, pid);
                *w = WorkerView { pids, ..view };
            }
            Some(w) => w.pids.push(pid),
            None => workers.push(view),
        }
    }
    let series = (0..used)
        .zip(cells)
        .filter_map(|(id, cells)| {
            let (family, labels) = index.describe(id)?;
            Some(Series {
                family,
                labels: labels.into_iter().map(str::to_owned).collect(),
                cells,
            })
        })
        .collect();
    let master = master.map(|m| {
        let h = m.header();
        let mut view = MasterView {
            pid: h.pid.load(Ordering::Relaxed),
            workers: h.workers.load(Ordering::Relaxed),
            workers_desired: h.workers_desired.load(Ordering::Relaxed),
            reloads: h.reloads.load(Ordering::Relaxed),
            ready: h.ready.load(Ordering::Relaxed) == 1,
            ..MasterView::default()
        };
        for (v, c) in view.signals.iter_mut().zip(&h.signals) {
            *v = c.load(Ordering::Relaxed);
        }
        for (v, c) in view.exits.iter_mut().zip(&h.exits) {
            *v = c.load(Ordering::Relaxed);
        }
        view
    });
    Ok(Snapshot {
        series,
        workers,
        master,
        dropped,
        in_flight,
        duration_buckets: index.duration_buckets(),
        family_cap: index.family_cap(),
    })
}
