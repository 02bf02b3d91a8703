//! The one tokio edge: every tokio-based worker (sync, thread, eventloop)
//! registers its listeners and accepted connections here, and serves each
//! connection here, over TLS when `certfile` is set ([`serve_conn`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::async_worker::{
    accept_retrying, supervise, take_listeners, Admission, Event, Gate, TICK,
};
use crate::http::conn::{policy, serve_io, Policy};
use crate::http::instrument::Instrumented;
use crate::http::run::Runner;
use crate::listener::{Listener, Stream};
use crate::store::ErrorKind;
use crate::worker::WorkerContext;
use crate::worker::WorkerExit;

pub use super::idle::tokio_runtime as runtime;
/// The TLS acceptor of the tokio-based workers.
pub use tokio_rustls::TlsAcceptor;

/// An inherited listener registered with the current runtime.
#[derive(Debug)]
pub enum Acceptor {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A unix-socket listener.
    Unix(UnixListener),
}

impl Acceptor {
    /// Registers `listener` (non-blocking) with the current runtime.
    ///
    /// # Errors
    /// The runtime refused the socket.
    pub fn register(listener: Listener) -> io::Result<Acceptor> {
        Ok(match listener {
            Listener::Tcp(l) => Acceptor::Tcp(TcpListener::from_std(l)?),
            Listener::Unix(l) => Acceptor::Unix(UnixListener::from_std(l)?),
        })
    }

    /// Polls for one connection with a printable peer address (as
    /// [`Listener::accept`] gives).
    pub fn poll_accept(&self, cx: &mut Context<'_>) -> Poll<io::Result<(Conn, String)>> {
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

    /// Accepts one connection (see [`Acceptor::poll_accept`]).
    ///
    /// # Errors
    /// As accept(2).
    pub async fn accept(&self) -> io::Result<(Conn, String)> {
        std::future::poll_fn(|cx| self.poll_accept(cx)).await
    }
}

/// An accepted connection registered with the current runtime.
#[derive(Debug)]
pub enum Conn {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A unix-socket connection.
    Unix(UnixStream),
}

impl Conn {
    /// Registers a connection accepted with [`Listener::accept`], which is
    /// non-blocking already.
    ///
    /// # Errors
    /// The socket cannot be registered.
    pub fn from_std(stream: Stream) -> io::Result<Conn> {
        Ok(match stream {
            Stream::Tcp(s) => Conn::Tcp(TcpStream::from_std(s)?),
            Stream::Unix(s) => Conn::Unix(UnixStream::from_std(s)?),
        })
    }

    /// The connection as hyper's IO.
    pub fn into_hyper(self) -> hyper_util::rt::TokioIo<Conn> {
        hyper_util::rt::TokioIo::new(self)
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Tcp(s) => s.is_write_vectored(),
            Conn::Unix(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_flush(cx),
            Conn::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// An accepted connection ready for HTTP: as accepted, or after its TLS
/// handshake.
// The TLS variant is large (rustls' state), but a `Ready` is made once per
// connection and moved straight into the connection's future, which holds
// the stream anyway: boxing it would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub enum Ready {
    /// Plain TCP or a unix socket.
    Plain(hyper_util::rt::TokioIo<Conn>),
    /// TLS over it.
    Tls(hyper_util::rt::TokioIo<tokio_rustls::server::TlsStream<Conn>>),
}

impl std::fmt::Debug for Ready {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ready::Plain(_) => "Ready::Plain",
            Ready::Tls(_) => "Ready::Tls",
        })
    }
}

/// Makes `conn` ready for HTTP and says which protocol it speaks: with
/// `tls`, after a TLS handshake in this task that must end within
/// `header_timeout` (a handshake that does not is counted as a `timeout`
/// error; one that fails just closes the connection, unlogged: scanners and
/// clients that distrust the certificate end there), ALPN choosing the
/// protocol. `None`: the connection is gone.
pub async fn handshake(
    conn: Conn,
    tls: Option<&TlsAcceptor>,
    svc: &Instrumented,
    policy: &Policy,
) -> Option<(Ready, crate::http::conn::Protocol)> {
    let Some(acceptor) = tls else {
        return Some((Ready::Plain(conn.into_hyper()), policy.protocol(None)));
    };
    match tokio::time::timeout(policy.handshake_timeout(), acceptor.accept(conn)).await {
        Ok(Ok(stream)) => {
            let protocol = policy.protocol(stream.get_ref().1.alpn_protocol());
            Some((Ready::Tls(hyper_util::rt::TokioIo::new(stream)), protocol))
        }
        Ok(Err(_)) => None,
        Err(_) => {
            svc.recorder().error_without_request(ErrorKind::Timeout);
            None
        }
    }
}

/// Serves one accepted connection as [`serve_io`] does, after its
/// [`handshake`].
#[allow(clippy::too_many_arguments)]
pub async fn serve_conn<H, R, D>(
    conn: Conn,
    tls: Option<&TlsAcceptor>,
    hold: H,
    peer: &str,
    svc: &Instrumented,
    policy: &Policy,
    runner: &R,
    drain: D,
) where
    H: Unpin + Send + 'static,
    R: Runner,
    D: std::future::Future<Output = ()>,
{
    if tls.is_none() {
        // The plain path keeps the connection's future small: no `Ready`.
        let (io, protocol) = (conn.into_hyper(), policy.protocol(None));
        serve_io(io, hold, peer, svc, policy, protocol, runner, drain).await;
        return;
    }
    match handshake(conn, tls, svc, policy).await {
        Some((Ready::Plain(io), protocol)) => {
            serve_io(io, hold, peer, svc, policy, protocol, runner, drain).await;
        }
        Some((Ready::Tls(io), protocol)) => {
            serve_io(io, hold, peer, svc, policy, protocol, runner, drain).await;
        }
        None => {}
    }
}

