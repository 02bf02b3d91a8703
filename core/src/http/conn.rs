//! One connection: the one builder policy every worker uses (http/1, and
//! HTTP/2 where the worker type and `http2` allow it), the connection guard,
//! the head and idle deadlines of http/1 ([`Deadlines`]), and [`serve_io`],
//! which serves a connection with hyper until it closes (through an upgrade,
//! if the app takes one).
//!
//! HTTP/2 streams run inside the connection's own task ([`Streams`]), not as
//! tasks of their own: the same code then serves on tokio and on smol, the
//! streams may borrow the worker's service, and they end with the connection.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http::{header, HeaderValue};
use hyper::rt::{Read, ReadBufCursor, Sleep, Timer, Write};
use hyper::server::conn::{http1, http2};

use super::instrument::Instrumented;
use super::run::Runner;
use crate::config::Config;
use crate::store::{monotonic_ns, ErrorKind, Recorder};

/// How long an HTTP/2 connection without an open stream stays when
/// keep-alive is off.
pub const H2_IDLE_WITHOUT_KEEPALIVE: Duration = Duration::from_secs(2);

/// The http/1 builder of every worker type: the configured head limits;
/// keep-alive as configured unless `keep_alive` is false (the sync worker);
/// half-closed connections answered. hyper's own header-read timeout is
/// off: it is one timer for both the idle wait and the head, and gpe keeps
/// those apart ([`Deadlines`]). `timer` is the runtime's hyper timer.
pub fn builder<T>(config: &Config, keep_alive: bool, timer: T) -> http1::Builder
where
    T: hyper::rt::Timer + Send + Sync + 'static,
{
    let on = keep_alive && !config.keepalive.is_zero();
    let mut b = http1::Builder::new();
    b.keep_alive(on)
        .max_buf_size(config.max_head_bytes())
        // A client that sends its request and then shuts its write side
        // (FIN) still gets its answer, as Gunicorn and nginx give it.
        .half_close(true)
        // hyper's timeout would otherwise cut every head at 30 s, whatever
        // `header_timeout` says (it is on whenever a timer is set).
        .header_read_timeout(None)
        .timer(timer);
    // hyper's own bound is 100 fields. Set to any number, even 100, hyper
    // fills an array of that many entries for every request it parses (a
    // sixth of the instructions of a small request); unset, it uses an
    // uninitialised one.
    if config.limit_request_fields != HYPER_MAX_HEADERS {
        b.max_headers(config.limit_request_fields);
    }
    b
}

/// hyper's field-count bound when `max_headers` is not set
/// (`DEFAULT_MAX_HEADERS` in its `proto/h1/role.rs`).
const HYPER_MAX_HEADERS: usize = 100;

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

    /// Completes when a deadline passes. The watch is not woken when a
    /// request begins or ends, so it looks again at least every quarter of
    /// the shorter deadline: a keep-alive wait that begins while it sleeps
    /// towards the first head's deadline still ends within 1.25 × `keepalive`.
    async fn expired(&self, d: &Deadlines) -> Expiry {
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

/// The one builder policy: the http/1 [`builder`], and whether and how
/// HTTP/2 is spoken (ALPN `h2` under TLS; with `http2 = "always"` also
/// prior-knowledge h2c, told apart from http/1 by the client preface).
#[derive(Clone)]
pub struct Policy {
    http1: http1::Builder,
    /// `None`: HTTP/1.1 only (the sync worker, or `http2 = "off"`).
    h2: Option<H2Limits>,
    /// `http2 = "always"`: a connection without ALPN `h2` may still start with
    /// the HTTP/2 preface.
    prior_knowledge: bool,
    timer: SharedTimer,
    /// The http/1 head and idle deadlines; the head one (`header_timeout`)
    /// also bounds a TLS handshake and the wait for the h2c preface.
    deadlines: Deadlines,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("http1", &self.http1)
            .field("h2", &self.h2)
            .field("prior_knowledge", &self.prior_knowledge)
            .finish_non_exhaustive()
    }
}

/// The HTTP/2 limits, from the settings that bound HTTP/1 the same way.
#[derive(Debug, Clone, Copy)]
struct H2Limits {
    /// `worker_connections`: a stream costs the worker what a connection does.
    max_concurrent_streams: u32,
    /// [`Config::max_head_bytes`]: the same bound on a request head.
    max_header_list_size: u32,
    /// `keepalive` (2 s when it is 0): a connection without an open stream
    /// for this long is closed with GOAWAY.
    idle: Duration,
}

