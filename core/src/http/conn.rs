//! One connection: the one builder policy every worker uses (http/1, and
//! HTTP/2 where the worker type and `http2` allow it), the connection guard,
//! and [`serve_io`], which serves a connection with hyper until it closes
//! (through an upgrade, if the app takes one). The head and idle deadlines of
//! http/1 are in [`deadline`](super::deadline), HTTP/2's streams and preface
//! in [`h2`](super::h2).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{header, HeaderValue};
use hyper::rt::{Read, ReadBufCursor, Timer, Write};
use hyper::server::conn::{http1, http2};

use super::deadline::{Deadlines, Expiry, Watch, Watched};
use super::h2::{serve_h2, sniff, SharedTimer, Streams};
use super::instrument::Instrumented;
use super::run::Runner;
use crate::config::Config;
use crate::store::{ErrorKind, Recorder};

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
    pub(super) timer: SharedTimer,
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
pub(super) struct H2Limits {
    /// `worker_connections`: a stream costs the worker what a connection does.
    max_concurrent_streams: u32,
    /// [`Config::max_head_bytes`]: the same bound on a request head.
    max_header_list_size: u32,
    /// `keepalive` (2 s when it is 0): a connection without an open stream
    /// for this long is closed with GOAWAY.
    pub(super) idle: Duration,
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

    pub(super) fn http2_builder<'a>(
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

impl<I, H> Held<I, H> {
    /// `io`, holding `hold` until it is dropped, reporting to `watch`.
    fn new(io: I, hold: H, watch: &Arc<Watch>) -> Held<I, H> {
        Held {
            io,
            _hold: hold,
            watch: watch.clone(),
        }
    }
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
    write_through_io!();
}

/// A hyper connection future that can be asked to finish gracefully.
pub(super) trait Graceful: Future<Output = hyper::Result<()>> {
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

/// The hyper service of one connection: counts the request for the
/// connection's deadline watch, runs it through [`Instrumented::handle`]
/// and, once the connection drains, asks an http/1 client to close. A macro
/// rather than a function: a function would return an opaque type whose
/// future hyper could not see as `Send`. The state it borrows is atomics
/// (not Cells) so that the http/1 connection future stays `Send`.
macro_rules! conn_service {
    ($svc:expr, $peer:expr, $runner:expr, $watch:expr, $draining:expr) => {{
        let (svc, peer, runner, w, draining) = ($svc, $peer, $runner, $watch, $draining);
        hyper::service::service_fn(
            move |req: hyper::Request<hyper::body::Incoming>| async move {
                w.started.fetch_add(1, Ordering::Relaxed);
                let watch = w.clone();
                let h1 = req.version() < http::Version::HTTP_2;
                let mut resp = svc.handle(req, peer, runner).await;
                if h1 && draining.load(Ordering::Relaxed) {
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                }
                Ok::<_, std::convert::Infallible>(resp.map(|body| Watched { body, watch }))
            },
        )
    }};
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
    let h2 = match (protocol, &policy.h2) {
        (Protocol::Http1, _) | (_, None) => {
            serve_http1(io, hold, peer, svc, policy, runner, drain).await;
            return;
        }
        (_, Some(h2)) => h2,
    };
    let guard = ConnectionGuard::new(svc.recorder().clone());
    let watch = Arc::new(Watch::new());
    let draining = AtomicBool::new(false);
    let (draining, w) = (&draining, &watch);
    let service = conn_service!(svc, peer, runner, w, draining);
    let result = if protocol == Protocol::Sniff {
        let sniffed = policy.timer.sleep(policy.deadlines.head);
        match futures_util::future::select(std::pin::pin!(sniff(io)), sniffed).await {
            futures_util::future::Either::Left((Ok((true, io)), _)) => {
                let io = Held::new(io, (hold, guard), &watch);
                serve_h2(io, service, policy, h2, drain, draining)
                    .await
                    .map_err(Ended::Hyper)
            }
            futures_util::future::Either::Left((Ok((false, io)), _)) => {
                let io = Held::new(io, (hold, guard), &watch);
                serve_h1(io, service, svc, policy, drain, &watch, draining).await
            }
            // The client went away, or said nothing in time.
            futures_util::future::Either::Left((Err(_), _)) => Ok(()),
            futures_util::future::Either::Right(_) => {
                svc.recorder().error_without_request(ErrorKind::Timeout);
                Ok(())
            }
        }
    } else {
        let io = Held::new(io, (hold, guard), &watch);
        serve_h2(io, service, policy, h2, drain, draining)
            .await
            .map_err(Ended::Hyper)
    };
    record_end(svc, result);
}

/// Serves one HTTP/1.x connection: what [`serve_io`] does for
/// [`Protocol::Http1`] (it calls this). Unlike [`serve_io`]'s, whose HTTP/2
/// streams run inside the connection's task on one thread, its future is
/// `Send` when `runner`'s is: the thread worker polls it on its pool threads.
pub async fn serve_http1<I, H, R, D>(
    io: I,
    hold: H,
    peer: &str,
    svc: &Instrumented,
    policy: &Policy,
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
    let draining = AtomicBool::new(false);
    let (draining, w) = (&draining, &watch);
    let service = conn_service!(svc, peer, runner, w, draining);
    let io = Held::new(io, (hold, guard), &watch);
    let result = serve_h1(io, service, svc, policy, drain, &watch, draining).await;
    record_end(svc, result);
}

/// Counts how a connection ended, if not cleanly.
fn record_end(svc: &Instrumented, result: Result<(), Ended>) {
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
}
