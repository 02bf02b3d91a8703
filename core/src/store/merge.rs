//! One read of a store directory, merged: each id's rows summed over the
//! retired totals and the live worker files (or kept per process, for app
//! gauges), then named by the index into a [`Snapshot`].

use std::io;
use std::sync::atomic::Ordering;

use super::catalogue::{AppKind, Family, GaugeMode, Shape, WorkerKind, WorkerState};
use super::exemplar::{self, ExemplarView};
use super::index::Index;
use super::layout::{FileKind, CELLS, MAX_APP_FAMILIES, MAX_FAMILIES};
use super::snapshot::*;
use super::{app, mapped, DataFile};

/// How the rows of one id are merged.
#[derive(Debug, Clone, Copy, PartialEq)]
enum RowUse {
    /// A counter: cell 0 summed, the others never written (not read, which
    /// halves the memory a large merge reads).
    Counter,
    /// Integer cells, summed (gpe's histograms).
    Sum,
    /// An app histogram: integer buckets, an `f64` sum in the last cell.
    AppHistogram,
    /// An app gauge: one value per live process.
    AppGauge,
}

/// What the files add up to: integer cells summed, and, in file order,
/// what is merged in order (the `f64` sums of app histograms, app gauge
/// samples, exemplars).
#[derive(Debug)]
struct Part {
    cells: Vec<[u64; CELLS]>,
    sums: Vec<(u32, f64)>,
    gauges: Vec<(u32, GaugeSample)>,
    exemplars: Vec<(u32, usize, ExemplarView)>,
    dropped: [u64; MAX_FAMILIES],
}

/// How many rows ahead of the one it sums `Part::add` prefetches: 4 KiB, a
/// page. At 256 workers × 1,000 routes this took about 1.5 ms (a tenth) off
/// the read, more than 4, 8 or 16 rows ahead did.
const PREFETCH_AHEAD: usize = 32;

/// In `owners`: a row any process may write (and, for `add`, the retired
/// totals, which hold every slot's rows).
const ANY_SLOT: u32 = u32::MAX;

/// The worker slot whose processes alone write row `id`: the slot label of a
/// per-slot family's series, [`ANY_SLOT`] for every other row.
fn slot_owner(index: &Index, id: u32) -> u32 {
    match index.family_of(id) {
        Some(family) if !family.capped() => index
            .describe(id)
            .and_then(|(_, values)| values.first()?.parse().ok())
            .filter(|slot| *slot != ANY_SLOT)
            .unwrap_or(ANY_SLOT),
        _ => ANY_SLOT,
    }
}

impl Part {
    fn new(used: usize) -> Part {
        Part {
            cells: vec![[0u64; CELLS]; used],
            sums: Vec::new(),
            gauges: Vec::new(),
            exemplars: Vec::new(),
            dropped: [0; MAX_FAMILIES],
        }
    }

    /// Adds one file's rows: `live` is its (slot, generation), `None` for
    /// the retired totals.
    ///
    /// A live file's rows of other slots' per-slot series are skipped: only
    /// the slot's own processes write them (a spare file is zeroed before
    /// it is reused), and reading them would make the merge grow with
    /// workers² (at 256 workers, about a fifth of what it reads).
    fn add(&mut self, f: &DataFile, live: Option<(u32, u64)>, uses: &[RowUse], owners: &[u32]) {
        let rows = f.rows_upto(uses.len() as u32);
        let mine = live.map_or(ANY_SLOT, |(slot, _)| slot);
        let read = |id: usize| owners[id] == ANY_SLOT || mine == ANY_SLOT || owners[id] == mine;
        for (id, ((acc, row), use_)) in self.cells.iter_mut().zip(rows).zip(uses).enumerate() {
            let ahead = id + PREFETCH_AHEAD;
            if ahead < rows.len() && read(ahead) {
                let whole = matches!(uses[ahead], RowUse::Sum | RowUse::AppHistogram);
                mapped::prefetch(&rows[ahead], whole);
            }
            if !read(id) {
                continue;
            }
            match use_ {
                RowUse::Counter => {
                    acc[0] = acc[0].wrapping_add(row[0].load(Ordering::Relaxed));
                }
                RowUse::Sum => {
                    for (a, c) in acc.iter_mut().zip(row) {
                        *a = a.wrapping_add(c.load(Ordering::Relaxed));
                    }
                }
                RowUse::AppHistogram => {
                    for (a, c) in acc[..CELLS - 1].iter_mut().zip(row) {
                        *a = a.wrapping_add(c.load(Ordering::Relaxed));
                    }
                    let sum = f64::from_bits(row[CELLS - 1].load(Ordering::Relaxed));
                    self.sums.push((id as u32, sum));
                }
                RowUse::AppGauge => {
                    let at_ns = row[1].load(Ordering::Relaxed);
                    if let (Some((slot, generation)), true) = (live, at_ns != 0) {
                        self.gauges.push((
                            id as u32,
                            GaugeSample {
                                slot,
                                generation,
                                value: f64::from_bits(row[0].load(Ordering::Relaxed)),
                                at_ns,
                            },
                        ));
                    }
                }
            }
        }
        for (d, c) in self.dropped.iter_mut().zip(&f.header().dropped) {
            *d = d.wrapping_add(c.load(Ordering::Relaxed));
        }
        if live.is_some() {
            let used = uses.len() as u32;
            self.exemplars.extend(
                exemplar::read_all(f)
                    .into_iter()
                    .filter(|(id, _, _)| *id < used),
            );
        }
    }
}

