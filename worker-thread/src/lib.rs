//! The thread worker (`--worker thread`): one IO thread per process runs a
//! tokio current-thread runtime that multiplexes connections, keep-alive,
//! pipelining and upgrades with hyper; a fixed pool of `threads` OS threads
//! runs each request's future, so a handler that blocks holds only its own
//! thread. Like Gunicorn's gthread, connections that are idle or still
//! sending their head stay on the IO thread and hold no pool thread; a
//! process accepts only while a pool thread is free.
//!
//! The heartbeat comes from the IO thread, so `timeout` does not cap one
//! request's time. The lifecycle (heartbeat, draining, `max_requests`) and
//! the connection cap are core's, shared with the async workers.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod pool;

use std::io;

use gpe_core::{serve_worker, WorkerKind};
use gpe_core::{Worker, WorkerContext, WorkerExit};

use crate::pool::Pool;

/// The thread worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct ThreadWorker;

impl Worker for ThreadWorker {
    fn kind(&self) -> WorkerKind {
        WorkerKind::Thread
    }

    /// Requests are recorded on the IO thread; pool threads only run the app.
    fn single_recorder_thread(&self) -> bool {
        true
    }

    fn run(&self, mut ctx: WorkerContext) -> io::Result<WorkerExit> {
        // Runtime and threads are created here, after fork.
        let rt = gpe_core::tokio_runtime(ctx.config.idle_yield)?;
        let pool = Pool::start(ctx.config.threads as usize, rt.handle())?;
        let exit = tokio::task::LocalSet::new().block_on(&rt, serve(&mut ctx, &pool));
        // After a drain the pool is idle; after a quick stop its threads may
        // still be inside the app. Either way the process exits now.
        rt.shutdown_background();
        exit
    }
}

async fn serve(ctx: &mut WorkerContext, pool: &Pool) -> io::Result<WorkerExit> {
    // A connection is taken only while a pool thread is free.
    serve_worker(ctx, pool.runner(), || pool.load().room()).await
}
