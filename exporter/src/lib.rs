//! The gpe exporter: serves `/metrics` (and `/healthz`, `/readyz`) from a store
//! directory. It runs as a supervised child of the master, or alone as a
//! sidecar (`gpe exporter --metrics-dir DIR`). It never talks to a worker:
//! everything comes from the store and `/proc`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod conns;
pub mod procstat;
pub mod render;
pub mod web_config;

use std::cell::Cell;
use std::io::Write as _;
use std::net::TcpListener;
use std::path::PathBuf;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use gpe_core::ExporterContext;
use gpe_core::LogTarget;
use gpe_core::{Snapshot, StoreDir};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::body::{Body as _, Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

pub use render::{render, Format};
pub use web_config::{AuthFailure, WebConfig, WebConfigError};

/// How long a connection may take to deliver a complete request head, and
/// how long an idle keep-alive connection stays open, by default.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the exporter keeps open at once by default.
pub const MAX_CONNECTIONS: usize = 64;

/// The largest request body the exporter reads; a larger one gets 413.
pub const MAX_BODY: u64 = 4096;

/// Bounds on the exporter's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time allowed for a complete request head, which is also how long an
    /// idle keep-alive connection stays open. On expiry the connection closes.
    pub header_timeout: Duration,
    /// Connections open at once. Further clients wait in the kernel backlog;
    /// one that waits at the cap gets in by the close of the connection that
    /// has been quiet longest.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            header_timeout: HEADER_TIMEOUT,
            max_connections: MAX_CONNECTIONS,
        }
    }
}

/// Who may read the exporter's endpoints.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// The exporter-toolkit web config file (`metrics_web_config`): TLS,
    /// client certificates, basic auth, extra headers. `None` serves plain
    /// HTTP to anyone.
    pub web_config: Option<PathBuf>,
    /// `/healthz` and `/readyz` answer without basic auth (`metrics_health_public`).
    pub health_public: bool,
}

/// Refusals counted per reason, for `gpe_exporter_auth_failures_total`.
#[derive(Debug, Default)]
struct Failures([Cell<u64>; AuthFailure::ALL.len()]);

impl Failures {
    fn count(&self, why: AuthFailure) {
        let c = &self.0[why as usize];
        c.set(c.get() + 1);
    }

    fn get(&self) -> [u64; AuthFailure::ALL.len()] {
        std::array::from_fn(|i| self.0[i].get())
    }
}

/// What every connection of one exporter shares.
struct Shared {
    store: StoreDir,
    /// Keeps the worker files mapped from one scrape to the next.
    reader: std::cell::RefCell<gpe_core::SnapshotReader>,
    /// The highest CPU seconds served per slot (see [`render::CpuFloor`]).
    cpu_floor: std::cell::RefCell<render::CpuFloor>,
    path: String,
    web: Option<web_config::Watched>,
    health_public: bool,
    auth: web_config::BasicAuth,
    failures: Failures,
}

