//! The benchmark ceiling: a bare tokio + hyper HTTP/1.1 hello-world server,
//! with no master, no worker processes and no metrics. It answers every
//! request with `Hello, World!` and the same headers as gpe's `hello` app.
//!
//! ```text
//! gpe-bench-ceiling [--bind ADDR] [--threads N | --forked N [--balanced [--max-defer-ms N]]] [--close] [--tls CERT KEY]
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
//!
//! `--balanced` (with `--forked`): the children balance connections the way
//! gpe's workers do (`core/src/balance.rs`): before each accept, a child
//! that holds more open connections than its least-loaded sibling waits
//! 1 ms at a time, 50 ms at most (`--max-defer-ms`), for that sibling to take
//! the connection.
//! The counts live in an anonymous shared mapping made before the forks.
//! Left alone, the kernel hands a burst of connections to whichever child
//! runs first, and how it split them moves this ceiling's rate.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    balanced: bool,
    max_defer: Duration,
    close: bool,
    tls: Option<(PathBuf, PathBuf)>,
}

fn parse() -> Result<Opts, String> {
    let mut opts = Opts {
        bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
        threads: 2,
        forked: None,
        balanced: false,
        max_defer: MAX_DEFER,
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
            "--balanced" => opts.balanced = true,
            "--max-defer-ms" => {
                let v = args.next().ok_or("--max-defer-ms needs N")?;
                let ms = v.parse().map_err(|e| format!("--max-defer-ms {v}: {e}"))?;
                opts.max_defer = Duration::from_millis(ms);
            }
            "--tls" => {
                let cert = args.next().ok_or("--tls needs CERT KEY")?;
                let key = args.next().ok_or("--tls needs CERT KEY")?;
                opts.tls = Some((cert.into(), key.into()));
            }
            "-h" | "--help" => {
                println!(
                    "usage: gpe-bench-ceiling [--bind ADDR] [--threads N | --forked N [--balanced [--max-defer-ms N]]] [--close] [--tls CERT KEY]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if threads_given && opts.forked.is_some() {
        return Err("--forked runs a current-thread runtime per process: drop --threads".into());
    }
    if opts.balanced && opts.forked.is_none() {
        return Err("--balanced balances forked processes: add --forked N".into());
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

/// The open connections of every forked child (`--balanced`), shared
/// across the forks, and which of them is this process's.
#[derive(Clone, Copy)]
struct Balance {
    counts: &'static [AtomicUsize],
    me: usize,
    max_defer: Duration,
}

/// Longest a child defers to its siblings before accepting by default
/// (gpe's `MAX_DEFER`).
const MAX_DEFER: Duration = Duration::from_millis(50);
/// How long it pauses before asking again (gpe's `BALANCE_PAUSE`).
const BALANCE_PAUSE: Duration = Duration::from_millis(1);

impl Balance {
    /// `n` zeroed counters in an anonymous shared mapping, which the children
    /// forked after this call share. The mapping is never unmapped.
    fn shared(n: usize) -> std::io::Result<&'static [AtomicUsize]> {
        let len = n * std::mem::size_of::<AtomicUsize>();
        // SAFETY: a new mapping (address chosen by the kernel, no file), so
        // no existing memory is touched; the result is checked below.
        // MAP_SHARED (memmap2's anonymous maps are MAP_PRIVATE, which a fork
        // copies) makes the children's stores visible to each other.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the mapping is page-aligned (so aligned for AtomicUsize),
        // `len` bytes long, zero-filled by the kernel (a valid AtomicUsize,
        // which has the layout of usize), and never unmapped, so it lives as
        // long as the process; every access goes through atomics. The
        // `forked` tests serve through it.
        Ok(unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicUsize>(), n) })
    }

    /// Waits while this child holds more connections than its least-loaded
    /// sibling, at most `max_defer`.
    async fn my_turn(&self) {
        let start = Instant::now();
        while start.elapsed() < self.max_defer {
            let mine = self.counts[self.me].load(Ordering::Relaxed);
            let least = (0..self.counts.len())
                .filter(|&i| i != self.me)
                .map(|i| self.counts[i].load(Ordering::Relaxed))
                .min()
                .unwrap_or(mine);
            if mine <= least {
                return;
            }
            tokio::time::sleep(BALANCE_PAUSE).await;
        }
    }
}

async fn serve(
    opts: &Opts,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: std::net::TcpListener,
    balance: Option<Balance>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let close = opts.close;
    loop {
        if let Some(b) = &balance {
            b.my_turn().await;
        }
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let tls = tls.clone();
        if let Some(b) = balance {
            b.counts[b.me].fetch_add(1, Ordering::Relaxed);
        }
        tokio::spawn(async move {
            let _open = balance.map(Open);
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

/// One open connection of a balanced child, counted until it is dropped.
struct Open(Balance);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.counts[self.0.me].fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs one server process: a tokio runtime with `threads` workers (1 = current-thread).
fn run(
    opts: &Opts,
    threads: usize,
    tls: Option<tokio_rustls::TlsAcceptor>,
    listener: std::net::TcpListener,
    balance: Option<Balance>,
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
    rt.block_on(serve(opts, tls, listener, balance))
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
    let counts = if opts.balanced {
        Some(Balance::shared(n).map_err(|e| format!("--balanced: shared mapping: {e}"))?)
    } else {
        None
    };
    let mut children: Vec<Pid> = Vec::with_capacity(n);
    let stop = |children: &mut Vec<Pid>| {
        for &pid in children.iter() {
            let _ = kill(pid, Signal::SIGTERM);
        }
        for pid in children.drain(..) {
            let _ = waitpid(pid, None);
        }
    };
    for me in 0..n {
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
                    let balance = counts.map(|counts| Balance {
                        counts,
                        me,
                        max_defer: opts.max_defer,
                    });
                    run(opts, 1, tls.clone(), listener.try_clone()?, balance)
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
        Some(n) if opts.balanced => format!("{n} forked current-thread process(es), balanced"),
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
        None => run(&opts, opts.threads, tls, listener, None).map_err(|e| e.to_string()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gpe-bench-ceiling: {e}");
            ExitCode::FAILURE
        }
    }
}
