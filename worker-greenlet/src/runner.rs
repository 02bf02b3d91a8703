//! Where the app runs: async apps inline on the loop, blocking apps on
//! smol's blocking pool (`smol::unblock`), through core's [`StyleRunner`].

use std::future::Future;

use gpe_core::async_worker::{Offload, StyleRunner};

/// Smol's blocking pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmolPool;

impl Offload for SmolPool {
    fn offload<R: Send + 'static>(
        &self,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> impl Future<Output = Option<R>> + Send {
        let task = smol::unblock(f);
        async move { Some(task.await) }
    }
}

/// Runs the app for the greenlet worker.
pub type AppRunner = StyleRunner<SmolPool>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use gpe_core::app::Request;
    use gpe_core::instrument::{Panicked, Runner};
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
        let runner = AppRunner::for_style(app.style(), SmolPool);
        assert!(runner.offloads());
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
        let runner = AppRunner::for_style(app.style(), SmolPool);
        assert!(!runner.offloads());
        let ok = smol::block_on(runner.run(&app, Request::default())).unwrap();
        assert_eq!(ok.status(), StatusCode::ACCEPTED);
        let mut req = Request::default();
        *req.uri_mut() = "/panic".parse().unwrap();
        assert_eq!(smol::block_on(runner.run(&app, req)).unwrap_err(), Panicked);
    }
}
