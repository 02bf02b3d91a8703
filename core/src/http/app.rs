//! The application interface: a tower [`Service`] over streaming bodies, the
//! factory every worker calls once after fork, and the small adapters
//! ([`blocking`], [`handler`]) that turn closures into such a service.
//!
//! Any `Service<http::Request<Body>>` that is `Clone + Send + 'static`, whose
//! future is `Send`, whose response is `http::Response<B>` with
//! `B: http_body::Body<Data = Bytes>` and whose error converts into a
//! [`BoxError`] is an app: an axum `Router` is served unchanged.

use std::any::Any;
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use tower::Service;

pub use super::body::Body;

/// A boxed error, as services and bodies return them.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The response body gpe writes: any app body, boxed once.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// A request as a service receives it: the head and a streaming [`Body`].
pub type Request = http::Request<Body>;

/// A response as gpe writes it.
pub type Response = http::Response<ResponseBody>;

/// A request with its whole body read, as [`blocking`] and [`handler`]
/// closures receive it.
pub type FullRequest = http::Request<Bytes>;

/// A response with its whole body, as [`blocking`] and [`handler`] closures
/// return it (see [`text`]).
pub type FullResponse = http::Response<Bytes>;

/// The future of one call of an [`App`].
pub type AppFuture = Pin<Box<dyn Future<Output = Result<Response, BoxError>> + Send + 'static>>;

/// An app as a worker holds it: a type-erased service that can be called
/// through a shared reference (each call works on its own clone), from any
/// thread (the thread worker serves connections on its pool threads).
pub trait App: Send + Sync + 'static {
    /// Starts one request. The returned future does all the work (readiness
    /// and the service call), so it can run on any thread.
    fn call(&self, req: Request) -> AppFuture;
}

impl std::fmt::Debug for dyn App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("App")
    }
}

/// The app of one worker process.
pub type SharedApp = Box<dyn App>;

/// Builds the app inside each worker after fork. An error makes that worker
/// exit with the boot-error code.
pub type AppFactory = Arc<dyn Fn() -> Result<SharedApp, BoxError> + Send + Sync + 'static>;

/// A tower service as an [`App`]. The service sits behind a mutex, held
/// only while it is cloned for a call, so that a service that is `Send` but
/// not `Sync` (tower's `BoxCloneService`) can still be called from several
/// threads.
struct ServiceApp<S>(std::sync::Mutex<S>);

impl<S, B> App for ServiceApp<S>
where
    S: Service<Request, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn call(&self, req: Request) -> AppFuture {
        // A panic while cloning leaves the service as it was: use it.
        let mut svc = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        Box::pin(async move {
            // What `ServiceExt::oneshot` does, without moving the request
            // through its state machine: readiness, then the call.
            std::future::poll_fn(|cx| svc.poll_ready(cx))
                .await
                .map_err(Into::into)?;
            let resp = svc.call(req).await.map_err(Into::into)?;
            Ok(resp.map(box_body))
        })
    }
}

/// `body` as a [`ResponseBody`], boxing it only if it is not one already.
pub fn box_body<B>(body: B) -> ResponseBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut slot = Some(body);
    if let Some(boxed) = (&mut slot as &mut dyn Any).downcast_mut::<Option<ResponseBody>>() {
        if let Some(boxed) = boxed.take() {
            return boxed;
        }
    }
    match slot {
        Some(body) => body.map_err(Into::into).boxed_unsync(),
        None => empty_body(),
    }
}

/// A whole [`FullResponse`] as a [`Response`].
pub fn full(resp: FullResponse) -> Response {
    resp.map(|b| box_body(Full::new(b)))
}

/// An empty [`ResponseBody`].
pub fn empty_body() -> ResponseBody {
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// `service` as an app: what a factory returns for an axum `Router` or any
/// other tower service.
pub fn service<S, B>(service: S) -> SharedApp
where
    S: Service<Request, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    Box::new(ServiceApp(std::sync::Mutex::new(service)))
}

/// What an app factory may return: a [`SharedApp`] already, or any tower
/// service (an axum `Router`, a `tower::ServiceBuilder` stack, ...).
pub trait IntoApp {
    /// The app.
    fn into_app(self) -> SharedApp;
}

impl<S, B> IntoApp for S
where
    S: Service<Request, Response = http::Response<B>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<BoxError>,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    fn into_app(self) -> SharedApp {
        service(self)
    }
}

/// Reads the whole `body` of a request (bounded by `max_body_size`, which
/// the [`Body`] enforces). A body over the limit answers 413.
async fn buffered(parts: http::request::Parts, body: Body) -> Result<FullRequest, FullResponse> {
    match body.collect().await {
        Ok(c) => Ok(FullRequest::from_parts(parts, c.to_bytes())),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(text(
            http::StatusCode::PAYLOAD_TOO_LARGE,
            "Payload Too Large",
        )),
        Err(_) => Err(text(http::StatusCode::BAD_REQUEST, "Bad Request")),
    }
}

