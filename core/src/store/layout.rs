//! The fixed byte layout of the store's files and the mapped views over them.
//!
//! Every file is created at its full, fixed size, with every byte backed by
//! the filesystem (`posix_fallocate`) before anyone maps it, and never grows.
//! All shared fields are atomics, so any process may read while another
//! writes. This module holds the store's only `unsafe` code: mapping a file,
//! viewing the mapping as the `repr(C)` structs below, and the SIGBUS guard
//! that turns a page of a mapping whose file was cut short (by another
//! program) into private zeroes instead of killing the process.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use memmap2::MmapRaw;

/// Magic number at the start of every data file ("GPESTORE").
pub const MAGIC: u64 = 0x4750_4553_544f_5245;
/// Magic number at the start of the series index ("GPEINDEX").
pub const INDEX_MAGIC: u64 = 0x4750_4549_4e44_4558;
/// Layout version; bumped whenever a struct below changes.
pub const VERSION: u32 = 7;
/// Series a store holds unless `metrics_store_series` says otherwise: index
/// entries, and value rows in every data file.
pub const DEFAULT_CAPACITY: usize = 16_384;
/// Fewest series a store may be sized for.
pub const MIN_CAPACITY: usize = 64;
/// Most series a store may be sized for (128 MiB per file).
pub const MAX_CAPACITY: usize = 1 << 20;
/// `u64` cells per series row: up to 14 finite buckets, `+Inf`, and the sum.
pub const CELLS: usize = 16;
/// Largest number of finite histogram buckets a family may use.
pub const MAX_BUCKETS: usize = CELLS - 2;
/// Bytes of label data one index entry can hold.
pub const LABEL_BYTES: usize = 124;
/// Number of family counters in headers (more than the catalogue needs).
pub const MAX_FAMILIES: usize = 16;
/// Number of signal counters in the master header.
pub const MAX_SIGNALS: usize = 16;
/// Number of exit-reason counters in the master header.
pub const MAX_REASONS: usize = 8;

/// What a data file holds.
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// The master's own counters (signals, exits, reloads, worker counts).
    Master = 1,
    /// Counters folded in from workers that have exited.
    Retired = 2,
    /// One worker process (slot + generation).
    Worker = 3,
}

/// Header of a data file (master, retired or worker). Padded to 1 KiB.
#[repr(C)]
#[derive(Debug)]
pub(super) struct Header {
    /// [`MAGIC`] once the file is fully initialised.
    pub magic: AtomicU64,
    /// [`VERSION`].
    pub version: AtomicU32,
    /// [`FileKind`] as `u32`.
    pub kind: AtomicU32,
    /// Worker slot (workers only).
    pub slot: AtomicU32,
    /// Worker type code (see `WorkerKind` in the catalogue); 0 if none.
    pub worker_kind: AtomicU32,
    /// Generation of the process in its slot, increasing over the server's life.
    pub generation: AtomicU64,
    /// Process id of the writer (master or worker).
    pub pid: AtomicU32,
    /// Current worker state code (see `WorkerState`).
    pub state: AtomicU32,
    /// Set to 1 by the master once this file's counters were folded into the
    /// retired totals; readers must then skip it.
    pub folded: AtomicU32,
    /// Master only: 1 while it runs (not stopping) and every desired worker
    /// has booted, else 0; the exporter answers `/readyz` from it.
    pub ready: AtomicU32,
    /// Monotonic time (nanoseconds) of the last state change; add
    /// `clock_offset_ns` for Unix time.
    pub state_since_ns: AtomicU64,
    /// Monotonic time (nanoseconds) of the last sign of life.
    pub heartbeat_ns: AtomicU64,
    /// Wall-clock start time (Unix nanoseconds) of the writer process.
    pub start_time_ns: AtomicU64,
    /// Requests in progress in this process.
    pub in_flight: AtomicI64,
    /// Connections open in this process.
    pub connections: AtomicI64,
    /// Retired file only: sequence counter of the master's fold (odd while folding).
    pub epoch: AtomicU64,
    /// Requests this process has completed (drives `max_requests`).
    pub requests: AtomicU64,
    /// Master only: live workers.
    pub workers: AtomicU64,
    /// Master only: desired workers.
    pub workers_desired: AtomicU64,
    /// Master only: completed reloads.
    pub reloads: AtomicU64,
    /// Master only: handled signals, by signal code.
    pub signals: [AtomicU64; MAX_SIGNALS],
    /// Master only: worker exits, by reason code.
    pub exits: [AtomicU64; MAX_REASONS],
    /// Observations that fell into a family's `other` series, by family.
    pub dropped: [AtomicU64; MAX_FAMILIES],
    /// Unix time minus monotonic time, in nanoseconds, when the file was set
    /// up: converts monotonic stamps to wall-clock time at scrape time, so the
    /// hot path reads one clock only.
    pub clock_offset_ns: AtomicI64,
    /// 1 once an exemplar was written into this file's exemplar rows: the
    /// exporter skips the rows of a file without (46 KiB it need not read).
    pub exemplars: AtomicU32,
}

