//! Bodies: the streaming request [`Body`] a service reads (with
//! `max_body_size` enforced as it is read) and the response body wrapper that
//! records a request once its body has been written.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use http_body_util::Limited;
use hyper::body::Incoming;

use super::app::{BoxError, ResponseBody};

/// What a request body tells the rest of its request as it is read: the
/// bytes delivered so far and whether it ran past `max_body_size`.
#[derive(Debug, Default)]
pub(crate) struct BodyState {
    read: AtomicU64,
    overflowed: AtomicBool,
    malformed: AtomicBool,
    cut: AtomicBool,
}

impl BodyState {
    /// Body bytes delivered to the app so far.
    pub(crate) fn read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Whether the body ran past `max_body_size` (the connection must close).
    pub(crate) fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Relaxed)
    }

    /// Whether the body's framing was bad (a malformed chunk, a trailer
    /// field RFC 9110 §6.5.1 forbids): the client's error, `bad_request`.
    pub(crate) fn malformed(&self) -> bool {
        self.malformed.load(Ordering::Relaxed)
    }

    /// Whether the client went away before the end of the body
    /// (`client_disconnect`).
    pub(crate) fn cut(&self) -> bool {
        self.cut.load(Ordering::Relaxed)
    }
}

/// The body of a request, streamed to the service as the client sends it.
///
/// Reading past `max_body_size` yields an error that is an
/// [`http_body_util::LengthLimitError`] (axum answers it with 413); gpe then
/// closes the connection and counts the request as `bad_request`.
#[derive(Debug)]
pub struct Body {
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Empty,
    Full(Option<Bytes>),
    Incoming {
        inner: Limited<Incoming>,
        state: Arc<BodyState>,
    },
    Boxed(ResponseBody),
}

impl Body {
    /// An empty body.
    pub fn empty() -> Body {
        Body { kind: Kind::Empty }
    }

    /// Any other body (for tests and for services that re-wrap requests).
    pub fn new<B>(body: B) -> Body
    where
        B: http_body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Body {
            kind: Kind::Boxed(super::app::box_body(body)),
        }
    }

    /// The client's body as hyper delivers it, cut at `limit` bytes.
    pub(crate) fn incoming(inner: Incoming, limit: u64, state: Arc<BodyState>) -> Body {
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        Body {
            kind: Kind::Incoming {
                inner: Limited::new(inner, limit),
                state,
            },
        }
    }
}

impl Default for Body {
    fn default() -> Body {
        Body::empty()
    }
}

impl From<Bytes> for Body {
    fn from(b: Bytes) -> Body {
        Body {
            kind: Kind::Full(Some(b)),
        }
    }
}

impl From<&'static str> for Body {
    fn from(s: &'static str) -> Body {
        Bytes::from_static(s.as_bytes()).into()
    }
}

impl From<String> for Body {
    fn from(s: String) -> Body {
        Bytes::from(s).into()
    }
}

