//! Where the greenlet worker runs the app: on the smol executor, inside a
//! tokio context, so that futures that need tokio (tokio::time, tokio::net,
//! tokio::spawn and crates built on them, axum's WebSocket and SSE among
//! them) work too.
//!
//! Each worker process starts one tokio runtime with one worker thread
//! (after fork). Every poll of the app's future and of its response body
//! enters that runtime's context: its timers and sockets are driven by the
//! runtime's thread, and tasks the app spawns run there. async-compat does
//! the same for futures only; a response body (an SSE stream that awaits a
//! tokio timer) needs it too, so this small wrapper covers both.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use gpe_core::{box_body, BoxError};
use gpe_core::{catching, start_call as start, Failure, Runner};
use gpe_core::{Request, Response, SharedApp};
use http_body::Frame;
use tokio::runtime::Handle;

/// `inner`, polled inside the tokio context of `handle`.
#[derive(Debug)]
struct InTokio<T> {
    inner: T,
    handle: Handle,
}

impl<F: Future + Unpin> Future for InTokio<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        let _context = this.handle.enter();
        Pin::new(&mut this.inner).poll(cx)
    }
}

impl<B> http_body::Body for InTokio<B>
where
    B: http_body::Body<Data = Bytes, Error = BoxError> + Unpin,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let _context = this.handle.enter();
        Pin::new(&mut this.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// Runs the app on the current smol task with a tokio context.
#[derive(Debug, Clone)]
pub struct CompatRunner {
    handle: Handle,
}

impl CompatRunner {
    /// A runner entering `handle`'s context.
    pub fn new(handle: Handle) -> CompatRunner {
        CompatRunner { handle }
    }
}

impl Runner for CompatRunner {
    fn run(
        &self,
        app: &SharedApp,
        req: Request,
    ) -> impl Future<Output = Result<Response, Failure>> {
        let handle = self.handle.clone();
        let started = {
            let _context = handle.enter();
            start(app, req)
        };
        async move {
            let fut = InTokio {
                inner: started?,
                handle: handle.clone(),
            };
            let resp = catching(fut).await?;
            Ok(resp.map(|body| {
                if http_body::Body::is_end_stream(&body) {
                    body
                } else {
                    box_body(InTokio {
                        inner: body,
                        handle,
                    })
                }
            }))
        }
    }
}

/// The tokio runtime of a greenlet worker: one worker thread that drives
/// tokio's timers and sockets and runs the tasks an app spawns.
///
/// # Errors
/// The runtime could not be built.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("gpe-tokio")
        .enable_all()
        .build()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    use gpe_core::{handler, text, FullRequest, IntoApp};
    use http::StatusCode;
    use http_body_util::BodyExt;

    #[test]
    fn tokio_futures_and_bodies_run_under_smol() {
        let rt = runtime().unwrap();
        let app = handler(|_req: FullRequest| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let spawned = tokio::spawn(async { 41 + 1 }).await.unwrap();
            text(StatusCode::OK, spawned.to_string())
        })
        .into_app();
        let runner = CompatRunner::new(rt.handle().clone());
        let resp = smol::block_on(runner.run(&app, Request::default())).unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = smol::block_on(resp.into_body().collect());
        assert_eq!(body.unwrap().to_bytes(), "42");

        // A streamed body whose frames wait on tokio timers.
        let app = tower::service_fn(|_req: Request| async {
            let frames = futures_util::stream::unfold(0u8, |n| async move {
                if n == 3 {
                    return None;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
                let frame = Frame::data(Bytes::from(vec![b'a' + n]));
                Some((Ok::<_, BoxError>(frame), n + 1))
            });
            let body = http_body_util::StreamBody::new(frames);
            Ok::<_, std::convert::Infallible>(http::Response::new(body))
        })
        .into_app();
        let resp = smol::block_on(runner.run(&app, Request::default())).unwrap();
        let body = smol::block_on(resp.into_body().collect());
        assert_eq!(body.unwrap().to_bytes(), "abc");
    }

    #[test]
    fn panics_become_failures() {
        let rt = runtime().unwrap();
        let app = handler(|_req: FullRequest| async { panic!("boom") }).into_app();
        let runner = CompatRunner::new(rt.handle().clone());
        let failed = smol::block_on(runner.run(&app, Request::default()));
        assert!(matches!(failed, Err(Failure::Panicked)));
    }
}