/// Bytes of the header of a data file.
pub const HEADER_BYTES: usize = 1024;
const _: () = assert!(std::mem::size_of::<Header>() <= HEADER_BYTES);

/// One series' cells: counter value in cell 0, or histogram buckets then sum.
pub(super) type Row = [AtomicU64; CELLS];

/// Byte offset of the in-flight table in a data file, right after the
/// header.
pub const IN_FLIGHT_OFFSET: usize = HEADER_BYTES;

/// Entries of the in-flight table: the requests a worker names when the
/// master aborts it.
pub const IN_FLIGHT_ENTRIES: usize = 32;
/// Bytes of a request's path one in-flight entry keeps.
pub const IN_FLIGHT_PATH: usize = 256;

/// One request in flight in a worker (see `store/in_flight.rs` for the
/// protocol). Kept in its own struct, between the header and the rows.
#[repr(C)]
#[derive(Debug)]
pub(super) struct InFlightEntry {
    /// Monotonic ns the request began; 0 when free, `u64::MAX` while its
    /// writer fills it in.
    pub start_ns: AtomicU64,
    /// The method label, up to 8 bytes, zero-padded, little-endian.
    pub method: AtomicU64,
    /// Bytes of `path` in use.
    pub path_len: AtomicU64,
    /// The path, 8 bytes per word, little-endian.
    pub path: [AtomicU64; IN_FLIGHT_PATH / 8],
}

/// The in-flight table of a data file (used in worker files only).
pub(super) type InFlightTable = [InFlightEntry; IN_FLIGHT_ENTRIES];

/// Exemplar rows per data file; a series uses row `id % EXEMPLAR_SLOTS`
/// (series that share a row take turns, each cell names its series).
pub const EXEMPLAR_SLOTS: usize = 64;
/// Exemplar cells per row: one per finite bucket and `+Inf`.
pub const EXEMPLAR_BUCKETS: usize = CELLS - 1;

/// One bucket's newest exemplar, under a sequence lock: `seq` is odd while
/// the writer changes the cell, and a reader keeps what it read only when
/// `seq` was even and unchanged around its reads.
#[repr(C)]
#[derive(Debug)]
pub(super) struct ExemplarCell {
    /// Sequence counter (odd while being written).
    pub seq: AtomicU64,
    /// Series id + 1 of the observation; 0 = empty.
    pub series: AtomicU64,
    /// High 64 bits of the W3C trace id.
    pub trace_hi: AtomicU64,
    /// Low 64 bits of the W3C trace id.
    pub trace_lo: AtomicU64,
    /// The observed value, as `f64` bits (seconds for durations).
    pub value: AtomicU64,
    /// Monotonic nanoseconds of the observation (newest wins across workers).
    pub at_ns: AtomicU64,
}

/// The exemplar cells of one exemplar row.
pub(super) type ExemplarRow = [ExemplarCell; EXEMPLAR_BUCKETS];

/// Byte offset of the exemplar rows in a data file, after the in-flight
/// table.
pub const EXEMPLARS_OFFSET: usize = IN_FLIGHT_OFFSET + std::mem::size_of::<InFlightTable>();

/// Byte offset of the value rows in a data file, after the exemplar rows;
/// every region before them has a fixed size, so only the rows depend on
/// the store's capacity.
pub const ROWS_OFFSET: usize =
    EXEMPLARS_OFFSET + EXEMPLAR_SLOTS * std::mem::size_of::<ExemplarRow>();
const _: () = assert!(EXEMPLARS_OFFSET % 8 == 0 && ROWS_OFFSET % 8 == 0);

