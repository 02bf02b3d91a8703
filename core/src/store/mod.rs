//! The shared-memory metric store: one directory per server holding the series
//! index, one data file per worker process (slot + generation), one for the
//! master and one for the totals of workers that have exited.
//!
//! Workers write through a [`Recorder`]; the master and the balancer use the
//! typed views ([`MasterFile`], [`RetiredFile`], [`WorkerFile`]); the exporter
//! reads a consistent [`Snapshot`]. Layout details (private to the store) live
//! in `layout`, the catalogue of families in `catalogue`.

mod app;
pub mod catalogue;
mod exemplar;
mod in_flight;
pub mod index;
pub mod layout;
mod mapped;
mod merge;
mod mirror;
mod recorder;
mod snapshot;
mod views;

#[cfg(test)]
mod fuzz;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

pub use app::{AppCounter, AppFamily, AppGauge, AppHistogram, AppStore, FamilySpec, Refusal};
pub use catalogue::{
    AppKind, ExitReason, Family, GaugeMode, MasterSignal, RejectReason, WorkerKind, WorkerState,
};
pub use exemplar::{trace_id_of, ExemplarView};
pub use in_flight::InFlightRequest;
pub use index::Index;
pub use recorder::{ErrorKind, Recorder, RequestRecord, Tracked};
pub use snapshot::{
    AppFamilyView, AppSeries, AppSnapshot, AppValue, GaugeSample, MasterView, Series, Snapshot,
    SnapshotReader, WorkerView,
};
pub use views::{MasterFile, RetiredFile, WorkerFile};

use layout::{data_capacity, data_file_bytes, index_capacity, FileKind, Header, Mapped, Row};
use layout::{INDEX_MAGIC, MAGIC, VERSION};

/// Current wall-clock time in Unix nanoseconds.
pub fn unix_now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Current monotonic time in nanoseconds (same clock in every process).
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => (ts.tv_sec() as u64)
            .saturating_mul(1_000_000_000)
            .saturating_add(ts.tv_nsec() as u64),
        Err(_) => 0,
    }
}

/// The store's directory, the names of the files in it, and how many series
/// they have room for.
#[derive(Debug, Clone)]
pub struct StoreDir {
    path: PathBuf,
    /// Series every file has room for; `None` for a reader that learns it
    /// from the index (the sidecar exporter).
    capacity: Option<usize>,
}

const WORKER_PREFIX: &str = "worker-";

impl StoreDir {
    /// A store directory at `path` (not touched until used), of the
    /// capacity its index was made with.
    pub fn new(path: impl Into<PathBuf>) -> StoreDir {
        StoreDir {
            path: path.into(),
            capacity: None,
        }
    }

    /// The same directory, whose files are made with room for `capacity`
    /// series (the master's, from `metrics_store_series`).
    pub fn with_capacity(self, capacity: usize) -> StoreDir {
        StoreDir {
            capacity: Some(capacity),
            ..self
        }
    }

