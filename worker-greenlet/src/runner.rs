//! Where the app runs: async apps inline on the executor, blocking apps on
//! smol's blocking pool.

use std::future::Future;

use futures_util::future::Either;
use gpe_core::app::{AppStyle, Request, Response, SharedApp};
use gpe_core::instrument::{call_blocking, Inline, Panicked, Runner};

/// Runs the app for the greenlet worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppRunner {
    /// On the executor: for async apps, whose futures do not block.
    Inline,
    /// On smol's blocking pool (`smol::unblock`): for blocking apps.
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
                Either::Right(smol::unblock(move || call_blocking(&app, req)))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use futures_util::future::{select, Either};
    use gpe_core::app::{blocking, handler, text};
    use http::StatusCode;
    use smol::Timer;

    #[test]
    fn a_blocking_app_runs_off_the_loop() {
        let app = blocking(|_req| {
            std::thread::sleep(Duration::from_millis(300));
            text(StatusCode::OK, "slept")
        });
        let runner = AppRunner::for_style(app.style());
        assert_eq!(runner, AppRunner::BlockingPool);
        smol::block_on(async {
            let start = Instant::now();
            let mut call = std::pin::pin!(runner.run(&app, Request::default()));
            let mut ticks = 0u32;
            let resp = loop {
                match select(call.as_mut(), Timer::after(Duration::from_millis(10))).await {
                    Either::Left((r, _)) => break r,
                    Either::Right(_) => ticks += 1,
                }
            };
            assert_eq!(resp.unwrap().status(), StatusCode::OK);
            assert!(start.elapsed() >= Duration::from_millis(300));
            assert!(
                ticks >= 10,
                "the executor kept running while the app slept ({ticks} ticks)"
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
        let ok = smol::block_on(runner.run(&app, Request::default())).unwrap();
        assert_eq!(ok.status(), StatusCode::ACCEPTED);
        let mut req = Request::default();
        *req.uri_mut() = "/panic".parse().unwrap();
        assert_eq!(smol::block_on(runner.run(&app, req)).unwrap_err(), Panicked);
    }
}