fn reply(status: StatusCode, ctype: &'static str, body: Bytes) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn too_large() -> Response<Full<Bytes>> {
    let mut r = reply(
        StatusCode::PAYLOAD_TOO_LARGE,
        "text/plain",
        Bytes::from_static(b"request body too large\n"),
    );
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Answers one exporter request, reading at most [`MAX_BODY`] bytes of its
/// body first.
async fn respond(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let web = shared.web.as_ref().map(web_config::Watched::current);
    let Some(web) = web else {
        return read_and_answer(req, shared).await;
    };
    let public = shared.health_public && matches!(req.uri().path(), "/healthz" | "/readyz");
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let admitted = if public {
        Ok(())
    } else {
        shared.auth.check(&web, auth).await
    };
    let mut resp = match admitted {
        Err(why) => {
            shared.failures.count(why);
            let mut r = reply(
                StatusCode::UNAUTHORIZED,
                "text/plain",
                Bytes::from_static(b"Unauthorized\n"),
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic"));
            r
        }
        Ok(()) => read_and_answer(req, shared).await,
    };
    for (name, value) in web.headers() {
        resp.headers_mut().insert(name.clone(), value.clone());
    }
    resp
}

/// Reads the body of an admitted request (at most [`MAX_BODY`] bytes) and
/// answers it.
async fn read_and_answer(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.body().size_hint().lower() > MAX_BODY {
        return too_large();
    }
    let (head, body) = req.into_parts();
    if let Err(e) = Limited::new(body, MAX_BODY as usize).collect().await {
        if e.is::<LengthLimitError>() {
            return too_large();
        }
        let mut r = reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            Bytes::from_static(b"unreadable request body\n"),
        );
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    answer(&Request::from_parts(head, ()), shared)
}

/// `/readyz`: 200 while the master runs with every desired worker booted,
/// 503 while they boot, while it stops, or when the store cannot be read.
fn readyz(store: &StoreDir) -> Response<Full<Bytes>> {
    let (status, body) = match Snapshot::read(store).map(|s| s.master) {
        Ok(Some(m)) if m.ready => (StatusCode::OK, "ready\n".to_owned()),
        Ok(Some(m)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: {} of {} workers serving\n",
                m.workers, m.workers_desired
            ),
        ),
        Ok(None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no master has written the store\n".to_owned(),
        ),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("store unreadable: {e}\n"),
        ),
    };
    reply(status, "text/plain", Bytes::from(body))
}

/// Answers one exporter request whose body has been read.
fn answer(req: &Request<()>, shared: &Shared) -> Response<Full<Bytes>> {
    let (store, path) = (&shared.store, shared.path.as_str());
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            Bytes::from_static(b"method not allowed\n"),
        );
    }
    let uri_path = req.uri().path();
    if uri_path == "/healthz" {
        return match Snapshot::read(store) {
            Ok(_) => reply(StatusCode::OK, "text/plain", Bytes::from_static(b"ok\n")),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                Bytes::from(format!("store unreadable: {e}\n")),
            ),
        };
    }
    if uri_path == "/readyz" {
        return readyz(store);
    }
    if uri_path != path {
        return reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found\n"),
        );
    }
    let format = Format::from_accept(
        req.headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok()),
    );
    // A scrape never waits for another (none can be under way on this
    // thread): without the reader it maps the files afresh.
    let collected = match shared.reader.try_borrow_mut() {
        Ok(mut reader) => render::Scrape::collect_with(&mut reader),
        Err(_) => render::Scrape::collect(store),
    };
    let collected = collected.map(|mut s| {
        if let Ok(mut floor) = shared.cpu_floor.try_borrow_mut() {
            s.keep_cpu_monotonic(&mut floor);
        }
        s
    });
    let text = match collected.map(|s| render(s.with_auth_failures(shared.failures.get()), format))
    {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                Bytes::from(format!("encoding failed: {e}\n")),
            )
        }
        Err(e) => {
            return reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                Bytes::from(format!("store unreadable: {e}\n")),
            )
        }
    };
    let gzip = req
        .headers()
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|e| e.trim().starts_with("gzip")));
    let mut resp = if gzip {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let body = enc
            .write_all(text.as_bytes())
            .and_then(|()| enc.finish())
            .map(Bytes::from);
        match body {
            Ok(b) => {
                let mut r = reply(StatusCode::OK, format.content_type(), b);
                r.headers_mut()
                    .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                r
            }
            Err(_) => reply(StatusCode::OK, format.content_type(), Bytes::from(text)),
        }
    } else {
        reply(StatusCode::OK, format.content_type(), Bytes::from(text))
    };
    resp.headers_mut().insert(
        header::VARY,
        HeaderValue::from_static("Accept, Accept-Encoding"),
    );
    resp
}

