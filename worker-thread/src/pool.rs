//! The app pool: a fixed set of OS threads fed by one crossbeam channel. It
//! carries two kinds of work:
//!
//! - **connection tasks** ([`Pool::spawn`]): an HTTP/1.x connection's whole
//!   future, polled on whichever pool thread is free each time it is woken
//!   (by the IO thread's reactor: its socket became readable, or a timer
//!   fired). Its app runs inline there ([`LocalRunner`]). An idle
//!   connection is a parked future and holds no thread.
//! - **requests** ([`PoolRunner`]): the app future of one request of an
//!   HTTP/2 connection, which the IO thread serves; it is driven to its
//!   response and sent back through a oneshot.
//!
//! Pool threads may block (a [`blocking`](gpe_core::blocking) closure runs
//! inline there) and run inside the IO thread's tokio context, so
//! tokio::time, tokio::net and tokio::spawn work in handlers (spawned tasks
//! run on the IO thread). Both runners keep the [`Load`] the accept loop
//! waits on.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_task::Runnable;
use crossbeam_channel::{Receiver, Sender};
use gpe_core::AppFuture;
use gpe_core::{allow_blocking, catching, start_call as start, Failure, Runner};
use gpe_core::{Request, Response, SharedApp};
use tokio::sync::{oneshot, Notify};

/// What a pool thread sends back for one request.
type Outcome = Result<Response, Failure>;

/// One request on its way to a pool thread.
struct Job {
    fut: AppFuture,
    reply: oneshot::Sender<Outcome>,
}

/// What the pool threads take from the channel.
enum Work {
    /// One request's app future, driven to its response.
    Job(Job),
    /// A connection task to poll once.
    Task(Runnable),
}

/// Requests handed to the pool and not yet answered. The accept loop takes a
/// new connection only while this is under the pool's size, so a process
/// takes only connections it can serve now; connections that have not sent
/// a request yet hold nothing.
#[derive(Debug)]
pub(crate) struct Load {
    busy: AtomicUsize,
    limit: usize,
    freed: Notify,
}

impl Load {
    fn new(threads: usize) -> Arc<Load> {
        Arc::new(Load {
            busy: AtomicUsize::new(0),
            limit: threads.max(1),
            freed: Notify::new(),
        })
    }

    /// Whether a pool thread is free.
    pub(crate) fn has_room(&self) -> bool {
        self.busy.load(Ordering::Relaxed) < self.limit
    }

