//! The sync worker: one connection at a time, one request per connection
//! (`Connection: close`), the app called inline. Like Gunicorn's sync worker,
//! it suits apps whose requests are short and CPU-bound; `timeout` also caps
//! one request's time, since a busy worker sends no heartbeat.
//!
//! hyper needs a runtime even for one connection, so each process runs a tokio
//! current-thread runtime and blocks on one connection at a time.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::io;
use std::os::fd::AsFd;
use std::time::Duration;

use gpe_core::Conn;
use gpe_core::WorkerKind;
use gpe_core::{allow_blocking, Inline};
use gpe_core::{http1_builder as builder, serve_io};
use gpe_core::{AcceptFailure, ACCEPT_BACKOFF};
use gpe_core::{Control, Worker, WorkerContext, WorkerExit};
use hyper_util::rt::TokioTimer;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

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

    fn run(&self, ctx: WorkerContext) -> io::Result<WorkerExit> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        // The app runs on this thread, one request at a time: it may block.
        allow_blocking();
        let builder = builder(&ctx.config, false, TokioTimer::new());
        let recorder = ctx.recorder().clone();
        loop {
            if ctx.max_requests_reached() {
                recorder.draining();
                return Ok(WorkerExit::MaxRequests);
            }
            let ready = {
                let mut fds: Vec<PollFd<'_>> = Vec::with_capacity(ctx.listeners.len() + 1);
                fds.push(PollFd::new(ctx.signal_fd(), PollFlags::POLLIN));
                for l in &ctx.listeners {
                    fds.push(PollFd::new(l.as_fd(), PollFlags::POLLIN));
                }
                let ms = TICK.as_millis() as u16;
                match poll(&mut fds, PollTimeout::from(ms)) {
                    Ok(_) => fds
                        .iter()
                        .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                        .collect::<Vec<bool>>(),
                    Err(nix::errno::Errno::EINTR) => vec![true],
                    Err(e) => return Err(e.into()),
                }
            };
            recorder.beat();
            if ready.first().copied().unwrap_or(false) && ctx.take_control().is_some() {
                recorder.draining();
                return Ok(WorkerExit::Stopped);
            }
            for (i, listener) in ctx.listeners.iter().enumerate() {
                if !ready.get(i + 1).copied().unwrap_or(false) {
                    continue;
                }
                // Like Gunicorn's sync worker: serve the clients waiting on a
                // ready socket one after another, polling once per burst
                // instead of once per connection.
                for _ in 0..ACCEPT_BURST {
                    let (stream, peer) = match listener.accept() {
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
                    let served = rt.block_on(async {
                        let io = Conn::from_std(stream)?.into_hyper();
                        let never = std::future::pending::<()>();
                        serve_io(io, (), &peer, &ctx.service, &builder, &Inline, never).await;
                        Ok::<_, io::Error>(())
                    });
                    if let Err(e) = served {
                        gpe_core::log_warn!("cannot serve a connection: {e}");
                    }
                    recorder.beat();
                    // No syscall unless a signal came in.
                    if let Some(Control::Quick | Control::Graceful) =
                        ctx.take_control_if_signalled()
                    {
                        recorder.draining();
                        return Ok(WorkerExit::Stopped);
                    }
                    if ctx.max_requests_reached() {
                        break;
                    }
                }
            }
        }
    }
}
