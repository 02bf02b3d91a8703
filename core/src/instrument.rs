//! The instrumentation layer every worker puts between hyper and the app: it
//! checks the request line and header fields (414, 431), reads the body (413
//! past `max_body_size`), calls the app through a
//! [`Runner`], catches panics (500, `kind="panic"`), records the request in the
//! store and writes the access log. Accepting connections is the worker's job.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{header, HeaderValue, Method, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;

use crate::app::{text, with_route, Reply, Request, Response, Route, SharedApp};
use crate::config::Config;
use crate::log::AccessLog;
use crate::store::{ErrorKind, Recorder, RequestRecord};

/// The response type handed back to hyper.
pub type HttpResponse = hyper::Response<Full<Bytes>>;

/// The app panicked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Panicked;

/// Runs the app for one request: on the current task ([`Inline`]) or elsewhere
/// (the thread worker's pool).
pub trait Runner {
    /// Calls `app` with `req`, catching panics.
    fn run(
        &self,
        app: &SharedApp,
        req: Request,
    ) -> impl Future<Output = Result<Response, Panicked>> + Send;
}

/// Calls the app on the current task.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inline;

impl Runner for Inline {
    fn run(
        &self,
        app: &SharedApp,
        req: Request,
    ) -> impl Future<Output = Result<Response, Panicked>> + Send {
        let reply = std::panic::catch_unwind(AssertUnwindSafe(|| app.call(req)));
        async move {
            match reply {
                Ok(Reply::Ready(r)) => Ok(r),
                Ok(Reply::Pending(fut)) => AssertUnwindSafe(fut)
                    .catch_unwind()
                    .await
                    .map_err(|_| Panicked),
                Err(_) => Err(Panicked),
            }
        }
    }
}

/// Calls the app to completion on the current thread, driving an async app's
/// future with a minimal executor. For threads that may block (sync worker,
/// thread-worker pool).
pub fn call_blocking(app: &SharedApp, req: Request) -> Result<Response, Panicked> {
    match std::panic::catch_unwind(AssertUnwindSafe(|| app.call(req))) {
        Ok(Reply::Ready(r)) => Ok(r),
        Ok(Reply::Pending(fut)) => {
            std::panic::catch_unwind(AssertUnwindSafe(|| futures_executor::block_on(fut)))
                .map_err(|_| Panicked)
        }
        Err(_) => Err(Panicked),
    }
}

/// The method label: standard methods by name, anything else `other`.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        Method::CONNECT => "CONNECT",
        Method::TRACE => "TRACE",
        _ => "other",
    }
}

/// The per-line limits of a request head (`limit_request_line`,
/// `limit_request_field_size`). hyper caps only the whole head
/// ([`Config::max_head_bytes`]), so gpe checks each line once hyper has
/// parsed it, before the body is read or the app is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Longest request line (`METHOD SP target SP HTTP/x.y`), without CRLF.
    pub line: usize,
    /// Longest header field (`name: value`), without CRLF.
    pub field: usize,
}

impl HeadLimits {
    /// The limits set by `config`.
    pub fn from_config(config: &Config) -> HeadLimits {
        HeadLimits {
            line: config.limit_request_line,
            field: config.limit_request_field_size,
        }
    }

    /// `414 URI Too Long` for a request line over the limit, `431 Request
    /// Header Fields Too Large` for a header field over it, else `None`.
    pub fn check(&self, parts: &http::request::Parts) -> Option<StatusCode> {
        let uri = &parts.uri;
        let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        // Two spaces and "HTTP/1.1".
        if parts.method.as_str().len() + target + 10 > self.line {
            return Some(StatusCode::URI_TOO_LONG);
        }
        // "name: value".
        let too_large = |(name, value): (&header::HeaderName, &HeaderValue)| {
            name.as_str().len() + 2 + value.len() > self.field
        };
        parts
            .headers
            .iter()
            .any(too_large)
            .then_some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    }
}

/// An app wrapped with metrics, limits and the access log.
#[derive(Debug)]
pub struct Instrumented {
    app: SharedApp,
    recorder: Arc<Recorder>,
    access: Option<AccessLog>,
    limits: HeadLimits,
    max_body: u64,
    max_requests: Option<u64>,
    retire: tokio::sync::Notify,
}

impl Instrumented {
    /// Wraps `app`.
    pub fn new(
        app: SharedApp,
        recorder: Arc<Recorder>,
        access: Option<AccessLog>,
        limits: HeadLimits,
        max_body: u64,
        max_requests: Option<u64>,
    ) -> Instrumented {
        Instrumented {
            app,
            recorder,
            access,
            limits,
            max_body,
            max_requests,
            retire: tokio::sync::Notify::new(),
        }
    }

    /// Whether this process has served its share of requests (`max_requests`).
    pub fn retiring(&self) -> bool {
        self.max_requests
            .is_some_and(|limit| self.recorder.requests() >= limit)
    }