/// Serves the store at `store` on `listener` within `limits` and `access`
/// until the process is killed. On USR1 the error log (if a file) is
/// reopened. The web config, if any, is read before anything is served and
/// again whenever it or a file it names changes.
///
/// # Errors
/// The web config is refused (the error names the field), the runtime
/// cannot start, or accepting fails with an error other than a transient one
/// or running out of file descriptors (which pauses accepting for
/// [`gpe_core::ACCEPT_BACKOFF`] and is logged once per episode).
pub fn serve(
    listener: TcpListener,
    store: StoreDir,
    path: String,
    errorlog: LogTarget,
    limits: Limits,
    access: Access,
) -> std::io::Result<()> {
    let web = match access.web_config {
        Some(file) => Some(
            web_config::Watched::load(file)
                .map_err(|e| std::io::Error::other(format!("setting `metrics_web_config`: {e}")))?,
        ),
        None => None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        // The master forks the exporter with USR1 blocked, so one sent before
        // the handler above existed is delivered now rather than killing it.
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGUSR1);
        set.thread_unblock().map_err(std::io::Error::from)?;
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                if let Err(e) = gpe_core::open_errorlog(&errorlog) {
                    gpe_core::log_error!("exporter: cannot reopen the error log: {e}");
                }
            }
        });
        let mut listener = gpe_core::TokioListener::new(listener, "exporter")?;
        let conns = conns::Conns::new(limits.max_connections);
        let shared = Rc::new(Shared {
            reader: std::cell::RefCell::new(gpe_core::SnapshotReader::new(store.clone())),
            cpu_floor: Default::default(),
            store,
            path,
            web,
            health_public: access.health_public,
            auth: web_config::BasicAuth::default(),
            failures: Failures::default(),
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let builder = Rc::new(builder);
        let e = conns::accept_loop(&mut listener, &conns, |stream, slot| {
            let shared = shared.clone();
            let builder = builder.clone();
            tokio::task::spawn_local(async move {
                let tls = shared.web.as_ref().and_then(|w| w.current().tls().cloned());
                match tls {
                    None => serve_conn(&builder, stream, shared, &slot).await,
                    Some(tls) => {
                        let accept = tokio_rustls::TlsAcceptor::from(tls).accept(stream);
                        // The handshake is part of the head: the same deadline.
                        let accepted = tokio::select! {
                            r = tokio::time::timeout(limits.header_timeout, accept) => r,
                            () = slot.close.notified() => return,
                        };
                        match accepted {
                            Ok(Ok(stream)) => serve_conn(&builder, stream, shared, &slot).await,
                            Ok(Err(e)) => shared.failures.count(AuthFailure::of_handshake(&e)),
                            Err(_elapsed) => shared.failures.count(AuthFailure::TlsHandshake),
                        }
                    }
                }
                drop(slot);
            });
        })
        .await;
        Err(e)
    })
}

/// Serves HTTP/1.1 on one accepted (and, under TLS, handshaken) connection
/// until it ends or its slot is asked to close.
async fn serve_conn<I>(
    builder: &hyper::server::conn::http1::Builder,
    io: I,
    shared: Rc<Shared>,
    slot: &conns::Slot,
) where
    I: AsyncRead + AsyncWrite + Unpin + 'static,
{
    let service = hyper::service::service_fn(|req| {
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(respond(req, &shared).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::select! {
        _ = conn => {}
        () = slot.close.notified() => {}
    }
}

/// The exporter process' entry point when forked by the master.
pub fn exporter_main(ctx: ExporterContext) -> i32 {
    match serve(
        ctx.listener,
        ctx.store,
        ctx.path,
        ctx.errorlog,
        Limits {
            header_timeout: ctx.header_timeout,
            max_connections: ctx.max_connections,
        },
        Access {
            web_config: ctx.web_config,
            health_public: ctx.health_public,
        },
    ) {
        Ok(()) => 0,
        Err(e) => {
            gpe_core::log_error!("exporter failed: {e}");
            1
        }
    }
}
