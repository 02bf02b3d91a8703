//! The sync worker: one request at a time, one request per connection
//! (`Connection: close`), the app called inline. Like Gunicorn's sync worker,
//! it suits apps whose requests are short and CPU-bound; `timeout` also caps
//! one request's time, since a busy worker sends no heartbeat.
//!
//! A connection whose head has not arrived must not hold the worker: the
//! serving thread reads heads itself, without blocking, from a poll set of
//! waiting connections (at most `worker_connections`, see [`heads`]), and
//! hands a connection to hyper only once its head is complete. Under TLS
//! (`certfile`) the handshake and the head are read on the serving thread,
//! within `header_timeout`, before the next connection. hyper needs a
//! runtime even for one connection, so each process runs a tokio
//! current-thread runtime and blocks on one connection at a time. A second
//! thread reads the signal pipe, so that a stop closes the listening sockets
//! at once even while the app is inside a request.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod heads;

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use gpe_core::Conn;
use gpe_core::Listener;
use gpe_core::WorkerKind;
use gpe_core::{allow_blocking, Inline};
use gpe_core::{conn_policy, serve_conn, serve_io, Protocol, Rewind, TlsAcceptor};
use gpe_core::{AcceptFailure, ACCEPT_BACKOFF};
use gpe_core::{ErrorKind, Worker, WorkerContext, WorkerExit};
use heads::{Head, Waiting};
use hyper_util::rt::TokioTimer;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

/// How long the loop waits at most before refreshing the heartbeat.
const TICK: Duration = Duration::from_millis(500);
/// How long a just-accepted connection's head is waited for before the
/// next client is accepted.
const GRACE: Duration = Duration::from_millis(2);
/// Most connections waiting for their heads for `GRACE` to apply.
const GRACE_MAX: usize = 8;
/// Most connections accepted from one ready socket before polling again (so
/// other sockets and signals get their turn).
const BURST: usize = 32;

/// The sync worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncWorker;

impl Worker for SyncWorker {
    fn kind(&self) -> WorkerKind {
        WorkerKind::Sync
    }

    /// One thread does everything.
    fn single_recorder_thread(&self) -> bool {
        true
    }

    /// An upgraded connection would hold the only connection slot: a request
    /// for one is answered 501.
    fn serves_upgrades(&self) -> bool {
        false
    }

    /// One request per connection: HTTP/1.1 only, also under TLS (ALPN
    /// offers `http/1.1` alone).
    fn serves_http2(&self) -> bool {
        false
    }