    /// Completes once the request that reached `max_requests` has finished
    /// (at once if it already has). Works on any executor.
    pub async fn retire_requested(&self) {
        if self.retiring() {
            return;
        }
        self.retire.notified().await;
    }

    /// The worker's recorder.
    pub fn recorder(&self) -> &Arc<Recorder> {
        &self.recorder
    }

    /// The app.
    pub fn app(&self) -> &SharedApp {
        &self.app
    }

    /// The access log, if any.
    pub fn access_log(&self) -> Option<&AccessLog> {
        self.access.as_ref()
    }

    /// Serves one request from hyper. `peer` is the client address for the
    /// access log.
    pub async fn handle<R: Runner>(
        &self,
        req: hyper::Request<Incoming>,
        peer: &str,
        runner: &R,
    ) -> HttpResponse {
        let start = self.recorder.begin();
        let (parts, body) = req.into_parts();
        let method = method_label(&parts.method);
        // If hyper drops this future (the client went away mid-request), the
        // guard still ends the request's in-flight accounting.
        let mut pending = Abandoned {
            recorder: &self.recorder,
            start,
            method,
            uri: Some(parts.uri.clone()),
        };
        let uri = parts.uri.clone();
        let version = parts.version;
        let too_long = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > self.max_body);
        let over_limit = self.limits.check(&parts);
        let body = if let Some(status) = over_limit {
            Err((status, ErrorKind::BadRequest))
        } else if too_long {
            Err((StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::BadRequest))
        } else {
            match Limited::new(body, self.max_body.min(usize::MAX as u64) as usize)
                .collect()
                .await
            {
                Ok(c) => Ok(c.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                    Err((StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::BadRequest))
                }
                // The body stopped arriving: the client went away or broke framing.
                Err(_) => Err((StatusCode::BAD_REQUEST, ErrorKind::ClientDisconnect)),
            }
        };
        let (resp, request_bytes, error) = match body {
            Err((status, kind)) => {
                let resp = text(status, status.canonical_reason().unwrap_or(""));
                // An oversized line's path is no label: count it as `unknown`.
                let resp = match over_limit {
                    Some(_) => with_route(resp, "unknown"),
                    None => resp,
                };
                (resp, 0, Some(kind))
            }
            Ok(body) => {
                let n = body.len() as u64;
                let req = Request::from_parts(parts, body);
                match runner.run(&self.app, req).await {
                    Ok(resp) => {
                        let err = resp
                            .status()
                            .is_server_error()
                            .then_some(ErrorKind::AppError);
                        (resp, n, err)
                    }
                    Err(Panicked) => (
                        text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error\n"),
                        n,
                        Some(ErrorKind::Panic),
                    ),
                }
            }
        };
        let route = resp
            .extensions()
            .get::<Route>()
            .map_or_else(|| uri.path(), |r| r.0);
        let status = resp.status();
        let response_bytes = resp.body().len() as u64;
        pending.uri = None;
        self.recorder.finish(
            start,
            &RequestRecord {
                method,
                route,
                status: status.as_u16(),
                request_bytes,
                response_bytes,
                error,
            },
        );
        if let Some(log) = &self.access {
            // A line rejected for its length is not copied whole into the log.
            let long = over_limit.map(|_| uri.to_string());
            let cut = long.as_deref().map(|u| truncate(u, LOGGED_URI_MAX));
            let uri: &dyn std::fmt::Display = match &cut {
                Some(cut) => cut,
                None => &uri,
            };
            log.write(format_args!(
                "{peer} - - [{}] \"{} {} {:?}\" {} {}",
                httpdate::fmt_http_date(std::time::SystemTime::now()),
                method,
                uri,
                version,
                status.as_u16(),
                response_bytes,
            ));
        }
        let mut resp = resp.map(Full::new);
        resp.headers_mut()
            .entry(header::SERVER)
            .or_insert(HeaderValue::from_static("gpe"));
        if over_limit.is_some() {
            // Like Gunicorn: a client that breaks the head limits is not kept.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.retiring() {
            // The last request of a recycling worker: close politely.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            self.retire.notify_one();
        }
        resp
    }
}

/// Longest request target the access log copies from a request rejected by
/// [`HeadLimits`].
const LOGGED_URI_MAX: usize = 256;

/// `s` cut to at most `max` bytes, at a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Ends the accounting of a request whose handler was dropped before it
/// answered (counted as `client_disconnect`).
struct Abandoned<'a> {
    recorder: &'a Recorder,
    start: u64,
    method: &'static str,
    /// `Some` until the request is answered.
    uri: Option<http::Uri>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(uri) = self.uri.take() {
            self.recorder.abandon(self.start, self.method, uri.path());
        }
    }
}

/// An http/1 connection builder with the configured limits. `keep_alive` off
/// makes every response carry `Connection: close`.
pub fn http1_builder(config: &Config, keep_alive: bool) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.keep_alive(keep_alive)
        .max_buf_size(config.max_head_bytes())
        .max_headers(config.limit_request_fields)
        .half_close(false);
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

