//! Where the greenlet worker runs the app: on the smol executor, inside
//! async-compat's [`Compat`] so that futures that need tokio (tokio::time,
//! tokio::net, tokio::spawn and crates built on them, axum's WebSocket among
//! them) work too. async-compat starts one tokio runtime thread per worker
//! process the first time a request needs it, after fork; entering its
//! context costs each poll of the app's future a thread-local swap.

use std::future::Future;

use async_compat::Compat;
use gpe_core::http::run::{catching, start, Failure, Runner};
use gpe_core::{Request, Response, SharedApp};

/// Runs the app on the current smol task with a tokio context.
#[derive(Debug, Clone, Copy, Default)]
pub struct CompatRunner;

impl Runner for CompatRunner {
    fn run(
        &self,
        app: &SharedApp,
        req: Request,
    ) -> impl Future<Output = Result<Response, Failure>> {
        let started = start(app, req);
        async move { catching(Compat::new(started?)).await }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    use gpe_core::{handler, text, FullRequest, IntoApp};
    use http::StatusCode;

    #[test]
    fn tokio_futures_run_under_smol() {
        let app = handler(|_req: FullRequest| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let spawned = tokio::spawn(async { 41 + 1 }).await.unwrap();
            text(StatusCode::OK, spawned.to_string())
        })
        .into_app();
        let resp = smol::block_on(CompatRunner.run(&app, Request::default())).unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = smol::block_on(http_body_util::BodyExt::collect(resp.into_body()));
        assert_eq!(body.unwrap().to_bytes(), "42");
    }

    #[test]
    fn panics_become_failures() {
        let app = handler(|_req: FullRequest| async { panic!("boom") }).into_app();
        let failed = smol::block_on(CompatRunner.run(&app, Request::default()));
        assert!(matches!(failed, Err(Failure::Panicked)));
    }
}
