//! The benchmark ceiling: a bare tokio + hyper HTTP/1.1 hello-world server,
//! with no master, no worker processes and no metrics. It answers every
//! request with `Hello, World!` and the same headers as gpe's `hello` app.
//!
//! ```text
//! gpe-bench-ceiling [--bind ADDR] [--threads N | --forked N] [--close] [--tls CERT KEY]
//! ```
//!
//! `--threads N`: worker threads of the tokio runtime (1 = current-thread
//! runtime; default 2). `--forked N`: the pre-fork shape without gpe — bind
//! the listener, then fork N processes that each run a current-thread
//! runtime accepting on that one listener; the parent only waits (SIGTERM or
//! SIGINT stops and reaps the children; a child that dies stops the rest). `--close`: answer `Connection: close` and close every
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
    forked: Option<usize>,
    close: bool,
    tls: Option<(PathBuf, PathBuf)>,
}

fn parse() -> Result<Opts, String> {
    let mut opts = Opts {
        bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
        threads: 2,
        forked: None,
        close: false,
        tls: None,
    };
    let mut args = std::env::args().skip(1);
    let mut threads_given = false;
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
                threads_given = true;
            }
            "--forked" => {
                let v = args.next().ok_or("--forked needs N")?;
                opts.forked = Some(
                    v.parse()
                        .ok()
                        .filter(|n| (1..=64).contains(n))
                        .ok_or(format!("--forked {v}: expected an integer from 1 to 64"))?,
                );
            }
            "--close" => opts.close = true,
            "--tls" => {
                let cert = args.next().ok_or("--tls needs CERT KEY")?;
                let key = args.next().ok_or("--tls needs CERT KEY")?;
                opts.tls = Some((cert.into(), key.into()));
            }
            "-h" | "--help" => {
                println!(
                    "usage: gpe-bench-ceiling [--bind ADDR] [--threads N | --forked N] [--close] [--tls CERT KEY]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if threads_given && opts.forked.is_some() {
        return Err("--forked runs a current-thread runtime per process: drop --threads".into());
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

/// The listening socket: bound before any fork, with gpe's default backlog
/// (2048), non-blocking for tokio.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&addr.into())?;
    sock.listen(2048)?;
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

async fn serve(
    opts: &Opts,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: std::net::TcpListener,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
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

/// Runs one server process: a tokio runtime with `threads` workers (1 = current-thread).
fn run(
    opts: &Opts,
    threads: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: std::net::TcpListener,
) -> std::io::Result<()> {
    let rt = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }?;
    rt.block_on(serve(opts, tls, listener))
}

/// `--forked N`: forks N servers on `listener`, then waits for SIGTERM or
/// SIGINT (stops them) or for one of them to exit (stops the rest); reaps
/// every child before it returns.
fn forked(
    opts: &Opts,
    n: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: std::net::TcpListener,
) -> Result<(), String> {
    use nix::sys::signal::{kill, SigSet, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    use nix::unistd::{fork, ForkResult, Pid};

    // Blocked before the forks so that none is lost; sigwait takes them.
    let mut set = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        set.add(s);
    }
    set.thread_block()
        .map_err(|e| format!("sigprocmask: {e}"))?;
    let parent = nix::unistd::getpid();
    let mut children: Vec<Pid> = Vec::with_capacity(n);
    let stop = |children: &mut Vec<Pid>| {
        for &pid in children.iter() {
            let _ = kill(pid, Signal::SIGTERM);
        }
        for pid in children.drain(..) {
            let _ = waitpid(pid, None);
        }
    };
    for _ in 0..n {
        // SAFETY: the process is single-threaded here (no runtime has been
        // built yet, and nothing else spawns threads before this point), so
        // the child may run any code, not only async-signal-safe functions.
        match unsafe { fork() } {
            Ok(ForkResult::Child) => {
                let child = (|| {
                    set.thread_unblock().map_err(std::io::Error::other)?;
                    // A parent killed with SIGKILL must not leave servers behind.
                    nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)
                        .map_err(std::io::Error::other)?;
                    if nix::unistd::getppid() != parent {
                        return Err(std::io::Error::other("the parent exited"));
                    }
                    run(opts, 1, tls.clone(), listener.try_clone()?)
                })();
                if let Err(e) = child {
                    eprintln!("gpe-bench-ceiling: child {}: {e}", std::process::id());
                    std::process::exit(1);
                }
                std::process::exit(0);
            }
            Ok(ForkResult::Parent { child }) => children.push(child),
            Err(e) => {
                stop(&mut children);
                return Err(format!("fork: {e}"));
            }
        }
    }
    drop(listener);
    loop {
        match set.wait() {
            Ok(Signal::SIGCHLD) => {
                let exited = children.iter().position(|&pid| {
                    !matches!(
                        waitpid(pid, Some(WaitPidFlag::WNOHANG)),
                        Ok(WaitStatus::StillAlive)
                    )
                });
                if let Some(i) = exited {
                    let pid = children.remove(i);
                    stop(&mut children);
                    return Err(format!("child {pid} exited"));
                }
            }
            Ok(_) => {
                stop(&mut children);
                return Ok(());
            }
            Err(e) => {
                stop(&mut children);
                return Err(format!("sigwait: {e}"));
            }
        }
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
    let tls = match &opts.tls {
        Some((cert, key)) => match tls_config(cert, key) {
            Ok(c) => Some(tokio_rustls::TlsAcceptor::from(c)),
            Err(e) => {
                eprintln!("gpe-bench-ceiling: {e}");
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let listener = match listen(opts.bind) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("gpe-bench-ceiling: {}: {e}", opts.bind);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map_or(opts.bind, |a| a);
    let shape = match opts.forked {
        Some(n) => format!("{n} forked current-thread process(es)"),
        None => format!("{} thread(s)", opts.threads),
    };
    eprintln!(
        "gpe-bench-ceiling listening on {addr} ({shape}, {}{})",
        if tls.is_some() { "TLS, " } else { "" },
        if opts.close {
            "connection close"
        } else {
            "keep-alive"
        }
    );
    let res = match opts.forked {
        Some(n) => forked(&opts, n, tls, listener),
        None => run(&opts, opts.threads, tls, listener).map_err(|e| e.to_string()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpe-bench-ceiling: {e}");
            ExitCode::FAILURE
        }
    }
}
