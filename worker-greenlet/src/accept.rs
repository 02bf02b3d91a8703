//! The accept loop on one listener: waits for a place under the connection
//! cap, then for a client, and hands both to the caller, which spawns the
//! connection task.

use std::io;

use gpe_core::{accept_retrying, Admission, Gate};
use gpe_core::{Listener, Stream};
use smol::{Async, Timer};

/// Accepts on `listener` for as long as it can; returns only a fatal error.
/// At the cap it stops accepting, leaving clients in the kernel backlog.
pub(crate) async fn accept_loop<F>(
    listener: &Async<Listener>,
    gate: &Gate,
    mut spawn: F,
) -> io::Error
where
    F: FnMut(Stream, String, Admission),
{
    loop {
        let admission = gate
            .admit_balanced(|d| async move {
                Timer::after(d).await;
            })
            .await;
        match accept(listener).await {
            Ok((stream, peer)) => spawn(stream, peer, admission),
            Err(e) => return e,
        }
        // Let the new connection run and other workers reach the backlog.
        smol::future::yield_now().await;
    }
}

async fn accept(listener: &Async<Listener>) -> io::Result<(Stream, String)> {
    // `read_with` waits for readiness and retries on `WouldBlock`.
    accept_retrying(
        || listener.read_with(Listener::accept),
        |d| async move {
            Timer::after(d).await;
        },
    )
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::net::TcpStream;
    use std::time::Duration;

    use futures_util::future::{select, Either};
    use gpe_core::BindAddr;

    /// Lets `accepting` run for a while; it must not fail.
    async fn settle<F: std::future::Future>(accepting: std::pin::Pin<&mut F>) {
        let timer = Timer::after(Duration::from_millis(200));
        if let Either::Left(_) = select(accepting, timer).await {
            panic!("accept failed");
        }
    }

    #[test]
    fn accept_pauses_at_the_cap_and_resumes_when_a_place_frees() {
        let listener =
            Listener::bind(&BindAddr::Tcp("127.0.0.1:0".parse().unwrap()), 16, false).unwrap();
        let addr = listener.tcp_addr().unwrap();
        let accepted = RefCell::new(Vec::new());
        smol::block_on(async {
            let listener = Async::new(listener).unwrap();
            let gate = Gate::new(2);
            let clients: Vec<TcpStream> =
                (0..3).map(|_| TcpStream::connect(addr).unwrap()).collect();
            let accepting = accept_loop(&listener, &gate, |s, _, a| {
                accepted.borrow_mut().push((s, a))
            });
            let mut accepting = std::pin::pin!(accepting);
            settle(accepting.as_mut()).await;
            assert_eq!(
                accepted.borrow().len(),
                2,
                "the third client waits in the backlog"
            );
            assert_eq!(gate.open(), 2);
            accepted.borrow_mut().pop();
            settle(accepting.as_mut()).await;
            assert_eq!(accepted.borrow().len(), 2);
            assert_eq!(gate.open(), 2, "the waiting client took the freed place");
            drop(clients);
        });
    }
}
