//! Hands each request of a connection to the pool and keeps the two counts the
//! IO loop decides with: the worker's share of requests (`max_requests`) and
//! the load (requests in the pool plus accepted connections that have not
//! sent their first request yet). Accepting waits while the load fills the
//! pool, so a process takes only connections it can serve now and leaves the
//! rest in the shared backlog for a worker with idle threads.

use std::cell::Cell;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use futures_util::future::Either;
use gpe_core::app::{AppStyle, Request, Response, SharedApp};
use gpe_core::instrument::{Inline, Panicked, Runner};
use tokio::sync::Notify;

use crate::pool::PoolRunner;

/// Requests in the pool plus connections awaiting their first request.
#[derive(Debug)]
pub(crate) struct Load {
    busy: AtomicUsize,
    limit: usize,
    freed: Notify,
}

impl Load {
    /// A load gauge for a pool of `threads`.
    pub(crate) fn new(threads: usize) -> Arc<Load> {
        Arc::new(Load {
            busy: AtomicUsize::new(0),
            limit: threads.max(1),
            freed: Notify::new(),
        })
    }

    /// Whether a new connection could be served now.
    pub(crate) fn has_room(&self) -> bool {
        self.busy.load(Ordering::Relaxed) < self.limit
    }

    /// Completes after the load dropped from full (or if it already did since
    /// the last call).
    pub(crate) async fn freed(&self) {
        self.freed.notified().await;
    }

    fn take(self: &Arc<Load>) -> Unit {
        self.busy.fetch_add(1, Ordering::Relaxed);
        Unit(self.clone())
    }
}

/// One unit of load, given back on drop.
#[derive(Debug)]
struct Unit(Arc<Load>);

impl Drop for Unit {
    fn drop(&mut self) {
        if self.0.busy.fetch_sub(1, Ordering::Relaxed) >= self.0.limit {
            self.0.freed.notify_one();
        }
    }
}

/// The worker's share of requests, counted as they are handed to the pool so
/// that draining starts without waiting for the next tick.
#[derive(Debug)]
pub(crate) struct Budget {
    left: Cell<u64>,
    spent: Notify,
}

impl Budget {
    fn new(n: u64) -> Budget {
        Budget {
            left: Cell::new(n),
            spent: Notify::new(),
        }
    }

    fn take_one(&self) {
        let left = self.left.get();
        if left > 0 {
            self.left.set(left - 1);
            if left == 1 {
                self.spent.notify_one();
            }
        }
    }
}

/// What connections share: the pool, the load and the budget. Lives on the
/// IO thread.
#[derive(Debug)]
pub(crate) struct Dispatcher {
    pool: PoolRunner,
    load: Arc<Load>,
    budget: Option<Rc<Budget>>,
}

impl Dispatcher {
    /// Dispatches to `pool`, sized `threads`, retiring after `max_requests`.
    pub(crate) fn new(pool: PoolRunner, threads: usize, max_requests: Option<u64>) -> Dispatcher {
        Dispatcher {
            pool,
            load: Load::new(threads),
            budget: max_requests.map(|n| Rc::new(Budget::new(n))),
        }
    }

    /// The load gauge.
    pub(crate) fn load(&self) -> &Load {
        &self.load
    }

    /// Completes once the budget (if any) is spent.
    pub(crate) async fn spent(&self) {
        match &self.budget {
            Some(b) => b.spent.notified().await,
            None => std::future::pending().await,
        }
    }

    /// The runner of a newly accepted connection; it counts as load until its
    /// first request is handed over or it closes.
    pub(crate) fn connection(&self) -> Dispatch {
        Dispatch {
            pool: self.pool.clone(),
            budget: self.budget.clone(),
            load: self.load.clone(),
            first: Cell::new(Some(self.load.take())),
        }
    }
}

/// The [`Runner`] of one connection.
pub(crate) struct Dispatch {
    pool: PoolRunner,
    budget: Option<Rc<Budget>>,
    load: Arc<Load>,
    first: Cell<Option<Unit>>,
}

impl std::fmt::Debug for Dispatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatch").finish_non_exhaustive()
    }
}

impl Runner for Dispatch {
    fn run(
        &self,
        app: &SharedApp,
        req: Request,
    ) -> impl Future<Output = Result<Response, Panicked>> + Send {
        if let Some(b) = &self.budget {
            b.take_one();
        }
        let unit = self.first.take().unwrap_or_else(|| self.load.take());
        // An async app does not block: it runs on the IO thread, saving the
        // hand-off; a blocking app goes to the pool.
        let reply = match app.style() {
            AppStyle::Async => Either::Left(Inline.run(app, req)),
            AppStyle::Blocking => Either::Right(self.pool.run(app, req)),
        };
        async move {
            let out = reply.await;
            drop(unit);
            out
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::pool::Pool;
    use gpe_core::app::{blocking, text};

    fn req() -> Request {
        http::Request::new(bytes::Bytes::new())
    }

    #[test]
    fn a_fresh_connection_counts_until_its_first_request_finishes_or_it_closes() {
        let pool = Pool::start(2).unwrap();
        let d = Dispatcher::new(pool.runner(), 2, None);
        let app = blocking(|_r| text(http::StatusCode::OK, "ok"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let a = d.connection();
        assert!(d.load().has_room());
        let b = d.connection();
        assert!(!d.load().has_room());
        // b's first request keeps its unit until it finishes.
        rt.block_on(b.run(&app, req())).unwrap();
        assert!(d.load().has_room());
        // A second request on b takes a new unit for its duration.
        let pending = b.run(&app, req());
        assert!(!d.load().has_room());
        rt.block_on(pending).unwrap();
        assert!(d.load().has_room());
        // a closes without a request.
        drop(a);
        assert_eq!(d.load().busy.load(Ordering::Relaxed), 0);
        // The drop from full left a wake-up for the accept loop.
        rt.block_on(d.load().freed());
        drop((b, d));
        pool.join();
    }

    #[test]
    fn the_budget_is_spent_by_the_nth_request() {
        let pool = Pool::start(1).unwrap();
        let d = Dispatcher::new(pool.runner(), 1, Some(3));
        let app = blocking(|_r| text(http::StatusCode::OK, "ok"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let c = d.connection();
        for _ in 0..2 {
            rt.block_on(c.run(&app, req())).unwrap();
        }
        let not_yet = rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_millis(20), d.spent()).await
        });
        assert!(not_yet.is_err());
        rt.block_on(c.run(&app, req())).unwrap();
        rt.block_on(d.spent());
        drop((c, d));
        pool.join();
    }
}
