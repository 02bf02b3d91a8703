//! The gpe exporter: serves `/metrics` (and `/healthz`) from a store
//! directory. It runs as a supervised child of the master, or alone as a
//! sidecar (`gpe exporter --metrics-dir DIR`). It never talks to a worker:
//! everything comes from the store and `/proc`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod procstat;
pub mod render;

use std::io::Write as _;
use std::net::TcpListener;
use std::sync::Arc;

use bytes::Bytes;
use gpe_core::config::LogTarget;
use gpe_core::store::{Snapshot, StoreDir};
use gpe_core::ExporterContext;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

pub use render::{render, Format};

/// Answers one exporter request.
fn answer(req: &Request<Incoming>, store: &StoreDir, path: &str) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, ctype: &'static str, body: Bytes| {
        let mut r = Response::new(Full::new(body));
        *r.status_mut() = status;
        r.headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
        r
    };
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
    let text = match render::Scrape::collect(store).map(|s| render(s, format)) {
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

/// Serves the store at `store` on `listener` until the process is killed. On
/// USR1 the error log (if a file) is reopened.
///
/// # Errors
/// The runtime cannot start or the listener fails.
pub fn serve(
    listener: TcpListener,
    store: StoreDir,
    path: String,
    errorlog: LogTarget,
) -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        // The master forks the exporter with USR1 blocked, so one sent before
        // the handler above existed is delivered now rather than killing it.
        let mut set = nix::sys::signal::SigSet::empty();
        set.add(nix::sys::signal::Signal::SIGUSR1);
        set.thread_unblock().map_err(std::io::Error::from)?;
        tokio::spawn(async move {
            while usr1.recv().await.is_some() {
                if let Err(e) = gpe_core::log::open_errorlog(&errorlog) {
                    gpe_core::log_error!("exporter: cannot reopen the error log: {e}");
                }
            }
        });
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let shared = Arc::new((store, path));
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => continue,
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req| {
                    let shared = shared.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(answer(&req, &shared.0, &shared.1))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

/// The exporter process' entry point when forked by the master.
pub fn exporter_main(ctx: ExporterContext) -> i32 {
    match serve(ctx.listener, ctx.store, ctx.path, ctx.errorlog) {
        Ok(()) => 0,
        Err(e) => {
            gpe_core::log_error!("exporter failed: {e}");
            1
        }
    }
}