impl From<Vec<u8>> for Body {
    fn from(v: Vec<u8>) -> Body {
        Bytes::from(v).into()
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut self.kind {
            Kind::Empty => Poll::Ready(None),
            Kind::Full(b) => Poll::Ready(
                b.take()
                    .filter(|b| !b.is_empty())
                    .map(|b| Ok(Frame::data(b))),
            ),
            Kind::Boxed(b) => Pin::new(b).poll_frame(cx),
            Kind::Incoming { inner, state } => {
                let polled = Pin::new(inner).poll_frame(cx);
                match &polled {
                    Poll::Ready(Some(Ok(frame))) => {
                        if let Some(data) = frame.data_ref() {
                            state.read.fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        if frame.trailers_ref().is_some_and(forbidden_trailer) {
                            state.malformed.store(true, Ordering::Relaxed);
                            return Poll::Ready(Some(Err(
                                "a trailer field that RFC 9110 forbids".into()
                            )));
                        }
                    }
                    Poll::Ready(Some(Err(e))) if e.is::<http_body_util::LengthLimitError>() => {
                        state.overflowed.store(true, Ordering::Relaxed);
                    }
                    Poll::Ready(Some(Err(e))) if bad_framing(e) => {
                        state.malformed.store(true, Ordering::Relaxed);
                    }
                    Poll::Ready(Some(Err(_))) => state.cut.store(true, Ordering::Relaxed),
                    _ => {}
                }
                polled
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Empty => true,
            Kind::Full(b) => b.as_ref().is_none_or(Bytes::is_empty),
            Kind::Boxed(b) => b.is_end_stream(),
            Kind::Incoming { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Empty => SizeHint::with_exact(0),
            Kind::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            Kind::Boxed(b) => b.size_hint(),
            Kind::Incoming { inner, .. } => inner.size_hint(),
        }
    }
}

/// Whether `trailers` holds a field RFC 9110 §6.5.1 forbids in a trailer:
/// framing (Content-Length, Transfer-Encoding) and routing (Host).
fn forbidden_trailer(trailers: &http::HeaderMap) -> bool {
    [
        http::header::CONTENT_LENGTH,
        http::header::TRANSFER_ENCODING,
        http::header::HOST,
    ]
    .iter()
    .any(|name| trailers.contains_key(name))
}

/// Whether a body error is bad framing from the client (hyper's chunk
/// decoder reports `InvalidInput` or `InvalidData`), not a connection that
/// ended early (`UnexpectedEof`).
fn bad_framing(e: &BoxError) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e.as_ref());
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::InvalidInput | std::io::ErrorKind::InvalidData
            );
        }
        source = err.source();
    }
    false
}

/// Called once when a response body has been written to its end, or dropped
/// before it (`complete` false: the client went away mid-body).
pub(crate) trait OnEnd: Send + 'static {
    /// The body ended after `written` data bytes.
    fn ended(self, written: u64, complete: bool);
}

/// A response body that counts the bytes written and reports its end.
pub(crate) struct Recorded<E: OnEnd> {
    inner: ResponseBody,
    written: u64,
    on_end: Option<E>,
}

impl<E: OnEnd> Recorded<E> {
    /// Wraps `inner`. A body with nothing to write (empty, or a response that
    /// carries none such as HEAD) ends at once.
    pub(crate) fn new(inner: ResponseBody, on_end: E, no_body: bool) -> Recorded<E> {
        let mut body = Recorded {
            inner,
            written: 0,
            on_end: Some(on_end),
        };
        if no_body || http_body::Body::is_end_stream(&body.inner) {
            body.end(true);
        }
        body
    }

    fn end(&mut self, complete: bool) {
        if let Some(on_end) = self.on_end.take() {
            on_end.ended(self.written, complete);
        }
    }
}

impl<E: OnEnd> Drop for Recorded<E> {
    fn drop(&mut self) {
        self.end(false);
    }
}

impl<E: OnEnd + Unpin> http_body::Body for Recorded<E> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.written += data.len() as u64;
                }
                if http_body::Body::is_end_stream(&this.inner) {
                    this.end(true);
                }
            }
            Poll::Ready(None) => this.end(true),
            // An app body that fails mid-way is cut: the client sees an
            // incomplete response.
            Poll::Ready(Some(Err(_))) => this.end(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailers_that_frame_or_route_are_forbidden() {
        for name in ["content-length", "transfer-encoding", "host"] {
            let mut t = http::HeaderMap::new();
            t.insert(name, http::HeaderValue::from_static("1"));
            assert!(forbidden_trailer(&t), "{name}");
        }
        let mut t = http::HeaderMap::new();
        t.insert("x-checksum", http::HeaderValue::from_static("1"));
        assert!(!forbidden_trailer(&t));
    }

    #[test]
    fn bad_framing_is_told_from_an_early_end() {
        let io = |k| -> BoxError { Box::new(std::io::Error::new(k, "x")) };
        assert!(bad_framing(&io(std::io::ErrorKind::InvalidInput)));
        assert!(bad_framing(&io(std::io::ErrorKind::InvalidData)));
        assert!(!bad_framing(&io(std::io::ErrorKind::UnexpectedEof)));
        // Found through a wrapping error's source, as hyper wraps it.
        #[derive(Debug)]
        struct Wrap(std::io::Error);
        impl std::fmt::Display for Wrap {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let wrapped: BoxError = Box::new(Wrap(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "bad chunk",
        )));
        assert!(bad_framing(&wrapped));
        assert!(!bad_framing(&"not io".into()));
    }
}
