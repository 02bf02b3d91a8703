//! A connection stream that skips the failing read smol's IO layer would make
//! after every request: after a short read (fewer bytes than asked for) the
//! socket is drained, so the next read first waits for readiness instead of
//! calling `recv` only to get `EAGAIN`. tokio does the same internally; with
//! async-io it saves about one syscall per request.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use smol::io::{AsyncRead, AsyncWrite};
use smol::Async;

/// An [`Async`] stream that waits for readiness after a short read.
#[derive(Debug)]
pub(crate) struct Eager<T> {
    inner: Async<T>,
    drained: bool,
}

impl<T> Eager<T> {
    /// Wraps a registered stream.
    pub(crate) fn new(inner: Async<T>) -> Eager<T> {
        Eager {
            inner,
            drained: false,
        }
    }
}

impl<T> AsyncRead for Eager<T>
where
    Async<T>: AsyncRead + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.drained {
            ready!(this.inner.poll_readable(cx))?;
            this.drained = false;
        }
        let read = ready!(Pin::new(&mut this.inner).poll_read(cx, buf));
        if let Ok(n) = &read {
            this.drained = *n > 0 && *n < buf.len();
        }
        Poll::Ready(read)
    }
}

impl<T> AsyncWrite for Eager<T>
where
    Async<T>: AsyncWrite + Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}
