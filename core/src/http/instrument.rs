//! One request: the layer every worker puts between hyper and the app. It
//! checks the head (414, 431, and 413 for a declared body over
//! `max_body_size`), hands the service a streaming [`Body`], calls the app
//! through a [`Runner`], catches panics (500, `kind="panic"`), and records
//! the request in the store once its response body has been written (or the
//! client left mid-body: `client_disconnect`), then writes the access log.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use http::{header, HeaderValue, Method, StatusCode};
use hyper::body::Incoming;

use super::app::{full, text, BoxError, Route, SharedApp};
use super::body::{Body, BodyState, OnEnd, Recorded};
use super::head::HeadScan;
use super::limits::HeadLimits;
use super::run::{Failure, Runner};
use crate::log::AccessLog;
use crate::store::{ErrorKind, Recorder, RequestRecord, Tracked};

/// The response type handed back to hyper.
pub(crate) type HttpResponse = hyper::Response<Recorded<Finish>>;

/// The `route` label of a response that names no route template.
#[derive(Debug, Clone)]
pub enum Unmatched {
    /// One fixed label (the `unmatched_route` setting, `unmatched` by default).
    Label(&'static str),
    /// The request path (`unmatched_route = "path"`).
    Path,
}

impl Unmatched {
    /// The policy the `unmatched_route` setting names.
    pub fn from_setting(value: &str) -> Unmatched {
        match value {
            "path" => Unmatched::Path,
            // Once per worker process; the label lives as long as the process.
            other => Unmatched::Label(Box::leak(other.to_owned().into_boxed_str())),
        }
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

/// What [`Instrumented`] is built from.
#[derive(Debug)]
pub struct Settings {
    /// Per-line head limits.
    pub limits: HeadLimits,
    /// `max_body_size`.
    pub max_body: u64,
    /// This process's share of requests, if recycled.
    pub max_requests: Option<u64>,
    /// The label of responses without a route.
    pub unmatched: Unmatched,
    /// Whether HTTP/1.1 upgrades (WebSocket) are served; otherwise a request
    /// for one is answered 501.
    pub upgrades: bool,
}

/// An app wrapped with metrics, limits and the access log.
#[derive(Debug)]
pub struct Instrumented {
    app: SharedApp,
    recorder: Arc<Recorder>,
    access: Option<Arc<AccessLog>>,
    settings: Settings,
    handled: AtomicU64,
    retire: tokio::sync::Notify,
}

impl Instrumented {
    /// Wraps `app`.
    pub fn new(
        app: SharedApp,
        recorder: Arc<Recorder>,
        access: Option<AccessLog>,
        settings: Settings,
    ) -> Instrumented {
        Instrumented {
            app,
            recorder,
            access: access.map(Arc::new),
            settings,
            handled: AtomicU64::new(0),
            retire: tokio::sync::Notify::new(),
        }
    }

    /// Whether this process has taken its share of requests (`max_requests`).
    pub fn retiring(&self) -> bool {
        self.settings
            .max_requests
            .is_some_and(|limit| self.handled.load(Ordering::Relaxed) >= limit)
    }

    /// Completes once the request that reached `max_requests` has been
    /// answered (at once if it already has). Works on any executor.
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
        self.access.as_deref()
    }

    /// Whether a request for `Upgrade` reaches the app.
    pub fn serves_upgrades(&self) -> bool {
        self.settings.upgrades
    }

    /// Serves one request from hyper. `peer` is the client address for the
    /// access log.
    pub(crate) async fn handle<R: Runner>(
        &self,
        req: hyper::Request<Incoming>,
        peer: &str,
        runner: &R,
    ) -> HttpResponse {
        let start = self.recorder.begin();
        let (parts, incoming) = req.into_parts();
        let method = method_label(&parts.method);
        // Named in the worker's file while in flight, for the master's log
        // if it aborts this worker.
        let tracked = self.recorder.track(start, method, parts.uri.path());
        // The W3C trace id becomes the exemplar of the request's duration
        // bucket (parsed in place: no allocation).
        let scan = HeadScan::of(&parts.headers);
        let trace = scan
            .traceparent
            .and_then(|v| crate::store::trace_id_of(v.as_bytes()));
        let uri = parts.uri.clone();
        // If hyper drops this future (the client went away mid-request), the
        // guard still ends the request's in-flight accounting.
        let mut pending = Abandoned {
            recorder: &self.recorder,
            unmatched: &self.settings.unmatched,
            start,
            method,
            uri: Some(&uri),
            tracked: Some(tracked),
        };
        let head_only = parts.method == Method::HEAD;
        let connect = parts.method == Method::CONNECT;
        let version = parts.version;
        let declared_too_long = scan
            .content_length
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|n| n > self.settings.max_body);
        let over_limit = self.settings.limits.check_scanned(&parts, &scan);
        // A tunnel (CONNECT) is an upgrade too: only a worker that serves
        // upgrades hands it to the app.
        let wants_upgrade =
            !self.settings.upgrades && (scan.upgrade || parts.method == Method::CONNECT);
        // Refused before the body is read: the connection cannot be reused.
        let framing = if !host_is_valid(&parts, &scan) || !framing_is_valid(&parts) {
            Some(StatusCode::BAD_REQUEST)
        } else if scan.chunked > 1 {
            // `chunked` applied more than once: nginx answers 501; hyper
            // refuses only a coding after `chunked`.
            Some(StatusCode::NOT_IMPLEMENTED)
        } else {
            None
        };
        let mut state = None;
        let refused = if let Some(status) = over_limit {
            // An oversized line's path is no label: count it as `unknown`.
            Some((status, ErrorKind::BadRequest, Some(Route::new("unknown"))))
        } else if let Some(status) = framing {
            Some((status, ErrorKind::BadRequest, None))
        } else if declared_too_long {
            Some((StatusCode::PAYLOAD_TOO_LARGE, ErrorKind::BadRequest, None))
        } else if wants_upgrade {
            Some((StatusCode::NOT_IMPLEMENTED, ErrorKind::BadRequest, None))
        } else {
            None
        };
        let outcome = match refused {
            Some((status, kind, route)) => {
                let mut resp = full(text(status, status.canonical_reason().unwrap_or("")));
                if let Some(route) = route {
                    resp.extensions_mut().insert(route);
                }
                Ok((resp, Some(kind)))
            }
            None => {
                let body = if http_body::Body::is_end_stream(&incoming) {
                    Body::empty()
                } else {
                    let s = Arc::new(BodyState::default());
                    state = Some(s.clone());
                    Body::incoming(incoming, self.settings.max_body, s)
                };
                let req = http::Request::from_parts(parts, body);
                match runner.run(&self.app, req).await {
                    Ok(resp) => {
                        let err = resp
                            .status()
                            .is_server_error()
                            .then_some(ErrorKind::AppError);
                        Ok((resp, err))
                    }
                    Err(failure) => Err(failure),
                }
            }
        };
        let (mut resp, mut error) = match outcome {
            Ok(pair) => pair,
            Err(failure) => {
                let kind = match &failure {
                    Failure::Panicked => ErrorKind::Panic,
                    Failure::Error(e) => {
                        log_app_error(e);
                        ErrorKind::AppError
                    }
                };
                let resp = text(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error\n");
                (full(resp), Some(kind))
            }
        };
        let overflowed = state
            .as_ref()
            .is_some_and(|s| s.overflowed() || s.malformed());
        if overflowed {
            error = Some(ErrorKind::BadRequest);
        } else if state.as_ref().is_some_and(|s| s.cut()) {
            error = Some(ErrorKind::ClientDisconnect);
        }
        let route = match resp.extensions_mut().remove::<Route>() {
            Some(r) => r,
            None => match self.settings.unmatched {
                Unmatched::Label(l) => Route::new(l),
                Unmatched::Path => Route::owned(uri.path().to_owned()),
            },
        };
        let status = resp.status();
        let headers = resp.headers_mut();
        headers
            .entry(header::SERVER)
            .or_insert(HeaderValue::from_static("gpe"));
        if over_limit.is_some() || framing.is_some() || overflowed || declared_too_long {
            // Like Gunicorn: a client that breaks the limits is not kept.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        self.handled.fetch_add(1, Ordering::Relaxed);
        if self.retiring() {
            // The last request of a recycling worker: close politely.
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
            self.retire.notify_one();
        }
        let log = self.access.as_ref().map(|log| {
            // A line rejected for its length is not copied whole into the log.
            let target = uri.to_string();
            let target = match over_limit {
                Some(_) => truncate(&target, LOGGED_URI_MAX).to_owned(),
                None => target,
            };
            Box::new(LogLine {
                log: log.clone(),
                line: format!("{peer} - - [{{time}}] \"{method} {target} {version:?}\""),
            })
        });
        pending.uri = None;
        let tracked = pending.tracked.take();
        // A 2xx to CONNECT turns the connection into a tunnel: hyper sends
        // no content (RFC 9110 §9.3.6).
        let no_body = head_only
            || (connect && status.is_success())
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let finish = Finish {
            recorder: self.recorder.clone(),
            start,
            trace,
            method,
            route,
            status: status.as_u16(),
            error,
            state,
            log,
            _tracked: tracked,
        };
        resp.map(|body| Recorded::new(body, finish, no_body))
    }
}

/// Whether the request's Host is as RFC 9112 §3.2 requires: never more than
/// one Host line; an HTTP/1.1 request without a target authority (absolute-
/// or authority-form, which takes precedence) carries exactly one, with a
/// valid value (empty, or `host[:port]` without userinfo). HTTP/1.0 may omit it.
fn host_is_valid(parts: &http::request::Parts, scan: &HeadScan<'_>) -> bool {
    if scan.hosts > 1 {
        return false;
    }
    if parts.uri.authority().is_some() {
        return true;
    }
    match scan.host {
        Some(v) => valid_host_value(v.as_bytes()),
        None => parts.version < http::Version::HTTP_11,
    }
}

/// Whether a CONNECT's target is in authority-form, the only form RFC 9112
/// §3.2.3 allows it (hyper takes any form).
fn framing_is_valid(parts: &http::request::Parts) -> bool {
    parts.method != Method::CONNECT
        || (parts.uri.scheme().is_none() && parts.uri.authority().is_some())
}

/// `uri-host [ ":" port ]` (RFC 9110 §7.2), or empty.
fn valid_host_value(v: &[u8]) -> bool {
    v.is_empty() || plain_host(v) || parsed_host(v)
}

/// The common shape of a Host value, checked without parsing: a name of
/// letters, digits, `-` and `.`, and at most five digits of port. Every
/// value it takes [`parsed_host`] takes too (a test checks it); anything
/// else is left to that parse, which costs more than the rest of the
/// request's checks together.
fn plain_host(v: &[u8]) -> bool {
    let (host, port) = match v.iter().position(|&b| b == b':') {
        Some(i) => (&v[..i], Some(&v[i + 1..])),
        None => (v, None),
    };
    !host.is_empty()
        && host
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && port.is_none_or(|p| (1..=5).contains(&p.len()) && p.iter().all(u8::is_ascii_digit))
}

/// [`valid_host_value`] by the `http` crate's authority parser.
fn parsed_host(v: &[u8]) -> bool {
    !v.is_empty()
        && (!v.contains(&b'@')
            && std::str::from_utf8(v).ok().is_some_and(|s| {
                s.parse::<http::uri::Authority>().is_ok_and(|a| {
                    // Only digits after the host (the host may be `[v6]`).
                    s.strip_prefix(a.host()).is_some_and(|rest| {
                        rest.is_empty()
                            || rest
                                .strip_prefix(':')
                                .is_some_and(|p| p.bytes().all(|b| b.is_ascii_digit()))
                    })
                })
            }))
}

fn log_app_error(e: &BoxError) {
    crate::log_error!("the app returned an error: {e}");
}

/// Records a request once its response body has ended.
#[derive(Debug)]
pub(crate) struct Finish {
    recorder: Arc<Recorder>,
    start: u64,
    trace: Option<u128>,
    method: &'static str,
    route: Route,
    status: u16,
    error: Option<ErrorKind>,
    state: Option<Arc<BodyState>>,
    log: Option<Box<LogLine>>,
    /// The request's in-flight entry, freed when the response ends.
    _tracked: Option<Tracked>,
}

/// An access-log line waiting for its byte count.
#[derive(Debug)]
struct LogLine {
    log: Arc<AccessLog>,
    /// The line up to the status, with `{time}` for the time of the end.
    line: String,
}

impl OnEnd for Finish {
    fn ended(self, written: u64, complete: bool) {
        let request_bytes = self.state.as_ref().map_or(0, |s| s.read());
        let overflowed = self.state.as_ref().is_some_and(|s| s.overflowed());
        let malformed = self.state.as_ref().is_some_and(|s| s.malformed());
        // A body with bad framing is the client's error even though the
        // connection then breaks under the response.
        let error = if malformed {
            Some(ErrorKind::BadRequest)
        } else if !complete {
            Some(ErrorKind::ClientDisconnect)
        } else if overflowed {
            Some(ErrorKind::BadRequest)
        } else {
            self.error
        };
        self.recorder.finish(
            self.start,
            &RequestRecord {
                method: self.method,
                route: self.route.as_str(),
                status: self.status,
                request_bytes,
                response_bytes: written,
                error,
                trace: self.trace,
            },
        );
        if let Some(l) = self.log {
            let time = httpdate::fmt_http_date(std::time::SystemTime::now());
            let line = l.line.replacen("{time}", &time, 1);
            l.log
                .write(format_args!("{line} {} {written}", self.status));
        }
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
    unmatched: &'a Unmatched,
    start: u64,
    method: &'static str,
    /// `Some` until the request is answered.
    uri: Option<&'a http::Uri>,
    /// The in-flight entry, handed to [`Finish`] once answered.
    tracked: Option<Tracked>,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if let Some(uri) = self.uri.take() {
            let route = match self.unmatched {
                Unmatched::Label(l) => l,
                Unmatched::Path => uri.path(),
            };
            self.recorder.abandon(self.start, self.method, route);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(version: http::Version, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().version(version).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    proptest::proptest! {
        /// The quick check of a Host value never takes one the parse refuses.
        #[test]
        fn plain_hosts_are_hosts_the_parser_takes(v in "[a-zA-Z0-9.:@\\[\\]_~%-]{0,12}") {
            if plain_host(v.as_bytes()) {
                proptest::prop_assert!(parsed_host(v.as_bytes()), "{v:?}");
            }
        }
    }

    #[test]
    fn plain_host_takes_the_common_shapes_only() {
        for v in [
            "localhost",
            "a.example",
            "a.example:8080",
            "127.0.0.1:18000",
            "x-1:1",
        ] {
            assert!(plain_host(v.as_bytes()), "{v}");
        }
        for v in [
            "", ":80", "a:", "a:123456", "[::1]:80", "u@a", "a b", "a:80:80", "a_b",
        ] {
            assert!(!plain_host(v.as_bytes()), "{v}");
        }
    }

    #[test]
    fn host_rules_follow_rfc_9112() {
        use http::Version;
        let ok = |v, uri, h: &[(&str, &str)]| {
            let p = parts(v, uri, h);
            host_is_valid(&p, &HeadScan::of(&p.headers))
        };
        assert!(ok(Version::HTTP_11, "/", &[("host", "a.example")]));
        assert!(ok(Version::HTTP_11, "/", &[("host", "a.example:8080")]));
        assert!(ok(Version::HTTP_11, "/", &[("host", "[::1]:80")]));
        assert!(ok(Version::HTTP_11, "/", &[("host", "")]));
        assert!(!ok(Version::HTTP_11, "/", &[]), "HTTP/1.1 needs a Host");
        assert!(!ok(Version::HTTP_11, "/", &[("host", "a"), ("host", "a")]));
        assert!(!ok(Version::HTTP_11, "/", &[("host", "u@a.example")]));
        assert!(!ok(Version::HTTP_11, "/", &[("host", "a.example:port")]));
        assert!(!ok(Version::HTTP_11, "/", &[("host", "a b")]));
        // Absolute-form: the target's authority wins; two Host lines never pass.
        assert!(ok(Version::HTTP_11, "http://a.example/", &[]));
        assert!(ok(
            Version::HTTP_11,
            "http://a.example/",
            &[("host", "b:x")]
        ));
        assert!(!ok(
            Version::HTTP_11,
            "http://a.example/",
            &[("host", "a"), ("host", "b")]
        ));
        assert!(ok(Version::HTTP_10, "/", &[]), "HTTP/1.0 may omit Host");
        assert!(!ok(Version::HTTP_10, "/", &[("host", "a b")]));
    }

    #[test]
    fn a_connect_target_is_in_authority_form() {
        let ok = |m: &str, uri, h: &[(&str, &str)]| {
            let mut p = parts(http::Version::HTTP_11, uri, h);
            p.method = m.parse().unwrap();
            framing_is_valid(&p)
        };
        assert!(ok("GET", "/", &[]));
        assert!(ok("CONNECT", "a.example:443", &[]));
        assert!(!ok("CONNECT", "/", &[]));
        assert!(!ok("CONNECT", "http://a.example/", &[]));
    }

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a", "é is two bytes");
    }
}
