//! The writer side of the store: one [`Recorder`] per worker process, shared by
//! its threads. Known label sets cost one hash lookup and a handful of relaxed
//! atomic adds; new ones go through the index's cold path once per process.

use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::catalogue::{Buckets, Family, Shape, WorkerState, SIZE_BUCKETS};
use super::index::{Index, Key, Mirror, Resolved};
use super::layout::{Row, CELLS};
use super::{monotonic_ns, DataFile, StoreDir};

/// Why a request failed, the `kind` label of `gpe_http_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The app panicked; answered 500.
    Panic,
    /// The app answered 5xx.
    AppError,
    /// The request was malformed or too large (400, 413, 431).
    BadRequest,
    /// No request head arrived on a new connection within the header-read
    /// timeout.
    Timeout,
    /// The client went away before the response was written.
    ClientDisconnect,
}

impl ErrorKind {
    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::Panic => "panic",
            ErrorKind::AppError => "app_error",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::Timeout => "timeout",
            ErrorKind::ClientDisconnect => "client_disconnect",
        }
    }
}

/// What one finished request records.
#[derive(Debug, Clone, Copy)]
pub struct RequestRecord<'a> {
    /// Method label (see [`method_label`](crate::http::instrument::method_label)).
    pub method: &'a str,
    /// Route template, or the path when the app gave none.
    pub route: &'a str,
    /// Response status.
    pub status: u16,
    /// Request body bytes.
    pub request_bytes: u64,
    /// Response body bytes.
    pub response_bytes: u64,
    /// The error kind, if the request failed.
    pub error: Option<ErrorKind>,
    /// The W3C trace id of the request (`traceparent`), kept as the exemplar
    /// of its duration bucket.
    pub trace: Option<u128>,
}

#[cfg(test)]
impl RequestRecord<'static> {
    /// A `GET /` answered 200 with 13 bytes, no error and no trace: the
    /// tests' request, changed with struct update syntax.
    pub(crate) fn hello() -> RequestRecord<'static> {
        RequestRecord {
            method: "GET",
            route: "/",
            status: 200,
            request_bytes: 0,
            response_bytes: 13,
            error: None,
            trace: None,
        }
    }
}

/// A request named in the in-flight table ([`Recorder::track`]); dropping it
/// frees the entry.
#[derive(Debug)]
pub struct Tracked {
    recorder: Arc<Recorder>,
    entry: Option<u32>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(i) = self.entry {
            self.recorder.file.release_in_flight(i);
        }
    }
}

/// Ids resolved once at start-up.
#[derive(Debug, Clone, Copy)]
struct FixedIds {
    worker_requests: u32,
    worker_accepted: u32,
    worker_duration: u32,
    request_size: u32,
    response_size: u32,
}

/// Row ids of one (method, route, status) label set.
#[derive(Debug, Clone, Copy)]
struct RequestIds {
    requests: u32,
    duration: u32,
}

/// Cache key: an owned (method, route, status).
#[derive(Debug, PartialEq, Eq)]
struct RequestKey {
    method: Box<str>,
    route: Box<str>,
    status: u16,
}

/// The borrowed form of [`RequestKey`], for lookups without allocation.
struct RequestKeyRef<'a> {
    method: &'a str,
    route: &'a str,
    status: u16,
}

impl std::hash::Hash for RequestKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        RequestKeyRef {
            method: &self.method,
            route: &self.route,
            status: self.status,
        }
        .hash(h);
    }
}

impl std::hash::Hash for RequestKeyRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.method.hash(h);
        self.route.hash(h);
        self.status.hash(h);
    }
}

impl hashbrown::Equivalent<RequestKey> for RequestKeyRef<'_> {
    fn equivalent(&self, key: &RequestKey) -> bool {
        self.status == key.status && *self.method == *key.method && *self.route == *key.route
    }
}

/// Most label sets one thread caches; beyond it lookups take the index path.
const CACHE_LIMIT: usize = 4096;

/// Per-thread cache of resolved request label sets. Owned by one recorder at a
/// time (tests may open several in one process).
#[derive(Default)]
struct RequestCache {
    owner: u64,
    ids: hashbrown::HashMap<RequestKey, RequestIds>,
}

thread_local! {
    static CACHE: std::cell::RefCell<RequestCache> = std::cell::RefCell::new(RequestCache::default());
}