    /// Completes once a pool thread is free.
    pub(crate) async fn room(&self) {
        while !self.has_room() {
            self.freed.notified().await;
        }
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

/// A fixed pool of app threads.
#[derive(Debug)]
pub(crate) struct Pool {
    jobs: Sender<Work>,
    load: Arc<Load>,
    exiting: Arc<AtomicBool>,
}

impl Pool {
    /// Starts `threads` app threads (at least one) that run inside the
    /// context of `rt` (the IO thread's runtime). The threads end when the
    /// pool, its runners and spawners and every task spawned on it are gone
    /// (a parked task keeps its way back onto the queue); the worker process
    /// exits without waiting for them.
    ///
    /// # Errors
    /// A thread could not be spawned; the ones already started stop on their own.
    pub(crate) fn start(threads: usize, rt: &tokio::runtime::Handle) -> io::Result<Pool> {
        let (jobs, queue) = crossbeam_channel::unbounded::<Work>();
        let exiting = Arc::new(AtomicBool::new(false));
        for i in 0..threads.max(1) {
            let queue = queue.clone();
            let rt = rt.clone();
            let exiting = exiting.clone();
            std::thread::Builder::new()
                .name(format!("gpe-app-{i}"))
                .spawn(move || {
                    allow_blocking();
                    let _context = rt.enter();
                    work(&queue, &exiting);
                })?;
        }
        Ok(Pool {
            jobs,
            load: Load::new(threads),
            exiting,
        })
    }

    /// Says that the process is exiting: the runtime is about to shut down
    /// under tasks still on the pool (a quick stop), and what they do then
    /// is not logged.
    pub(crate) fn exiting(&self) {
        self.exiting.store(true, Ordering::Relaxed);
    }

    /// A handle that runs requests on this pool.
    pub(crate) fn runner(&self) -> PoolRunner {
        PoolRunner {
            jobs: self.jobs.clone(),
            load: self.load.clone(),
        }
    }

    /// A handle that runs requests inline on the pool thread that polls
    /// their connection.
    pub(crate) fn local_runner(&self) -> LocalRunner {
        LocalRunner {
            load: self.load.clone(),
        }
    }

    /// The pool's load.
    pub(crate) fn load(&self) -> &Load {
        &self.load
    }

    /// Runs `task` on the pool (see [`Spawner::spawn`]).
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawner().spawn(task);
    }

    /// A handle that starts tasks on this pool.
    pub(crate) fn spawner(&self) -> Spawner {
        Spawner {
            jobs: self.jobs.clone(),
        }
    }
}

/// Starts connection tasks on the pool.
#[derive(Debug, Clone)]
pub(crate) struct Spawner {
    jobs: Sender<Work>,
}

impl Spawner {
    /// Runs `task` on the pool: it is polled on a free pool thread now and
    /// each time it is woken. A panic in it ends the task, not the thread.
    pub(crate) fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let jobs = self.jobs.clone();
        // Once the pool threads are gone (the process is exiting), a woken
        // task is dropped with its runnable.
        let schedule = move |r: Runnable| {
            let _ = jobs.send(Work::Task(r));
        };
        let (runnable, task) = async_task::spawn(task, schedule);
        runnable.schedule();
        task.detach();
    }
}

/// The body of a pool thread: runs work until the queue closes. A job whose
/// caller has gone (client disconnected while it was queued) is skipped.
fn work(queue: &Receiver<Work>, exiting: &AtomicBool) {
    for work in queue.iter() {
        match work {
            Work::Job(job) => {
                if job.reply.is_closed() {
                    continue;
                }
                let out = futures_executor::block_on(catching(job.fut));
                let _ = job.reply.send(out);
            }
            Work::Task(runnable) => {
                // The app's panics are caught below it (`catching`); this
                // one came from the connection's own code. The task is
                // closed and dropped, its connection with it.
                let run = std::panic::AssertUnwindSafe(|| runnable.run());
                if std::panic::catch_unwind(run).is_err() && !exiting.load(Ordering::Relaxed) {
                    gpe_core::log_error!("a connection task panicked; its connection is closed");
                }
            }
        }
    }
}

/// Runs the app on the pool: the [`Runner`] the IO thread gives hyper. The
/// returned future holds no pool thread while it waits.
#[derive(Debug, Clone)]
pub(crate) struct PoolRunner {
    jobs: Sender<Work>,
    load: Arc<Load>,
}

impl Runner for PoolRunner {
    /// Queues the request. A closed pool (never the case while connections
    /// are served) is reported like a panic: 500.
    fn run(&self, app: &SharedApp, req: Request) -> impl Future<Output = Outcome> {
        let unit = self.load.take();
        let (reply, answer) = oneshot::channel();
        let queued =
            start(app, req).map(|fut| self.jobs.send(Work::Job(Job { fut, reply })).is_ok());
        async move {
            let out = match queued {
                Ok(true) => answer.await.unwrap_or(Err(Failure::Panicked)),
                Ok(false) => Err(Failure::Panicked),
                Err(failure) => Err(failure),
            };
            drop(unit);
            out
        }
    }
}

/// Runs the app inline, on the pool thread that polls the request's
/// connection; the request holds a unit of the pool's [`Load`] while it runs.
#[derive(Debug, Clone)]
pub(crate) struct LocalRunner {
    load: Arc<Load>,
}

