//! The IO thread's loop: accepts on every listener, serves each connection
//! with hyper as a task on the current-thread runtime, beats the heartbeat,
//! watches the signal pipe and drains. The app itself runs on the
//! [`pool`](crate::pool); the worker's lifecycle is decided in `lib.rs`.

use std::future::Future;
use std::io;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use gpe_core::instrument::{http1_builder, serve_io};
use gpe_core::listener::Listener;
use gpe_core::listener::{AcceptFailure, ACCEPT_BACKOFF};
use gpe_core::{Control, WorkerContext, WorkerExit};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::unix::pipe;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::dispatch::{Dispatch, Dispatcher};
use crate::pool::PoolRunner;

/// How often the IO thread refreshes the heartbeat (the master's `timeout`
/// is at least a second).
const TICK: Duration = Duration::from_millis(500);
/// Time a client has for the head of its first request when keep-alive is off.
const HEADER_TIMEOUT_WITHOUT_KEEPALIVE: Duration = Duration::from_secs(2);

/// How the loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// Every connection finished after a drain.
    Drained(WorkerExit),
    /// INT/QUIT: connections were dropped where they stood.
    Quick,
}

/// Serves `ctx` until told to stop or until `max_requests` have been handed
/// to the pool. Accepts only while the pool has room (see
/// [`crate::dispatch`]) and fewer than `worker_connections` are open. Must
/// run inside a [`tokio::task::LocalSet`].
///
/// # Errors
/// Registering a socket with the runtime or a non-transient accept error.
pub(crate) async fn serve(mut ctx: WorkerContext, pool: PoolRunner) -> io::Result<Ending> {
    let recorder = ctx.recorder().clone();
    let mut accepting = Accepting::new(std::mem::take(&mut ctx.listeners))?;
    let signals = pipe::Receiver::from_owned_fd(ctx.signal_fd().try_clone_to_owned()?)?;
    let builder = Rc::new(builder(&ctx));
    let dispatcher = Dispatcher::new(pool, ctx.config.threads as usize, ctx.max_requests);
    let cap = ctx.config.worker_connections.max(1) as usize;
    let (drain_tx, drain_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut balance = ctx.balancer();
    let exit = loop {
        // Whether to take the next connection or leave it to a sibling worker
        // with fewer (bounded; see gpe_core::balance).
        let can_accept = conns.len() < cap && dispatcher.load().has_room();
        let turn = !can_accept || balance.my_turn(conns.len() as i64);
        tokio::select! {
            biased;
            ready = signals.readable() => {
                ready?;
                // Both stops drain; a quick stop differs only by the master's
                // 1 s deadline. A second INT/QUIT while draining quits at once.
                if take_control(&ctx, &signals).is_some() {
                    break WorkerExit::Stopped;
                }
            }
            _ = tick.tick() => {
                recorder.beat();
                if ctx.max_requests_reached() {
                    break WorkerExit::MaxRequests;
                }
            }
            () = dispatcher.spent() => break WorkerExit::MaxRequests,
            Some(done) = conns.join_next(), if !conns.is_empty() => log_join(done),
            // Re-checks the accept condition below.
            () = dispatcher.load().freed() => {}
            () = tokio::time::sleep(gpe_core::balance::BALANCE_PAUSE), if !turn => {}
            accepted = std::future::poll_fn(|cx| accepting.poll_accept(cx)),
                if can_accept && turn => {
                match accepted {
                    Ok((conn, peer)) => {
                        let conn = connection(
                            conn,
                            peer,
                            &ctx,
                            &builder,
                            dispatcher.connection(),
                            drain_rx.clone(),
                        );
                        conns.spawn_local(conn);
                    }
                    Err(e) => match AcceptFailure::of(&e) {
                        // Another worker took it, or the client gave up.
                        AcceptFailure::Transient => {}
                        AcceptFailure::Exhausted => {
                            gpe_core::log_error!("accept: {e}; backing off");
                            tokio::time::sleep(ACCEPT_BACKOFF).await;
                        }
                        AcceptFailure::Fatal => return Err(e),
                    },
                }
            }
        }
    };

    // Drain: stop accepting, ask every connection to finish its current
    // request and close, and wait for them (the master enforces
    // `graceful_timeout`).
    recorder.draining();
    drop(accepting);
    let _ = drain_tx.send(true);
    loop {
        tokio::select! {
            biased;
            ready = signals.readable() => {
                ready?;
                if take_control(&ctx, &signals) == Some(Control::Quick) {
                    return Ok(Ending::Quick);
                }
            }
            _ = tick.tick() => recorder.beat(),
            done = conns.join_next() => match done {
                Some(done) => log_join(done),
                None => break,
            },
        }
    }
    Ok(Ending::Drained(exit))
}

/// The hyper connection builder: keep-alive unless `keepalive` is 0, and an
/// idle keep-alive connection closes after `keepalive` (hyper's header read
/// timeout starts as soon as it waits for the next request head).
fn builder(ctx: &WorkerContext) -> http1::Builder {
    let keepalive = ctx.config.keepalive;
    let keep_alive = !keepalive.is_zero();
    let mut b = http1_builder(&ctx.config, keep_alive);
    b.timer(TokioTimer::new())
        .header_read_timeout(if keep_alive {
            keepalive
        } else {
            HEADER_TIMEOUT_WITHOUT_KEEPALIVE
        });
    b
}

/// One connection's task: served until the peer closes, it idles past
/// `keepalive`, or the drain flag goes up.
fn connection(
    conn: Conn,
    peer: String,
    ctx: &WorkerContext,
    builder: &Rc<http1::Builder>,
    runner: Dispatch,
    mut drain: watch::Receiver<bool>,
) -> impl Future<Output = ()> + 'static {
    let svc = ctx.service.clone();
    let builder = builder.clone();
    async move {
        let drained = async move {
            // A dropped sender also means: stop.
            let _ = drain.wait_for(|d| *d).await;
        };
        match conn {
            Conn::Tcp(s) => {
                serve_io(TokioIo::new(s), &peer, &svc, &builder, &runner, drained).await
            }
            Conn::Unix(s) => {
                serve_io(TokioIo::new(s), &peer, &svc, &builder, &runner, drained).await
            }
        }
    }
}