/// How hyper speaks on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.x.
    Http1,
    /// HTTP/2 (ALPN said `h2`).
    Http2,
    /// HTTP/2 if the client's first bytes are the HTTP/2 preface, else HTTP/1.x.
    Sniff,
}

/// The policy of a worker type: [`builder`] for http/1; HTTP/2 unless
/// `http2` is false or the setting `http2` is `off`.
pub fn policy<T>(config: &Config, keep_alive: bool, http2: bool, timer: T) -> Policy
where
    T: Timer + Clone + Send + Sync + 'static,
{
    let h2 = (http2 && config.http2 != "off").then(|| H2Limits {
        max_concurrent_streams: config.worker_connections,
        max_header_list_size: u32::try_from(config.max_head_bytes()).unwrap_or(u32::MAX),
        idle: if config.keepalive.is_zero() {
            H2_IDLE_WITHOUT_KEEPALIVE
        } else {
            config.keepalive
        },
    });
    Policy {
        http1: builder(config, keep_alive, timer.clone()),
        h2,
        prior_knowledge: config.http2 == "always",
        deadlines: Deadlines::new(config, timer.clone()),
        timer: SharedTimer(Arc::new(timer)),
    }
}

impl Policy {
    /// Whether ALPN should offer `h2`.
    pub fn offers_h2(&self) -> bool {
        self.h2.is_some()
    }

    /// The deadline of a TLS handshake (`header_timeout`).
    pub fn handshake_timeout(&self) -> Duration {
        self.deadlines.head
    }

    /// The protocol of a connection, given the protocol its TLS handshake
    /// chose by ALPN (`None` for plain TCP or no ALPN).
    pub fn protocol(&self, alpn: Option<&[u8]>) -> Protocol {
        match (&self.h2, alpn) {
            (None, _) => Protocol::Http1,
            (Some(_), Some(crate::tls::ALPN_H2)) => Protocol::Http2,
            (Some(_), _) if self.prior_knowledge => Protocol::Sniff,
            (Some(_), _) => Protocol::Http1,
        }
    }

    fn http2_builder<'a>(
        &self,
        h2: &H2Limits,
        streams: Streams<'a>,
    ) -> http2::Builder<Streams<'a>> {
        let mut b = http2::Builder::new(streams);
        b.max_concurrent_streams(h2.max_concurrent_streams)
            .max_header_list_size(h2.max_header_list_size)
            .timer(self.timer.clone());
        b
    }
}

/// A runtime's hyper timer behind one type.
#[derive(Clone)]
struct SharedTimer(Arc<dyn Timer + Send + Sync>);

impl Timer for SharedTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.0.sleep(duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        self.0.sleep_until(deadline)
    }

    fn now(&self) -> Instant {
        self.0.now()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        self.0.reset(sleep, new_deadline);
    }
}

/// The executor of one HTTP/2 connection: hyper hands it each stream, and
/// [`drive_h2`] polls them in the connection's task. hyper's executors must
/// spawn `'static` tasks otherwise, which the borrowed service cannot be,
/// and the spawn differs between tokio and smol.
#[derive(Clone, Default)]
pub struct Streams<'a>(Rc<RefCell<Queued<'a>>>);

#[derive(Default)]
struct Queued<'a> {
    new: Vec<LocalBoxFuture<'a, ()>>,
    waker: Option<Waker>,
}

impl<'a, F> hyper::rt::Executor<F> for Streams<'a>
where
    F: Future<Output = ()> + 'a,
{
    fn execute(&self, fut: F) {
        let mut q = self.0.borrow_mut();
        q.new.push(Box::pin(fut));
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }
}

/// The HTTP/2 client preface (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection whose first bytes were read to look for the preface, and are
/// read again by hyper. (hyper-util's auto builder does the same, but would
/// need a second copy of the http/1 configuration.)
struct Rewind<I> {
    prefix: Vec<u8>,
    read: usize,
    io: I,
}

