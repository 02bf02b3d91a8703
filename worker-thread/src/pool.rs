//! The app pool: a fixed set of OS threads that take requests from a crossbeam
//! channel, run the app to completion with `call_blocking` and send the
//! response back through a oneshot. The IO thread hands requests over through
//! [`PoolRunner`]; accepting and HTTP happen in [`crate::io`].

use std::future::Future;
use std::io;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use gpe_core::app::{Request, Response, SharedApp};
use gpe_core::instrument::{call_blocking, Panicked, Runner};
use tokio::sync::oneshot;

/// What a pool thread sends back for one request.
type Outcome = Result<Response, Panicked>;

/// One request on its way to a pool thread.
struct Job {
    app: SharedApp,
    req: Request,
    reply: oneshot::Sender<Outcome>,
}

/// A fixed pool of app threads.
#[derive(Debug)]
pub struct Pool {
    jobs: Sender<Job>,
    threads: Vec<JoinHandle<()>>,
}

impl Pool {
    /// Starts `threads` app threads (at least one).
    ///
    /// # Errors
    /// A thread could not be spawned; the ones already started stop on their own.
    pub fn start(threads: usize) -> io::Result<Pool> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Job>();
        let handles = (0..threads.max(1))
            .map(|i| {
                let queue = queue.clone();
                std::thread::Builder::new()
                    .name(format!("gpe-app-{i}"))
                    .spawn(move || work(&queue))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Pool {
            jobs,
            threads: handles,
        })
    }

    /// A handle that runs requests on this pool.
    pub fn runner(&self) -> PoolRunner {
        PoolRunner {
            jobs: self.jobs.clone(),
        }
    }

    /// Closes the queue and waits for every thread to finish the requests it
    /// has. Runners still alive keep the queue open, so drop them first.
    pub fn join(self) {
        drop(self.jobs);
        for t in self.threads {
            // A panic outside `call_blocking` cannot happen; nothing to report.
            let _ = t.join();
        }
    }
}

/// The body of a pool thread: runs jobs until the queue closes. A job whose
/// caller has gone (client disconnected while it was queued) is skipped.
fn work(queue: &Receiver<Job>) {
    for job in queue.iter() {
        if job.reply.is_closed() {
            continue;
        }
        let out = call_blocking(&job.app, job.req);
        let _ = job.reply.send(out);
    }
}

/// Runs the app on the pool: the [`Runner`] the IO thread gives hyper. The
/// returned future holds no pool thread while it waits.
#[derive(Debug, Clone)]
pub struct PoolRunner {
    jobs: Sender<Job>,
}

impl Runner for PoolRunner {
    /// Queues the request. A closed pool (never the case while connections
    /// are served) is reported like a panic: 500.
    fn run(&self, app: &SharedApp, req: Request) -> impl Future<Output = Outcome> + Send {
        let (reply, answer) = oneshot::channel();
        let queued = self
            .jobs
            .send(Job {
                app: app.clone(),
                req,
                reply,
            })
            .is_ok();
        async move {
            if !queued {
                return Err(Panicked);
            }
            answer.await.unwrap_or(Err(Panicked))
        }
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("uri", self.req.uri()).finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use gpe_core::app::{blocking, handler, text};
    use http::StatusCode;

    fn req(path: &str) -> Request {
        http::Request::builder()
            .uri(path)
            .body(Bytes::new())
            .unwrap()
    }

    /// Runs every request of `paths` on `runner` at once, from one
    /// current-thread runtime (as the IO thread does).
    fn run_all(runner: &PoolRunner, app: &SharedApp, paths: &[&str]) -> Vec<Outcome> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let futs = paths.iter().map(|p| runner.run(app, req(p)));
        rt.block_on(futures_util::future::join_all(futs))
    }

