//! Where the app runs. This is the one place that decides between calling
//! the app on the current task and handing it elsewhere: workers supply a
//! [`Runner`] ([`Inline`] here; the thread worker's pool and the greenlet
//! worker's tokio-compatible runner in their crates).

use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;

use super::app::{AppFuture, BoxError, Request, Response, SharedApp};

/// Why an app produced no response.
#[derive(Debug)]
pub enum Failure {
    /// The app panicked (answered 500, `kind="panic"`).
    Panicked,
    /// The service returned an error (answered 500, `kind="app_error"`).
    Error(BoxError),
}

/// Runs the app for one request: on the current task ([`Inline`]) or
/// elsewhere (the thread worker's pool).
pub trait Runner {
    /// Calls `app` with `req`, catching panics.
    fn run(&self, app: &SharedApp, req: Request)
        -> impl Future<Output = Result<Response, Failure>>;
}

/// Drives an app future to its response, turning a panic into
/// [`Failure::Panicked`].
pub async fn catching<F>(fut: F) -> Result<Response, Failure>
where
    F: Future<Output = Result<Response, BoxError>>,
{
    match AssertUnwindSafe(fut).catch_unwind().await {
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) => Err(Failure::Error(e)),
        Err(_) => Err(Failure::Panicked),
    }
}

/// Starts `req` on `app`, catching a panic in the call itself.
pub fn start(app: &SharedApp, req: Request) -> Result<AppFuture, Failure> {
    std::panic::catch_unwind(AssertUnwindSafe(|| app.call(req))).map_err(|_| Failure::Panicked)
}

/// Calls the app on the current task.
#[derive(Debug, Clone, Copy, Default)]
pub struct Inline;

impl Runner for Inline {
    fn run(
        &self,
        app: &SharedApp,
        req: Request,
    ) -> impl Future<Output = Result<Response, Failure>> {
        let started = start(app, req);
        async move { catching(started?).await }
    }
}

thread_local! {
    static MAY_BLOCK: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current thread as one where an app may block (the sync
/// worker's thread, the thread worker's pool threads): [`run_blocking`]
/// calls run inline there.
pub fn allow_blocking() {
    MAY_BLOCK.with(|b| b.set(true));
}

/// Runs the blocking `f`: inline on a thread marked by [`allow_blocking`],
/// otherwise on a blocking thread pool so that an event loop keeps serving.
pub async fn run_blocking<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> R {
    if MAY_BLOCK.with(Cell::get) {
        f()
    } else {
        blocking::unblock(f).await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::http::app::{blocking, handler, text, IntoApp};

    #[test]
    fn inline_catches_panics_and_blocking_closures_leave_the_thread_unless_allowed() {
        let app = handler(|req: crate::http::app::FullRequest| async move {
            assert!(req.uri().path() != "/panic", "boom");
            text(http::StatusCode::ACCEPTED, "later")
        })
        .into_app();
        let ok = futures_executor::block_on(Inline.run(&app, Request::default())).unwrap();
        assert_eq!(ok.status(), 202);
        let mut req = Request::default();
        *req.uri_mut() = "/panic".parse().unwrap();
        let failed = futures_executor::block_on(Inline.run(&app, req));
        assert!(matches!(failed, Err(Failure::Panicked)));

        // The closure answers with the name of the thread it ran on.
        let app = blocking(|_| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            text(http::StatusCode::OK, name)
        })
        .into_app();
        let ran_on = |app: &SharedApp| {
            let resp = futures_executor::block_on(Inline.run(app, Request::default())).unwrap();
            let body =
                futures_executor::block_on(http_body_util::BodyExt::collect(resp.into_body()));
            body.unwrap().to_bytes()
        };
        std::thread::Builder::new()
            .name("gpe-may-not-block".into())
            .spawn({
                let app = blocking(|_| {
                    let name = std::thread::current().name().unwrap_or("").to_owned();
                    text(http::StatusCode::OK, name)
                })
                .into_app();
                move || assert_ne!(ran_on(&app), "gpe-may-not-block")
            })
            .unwrap()
            .join()
            .unwrap();
        std::thread::Builder::new()
            .name("gpe-may-block".into())
            .spawn(move || {
                allow_blocking();
                assert_eq!(ran_on(&app), "gpe-may-block");
            })
            .unwrap()
            .join()
            .unwrap();
    }
}
