//! Runtime-agnostic pieces the async workers (eventloop, greenlet) share: the
//! connection [`Gate`] (cap, drain, wait for idle), the [`supervise`] loop that
//! turns signals and ticks into heartbeats, draining and an exit. Runtimes, sockets and accept loops stay in the worker
//! crates; everything here works on any executor.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{select, Either};
use futures_util::{Stream, StreamExt};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::worker::{Control, WorkerContext, WorkerExit};

/// How often an async worker beats and checks `max_requests`.
pub const TICK: Duration = Duration::from_millis(500);

pub use crate::listener::{AcceptFailure, AcceptRetry, ACCEPT_BACKOFF};

/// Admits at most `cap` connections at once and tells them when to drain.
///
/// An accept loop calls [`Gate::admit`] before each accept, so at the cap the
/// next client waits in the kernel backlog instead of being refused.
#[derive(Debug)]
pub struct Gate {
    permits: Arc<Semaphore>,
    cap: u32,
    drain: watch::Sender<bool>,
    balancer: Option<std::sync::Mutex<crate::balance::Balancer>>,
}

/// Takes the worker's listening sockets, registering each with the runtime
/// through `register`.
///
/// # Errors
/// A registration failed, or the worker has no socket at all.
pub fn take_listeners<L>(
    ctx: &mut WorkerContext,
    register: impl FnMut(crate::listener::Listener) -> io::Result<L>,
) -> io::Result<Vec<L>> {
    let listeners = std::mem::take(&mut ctx.listeners)
        .into_iter()
        .map(register)
        .collect::<io::Result<Vec<_>>>()?;
    if listeners.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no listening socket",
        ));
    }
    Ok(listeners)
}

/// One admitted connection: keep it alive as long as the connection.
#[derive(Debug)]
pub struct Admission {
    _permit: OwnedSemaphorePermit,
    drain: watch::Receiver<bool>,
}

impl Gate {
    /// A gate for `cap` connections (at least one).
    pub fn new(cap: u32) -> Gate {
        let cap = cap.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize) as u32);
        Gate {
            permits: Arc::new(Semaphore::new(cap as usize)),
            cap,
            drain: watch::Sender::new(false),
            balancer: None,
        }
    }

    /// The gate of a worker: its `worker_connections` cap, balanced with its
    /// siblings.
    pub fn for_worker(ctx: &WorkerContext) -> Gate {
        Gate::new(ctx.config.worker_connections).with_balancer(ctx.balancer())
    }

    /// Also balances connections with sibling workers before each admission
    /// (see [`crate::balance`]).
    pub fn with_balancer(mut self, balancer: crate::balance::Balancer) -> Gate {
        self.balancer = Some(std::sync::Mutex::new(balancer));
        self
    }

    /// [`Gate::admit`], then waits (in `pause` steps, bounded by
    /// [`crate::balance::MAX_DEFER`]) while a sibling worker holds fewer
    /// connections. `pause` is the runtime's sleep.
    pub async fn admit_balanced<F>(&self, pause: impl Fn(Duration) -> F) -> Admission
    where
        F: Future<Output = ()>,
    {
        let admission = self.admit().await;
        if let Some(b) = &self.balancer {
            // Admissions count a connection from its accept on, before its task
            // runs: the count the balance needs (the new one excluded).
            while !b
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .my_turn(i64::from(self.open()) - 1)
            {
                pause(crate::balance::BALANCE_PAUSE).await;
            }
        }
        admission
    }

    /// Waits until fewer than `cap` connections are open and admits one.
    pub async fn admit(&self) -> Admission {
        #[allow(clippy::expect_used)]
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the gate never closes its semaphore");
        Admission {
            _permit: permit,
            drain: self.drain.subscribe(),
        }
    }

    /// Connections admitted and not yet finished.
    pub fn open(&self) -> u32 {
        self.cap - self.permits.available_permits() as u32
    }

    /// Tells every admitted connection (and any admitted later) to drain.
    pub fn drain(&self) {
        self.drain.send_replace(true);
    }

    /// Completes once every admitted connection has finished.
    pub async fn idle(&self) {
        // Holding all permits at once means no connection holds one.
        let _all = self.permits.acquire_many(self.cap).await;
    }
}

impl Admission {
    /// Completes when the worker starts draining: pass it as `drain` to
    /// [`serve_io`](crate::http::conn::serve_io).
    pub fn drained(&self) -> impl Future<Output = ()> + 'static {
        let mut rx = self.drain.clone();
        async move {
            // An error means the gate is gone: drain as well.
            let _ = rx.wait_for(|draining| *draining).await;
        }
    }
}

/// Accepts one connection through `accept`, retrying what can be retried
/// ([`AcceptRetry`]): a transient failure (another worker took the client,
/// or it gave up) at once, fd exhaustion (EMFILE, ENFILE) after
/// [`ACCEPT_BACKOFF`] through the runtime's `sleep`, logged once per episode.
/// Every async accept loop of every worker goes through here.
///
/// # Errors
/// A fatal accept error (the listener is unusable).
pub async fn accept_retrying<T, A, AF, S, SF>(mut accept: A, sleep: S) -> io::Result<T>
where
    A: FnMut() -> AF,
    AF: Future<Output = io::Result<T>>,
    S: Fn(Duration) -> SF,
    SF: Future<Output = ()>,
{
    let mut retry = AcceptRetry::new("worker");
    loop {
        let e = match accept().await {
            Ok(conn) => {
                retry.accepted();
                return Ok(conn);
            }
            Err(e) => e,
        };
        match retry.failed(&e) {
            AcceptFailure::Transient => {}
            AcceptFailure::Exhausted => sleep(ACCEPT_BACKOFF).await,
            AcceptFailure::Fatal => return Err(e),
        }
    }
}

