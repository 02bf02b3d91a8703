//! The eventloop worker: one tokio current-thread runtime per process serves
//! up to `worker_connections` connections with keep-alive and pipelining,
//! like Gunicorn's async workers. Async apps run inline on the loop; blocking
//! apps run on tokio's blocking pool so that they never stall it.
//!
//! The lifecycle (heartbeat, draining, `max_requests`) and the connection cap
//! come from [`gpe_core::async_worker`]; this crate supplies the runtime.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod accept;
mod runner;

use std::io;
use std::rc::Rc;
use std::sync::Arc;

use futures_util::future::{select_all, FutureExt};
use futures_util::stream;
use gpe_core::async_worker::{
    keepalive_builder, supervise, take_listeners, Admission, Event, Gate, TICK,
};
use gpe_core::instrument::{serve_io, Instrumented};
use gpe_core::store::WorkerKind;
use gpe_core::{Worker, WorkerContext, WorkerExit};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::unix::pipe;
use tokio::time::MissedTickBehavior;

use accept::{Acceptor, Conn};

pub use runner::AppRunner;

/// The eventloop worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct EventloopWorker;

impl Worker for EventloopWorker {
    fn kind(&self) -> WorkerKind {
        WorkerKind::Eventloop
    }

    /// Requests are recorded on the worker's one loop thread (a blocking app
    /// runs elsewhere, but its request is recorded after the loop awaits it).
    fn single_recorder_thread(&self) -> bool {
        true
    }

    fn run(&self, mut ctx: WorkerContext) -> io::Result<WorkerExit> {
        // Built here, after fork, never in the master.
        let rt = gpe_core::idle::tokio_runtime(ctx.config.idle_yield)?;
        let exit = tokio::task::LocalSet::new().block_on(&rt, serve(&mut ctx));
        // App calls still running on the blocking pool must not delay the exit.
        rt.shutdown_background();
        exit
    }
}

/// What every connection task needs.
struct Connections {
    service: Arc<Instrumented>,
    builder: hyper::server::conn::http1::Builder,
    runner: AppRunner,
}

impl Connections {
    async fn serve(&self, conn: Conn, peer: String, admission: Admission) {
        let drained = admission.drained();
        let (svc, b, r) = (&self.service, &self.builder, &self.runner);
        match conn {
            Conn::Tcp(s) => serve_io(TokioIo::new(s), &peer, svc, b, r, drained).await,
            Conn::Unix(s) => serve_io(TokioIo::new(s), &peer, svc, b, r, drained).await,
        }
        drop(admission);
    }
}

async fn serve(ctx: &mut WorkerContext) -> io::Result<WorkerExit> {
    let listeners = take_listeners(ctx, Acceptor::register)?;
    let ctx = &*ctx;
    let gate = Gate::for_worker(ctx);
    let connections = Rc::new(Connections {
        service: ctx.service.clone(),
        builder: keepalive_builder(&ctx.config, TokioTimer::new()),
        runner: AppRunner::for_style(ctx.service.app().style(), runner::TokioPool),
    });

    let signal = pipe::Receiver::from_owned_fd(ctx.signal_fd().try_clone_to_owned()?)?;
    let signals = stream::unfold(&signal, |rx| async move {
        rx.readable().await.ok()?;
        // `supervise` empties the pipe through the context; clear tokio's
        // readiness first (a `WouldBlock` from `try_io` does that) so that a
        // signal arriving in between wakes the loop again.
        let _ = rx.try_io(|| Err::<(), _>(io::ErrorKind::WouldBlock.into()));
        Some((Event::Signal, rx))
    });
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let ticks = stream::unfold(interval, |mut i| async move {
        i.tick().await;
        Some((Event::Tick, i))
    });
    let events = std::pin::pin!(stream::select(signals, ticks));

    let accepting = select_all(listeners.iter().map(|listener| {
        accept::accept_loop(listener, &gate, |conn, peer, admission| {
            let connections = connections.clone();
            tokio::task::spawn_local(async move {
                connections.serve(conn, peer, admission).await;
            });
        })
        .boxed_local()
    }))
    .map(|(e, _, _)| e);

    supervise(ctx, &gate, events, accepting).await
}
