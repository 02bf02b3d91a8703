//! The application interface: what a worker calls for each request, and the
//! factory every worker calls once after fork to build its app.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;

/// A request as the app sees it: head plus the whole body.
pub type Request = http::Request<Bytes>;
/// A response as the app returns it.
pub type Response = http::Response<Bytes>;
/// A boxed, sendable future of a response.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response> + Send + 'static>>;
/// A boxed error, returned by app factories.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What [`App::call`] returns: a response computed on the calling thread, or a
/// future for an async app.
pub enum Reply {
    /// The response is ready (blocking apps).
    Ready(Response),
    /// The response comes from a future (async apps).
    Pending(ResponseFuture),
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reply::Ready(r) => f.debug_tuple("Ready").field(&r.status()).finish(),
            Reply::Pending(_) => f.write_str("Pending"),
        }
    }
}

/// Whether an app blocks the calling thread or returns futures; workers use it
/// to decide where to run the app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppStyle {
    /// `call` does the work on the calling thread.
    Blocking,
    /// `call` returns quickly with a future.
    Async,
}

/// An HTTP application served by gpe workers.
///
/// Build one from a closure with [`blocking`] or [`handler`]. A panic inside
/// `call` (or its future) is caught by the worker, answered with 500 and
/// counted as `kind="panic"`.
pub trait App: Send + Sync + 'static {
    /// Serves one request.
    fn call(&self, req: Request) -> Reply;

    /// How `call` behaves (blocking by default).
    fn style(&self) -> AppStyle {
        AppStyle::Blocking
    }
}

impl std::fmt::Debug for dyn App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "App({:?})", self.style())
    }
}

/// A shared app.
pub type SharedApp = Arc<dyn App>;

/// Builds the app inside each worker after fork. An error makes that worker
/// exit with the boot-error code.
pub type AppFactory = Arc<dyn Fn() -> Result<SharedApp, BoxError> + Send + Sync + 'static>;

struct Blocking<F>(F);

impl<F> App for Blocking<F>
where
    F: Fn(Request) -> Response + Send + Sync + 'static,
{
    fn call(&self, req: Request) -> Reply {
        Reply::Ready((self.0)(req))
    }
}

struct Async<F>(F);

impl<F, Fut> App for Async<F>
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    fn call(&self, req: Request) -> Reply {
        Reply::Pending(Box::pin((self.0)(req)))
    }

    fn style(&self) -> AppStyle {
        AppStyle::Async
    }
}

/// An app from a blocking closure: the right fit for the sync and thread workers.
pub fn blocking<F>(f: F) -> SharedApp
where
    F: Fn(Request) -> Response + Send + Sync + 'static,
{
    Arc::new(Blocking(f))
}

/// An app from an async closure: the right fit for the eventloop and greenlet
/// workers.
pub fn handler<F, Fut>(f: F) -> SharedApp
where
    F: Fn(Request) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Response> + Send + 'static,
{
    Arc::new(Async(f))
}

/// The route template of a response, as the app declares it with [`with_route`].
/// It becomes the `route` label; without it the request path is used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route(pub &'static str);

/// Tags `resp` with the route template that matched (for example
/// `/sleep/{ms}`), keeping the `route` label bounded.
pub fn with_route(mut resp: Response, template: &'static str) -> Response {
    resp.extensions_mut().insert(Route(template));
    resp
}

/// A plain-text response with `status`.
pub fn text(status: http::StatusCode, body: impl Into<Bytes>) -> Response {
    let mut resp = http::Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closures_become_apps_with_their_style() {
        let b = blocking(|_req| text(http::StatusCode::OK, "hi"));
        assert_eq!(b.style(), AppStyle::Blocking);
        assert!(matches!(b.call(Request::new(Bytes::new())), Reply::Ready(r) if r.status() == 200));
        let a = handler(|_req| async { text(http::StatusCode::ACCEPTED, "later") });
        assert_eq!(a.style(), AppStyle::Async);
        assert!(matches!(
            a.call(Request::new(Bytes::new())),
            Reply::Pending(_)
        ));
        let r = with_route(text(http::StatusCode::OK, ""), "/x/{id}");
        assert_eq!(r.extensions().get::<Route>(), Some(&Route("/x/{id}")));
    }
}