/// What wakes the [`supervise`] loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// The signal fd became readable.
    Signal,
    /// A [`TICK`] passed.
    Tick,
}

/// Runs an async worker's lifecycle until it should exit.
///
/// `events` yields [`Event::Signal`] when the signal fd is readable and
/// [`Event::Tick`] every [`TICK`]; `accepting` accepts and spawns connections
/// through `gate` and completes only on a fatal accept error. On each tick the
/// worker beats and checks `max_requests`. On TERM or `max_requests` it marks
/// itself draining, drops `accepting`, drains every connection and waits for
/// them (the master enforces `graceful_timeout`, or 1 s after INT or QUIT);
/// a second INT or QUIT while draining returns at once.
///
/// # Errors
/// The error `accepting` completed with, or `events` ended.
pub async fn supervise<E, A>(
    ctx: &WorkerContext,
    gate: &Gate,
    mut events: E,
    accepting: A,
) -> io::Result<WorkerExit>
where
    E: Stream<Item = Event> + Unpin,
    A: Future<Output = io::Error>,
{
    let recorder = ctx.recorder();
    let ended = || io::Error::other("the worker's event stream ended");
    let exit = {
        // Scoped so that the accept loop, and any admission it holds, is
        // dropped before waiting for idle.
        let mut accepting = std::pin::pin!(accepting);
        let mut retire = std::pin::pin!(ctx.service.retire_requested());
        loop {
            let next = select(events.next(), retire.as_mut());
            match select(next, accepting.as_mut()).await {
                Either::Right((e, _)) => return Err(e),
                Either::Left((Either::Right(((), _)), _)) => break WorkerExit::MaxRequests,
                Either::Left((Either::Left(event), _)) => match event {
                    (None, _) => return Err(ended()),
                    // Both stops drain: a quick stop differs only by the master's
                    // deadline (1 s) before it kills what is left.
                    (Some(Event::Signal), _) => match ctx.take_control() {
                        Some(Control::Quick | Control::Graceful) => break WorkerExit::Stopped,
                        None => {}
                    },
                    (Some(Event::Tick), _) => {
                        recorder.beat();
                        if ctx.max_requests_reached() {
                            break WorkerExit::MaxRequests;
                        }
                    }
                },
            }
        }
    };
    recorder.draining();
    gate.drain();
    let mut idle = std::pin::pin!(gate.idle());
    loop {
        match select(events.next(), idle.as_mut()).await {
            Either::Right(((), _)) => return Ok(exit),
            Either::Left((None, _)) => return Err(ended()),
            Either::Left((Some(Event::Signal), _)) => {
                if ctx.take_control() == Some(Control::Quick) {
                    return Ok(WorkerExit::Stopped);
                }
            }
            Either::Left((Some(Event::Tick), _)) => recorder.beat(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn gate_admits_exactly_cap_connections_at_once() {
        let gate = Gate::new(3);
        let mut held: Vec<Admission> = (0..3)
            .map(|_| gate.admit().now_or_never().unwrap())
            .collect();
        assert_eq!(gate.open(), 3);
        let mut fourth = Box::pin(gate.admit());
        assert!((&mut fourth).now_or_never().is_none());
        held.pop();
        assert_eq!(gate.open(), 3, "the freed place goes to the waiter");
        held.push(fourth.now_or_never().unwrap());
        assert_eq!(gate.open(), 3);
        held.clear();
        assert_eq!(gate.open(), 0);
    }

    #[test]
    fn drain_reaches_current_and_later_admissions_and_idle_waits_for_all() {
        let gate = Gate::new(2);
        let a = gate.admit().now_or_never().unwrap();
        let mut before = Box::pin(a.drained());
        assert!((&mut before).now_or_never().is_none());
        gate.drain();
        assert!(before.now_or_never().is_some());
        let b = gate.admit().now_or_never().unwrap();
        assert!(b.drained().now_or_never().is_some());
        let mut idle = Box::pin(gate.idle());
        assert!((&mut idle).now_or_never().is_none());
        drop(a);
        assert!((&mut idle).now_or_never().is_none());
        drop(b);
        assert!(idle.now_or_never().is_some());
    }

    #[test]
    fn accept_failures_are_classified() {
        let kind = |k| AcceptFailure::of(&io::Error::from(k));
        assert_eq!(kind(io::ErrorKind::WouldBlock), AcceptFailure::Transient);
        assert_eq!(
            kind(io::ErrorKind::ConnectionAborted),
            AcceptFailure::Transient
        );
        let os = |n| AcceptFailure::of(&io::Error::from_raw_os_error(n));
        assert_eq!(os(libc::EMFILE), AcceptFailure::Exhausted);
        assert_eq!(os(libc::ENFILE), AcceptFailure::Exhausted);
        assert_eq!(os(libc::EBADF), AcceptFailure::Fatal);
    }
}
