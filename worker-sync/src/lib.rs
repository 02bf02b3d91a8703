//! The sync worker: one connection at a time, one request per connection
//! (`Connection: close`), the app called inline. Like Gunicorn's sync worker,
//! it suits apps whose requests are short and CPU-bound; `timeout` also caps
//! one request's time, since a busy worker sends no heartbeat.
//!
//! hyper needs a runtime even for one connection, so each process runs a tokio
//! current-thread runtime and blocks on one connection at a time. A second
//! thread reads the signal pipe, so that a stop closes the listening sockets
//! at once even while the app is inside a request.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::io::{self, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use gpe_core::Conn;
use gpe_core::Listener;
use gpe_core::WorkerKind;
use gpe_core::{allow_blocking, Inline};
use gpe_core::{conn_policy, serve_conn, TlsAcceptor};
use gpe_core::{AcceptFailure, ACCEPT_BACKOFF};
use gpe_core::{Worker, WorkerContext, WorkerExit};
use hyper_util::rt::TokioTimer;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::Signal;

/// How long the accept loop waits before refreshing the heartbeat.
const TICK: Duration = Duration::from_millis(500);
/// Most connections served from one ready socket before polling again (so
/// other sockets and signals get their turn).
const ACCEPT_BURST: usize = 32;

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
        // The listener whose burst goes on, and how many accepts it has left.
        let mut burst: Option<(usize, usize)> = None;
        // Where the next poll starts looking, so that every socket gets its turn.
        let mut first = 0;
        loop {
            if shared.reopen.swap(false, Ordering::Relaxed) {
                reopen_logs(&ctx);
            }
            if shared.stop.load(Ordering::Relaxed) {
                recorder.draining();
                return Ok(WorkerExit::Stopped);
            }
            if ctx.max_requests_reached() {
                recorder.draining();
                return Ok(WorkerExit::MaxRequests);
            }
            let (i, left) = match burst.take() {
                Some(b) => b,
                None => {
                    let ready = poll_listeners(&shared.lock(), &woken, first)?;
                    recorder.beat();
                    drain(&woken);
                    match ready {
                        Some(i) => {
                            first = i + 1;
                            (i, ACCEPT_BURST)
                        }
                        None => continue,
                    }
                }
            };
            if shared.stop.load(Ordering::Relaxed) {
                continue;
            }
            // Like Gunicorn's sync worker: serve the clients waiting on a
            // ready socket one after another, polling once per burst instead
            // of once per connection.
            let accepted = match shared.lock().get(i) {
                Some(l) => l.accept(),
                None => continue,
            };
            let (stream, peer) = match accepted {
                Ok(c) => c,
                Err(e) => match AcceptFailure::of(&e) {
                    // None waiting, another worker took it, or the client gave up.
                    AcceptFailure::Transient => continue,
                    AcceptFailure::Exhausted => {
                        gpe_core::log_error!("accept: {e}; backing off");
                        std::thread::sleep(ACCEPT_BACKOFF);
                        continue;
                    }
                    AcceptFailure::Fatal => return Err(e),
                },
            };
            let served = rt.block_on(async {
                let conn = Conn::from_std(stream)?;
                let never = std::future::pending::<()>();
                let (svc, tls) = (&ctx.service, tls.as_ref());
                serve_conn(conn, tls, (), &peer, svc, &policy, &Inline, never).await;
                Ok::<_, io::Error>(())
            });
            if let Err(e) = served {
                gpe_core::log_warn!("cannot serve a connection: {e}");
            }
            recorder.beat();
            if left > 1 {
                burst = Some((i, left - 1));
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

/// Waits up to a [`TICK`] for a ready listener or a wake-up from the signal
/// watcher; returns the first ready listener from `first` on (wrapping).
fn poll_listeners(
    listeners: &[Listener],
    woken: &UnixStream,
    first: usize,
) -> io::Result<Option<usize>> {
    let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(listeners.len() + 1);
    fds.push(PollFd::new(woken.as_fd(), PollFlags::POLLIN));
    for l in listeners {
        fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
    }
    let ms = TICK.as_millis() as u16;
    match poll(&mut fds, PollTimeout::from(ms)) {
        Ok(_) => {}
        Err(nix::errno::Errno::EINTR) => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let n = listeners.len();
    Ok((0..n).map(|k| (first + k) % n).find(|&i| {
        fds.get(i + 1)
            .and_then(PollFd::revents)
            .is_some_and(|r| !r.is_empty())
    }))
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