impl Runner for LocalRunner {
    fn run(&self, app: &SharedApp, req: Request) -> impl Future<Output = Outcome> {
        let unit = self.load.take();
        let started = start(app, req);
        async move {
            let out = match started {
                Ok(fut) => catching(fut).await,
                Err(failure) => Err(failure),
            };
            drop(unit);
            out
        }
    }
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Work::Job(_) => "Work::Job",
            Work::Task(_) => "Work::Task",
        })
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use gpe_core::{blocking, handler, text, FullRequest, IntoApp};
    use http::StatusCode;
    use http_body_util::BodyExt;

    fn req(path: &str) -> Request {
        http::Request::builder()
            .uri(path)
            .body(gpe_core::Body::empty())
            .unwrap()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Runs every request of `paths` on `pool` at once, from one
    /// current-thread runtime (as the IO thread does).
    fn run_all(
        rt: &tokio::runtime::Runtime,
        pool: &Pool,
        app: &SharedApp,
        paths: &[&str],
    ) -> Vec<Outcome> {
        let runner = pool.runner();
        let futs = paths.iter().map(|p| runner.run(app, req(p)));
        rt.block_on(futures_util::future::join_all(futs))
    }

    fn body(rt: &tokio::runtime::Runtime, r: Response) -> Bytes {
        rt.block_on(r.into_body().collect()).unwrap().to_bytes()
    }

    #[test]
    fn every_request_runs_once_on_a_pool_thread_and_answers_its_own_caller() {
        let app = blocking(|r: FullRequest| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            text(StatusCode::OK, format!("{} {name}", r.uri().path()))
        })
        .into_app();
        let rt = rt();
        let pool = Pool::start(4, rt.handle()).unwrap();
        let paths: Vec<String> = (0..1000).map(|i| format!("/{i}")).collect();
        let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
        let out = run_all(&rt, &pool, &app, &refs);
        assert_eq!(out.len(), 1000);
        for (i, r) in out.into_iter().enumerate() {
            let text = body(&rt, r.unwrap());
            let text = std::str::from_utf8(&text).unwrap().to_owned();
            assert!(text.starts_with(&format!("/{i} gpe-app-")), "{text}");
        }
        assert!(pool.load().has_room());
    }

    #[test]
    fn panics_are_caught_and_the_threads_survive() {
        let app = blocking(|r: FullRequest| {
            assert!(
                r.uri().path() != "/panic",
                "app panic (expected by the test)"
            );
            text(StatusCode::OK, "ok")
        })
        .into_app();
        let rt = rt();
        let pool = Pool::start(2, rt.handle()).unwrap();
        let paths: Vec<&str> = (0..20)
            .map(|i| if i % 2 == 0 { "/panic" } else { "/ok" })
            .collect();
        let out = run_all(&rt, &pool, &app, &paths);
        let panicked = out
            .iter()
            .filter(|r| matches!(r, Err(Failure::Panicked)))
            .count();
        let ok = out
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|r| r.status() == StatusCode::OK))
            .count();
        assert_eq!((panicked, ok), (10, 10));
    }

    #[test]
    fn tokio_works_in_handlers_on_the_pool() {
        let app = handler(|_r: FullRequest| async {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let n = tokio::spawn(async { 6 * 7 }).await.unwrap();
            text(StatusCode::CREATED, n.to_string())
        })
        .into_app();
        let rt = rt();
        let pool = Pool::start(1, rt.handle()).unwrap();
        for r in run_all(&rt, &pool, &app, &["/a", "/b"]) {
            let r = r.unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            assert_eq!(body(&rt, r), "42");
        }
    }

    /// A blocking app that sleeps `nap` and records how many calls overlapped.
    fn sleeper(nap: Duration) -> (SharedApp, Arc<AtomicUsize>) {
        let active = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let p = peak.clone();
        let app = blocking(move |_r: FullRequest| {
            let now = active.fetch_add(1, Ordering::SeqCst) + 1;
            p.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(nap);
            active.fetch_sub(1, Ordering::SeqCst);
            text(StatusCode::OK, "slept")
        })
        .into_app();
        (app, peak)
    }

    #[test]
    fn n_blocking_calls_run_at_once_and_fill_the_load() {
        let nap = Duration::from_millis(300);
        let (app, peak) = sleeper(nap);
        let rt = rt();
        let pool = Pool::start(4, rt.handle()).unwrap();
        let start = Instant::now();
        let out = run_all(&rt, &pool, &app, &["/"; 4]);
        let took = start.elapsed();
        assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 4);
        assert_eq!(peak.load(Ordering::SeqCst), 4);
        assert!(took < nap * 2, "4 naps on 4 threads took {took:?}");
        let runner = pool.runner();
        let held: Vec<_> = (0..4).map(|_| runner.run(&app, req("/"))).collect();
        assert!(!pool.load().has_room(), "4 requests fill 4 threads");
        drop(held);
        assert!(pool.load().has_room());
    }

    /// Waits (bounded) until `done` holds.
    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_task_is_polled_on_the_pool_each_time_it_is_woken() {
        let rt = rt();
        let pool = Pool::start(2, rt.handle()).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        pool.spawn(async move {
            // Parked between messages: woken from another thread each time.
            while let Some(n) = rx.recv().await {
                let name = std::thread::current().name().unwrap_or("").to_owned();
                s.lock().unwrap().push((n, name));
            }
        });
        for n in 0..100 {
            tx.send(n).unwrap();
            wait_for("the task to take a message", || {
                seen.lock().unwrap().len() == n as usize + 1
            });
        }
        drop(tx);
        let seen = seen.lock().unwrap();
        assert_eq!(
            seen.iter().map(|(n, _)| *n).collect::<Vec<_>>(),
            (0..100).collect::<Vec<_>>()
        );
        assert!(
            seen.iter().all(|(_, t)| t.starts_with("gpe-app-")),
            "{seen:?}"
        );
    }

    #[test]
    fn a_panicking_task_ends_alone_and_the_thread_serves_on() {
        let rt = rt();
        // One thread: had the panic ended it, nothing else would run.
        let pool = Pool::start(1, rt.handle()).unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        for i in 0..10 {
            let d = done.clone();
            pool.spawn(async move {
                assert!(i % 2 == 1, "connection task panic (expected by the test)");
                d.fetch_add(1, Ordering::SeqCst);
            });
        }
        wait_for("the five tasks that do not panic", || {
            done.load(Ordering::SeqCst) == 5
        });
        // And requests still run on that thread.
        let app = blocking(|_r: FullRequest| text(StatusCode::OK, "ok")).into_app();
        let out = run_all(&rt, &pool, &app, &["/"]);
        assert!(out[0].is_ok());
    }

    #[test]
    fn the_local_runner_runs_the_app_inline_and_holds_the_load_meanwhile() {
        let rt = rt();
        let pool = Pool::start(1, rt.handle()).unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let held = std::sync::Mutex::new(held);
        let app = blocking(move |_r: FullRequest| {
            held.lock().unwrap().recv().unwrap();
            text(
                StatusCode::OK,
                std::thread::current().name().unwrap_or("").to_owned(),
            )
        })
        .into_app();
        let app = Arc::new(app);
        let runner = pool.local_runner();
        let (tx, rx) = std::sync::mpsc::channel();
        let a = app.clone();
        pool.spawn(async move {
            let _ = tx.send(runner.run(&a, req("/")).await);
        });
        wait_for("the request to hold the pool's one thread", || {
            !pool.load().has_room()
        });
        release.send(()).unwrap();
        let out = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
        assert_eq!(body(&rt, out), "gpe-app-0");
        wait_for("the load to be given back", || pool.load().has_room());
    }

    #[test]
    fn never_more_than_n_at_once() {
        let nap = Duration::from_millis(100);
        let (app, peak) = sleeper(nap);
        let rt = rt();
        let pool = Pool::start(3, rt.handle()).unwrap();
        let start = Instant::now();
        let out = run_all(&rt, &pool, &app, &["/"; 7]);
        let took = start.elapsed();
        assert_eq!(out.iter().filter(|r| r.is_ok()).count(), 7);
        assert_eq!(peak.load(Ordering::SeqCst), 3);
        // 7 calls on 3 threads need three rounds.
        assert!(took >= nap * 3, "took {took:?}");
    }
}
