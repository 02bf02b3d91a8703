//! Typed views over the store's data files for the processes that are not
//! recorders: the master's own counters ([`MasterFile`]), the retired totals
//! it folds dead workers into ([`RetiredFile`]), and a worker's file as the
//! master and the sibling workers see it ([`WorkerFile`]). The raw header stays
//! inside `store`; opening a mapped file is trusted in one place
//! (`StoreDir::open_data`).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{fence, Ordering};

use super::catalogue::AppKind;
use super::index::{Key, Mirror};
use super::layout::{FileKind, CELLS};
use super::{
    DataFile, ExitReason, Family, FileIdentity, InFlightRequest, Index, MasterSignal, StoreDir,
};
use super::{WorkerKind, WorkerState};

impl StoreDir {
    /// Opens a data file of this store directory.
    ///
    /// # Errors
    /// Missing, wrong size, or not a data file of this version.
    pub(super) fn open_data(&self, path: &Path) -> io::Result<DataFile> {
        debug_assert!(path.starts_with(&self.path));
        // SAFETY: the one trust boundary for data files. `path` is a name this
        // StoreDir gave out, inside a gpe store directory. Files under those names
        // are created by `DataFile::create` and every gpe process maps them and
        // touches them only through the store's atomic views. A foreign or
        // half-created file fails the size check (before mapping) or the magic and
        // version check (an atomic, valid for any bits) before anything else is read.
        unsafe { DataFile::open(path, self.capacity()?) }
    }

    /// Opens the series index of this store directory.
    ///
    /// # Errors
    /// Missing, wrong size, or not an index of this version.
    pub(super) fn open_index(&self) -> io::Result<Index> {
        // SAFETY: as for `open_data`: the index is created by `Index::create` in this
        // gpe store directory and accessed only through the store's views.
        unsafe { Index::open(&self.index_path()) }
    }
}

fn identity(kind: FileKind) -> FileIdentity {
    FileIdentity {
        kind,
        slot: 0,
        generation: 0,
        worker_kind: None,
    }
}

/// The master's own counters: signals handled, worker exits, reloads, and the
/// number of workers. Written by the master only.
#[derive(Debug)]
pub struct MasterFile(DataFile);

impl MasterFile {
    /// Creates the master file of `store`, naming this process as its writer.
    ///
    /// # Errors
    /// Creating or mapping the file failed.
    pub fn create(store: &StoreDir) -> io::Result<MasterFile> {
        let file = DataFile::create(
            &store.master_path(),
            store.capacity()?,
            identity(FileKind::Master),
        )?;
        file.header()
            .pid
            .store(std::process::id(), Ordering::Relaxed);
        Ok(MasterFile(file))
    }

