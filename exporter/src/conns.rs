//! The exporter's connections: accepts through core's [`TokioListener`], keeps
//! at most `max_connections` open (further clients wait in the kernel
//! backlog) and, when a client waits at the cap, lets it in by closing the
//! open connection that has been quiet longest, as nginx reuses idle
//! connections. Serving one connection is left to the caller.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use gpe_core::TokioListener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// One open connection as the table sees it.
#[derive(Debug)]
struct Open {
    /// When it last read or wrote a byte (or was accepted).
    last: Rc<Cell<Instant>>,
    /// Notified to make its task drop the connection.
    close: Rc<Notify>,
}

/// The open connections and the cap on them.
#[derive(Debug)]
pub(crate) struct Conns {
    max: usize,
    next: Cell<u64>,
    open: RefCell<BTreeMap<u64, Open>>,
    freed: Notify,
}

/// A connection's place in [`Conns`]; dropping it frees the place.
#[derive(Debug)]
pub(crate) struct Slot {
    conns: Rc<Conns>,
    id: u64,
    /// Notified when the connection must close.
    pub(crate) close: Rc<Notify>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.conns.open.borrow_mut().remove(&self.id);
        self.conns.freed.notify_one();
    }
}

impl Conns {
    /// An empty table holding at most `max` connections (at least one).
    pub(crate) fn new(max: usize) -> Rc<Conns> {
        Rc::new(Conns {
            max: max.max(1),
            next: Cell::new(0),
            open: RefCell::new(BTreeMap::new()),
            freed: Notify::new(),
        })
    }

    fn len(&self) -> usize {
        self.open.borrow().len()
    }

    fn insert(self: &Rc<Self>) -> (Slot, Rc<Cell<Instant>>) {
        let id = self.next.get();
        self.next.set(id + 1);
        let last = Rc::new(Cell::new(Instant::now()));
        let close = Rc::new(Notify::new());
        self.open.borrow_mut().insert(
            id,
            Open {
                last: last.clone(),
                close: close.clone(),
            },
        );
        let slot = Slot {
            conns: self.clone(),
            id,
            close,
        };
        (slot, last)
    }

    /// Asks the connection that has been quiet longest to close.
    fn close_quietest(&self) {
        let open = self.open.borrow();
        if let Some(o) = open.values().min_by_key(|o| o.last.get()) {
            o.close.notify_one();
        }
    }

    /// Waits until the table has room.
    async fn room(&self) {
        while self.len() >= self.max {
            self.freed.notified().await;
        }
    }
}

/// Accepts on `listener` until a fatal accept error, which it returns. Each
/// accepted stream is handed to `spawn` with its [`Slot`]; the stream counts
/// as active whenever it reads or writes.
pub(crate) async fn accept_loop(
    listener: &mut TokioListener,
    conns: &Rc<Conns>,
    mut spawn: impl FnMut(Tracked, Slot),
) -> io::Error {
    loop {
        if conns.len() >= conns.max {
            // At the cap: wait for a place; a client that arrives meanwhile
            // gets one by closing the quietest connection.
            tokio::select! {
                () = conns.room() => {}
                waiting = listener.waiting() => {
                    if let Err(e) = waiting {
                        return e;
                    }
                    conns.close_quietest();
                    conns.room().await;
                }
            }
            continue;
        }
        match listener.accept().await {
            Ok(io) => {
                let (slot, last) = conns.insert();
                spawn(Tracked { io, last }, slot);
            }
            Err(e) => return e,
        }
    }
}

/// An accepted stream that records when it last moved a byte.
#[derive(Debug)]
pub(crate) struct Tracked {
    io: TcpStream,
    last: Rc<Cell<Instant>>,
}

impl Tracked {
    fn moved(&self, n: usize) {
        if n > 0 {
            self.last.set(Instant::now());
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        this.moved(buf.filled().len() - before);
        r
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.moved(n);
        }
        r
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_quietest_connection_is_asked_to_close_and_frees_its_place() {
        let conns = Conns::new(2);
        let (a, a_last) = conns.insert();
        let (b, _b_last) = conns.insert();
        assert_eq!(conns.len(), 2);
        // `a` moved a byte after `b` was accepted, so `b` is the quietest.
        a_last.set(Instant::now() + std::time::Duration::from_millis(5));
        conns.close_quietest();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            b.close.notified().await;
            let a_asked = tokio::time::timeout(std::time::Duration::ZERO, a.close.notified());
            assert!(a_asked.await.is_err(), "only the quietest is asked");
            drop(b);
            conns.room().await;
        });
        assert_eq!(conns.len(), 1);
        drop(a);
        assert_eq!(conns.len(), 0);
    }
}