static NEXT_RECORDER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
/// Whether this process has logged that the store refused a label set.
static LOSS_LOGGED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The per-process writer of one worker's data file.
///
/// Known label sets cost a lookup in a per-thread cache and relaxed atomic
/// stores. A worker that records from one thread only (every worker type of
/// gpe does: requests are recorded on its IO thread) opens the recorder in
/// single-writer mode, where counters are bumped with a load and a store
/// instead of a locked read-modify-write; readers in other processes still see
/// whole values.
#[derive(Debug)]
pub struct Recorder {
    file: DataFile,
    index: Index,
    mirror: Mutex<Mirror>,
    metrics: bool,
    single_writer: bool,
    id: u64,
    duration_bounds_ns: Vec<u64>,
    size_bounds: Vec<u64>,
    fixed: FixedIds,
}

impl Recorder {
    /// Opens the data file of `slot`/`generation` in `store` (the master created
    /// it) and the shared index. With `metrics` off only the header (state,
    /// heartbeat, in-flight, request count) is written. `single_writer`
    /// promises that only one thread records at a time.
    ///
    /// # Errors
    /// The files are missing or invalid, or the fixed series cannot be resolved.
    pub fn open(
        store: &StoreDir,
        slot: u32,
        generation: u64,
        metrics: bool,
        single_writer: bool,
    ) -> io::Result<Self> {
        let file = store.open_data(&store.worker_path(slot, generation))?;
        let index = store.open_index()?;
        let mut mirror = Mirror::default();
        let slot_label = slot.to_string();
        let mut fixed_id = |family: Family, values: &[&str]| -> io::Result<u32> {
            Ok(mirror.resolve(&index, &Key::new(family, values))?.id())
        };
        let fixed = FixedIds {
            worker_requests: fixed_id(Family::WorkerRequests, &[&slot_label])?,
            worker_accepted: fixed_id(Family::WorkerAccepted, &[&slot_label])?,
            worker_duration: fixed_id(Family::WorkerDuration, &[&slot_label])?,
            request_size: fixed_id(Family::HttpRequestSize, &[])?,
            response_size: fixed_id(Family::HttpResponseSize, &[])?,
        };
        let duration_bounds_ns = index
            .duration_buckets()
            .iter()
            .map(|s| (s * 1e9) as u64)
            .collect();
        let h = file.header();
        h.pid.store(std::process::id(), Ordering::Relaxed);
        h.clock_offset_ns.store(
            super::unix_now_ns() as i64 - monotonic_ns() as i64,
            Ordering::Relaxed,
        );
        Ok(Recorder {
            file,
            index,
            mirror: Mutex::new(mirror),
            metrics,
            single_writer,
            id: NEXT_RECORDER.fetch_add(1, Ordering::Relaxed),
            duration_bounds_ns,
            size_bounds: SIZE_BUCKETS.iter().map(|b| *b as u64).collect(),
            fixed,
        })
    }

    /// The data file.
    #[cfg(test)]
    fn file(&self) -> &DataFile {
        &self.file
    }

    /// Requests this process has completed.
    pub fn requests(&self) -> u64 {
        self.file.header().requests.load(Ordering::Relaxed)
    }

    /// Marks the worker ready to serve.
    pub fn ready(&self) {
        self.file.set_state(WorkerState::Idle);
        self.file.beat();
    }

    /// Marks the worker draining: it accepts no more connections.
    pub fn draining(&self) {
        self.file.set_state(WorkerState::Draining);
    }

    /// Records a sign of life from the worker's loop, whatever requests are
    /// in flight: the heartbeat says the loop responds. A loop that an app
    /// blocks beats no more and is replaced after `timeout`; the sync
    /// worker's loop runs only between connections, so there `timeout` also
    /// caps a request.
    pub fn beat(&self) {
        self.file.beat();
    }

    #[inline]
    fn add(&self, cell: &AtomicU64, v: u64) {
        if self.single_writer {
            cell.store(
                cell.load(Ordering::Relaxed).wrapping_add(v),
                Ordering::Relaxed,
            );
        } else {
            cell.fetch_add(v, Ordering::Relaxed);
        }
    }

    /// Adds `v` to a signed gauge, returning the previous value.
    #[inline]
    fn add_signed(&self, cell: &AtomicI64, v: i64) -> i64 {
        if self.single_writer {
            let prev = cell.load(Ordering::Relaxed);
            cell.store(prev.wrapping_add(v), Ordering::Relaxed);
            prev
        } else {
            cell.fetch_add(v, Ordering::Relaxed)
        }
    }

