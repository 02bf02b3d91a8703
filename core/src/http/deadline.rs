//! The head and idle deadlines of an http/1 connection ([`Deadlines`]) and
//! the watch that keeps them beside hyper, which has one timer for both.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::config::Config;
use crate::store::monotonic_ns;

/// The two deadlines of a connection that waits for a request head, kept
/// apart (hyper has one timer for both):
///
/// - **head** (`header_timeout`): a fresh connection's first head must be
///   complete within it of the accept; on keep-alive, a later head within it
///   of its first byte. On expiry the connection closes and is counted as
///   `gpe_http_errors_total{kind="timeout"}`.
/// - **idle** (`keepalive`): a keep-alive connection that has answered its
///   requests closes when the next head has not begun within it. That is
///   normal, not an error.
#[derive(Clone)]
pub struct Deadlines {
    pub(super) timer: Arc<dyn hyper::rt::Timer + Send + Sync>,
    pub(super) head: Duration,
    idle: Duration,
}

impl std::fmt::Debug for Deadlines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deadlines")
            .field("head", &self.head)
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

impl Deadlines {
    /// The deadlines of `config` on the runtime whose hyper timer is `timer`.
    pub fn new<T>(config: &Config, timer: T) -> Deadlines
    where
        T: hyper::rt::Timer + Send + Sync + 'static,
    {
        Deadlines {
            timer: Arc::new(timer),
            head: config.header_timeout,
            idle: config.keepalive,
        }
    }
}

/// What the deadline watch of one connection knows of it. Written by the
/// connection's own task only (atomics keep the connection future `Send`).
#[derive(Debug)]
pub(super) struct Watch {
    /// Requests whose head arrived.
    pub(super) started: AtomicU64,
    /// Responses whose body ended (or was dropped).
    finished: AtomicU64,
    /// Monotonic ns: the end of the last response (the accept at first).
    waiting_since: AtomicU64,
    /// Monotonic ns of the first byte read since `waiting_since`; 0 if none.
    first_byte: AtomicU64,
}

/// How a connection's wait for a head ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expiry {
    /// No complete head in time: counted as a timeout.
    Head,
    /// Idle keep-alive: closed, not an error.
    Idle,
}

impl Watch {
    pub(super) fn new() -> Watch {
        Watch {
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            waiting_since: AtomicU64::new(monotonic_ns()),
            first_byte: AtomicU64::new(0),
        }
    }

    pub(super) fn bytes_arrived(&self) {
        if self.first_byte.load(Ordering::Relaxed) == 0 {
            self.first_byte.store(monotonic_ns(), Ordering::Relaxed);
        }
    }

    fn response_ended(&self) {
        self.first_byte.store(0, Ordering::Relaxed);
        self.waiting_since.store(monotonic_ns(), Ordering::Relaxed);
        self.finished.fetch_add(1, Ordering::Relaxed);
    }

    /// At `now`: expired, or how long until the next look.
    fn check(&self, now: u64, d: &Deadlines) -> Result<Expiry, Duration> {
        let started = self.started.load(Ordering::Relaxed);
        if started > self.finished.load(Ordering::Relaxed) {
            // In a request: no deadline here; look again after the shorter one.
            return Err(d.head.min(d.idle).max(Duration::from_millis(100)));
        }
        let since = self.waiting_since.load(Ordering::Relaxed);
        let first = self.first_byte.load(Ordering::Relaxed);
        let (from, limit, expiry) = if started == 0 {
            (since, d.head, Expiry::Head)
        } else if first == 0 {
            (since, d.idle, Expiry::Idle)
        } else {
            (first, d.head, Expiry::Head)
        };
        let due = from.saturating_add(limit.as_nanos() as u64);
        if now >= due {
            Ok(expiry)
        } else {
            Err(Duration::from_nanos(due - now))
        }
    }

    /// Completes when a deadline passes. The watch is not woken when a
    /// request begins or ends, so it looks again at least every quarter of
    /// the shorter deadline: a keep-alive wait that begins while it sleeps
    /// towards the first head's deadline still ends within 1.25 × `keepalive`.
    pub(super) async fn expired(&self, d: &Deadlines) -> Expiry {
        let most = (d.head.min(d.idle) / 4).max(Duration::from_millis(50));
        loop {
            match self.check(monotonic_ns(), d) {
                Ok(e) => return e,
                Err(wait) => d.timer.sleep(wait.min(most)).await,
            }
        }
    }
}

/// A response body that tells the connection's [`Watch`] when it has ended.
pub(super) struct Watched<B> {
    pub(super) body: B,
    pub(super) watch: Arc<Watch>,
}

impl<B> Drop for Watched<B> {
    fn drop(&mut self) {
        self.watch.response_ended();
    }
}

impl<B: http_body::Body + Unpin> http_body::Body for Watched<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_head_and_idle_deadlines_follow_the_connection() {
        let d = Deadlines {
            timer: Arc::new(hyper_util::rt::TokioTimer::new()),
            head: Duration::from_secs(10),
            idle: Duration::from_secs(2),
        };
        let s = 1_000_000_000u64;
        let w = Watch {
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            waiting_since: AtomicU64::new(100 * s),
            first_byte: AtomicU64::new(0),
        };
        // Fresh: the head is due 10 s after the accept, bytes or not.
        assert_eq!(w.check(101 * s, &d), Err(Duration::from_secs(9)));
        w.first_byte.store(105 * s, Ordering::Relaxed);
        assert_eq!(w.check(110 * s, &d), Ok(Expiry::Head));
        // In a request: no deadline; looked at again later.
        w.started.store(1, Ordering::Relaxed);
        assert!(w.check(500 * s, &d).is_err());
        // Answered: idle for 2 s at most...
        w.finished.store(1, Ordering::Relaxed);
        w.first_byte.store(0, Ordering::Relaxed);
        w.waiting_since.store(200 * s, Ordering::Relaxed);
        assert_eq!(w.check(201 * s, &d), Err(Duration::from_secs(1)));
        assert_eq!(w.check(202 * s, &d), Ok(Expiry::Idle));
        // ...unless the next head began: 10 s from its first byte.
        w.first_byte.store(201 * s, Ordering::Relaxed);
        assert_eq!(w.check(202 * s, &d), Err(Duration::from_secs(9)));
        assert_eq!(w.check(211 * s, &d), Ok(Expiry::Head));
    }
}
