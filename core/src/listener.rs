//! Listening sockets: bound once by the master, inherited by every worker
//! across fork, always in non-blocking mode. Also what to do when accept(2)
//! fails ([`AcceptFailure`], [`AcceptRetry`]) and a tokio listener that
//! accepts that way ([`TokioListener`], used by the exporter). Serving happens
//! in the worker crates and the exporter.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::BindAddr;

/// A bound, listening, non-blocking socket.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// Unix domain stream socket.
    Unix(UnixListener),
}

/// An accepted connection, non-blocking ([`Listener::accept`] makes it so).
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(TcpStream),
    /// Unix domain.
    Unix(UnixStream),
}

impl Listener {
    /// Binds and listens on `addr`. A stale unix socket file is replaced.
    ///
    /// # Errors
    /// The address is in use, not permitted, or otherwise cannot be bound.
    pub fn bind(addr: &BindAddr, backlog: u32, reuse_port: bool) -> io::Result<Listener> {
        let backlog = backlog.min(i32::MAX as u32) as i32;
        match addr {
            BindAddr::Tcp(sa) => {
                let socket =
                    Socket::new(Domain::for_address(*sa), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_reuse_address(true)?;
                if reuse_port {
                    socket.set_reuse_port(true)?;
                }
                socket.set_tcp_nodelay(true)?;
                socket.bind(&(*sa).into())?;
                socket.listen(backlog)?;
                socket.set_nonblocking(true)?;
                Ok(Listener::Tcp(socket.into()))
            }
            BindAddr::Unix(path) => {
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    }
                }
                let socket = Socket::new(Domain::UNIX, Type::STREAM, None)?;
                socket.bind(&socket2::SockAddr::unix(path)?)?;
                socket.listen(backlog)?;
                socket.set_nonblocking(true)?;
                Ok(Listener::Unix(socket.into()))
            }
            // A host name is looked up here, when bound, not when the settings are read.
            BindAddr::Host(h) => {
                Listener::bind(&BindAddr::Tcp(h.resolve()?), backlog as u32, reuse_port)
            }
        }
    }

    /// Takes ownership of an inherited listening socket (from systemd socket
    /// activation or a binary upgrade) and puts it in non-blocking mode.
    ///
    /// # Safety
    /// `fd` must be an open file descriptor that nothing else in this process
    /// owns or will close.
    ///
    /// # Errors
    /// `fd` is not a listening stream socket of family inet, inet6 or unix.
    pub unsafe fn from_raw_fd(fd: RawFd) -> io::Result<Listener> {
        // SAFETY: ownership of `fd` is transferred to us by the caller's contract.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let socket = Socket::from(owned);
        if socket.r#type()? != Type::STREAM || !socket.is_listener()? {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inherited fd {fd} is not a listening stream socket"),
            ));
        }
        socket.set_nonblocking(true)?;
        let addr = socket.local_addr()?;
        if addr.is_unix() {
            Ok(Listener::Unix(socket.into()))
        } else if addr.as_socket().is_some() {
            Ok(Listener::Tcp(socket.into()))
        } else {
            Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inherited fd {fd} has an unsupported address family"),
            ))
        }
    }

    /// Accepts one connection if one is waiting (`WouldBlock` otherwise).
    /// Returns the stream and a printable peer address.
    ///
    /// # Errors
    /// `WouldBlock` when none is waiting; other accept errors.
    pub fn accept(&self) -> io::Result<(Stream, String)> {
        // accept4 with SOCK_NONBLOCK: the stream is non-blocking from the
        // start (std's accept would leave it blocking, a later fcntl each).
        let flags = libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC;
        match self {
            Listener::Tcp(l) => {
                let (s, peer) = socket2::SockRef::from(l).accept4(flags)?;
                let s = TcpStream::from(s);
                let _ = s.set_nodelay(true);
                let peer = peer
                    .as_socket()
                    .map_or_else(|| "?".to_owned(), |a| a.ip().to_string());
                Ok((Stream::Tcp(s), peer))
            }
            Listener::Unix(l) => {
                let (s, _) = socket2::SockRef::from(l).accept4(flags)?;
                Ok((Stream::Unix(UnixStream::from(s)), "unix".to_owned()))
            }
        }
    }

    /// The bound TCP address; `None` for a unix socket (or if the OS cannot
    /// say).
    pub fn tcp_addr(&self) -> Option<std::net::SocketAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok(),
            Listener::Unix(_) => None,
        }
    }

    /// The bound address, printable.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(_) => self
                .tcp_addr()
                .map_or_else(|| "tcp:?".to_owned(), |a| a.to_string()),
            Listener::Unix(l) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| "unix:?".to_owned()),
        }
    }
}

impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l) => l.as_fd(),
        }
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        self.as_fd().as_raw_fd()
    }
}

/// How long an accept loop pauses when the process or system is out of fds.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// What to do after a failed accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptFailure {
    /// Another worker took the connection, or the client gave up: try again.
    Transient,
    /// Out of file descriptors: pause for [`ACCEPT_BACKOFF`], then try again.
    Exhausted,
    /// Anything else: the worker cannot go on.
    Fatal,
}

impl AcceptFailure {
    /// Classifies an accept error.
    pub fn of(e: &io::Error) -> AcceptFailure {
        match e.kind() {
            io::ErrorKind::WouldBlock
            | io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset => AcceptFailure::Transient,
            _ if matches!(
                e.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
            ) =>
            {
                AcceptFailure::Exhausted
            }
            _ => AcceptFailure::Fatal,
        }
    }
}

/// One accept loop's memory of its failures: classifies each error through
/// [`AcceptFailure`] and logs running out of file descriptors once per
/// episode (not on every retry), and the episode's end once an accept
/// succeeds. The caller pauses for [`ACCEPT_BACKOFF`] on
/// [`AcceptFailure::Exhausted`] with its own runtime's timer.
#[derive(Debug)]
pub struct AcceptRetry {
    who: &'static str,
    /// Pauses in the current exhaustion episode, if one is under way.
    paused: Option<u64>,
}

impl AcceptRetry {
    /// A retry state for the accept loop of `who` (named in its log lines).
    pub fn new(who: &'static str) -> AcceptRetry {
        AcceptRetry { who, paused: None }
    }

    /// Classifies a failed accept, logging the start of an exhaustion episode.
    pub fn failed(&mut self, e: &io::Error) -> AcceptFailure {
        let (failure, line) = self.note_failure(e);
        if let Some(line) = line {
            crate::log_error!("{line}");
        }
        failure
    }

    /// Records a successful accept, which ends an exhaustion episode.
    pub fn accepted(&mut self) {
        if let Some(line) = self.note_success() {
            crate::log_info!("{line}");
        }
    }

    fn note_failure(&mut self, e: &io::Error) -> (AcceptFailure, Option<String>) {
        let failure = AcceptFailure::of(e);
        let line = match (failure, &mut self.paused) {
            (AcceptFailure::Exhausted, Some(n)) => {
                *n += 1;
                None
            }
            (AcceptFailure::Exhausted, None) => {
                self.paused = Some(1);
                Some(format!(
                    "{}: accept: {e}; pausing {} ms between tries until it succeeds",
                    self.who,
                    ACCEPT_BACKOFF.as_millis()
                ))
            }
            (AcceptFailure::Transient | AcceptFailure::Fatal, _) => None,
        };
        (failure, line)
    }

    fn note_success(&mut self) -> Option<String> {
        self.paused.take().map(|n| {
            format!(
                "{}: accepting again after {n} pause{}",
                self.who,
                if n == 1 { "" } else { "s" }
            )
        })
    }
}