/// Size of a data file with room for `capacity` series.
pub const fn data_file_bytes(capacity: usize) -> usize {
    ROWS_OFFSET + capacity * std::mem::size_of::<Row>()
}

/// The number of series a data file of `len` bytes has room for, if `len` is
/// the size of a data file.
pub fn data_capacity(len: u64) -> Option<usize> {
    capacity_of(len, ROWS_OFFSET, std::mem::size_of::<Row>())
}

fn capacity_of(len: u64, header: usize, stride: usize) -> Option<usize> {
    let body = usize::try_from(len).ok()?.checked_sub(header)?;
    let n = body / stride;
    (body % stride == 0 && (MIN_CAPACITY..=MAX_CAPACITY).contains(&n)).then_some(n)
}

/// Header of the series index shared by every process of one server.
#[repr(C)]
#[derive(Debug)]
pub(super) struct IndexHeader {
    /// [`MAGIC`] once initialised.
    pub magic: AtomicU64,
    /// [`VERSION`].
    pub version: AtomicU32,
    /// Entries published so far; entries below it never change again.
    pub used: AtomicU32,
    /// Series allowed per family before label sets collapse into `other`.
    pub family_cap: AtomicU32,
    /// Number of finite duration buckets in use.
    pub duration_buckets_len: AtomicU32,
    /// Duration bucket upper bounds, as `f64` bits.
    pub duration_buckets: [AtomicU64; MAX_BUCKETS],
    /// Entries per family (the `other` series not included).
    pub family_counts: [AtomicU32; MAX_FAMILIES],
    /// Entry id + 1 of each family's `other` series, 0 until it exists.
    pub other_ids: [AtomicU32; MAX_FAMILIES],
}

/// Byte offset of the entries in the index file.
pub const INDEX_HEADER_BYTES: usize = 512;
const _: () = assert!(std::mem::size_of::<IndexHeader>() <= INDEX_HEADER_BYTES);

/// One index entry: which family, and the label values in the family's order.
#[repr(C)]
#[derive(Debug)]
pub(super) struct Entry {
    /// Family code.
    pub family: u8,
    /// Number of label values.
    pub labels: u8,
    /// Bytes of `data` in use.
    pub len: u16,
    /// Label values, each as one length byte followed by its UTF-8 bytes.
    pub data: [u8; LABEL_BYTES],
}
const _: () = assert!(std::mem::size_of::<Entry>() == 128);

/// App families (registered through the `metrics` facade) the index can hold.
pub const MAX_APP_FAMILIES: usize = 64;
/// Family code of the first app family in index entries; app family `i` has
/// code `APP_CODE_BASE + i`.
pub const APP_CODE_BASE: u8 = 128;
/// Longest app metric name, in bytes.
pub const APP_NAME_BYTES: usize = 96;
/// Longest app help text kept, in bytes.
pub const APP_HELP_BYTES: usize = 256;
/// Longest app unit kept, in bytes.
pub const APP_UNIT_BYTES: usize = 16;
/// Counters of refused app registrations, by reason code.
pub const MAX_REJECT_REASONS: usize = 8;

/// One app family: what the first process that registered it wrote, under
/// the index lock. `kind` is stored last (release) and never changes again;
/// the help and unit may be filled in later, each published by its length.
#[repr(C)]
#[derive(Debug)]
pub(super) struct AppFamilySlot {
    /// 0 = free; else the `AppKind` code.
    pub kind: AtomicU32,
    /// Gauge merge mode code (gauges only).
    pub mode: AtomicU32,
    /// Series of this family (its `other` series not included).
    pub series: AtomicU32,
    /// Entry id + 1 of the family's `other` series, 0 until it exists.
    pub other_id: AtomicU32,
    /// Observations recorded into the `other` series (any process).
    pub dropped: AtomicU64,
    /// Finite histogram bounds in use.
    pub buckets_len: AtomicU32,
    /// Bytes of `name`.
    pub name_len: AtomicU32,
    /// Bytes of `help` (published after them).
    pub help_len: AtomicU32,
    /// Bytes of `unit` (published after them).
    pub unit_len: AtomicU32,
    /// Histogram bounds, as `f64` bits.
    pub buckets: [AtomicU64; MAX_BUCKETS],
    /// The metric name, UTF-8 in native-endian words.
    pub name: [AtomicU64; APP_NAME_BYTES / 8],
    /// The help text.
    pub help: [AtomicU64; APP_HELP_BYTES / 8],
    /// The unit (its Prometheus spelling, such as `seconds`).
    pub unit: [AtomicU64; APP_UNIT_BYTES / 8],
}

