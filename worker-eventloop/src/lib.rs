//! The eventloop worker: one tokio current-thread runtime per process serves
//! up to `worker_connections` connections with keep-alive, pipelining and
//! upgrades, like Gunicorn's async workers. The app's futures run on the
//! loop; a [`blocking`](gpe_core::blocking) closure runs on a blocking pool
//! so it never stalls the loop.
//!
//! The lifecycle (heartbeat, draining, `max_requests`), the connection cap,
//! the tokio edge and the HTTP layer come from core; this crate is the
//! accept loop and the runtime.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::io;

use gpe_core::{serve_worker, Inline, WorkerKind};
use gpe_core::{Worker, WorkerContext, WorkerExit};

/// The eventloop worker.
#[derive(Debug, Default, Clone, Copy)]
pub struct EventloopWorker;

impl Worker for EventloopWorker {
    fn kind(&self) -> WorkerKind {
        WorkerKind::Eventloop
    }

    /// Requests are recorded on the worker's one loop thread.
    fn single_recorder_thread(&self) -> bool {
        true
    }

    fn run(&self, mut ctx: WorkerContext) -> io::Result<WorkerExit> {
        // Built here, after fork, never in the master.
        let rt = gpe_core::tokio_runtime(ctx.config.idle_yield)?;
        let exit = tokio::task::LocalSet::new().block_on(&rt, serve(&mut ctx));
        // Blocking calls still running on a pool must not delay the exit.
        rt.shutdown_background();
        exit
    }
}

async fn serve(ctx: &mut WorkerContext) -> io::Result<WorkerExit> {
    serve_worker(ctx, Inline).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use gpe_core::{accept_loop, Acceptor, Admission, Conn, Gate};
    use std::cell::RefCell;
    use std::time::Duration;

    use gpe_core::BindAddr;
    use gpe_core::Listener;

    #[test]
    fn accept_pauses_at_the_cap_and_resumes_when_a_place_frees() {
        let listener =
            Listener::bind(&BindAddr::Tcp("127.0.0.1:0".parse().unwrap()), 16, false).unwrap();
        let addr = listener.tcp_addr().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let accepted = RefCell::new(Vec::new());
        rt.block_on(async {
            let listener = Acceptor::register(listener).unwrap();
            let gate = Gate::new(2);
            let clients: Vec<_> = (0..3)
                .map(|_| std::net::TcpStream::connect(addr).unwrap())
                .collect();
            let accepting = accept_loop(&listener, &gate, &|| std::future::ready(()), |s, _, a| {
                accepted.borrow_mut().push((s, a))
            });
            let mut accepting = std::pin::pin!(accepting);
            // Polls the accept loop until `n` connections are held (bounded).
            async fn settle(
                accepting: &mut std::pin::Pin<&mut impl std::future::Future<Output = io::Error>>,
                accepted: &RefCell<Vec<(Conn, Admission)>>,
                n: usize,
            ) {
                for _ in 0..200 {
                    if accepted.borrow().len() == n {
                        break;
                    }
                    tokio::select! {
                        _ = accepting.as_mut() => panic!("accept failed"),
                        () = tokio::time::sleep(Duration::from_millis(10)) => {}
                    }
                }
            }
            settle(&mut accepting, &accepted, 2).await;
            // The third client waits in the backlog however long we poll.
            tokio::select! {
                _ = accepting.as_mut() => panic!("accept failed"),
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
            assert_eq!(
                accepted.borrow().len(),
                2,
                "the third client waits in the backlog"
            );
            assert_eq!(gate.open(), 2);
            accepted.borrow_mut().pop();
            settle(&mut accepting, &accepted, 2).await;
            assert_eq!(accepted.borrow().len(), 2);
            assert_eq!(gate.open(), 2, "the waiting client took the freed place");
            drop(clients);
        });
    }
}
