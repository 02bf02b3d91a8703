//! The [`Worker`] trait each worker crate implements, the [`WorkerContext`] a
//! worker receives after fork, and the child-side boot sequence that builds it
//! (signals, store, app factory). Accept loops live in the worker crates.

use std::io;
use std::sync::Arc;

use nix::sys::signal::Signal;

use crate::config::Config;
use crate::http::app::AppFactory;
use crate::http::instrument::{Instrumented, Settings, Unmatched};
use crate::http::limits::HeadLimits;
use crate::listener::Listener;
use crate::log::AccessLog;
use crate::store::{Recorder, StoreDir, WorkerKind};
use crate::sys::SignalPipe;

/// Exit code of a worker whose app factory failed.
pub const EXIT_BOOT_ERROR: i32 = 3;
/// Exit code of a worker that retired after `max_requests`.
pub const EXIT_MAX_REQUESTS: i32 = 4;

/// How a worker's run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// Stopped on the master's request.
    Stopped,
    /// Retired itself after its share of requests.
    MaxRequests,
}

/// What the master asked of a worker, from its signals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// TERM: stop accepting, finish in-flight requests, exit. The master kills
    /// the worker after `graceful_timeout`.
    Graceful,
    /// INT or QUIT: the same, but the master kills the worker after 1 s; a
    /// worker may return at once when this arrives a second time.
    Quick,
}

/// A concurrency model. Implemented by each worker crate; the master runs one
/// in every worker process after fork.
pub trait Worker: Send + Sync {
    /// Which model this is.
    fn kind(&self) -> WorkerKind;

    /// Serves `ctx.listeners` until told to stop (or until `max_requests`).
    ///
    /// # Errors
    /// The worker could not run (runtime creation and the like).
    fn run(&self, ctx: WorkerContext) -> io::Result<WorkerExit>;

    /// Whether every request is recorded from one thread (the thread that
    /// polls the hyper connections), letting the recorder skip locked atomic
    /// operations. Wrong answers lose counts, so the default is `false`.
    fn single_recorder_thread(&self) -> bool {
        false
    }

    /// Whether this worker type speaks HTTP/2 (by ALPN, or prior knowledge
    /// with `http2 = "always"`). The sync worker does not.
    fn serves_http2(&self) -> bool {
        true
    }

    /// Whether this worker type serves HTTP/1.1 upgrades (WebSocket). One
    /// that does not answers a request for an upgrade with 501.
    fn serves_upgrades(&self) -> bool {
        true
    }
}

/// Everything a worker process needs, built after fork.
#[derive(Debug)]
pub struct WorkerContext {
    /// The settings.
    pub config: Arc<Config>,
    /// Inherited listening sockets (non-blocking).
    pub listeners: Vec<Listener>,
    /// The app with metrics, limits and access log around it.
    pub service: Arc<Instrumented>,
    /// The worker's slot.
    pub slot: u32,
    /// Requests after which this process retires (jitter applied), if any.
    pub max_requests: Option<u64>,
    /// The TLS configuration of the app listeners (`certfile` set), loaded
    /// by this process after fork.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    signals: SignalPipe,
    place: Placement,
}

impl WorkerContext {
    /// The signal pipe's read end: readable when a control signal arrived.
    pub fn signal_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.signals.fd()
    }

    /// Takes pending signals: reopens logs on USR1 and returns the strongest
    /// stop request, if any.
    pub fn take_control(&self) -> Option<Control> {
        self.control_from(self.signals.drain())
    }

    /// Like [`WorkerContext::take_control`], without a syscall when no signal
    /// has arrived: for a loop that checks between requests instead of
    /// polling the signal pipe.
    pub fn take_control_if_signalled(&self) -> Option<Control> {
        self.control_from(self.signals.drain_if_signalled())
    }

    fn control_from(&self, signals: Vec<Signal>) -> Option<Control> {
        let mut out = None;
        for sig in signals {
            match sig {
                Signal::SIGTERM if out.is_none() => out = Some(Control::Graceful),
                Signal::SIGINT | Signal::SIGQUIT => out = Some(Control::Quick),
                Signal::SIGUSR1 => self.reopen_logs(),
                _ => {}
            }
        }
        out
    }

    fn reopen_logs(&self) {
        if let Some(log) = self.service.access_log() {
            if let Err(e) = log.reopen() {
                crate::log_error!("cannot reopen the access log: {e}");
            }
        }
        if let Err(e) = crate::log::open_errorlog(&self.config.errorlog) {
            crate::log_error!("cannot reopen the error log: {e}");
        }
    }

    /// The worker's recorder.
    pub fn recorder(&self) -> &Arc<Recorder> {
        self.service.recorder()
    }

    /// A connection balancer for this worker's accept loop (see
    /// [`crate::balance`]).
    pub fn balancer(&self) -> crate::balance::Balancer {
        crate::balance::Balancer::new(
            self.place.store.clone(),
            self.place.slot,
            self.place.generation,
        )
    }

    /// Whether this process has served its share of requests.
    pub fn max_requests_reached(&self) -> bool {
        self.service.retiring()
    }
}

