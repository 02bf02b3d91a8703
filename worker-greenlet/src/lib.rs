//! The greenlet worker: lightweight tasks on one smol executor per process
//! serve up to `worker_connections` connections with keep-alive and
//! pipelining, like Gunicorn's gevent worker. Async apps run inline on the
//! executor; blocking apps run on smol's blocking pool (`smol::unblock`).
//!
//! Why smol: async-std is discontinued upstream and its maintainers point to
//! smol as the successor. hyper talks to smol through
//! `smol-hyper`'s timer and this crate's own IO adapter (`hyper_io`). The
//! lifecycle and the connection cap come from [`gpe_core::async_worker`].
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod accept;
mod compat;
mod eager;
mod hyper_io;

use std::io;
use std::rc::Rc;

use futures_util::future::FutureExt;
use futures_util::stream::FuturesUnordered;
use futures_util::{stream, StreamExt};
use gpe_core::yield_when_idle;
use gpe_core::Instrumented;
use gpe_core::Stream;
use gpe_core::WorkerKind;
use gpe_core::{conn_policy, serve_io, ErrorKind, Policy};
use gpe_core::{supervise, take_listeners, Admission, Event, Gate, TICK};
use gpe_core::{Worker, WorkerContext, WorkerExit};
use smol::{Async, LocalExecutor, Timer};
use smol_hyper::rt::SmolTimer;

pub use compat::CompatRunner;

/// The greenlet worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct GreenletWorker;

impl Worker for GreenletWorker {
    fn kind(&self) -> WorkerKind {
        WorkerKind::Greenlet
    }

    /// Requests are recorded on the worker's one loop thread (a blocking app
    /// runs elsewhere, but its request is recorded after the loop awaits it).
    fn single_recorder_thread(&self) -> bool {
        true
    }

    fn run(&self, mut ctx: WorkerContext) -> io::Result<WorkerExit> {
        // Created here, after fork; smol's reactor and blocking pool start
        // their threads lazily, so they too exist only in the worker.
        let executor = LocalExecutor::new();
        let tokio = compat::runtime()?;
        let runner = CompatRunner::new(tokio.handle().clone());
        let idle_yield = ctx.config.idle_yield;
        let exit = smol::block_on(yield_when_idle(
            executor.run(serve(&executor, &mut ctx, runner)),
            idle_yield,
        ));
        // Tasks the app spawned must not delay the exit.
        tokio.shutdown_background();
        exit
    }
}

/// What every connection task needs.
struct Connections {
    service: std::sync::Arc<Instrumented>,
    policy: Policy,
    tls: Option<futures_rustls::TlsAcceptor>,
    runner: CompatRunner,
}

impl Connections {
    async fn serve(&self, stream: Stream, peer: String, admission: Admission) {
        let registered = match stream {
            Stream::Tcp(s) => {
                Async::new(s).map(|io| self.serve_on(io, &peer, admission).boxed_local())
            }
            Stream::Unix(s) => {
                Async::new(s).map(|io| self.serve_on(io, &peer, admission).boxed_local())
            }
        };
        match registered {
            Ok(serving) => serving.await,
            Err(e) => gpe_core::log_warn!("cannot serve a connection: {e}"),
        }
        // `admission` (the connection's place under the cap) is released here.
    }

    /// Serves one registered connection; with TLS after a handshake that must
    /// end within `header_timeout` (as the tokio workers do: a timeout is
    /// counted, a failed handshake just closes).
    async fn serve_on<T>(&self, io: Async<T>, peer: &str, admission: Admission)
    where
        T: Send + 'static,
        Async<T>: smol::io::AsyncRead + smol::io::AsyncWrite + Unpin,
    {
        let io = eager::Eager::new(io);
        let drained = admission.drained();
        let (svc, p) = (&self.service, &self.policy);
        let Some(acceptor) = &self.tls else {
            let protocol = p.protocol(None);
            let io = hyper_io::HyperIo::new(io);
            serve_io(io, admission, peer, svc, p, protocol, &self.runner, drained).await;
            return;
        };
        let handshake = std::pin::pin!(acceptor.accept(io));
        let deadline = Timer::after(p.handshake_timeout());
        match futures_util::future::select(handshake, deadline).await {
            futures_util::future::Either::Left((Ok(stream), _)) => {
                let protocol = p.protocol(stream.get_ref().1.alpn_protocol());
                let io = hyper_io::HyperIo::new(stream);
                serve_io(io, admission, peer, svc, p, protocol, &self.runner, drained).await;
            }
            futures_util::future::Either::Left((Err(_), _)) => {}
            futures_util::future::Either::Right(_) => {
                svc.recorder().error_without_request(ErrorKind::Timeout);
            }
        }
    }
}

async fn serve(
    executor: &LocalExecutor<'_>,
    ctx: &mut WorkerContext,
    runner: CompatRunner,
) -> io::Result<WorkerExit> {
    let listeners = take_listeners(ctx, Async::new)?;
    let ctx = &*ctx;
    let gate = Gate::for_worker(ctx);
    let connections = Rc::new(Connections {
        service: ctx.service.clone(),
        policy: conn_policy(&ctx.config, true, true, SmolTimer::new()),
        tls: ctx.tls.clone().map(futures_rustls::TlsAcceptor::from),
        runner,
    });

    let signal = Async::new(ctx.signal_fd().try_clone_to_owned()?)?;
    let signals = stream::unfold(&signal, |fd| async move {
        fd.readable().await.ok()?;
        Some((Event::Signal, fd))
    });
    let ticks = StreamExt::map(Timer::interval(TICK), |_| Event::Tick);
    let events = std::pin::pin!(stream::select(signals, ticks));

    // A FuturesUnordered polls an accept loop only when its own socket woke
    // it. smol polls this whole future after every reactor wake-up, and
    // async-io's `read_with` takes any poll after a wake-up as readiness: in
    // a `select_all` every wake-up would cost each listener a failed accept
    // and an epoll re-arm.
    //
    // The accept loops own the listeners: when `supervise` drops them (TERM,
    // INT, QUIT, `max_requests`) this process's listening sockets close at
    // once, before the drain.
    let accepting = {
        let (gate, connections) = (&gate, &connections);
        async move {
            let listeners = listeners;
            let mut accept_loops: FuturesUnordered<_> = listeners
                .iter()
                .map(|listener| {
                    accept::accept_loop(listener, gate, |stream, peer, admission| {
                        let connections = connections.clone();
                        executor
                            .spawn(async move { connections.serve(stream, peer, admission).await })
                            .detach();
                    })
                })
                .collect();
            accept_loops
                .next()
                .await
                .unwrap_or_else(|| io::Error::other("no accept loop"))
        }
    };

    supervise(ctx, &gate, events, accepting).await
}