impl SnapshotReader {
    /// One read of every file, merged (the caller checks the fold epoch).
    pub(super) fn read_once<T: Send>(
        &mut self,
        index: &Index,
        retired: Option<&DataFile>,
        master: Option<&DataFile>,
        extra: &(impl Fn(&[WorkerView], Option<u32>) -> T + Sync),
        overlap: bool,
    ) -> io::Result<(Snapshot, T)> {
        let used = index.used();
        let uses: Vec<RowUse> = (0..used)
            .map(|id| {
                match index
                    .app_family_of(id)
                    .and_then(|f| index.app_slot(f))
                    .and_then(|s| AppKind::from_code(s.kind.load(Ordering::Acquire)))
                {
                    Some(AppKind::Gauge) => RowUse::AppGauge,
                    Some(AppKind::Histogram) => RowUse::AppHistogram,
                    Some(AppKind::Counter) => RowUse::Counter,
                    None => match index.family_of(id).map(Family::shape) {
                        Some(Shape::Counter) => RowUse::Counter,
                        _ => RowUse::Sum,
                    },
                }
            })
            .collect();
        let owners: Vec<u32> = (0..used).map(|id| slot_owner(index, id)).collect();
        let names = self.worker_files()?;
        // The files whose rows count: the retired totals first, then every
        // live (not folded) worker file, in name order.
        let mut counted: Vec<(&DataFile, Option<(u32, u64)>)> = Vec::with_capacity(names.len() + 1);
        counted.extend(retired.map(|r| (r, None)));
        let mut workers: Vec<WorkerView> = Vec::new();
        let mut in_flight: i64 = 0;
        for (slot, generation) in names {
            let Some((_, file)) = self.files.get(&(slot, generation)) else {
                continue;
            };
            // A folded file's counts are in `retired`.
            let h = file.header();
            if h.folded.load(Ordering::Acquire) != 0
                || h.kind.load(Ordering::Relaxed) != FileKind::Worker as u32
            {
                continue;
            }
            counted.push((file, Some((slot, generation))));
            let pid = h.pid.load(Ordering::Relaxed);
            let inf = h.in_flight.load(Ordering::Relaxed).max(0);
            in_flight = in_flight.saturating_add(inf);
            let mut state = WorkerState::from_code(h.state.load(Ordering::Relaxed))
                .unwrap_or(WorkerState::Booting);
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
            // Names come sorted by slot, then generation: the slot's
            // earlier processes are the last view's.
            match workers.last_mut().filter(|w| w.slot == slot) {
                Some(w) if w.generation < generation => {
                    let mut pids = std::mem::take(&mut w.pids);
                    pids.insert(0, pid);
                    *w = WorkerView { pids, ..view };
                }
                Some(w) => w.pids.push(pid),
                None => workers.push(view),
            }
        }
        let master_pid = master.map(|m| m.header().pid.load(Ordering::Relaxed));
        // Summing on more threads did not pay (docs/metrics.md), but the
        // caller's reads of each process overlap the sums well.
        let sum = || {
            let mut part = Part::new(used as usize);
            for (f, live) in &counted {
                part.add(f, *live, &uses, &owners);
            }
            part
        };
        let (part, more) = if overlap && workers.len() >= OVERLAP_WORKERS {
            std::thread::scope(|s| {
                let beside = std::thread::Builder::new()
                    .name("gpe-read".into())
                    .spawn_scoped(s, || extra(&workers, master_pid));
                let part = sum();
                // No thread to be had (or it panicked): the reads run here.
                let more = beside
                    .ok()
                    .and_then(|h| h.join().ok())
                    .unwrap_or_else(|| extra(&workers, master_pid));
                (part, more)
            })
        } else {
            (sum(), extra(&workers, master_pid))
        };
        let Part {
            cells,
            sums: file_sums,
            gauges: file_gauges,
            exemplars: file_exemplars,
            dropped,
        } = part;
        let mut sums = vec![0f64; used as usize];
        for (id, v) in file_sums {
            sums[id as usize] += v;
        }
        let mut gauges: Vec<Vec<GaugeSample>> = vec![Vec::new(); used as usize];
        for (id, g) in file_gauges {
            gauges[id as usize].push(g);
        }
        let mut newest_exemplars: std::collections::HashMap<(u32, usize), ExemplarView> =
            std::collections::HashMap::new();
        for (id, bucket, e) in file_exemplars {
            let slot = newest_exemplars.entry((id, bucket)).or_insert(e);
            if e.at_ns > slot.at_ns {
                *slot = e;
            }
        }
        let snap = assemble(
            index,
            master,
            &uses,
            Merged {
                cells,
                sums,
                gauges,
                newest_exemplars,
                dropped,
                workers,
                in_flight,
            },
        );
        Ok((snap, more))
    }
}