    #[test]
    fn every_request_runs_once_and_answers_its_own_caller() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let app = blocking(move |r| {
            counted.fetch_add(1, Ordering::SeqCst);
            text(StatusCode::OK, r.uri().path().to_owned())
        });
        let pool = Pool::start(4).unwrap();
        let paths: Vec<String> = (0..1000).map(|i| format!("/{i}")).collect();
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let out = run_all(&pool.runner(), &app, &refs);
        pool.join();
        assert_eq!(calls.load(Ordering::SeqCst), 1000);
        assert_eq!(out.len(), 1000);
        for (i, r) in out.into_iter().enumerate() {
            let r = r.unwrap();
            assert_eq!(r.status(), StatusCode::OK);
            assert_eq!(r.body(), &Bytes::from(format!("/{i}")));
        }
    }

    #[test]
    fn panics_are_caught_and_the_threads_survive() {
        let app = blocking(|r| {
            if r.uri().path() == "/panic" {
                panic!("app panic (expected by the test)");
            }
            text(StatusCode::OK, "ok")
        });
        let pool = Pool::start(2).unwrap();
        let paths: Vec<&str> = (0..20)
            .map(|i| if i % 2 == 0 { "/panic" } else { "/ok" })
            .collect();
        let out = run_all(&pool.runner(), &app, &paths);
        pool.join();
        let panicked = out.iter().filter(|r| r.is_err()).count();
        let ok = out
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|r| r.status() == StatusCode::OK))
            .count();
        assert_eq!((panicked, ok), (10, 10));
    }

    #[test]
    fn async_apps_run_to_completion_on_the_pool() {
        let app = handler(|_r| async { text(StatusCode::CREATED, "async") });
        let pool = Pool::start(1).unwrap();
        let out = run_all(&pool.runner(), &app, &["/a", "/b"]);
        pool.join();
        for r in out {
            assert_eq!(r.unwrap().status(), StatusCode::CREATED);
        }
    }

    /// A blocking app that sleeps `nap` and records how many calls overlapped.
    fn sleeper(nap: Duration) -> (SharedApp, Arc<AtomicUsize>) {
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let p = peak.clone();
        let app = blocking(move |_r| {
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(nap);
            active.fetch_sub(1, Ordering::SeqCst);
            text(StatusCode::OK, "slept")
        });
        (app, peak)
    }

    #[test]
    fn n_blocking_calls_run_at_once() {
        let nap = Duration::from_millis(300);
        let (app, peak) = sleeper(nap);
        let pool = Pool::start(4).unwrap();
        let start = Instant::now();
        let out = run_all(&pool.runner(), &app, &["/"; 4]);
        let took = start.elapsed();
        pool.join();
        assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 4);
        assert_eq!(peak.load(Ordering::SeqCst), 4);
        assert!(took < nap * 2, "4 naps on 4 threads took {took:?}");
    }

    #[test]
    fn never_more_than_n_at_once() {
        let nap = Duration::from_millis(100);
        let (app, peak) = sleeper(nap);
        let pool = Pool::start(3).unwrap();
        let start = Instant::now();
        let out = run_all(&pool.runner(), &app, &["/"; 7]);
        let took = start.elapsed();
        pool.join();
        assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 7);
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        // 7 calls on 3 threads need three rounds.
        assert!(took >= nap * 3, "took {took:?}");
    }

    #[test]
    fn a_request_whose_caller_left_is_skipped() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let app = blocking(move |_r| {
            counted.fetch_add(1, Ordering::SeqCst);
            text(StatusCode::OK, "ok")
        });
        let (gate_tx, gate_rx) = crossbeam_channel::bounded::<()>(0);
        let gate = blocking(move |_r| {
            let _ = gate_rx.recv();
            text(StatusCode::OK, "gate")
        });
        let pool = Pool::start(1).unwrap();
        let runner = pool.runner();
        // Hold the only thread, queue a request, then drop its future.
        let held = runner.run(&gate, req("/gate"));
        drop(runner.run(&app, req("/gone")));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        gate_tx.send(()).unwrap();
        assert_eq!(rt.block_on(held).unwrap().status(), StatusCode::OK);
        drop(runner);
        pool.join();
        assert_eq!(calls.load(Ordering::SeqCst), 0);
    }
}
