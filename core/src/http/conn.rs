//! One connection: the one http/1 builder policy every worker uses, the
//! connection guard, the head and idle deadlines ([`Deadlines`]), and
//! [`serve_io`], which serves a connection with hyper until it closes
//! (through an upgrade, if the app takes one).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderValue};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;

use super::instrument::Instrumented;
use super::run::Runner;
use crate::config::Config;
use crate::store::{monotonic_ns, ErrorKind, Recorder};

/// The http/1 builder of every worker type: the configured head limits;
/// keep-alive as configured unless `keep_alive` is false (the sync worker);
/// half-closed connections answered. hyper's own header-read timeout is not
/// used: it is one timer for both the idle wait and the head, and gpe keeps
/// those apart ([`Deadlines`]). `timer` is the runtime's hyper timer.
pub fn builder<T>(config: &Config, keep_alive: bool, timer: T) -> http1::Builder
where
    T: hyper::rt::Timer + Send + Sync + 'static,
{
    let on = keep_alive && !config.keepalive.is_zero();
    let mut b = http1::Builder::new();
    b.keep_alive(on)
        .max_buf_size(config.max_head_bytes())
        .max_headers(config.limit_request_fields)
        // A client that sends its request and then shuts its write side
        // (FIN) still gets its answer, as Gunicorn and nginx give it.
        .half_close(true)
        .timer(timer);
    b
}

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
    timer: Arc<dyn hyper::rt::Timer + Send + Sync>,
    head: Duration,
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
struct Watch {
    /// Requests whose head arrived.
    started: AtomicU64,
    /// Responses whose body ended (or was dropped).
    finished: AtomicU64,
    /// Monotonic ns: the end of the last response (the accept at first).
    waiting_since: AtomicU64,
    /// Monotonic ns of the first byte read since `waiting_since`; 0 if none.
    first_byte: AtomicU64,
}

/// How a connection's wait for a head ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expiry {
    /// No complete head in time: counted as a timeout.
    Head,
    /// Idle keep-alive: closed, not an error.
    Idle,
}

impl Watch {
    fn new() -> Watch {
        Watch {
            started: AtomicU64::new(0),
            finished: AtomicU64::new(0),
            waiting_since: AtomicU64::new(monotonic_ns()),
            first_byte: AtomicU64::new(0),
        }
    }

    fn bytes_arrived(&self) {
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

    /// Completes when a deadline passes.
    async fn expired(&self, d: &Deadlines) -> Expiry {
        loop {
            match self.check(monotonic_ns(), d) {
                Ok(e) => return e,
                Err(wait) => d.timer.sleep(wait).await,
            }
        }
    }
}

/// A response body that tells the connection's [`Watch`] when it has ended.
struct Watched<B> {
    body: B,
    watch: Arc<Watch>,
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

/// Classifies an error returned by a hyper connection for `gpe_http_errors_total`.
pub fn classify(e: &hyper::Error) -> Option<ErrorKind> {
    if e.is_parse() || e.is_parse_too_large() || e.is_parse_status() {
        Some(ErrorKind::BadRequest)
    } else if e.is_timeout() {
        None
    } else if e.is_incomplete_message()
        || e.is_canceled()
        || e.is_closed()
        || e.is_body_write_aborted()
    {
        Some(ErrorKind::ClientDisconnect)
    } else {
        None
    }
}

/// Counts a connection as open for as long as it lives.
#[derive(Debug)]
pub struct ConnectionGuard(Arc<Recorder>);

impl ConnectionGuard {
    /// Counts one accepted connection.
    pub fn new(recorder: Arc<Recorder>) -> ConnectionGuard {
        recorder.connection_opened();
        ConnectionGuard(recorder)
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connection_closed();
    }
}

/// A connection's transport together with what must live exactly as long as
/// it (its [`ConnectionGuard`], its place under the worker's cap). When the
/// app upgrades the connection, hyper hands this whole value to the app, so
/// an upgraded connection is still counted until it closes.
#[derive(Debug)]
pub struct Held<I, H> {
    io: I,
    _hold: H,
    watch: Arc<Watch>,
}

impl<I: Read + Unpin, H: Unpin> Read for Held<I, H> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if r.is_ready() {
            // Bytes (or the end) arrived: a head has begun.
            self.watch.bytes_arrived();
        }
        r
    }
}

