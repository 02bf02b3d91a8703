//! Where the app runs: async apps inline on the loop, blocking apps on tokio's
//! blocking pool.

use std::future::Future;

use futures_util::future::Either;
use gpe_core::app::{AppStyle, Request, Response, SharedApp};
use gpe_core::instrument::{call_blocking, Inline, Panicked, Runner};

/// Runs the app for the eventloop worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppRunner {
    /// On the loop: for async apps, whose futures do not block.
    Inline,
    /// On tokio's blocking pool (`spawn_blocking`): for blocking apps.
    BlockingPool,
}

impl AppRunner {
    /// The runner for an app of `style`.
    pub fn for_style(style: AppStyle) -> AppRunner {
        match style {
            AppStyle::Async => AppRunner::Inline,
            AppStyle::Blocking => AppRunner::BlockingPool,
        }
    }
}

impl Runner for AppRunner {
    fn run(
        &self,
        app: &SharedApp,
        req: Request,
    ) -> impl Future<Output = Result<Response, Panicked>> + Send {
        match self {
            AppRunner::Inline => Either::Left(Inline.run(app, req)),
            AppRunner::BlockingPool => {
                let app = app.clone();
                let call = tokio::task::spawn_blocking(move || call_blocking(&app, req));
                // `call_blocking` catches panics; a join error means cancellation.
                Either::Right(async move { call.await.unwrap_or(Err(Panicked)) })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use gpe_core::app::{blocking, handler, text};
    use http::StatusCode;

    #[test]
    fn a_blocking_app_runs_off_the_loop() {
        let app = blocking(|_req| {
            std::thread::sleep(Duration::from_millis(300));
            text(StatusCode::OK, "slept")
        });
        let runner = AppRunner::for_style(app.style());
        assert_eq!(runner, AppRunner::BlockingPool);
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
        let runner = AppRunner::for_style(app.style());
        assert_eq!(runner, AppRunner::Inline);
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