/// The summed rows and the live workers of one read.
struct Merged {
    cells: Vec<[u64; CELLS]>,
    sums: Vec<f64>,
    gauges: Vec<Vec<GaugeSample>>,
    newest_exemplars: std::collections::HashMap<(u32, usize), ExemplarView>,
    dropped: [u64; MAX_FAMILIES],
    workers: Vec<WorkerView>,
    in_flight: i64,
}

/// Names the merged rows by the index and adds the master's figures.
fn assemble(index: &Index, master: Option<&DataFile>, uses: &[RowUse], m: Merged) -> Snapshot {
    let used = index.used().min(uses.len() as u32);
    let Merged {
        cells,
        sums,
        gauges,
        newest_exemplars,
        dropped,
        workers,
        in_flight,
    } = m;
    let mut exemplars_of: std::collections::HashMap<u32, Vec<(usize, ExemplarView)>> =
        std::collections::HashMap::new();
    for ((id, bucket), e) in newest_exemplars {
        exemplars_of.entry(id).or_default().push((bucket, e));
    }
    for v in exemplars_of.values_mut() {
        v.sort_by_key(|(b, _)| *b);
    }
    let mut series = Vec::new();
    let mut app = AppSnapshot::default();
    let mut app_series = Vec::new();
    for (((id, cells), sum), samples) in (0..used).zip(cells).zip(sums).zip(gauges) {
        let exemplars = exemplars_of.remove(&id).unwrap_or_default();
        if let Some((family, labels)) = index.describe(id) {
            series.push(Series {
                family,
                labels: labels.into_iter().map(str::to_owned).collect(),
                cells,
                exemplars,
            });
        } else if let Some((family, labels)) = index.describe_app(id) {
            let labels = labels
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
            let value = match uses[id as usize] {
                RowUse::Sum | RowUse::Counter => AppValue::Counter(cells[0]),
                RowUse::AppGauge => AppValue::Gauge(samples),
                RowUse::AppHistogram => {
                    let n = index
                        .app_slot(family)
                        .map_or(0, |s| app::slot_buckets(s).len())
                        .min(CELLS - 2);
                    AppValue::Histogram {
                        buckets: cells[..=n].to_vec(),
                        sum,
                    }
                }
            };
            app_series.push((family, labels, value, exemplars));
        }
    }
    let table = index.app_table();
    let mut positions = [usize::MAX; MAX_APP_FAMILIES];
    for (i, pos) in positions.iter_mut().enumerate() {
        let Some(slot) = index.app_slot(i) else {
            continue;
        };
        let Some(kind) = AppKind::from_code(slot.kind.load(Ordering::Acquire)) else {
            continue;
        };
        *pos = app.families.len();
        app.families.push(AppFamilyView {
            name: app::slot_name(slot),
            kind,
            mode: GaugeMode::from_code(slot.mode.load(Ordering::Relaxed)).unwrap_or(GaugeMode::Sum),
            help: app::slot_help(slot),
            unit: app::slot_unit(slot),
            buckets: app::slot_buckets(slot),
            dropped: slot.dropped.load(Ordering::Relaxed),
        });
    }
    for (family, labels, value, exemplars) in app_series {
        if let Some(&pos) = positions.get(family).filter(|p| **p != usize::MAX) {
            app.series.push(AppSeries {
                family: pos,
                labels,
                value,
                exemplars,
            });
        }
    }
    for (r, c) in app.rejected.iter_mut().zip(&table.rejected) {
        *r = c.load(Ordering::Relaxed);
    }
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
    Snapshot {
        series,
        workers,
        master,
        dropped,
        in_flight,
        duration_buckets: index.duration_buckets(),
        family_cap: index.family_cap(),
        app,
    }
}