/// The service behind [`handler`] and [`blocking`].
#[derive(Debug)]
pub struct Handler<F>(Arc<F>);

impl<F> Clone for Handler<F> {
    fn clone(&self) -> Self {
        Handler(self.0.clone())
    }
}

impl<F, Fut> Service<Request> for Handler<F>
where
    F: Fn(FullRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = FullResponse> + Send + 'static,
{
    type Response = http::Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let f = self.0.clone();
        // Most requests have no body: hand the closure its request at once
        // instead of moving the request through `buffered`'s future. The
        // closure itself still runs only when the future is polled.
        let (parts, body) = req.into_parts();
        if http_body::Body::is_end_stream(&body) {
            let req = FullRequest::from_parts(parts, Bytes::new());
            return Box::pin(async move { Ok(f(req).await.map(Full::new)) });
        }
        Box::pin(async move {
            let resp = match buffered(parts, body).await {
                Ok(req) => f(req).await,
                Err(resp) => resp,
            };
            Ok(resp.map(Full::new))
        })
    }
}

/// An app from an async closure over a buffered request. Use a tower service
/// (or an axum `Router`) to stream bodies instead.
pub fn handler<F, Fut>(f: F) -> Handler<F>
where
    F: Fn(FullRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = FullResponse> + Send + 'static,
{
    Handler(Arc::new(f))
}

/// An app from a blocking closure over a buffered request. The closure runs
/// where blocking is allowed: inline on the sync worker and on the thread
/// worker's pool threads, on a blocking thread pool under eventloop and
/// greenlet, so it never stalls an event loop.
pub fn blocking<F>(
    f: F,
) -> Handler<impl Fn(FullRequest) -> Pin<Box<dyn Future<Output = FullResponse> + Send>> + Send + Sync>
where
    F: Fn(FullRequest) -> FullResponse + Send + Sync + 'static,
{
    let f = Arc::new(f);
    handler(
        move |req: FullRequest| -> Pin<Box<dyn Future<Output = FullResponse> + Send>> {
            let f = f.clone();
            Box::pin(super::run::run_blocking(move || f(req)))
        },
    )
}

/// The route template of a response, as the app names it with
/// [`with_route`] (or gpe's axum layer from axum's `MatchedPath`). It becomes
/// the `route` label; a response without one is labelled by the
/// `unmatched_route` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route(Cow<'static, str>);

impl Route {
    /// A route named by a static template.
    pub const fn new(template: &'static str) -> Route {
        Route(Cow::Borrowed(template))
    }

    /// A route named at run time (for example a router's matched path).
    pub fn owned(template: String) -> Route {
        Route(Cow::Owned(template))
    }

    /// The template.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Tags `resp` with the route template that matched (for example
/// `/sleep/{ms}`), keeping the `route` label bounded.
pub fn with_route<B>(mut resp: http::Response<B>, template: &'static str) -> http::Response<B> {
    resp.extensions_mut().insert(Route::new(template));
    resp
}

/// A plain-text response with `status`.
pub fn text(status: http::StatusCode, body: impl Into<Bytes>) -> FullResponse {
    let mut resp = http::Response::new(body.into());
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn get(path: &str) -> Request {
        http::Request::builder()
            .uri(path)
            .body(Body::from("body"))
            .unwrap()
    }

    async fn body_of(resp: Response) -> Bytes {
        resp.into_body().collect().await.unwrap().to_bytes()
    }

    #[test]
    fn closures_become_services_that_see_the_whole_body() {
        let b = blocking(|req: FullRequest| text(http::StatusCode::OK, req.into_body())).into_app();
        let resp = futures_executor::block_on(b.call(get("/"))).unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(futures_executor::block_on(body_of(resp)), "body");
        let a = handler(|req: FullRequest| async move {
            with_route(
                text(http::StatusCode::ACCEPTED, req.uri().path().to_owned()),
                "/{p}",
            )
        })
        .into_app();
        let resp = futures_executor::block_on(a.call(get("/x"))).unwrap();
        assert_eq!(resp.status(), 202);
        assert_eq!(resp.extensions().get::<Route>(), Some(&Route::new("/{p}")));
        assert_eq!(futures_executor::block_on(body_of(resp)), "/x");
    }

    #[test]
    fn a_boxed_body_is_not_boxed_again() {
        let boxed = box_body(Full::new(Bytes::from_static(b"x")));
        let hint = http_body::Body::size_hint(&boxed).exact();
        let again = box_body(boxed);
        assert_eq!(http_body::Body::size_hint(&again).exact(), hint);
        assert_eq!(hint, Some(1));
    }
}
