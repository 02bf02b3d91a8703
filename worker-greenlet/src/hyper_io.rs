//! hyper's IO traits for smol's (futures-io) streams, without zeroing
//! hyper's read buffer on every read.
//!
//! hyper hands a read its buffer's whole spare capacity, uninitialized;
//! futures-io's `poll_read` wants initialized bytes. smol-hyper's
//! `FuturesIo` therefore zero-fills that capacity (8 KiB and more) before
//! every read, which under callgrind was half of the greenlet worker's
//! instructions per keep-alive request. This adapter reads into a scratch
//! buffer that is zeroed once per thread and copies only the bytes read,
//! and it does so in safe code (the crate forbids `unsafe`). Writes pass
//! straight through, as in `FuturesIo`.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use hyper::rt::ReadBufCursor;
use smol::io::{AsyncRead, AsyncWrite};

/// Bytes one read may take at most: larger than hyper's first read buffer
/// (8 KiB) so that a read of a large body is not split more than hyper's own
/// buffer would split it.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// The executor thread's read scratch: every connection task of a worker
    /// runs on that one thread, and a read never starts another read on the
    /// same thread before it returns, so one buffer serves them all.
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// A futures-io stream as a hyper IO object.
#[derive(Debug)]
pub(crate) struct HyperIo<T> {
    inner: T,
}

impl<T> HyperIo<T> {
    /// Wraps `inner`.
    pub(crate) fn new(inner: T) -> HyperIo<T> {
        HyperIo { inner }
    }
}

/// Reads from `io` into `scratch` (at most `room` bytes) and copies what was
/// read into `buf`.
fn read_via<T: AsyncRead + Unpin>(
    io: &mut T,
    cx: &mut Context<'_>,
    scratch: &mut [u8],
    buf: &mut ReadBufCursor<'_>,
) -> Poll<io::Result<()>> {
    let room = buf.remaining().min(scratch.len());
    let n = ready!(Pin::new(io).poll_read(cx, &mut scratch[..room]))?;
    buf.put_slice(&scratch[..n.min(room)]);
    Poll::Ready(Ok(()))
}

impl<T: AsyncRead + Unpin> hyper::rt::Read for HyperIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let io = &mut self.inner;
        SCRATCH_BUF.with(|scratch| match scratch.try_borrow_mut() {
            Ok(mut scratch) => read_via(io, cx, &mut scratch, &mut buf),
            // Not reached (see SCRATCH_BUF); a small buffer of its own then.
            Err(_) => read_via(io, cx, &mut [0; 4096], &mut buf),
        })
    }
}

impl<T: AsyncWrite + Unpin> hyper::rt::Write for HyperIo<T> {
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

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::mem::MaybeUninit;

    /// A reader that hands out `data` in chunks of at most `chunk` bytes and
    /// records how large each buffer it was given was.
    struct Chunks {
        data: Vec<u8>,
        chunk: usize,
        asked: Vec<usize>,
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            self.asked.push(buf.len());
            let n = self.data.len().min(self.chunk).min(buf.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            Poll::Ready(Ok(n))
        }
    }

    /// Reads `io` to its end through hyper's trait into a buffer of `cap`
    /// bytes per read, returning the bytes.
    fn read_all(io: &mut HyperIo<Chunks>, cap: usize) -> Vec<u8> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut out = Vec::new();
        loop {
            let mut storage = vec![MaybeUninit::<u8>::uninit(); cap];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut storage);
            let Poll::Ready(r) = hyper::rt::Read::poll_read(Pin::new(io), &mut cx, buf.unfilled())
            else {
                panic!("Chunks is always ready");
            };
            r.unwrap();
            if buf.filled().is_empty() {
                return out;
            }
            out.extend_from_slice(buf.filled());
        }
    }

    #[test]
    fn every_byte_arrives_once_in_order_and_no_read_asks_past_hyper_s_buffer() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        for (chunk, cap) in [(1, 16), (7, 8192), (100_000, 8192), (100_000, 200_000)] {
            let mut io = HyperIo::new(Chunks {
                data: data.clone(),
                chunk,
                asked: Vec::new(),
            });
            assert_eq!(read_all(&mut io, cap), data, "chunk {chunk}, buffer {cap}");
            let widest = io.inner.asked.iter().copied().max().unwrap();
            assert_eq!(widest, cap.min(SCRATCH), "chunk {chunk}, buffer {cap}");
        }
    }

    #[test]
    fn a_reentrant_read_still_reads() {
        let mut io = HyperIo::new(Chunks {
            data: b"GET / HTTP/1.1\r\n\r\n".to_vec(),
            chunk: 4096,
            asked: Vec::new(),
        });
        let held = SCRATCH_BUF.with(|s| {
            let _held = s.borrow_mut();
            read_all(&mut io, 8192)
        });
        assert_eq!(held, b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(io.inner.asked[0], 4096);
    }
}
