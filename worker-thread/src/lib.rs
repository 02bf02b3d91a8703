//! The thread worker (`--worker thread`): one IO thread per process runs a
//! tokio current-thread runtime that multiplexes connections, keep-alive and
//! pipelining with hyper; a fixed pool of `threads` OS threads runs the app,
//! so a blocking app serves `threads` requests at once per process. Requests
//! cross over a crossbeam channel; an idle keep-alive connection holds no
//! pool thread and closes after `keepalive` seconds.
//!
//! Like Gunicorn's gthread worker, the heartbeat comes from the IO thread, so
//! `timeout` does not cap one request's time.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

mod dispatch;
mod io;
mod pool;

use gpe_core::store::WorkerKind;
use gpe_core::{Worker, WorkerContext, WorkerExit};

use crate::io::Ending;
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

    fn run(&self, ctx: WorkerContext) -> std::io::Result<WorkerExit> {
        // Runtime and threads are created here, after fork.
        let rt = gpe_core::idle::tokio_runtime(ctx.config.idle_yield)?;
        let pool = Pool::start(ctx.config.threads as usize)?;
        let local = tokio::task::LocalSet::new();
        let ending = local.block_on(&rt, io::serve(ctx, pool.runner()));
        // Dropping the tasks releases their handles on the pool.
        drop(local);
        drop(rt);
        match ending? {
            Ending::Drained(exit) => {
                pool.join();
                Ok(exit)
            }
            // Threads may be inside the app: leave them to the process exit.
            Ending::Quick => Ok(WorkerExit::Stopped),
        }
    }
}
