//! The thread worker (`--worker thread`): one IO thread per process runs a
//! tokio current-thread runtime that multiplexes connections, keep-alive,
//! pipelining and upgrades with hyper; a fixed pool of `threads` OS threads
//! runs each request's future, so a handler that blocks holds only its own
//! thread. Like Gunicorn's gthread, connections that are idle or still
//! sending their head stay on the IO thread and hold no pool thread; a
//! process accepts only while a pool thread is free.
//!
//! The heartbeat comes from the IO thread, so `timeout` does not cap one
//! request's time. The lifecycle (heartbeat, draining, `max_requests`) and
//! the connection cap are core's, shared with the async workers.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod pool;

use std::io;
use std::rc::Rc;

use futures_util::future::{select_all, FutureExt};
use gpe_core::Instrumented;
use gpe_core::WorkerKind;
use gpe_core::{accept_loop, worker_events, Acceptor, Conn};
use gpe_core::{http1_builder as builder, serve_io};
use gpe_core::{supervise, take_listeners, Admission, Gate};
use gpe_core::{Worker, WorkerContext, WorkerExit};
use hyper_util::rt::TokioTimer;

use crate::pool::{Pool, PoolRunner};

/// The thread worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadWorker;

impl Worker for ThreadWorker {
    fn kind(&self) -> WorkerKind {
        WorkerKind::Thread
    }

    /// Requests are recorded on the IO thread; pool threads only run the app.
    fn single_recorder_thread(&self) -> bool {
        true
    }

    fn run(&self, mut ctx: WorkerContext) -> io::Result<WorkerExit> {
        // Runtime and threads are created here, after fork.
        let rt = gpe_core::tokio_runtime(ctx.config.idle_yield)?;
        let pool = Pool::start(ctx.config.threads as usize, rt.handle())?;
        let exit = tokio::task::LocalSet::new().block_on(&rt, serve(&mut ctx, &pool));
        // After a drain the pool is idle; after a quick stop its threads may
        // still be inside the app. Either way the process exits now.
        rt.shutdown_background();
        exit
    }
}

/// What every connection task needs.
struct Connections {
    service: Rc<Instrumented>,
    builder: hyper::server::conn::http1::Builder,
    runner: PoolRunner,
}

impl Connections {
    async fn serve(&self, conn: Conn, peer: String, admission: Admission) {
        let drained = admission.drained();
        let (svc, b, r) = (&self.service, &self.builder, &self.runner);
        serve_io(conn.into_hyper(), admission, &peer, svc, b, r, drained).await;
    }
}

async fn serve(ctx: &mut WorkerContext, pool: &Pool) -> io::Result<WorkerExit> {
    let listeners = take_listeners(ctx, Acceptor::register)?;
    let ctx = &*ctx;
    let gate = Gate::for_worker(ctx);
    let connections = Rc::new(Connections {
        service: ctx.service.clone(),
        builder: builder(&ctx.config, true, TokioTimer::new()),
        runner: pool.runner(),
    });

    let events = std::pin::pin!(worker_events(ctx)?);

    // The accept loops own the listeners: when `supervise` drops them (TERM,
    // INT, QUIT, `max_requests`) this process's listening sockets close at
    // once, before the drain.
    let accepting = {
        let (gate, connections) = (&gate, &connections);
        async move {
            let listeners = listeners;
            let (e, _, _) = select_all(listeners.iter().map(|listener| {
                accept_loop(
                    listener,
                    gate,
                    || pool.load().room(),
                    |conn, peer, admission| {
                        let connections = connections.clone();
                        tokio::task::spawn_local(async move {
                            connections.serve(conn, peer, admission).await;
                        });
                    },
                )
                .boxed_local()
            }))
            .await;
            e
        }
    };

    supervise(ctx, &gate, events, accepting).await
}