    /// Series every file of this store has room for: as set, or else as
    /// the index on disk says by its size.
    ///
    /// # Errors
    /// No capacity was set and the index is missing or not an index.
    pub fn capacity(&self) -> io::Result<usize> {
        if let Some(c) = self.capacity {
            return Ok(c);
        }
        let path = self.index_path();
        let len = fs::metadata(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?
            .len();
        index_capacity(len).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is {len} bytes: not a gpe index", path.display()),
            )
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of the series index.
    pub fn index_path(&self) -> PathBuf {
        self.path.join("index")
    }

    /// Path of the master's data file.
    pub fn master_path(&self) -> PathBuf {
        self.path.join("master")
    }

    /// Path of the retired totals.
    pub fn retired_path(&self) -> PathBuf {
        self.path.join("retired")
    }

    /// Path of the spare worker file: the last reaped worker's, kept for the
    /// next worker when the filesystem has no room for a new file.
    pub fn spare_path(&self) -> PathBuf {
        self.path.join("worker-spare")
    }

    /// Path of the data file of the worker in `slot`, generation `generation`.
    pub fn worker_path(&self, slot: u32, generation: u64) -> PathBuf {
        self.path
            .join(format!("{WORKER_PREFIX}{slot}-{generation}"))
    }

    /// Worker files present now, as (slot, generation, path), in name order.
    ///
    /// # Errors
    /// Reading the directory failed.
    pub fn worker_files(&self) -> io::Result<Vec<(u32, u64, PathBuf)>> {
        Ok(self
            .worker_entries()?
            .into_iter()
            .map(|(slot, generation, path, _)| (slot, generation, path))
            .collect())
    }

    /// As [`StoreDir::worker_files`], with the inode each name has in the
    /// directory listing (no call to `stat`).
    fn worker_entries(&self) -> io::Result<Vec<(u32, u64, PathBuf, u64)>> {
        use std::os::unix::fs::DirEntryExt;
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.path)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(rest) = name.strip_prefix(WORKER_PREFIX) else {
                continue;
            };
            let Some((slot, generation)) = rest.split_once('-') else {
                continue;
            };
            if let (Ok(slot), Ok(generation)) = (slot.parse(), generation.parse()) {
                out.push((slot, generation, entry.path(), entry.ino()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Prepares the directory for a new server: creates it if needed and removes
    /// store files left by an earlier run. Returns whether it was created.
    ///
    /// # Errors
    /// The directory cannot be created or cleaned, or it holds anything that
    /// is not a gpe store file (then nothing is removed; the error names it).
    pub fn prepare(&self) -> io::Result<bool> {
        let created = match fs::create_dir(&self.path) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => false,
            Err(e) => return Err(e),
        };
        if !created {
            for p in self.proven_files()? {
                fs::remove_file(p)?;
            }
        }
        Ok(created)
    }

    /// Every entry of the directory, each proven by its header to be a gpe
    /// store file.
    ///
    /// # Errors
    /// The directory cannot be read, or an entry is not a gpe store file
    /// (`InvalidData`, naming it).
    pub fn proven_files(&self) -> io::Result<Vec<PathBuf>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.path)? {
            let path = entry?.path();
            if prove(&path).is_none() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "{} is not a gpe store file (gpe removes only files whose header it wrote); \
                         move it away or choose another directory",
                        path.display()
                    ),
                ));
            }
            out.push(path);
        }
        Ok(out)
    }

    /// Removes every store file, and the directory itself when `remove_dir`.
    pub fn cleanup(&self, remove_dir: bool) {
        if let Ok(files) = self.worker_files() {
            for (_, _, p) in files {
                let _ = fs::remove_file(p);
            }
        }
        for p in [
            self.index_path(),
            self.master_path(),
            self.retired_path(),
            self.spare_path(),
        ] {
            let _ = fs::remove_file(p);
        }
        if remove_dir {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

/// What the header of a store file proves about it, read without mapping it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Proof {
    /// The writer's pid (data files; 0 for the index).
    pub pid: u32,
    /// Wall-clock start time of the writer, Unix nanoseconds (data files).
    pub start_time_ns: u64,
    /// The file kind code (data files; 0 for the index).
    pub kind: u32,
}

/// Reads the header of the regular file at `path`: `Some` when it starts
/// with the magic of a data file or of the index, and has the size of one.
pub fn prove(path: &Path) -> Option<Proof> {
    use std::io::Read;
    let meta = fs::symlink_metadata(path).ok()?;
    let len = meta.len();
    if !meta.file_type().is_file() {
        return None;
    }
    let mut head = [0u8; 72];
    fs::File::open(path).ok()?.read_exact(&mut head).ok()?;
    let u64_at = |o: usize| u64::from_ne_bytes(head[o..o + 8].try_into().unwrap_or([0; 8]));
    let u32_at = |o: usize| u32::from_ne_bytes(head[o..o + 4].try_into().unwrap_or([0; 4]));
    let magic = u64_at(0);
    let sized = match magic {
        MAGIC => data_capacity(len).is_some(),
        INDEX_MAGIC => index_capacity(len).is_some(),
        _ => false,
    };
    if !sized {
        return None;
    }
    if magic == INDEX_MAGIC {
        return Some(Proof {
            pid: 0,
            start_time_ns: 0,
            kind: 0,
        });
    }
    Some(Proof {
        pid: u32_at(std::mem::offset_of!(Header, pid)),
        start_time_ns: u64_at(std::mem::offset_of!(Header, start_time_ns)),
        kind: u32_at(std::mem::offset_of!(Header, kind)),
    })
}

/// One mapped data file (master, retired or worker).
#[derive(Debug)]
struct DataFile {
    map: Mapped,
}

/// Identity written into a new data file's header.
#[derive(Debug, Clone, Copy)]
struct FileIdentity {
    /// What the file holds.
    pub kind: FileKind,
    /// Worker slot (0 for master and retired).
    pub slot: u32,
    /// Generation (0 for master and retired).
    pub generation: u64,
    /// Worker type, if a worker.
    pub worker_kind: Option<WorkerKind>,
}

impl DataFile {
    /// Creates a data file at `path` with room for `capacity` series, fully
    /// initialised before it appears under that name (it is written under a
    /// temporary name, then renamed).
    ///
    /// # Errors
    /// Creating, mapping or renaming failed.
    pub fn create(path: &Path, capacity: usize, id: FileIdentity) -> io::Result<DataFile> {
        let tmp = path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let file = DataFile {
            map: Mapped::create(&tmp, data_file_bytes(capacity))?,
        };
        file.init(id);
        fs::rename(&tmp, path)?;
        Ok(file)
    }

    /// Makes this (folded, unlisted) file a new one: every cell zero, the
    /// identity `id`, then renames it from `from` to `to`.
    ///
    /// # Errors
    /// Renaming failed.
    fn reuse(&self, from: &Path, to: &Path, id: FileIdentity) -> io::Result<()> {
        self.map.zero();
        self.init(id);
        fs::rename(from, to)
    }

    /// Writes the header of a new file (the magic last).
    fn init(&self, id: FileIdentity) {
        let map = &self.map;
        let h = map.header();
        h.version.store(VERSION, Ordering::Relaxed);
        h.kind.store(id.kind as u32, Ordering::Relaxed);
        h.slot.store(id.slot, Ordering::Relaxed);
        h.generation.store(id.generation, Ordering::Relaxed);
        h.worker_kind.store(
            id.worker_kind.map_or(0, WorkerKind::code),
            Ordering::Relaxed,
        );
        h.state
            .store(WorkerState::Booting.code(), Ordering::Relaxed);
        let mono = monotonic_ns();
        let unix = unix_now_ns();
        h.clock_offset_ns
            .store(unix as i64 - mono as i64, Ordering::Relaxed);
        h.state_since_ns.store(mono, Ordering::Relaxed);
        h.start_time_ns.store(unix, Ordering::Relaxed);
        h.heartbeat_ns.store(mono, Ordering::Relaxed);
        h.magic.store(MAGIC, Ordering::Release);
    }

    /// Opens an existing data file of a store of `capacity` series.
    ///
    /// # Safety
    /// The file must be a gpe data file (see [`Mapped::open`]); callers go
    /// through `StoreDir::open_data`, the one place that argues it.
    ///
    /// # Errors
    /// Missing, wrong size, or not initialised.
    pub unsafe fn open(path: &Path, capacity: usize) -> io::Result<DataFile> {
        // SAFETY: forwarded to the caller.
        let map = unsafe { Mapped::open(path, data_file_bytes(capacity))? };
        let h = map.header();
        if h.magic.load(Ordering::Acquire) != MAGIC || h.version.load(Ordering::Relaxed) != VERSION
        {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a gpe data file of this version", path.display()),
            ));
        }
        Ok(DataFile { map })
    }

    /// The header.
    pub fn header(&self) -> &Header {
        self.map.header()
    }

    /// Writes a copy of this file (as this process maps it) at `path`, which
    /// must be free (the file was deleted), and switches to the copy.
    ///
    /// # Errors
    /// Creating, reserving or renaming the copy failed.
    fn recreate(&mut self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let _ = fs::remove_file(&tmp);
        let copy = Mapped::create(&tmp, self.map.len())?;
        copy.copy_from(&self.map);
        if let Err(e) = fs::rename(&tmp, path) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        self.map = copy;
        Ok(())
    }

    /// Puts back the magic, version and kind of a file this process created,
    /// if a foreign write changed them. Returns whether it had to.
    fn repair_identity(&self, kind: FileKind) -> bool {
        let h = self.header();
        let whole = h.magic.load(Ordering::Relaxed) == MAGIC
            && h.version.load(Ordering::Relaxed) == VERSION
            && h.kind.load(Ordering::Relaxed) == kind as u32;
        if !whole {
            h.version.store(VERSION, Ordering::Relaxed);
            h.kind.store(kind as u32, Ordering::Relaxed);
            h.magic.store(MAGIC, Ordering::Release);
        }
        !whole
    }

    /// The value row of series `id`.
    pub fn row(&self, id: u32) -> &Row {
        self.map.row(id)
    }

    /// Series the file has room for.
    fn rows(&self) -> usize {
        self.map.rows()
    }

    /// The value rows of series `0..n`.
    pub fn rows_upto(&self, n: u32) -> &[Row] {
        self.map.rows_upto(n)
    }

    /// Whether the header still carries the magic and version (a foreign
    /// write may change them after the file was opened).
    fn whole(&self) -> bool {
        let h = self.header();
        h.magic.load(Ordering::Acquire) == MAGIC && h.version.load(Ordering::Relaxed) == VERSION
    }

    /// The inode of the mapped file.
    fn ino(&self) -> io::Result<u64> {
        use std::os::unix::fs::MetadataExt;
        self.map.file_metadata().map(|m| m.ino())
    }

    /// Sets the worker state and its since-time (monotonic nanoseconds).
    pub fn set_state_at(&self, state: WorkerState, mono_ns: u64) {
        let h = self.header();
        h.state.store(state.code(), Ordering::Relaxed);
        h.state_since_ns.store(mono_ns, Ordering::Relaxed);
    }

    /// Sets the worker state, since now.
    pub fn set_state(&self, state: WorkerState) {
        self.set_state_at(state, monotonic_ns());
    }

    /// Records a sign of life now.
    pub fn beat(&self) {
        self.header()
            .heartbeat_ns
            .store(monotonic_ns(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_foreign_file_stops_prepare_and_is_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path().join("m"));
        assert!(store.prepare().unwrap());
        let index = Index::create(&store.index_path(), 1024, 10, &[1.0]).unwrap();
        drop(index);
        MasterFile::create(&store).unwrap();
        std::fs::write(store.path().join("worker-0-1"), b"mine").unwrap();
        let err = store.prepare().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("worker-0-1"), "{err}");
        assert_eq!(
            std::fs::read(store.path().join("worker-0-1")).unwrap(),
            b"mine"
        );
        assert!(store.index_path().exists() && store.master_path().exists());
        // A file of the right size without the magic is not proven either.
        std::fs::remove_file(store.path().join("worker-0-1")).unwrap();
        let p = store.path().join("index2");
        std::fs::write(&p, vec![0u8; data_file_bytes(1024)]).unwrap();
        assert!(store.prepare().is_err());
        std::fs::remove_file(&p).unwrap();
        let proof = prove(&store.master_path()).unwrap();
        assert_eq!(proof.pid, std::process::id());
        assert_eq!(proof.kind, FileKind::Master as u32);
        assert!(!store.prepare().unwrap());
        assert_eq!(std::fs::read_dir(store.path()).unwrap().count(), 0);
    }

    #[test]
    fn a_store_is_sized_by_its_capacity() {
        let dir = tempfile::tempdir().unwrap();
        let master = StoreDir::new(dir.path().join("m")).with_capacity(64);
        assert!(master.prepare().unwrap());
        let index = Index::create(&master.index_path(), 64, 10, &[1.0]).unwrap();
        let w = WorkerFile::create(&master, 0, 1, WorkerKind::Sync).unwrap();
        let len = |p: PathBuf| fs::metadata(p).unwrap().len();
        assert_eq!(
            len(master.index_path()),
            (layout::ENTRIES_OFFSET + 64 * 128) as u64
        );
        assert_eq!(
            len(master.worker_path(0, 1)),
            (layout::ROWS_OFFSET + 64 * 128) as u64
        );
        // A reader without a capacity learns it from the index.
        let reader = StoreDir::new(master.path());
        assert_eq!(reader.capacity().unwrap(), 64);
        let seen = reader.open_data(&master.worker_path(0, 1)).unwrap();
        w.set_state(WorkerState::Idle);
        assert_eq!(
            seen.header().state.load(Ordering::Relaxed),
            WorkerState::Idle.code()
        );
        // A file sized for another capacity is not of this store.
        let other = StoreDir::new(dir.path().join("o")).with_capacity(128);
        other.prepare().unwrap();
        WorkerFile::create(&other, 0, 1, WorkerKind::Sync).unwrap();
        fs::rename(other.worker_path(0, 1), master.worker_path(0, 2)).unwrap();
        assert!(WorkerFile::open(&master, 0, 2).is_err());
        // Both kinds are proven by magic and size; the index is not a data file.
        assert_eq!(prove(&master.index_path()).map(|p| p.kind), Some(0));
        assert_eq!(
            prove(&master.worker_path(0, 1)).map(|p| p.kind),
            Some(FileKind::Worker as u32)
        );
        assert!(reader.open_data(&master.index_path()).is_err());
        // Every entry of the index can be given out, and then it is full.
        let mut m = index::Mirror::default();
        for slot in 0..64 {
            let key = index::Key::new(Family::WorkerRequests, &[&slot.to_string()]);
            m.resolve(&index, &key).unwrap();
        }
        assert_eq!(index.used(), 64);
        let key = index::Key::new(Family::WorkerRequests, &["64"]);
        assert!(m.resolve(&index, &key).is_err());
        assert!(Index::create(&dir.path().join("i2"), 63, 10, &[1.0]).is_err());
    }

    #[test]
    fn fold_moves_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path().join("m"));
        assert!(store.prepare().unwrap());
        let index = Index::create(&store.index_path(), 1024, 100, &[1.0]).unwrap();
        let retired = RetiredFile::create(&store).unwrap();
        let w = WorkerFile::create(&store, 1, 7, WorkerKind::Sync).unwrap();
        let raw = store.open_data(&store.worker_path(1, 7)).unwrap();
        let mut m = index::Mirror::default();
        let id = m
            .resolve(&index, &index::Key::new(Family::WorkerRequests, &["1"]))
            .unwrap()
            .id();
        raw.row(id)[0].fetch_add(5, Ordering::Relaxed);
        // The slot's duration histogram is folded whole: buckets and sum.
        let dur = m
            .resolve(&index, &index::Key::new(Family::WorkerDuration, &["1"]))
            .unwrap()
            .id();
        raw.row(dur)[0].fetch_add(3, Ordering::Relaxed);
        raw.row(dur)[1].fetch_add(2, Ordering::Relaxed);
        raw.row(dur)[layout::CELLS - 1].fetch_add(4_500_000_000, Ordering::Relaxed);
        let reread = store.open_data(&store.retired_path()).unwrap();
        {
            let window = retired.fold_window();
            assert_eq!(reread.header().epoch.load(Ordering::Relaxed), 1);
            window.fold(&index, &mut m, &w, 2_000_000_000).unwrap();
            window.fold(&index, &mut m, &w, 2_000_000_000).unwrap();
        }
        assert_eq!(reread.row(id)[0].load(Ordering::Relaxed), 5);
        assert_eq!(reread.header().epoch.load(Ordering::Relaxed), 2);
        let snap = Snapshot::read(&store).unwrap();
        let reqs: u64 = snap
            .series
            .iter()
            .filter(|s| s.family == Family::WorkerRequests)
            .map(|s| s.cells[0])
            .sum();
        assert_eq!(reqs, 5, "a folded file is not counted twice");
        let d = snap
            .series
            .iter()
            .find(|s| s.family == Family::WorkerDuration)
            .unwrap();
        assert_eq!(d.labels, ["1"]);
        assert_eq!(
            (d.cells[0], d.cells[1], d.cells[layout::CELLS - 1]),
            (3, 2, 4_500_000_000)
        );
        let cpu = snap
            .series
            .iter()
            .find(|s| s.family == Family::WorkerCpuRetired)
            .unwrap();
        assert_eq!(cpu.cells[0], 2_000_000_000);
        assert_eq!(
            store.worker_files().unwrap(),
            vec![(1, 7, store.worker_path(1, 7))]
        );
    }
}