/// The events of a tokio-based worker's [`supervise`](crate::async_worker::supervise)
/// loop: the signal pipe's readiness and a tick every [`TICK`].
///
/// # Errors
/// The signal fd cannot be duplicated or registered.
pub fn worker_events(ctx: &WorkerContext) -> io::Result<impl futures_util::Stream<Item = Event>> {
    use futures_util::StreamExt;
    let signals = signal_events(ctx.signal_fd())?.map(|()| Event::Signal);
    let mut interval = tokio::time::interval(TICK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ticks = futures_util::stream::unfold(interval, |mut i| async move {
        i.tick().await;
        Some((Event::Tick, i))
    });
    Ok(futures_util::stream::select(signals, ticks))
}

/// Accepts on `listener` for as long as it can and hands each connection,
/// with its admission, to `spawn`; returns only a fatal error. It takes a
/// connection only when `gate` admits one (under the cap, balanced with the
/// siblings) and `room` has completed (the thread worker waits there for a
/// free pool thread), so further clients wait in the kernel backlog.
pub async fn accept_loop<F, R, RF>(
    listener: &Acceptor,
    gate: &Gate,
    room: R,
    mut spawn: F,
) -> io::Error
where
    F: FnMut(Conn, String, Admission),
    R: Fn() -> RF,
    RF: std::future::Future<Output = ()>,
{
    loop {
        let admission = gate.admit_balanced(tokio::time::sleep).await;
        room().await;
        let (conn, peer) = match accept_retrying(|| listener.accept(), tokio::time::sleep).await {
            Ok(accepted) => accepted,
            Err(e) => return e,
        };
        spawn(conn, peer, admission);
        // Let the new connection run and other workers reach the backlog.
        tokio::task::yield_now().await;
    }
}

/// Serves the eventloop worker on the current `LocalSet` until it should
/// exit: [`serve_accepted`], each connection a local task served with the one
/// builder policy and `runner`, accepting whenever the gate admits.
///
/// # Errors
/// Registering a socket or the signal pipe, or a fatal accept error.
pub async fn serve_worker<R>(ctx: &mut WorkerContext, runner: R) -> io::Result<WorkerExit>
where
    R: Runner + 'static,
{
    /// What every connection task needs.
    struct Connections<R> {
        service: std::sync::Arc<Instrumented>,
        policy: Policy,
        tls: Option<TlsAcceptor>,
        runner: R,
    }

    let connections = std::rc::Rc::new(Connections {
        service: ctx.service.clone(),
        policy: policy(&ctx.config, true, true, hyper_util::rt::TokioTimer::new()),
        tls: ctx.tls.clone().map(TlsAcceptor::from),
        runner,
    });
    serve_accepted(
        ctx,
        || std::future::ready(()),
        |conn, peer, admission| {
            let c = connections.clone();
            tokio::task::spawn_local(async move {
                let drained = admission.drained();
                let (svc, p, r) = (&c.service, &c.policy, &c.runner);
                let tls = c.tls.as_ref();
                serve_conn(conn, tls, admission, &peer, svc, p, r, drained).await;
            });
        },
    )
    .await
}

/// Runs a tokio-based worker (thread, eventloop) on the current `LocalSet`
/// until it should exit: accepts on every listener under the worker's
/// [`Gate`] and `room` (see [`accept_loop`]), hands each connection to
/// `spawn`, and runs the shared lifecycle ([`supervise`]). The accept loops
/// own the listeners, so when `supervise` drops them (TERM, INT, QUIT,
/// `max_requests`) this process's listening sockets close at once, before
/// the drain.
///
/// # Errors
/// Registering a socket or the signal pipe, or a fatal accept error.
pub async fn serve_accepted<Room, RF, S>(
    ctx: &mut WorkerContext,
    room: Room,
    spawn: S,
) -> io::Result<WorkerExit>
where
    Room: Fn() -> RF,
    RF: std::future::Future<Output = ()>,
    S: Fn(Conn, String, Admission),
{
    use futures_util::FutureExt;

    let listeners = take_listeners(ctx, Acceptor::register)?;
    let ctx = &*ctx;
    let gate = Gate::for_worker(ctx);
    let events = std::pin::pin!(worker_events(ctx)?);
    let accepting = {
        let (gate, room, spawn) = (&gate, &room, &spawn);
        async move {
            let listeners = listeners;
            let (e, _, _) = futures_util::future::select_all(listeners.iter().map(|listener| {
                accept_loop(listener, gate, room, |conn, peer, admission| {
                    spawn(conn, peer, admission);
                })
                .boxed_local()
            }))
            .await;
            e
        }
    };
    supervise(ctx, &gate, events, accepting).await
}

/// A stream of the signal pipe's readiness on the current runtime: yields
/// `()` each time the pipe becomes readable, after clearing tokio's
/// readiness so a signal arriving in between wakes the loop again (the
/// caller empties the pipe through the worker context).
///
/// # Errors
/// The fd cannot be duplicated or registered.
pub fn signal_events(
    fd: std::os::fd::BorrowedFd<'_>,
) -> io::Result<impl futures_util::Stream<Item = ()>> {
    let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(fd.try_clone_to_owned()?)?;
    Ok(futures_util::stream::unfold(rx, |rx| async move {
        rx.readable().await.ok()?;
        let _ = rx.try_io(|| Err::<(), _>(io::ErrorKind::WouldBlock.into()));
        Some(((), rx))
    }))
}