/// A TCP listener registered with the current tokio runtime. It can wait
/// for a client without accepting it, so a server at its connection cap
/// leaves clients in the kernel backlog, and it accepts through
/// [`AcceptRetry`].
#[derive(Debug)]
pub struct TokioListener {
    fd: tokio::io::unix::AsyncFd<TcpListener>,
    retry: AcceptRetry,
}

impl TokioListener {
    /// Registers `listener` (made non-blocking) with the current runtime;
    /// `who` names the accept loop in log lines.
    ///
    /// # Errors
    /// fcntl(2) or the registration failed.
    ///
    /// # Panics
    /// Outside a tokio runtime.
    pub fn new(listener: TcpListener, who: &'static str) -> io::Result<TokioListener> {
        listener.set_nonblocking(true)?;
        // SAFETY: the AsyncFd owns the listener, so its fd stays open and names
        // the same socket until the AsyncFd drops it; `as_raw_fd` of a
        // TcpListener always returns that fd.
        let fd = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(
                listener,
                tokio::io::Interest::READABLE,
            )
        }?;
        Ok(TokioListener {
            fd,
            retry: AcceptRetry::new(who),
        })
    }

    /// Waits until a client waits in the backlog, without accepting it.
    ///
    /// # Errors
    /// The runtime's reactor failed.
    pub async fn waiting(&self) -> io::Result<()> {
        loop {
            let mut ready = self.fd.readable().await?;
            // Readiness outlives the accept that emptied the backlog, so ask
            // the kernel whether a client really waits.
            let mut fds = [nix::poll::PollFd::new(
                self.fd.get_ref().as_fd(),
                nix::poll::PollFlags::POLLIN,
            )];
            match nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO) {
                Ok(0) => ready.clear_ready(),
                Ok(_) => return Ok(()),
                Err(nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Accepts the next client. Transient failures are retried at once;
    /// running out of file descriptors pauses [`ACCEPT_BACKOFF`] between
    /// tries, logged once per episode.
    ///
    /// # Errors
    /// A [`AcceptFailure::Fatal`] accept error.
    pub async fn accept(&mut self) -> io::Result<tokio::net::TcpStream> {
        loop {
            let mut ready = self.fd.readable().await?;
            let Ok(accepted) = ready.try_io(|l| l.get_ref().accept()) else {
                // Nothing waiting after all; readiness is cleared.
                continue;
            };
            let stream = accepted.and_then(|(s, _)| {
                s.set_nonblocking(true)?;
                let _ = s.set_nodelay(true);
                tokio::net::TcpStream::from_std(s)
            });
            match stream {
                Ok(s) => {
                    self.retry.accepted();
                    return Ok(s);
                }
                Err(e) => match self.retry.failed(&e) {
                    AcceptFailure::Transient => {}
                    AcceptFailure::Exhausted => tokio::time::sleep(ACCEPT_BACKOFF).await,
                    AcceptFailure::Fatal => return Err(e),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Accepts the connection a client has just made, retrying while the
    /// kernel has not queued it yet (bounded: 5 s).
    fn accept_within(l: &Listener) -> (Stream, String) {
        let due = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            match l.accept() {
                Ok(accepted) => return accepted,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock && std::time::Instant::now() < due =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("accept: {e}"),
            }
        }
    }

    /// An accepted stream is non-blocking: a read with nothing sent fails
    /// with `WouldBlock` at once.
    fn assert_nonblocking(s: &Stream) {
        use std::io::Read;
        let mut buf = [0u8; 1];
        let got = match s {
            Stream::Tcp(t) => (&*t).read(&mut buf),
            Stream::Unix(u) => (&*u).read(&mut buf),
        };
        assert_eq!(got.unwrap_err().kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn binds_tcp_and_unix_and_accepts() {
        let l = Listener::bind(&BindAddr::Tcp("127.0.0.1:0".parse().unwrap()), 16, false).unwrap();
        let addr = l.tcp_addr().unwrap();
        assert_eq!(
            l.accept().map(|_| ()).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        let _c = TcpStream::connect(addr).unwrap();
        let (s, peer) = accept_within(&l);
        assert_eq!(peer, "127.0.0.1");
        assert_nonblocking(&s);

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let u = Listener::bind(&BindAddr::Unix(path.clone()), 16, false).unwrap();
        assert_eq!(u.describe(), format!("unix:{}", path.display()));
        let _uc = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let (us, peer) = accept_within(&u);
        assert_eq!(peer, "unix");
        assert_nonblocking(&us);
        drop(u);
        // A stale socket file is replaced.
        let _u2 = Listener::bind(&BindAddr::Unix(path), 16, false).unwrap();
    }

    #[test]
    fn a_host_name_is_looked_up_when_bound() {
        let at = |s: &str| BindAddr::parse("bind", s).unwrap();
        let l = Listener::bind(&at("localhost:0"), 16, false).unwrap();
        let Listener::Tcp(t) = &l else {
            panic!("{l:?}")
        };
        assert!(t.local_addr().unwrap().ip().is_loopback());
    }

    #[test]
    fn retry_logs_running_out_of_fds_once_per_episode() {
        let mut r = AcceptRetry::new("exporter");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let (f, line) = r.note_failure(&emfile);
        assert_eq!(f, AcceptFailure::Exhausted);
        assert_eq!(
            line.unwrap(),
            format!("exporter: accept: {emfile}; pausing 100 ms between tries until it succeeds")
        );
        for _ in 0..4 {
            assert_eq!(r.note_failure(&emfile), (AcceptFailure::Exhausted, None));
        }
        let enfile = io::Error::from_raw_os_error(libc::ENFILE);
        assert_eq!(r.note_failure(&enfile), (AcceptFailure::Exhausted, None));
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(r.note_failure(&aborted), (AcceptFailure::Transient, None));
        assert_eq!(
            r.note_success().unwrap(),
            "exporter: accepting again after 6 pauses"
        );
        assert_eq!(r.note_success(), None);
        // A new episode is logged again.
        assert!(r.note_failure(&emfile).1.is_some());
        assert_eq!(
            r.note_success().unwrap(),
            "exporter: accepting again after 1 pause"
        );
        let bad = io::Error::from_raw_os_error(libc::EBADF);
        assert_eq!(r.note_failure(&bad), (AcceptFailure::Fatal, None));
        assert_eq!(r.note_success(), None);
    }

    #[test]
    fn tokio_listener_waits_without_accepting_then_accepts() {
        let std = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std.local_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut l = TokioListener::new(std, "test").unwrap();
            let c = tokio::net::TcpStream::connect(addr).await.unwrap();
            l.waiting().await.unwrap();
            // Waiting left the client in the backlog: it is still ready.
            l.waiting().await.unwrap();
            let s = l.accept().await.unwrap();
            assert_eq!(s.peer_addr().unwrap(), c.local_addr().unwrap());
            let none = tokio::time::timeout(Duration::from_millis(50), l.waiting()).await;
            assert!(none.is_err(), "nothing else waits");
        });
    }

    #[test]
    fn adopts_inherited_fds_and_refuses_others() {
        use std::os::fd::IntoRawFd;
        let l = Listener::bind(&BindAddr::Tcp("127.0.0.1:0".parse().unwrap()), 16, false).unwrap();
        let described = l.describe();
        let fd = match l {
            Listener::Tcp(t) => t.into_raw_fd(),
            Listener::Unix(_) => unreachable!(),
        };
        // SAFETY: `fd` was just released by its owner.
        let adopted = unsafe { Listener::from_raw_fd(fd) }.unwrap();
        assert_eq!(adopted.describe(), described);
        let file = std::fs::File::open("/dev/null").unwrap().into_raw_fd();
        // SAFETY: `file` was just released by its owner; the call closes it.
        assert!(unsafe { Listener::from_raw_fd(file) }.is_err());
    }
}