    /// A connection was accepted. Always an atomic add: an upgraded
    /// connection may close on a thread the app spawned its task on.
    pub fn connection_opened(&self) {
        self.file
            .header()
            .connections
            .fetch_add(1, Ordering::Relaxed);
        if self.metrics {
            self.add(&self.file.row(self.fixed.worker_accepted)[0], 1);
        }
    }

    /// A connection was closed.
    pub fn connection_closed(&self) {
        self.file
            .header()
            .connections
            .fetch_sub(1, Ordering::Relaxed);
    }

    /// A request started; returns its start time for [`Recorder::finish`].
    pub fn begin(&self) -> u64 {
        let now = monotonic_ns();
        self.begin_at(now);
        now
    }

    /// A request started at `now` (monotonic nanoseconds, as
    /// [`monotonic_ns`] gives): the metric updates of [`Recorder::begin`]
    /// without its clock read.
    #[inline]
    pub fn begin_at(&self, now: u64) {
        if self.add_signed(&self.file.header().in_flight, 1) == 0 {
            self.transition(WorkerState::Busy, now);
        }
    }

    fn transition(&self, to: WorkerState, now: u64) {
        let h = self.file.header();
        if h.state.load(Ordering::Relaxed) != WorkerState::Draining.code() {
            self.file.set_state_at(to, now);
        }
    }

    /// A request finished.
    pub fn finish(&self, start: u64, rec: &RequestRecord<'_>) {
        self.finish_at(start, monotonic_ns(), rec);
    }

    /// A request that started at `start` finished at `end` (monotonic
    /// nanoseconds): the metric updates of [`Recorder::finish`] without its
    /// clock read.
    #[inline]
    pub fn finish_at(&self, start: u64, end: u64, rec: &RequestRecord<'_>) {
        let h = self.file.header();
        if self.metrics {
            self.record(end.saturating_sub(start), end, rec);
        }
        self.add(&h.requests, 1);
        h.heartbeat_ns.store(end, Ordering::Relaxed);
        if self.add_signed(&h.in_flight, -1) == 1 {
            self.transition(WorkerState::Idle, end);
        }
    }

    /// A request ended without an answer because its client went away: it
    /// leaves the in-flight count and is counted as `client_disconnect`.
    pub fn abandon(&self, _start: u64, method: &str, route: &str) {
        let end = monotonic_ns();
        let h = self.file.header();
        if self.metrics {
            if let Some(id) = self.resolve(
                Family::HttpErrors,
                &[method, route, ErrorKind::ClientDisconnect.label()],
            ) {
                self.add(&self.file.row(id)[0], 1);
            }
        }
        h.heartbeat_ns.store(end, Ordering::Relaxed);
        if self.add_signed(&h.in_flight, -1) == 1 {
            self.transition(WorkerState::Idle, end);
        }
    }

    /// Names a request that began at `start` in the file's in-flight table
    /// (for the master's log when it aborts this worker) until the returned
    /// guard is dropped. When the table is full the request is not named.
    pub fn track(self: &Arc<Self>, start: u64, method: &str, path: &str) -> Tracked {
        Tracked {
            entry: self.file.claim_in_flight(start, method, path),
            recorder: self.clone(),
        }
    }

    /// Records an error that has no request (a malformed request head).
    pub fn error_without_request(&self, kind: ErrorKind) {
        if self.metrics {
            if let Some(id) =
                self.resolve(Family::HttpErrors, &["unknown", "unknown", kind.label()])
            {
                self.add(&self.file.row(id)[0], 1);
            }
        }
    }

    fn record(&self, duration_ns: u64, end: u64, rec: &RequestRecord<'_>) {
        // The slot's own duration histogram: same buckets, so the bucket is
        // found once for both rows.
        let bucket = bucket_of(&self.duration_bounds_ns, duration_ns);
        let slot_row = self.file.row(self.fixed.worker_duration);
        self.add(&slot_row[bucket], 1);
        self.add(&slot_row[CELLS - 1], duration_ns);
        if let Some(ids) = self.request_ids(rec) {
            self.add(&self.file.row(ids.requests)[0], 1);
            let row = self.file.row(ids.duration);
            self.add(&row[bucket], 1);
            self.add(&row[CELLS - 1], duration_ns);
            if let Some(trace) = rec.trace {
                super::exemplar::put(
                    &self.file,
                    ids.duration,
                    bucket,
                    trace,
                    duration_ns as f64 / 1e9,
                    end,
                    self.single_writer,
                );
            }
        }
        if let Some(kind) = rec.error {
            if let Some(id) =
                self.resolve(Family::HttpErrors, &[rec.method, rec.route, kind.label()])
            {
                self.add(&self.file.row(id)[0], 1);
            }
        }
        self.observe(
            self.file.row(self.fixed.request_size),
            &self.size_bounds,
            rec.request_bytes,
        );
        self.observe(
            self.file.row(self.fixed.response_size),
            &self.size_bounds,
            rec.response_bytes,
        );
        self.add(&self.file.row(self.fixed.worker_requests)[0], 1);
    }

