//! axum's matched path as gpe's `route` label (cargo feature `axum`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::extract::MatchedPath;
use gpe_core::Route;

/// A tower layer that names each response's route after the axum route that
/// matched it (`/users/{id}`), so the `route` label stays bounded with one
/// line of code: `Router::new().route(..).layer(gpe::MatchedPathLayer)`.
/// A response that already names a route (with [`with_route`](crate::with_route))
/// keeps it; one that no route matched is labelled by `unmatched_route`.
#[derive(Debug, Clone, Copy, Default)]
pub struct MatchedPathLayer;

impl<S> tower::Layer<S> for MatchedPathLayer {
    type Service = MatchedPathService<S>;

    fn layer(&self, inner: S) -> MatchedPathService<S> {
        MatchedPathService { inner }
    }
}

/// The service of [`MatchedPathLayer`].
#[derive(Debug, Clone)]
pub struct MatchedPathService<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for MatchedPathService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = http::Response<RB>;
    type Error = S::Error;
    type Future = MatchedPathFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let matched = req
            .extensions()
            .get::<MatchedPath>()
            .map(|p| Route::owned(p.as_str().to_owned()));
        MatchedPathFuture {
            inner: self.inner.call(req),
            matched,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of [`MatchedPathService`]: the inner service's, naming the
    /// response's route when it is ready. A named type rather than a boxed
    /// future: one allocation and one move less per request.
    #[derive(Debug)]
    pub struct MatchedPathFuture<F> {
        #[pin]
        inner: F,
        matched: Option<Route>,
    }
}

impl<F, RB, E> Future for MatchedPathFuture<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = Result<http::Response<RB>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut resp = std::task::ready!(this.inner.poll(cx))?;
        if let Some(route) = this.matched.take() {
            if resp.extensions().get::<Route>().is_none() {
                resp.extensions_mut().insert(route);
            }
        }
        Poll::Ready(Ok(resp))
    }
}
