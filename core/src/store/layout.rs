//! The fixed byte layout of the store's files and the mapped views over them.
//!
//! Every file is created at its full, fixed size, with every byte backed by
//! the filesystem (`posix_fallocate`) before anyone maps it, and never grows.
//! All shared fields are atomics, so any process may read while another
//! writes. The `repr(C)` structs below are viewed over a mapping by
//! [`Mapped`] (in `mapped.rs`, with the store's only `unsafe` code).

use std::sync::atomic::{AtomicI64, AtomicU32, AtomicU64};

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

pub(super) use super::mapped::Mapped;
