//! The benchmark ceiling: a bare tokio + hyper HTTP/1.1 hello-world server,
//! with no master, no worker processes and no metrics. It answers every
//! request with `Hello, World!` and the same headers as gpe's `hello` app.
//!
//! ```text
//! gpe-bench-ceiling [--bind ADDR] [--threads N] [--close] [--tls CERT KEY]
//! ```
//!
//! `--threads N`: worker threads of the tokio runtime (1 = current-thread
//! runtime; default 2). `--close`: answer `Connection: close` and close every
//! connection after one response (to compare with gpe's sync worker).
//! `--tls CERT KEY`: serve HTTPS with tokio-rustls (ring provider, ALPN
//! `http/1.1`), the ceiling of gpe's HTTPS rows.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE, SERVER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;

struct Opts {
    bind: SocketAddr,
    threads: usize,
    close: bool,
    tls: Option<(PathBuf, PathBuf)>,
}

fn parse() -> Result<Opts, String> {
    let mut opts = Opts {
        bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
        threads: 2,
        close: false,
        tls: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bind" => {
                let v = args.next().ok_or("--bind needs HOST:PORT")?;
                opts.bind = v.parse().map_err(|e| format!("--bind {v}: {e}"))?;
            }
            "--threads" => {
                let v = args.next().ok_or("--threads needs N")?;
                opts.threads = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or(format!("--threads {v}: expected an integer >= 1"))?;
            }
            "--close" => opts.close = true,
            "--tls" => {
                let cert = args.next().ok_or("--tls needs CERT KEY")?;
                let key = args.next().ok_or("--tls needs CERT KEY")?;
                opts.tls = Some((cert.into(), key.into()));
            }
            "-h" | "--help" => {
                println!(
                    "usage: gpe-bench-ceiling [--bind ADDR] [--threads N] [--close] [--tls CERT KEY]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

async fn hello(
    req: Request<hyper::body::Incoming>,
    close: bool,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut resp = if req.uri().path() == "/" {
        Response::new(Full::new(Bytes::from_static(b"Hello, World!")))
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"Not Found\n")));
        *r.status_mut() = StatusCode::NOT_FOUND;
        r
    };
    let h = resp.headers_mut();
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(SERVER, HeaderValue::from_static("gpe-bench-ceiling"));
    if close {
        h.insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

/// The rustls configuration of `--tls CERT KEY`.
fn tls_config(cert: &PathBuf, key: &PathBuf) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| format!("--tls: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

async fn serve(opts: Opts) -> std::io::Result<()> {
    let tls = match &opts.tls {
        Some((cert, key)) => Some(tokio_rustls::TlsAcceptor::from(
            tls_config(cert, key).map_err(std::io::Error::other)?,
        )),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(opts.bind).await?;
    eprintln!(
        "gpe-bench-ceiling listening on {} ({} thread(s), {}{})",
        opts.bind,
        opts.threads,
        if tls.is_some() { "TLS, " } else { "" },
        if opts.close {
            "connection close"
        } else {
            "keep-alive"
        }
    );
    let close = opts.close;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| hello(req, close));
            let mut builder = http1::Builder::new();
            builder.keep_alive(!close);
            match tls {
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                }
                Some(acceptor) => {
                    if let Ok(stream) = acceptor.accept(stream).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
            }
        });
    }
}

fn main() -> ExitCode {
    let opts = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("gpe-bench-ceiling: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = if opts.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(opts.threads)
            .enable_all()
            .build()
    };
    let rt = match rt {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("gpe-bench-ceiling: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(serve(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpe-bench-ceiling: {e}");
            ExitCode::FAILURE
        }
    }
}
