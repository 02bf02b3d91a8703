//! The in-flight table of a worker's file: the method, path and start of up
//! to [`IN_FLIGHT_ENTRIES`] requests in progress, so that the master can say
//! what a worker was doing when it aborts it for a missed heartbeat.
//!
//! Protocol (one entry): a writer claims a free entry (`start_ns` 0) by a
//! compare-exchange to `u64::MAX`, fills in the method and path with relaxed
//! stores, and publishes it with a release store of the start time; it frees
//! the entry with a release store of 0. A reader loads `start_ns` (acquire),
//! skips 0 and `u64::MAX`, reads the rest, and keeps the entry only if
//! `start_ns` is unchanged after an acquire fence (an entry freed and claimed
//! again meanwhile gets a later start). A torn path is at worst a wrong
//! diagnostic, never unsound: every field is an atomic.

use std::sync::atomic::{fence, Ordering};

use super::layout::{InFlightEntry, IN_FLIGHT_ENTRIES, IN_FLIGHT_PATH};
use super::DataFile;

/// A request in flight, as its worker's file names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlightRequest {
    /// The method label.
    pub method: String,
    /// The request path (without the query), at most [`IN_FLIGHT_PATH`] bytes.
    pub path: String,
    /// When it began, in monotonic nanoseconds.
    pub start_ns: u64,
}

/// Packs up to 8 bytes of `b` from `at` into a little-endian word.
fn word(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    let end = b.len().min(at + 8);
    if at < end {
        w[..end - at].copy_from_slice(&b[at..end]);
    }
    u64::from_le_bytes(w)
}

/// `s` cut to at most `max` bytes, at a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl InFlightEntry {
    fn read(&self) -> Option<InFlightRequest> {
        let start = self.start_ns.load(Ordering::Acquire);
        if start == 0 || start == u64::MAX {
            return None;
        }
        let method = self.method.load(Ordering::Relaxed).to_le_bytes();
        let len = (self.path_len.load(Ordering::Relaxed) as usize).min(IN_FLIGHT_PATH);
        let mut path = Vec::with_capacity(len);
        for w in &self.path[..len.div_ceil(8)] {
            path.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        path.truncate(len);
        fence(Ordering::Acquire);
        if self.start_ns.load(Ordering::Relaxed) != start {
            return None;
        }
        let m = method.iter().position(|&b| b == 0).unwrap_or(8);
        Some(InFlightRequest {
            method: String::from_utf8_lossy(&method[..m]).into_owned(),
            path: String::from_utf8_lossy(&path).into_owned(),
            start_ns: start,
        })
    }
}

impl DataFile {
    /// Names a request that began at `start` in a free entry; `None` when
    /// every entry is taken.
    pub(super) fn claim_in_flight(&self, start: u64, method: &str, path: &str) -> Option<u32> {
        let table = self.map.in_flight();
        let (i, e) = table.iter().enumerate().find(|(_, e)| {
            e.start_ns.load(Ordering::Relaxed) == 0
                && e.start_ns
                    .compare_exchange(0, u64::MAX, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
        })?;
        let method = cut(method, 8).as_bytes();
        let path = cut(path, IN_FLIGHT_PATH).as_bytes();
        e.method.store(word(method, 0), Ordering::Relaxed);
        e.path_len.store(path.len() as u64, Ordering::Relaxed);
        for (k, w) in e.path[..path.len().div_ceil(8)].iter().enumerate() {
            w.store(word(path, k * 8), Ordering::Relaxed);
        }
        e.start_ns
            .store(start.clamp(1, u64::MAX - 1), Ordering::Release);
        Some(i as u32)
    }

    /// Frees entry `i`.
    pub(super) fn release_in_flight(&self, i: u32) {
        if let Some(e) = self.map.in_flight().get(i as usize) {
            e.start_ns.store(0, Ordering::Release);
        }
    }

    /// The requests in flight, oldest first.
    pub(super) fn in_flight_requests(&self) -> Vec<InFlightRequest> {
        let mut v: Vec<InFlightRequest> = self
            .map
            .in_flight()
            .iter()
            .filter_map(InFlightEntry::read)
            .collect();
        v.sort_by_key(|r| r.start_ns);
        debug_assert!(v.len() <= IN_FLIGHT_ENTRIES);
        v
    }
}