    /// Opens the master file already in `store` (to see whether another server
    /// uses the directory).
    ///
    /// # Errors
    /// Missing, or not a master file of this version.
    pub fn open(store: &StoreDir) -> io::Result<MasterFile> {
        let file = store.open_data(&store.master_path())?;
        if file.header().kind.load(Ordering::Relaxed) != FileKind::Master as u32 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a master file",
            ));
        }
        Ok(MasterFile(file))
    }

    /// The pid of the master that wrote this file.
    pub fn pid(&self) -> u32 {
        self.0.header().pid.load(Ordering::Relaxed)
    }

    /// Whether the file is still whole and still at its path.
    pub fn intact(&self, store: &StoreDir) -> bool {
        self.0.map.intact(&store.master_path())
    }

    /// Writes a copy at its path (the file was deleted) and switches to it.
    ///
    /// # Errors
    /// Creating, reserving or renaming the copy failed.
    pub fn recreate(&mut self, store: &StoreDir) -> io::Result<()> {
        self.0.recreate(&store.master_path())
    }

    /// Puts back what a foreign write changed in the header this master
    /// wrote (its identity and pid). Returns whether it had to.
    pub fn repair(&self) -> bool {
        let h = self.0.header();
        let pid_ok = h.pid.load(Ordering::Relaxed) == std::process::id();
        if !pid_ok {
            h.pid.store(std::process::id(), Ordering::Relaxed);
        }
        self.0.repair_identity(FileKind::Master) | !pid_ok
    }

    /// Counts one handled signal.
    pub fn count_signal(&self, sig: MasterSignal) {
        self.0.header().signals[sig.code() as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one worker exit.
    pub fn count_exit(&self, reason: ExitReason) {
        self.0.header().exits[reason.code() as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one completed reload.
    pub fn count_reload(&self) {
        self.0.header().reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// Publishes the number of serving and of desired workers, and whether
    /// the server is ready (running, every desired worker booted).
    pub fn publish_workers(&self, serving: u32, desired: u32, ready: bool) {
        let h = self.0.header();
        h.ready.store(u32::from(ready), Ordering::Relaxed);
        h.workers.store(u64::from(serving), Ordering::Relaxed);
        h.workers_desired
            .store(u64::from(desired), Ordering::Relaxed);
    }
}

/// The totals of workers that have exited. The master is its only writer and
/// adds to it only inside a [`FoldWindow`].
#[derive(Debug)]
pub struct RetiredFile(DataFile);

impl RetiredFile {
    /// Creates the retired file of `store`.
    ///
    /// # Errors
    /// Creating or mapping the file failed.
    pub fn create(store: &StoreDir) -> io::Result<RetiredFile> {
        DataFile::create(
            &store.retired_path(),
            store.capacity()?,
            identity(FileKind::Retired),
        )
        .map(RetiredFile)
    }

    /// Opens the fold window (the retired epoch becomes odd) until the window
    /// is dropped, so that readers retry a snapshot that raced a fold. An
    /// epoch found odd (no window of this master is open: a foreign write) is
    /// first moved on to the next even value.
    pub fn fold_window(&self) -> FoldWindow<'_> {
        let epoch = &self.0.header().epoch;
        let begin = epoch.load(Ordering::Relaxed);
        let begin = begin.wrapping_add(begin % 2);
        epoch.store(begin.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        FoldWindow {
            retired: &self.0,
            begin,
        }
    }

    /// Whether the file is still whole and still at its path.
    pub fn intact(&self, store: &StoreDir) -> bool {
        self.0.map.intact(&store.retired_path())
    }

    /// Writes a copy at its path (the file was deleted) and switches to it.
    /// Call it outside a fold window.
    ///
    /// # Errors
    /// Creating, reserving or renaming the copy failed.
    pub fn recreate(&mut self, store: &StoreDir) -> io::Result<()> {
        self.0.recreate(&store.retired_path())
    }

    /// Puts back what a foreign write changed: the identity, and an epoch
    /// left odd while no fold window is open (call it outside one). Returns
    /// what was repaired.
    pub fn repair(&self) -> Vec<&'static str> {
        let mut fixed = Vec::new();
        if self.0.repair_identity(FileKind::Retired) {
            fixed.push("its magic, version and kind");
        }
        let epoch = &self.0.header().epoch;
        let e = epoch.load(Ordering::Relaxed);
        if e % 2 == 1 {
            epoch.store(e.wrapping_add(1), Ordering::Release);
            fixed.push("an odd fold epoch");
        }
        fixed
    }
}

/// An open fold window; closing it (on drop) makes the retired epoch even.
#[derive(Debug)]
pub struct FoldWindow<'a> {
    retired: &'a DataFile,
    begin: u64,
}

impl FoldWindow<'_> {
    /// Folds the counters of the exited worker `dead` into the retired totals
    /// and marks its file folded (a second fold adds nothing). `cpu_ns` (from
    /// the reaped child's rusage) is added to its slot's CPU series.
    ///
    /// # Errors
    /// Resolving the CPU series failed.
    pub fn fold(
        &self,
        index: &Index,
        mirror: &mut Mirror,
        dead: &WorkerFile,
        cpu_ns: u64,
    ) -> io::Result<()> {
        let dh = dead.file.header();
        if dh.folded.load(Ordering::Acquire) != 0 {
            return Ok(());
        }
        for id in 0..index.used() {
            let kind = index
                .app_family_of(id)
                .and_then(|f| index.app_slot(f))
                .and_then(|s| AppKind::from_code(s.kind.load(Ordering::Acquire)));
            let (src, dst) = (dead.file.row(id), self.retired.row(id));
            let ints = match kind {
                // A dead worker's gauges vanish with it.
                Some(AppKind::Gauge) => continue,
                // The sum of an app histogram is an `f64`; the master is the
                // retired file's only writer.
                Some(AppKind::Histogram) => {
                    let v = f64::from_bits(src[CELLS - 1].load(Ordering::Relaxed));
                    if v != 0.0 {
                        let d = &dst[CELLS - 1];
                        let total = f64::from_bits(d.load(Ordering::Relaxed)) + v;
                        d.store(total.to_bits(), Ordering::Relaxed);
                    }
                    CELLS - 1
                }
                _ => CELLS,
            };
            for (s, d) in src[..ints].iter().zip(&dst[..ints]) {
                let v = s.load(Ordering::Relaxed);
                if v != 0 {
                    d.fetch_add(v, Ordering::Relaxed);
                }
            }
        }
        let rh = self.retired.header();
        for (s, d) in dh.dropped.iter().zip(&rh.dropped) {
            d.fetch_add(s.load(Ordering::Relaxed), Ordering::Relaxed);
        }
        if cpu_ns > 0 {
            let slot = dead.slot.to_string();
            let key = Key::new(Family::WorkerCpuRetired, &[&slot]);
            let id = mirror.resolve(index, &key)?.id();
            self.retired.row(id)[0].fetch_add(cpu_ns, Ordering::Relaxed);
        }
        dh.folded.store(1, Ordering::Release);
        Ok(())
    }
}

impl Drop for FoldWindow<'_> {
    fn drop(&mut self) {
        self.retired
            .header()
            .epoch
            .store(self.begin.wrapping_add(2), Ordering::Release);
    }
}