    fn run(&self, mut ctx: WorkerContext) -> io::Result<WorkerExit> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The app runs on this thread, one request at a time: it may block.
        allow_blocking();
        // HTTP/1.1 only: one request per connection, so HTTP/2 would gain nothing.
        let policy = conn_policy(&ctx.config, false, false, TokioTimer::new());
        let tls = ctx.tls.clone().map(TlsAcceptor::from);
        let recorder = ctx.recorder().clone();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            reopen: AtomicBool::new(false),
            listeners: Mutex::new(std::mem::take(&mut ctx.listeners)),
        });
        let (wake, woken) = UnixStream::pair()?;
        woken.set_nonblocking(true)?;
        let pipe = ctx.signal_fd().try_clone_to_owned()?;
        let watcher = shared.clone();
        std::thread::Builder::new()
            .name("gpe-signals".into())
            .spawn(move || watch_signals(&pipe, &watcher, wake))?;
        let cap = (ctx.config.worker_connections as usize).max(1);
        let head_timeout = ctx.config.header_timeout;
        let mut head = Head::new(&ctx.config);
        // Connections whose head is still arriving, and those whose head is
        // complete, in the order they completed.
        let mut waiting: Vec<Waiting> = Vec::new();
        let mut spare: Vec<Waiting> = Vec::new();
        let mut ready: VecDeque<Waiting> = VecDeque::new();
        // Where the next accept starts looking, so that every socket gets its turn.
        let mut first = 0;
        let mut exit = None;
        loop {
            if shared.reopen.swap(false, Ordering::Relaxed) {
                reopen_logs(&ctx);
            }
            if exit.is_none() {
                if shared.stop.load(Ordering::Relaxed) {
                    exit = Some(WorkerExit::Stopped);
                } else if ctx.max_requests_reached() {
                    exit = Some(WorkerExit::MaxRequests);
                }
                if exit.is_some() {
                    recorder.draining();
                    // Accept no more: another worker takes the backlog.
                    shared.lock().clear();
                }
            }
            // A stopping worker still answers the connections it accepted:
            // the complete heads now, the others as their heads complete or
            // expire.
            if let Some(exit) = exit {
                if waiting.is_empty() && ready.is_empty() {
                    return Ok(exit);
                }
            }
            // While the newest waiting connection is in its first `GRACE`,
            // its head is most likely on its way: wait for it before taking
            // another client, so that a sibling that is free takes that one
            // (and is the only worker woken for it). With more than
            // `GRACE_MAX` waiting, slow clients may be among them, and the
            // next client is accepted at once.
            let now = Instant::now();
            let grace = waiting
                .last()
                .filter(|_| waiting.len() <= GRACE_MAX)
                .map(|w| (w.since + GRACE).saturating_duration_since(now))
                .filter(|d| !d.is_zero());
            let room = grace.is_none() && waiting.len() + ready.len() < cap;
            let wait = if ready.is_empty() {
                let due = waiting
                    .iter()
                    .map(|w| (w.since + head_timeout).saturating_duration_since(now))
                    .min()
                    .map_or(TICK, |d| d.min(TICK) + Duration::from_millis(1));
                grace.map_or(due, |g| g.min(due))
            } else {
                Duration::ZERO
            };
            let polled = poll_all(&shared.lock(), room, &waiting, &woken, first, wait)?;
            recorder.beat();
            if polled.woken {
                drain(&woken);
            }
            // Heads that arrived, in the order of the poll set (`spare`
            // keeps its capacity from one loop to the next).
            std::mem::swap(&mut waiting, &mut spare);
            let mut readable = polled.readable.iter().copied();
            for mut w in spare.drain(..) {
                if !readable.next().unwrap_or(false) {
                    waiting.push(w);
                    continue;
                }
                match w.read(&mut head) {
                    heads::Progress::More => waiting.push(w),
                    heads::Progress::Complete => ready.push_back(w),
                    heads::Progress::Gone => {}
                }
            }
            // Heads not complete in time: closed, counted as a timeout.
            let now = Instant::now();
            waiting.retain(|w| {
                let alive = now.saturating_duration_since(w.since) < head_timeout;
                if !alive {
                    recorder.error_without_request(ErrorKind::Timeout);
                }
                alive
            });
            if let Some(i) = polled.listener {
                first = i + 1;
                // Take the clients waiting on a ready socket one after
                // another, until one has its head complete: that one is
                // served first, and the rest of the backlog stays for
                // whichever worker is free (the balance Gunicorn's sync
                // workers get from accepting one at a time).
                for _ in 0..BURST {
                    if !ready.is_empty()
                        || waiting.len() >= cap
                        || shared.stop.load(Ordering::Relaxed)
                    {
                        break;
                    }
                    let accepted = match shared.lock().get(i) {
                        Some(l) => l.accept(),
                        None => break,
                    };
                    let (stream, peer) = match accepted {
                        Ok(c) => c,
                        Err(e) => match AcceptFailure::of(&e) {
                            // None waiting, another worker took it, or the client gave up.
                            AcceptFailure::Transient => break,
                            AcceptFailure::Exhausted => {
                                gpe_core::log_error!("accept: {e}; backing off");
                                std::thread::sleep(ACCEPT_BACKOFF);
                                break;
                            }
                            AcceptFailure::Fatal => return Err(e),
                        },
                    };
                    if let Some(acceptor) = &tls {
                        // Encrypted bytes tell nothing of the head: the
                        // handshake and the head are read here, each within
                        // `header_timeout`.
                        let served = rt.block_on(async {
                            let conn = Conn::from_std(stream)?;
                            let never = std::future::pending::<()>();
                            let (svc, p) = (&ctx.service, &policy);
                            serve_conn(conn, Some(acceptor), (), &peer, svc, p, &Inline, never)
                                .await;
                            Ok::<_, io::Error>(())
                        });
                        if let Err(e) = served {
                            gpe_core::log_warn!("cannot serve a connection: {e}");
                        }
                        recorder.beat();
                        continue;
                    }
                    let mut w = Waiting::new(stream, peer, recorder.clone());
                    // The head may be there already.
                    match w.read(&mut head) {
                        heads::Progress::More => waiting.push(w),
                        heads::Progress::Complete => ready.push_back(w),
                        heads::Progress::Gone => {}
                    }
                }
            }
            // Serve complete heads in order, one request at a time, polling
            // between them so that heads that arrive meanwhile queue behind.
            if let Some(w) = ready.pop_front() {
                let (stream, peer, prefix) = w.into_parts();
                let served = rt.block_on(async {
                    let io = Rewind::new(prefix, Conn::from_std(stream)?.into_hyper());
                    let never = std::future::pending::<()>();
                    let (svc, p) = (&ctx.service, &policy);
                    serve_io(io, (), &peer, svc, p, Protocol::Http1, &Inline, never).await;
                    Ok::<_, io::Error>(())
                });
                if let Err(e) = served {
                    gpe_core::log_warn!("cannot serve a connection: {e}");
                }
                recorder.beat();
            }
        }
    }
}