/// Serves one connection with hyper until it closes, counting it as open while
/// it lives. When `drain` completes first, the connection finishes its current
/// request and closes (`Connection: close`). Errors hyper reports are counted
/// by kind.
pub async fn serve_io<I, R, D>(
    io: I,
    peer: &str,
    svc: &Arc<Instrumented>,
    builder: &http1::Builder,
    runner: &R,
    drain: D,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    R: Runner,
    D: Future<Output = ()>,
{
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let _guard = ConnectionGuard::new(svc.recorder().clone());
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
    let conn = builder.serve_connection(io, service);
    futures_util::pin_mut!(conn);
    futures_util::pin_mut!(drain);
    let result = match futures_util::future::select(conn.as_mut(), drain).await {
        futures_util::future::Either::Left((r, _)) => r,
        futures_util::future::Either::Right(((), _)) => {
            draining.store(true, Ordering::Relaxed);
            // A connection accepted but not yet read gets its first request
            // answered (with `Connection: close`) rather than a silent close;
            // one that already served requests closes once idle.
            if served.load(Ordering::Relaxed) > 0 {
                conn.as_mut().graceful_shutdown();
            }
            conn.await
        }
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

/// Serves an accepted [`Stream`](crate::listener::Stream) on the current tokio
/// runtime (see [`serve_io`]).
///
/// # Errors
/// The stream cannot be registered with the runtime.
pub async fn serve_tokio<R, D>(
    stream: crate::listener::Stream,
    peer: &str,
    svc: &Arc<Instrumented>,
    builder: &http1::Builder,
    runner: &R,
    drain: D,
) -> std::io::Result<()>
where
    R: Runner,
    D: Future<Output = ()>,
{
    use hyper_util::rt::TokioIo;
    stream.set_nonblocking(true)?;
    match stream {
        crate::listener::Stream::Tcp(s) => {
            let io = TokioIo::new(tokio::net::TcpStream::from_std(s)?);
            serve_io(io, peer, svc, builder, runner, drain).await;
        }
        crate::listener::Stream::Unix(s) => {
            let io = TokioIo::new(tokio::net::UnixStream::from_std(s)?);
            serve_io(io, peer, svc, builder, runner, drain).await;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    const LIMITS: HeadLimits = HeadLimits {
        line: 100,
        field: 50,
    };

    #[test]
    fn the_request_line_limit_counts_method_target_and_version() {
        // "GET " + target + " HTTP/1.1" is 13 bytes plus the target.
        let at = format!("/{}", "a".repeat(100 - 13 - 1));
        assert_eq!(LIMITS.check(&parts("GET", &at, &[])), None);
        let over = format!("{at}a");
        assert_eq!(
            LIMITS.check(&parts("GET", &over, &[])),
            Some(StatusCode::URI_TOO_LONG)
        );
        // The query counts; so do scheme and authority in absolute form.
        let with_query = format!("/?{}", "q".repeat(100 - 13 - 1));
        assert_eq!(
            LIMITS.check(&parts("GET", &with_query, &[])),
            Some(StatusCode::URI_TOO_LONG)
        );
        let absolute = format!("http://example.com/{}", "a".repeat(100 - 13 - 19));
        assert_eq!(LIMITS.check(&parts("GET", &absolute, &[])), None);
        let absolute = format!("{absolute}a");
        assert_eq!(
            LIMITS.check(&parts("GET", &absolute, &[])),
            Some(StatusCode::URI_TOO_LONG)
        );
    }

    #[test]
    fn other_request_target_forms_count_as_sent() {
        // CONNECT host:port (authority-form) and OPTIONS * (asterisk-form).
        let authority = format!("{}.example:443", "h".repeat(100 - 17 - 12));
        assert_eq!(LIMITS.check(&parts("CONNECT", &authority, &[])), None);
        assert_eq!(
            LIMITS.check(&parts("CONNECT", &format!("h{authority}"), &[])),
            Some(StatusCode::URI_TOO_LONG)
        );
        assert_eq!(LIMITS.check(&parts("OPTIONS", "*", &[])), None);
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a", "é is two bytes");
    }

    #[test]
    fn the_field_limit_counts_name_separator_and_value() {
        // "x-a: " is 5 bytes.
        let at = "v".repeat(50 - 5);
        assert_eq!(LIMITS.check(&parts("GET", "/", &[("x-a", &at)])), None);
        let over = format!("{at}v");
        assert_eq!(
            LIMITS.check(&parts("GET", "/", &[("host", "h"), ("x-a", &over)])),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        // The request line is checked first.
        let long = format!("/{}", "a".repeat(100));
        assert_eq!(
            LIMITS.check(&parts("GET", &long, &[("x-a", &over)])),
            Some(StatusCode::URI_TOO_LONG)
        );
    }
}