impl<I: Write + Unpin, H: Unpin> Write for Held<I, H> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
}

/// A hyper connection future that can be asked to finish gracefully.
trait Graceful: Future<Output = hyper::Result<()>> {
    fn shutdown(self: Pin<&mut Self>);
}

impl<I, S, B> Graceful for http1::Connection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: Read + Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, B> Graceful for http1::UpgradeableConnection<I, S>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: Read + Write + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves one connection with hyper until it closes, counting it as open
/// while it (or the connection it was upgraded to) lives; `hold` lives as
/// long too. When `drain` completes first, the connection finishes its
/// current request and closes (`Connection: close`). A connection that waits
/// for a head past its [`Deadlines`] is closed. Errors hyper reports are
/// counted by kind.
#[allow(clippy::too_many_arguments)]
pub async fn serve_io<I, H, R, D>(
    io: I,
    hold: H,
    peer: &str,
    svc: &Instrumented,
    builder: &http1::Builder,
    deadlines: &Deadlines,
    runner: &R,
    drain: D,
) where
    I: Read + Write + Unpin + Send + 'static,
    H: Unpin + Send + 'static,
    R: Runner,
    D: Future<Output = ()>,
{
    let watch = Arc::new(Watch::new());
    let io = Held {
        io,
        _hold: (hold, ConnectionGuard::new(svc.recorder().clone())),
        watch: watch.clone(),
    };
    // Atomics (not Cells) so that the connection future stays Send.
    let draining = AtomicBool::new(false);
    let (draining, w) = (&draining, &watch);
    let service = hyper::service::service_fn(|req| async move {
        w.started.fetch_add(1, Ordering::Relaxed);
        let watch = w.clone();
        let mut resp = svc.handle(req, peer, runner).await;
        if draining.load(Ordering::Relaxed) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok::<_, std::convert::Infallible>(resp.map(|body| Watched { body, watch }))
    });
    let expired = watch.expired(deadlines);
    let result = if svc.serves_upgrades() {
        let conn = builder.serve_connection(io, service).with_upgrades();
        drive(conn, drain, expired, &watch.started, draining).await
    } else {
        let conn = builder.serve_connection(io, service);
        drive(conn, drain, expired, &watch.started, draining).await
    };
    let kind = match result {
        Ok(()) | Err(Ended::Expired(Expiry::Idle)) => None,
        // No complete head in time (a fresh connection, or a keep-alive one
        // whose next head began and stalled).
        Err(Ended::Expired(Expiry::Head)) => Some(ErrorKind::Timeout),
        Err(Ended::Hyper(e)) => classify(&e),
    };
    if let Some(kind) = kind {
        svc.recorder().error_without_request(kind);
    }
}

/// Why a connection ended other than cleanly.
#[derive(Debug)]
enum Ended {
    Hyper(hyper::Error),
    Expired(Expiry),
}

async fn drive<C, D, E>(
    conn: C,
    drain: D,
    expired: E,
    served: &AtomicU64,
    draining: &AtomicBool,
) -> Result<(), Ended>
where
    C: Graceful,
    D: Future<Output = ()>,
    E: Future<Output = Expiry>,
{
    use futures_util::future::{select, Either};
    let mut conn = std::pin::pin!(conn);
    let drain = std::pin::pin!(drain);
    let mut expired = std::pin::pin!(expired);
    match select(select(conn.as_mut(), expired.as_mut()), drain).await {
        Either::Left((Either::Left((r, _)), _)) => r.map_err(Ended::Hyper),
        // Dropping the connection closes it.
        Either::Left((Either::Right((e, _)), _)) => Err(Ended::Expired(e)),
        Either::Right(((), _)) => {
            draining.store(true, Ordering::Relaxed);
            // A connection accepted but not yet read gets its first request
            // answered (with `Connection: close`) rather than a silent close;
            // one that already served requests closes once idle.
            if served.load(Ordering::Relaxed) > 0 {
                conn.as_mut().shutdown();
            }
            match select(conn, expired).await {
                Either::Left((r, _)) => r.map_err(Ended::Hyper),
                Either::Right((e, _)) => Err(Ended::Expired(e)),
            }
        }
    }
}

#[cfg(test)]
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