/// Takes pending control signals (see [`WorkerContext::take_control`]) and
/// clears the pipe's readiness in the same step, so a signal that arrives in
/// between wakes the loop again instead of being missed.
fn take_control(ctx: &WorkerContext, signals: &pipe::Receiver) -> Option<Control> {
    let mut control = None;
    let _ = signals.try_io(|| {
        control = ctx.take_control();
        Err::<(), _>(io::ErrorKind::WouldBlock.into())
    });
    control
}

fn log_join(done: Result<(), tokio::task::JoinError>) {
    if let Err(e) = done {
        if e.is_panic() {
            gpe_core::log_error!("a connection task panicked");
        }
    }
}

/// An accepted connection on the runtime.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A listener registered with the runtime.
enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Acceptor {
    fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Conn, String)>> {
        match self {
            Acceptor::Tcp(l) => l.poll_accept(cx).map_ok(|(s, peer)| {
                let _ = s.set_nodelay(true);
                (Conn::Tcp(s), peer.ip().to_string())
            }),
            Acceptor::Unix(l) => l
                .poll_accept(cx)
                .map_ok(|(s, _)| (Conn::Unix(s), "unix".to_owned())),
        }
    }
}

/// The listeners, registered with the runtime, polled round-robin.
struct Accepting {
    listeners: Vec<Acceptor>,
    next: usize,
}

impl Accepting {
    /// Registers the inherited (non-blocking) listeners.
    fn new(listeners: Vec<Listener>) -> io::Result<Accepting> {
        Ok(Accepting {
            listeners: listeners
                .into_iter()
                .map(|l| match l {
                    Listener::Tcp(l) => TcpListener::from_std(l).map(Acceptor::Tcp),
                    Listener::Unix(l) => UnixListener::from_std(l).map(Acceptor::Unix),
                })
                .collect::<io::Result<_>>()?,
            next: 0,
        })
    }

    /// Accepts from the first ready listener, starting after the last one
    /// that produced a connection, so that one busy socket cannot starve the
    /// others. Pending when none has a connection waiting (every worker
    /// shares the sockets, so readiness can vanish before accept).
    fn poll_accept(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<(Conn, String)>> {
        let n = self.listeners.len();
        for i in 0..n {
            let idx = (self.next + i) % n;
            let Some(l) = self.listeners.get(idx) else {
                continue;
            };
            if let Poll::Ready(r) = l.poll_accept(cx) {
                self.next = idx + 1;
                return Poll::Ready(r);
            }
        }
        Poll::Pending
    }
}