/// A worker's data file as the master (which creates and folds it) and the
/// sibling workers (which balance on it) see it.
#[derive(Debug)]
pub struct WorkerFile {
    file: DataFile,
    path: PathBuf,
    slot: u32,
}

impl WorkerFile {
    /// Creates the file of the worker in `slot`, generation `generation`.
    ///
    /// # Errors
    /// Creating or mapping the file failed.
    pub fn create(
        store: &StoreDir,
        slot: u32,
        generation: u64,
        kind: WorkerKind,
    ) -> io::Result<WorkerFile> {
        let path = store.worker_path(slot, generation);
        let file = DataFile::create(
            &path,
            store.capacity()?,
            FileIdentity {
                kind: FileKind::Worker,
                slot,
                generation,
                worker_kind: Some(kind),
            },
        )?;
        Ok(WorkerFile { file, path, slot })
    }

    /// Keeps this reaped (folded) worker's file as the store's spare, in
    /// place of any earlier one, for a worker that finds no room for a new
    /// file. A file another program replaced is left alone.
    pub fn keep_as_spare(self, store: &StoreDir) {
        if self.file.map.intact(&self.path) {
            let _ = std::fs::rename(&self.path, store.spare_path());
        } else {
            self.remove();
        }
    }

    /// Takes the store's spare file (see [`WorkerFile::keep_as_spare`]) for
    /// the worker in `slot`, generation `generation`: every cell zeroed.
    ///
    /// # Errors
    /// There is no spare, or it cannot be renamed.
    pub fn from_spare(
        store: &StoreDir,
        slot: u32,
        generation: u64,
        kind: WorkerKind,
    ) -> io::Result<WorkerFile> {
        let spare = store.spare_path();
        let file = store.open_data(&spare)?;
        let path = store.worker_path(slot, generation);
        file.reuse(
            &spare,
            &path,
            FileIdentity {
                kind: FileKind::Worker,
                slot,
                generation,
                worker_kind: Some(kind),
            },
        )?;
        Ok(WorkerFile { file, path, slot })
    }

    /// Opens the existing file of the worker in `slot`, generation `generation`.
    ///
    /// # Errors
    /// Missing, or not a data file of this version.
    pub fn open(store: &StoreDir, slot: u32, generation: u64) -> io::Result<WorkerFile> {
        let path = store.worker_path(slot, generation);
        let file = store.open_data(&path)?;
        Ok(WorkerFile { file, path, slot })
    }

    /// Records the worker's pid (the master does, right after fork).
    pub fn set_pid(&self, pid: u32) {
        self.file.header().pid.store(pid, Ordering::Relaxed);
    }

    /// Whether the worker has finished booting (left the booting state).
    pub fn booted(&self) -> bool {
        self.file.header().state.load(Ordering::Relaxed) != WorkerState::Booting.code()
    }

    /// The requests the worker names as in flight, oldest first, and how
    /// many it has in flight in all (some may have found no free entry).
    pub fn in_flight(&self) -> (Vec<InFlightRequest>, u64) {
        let all = self.file.header().in_flight.load(Ordering::Relaxed).max(0) as u64;
        (self.file.in_flight_requests(), all)
    }

    /// The worker's last sign of life, in monotonic nanoseconds.
    pub fn heartbeat_ns(&self) -> u64 {
        self.file.header().heartbeat_ns.load(Ordering::Relaxed)
    }