/// The app-family table at the end of the index file.
#[repr(C)]
#[derive(Debug)]
pub(super) struct AppTable {
    /// Families registered so far.
    pub used: AtomicU32,
    /// Padding.
    pub _pad: AtomicU32,
    /// Refused registrations, by reason code (any process).
    pub rejected: [AtomicU64; MAX_REJECT_REASONS],
    /// The families.
    pub families: [AppFamilySlot; MAX_APP_FAMILIES],
}

/// Byte offset of the app-family table in the index file, right after its
/// header.
pub const APP_TABLE_OFFSET: usize = INDEX_HEADER_BYTES;

/// Byte offset of the entries in the index file, after the app-family table.
pub const ENTRIES_OFFSET: usize = APP_TABLE_OFFSET + std::mem::size_of::<AppTable>();
const _: () = assert!(APP_TABLE_OFFSET % 8 == 0 && ENTRIES_OFFSET % 8 == 0);

/// Size of an index with room for `capacity` series.
pub const fn index_file_bytes(capacity: usize) -> usize {
    ENTRIES_OFFSET + capacity * std::mem::size_of::<Entry>()
}

/// The number of series an index of `len` bytes has room for, if `len` is
/// the size of an index.
pub fn index_capacity(len: u64) -> Option<usize> {
    capacity_of(len, ENTRIES_OFFSET, std::mem::size_of::<Entry>())
}

/// A store file mapped shared into this process.
#[derive(Debug)]
pub(super) struct Mapped {
    map: MmapRaw,
    /// The open file, to see whether it was cut short or replaced.
    file: File,
}

impl Drop for Mapped {
    fn drop(&mut self) {
        guard::unregister(self.map.as_ptr() as usize);
    }
}

