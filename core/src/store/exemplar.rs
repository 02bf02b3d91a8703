//! Exemplars: for each histogram bucket of a series, the trace id of the
//! newest observation that fell into it, one per bucket per worker process.
//! Written on the request path with a few relaxed stores under a per-cell
//! sequence lock (no allocation, no syscall); read at scrape time.

use std::sync::atomic::{fence, Ordering};

use super::layout::{ExemplarCell, EXEMPLAR_BUCKETS, EXEMPLAR_SLOTS};
use super::DataFile;

/// One exemplar as a scrape shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExemplarView {
    /// The W3C trace id (128 bits, not zero).
    pub trace_id: u128,
    /// The observed value (seconds for durations).
    pub value: f64,
    /// Monotonic nanoseconds of the observation.
    pub at_ns: u64,
}

impl ExemplarView {
    /// The trace id as 32 lower-case hex digits, as in `traceparent`.
    pub fn trace_hex(&self) -> String {
        format!("{:032x}", self.trace_id)
    }
}

/// Parses the trace id of a W3C `traceparent` header value
/// (`VERSION-TRACEID-PARENTID-FLAGS`, version `00` or a later one), without
/// allocating. `None` for a malformed value or the all-zero trace id.
pub fn trace_id_of(traceparent: &[u8]) -> Option<u128> {
    // 2 version digits, '-', 32 trace digits, '-', 16 parent digits, '-', 2 flags.
    if traceparent.len() < 55
        || traceparent[2] != b'-'
        || traceparent[35] != b'-'
        || traceparent[52] != b'-'
        || &traceparent[..2] == b"ff"
        || (traceparent.len() > 55 && (&traceparent[..2] == b"00" || traceparent[55] != b'-'))
    {
        return None;
    }
    hex(&traceparent[..2])?;
    hex(&traceparent[36..52]).filter(|p| *p != 0)?;
    hex(&traceparent[53..55])?;
    hex(&traceparent[3..35]).filter(|t| *t != 0)
}

/// Lower-case hex digits to a number (W3C trace context allows no capitals).
fn hex(digits: &[u8]) -> Option<u128> {
    let mut v: u128 = 0;
    for d in digits {
        let n = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            _ => return None,
        };
        v = (v << 4) | u128::from(n);
    }
    Some(v)
}

/// The exemplar cell of bucket `bucket` of series `id` in `file`.
fn cell(file: &DataFile, id: u32, bucket: usize) -> &ExemplarCell {
    &file.map.exemplars(id as usize % EXEMPLAR_SLOTS)[bucket.min(EXEMPLAR_BUCKETS - 1)]
}

/// Records `trace_id` as the newest exemplar of bucket `bucket` of series
/// `id`. With `single_writer` (only this thread writes this file's
/// exemplars) the lock is a plain store; otherwise a writer that finds the
/// cell being written skips its exemplar (exemplars are samples, not counts).
#[inline]
pub(super) fn put(
    file: &DataFile,
    id: u32,
    bucket: usize,
    trace_id: u128,
    value: f64,
    at_ns: u64,
    single_writer: bool,
) {
    let any = &file.header().exemplars;
    if any.load(Ordering::Relaxed) == 0 {
        any.store(1, Ordering::Relaxed);
    }
    let c = cell(file, id, bucket);
    let seq = c.seq.load(Ordering::Relaxed);
    if single_writer {
        c.seq.store(seq | 1, Ordering::Relaxed);
    } else if seq % 2 == 1
        || c.seq
            .compare_exchange(seq, seq | 1, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    fence(Ordering::Release);
    c.series.store(u64::from(id) + 1, Ordering::Relaxed);
    c.trace_hi.store((trace_id >> 64) as u64, Ordering::Relaxed);
    c.trace_lo.store(trace_id as u64, Ordering::Relaxed);
    c.value.store(value.to_bits(), Ordering::Relaxed);
    c.at_ns.store(at_ns, Ordering::Relaxed);
    c.seq.store((seq | 1).wrapping_add(1), Ordering::Release);
}

/// Every whole exemplar in `file`, as (series id, bucket, exemplar). A cell
/// being written while it is read is skipped.
pub(super) fn read_all(file: &DataFile) -> Vec<(u32, usize, ExemplarView)> {
    let mut out = Vec::new();
    // Most files never hold one (no request came with a `traceparent`).
    if file.header().exemplars.load(Ordering::Acquire) == 0 {
        return out;
    }
    for slot in 0..EXEMPLAR_SLOTS {
        for (bucket, c) in file.map.exemplars(slot).iter().enumerate() {
            let begin = c.seq.load(Ordering::Acquire);
            if begin % 2 == 1 {
                continue;
            }
            let series = c.series.load(Ordering::Relaxed);
            let hi = c.trace_hi.load(Ordering::Relaxed);
            let lo = c.trace_lo.load(Ordering::Relaxed);
            let value = f64::from_bits(c.value.load(Ordering::Relaxed));
            let at_ns = c.at_ns.load(Ordering::Relaxed);
            fence(Ordering::Acquire);
            if c.seq.load(Ordering::Relaxed) != begin || series == 0 {
                continue;
            }
            let trace_id = (u128::from(hi) << 64) | u128::from(lo);
            if trace_id == 0 || series - 1 > u64::from(u32::MAX) {
                continue;
            }
            out.push((
                (series - 1) as u32,
                bucket,
                ExemplarView {
                    trace_id,
                    value,
                    at_ns,
                },
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_parses_per_w3c() {
        let tp = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id_of(tp), Some(0x4bf92f3577b34da6a3ce929d0e0e4736));
        // Zero ids, capitals, bad version, wrong length: refused.
        assert_eq!(
            trace_id_of(b"00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id_of(b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            None
        );
        assert_eq!(
            trace_id_of(b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(
            trace_id_of(b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None
        );
        assert_eq!(trace_id_of(b"00-4bf92f3577b34da6a3ce929d0e0e4736"), None);
        assert_eq!(
            trace_id_of(b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x"),
            None
        );
        assert_eq!(
            trace_id_of(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x"),
            None
        );
        // A later version may carry more fields.
        assert!(
            trace_id_of(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-x").is_some()
        );
    }
}