impl<I: Read + Unpin> Read for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.read < this.prefix.len() {
            let rest = &this.prefix[this.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: Write + Unpin> Write for Rewind<I> {
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

/// Reads until the bytes are the preface, differ from it, or end; whether
/// they were the preface, and the connection to hand to hyper.
async fn sniff<I: Read + Unpin>(mut io: I) -> std::io::Result<(bool, Rewind<I>)> {
    let mut prefix = Vec::with_capacity(PREFACE.len());
    while prefix.len() < PREFACE.len() && PREFACE.starts_with(&prefix) {
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 24];
        let want = PREFACE.len() - prefix.len();
        let mut buf = hyper::rt::ReadBuf::uninit(&mut chunk[..want]);
        std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, buf.unfilled())).await?;
        if buf.filled().is_empty() {
            break;
        }
        prefix.extend_from_slice(buf.filled());
    }
    let h2 = prefix == PREFACE;
    Ok((
        h2,
        Rewind {
            prefix,
            read: 0,
            io,
        },
    ))
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

impl<I, S, B, E> Graceful for http2::Connection<I, S, E>
where
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: Read + Write + Unpin,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shutdown(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves one connection with hyper until it closes, counting it as open
/// while it (or the connection it was upgraded to) lives; `hold` lives as
/// long too. `protocol` comes from [`Policy::protocol`]. When `drain`
/// completes first, the connection finishes its current requests and closes
/// (`Connection: close` on http/1, GOAWAY on HTTP/2). An http/1 connection
/// that waits for a head past its [`Deadlines`] is closed. Errors hyper
/// reports are counted by kind. Metrics are the same for both protocols.
#[allow(clippy::too_many_arguments)]
pub async fn serve_io<I, H, R, D>(
    io: I,
    hold: H,
    peer: &str,
    svc: &Instrumented,
    policy: &Policy,
    protocol: Protocol,
    runner: &R,
    drain: D,
) where
    I: Read + Write + Unpin + Send + 'static,
    H: Unpin + Send + 'static,
    R: Runner,
    D: Future<Output = ()>,
{
    let guard = ConnectionGuard::new(svc.recorder().clone());
    let watch = Arc::new(Watch::new());
    // Atomics (not Cells) so that the http/1 connection future stays Send.
    let draining = AtomicBool::new(false);
    let (draining, w) = (&draining, &watch);
    let service =
        hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
            w.started.fetch_add(1, Ordering::Relaxed);
            let watch = w.clone();
            let h1 = req.version() < http::Version::HTTP_2;
            let mut resp = svc.handle(req, peer, runner).await;
            if h1 && draining.load(Ordering::Relaxed) {
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, std::convert::Infallible>(resp.map(|body| Watched { body, watch }))
        });
    let result = match (protocol, &policy.h2) {
        (Protocol::Sniff, Some(h2)) => {
            let sniffed = policy.timer.sleep(policy.deadlines.head);
            match futures_util::future::select(std::pin::pin!(sniff(io)), sniffed).await {
                futures_util::future::Either::Left((Ok((true, io)), _)) => {
                    let io = Held {
                        io,
                        _hold: (hold, guard),
                        watch: watch.clone(),
                    };
                    serve_h2(io, service, policy, h2, drain, draining)
                        .await
                        .map_err(Ended::Hyper)
                }
                futures_util::future::Either::Left((Ok((false, io)), _)) => {
                    let io = Held {
                        io,
                        _hold: (hold, guard),
                        watch: watch.clone(),
                    };
                    serve_h1(io, service, svc, policy, drain, &watch, draining).await
                }
                // The client went away, or said nothing in time.
                futures_util::future::Either::Left((Err(_), _)) => Ok(()),
                futures_util::future::Either::Right(_) => {
                    svc.recorder().error_without_request(ErrorKind::Timeout);
                    Ok(())
                }
            }
        }
        (Protocol::Http2, Some(h2)) => {
            let io = Held {
                io,
                _hold: (hold, guard),
                watch: watch.clone(),
            };
            serve_h2(io, service, policy, h2, drain, draining)
                .await
                .map_err(Ended::Hyper)
        }
        _ => {
            let io = Held {
                io,
                _hold: (hold, guard),
                watch: watch.clone(),
            };
            serve_h1(io, service, svc, policy, drain, &watch, draining).await
        }
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

async fn serve_h1<I, S, B, D>(
    io: I,
    service: S,
    svc: &Instrumented,
    policy: &Policy,
    drain: D,
    watch: &Watch,
    draining: &AtomicBool,
) -> Result<(), Ended>
where
    I: Read + Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    D: Future<Output = ()>,
{
    let expired = watch.expired(&policy.deadlines);
    if svc.serves_upgrades() {
        let conn = policy.http1.serve_connection(io, service).with_upgrades();
        drive(conn, drain, expired, &watch.started, draining).await
    } else {
        let conn = policy.http1.serve_connection(io, service);
        drive(conn, drain, expired, &watch.started, draining).await
    }
}

async fn serve_h2<I, S, B, D>(
    io: I,
    service: S,
    policy: &Policy,
    h2: &H2Limits,
    drain: D,
    draining: &AtomicBool,
) -> hyper::Result<()>
where
    I: Read + Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    D: Future<Output = ()>,
{
    let streams = Streams::default();
    let builder = policy.http2_builder(h2, streams.clone());
    let conn = builder.serve_connection(io, service);
    drive_h2(conn, &streams, drain, draining, &policy.timer, h2.idle).await
}

/// Most rounds of "poll the connection, then the streams it opened" in one
/// poll, so that one busy connection yields to the others.
const H2_ROUNDS: usize = 32;

/// Drives an HTTP/2 connection and its streams. A drain sends GOAWAY (the
/// open streams finish); so does `idle` without an open stream. When the
/// connection ends, streams still open are dropped (counted as client
/// disconnects by the response body's recorder).
async fn drive_h2<C, D>(
    conn: C,
    streams: &Streams<'_>,
    drain: D,
    draining: &AtomicBool,
    timer: &SharedTimer,
    idle: Duration,
) -> hyper::Result<()>
where
    C: Graceful,
    D: Future<Output = ()>,
{
    let mut conn = std::pin::pin!(conn);
    let mut drain = std::pin::pin!(drain);
    let mut open: FuturesUnordered<LocalBoxFuture<'_, ()>> = FuturesUnordered::new();
    let mut idle_since: Option<Pin<Box<dyn Sleep>>> = None;
    let mut closing = false;
    std::future::poll_fn(|cx| {
        for _ in 0..H2_ROUNDS {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            {
                let mut q = streams.0.borrow_mut();
                q.waker = Some(cx.waker().clone());
                open.extend(q.new.drain(..));
            }
            while let Poll::Ready(Some(())) = open.poll_next_unpin(cx) {}
            if streams.0.borrow().new.is_empty() {
                break;
            }
        }
        if !closing && drain.as_mut().poll(cx).is_ready() {
            closing = true;
            draining.store(true, Ordering::Relaxed);
            conn.as_mut().shutdown();
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if open.is_empty() && !closing {
            let sleep = idle_since.get_or_insert_with(|| timer.sleep(idle));
            if sleep.as_mut().poll(cx).is_ready() {
                closing = true;
                conn.as_mut().shutdown();
                cx.waker().wake_by_ref();
            }
        } else {
            idle_since = None;
        }
        Poll::Pending
    })
    .await
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
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::RawSettings;
    use tokio::io::AsyncWriteExt;

    fn config(pairs: &[(&str, &str)]) -> Config {
        let mut raw = RawSettings::default();
        for (k, v) in pairs {
            raw.set(k, v).unwrap();
        }
        Config::resolve(raw, None).unwrap()
    }

    fn protocols(http2: &str, worker_h2: bool) -> [Protocol; 3] {
        let p = policy(
            &config(&[("http2", http2)]),
            true,
            worker_h2,
            hyper_util::rt::TokioTimer::new(),
        );
        [
            p.protocol(Some(crate::tls::ALPN_H2)),
            p.protocol(Some(crate::tls::ALPN_HTTP1)),
            p.protocol(None),
        ]
    }

    #[test]
    fn the_protocol_follows_alpn_the_setting_and_the_worker_type() {
        use Protocol::{Http1, Http2, Sniff};
        assert_eq!(protocols("tls", true), [Http2, Http1, Http1]);
        assert_eq!(protocols("always", true), [Http2, Sniff, Sniff]);
        assert_eq!(protocols("off", true), [Http1, Http1, Http1]);
        assert_eq!(protocols("always", false), [Http1, Http1, Http1]);
        let p = policy(&config(&[]), true, true, hyper_util::rt::TokioTimer::new());
        assert!(p.offers_h2());
        assert_eq!(p.handshake_timeout(), Duration::from_secs(10));
    }

    /// Everything `io` yields until its end.
    async fn read_all<I: Read + Unpin>(mut io: I) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 7];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut chunk);
            std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, buf.unfilled()))
                .await
                .unwrap();
            if buf.filled().is_empty() {
                return out;
            }
            out.extend_from_slice(buf.filled());
        }
    }

    #[test]
    fn sniffing_finds_the_preface_and_hands_every_byte_on() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let h2 = [PREFACE, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00".as_slice()].concat();
            let cases: [(&[u8], bool); 4] = [
                (&h2, true),
                (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", false),
                (b"PRI * HTTP/1.1\r\n\r\n", false),
                (b"PR", false),
            ];
            for (sent, want) in cases {
                let (client, server) = tokio::io::duplex(64);
                let mut client = client;
                // Written in pieces, then closed.
                for piece in sent.chunks(5) {
                    client.write_all(piece).await.unwrap();
                }
                drop(client);
                let io = hyper_util::rt::TokioIo::new(server);
                let (h2, io) = sniff(io).await.unwrap();
                assert_eq!(h2, want, "{:?}", String::from_utf8_lossy(sent));
                assert_eq!(read_all(io).await, sent);
            }
        });
    }

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