impl Mapped {
    /// Creates `path` (which must not exist) at `len` zeroed bytes, all of them
    /// backed by the filesystem, and maps it. A filesystem without room fails
    /// here (the file is removed) instead of at a later write.
    ///
    /// # Errors
    /// Any error from creating, reserving or mapping the file.
    pub fn create(path: &Path, len: usize) -> io::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)?;
        if let Err(e) = nix::fcntl::posix_fallocate(file.as_fd(), 0, len as libc::off_t) {
            drop(file);
            let _ = std::fs::remove_file(path);
            return Err(io::Error::new(
                io::Error::from(e).kind(),
                format!("cannot reserve {len} bytes for {}: {e}", path.display()),
            ));
        }
        Self::map(file, len)
    }

    /// Whether the mapped file is still whole: its full size, and still the
    /// file at `path`.
    pub fn intact(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(mine), Ok(there)) = (self.file.metadata(), std::fs::metadata(path)) else {
            return false;
        };
        mine.len() >= self.map.len() as u64
            && mine.ino() == there.ino()
            && mine.dev() == there.dev()
    }

    /// The mapped file's metadata (`fstat`).
    pub fn file_metadata(&self) -> io::Result<std::fs::Metadata> {
        self.file.metadata()
    }

    /// Whether `path` still names the mapped file (whatever its size).
    pub fn is_at(&self, path: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        let (Ok(mine), Ok(there)) = (self.file.metadata(), std::fs::metadata(path)) else {
            return false;
        };
        mine.ino() == there.ino() && mine.dev() == there.dev()
    }

    /// Maps an existing store file of exactly `len` bytes.
    ///
    /// # Safety
    /// Every process that maps this file must access it only through this
    /// module's views (atomics and published, never-rewritten index entries).
    /// Files created by [`Mapped::create`] and written by gpe satisfy this.
    ///
    /// # Errors
    /// Not found, wrong size, or any mapping error.
    pub unsafe fn open(path: &Path, len: usize) -> io::Result<Self> {
        let named = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", path.display()));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(named)?;
        let actual = file.metadata().map_err(named)?.len();
        if actual != len as u64 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} is {actual} bytes, expected {len}: not a gpe store file of this version",
                    path.display()
                ),
            ));
        }
        Self::map(file, len).map_err(named)
    }

    fn map(file: File, len: usize) -> io::Result<Self> {
        let map = MmapRaw::map_raw(&file)?;
        if map.len() < len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "store file shorter than its layout",
            ));
        }
        guard::register(map.as_ptr() as usize, map.len());
        Ok(Self { map, file })
    }

    /// Copies every byte of `src` (a mapping of the same length) into this
    /// mapping, one 8-byte word at a time.
    pub fn copy_from(&self, src: &Mapped) {
        let words = self.map.len().min(src.map.len()) / 8;
        for i in 0..words {
            // SAFETY: `i * 8 + 8` is within both mappings (bounded above), both
            // are page-aligned so every word is 8-byte aligned, and the store's
            // bytes are only ever accessed as atomics or as published, never
            // rewritten entries, so an atomic view of any word is sound.
            unsafe {
                let from = &*(src.map.as_ptr().add(i * 8) as *const AtomicU64);
                let to = &*(self.map.as_ptr().add(i * 8) as *const AtomicU64);
                to.store(from.load(Ordering::Relaxed), Ordering::Relaxed);
            }
        }
    }

    /// Sets every byte of the mapping to zero.
    pub fn zero(&self) {
        for i in 0..self.map.len() / 8 {
            // SAFETY: as in `copy_from`: in bounds, aligned, atomics only.
            unsafe { &*(self.map.as_ptr().add(i * 8) as *const AtomicU64) }
                .store(0, Ordering::Relaxed);
        }
    }

    /// Bytes mapped.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Value rows of a data file: how many series it has room for.
    pub fn rows(&self) -> usize {
        self.map.len().saturating_sub(ROWS_OFFSET) / std::mem::size_of::<Row>()
    }

    /// Entries of an index file: how many series it has room for.
    pub fn entries(&self) -> usize {
        self.map.len().saturating_sub(ENTRIES_OFFSET) / std::mem::size_of::<Entry>()
    }

    /// The data-file header.
    ///
    /// The mapping must be a data file (at least [`HEADER_BYTES`] long).
    pub fn header(&self) -> &Header {
        assert!(self.map.len() >= HEADER_BYTES);
        // SAFETY: the mapping is page-aligned and at least HEADER_BYTES long (checked
        // above), `Header` is `repr(C)` of atomics only, for which every bit pattern
        // (including the zeroes of a new file) is valid, and all concurrent access from
        // other processes goes through the same atomics. The reference lives no longer
        // than `self`, which owns the mapping.
        unsafe { &*(self.map.as_ptr() as *const Header) }
    }

    /// The value row of series `id` in a data file.
    ///
    /// # Panics
    /// If `id` is not below [`Mapped::rows`]: callers bound every id they
    /// take from a file (see `Index::used`, `Index::other_id`), and every file
    /// of a store has as many rows as its index has entries.
    pub fn row(&self, id: u32) -> &Row {
        let id = id as usize;
        assert!(id < self.rows());
        // SAFETY: the row lies inside the mapping (bounds checked above), rows are
        // 8-byte aligned (ROWS_OFFSET and the row size are multiples of 8 and the
        // mapping is page-aligned), and a row is an array of atomics, valid for any bits.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(ROWS_OFFSET + id * std::mem::size_of::<Row>()) as *const Row)
        }
    }

    /// The value rows of series `0..n` in a data file, as one slice (the
    /// merge reads them in one pass instead of one bounds check per row).
    ///
    /// # Panics
    /// If `n` is above [`Mapped::rows`] (as [`Mapped::row`]).
    pub fn rows_upto(&self, n: u32) -> &[Row] {
        let n = n as usize;
        assert!(n <= self.rows());
        // SAFETY: the `n` rows lie inside the mapping (bounds checked above),
        // start 8-byte aligned (as in `row`) and follow each other without
        // padding (`Row` is an array of `u64` atomics); every bit pattern is
        // a valid row, and other processes touch them only through the same
        // atomics. The slice lives no longer than `self`, which owns the mapping.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(ROWS_OFFSET) as *const Row, n) }
    }

    /// The in-flight table of a data file.
    pub fn in_flight(&self) -> &InFlightTable {
        assert!(self.map.len() >= ROWS_OFFSET);
        // SAFETY: the table lies inside the mapping (checked above), at an
        // 8-byte aligned offset of a page-aligned mapping, and is `repr(C)`
        // atomics only, valid for any bits (zeroes: every entry free).
        unsafe { &*(self.map.as_ptr().add(IN_FLIGHT_OFFSET) as *const InFlightTable) }
    }

    /// Exemplar row `slot` of a data file.
    ///
    /// # Panics
    /// If `slot` is not below [`EXEMPLAR_SLOTS`].
    pub fn exemplars(&self, slot: usize) -> &ExemplarRow {
        assert!(slot < EXEMPLAR_SLOTS && self.map.len() >= ROWS_OFFSET);
        // SAFETY: the row lies inside the mapping (bounds checked above), at an
        // 8-byte aligned offset (EXEMPLARS_OFFSET and the row size are multiples
        // of 8, the mapping is page-aligned), and it is atomics only, valid for
        // any bits; other processes touch it only through the same atomics.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(EXEMPLARS_OFFSET + slot * std::mem::size_of::<ExemplarRow>())
                as *const ExemplarRow)
        }
    }

    /// The app-family table of an index file.
    pub fn app_table(&self) -> &AppTable {
        assert!(self.map.len() >= ENTRIES_OFFSET);
        // SAFETY: as for `index_header`: the table lies inside the mapping
        // (checked), 8-byte aligned (APP_TABLE_OFFSET is a multiple of 8 from a
        // page-aligned start), and atomics only.
        unsafe { &*(self.map.as_ptr().add(APP_TABLE_OFFSET) as *const AppTable) }
    }

    /// The index header. The mapping must be an index file.
    pub fn index_header(&self) -> &IndexHeader {
        assert!(self.map.len() >= INDEX_HEADER_BYTES);
        // SAFETY: as for `header`: aligned, in bounds, atomics only.
        unsafe { &*(self.map.as_ptr() as *const IndexHeader) }
    }

    /// Entry `id` of an index file. Only entries below the published `used`
    /// count may be read; they are never written again.
    pub fn entry(&self, id: u32) -> &Entry {
        let id = id as usize;
        assert!(id < self.entries());
        // SAFETY: in bounds (checked), `Entry` is plain bytes (valid for any bits) and
        // align 2 at a 128-byte stride from an 8-byte aligned offset. Callers read an entry
        // only after an acquire load of `used` covers it; its writer published it with
        // a release store after writing it and never writes it again.
        unsafe {
            &*(self
                .map
                .as_ptr()
                .add(ENTRIES_OFFSET + id * std::mem::size_of::<Entry>())
                as *const Entry)
        }
    }

    /// Writes entry `id` of an index file before it is published.
    ///
    /// # Safety
    /// The caller holds the index's exclusive lock and `id` equals the current
    /// `used` count, so no process reads or writes this entry concurrently.
    pub unsafe fn write_entry(&self, id: u32, entry: &Entry) {
        let id = id as usize;
        assert!(id < self.entries());
        // SAFETY: in bounds (checked); exclusive per the caller's contract.
        unsafe {
            let dst = self
                .map
                .as_mut_ptr()
                .add(ENTRIES_OFFSET + id * std::mem::size_of::<Entry>())
                as *mut Entry;
            std::ptr::write(
                dst,
                Entry {
                    family: entry.family,
                    labels: entry.labels,
                    len: entry.len,
                    data: entry.data,
                },
            );
        }
    }
}

