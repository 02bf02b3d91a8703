//! One connection: the one http/1 builder policy every worker uses, the
//! connection guard, and [`serve_io`], which serves a connection with hyper
//! until it closes (through an upgrade, if the app takes one).

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
use crate::store::{ErrorKind, Recorder};

/// Time a client has for the head of its request when keep-alive is off.
pub const HEADER_TIMEOUT_WITHOUT_KEEPALIVE: Duration = Duration::from_secs(2);

/// The http/1 builder of every worker type: the configured head limits;
/// keep-alive as configured unless `keep_alive` is false (the sync worker);
/// half-closed connections answered;
/// an idle keep-alive connection closes after `keepalive`, and a head must
/// arrive within `keepalive` (2 s without keep-alive). `timer` is the
/// runtime's hyper timer.
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
        .timer(timer)
        .header_read_timeout(if on {
            config.keepalive
        } else {
            HEADER_TIMEOUT_WITHOUT_KEEPALIVE
        });
    b
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
}

impl<I: Read + Unpin, H: Unpin> Read for Held<I, H> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
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
/// current request and closes (`Connection: close`). Errors hyper reports are
/// counted by kind.
pub async fn serve_io<I, H, R, D>(
    io: I,
    hold: H,
    peer: &str,
    svc: &Instrumented,
    builder: &http1::Builder,
    runner: &R,
    drain: D,
) where
    I: Read + Write + Unpin + Send + 'static,
    H: Unpin + Send + 'static,
    R: Runner,
    D: Future<Output = ()>,
{
    let io = Held {
        io,
        _hold: (hold, ConnectionGuard::new(svc.recorder().clone())),
    };
    // Atomics (not Cells) so that the connection future stays Send.
    let served = AtomicU64::new(0);
    let draining = AtomicBool::new(false);
    let (served, draining) = (&served, &draining);
    let service = hyper::service::service_fn(|req| async move {
        served.fetch_add(1, Ordering::Relaxed);
        let mut resp = svc.handle(req, peer, runner).await;
        if draining.load(Ordering::Relaxed) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok::<_, std::convert::Infallible>(resp)
    });
    let result = if svc.serves_upgrades() {
        let conn = builder.serve_connection(io, service).with_upgrades();
        drive(conn, drain, served, draining).await
    } else {
        let conn = builder.serve_connection(io, service);
        drive(conn, drain, served, draining).await
    };
    if let Err(e) = result {
        // A head that never arrived on a fresh connection is a timeout; an idle
        // keep-alive connection timing out after requests is normal.
        let kind = if e.is_timeout() {
            (served.load(Ordering::Relaxed) == 0).then_some(ErrorKind::Timeout)
        } else {
            classify(&e)
        };
        if let Some(kind) = kind {
            svc.recorder().error_without_request(kind);
        }
    }
}

async fn drive<C, D>(
    conn: C,
    drain: D,
    served: &AtomicU64,
    draining: &AtomicBool,
) -> hyper::Result<()>
where
    C: Graceful,
    D: Future<Output = ()>,
{
    let mut conn = std::pin::pin!(conn);
    let drain = std::pin::pin!(drain);
    match futures_util::future::select(conn.as_mut(), drain).await {
        futures_util::future::Either::Left((r, _)) => r,
        futures_util::future::Either::Right(((), _)) => {
            draining.store(true, Ordering::Relaxed);
            // A connection accepted but not yet read gets its first request
            // answered (with `Connection: close`) rather than a silent close;
            // one that already served requests closes once idle.
            if served.load(Ordering::Relaxed) > 0 {
                conn.as_mut().shutdown();
            }
            conn.await
        }
    }
}