    /// The rows of a request's label set: from this thread's cache, else
    /// through the index (and cached when both have their own series).
    fn request_ids(&self, rec: &RequestRecord<'_>) -> Option<RequestIds> {
        let key = RequestKeyRef {
            method: rec.method,
            route: rec.route,
            status: rec.status,
        };
        let cached = CACHE.with(|c| {
            let c = c.borrow();
            if c.owner == self.id {
                c.ids.get(&key).copied()
            } else {
                None
            }
        });
        if cached.is_some() {
            return cached;
        }
        let mut status_buf = [0u8; 3];
        let status = status_str(rec.status, &mut status_buf);
        let (requests, own_r) =
            self.resolve_tagged(Family::HttpRequests, &[rec.method, rec.route, status])?;
        let (duration, own_d) =
            self.resolve_tagged(Family::HttpDuration, &[rec.method, rec.route])?;
        let ids = RequestIds { requests, duration };
        if own_r && own_d {
            CACHE.with(|c| {
                let mut c = c.borrow_mut();
                if c.owner != self.id {
                    c.owner = self.id;
                    c.ids.clear();
                }
                if c.ids.len() < CACHE_LIMIT {
                    c.ids.insert(
                        RequestKey {
                            method: rec.method.into(),
                            route: rec.route.into(),
                            status: rec.status,
                        },
                        ids,
                    );
                }
            });
        }
        Some(ids)
    }

    fn resolve(&self, family: Family, values: &[&str]) -> Option<u32> {
        self.resolve_tagged(family, values).map(|(id, _)| id)
    }

    /// Resolves a label set; the flag says whether it got its own series.
    fn resolve_tagged(&self, family: Family, values: &[&str]) -> Option<(u32, bool)> {
        debug_assert!(
            !matches!(family.shape(), Shape::Histogram(Buckets::Size)),
            "size histograms use fixed ids"
        );
        let key = Key::new(family, values);
        let mut mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        match mirror.resolve(&self.index, &key) {
            Ok(Resolved::Own(id)) => Some((id, true)),
            Ok(Resolved::Other(id)) => {
                self.add(&self.file.header().dropped[family.code() as usize], 1);
                Some((id, false))
            }
            // The index is full, broken or its lock failed: count the loss,
            // keep serving, and say so once per process.
            Err(e) => {
                self.add(&self.file.header().dropped[family.code() as usize], 1);
                if !LOSS_LOGGED.swap(true, Ordering::Relaxed) {
                    crate::log_warn!(
                        "the metric store refused a new label set ({e}); new label sets of this \
                         process are dropped and counted in gpe_metrics_series_dropped_total"
                    );
                }
                None
            }
        }
    }

    /// Adds one observation of `value` to a histogram row with finite
    /// `bounds`; returns its bucket.
    #[inline]
    fn observe(&self, row: &Row, bounds: &[u64], value: u64) -> usize {
        let bucket = bucket_of(bounds, value);
        self.add(&row[bucket], 1);
        self.add(&row[CELLS - 1], value);
        bucket
    }
}

/// The cell of the first bucket whose bound is at least `value` (`+Inf` last).
fn bucket_of(bounds: &[u64], value: u64) -> usize {
    bounds
        .iter()
        .position(|b| value <= *b)
        .unwrap_or(bounds.len())
}

/// Formats a status code (100..=999) without allocating.
fn status_str(status: u16, buf: &mut [u8; 3]) -> &str {
    let s = status.clamp(100, 999);
    buf[0] = b'0' + (s / 100) as u8;
    buf[1] = b'0' + (s / 10 % 10) as u8;
    buf[2] = b'0' + (s % 10) as u8;
    std::str::from_utf8(buf).unwrap_or("000")
}

#[cfg(test)]
#[path = "recorder_tests.rs"]
mod tests;