/// The SIGBUS guard: a fault inside a store mapping (its file was truncated
/// under it, so the page has no backing) maps a private zero page over the
/// faulting page and lets the access run again. Faults anywhere else go to the
/// handler that was installed before, or the default one.
mod guard {
    use super::*;

    /// Mappings guarded at once; beyond it a mapping is simply unguarded.
    const SLOTS: usize = 1024;
    #[allow(clippy::declare_interior_mutable_const)]
    const FREE: (AtomicUsize, AtomicUsize) = (AtomicUsize::new(0), AtomicUsize::new(0));
    static RANGES: [(AtomicUsize, AtomicUsize); SLOTS] = [FREE; SLOTS];
    static PAGE: AtomicUsize = AtomicUsize::new(4096);
    /// Pages replaced so far in this process.
    pub(in crate::store) static FAULTS: AtomicU64 = AtomicU64::new(0);
    static PREVIOUS: std::sync::OnceLock<Previous> = std::sync::OnceLock::new();
    static INSTALL: std::sync::Once = std::sync::Once::new();

    struct Previous(libc::sigaction);
    // SAFETY: a plain C struct (a handler address, a mask, flags) written once
    // before the handler can run and only read after.
    unsafe impl Sync for Previous {}
    // SAFETY: as above.
    unsafe impl Send for Previous {}

