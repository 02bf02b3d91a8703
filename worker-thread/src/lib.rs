//! The thread worker (`--worker thread`): one IO thread per process runs a
//! tokio current-thread runtime: the reactor and timers, accepting, TLS
//! handshakes, the heartbeat and signals. A fixed pool of `threads` OS
//! threads serves the connections: an HTTP/1.x connection is a task that
//! the IO thread's reactor wakes onto a free pool thread whenever its
//! socket has bytes, which then parses the request, runs the app inline and
//! writes the response, so a handler that blocks holds only its own thread
//! (and its own connection). Like Gunicorn's gthread, a connection that is
//! idle or still sending its head holds no pool thread; a process accepts
//! only while a pool thread is free. HTTP/2 connections stay on the IO
//! thread, which hands each stream's app future to the pool.
//!
//! The heartbeat comes from the IO thread, so `timeout` does not cap one
//! request's time. The lifecycle (heartbeat, draining, `max_requests`) and
//! the connection cap are core's, shared with the async workers.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod pool;

use std::io;
use std::sync::Arc;

use gpe_core::{conn_policy, handshake, serve_accepted, serve_http1, serve_io};
use gpe_core::{Admission, Conn, Instrumented, Policy, Protocol, Ready, TlsAcceptor, WorkerKind};
use gpe_core::{Worker, WorkerContext, WorkerExit};

use crate::pool::{LocalRunner, Pool, PoolRunner};

/// The thread worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadWorker;

impl Worker for ThreadWorker {
    fn kind(&self) -> WorkerKind {
        WorkerKind::Thread
    }

    /// Requests are recorded on the pool threads (HTTP/1.x) and on the IO
    /// thread (HTTP/2).
    fn single_recorder_thread(&self) -> bool {
        false
    }

    fn run(&self, mut ctx: WorkerContext) -> io::Result<WorkerExit> {
        // Runtime and threads are created here, after fork.
        let rt = gpe_core::tokio_runtime(ctx.config.idle_yield)?;
        let pool = Pool::start(ctx.config.threads as usize, rt.handle())?;
        let exit = tokio::task::LocalSet::new().block_on(&rt, serve(&mut ctx, &pool));
        // After a drain the pool is idle; after a quick stop its threads may
        // still be inside the app or a connection. Either way the process
        // exits now.
        pool.exiting();
        rt.shutdown_background();
        exit
    }
}

/// What every connection needs, shared by the IO thread and the pool.
struct Shared {
    service: Arc<Instrumented>,
    policy: Policy,
    tls: Option<TlsAcceptor>,
    /// For HTTP/1.x connections, which run on the pool.
    local: LocalRunner,
    /// For HTTP/2 connections, which run on the IO thread.
    remote: PoolRunner,
}

/// Serves the worker (core's [`serve_accepted`]): a connection is taken only
/// while a pool thread is free, and each is served by [`spawn_conn`].
async fn serve(ctx: &mut WorkerContext, pool: &Pool) -> io::Result<WorkerExit> {
    let shared = Arc::new(Shared {
        service: ctx.service.clone(),
        policy: conn_policy(&ctx.config, true, true, hyper_util::rt::TokioTimer::new()),
        tls: ctx.tls.clone().map(TlsAcceptor::from),
        local: pool.local_runner(),
        remote: pool.runner(),
    });
    serve_accepted(
        ctx,
        || pool.load().room(),
        |conn, peer, admission| spawn_conn(pool, &shared, conn, peer, admission),
    )
    .await
}

/// Serves one accepted connection. A plain HTTP/1.x connection becomes a
/// pool task at once. Otherwise a task on the IO thread makes it ready (the
/// TLS handshake, ALPN) and then hands an HTTP/1.x connection to the pool,
/// or serves an HTTP/2 (or prior-knowledge sniffed) one itself, handing each
/// request to the pool.
fn spawn_conn(pool: &Pool, shared: &Arc<Shared>, conn: Conn, peer: String, admission: Admission) {
    let s = shared.clone();
    if s.tls.is_none() && s.policy.protocol(None) == Protocol::Http1 {
        pool.spawn(async move {
            let drained = admission.drained();
            let io = conn.into_hyper();
            serve_http1(
                io, admission, &peer, &s.service, &s.policy, &s.local, drained,
            )
            .await;
        });
        return;
    }
    let spawner = pool.spawner();
    tokio::task::spawn_local(async move {
        let drained = admission.drained();
        let (svc, policy) = (&s.service, &s.policy);
        match handshake(conn, s.tls.as_ref(), svc, policy).await {
            Some((Ready::Tls(io), Protocol::Http1)) => {
                let s = s.clone();
                spawner.spawn(async move {
                    serve_http1(
                        io, admission, &peer, &s.service, &s.policy, &s.local, drained,
                    )
                    .await;
                });
            }
            Some((Ready::Tls(io), protocol)) => {
                serve_io(
                    io, admission, &peer, svc, policy, protocol, &s.remote, drained,
                )
                .await;
            }
            Some((Ready::Plain(io), protocol)) => {
                serve_io(
                    io, admission, &peer, svc, policy, protocol, &s.remote, drained,
                )
                .await;
            }
            None => {}
        }
    });
}