/// Where a worker process sits in the server.
#[derive(Debug, Clone)]
pub(crate) struct Placement {
    pub store: StoreDir,
    pub slot: u32,
    pub generation: u64,
}

/// Installs the `metrics` recorder that writes the app's own metrics into
/// this worker's store file, before the app factory runs (so that it may
/// describe and record). A failure costs the app's metrics, not the worker.
fn install_app_metrics(config: &Config, place: &Placement) {
    let spec = crate::app_metrics::AppMetricsSpec {
        families: config.app_metrics.clone(),
        default_buckets: config.histogram_buckets.clone(),
    };
    let installed = crate::store::AppStore::open(&place.store, place.slot, place.generation)
        .map_err(|e| e.to_string())
        .and_then(|store| crate::app_metrics::AppRecorder::new(store, spec).install());
    if let Err(e) = installed {
        crate::log_warn!(
            "worker {}: the app's own metrics are not recorded: {e}",
            place.slot
        );
    }
}

/// Child side of a worker fork: builds the context and runs `worker`. Returns
/// the process exit code.
pub(crate) fn child_main(
    worker: &dyn Worker,
    factory: &AppFactory,
    config: Arc<Config>,
    listeners: Vec<Listener>,
    place: Placement,
) -> i32 {
    // Die with the master rather than serve on as an orphan.
    let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
    let signals = match SignalPipe::install(&[
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGUSR1,
    ]) {
        Ok(s) => s,
        Err(e) => {
            crate::log_error!("worker {}: cannot install signal handlers: {e}", place.slot);
            return 1;
        }
    };
    if let Err(e) = crate::sys::exit_on_abort() {
        crate::log_warn!("worker {}: cannot handle SIGABRT: {e}", place.slot);
    }
    let recorder = match Recorder::open(
        &place.store,
        place.slot,
        place.generation,
        config.metrics,
        worker.single_recorder_thread(),
    ) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            crate::log_error!(
                "worker {} failed to boot: cannot open the metric store: {e}",
                place.slot
            );
            return EXIT_BOOT_ERROR;
        }
    };
    if config.metrics {
        install_app_metrics(&config, &place);
    }
    let app = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| factory())) {
        Ok(Ok(app)) => app,
        Ok(Err(e)) => {
            crate::log_error!(
                "worker {} failed to boot: app factory error: {e}",
                place.slot
            );
            return EXIT_BOOT_ERROR;
        }
        Err(_) => {
            crate::log_error!("worker {} failed to boot: app factory panicked", place.slot);
            return EXIT_BOOT_ERROR;
        }
    };
    let access = match &config.accesslog {
        None => None,
        Some(t) => match AccessLog::open(t.clone()) {
            Ok(l) => Some(l),
            Err(e) => {
                crate::log_error!("worker {}: cannot open the access log: {e}", place.slot);
                return EXIT_BOOT_ERROR;
            }
        },
    };
    // Loaded here, after fork, so that the workers of a reload read the files
    // as they are now (the master checked them just before).
    let h2 = worker.serves_http2() && config.http2 != "off";
    let tls = match crate::tls::server_config(&config, h2) {
        Ok(tls) => tls,
        Err(e) => {
            crate::log_error!("worker {} failed to boot: {e}", place.slot);
            return EXIT_BOOT_ERROR;
        }
    };
    let max_requests = (config.max_requests > 0).then(|| {
        let jitter = if config.max_requests_jitter > 0 {
            rand::random_range(0..=config.max_requests_jitter)
        } else {
            0
        };
        config.max_requests + jitter
    });
    let service = Arc::new(Instrumented::new(
        app,
        recorder.clone(),
        access,
        Settings {
            limits: HeadLimits::from_config(&config),
            max_body: config.max_body_size,
            max_requests,
            unmatched: Unmatched::from_setting(&config.unmatched_route),
            upgrades: worker.serves_upgrades(),
        },
    ));
    recorder.ready();
    let ctx = WorkerContext {
        config,
        listeners,
        service,
        slot: place.slot,
        max_requests,
        tls,
        signals,
        place,
    };
    let slot = ctx.slot;
    match worker.run(ctx) {
        Ok(WorkerExit::Stopped) => 0,
        Ok(WorkerExit::MaxRequests) => EXIT_MAX_REQUESTS,
        Err(e) => {
            crate::log_error!("worker {slot} failed: {e}");
            1
        }
    }
}
