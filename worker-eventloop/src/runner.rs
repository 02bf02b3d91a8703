//! Where the app runs: async apps inline on the loop, blocking apps on
//! tokio's blocking pool (`spawn_blocking`), through core's [`StyleRunner`].

use std::future::Future;

use gpe_core::async_worker::{Offload, StyleRunner};

/// Tokio's blocking pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokioPool;

impl Offload for TokioPool {
    fn offload<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> impl Future<Output = Option<R>> + Send {
        let task = tokio::task::spawn_blocking(f);
        async move { task.await.ok() }
    }
}

/// Runs the app for the eventloop worker.
pub type AppRunner = StyleRunner<TokioPool>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use gpe_core::app::Request;
    use gpe_core::instrument::{Panicked, Runner};
    use std::time::{Duration, Instant};

    use gpe_core::app::{blocking, handler, text};
    use http::StatusCode;

    #[test]
    fn a_blocking_app_runs_off_the_loop() {
        let app = blocking(|_req| {
            std::thread::sleep(Duration::from_millis(300));
            text(StatusCode::OK, "slept")
        });
        let runner = AppRunner::for_style(app.style(), TokioPool);
        assert!(runner.offloads());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let start = Instant::now();
            let call = runner.run(&app, Request::default());
            let mut ticks = 0u32;
            let mut call = std::pin::pin!(call);
            let resp = loop {
                tokio::select! {
                    r = &mut call => break r,
                    () = tokio::time::sleep(Duration::from_millis(10)) => ticks += 1,
                }
            };
            assert_eq!(resp.unwrap().status(), StatusCode::OK);
            assert!(start.elapsed() >= Duration::from_millis(300));
            assert!(
                ticks >= 10,
                "the loop kept running while the app slept ({ticks} ticks)"
            );
        });
    }

    #[test]
    fn an_async_app_runs_inline_and_panics_become_errors() {
        let app = handler(|req: Request| async move {
            assert!(req.uri().path() != "/panic", "boom");
            text(StatusCode::ACCEPTED, "later")
        });
        let runner = AppRunner::for_style(app.style(), TokioPool);
        assert!(!runner.offloads());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ok = rt.block_on(runner.run(&app, Request::default())).unwrap();
        assert_eq!(ok.status(), StatusCode::ACCEPTED);
        let mut req = Request::default();
        *req.uri_mut() = "/panic".parse().unwrap();
        assert_eq!(rt.block_on(runner.run(&app, req)).unwrap_err(), Panicked);
    }
}