    /// Whether the worker serves (idle or busy, not folded).
    pub fn serving(&self) -> bool {
        let h = self.file.header();
        h.folded.load(Ordering::Relaxed) == 0
            && matches!(
                WorkerState::from_code(h.state.load(Ordering::Relaxed)),
                Some(WorkerState::Idle | WorkerState::Busy)
            )
    }

    /// Whether the file is still whole and still at its path (not cut short,
    /// deleted or replaced by another program).
    pub fn intact(&self) -> bool {
        self.file.map.intact(&self.path)
    }

    /// Connections the worker holds open.
    pub fn connections(&self) -> i64 {
        self.file.header().connections.load(Ordering::Relaxed)
    }

    /// Removes the file from the store directory (after it was folded, or
    /// when the worker never started).
    /// A file that is no longer the one this process mapped (another program
    /// replaced it) is left alone.
    pub fn remove(self) {
        if self.file.map.is_at(&self.path) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Sets the worker state (tests stand in for a worker's recorder).
    #[cfg(test)]
    pub(crate) fn set_state(&self, state: WorkerState) {
        self.file.set_state(state);
    }

    /// Sets the heartbeat (tests stand in for a worker's recorder).
    #[cfg(test)]
    pub(crate) fn set_heartbeat_ns(&self, mono_ns: u64) {
        self.file
            .header()
            .heartbeat_ns
            .store(mono_ns, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Snapshot;

    #[test]
    fn master_counts_show_in_the_snapshot_and_a_second_master_sees_the_pid() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path().join("m"));
        store.prepare().unwrap();
        Index::create(&store.index_path(), 64, 10, &[1.0]).unwrap();
        let m = MasterFile::create(&store).unwrap();
        m.count_signal(MasterSignal::Hup);
        m.count_signal(MasterSignal::Hup);
        m.count_exit(ExitReason::Crash);
        m.count_reload();
        m.publish_workers(3, 4, true);
        let view = Snapshot::read(&store).unwrap().master.unwrap();
        assert!(view.ready);
        assert_eq!(view.pid, std::process::id());
        assert_eq!(view.signals[MasterSignal::Hup.code() as usize], 2);
        assert_eq!(view.exits[ExitReason::Crash.code() as usize], 1);
        assert_eq!(
            (view.reloads, view.workers, view.workers_desired),
            (1, 3, 4)
        );
        assert_eq!(MasterFile::open(&store).unwrap().pid(), std::process::id());
        // A retired file under the master's name is refused.
        std::fs::remove_file(store.master_path()).unwrap();
        DataFile::create(&store.master_path(), 64, identity(FileKind::Retired)).unwrap();
        assert!(MasterFile::open(&store).is_err());
    }

    #[test]
    fn a_sibling_sees_state_and_connections() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path().join("w")).with_capacity(64);
        store.prepare().unwrap();
        let w = WorkerFile::create(&store, 2, 5, WorkerKind::Thread).unwrap();
        let sibling = WorkerFile::open(&store, 2, 5).unwrap();
        assert!(!sibling.booted() && !sibling.serving());
        w.set_state(WorkerState::Idle);
        w.file.header().connections.store(3, Ordering::Relaxed);
        assert!(sibling.booted() && sibling.serving());
        assert_eq!(sibling.connections(), 3);
        w.set_heartbeat_ns(42);
        assert_eq!(sibling.heartbeat_ns(), 42);
        w.remove();
        assert!(WorkerFile::open(&store, 2, 5).is_err());
    }

    #[test]
    fn a_spare_file_comes_back_zeroed_under_a_new_name() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path().join("w")).with_capacity(64);
        store.prepare().unwrap();
        let w = WorkerFile::create(&store, 0, 1, WorkerKind::Thread).unwrap();
        w.set_state(WorkerState::Idle);
        w.file.header().folded.store(1, Ordering::Relaxed);
        w.file.row(3)[0].store(9, Ordering::Relaxed);
        w.keep_as_spare(&store);
        assert!(store.spare_path().exists() && store.worker_files().unwrap().is_empty());
        let n = WorkerFile::from_spare(&store, 1, 2, WorkerKind::Thread).unwrap();
        assert!(!store.spare_path().exists());
        assert!(!n.booted());
        assert_eq!(n.file.row(3)[0].load(Ordering::Relaxed), 0);
        assert_eq!(n.file.header().folded.load(Ordering::Relaxed), 0);
        assert_eq!(
            store.worker_files().unwrap(),
            vec![(1, 2, store.worker_path(1, 2))]
        );
        assert!(WorkerFile::from_spare(&store, 1, 3, WorkerKind::Thread).is_err());
    }
}