    pub(super) fn register(start: usize, len: usize) {
        INSTALL.call_once(install);
        for (s, l) in &RANGES {
            if s.load(Ordering::Relaxed) == 0 {
                l.store(len, Ordering::Release);
                if s.compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
                {
                    return;
                }
            }
        }
    }

    pub(super) fn unregister(start: usize) {
        for (s, _) in &RANGES {
            if s.compare_exchange(start, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                return;
            }
        }
    }

    fn install() {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if page > 0 {
            PAGE.store(page as usize, Ordering::Relaxed);
        }
        // SAFETY: `sigaction` is plain data, valid zeroed; the handler below
        // only reads atomics and calls mmap and sigaction (plain system calls).
        unsafe {
            let mut new: libc::sigaction = std::mem::zeroed();
            new.sa_sigaction = on_sigbus as *const () as usize;
            new.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut new.sa_mask);
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, &new, &mut old) == 0 {
                let _ = PREVIOUS.set(Previous(old));
            }
        }
    }

    extern "C" fn on_sigbus(
        _sig: libc::c_int,
        info: *mut libc::siginfo_t,
        _ctx: *mut libc::c_void,
    ) {
        // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
        let addr = unsafe { (*info).si_addr() } as usize;
        let page = PAGE.load(Ordering::Relaxed);
        for (s, l) in &RANGES {
            let start = s.load(Ordering::Acquire);
            let len = l.load(Ordering::Acquire);
            if start != 0 && addr >= start && addr < start + len {
                let at = addr & !(page - 1);
                // SAFETY: `at..at + page` lies inside a store mapping this
                // process owns (registered above, page-aligned start and
                // length); replacing it with private zeroes changes only what
                // this process sees of a file that no longer backs it.
                let p = unsafe {
                    libc::mmap(
                        at as *mut libc::c_void,
                        page,
                        libc::PROT_READ | libc::PROT_WRITE,
                        libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                        -1,
                        0,
                    )
                };
                if p != libc::MAP_FAILED {
                    FAULTS.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
        }
        // Not ours: put the previous handler back; the access faults again
        // under it.
        // SAFETY: restores a sigaction read from the kernel (or the default).
        unsafe {
            match PREVIOUS.get() {
                Some(Previous(old)) => libc::sigaction(libc::SIGBUS, old, std::ptr::null_mut()),
                None => {
                    libc::signal(libc::SIGBUS, libc::SIG_DFL);
                    0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_file_is_fully_backed() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let _m = Mapped::create(&path, data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        let blocks = std::fs::metadata(&path).unwrap().blocks();
        assert!(
            blocks * 512 >= data_file_bytes(DEFAULT_CAPACITY) as u64,
            "{blocks} blocks"
        );
    }

    #[test]
    fn a_truncated_file_reads_as_zeroes_instead_of_sigbus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let m = Mapped::create(&path, data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        m.header().requests.store(9, Ordering::Relaxed);
        m.row(100)[3].store(5, Ordering::Relaxed);
        assert!(m.intact(&path));
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        assert!(!m.intact(&path));
        let before = guard::FAULTS.load(Ordering::Relaxed);
        assert_eq!(m.header().requests.load(Ordering::Relaxed), 0);
        assert_eq!(m.row(100)[3].load(Ordering::Relaxed), 0);
        m.row(100)[3].store(1, Ordering::Relaxed);
        assert_eq!(m.row(100)[3].load(Ordering::Relaxed), 1);
        assert_eq!(guard::FAULTS.load(Ordering::Relaxed) - before, 2);
    }

    #[test]
    fn a_copy_holds_every_byte() {
        let dir = tempfile::tempdir().unwrap();
        let a = Mapped::create(&dir.path().join("a"), data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        let b = Mapped::create(&dir.path().join("b"), data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        a.header().epoch.store(4, Ordering::Relaxed);
        a.row(DEFAULT_CAPACITY as u32 - 1)[CELLS - 1].store(11, Ordering::Relaxed);
        b.copy_from(&a);
        assert_eq!(b.header().epoch.load(Ordering::Relaxed), 4);
        assert_eq!(
            b.row(DEFAULT_CAPACITY as u32 - 1)[CELLS - 1].load(Ordering::Relaxed),
            11
        );
    }

    #[test]
    fn a_file_that_cannot_be_backed_is_refused_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let err = Mapped::create(&path, usize::MAX / 4).unwrap_err();
        assert!(err.to_string().contains("cannot reserve"), "{err}");
        assert!(!path.exists());
    }

    #[test]
    fn created_file_has_fixed_size_and_shared_atomics() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w");
        let a = Mapped::create(&path, data_file_bytes(DEFAULT_CAPACITY)).unwrap();
        // SAFETY: the file was just created by this module.
        let b = unsafe { Mapped::open(&path, data_file_bytes(DEFAULT_CAPACITY)) }.unwrap();
        a.header().requests.fetch_add(3, Ordering::Relaxed);
        a.row(DEFAULT_CAPACITY as u32 - 1)[CELLS - 1].fetch_add(7, Ordering::Relaxed);
        assert_eq!(b.header().requests.load(Ordering::Relaxed), 3);
        assert_eq!(
            b.row(DEFAULT_CAPACITY as u32 - 1)[CELLS - 1].load(Ordering::Relaxed),
            7
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            data_file_bytes(DEFAULT_CAPACITY) as u64
        );
        // The slice of every row is the rows one by one.
        let all = b.rows_upto(DEFAULT_CAPACITY as u32);
        assert_eq!(all.len(), DEFAULT_CAPACITY);
        assert!(std::ptr::eq(
            &all[DEFAULT_CAPACITY - 1],
            b.row(DEFAULT_CAPACITY as u32 - 1)
        ));
        assert_eq!(
            all[DEFAULT_CAPACITY - 1][CELLS - 1].load(Ordering::Relaxed),
            7
        );
        assert!(b.rows_upto(0).is_empty());
    }

    #[test]
    #[should_panic]
    fn rows_beyond_the_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Mapped::create(&dir.path().join("w"), data_file_bytes(MIN_CAPACITY)).unwrap();
        a.rows_upto(MIN_CAPACITY as u32 + 1);
    }

    #[test]
    fn exemplar_rows_and_app_table_are_shared() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("w");
        let a = Mapped::create(&d, data_file_bytes(MIN_CAPACITY)).unwrap();
        // SAFETY: the file was just created by this module.
        let b = unsafe { Mapped::open(&d, data_file_bytes(MIN_CAPACITY)) }.unwrap();
        a.exemplars(EXEMPLAR_SLOTS - 1)[EXEMPLAR_BUCKETS - 1]
            .at_ns
            .store(9, Ordering::Relaxed);
        assert_eq!(
            b.exemplars(EXEMPLAR_SLOTS - 1)[EXEMPLAR_BUCKETS - 1]
                .at_ns
                .load(Ordering::Relaxed),
            9
        );
        let i = dir.path().join("i");
        let a = Mapped::create(&i, index_file_bytes(MIN_CAPACITY)).unwrap();
        // SAFETY: as above.
        let b = unsafe { Mapped::open(&i, index_file_bytes(MIN_CAPACITY)) }.unwrap();
        a.app_table().families[MAX_APP_FAMILIES - 1].unit[1].store(3, Ordering::Relaxed);
        assert_eq!(
            b.app_table().families[MAX_APP_FAMILIES - 1].unit[1].load(Ordering::Relaxed),
            3
        );
    }

    #[test]
    fn open_refuses_wrong_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x");
        std::fs::write(&path, b"short").unwrap();
        // SAFETY: the open fails before mapping.
        let err = unsafe { Mapped::open(&path, data_file_bytes(DEFAULT_CAPACITY)) }.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn index_entries_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("i");
        let m = Mapped::create(&path, index_file_bytes(DEFAULT_CAPACITY)).unwrap();
        let mut e = Entry {
            family: 3,
            labels: 1,
            len: 2,
            data: [0; LABEL_BYTES],
        };
        e.data[0] = 1;
        e.data[1] = b'x';
        // SAFETY: single process, nothing published yet.
        unsafe { m.write_entry(5, &e) };
        assert_eq!(m.entry(5).family, 3);
        assert_eq!(&m.entry(5).data[..2], &[1, b'x']);
    }
}