/// What the signal watcher tells the serving thread, and the listeners it
/// closes on a stop.
#[derive(Debug)]
struct Shared {
    /// TERM, INT or QUIT arrived.
    stop: AtomicBool,
    /// USR1 arrived: reopen the logs.
    reopen: AtomicBool,
    /// Emptied (the sockets closed) on a stop.
    listeners: Mutex<Vec<Listener>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Vec<Listener>> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one poll found.
#[derive(Debug, Default)]
struct Polled {
    /// The first ready listener from `first` on (wrapping).
    listener: Option<usize>,
    /// The signal watcher wrote to the wake-up socket.
    woken: bool,
    /// Per waiting connection: readable (or closed, or failed).
    readable: Vec<bool>,
}

/// Waits up to `wait` for a wake-up from the signal watcher, a ready
/// listener (only with `room` for a connection) or a waiting connection's
/// bytes.
fn poll_all(
    listeners: &[Listener],
    room: bool,
    waiting: &[Waiting],
    woken: &UnixStream,
    first: usize,
    wait: Duration,
) -> io::Result<Polled> {
    let n = if room { listeners.len() } else { 0 };
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(1 + n + waiting.len());
    fds.push(PollFd::new(woken.as_fd(), PollFlags::POLLIN));
    for l in &listeners[..n] {
        fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
    }
    for w in waiting {
        fds.push(PollFd::new(w.as_fd(), PollFlags::POLLIN));
    }
    // Rounded up: a wait of less than a millisecond must not become a poll
    // that returns at once, again and again until the time is up.
    let ms = wait.as_micros().div_ceil(1000).min(u128::from(u16::MAX)) as u16;
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Ok(Polled::default()),
        Err(e) => return Err(e.into()),
    }
    let ready = |i: usize| {
        fds.get(i)
            .and_then(PollFd::revents)
            .is_some_and(|r| !r.is_empty())
    };
    Ok(Polled {
        listener: (0..n).map(|k| (first + k) % n).find(|&i| ready(i + 1)),
        woken: ready(0),
        readable: (0..waiting.len()).map(|k| ready(1 + n + k)).collect(),
    })
}

/// Empties the wake-up socket.
fn drain(woken: &UnixStream) {
    let mut buf = [0u8; 64];
    while matches!(io::Read::read(&mut &*woken, &mut buf), Ok(n) if n > 0) {}
}

/// The signal watcher: the only reader of the signal pipe. A stop (TERM,
/// INT, QUIT) closes the listeners at once, even while the app is inside a
/// request on the serving thread, so that new clients are refused; the
/// serving thread finishes its connection and exits. USR1 asks it to reopen
/// the logs. Each signal wakes the serving thread's poll.
fn watch_signals(pipe: &OwnedFd, shared: &Shared, mut wake: UnixStream) {
    let mut buf = [0u8; 64];
    loop {
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::NONE) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(_) => return,
        }
        let n = match nix::unistd::read(pipe, &mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        };
        let mut stop = false;
        for b in &buf[..n] {
            match Signal::try_from(i32::from(*b)) {
                Ok(Signal::SIGTERM | Signal::SIGINT | Signal::SIGQUIT) => stop = true,
                Ok(Signal::SIGUSR1) => shared.reopen.store(true, Ordering::Relaxed),
                _ => {}
            }
        }
        if stop {
            shared.stop.store(true, Ordering::Relaxed);
        }
        // Wake the serving thread first: its poll holds the listeners' lock.
        let _ = wake.write_all(&[1]);
        if stop {
            shared.lock().clear();
        }
    }
}

/// USR1: reopen the access log and the error log.
fn reopen_logs(ctx: &WorkerContext) {
    if let Some(log) = ctx.service.access_log() {
        if let Err(e) = log.reopen() {
            gpe_core::log_error!("cannot reopen the access log: {e}");
        }
    }
    if let Err(e) = gpe_core::open_errorlog(&ctx.config.errorlog) {
        gpe_core::log_error!("cannot reopen the error log: {e}");
    }
}
