//! HTTP/2 on a connection: its streams, run inside the connection's own
//! task ([`Streams`]), the prior-knowledge preface check ([`sniff`]) and the
//! drive loop with its drain and idle GOAWAY.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use futures_util::future::LocalBoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use hyper::rt::{Read, ReadBufCursor, Sleep, Timer, Write};

use super::conn::{Graceful, H2Limits, Policy};

/// A runtime's hyper timer behind one type.
#[derive(Clone)]
pub(super) struct SharedTimer(pub(super) Arc<dyn Timer + Send + Sync>);

impl Timer for SharedTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn Sleep>> {
        self.0.sleep(duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn Sleep>> {
        self.0.sleep_until(deadline)
    }

    fn now(&self) -> Instant {
        self.0.now()
    }

    fn reset(&self, sleep: &mut Pin<Box<dyn Sleep>>, new_deadline: Instant) {
        self.0.reset(sleep, new_deadline);
    }
}

/// The executor of one HTTP/2 connection: hyper hands it each stream, and
/// [`drive_h2`] polls them in the connection's task. hyper's executors must
/// spawn `'static` tasks otherwise, which the borrowed service cannot be,
/// and the spawn differs between tokio and smol.
#[derive(Clone, Default)]
pub struct Streams<'a>(Rc<RefCell<Queued<'a>>>);

#[derive(Default)]
struct Queued<'a> {
    new: Vec<LocalBoxFuture<'a, ()>>,
    waker: Option<Waker>,
}

impl<'a, F> hyper::rt::Executor<F> for Streams<'a>
where
    F: Future<Output = ()> + 'a,
{
    fn execute(&self, fut: F) {
        let mut q = self.0.borrow_mut();
        q.new.push(Box::pin(fut));
        if let Some(w) = q.waker.take() {
            w.wake();
        }
    }
}

/// The HTTP/2 client preface (RFC 9113, section 3.4).
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A connection whose first bytes were read already (to look for the
/// HTTP/2 preface, or the sync worker's head check), and are read again by
/// hyper before the rest. (hyper-util's auto builder does the same for the
/// preface, but would need a second copy of the http/1 configuration.)
#[derive(Debug)]
pub struct Rewind<I> {
    prefix: Vec<u8>,
    read: usize,
    io: I,
}

impl<I> Rewind<I> {
    /// `io`, with `prefix` read first.
    pub fn new(prefix: Vec<u8>, io: I) -> Rewind<I> {
        Rewind {
            prefix,
            read: 0,
            io,
        }
    }
}

impl<I: Read + Unpin> Read for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.read < this.prefix.len() {
            let rest = &this.prefix[this.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: Write + Unpin> Write for Rewind<I> {
    write_through_io!();
}

/// Reads until the bytes are the preface, differ from it, or end; whether
/// they were the preface, and the connection to hand to hyper.
pub(super) async fn sniff<I: Read + Unpin>(mut io: I) -> std::io::Result<(bool, Rewind<I>)> {
    let mut prefix = Vec::with_capacity(PREFACE.len());
    while prefix.len() < PREFACE.len() && PREFACE.starts_with(&prefix) {
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 24];
        let want = PREFACE.len() - prefix.len();
        let mut buf = hyper::rt::ReadBuf::uninit(&mut chunk[..want]);
        std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, buf.unfilled())).await?;
        if buf.filled().is_empty() {
            break;
        }
        prefix.extend_from_slice(buf.filled());
    }
    let h2 = prefix == PREFACE;
    Ok((h2, Rewind::new(prefix, io)))
}

pub(super) async fn serve_h2<I, S, B, D>(
    io: I,
    service: S,
    policy: &Policy,
    h2: &H2Limits,
    drain: D,
    draining: &AtomicBool,
) -> hyper::Result<()>
where
    I: Read + Write + Unpin,
    S: hyper::service::HttpService<hyper::body::Incoming, ResBody = B>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: http_body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    D: Future<Output = ()>,
{
    let streams = Streams::default();
    let builder = policy.http2_builder(h2, streams.clone());
    let conn = builder.serve_connection(io, service);
    drive_h2(conn, &streams, drain, draining, &policy.timer, h2.idle).await
}

/// Most rounds of "poll the connection, then the streams it opened" in one
/// poll, so that one busy connection yields to the others.
const H2_ROUNDS: usize = 32;

/// Drives an HTTP/2 connection and its streams. A drain sends GOAWAY (the
/// open streams finish); so does `idle` without an open stream. When the
/// connection ends, streams still open are dropped (counted as client
/// disconnects by the response body's recorder).
async fn drive_h2<C, D>(
    conn: C,
    streams: &Streams<'_>,
    drain: D,
    draining: &AtomicBool,
    timer: &SharedTimer,
    idle: Duration,
) -> hyper::Result<()>
where
    C: Graceful,
    D: Future<Output = ()>,
{
    let mut conn = std::pin::pin!(conn);
    let mut drain = std::pin::pin!(drain);
    let mut open: FuturesUnordered<LocalBoxFuture<'_, ()>> = FuturesUnordered::new();
    let mut idle_since: Option<Pin<Box<dyn Sleep>>> = None;
    let mut closing = false;
    std::future::poll_fn(|cx| {
        for _ in 0..H2_ROUNDS {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(r);
            }
            {
                let mut q = streams.0.borrow_mut();
                q.waker = Some(cx.waker().clone());
                open.extend(q.new.drain(..));
            }
            while let Poll::Ready(Some(())) = open.poll_next_unpin(cx) {}
            if streams.0.borrow().new.is_empty() {
                break;
            }
        }
        if !closing && drain.as_mut().poll(cx).is_ready() {
            closing = true;
            draining.store(true, Ordering::Relaxed);
            conn.as_mut().shutdown();
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        if open.is_empty() && !closing {
            let sleep = idle_since.get_or_insert_with(|| timer.sleep(idle));
            if sleep.as_mut().poll(cx).is_ready() {
                closing = true;
                conn.as_mut().shutdown();
                cx.waker().wake_by_ref();
            }
        } else {
            idle_since = None;
        }
        Poll::Pending
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Everything `io` yields until its end.
    async fn read_all<I: Read + Unpin>(mut io: I) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); 7];
            let mut buf = hyper::rt::ReadBuf::uninit(&mut chunk);
            std::future::poll_fn(|cx| Pin::new(&mut io).poll_read(cx, buf.unfilled()))
                .await
                .unwrap();
            if buf.filled().is_empty() {
                return out;
            }
            out.extend_from_slice(buf.filled());
        }
    }

    #[test]
    fn sniffing_finds_the_preface_and_hands_every_byte_on() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let h2 = [PREFACE, b"\x00\x00\x00\x04\x00\x00\x00\x00\x00".as_slice()].concat();
            let cases: [(&[u8], bool); 4] = [
                (&h2, true),
                (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", false),
                (b"PRI * HTTP/1.1\r\n\r\n", false),
                (b"PR", false),
            ];
            for (sent, want) in cases {
                let (client, server) = tokio::io::duplex(64);
                let mut client = client;
                // Written in pieces, then closed.
                for piece in sent.chunks(5) {
                    client.write_all(piece).await.unwrap();
                }
                drop(client);
                let io = hyper_util::rt::TokioIo::new(server);
                let (h2, io) = sniff(io).await.unwrap();
                assert_eq!(h2, want, "{:?}", String::from_utf8_lossy(sent));
                assert_eq!(read_all(io).await, sent);
            }
        });
    }
}
