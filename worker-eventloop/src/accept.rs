//! The accept loop on one listener: waits for a place under the connection
//! cap, then for a client, and hands both to the caller, which spawns the
//! connection task.

use std::io;

use gpe_core::async_worker::{AcceptFailure, Admission, Gate, ACCEPT_BACKOFF};
use gpe_core::listener::Listener;
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

/// An inherited listener registered with the runtime.
#[derive(Debug)]
pub(crate) enum Acceptor {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted connection registered with the runtime.
#[derive(Debug)]
pub(crate) enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Acceptor {
    /// Registers `listener` with the current runtime.
    pub(crate) fn register(listener: Listener) -> io::Result<Acceptor> {
        Ok(match listener {
            Listener::Tcp(l) => Acceptor::Tcp(TcpListener::from_std(l)?),
            Listener::Unix(l) => Acceptor::Unix(UnixListener::from_std(l)?),
        })
    }

    /// Accepts one connection with a printable peer address (as
    /// [`Listener::accept`] does).
    async fn accept(&self) -> io::Result<(Conn, String)> {
        match self {
            Acceptor::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                Ok((Conn::Tcp(s), peer.ip().to_string()))
            }
            Acceptor::Unix(l) => Ok((Conn::Unix(l.accept().await?.0), "unix".to_owned())),
        }
    }
}

/// Accepts on `listener` for as long as it can; returns only a fatal error.
/// At the cap it stops accepting, leaving clients in the kernel backlog.
pub(crate) async fn accept_loop<F>(listener: &Acceptor, gate: &Gate, mut spawn: F) -> io::Error
where
    F: FnMut(Conn, String, Admission),
{
    loop {
        let admission = gate.admit_balanced(tokio::time::sleep).await;
        let accepted = loop {
            let e = match listener.accept().await {
                Ok(conn) => break conn,
                Err(e) => e,
            };
            match AcceptFailure::of(&e) {
                AcceptFailure::Transient => {}
                AcceptFailure::Exhausted => {
                    gpe_core::log_error!("accept: {e}; backing off");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                AcceptFailure::Fatal => return e,
            }
        };
        spawn(accepted.0, accepted.1, admission);
        // Let the new connection run and other workers reach the backlog.
        tokio::task::yield_now().await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::time::Duration;

    use gpe_core::config::BindAddr;

    #[test]
    fn accept_pauses_at_the_cap_and_resumes_when_a_place_frees() {
        let listener =
            Listener::bind(&BindAddr::Tcp("127.0.0.1:0".parse().unwrap()), 16, false).unwrap();
        let addr = match &listener {
            Listener::Tcp(t) => t.local_addr().unwrap(),
            Listener::Unix(_) => unreachable!(),
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let accepted = RefCell::new(Vec::new());
        rt.block_on(async {
            let listener = Acceptor::register(listener).unwrap();
            let gate = Gate::new(2);
            let clients: Vec<_> = (0..3)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            let accepting = accept_loop(&listener, &gate, |s, _, a| {
                accepted.borrow_mut().push((s, a))
            });
            let mut accepting = std::pin::pin!(accepting);
            let settle = || tokio::time::sleep(Duration::from_millis(200));
            tokio::select! { _ = &mut accepting => panic!("accept failed"), () = settle() => {} }
            assert_eq!(
                accepted.borrow().len(),
                2,
                "the third client waits in the backlog"
            );
            assert_eq!(gate.open(), 2);
            accepted.borrow_mut().pop();
            tokio::select! { _ = &mut accepting => panic!("accept failed"), () = settle() => {} }
            assert_eq!(accepted.borrow().len(), 2);
            assert_eq!(gate.open(), 2, "the waiting client took the freed place");
            drop(clients);
        });
    }
}
