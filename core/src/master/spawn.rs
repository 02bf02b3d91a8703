//! The real [`Os`]: forks workers and the exporter (the only fork sites, both
//! while the master has one thread), spawns the new master of an upgrade,
//! sends signals, reaps, and waits on the signal self-pipe. It owns what the
//! children inherit: the listeners, the app and the current worker type.

use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::os::{Notice, Os};
use super::{ExporterContext, ServerSpec};
use crate::config::{Config, ConfigError};
use crate::listener::Listener;
use crate::store::{StoreDir, WorkerKind};
use crate::sys::{self, Forked, Reaped, SignalPipe};
use crate::worker::{child_main, Placement, Worker};
use crate::{log_error, log_warn};

/// The signals the master handles.
pub(super) const SIGNALS: [Signal; 10] = [
    Signal::SIGHUP,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGCHLD,
    Signal::SIGTTIN,
    Signal::SIGTTOU,
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGQUIT,
    Signal::SIGWINCH,
];

/// The operating system as the master uses it.
pub(super) struct SystemOs<'a> {
    spec: &'a ServerSpec,
    worker: Arc<dyn Worker>,
    listeners: Vec<Listener>,
    metrics_listener: Option<TcpListener>,
    store: StoreDir,
    signals: Option<SignalPipe>,
}

impl<'a> SystemOs<'a> {
    /// Installs the master's signal handlers and takes the sockets.
    ///
    /// # Errors
    /// The handlers or the self-pipe could not be set up.
    pub(super) fn new(
        spec: &'a ServerSpec,
        worker: Arc<dyn Worker>,
        listeners: Vec<Listener>,
        metrics_listener: Option<TcpListener>,
        store: StoreDir,
    ) -> io::Result<SystemOs<'a>> {
        Ok(SystemOs {
            spec,
            worker,
            listeners,
            metrics_listener,
            store,
            signals: Some(SignalPipe::install(&SIGNALS)?),
        })
    }

    /// Whether this server has an exporter to run.
    pub(super) fn has_exporter(&self) -> bool {
        self.spec.exporter.is_some() && self.metrics_listener.is_some()
    }

    /// The listening sockets (for the start-up log).
    pub(super) fn listeners(&self) -> &[Listener] {
        &self.listeners
    }

    /// The metrics socket, if any.
    pub(super) fn metrics_listener(&self) -> Option<&TcpListener> {
        self.metrics_listener.as_ref()
    }

    /// Forks with the master's signals blocked. In the parent the mask is
    /// restored; in the child it stays blocked until the child unblocks.
    fn fork(&self) -> io::Result<(Forked, nix::sys::signal::SigSet)> {
        debug_assert_eq!(
            sys::thread_count(),
            Some(1),
            "the master forks only while it has one thread"
        );
        let mask = sys::block(&SIGNALS)?;
        // SAFETY: the master is single-threaded (no runtime, no helper thread),
        // as the debug assertion above checks.
        let forked = unsafe { sys::fork() };
        if !matches!(forked, Ok(Forked::Child)) {
            sys::restore_mask(&mask);
        }
        Ok((forked?, mask))
    }

    /// In a freshly forked child: give back the master's signal handling.
    fn become_child(&mut self) {
        if let Some(pipe) = self.signals.take() {
            pipe.reset();
        }
        self.metrics_listener = None;
    }
}

impl Os for SystemOs<'_> {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn mono_ns(&self) -> u64 {
        crate::store::monotonic_ns()
    }

    fn wait(&mut self, timeout: Duration) -> Vec<Signal> {
        match &self.signals {
            Some(pipe) => {
                pipe.wait(timeout);
                pipe.drain()
            }
            None => Vec::new(),
        }
    }

    fn signal(&mut self, pid: Pid, sig: Signal) {
        sys::send(pid, sig);
    }

    fn child_exited(&mut self) -> bool {
        sys::child_exited()
    }

    fn reap(&mut self) -> io::Result<Option<Reaped>> {
        sys::reap_one()
    }

    fn spawn_worker(
        &mut self,
        config: &Arc<Config>,
        slot: u32,
        generation: u64,
    ) -> io::Result<Pid> {
        match self.fork()?.0 {
            Forked::Parent(pid) => Ok(pid),
            Forked::Child => {
                // The master's signals stay blocked until the worker installs its
                // own handlers (TERM, INT, QUIT, USR1); the others stay blocked.
                self.become_child();
                let listeners = std::mem::take(&mut self.listeners);
                let code = child_main(
                    self.worker.as_ref(),
                    &self.spec.app,
                    config.clone(),
                    listeners,
                    Placement {
                        store: self.store.clone(),
                        slot,
                        generation,
                    },
                );
                std::process::exit(code);
            }
        }
    }

    fn spawn_exporter(&mut self, config: &Config) -> io::Result<Pid> {
        let (Some(main), Some(listener)) = (&self.spec.exporter, &self.metrics_listener) else {
            return Err(io::Error::other("no exporter in this server"));
        };
        let main = main.clone();
        let listener = listener.try_clone().map_err(|e| {
            io::Error::new(e.kind(), format!("cannot hand it the metrics socket: {e}"))
        })?;
        let (forked, mask) = self.fork()?;
        match forked {
            Forked::Parent(pid) => Ok(pid),
            Forked::Child => {
                self.become_child();
                // The exporter keeps default dispositions (TERM ends it) except
                // USR1, which stays blocked until it installs its handler.
                sys::restore_mask(&mask);
                let _ = sys::block(&[Signal::SIGUSR1]);
                self.listeners.clear();
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
                let code = main(ExporterContext {
                    listener,
                    store: self.store.clone(),
                    path: config.metrics_path.clone(),
                    errorlog: config.errorlog.clone(),
                    header_timeout: config.header_timeout,
                    max_connections: config.metrics_max_connections as usize,
                    web_config: config.metrics_web_config.clone(),
                    health_public: config.metrics_health_public,
                });
                std::process::exit(code);
            }
        }
    }

    fn spawn_master(&mut self) -> io::Result<Pid> {
        super::upgrade::spawn_new_master(&self.listeners, self.metrics_listener.as_ref())
    }

    fn parent(&self) -> Pid {
        nix::unistd::getppid()
    }

    fn notify(&mut self, notice: Notice) {
        use sd_notify::NotifyState;
        let pid = std::process::id();
        let mut states = match notice {
            Notice::Ready => vec![NotifyState::Ready],
            // Take over as the service's main process before the old master
            // exits, so systemd does not end the service with it.
            Notice::ReadyAsMain => vec![NotifyState::MainPid(pid), NotifyState::Ready],
            Notice::Reloading => vec![NotifyState::Reloading],
            Notice::Stopping => vec![NotifyState::Stopping],
        };
        if notice == Notice::Reloading {
            if let Ok(now) = NotifyState::monotonic_usec_now() {
                states.push(now);
            }
        }
        if let Err(e) = sd_notify::notify(&states) {
            log_warn!("sd_notify failed: {e}");
        }
    }

    fn reload(&mut self) -> Option<Result<Config, ConfigError>> {
        self.spec.reload.as_ref().map(|reload| reload())
    }

    fn check_tls(&self, config: &Config) -> Result<(), ConfigError> {
        crate::tls::server_config(config, true).map(|_| ())
    }

    fn choose_worker(&mut self, name: &str) -> Result<(), String> {
        self.worker = (self.spec.workers)(name)?;
        Ok(())
    }

    fn worker_kind(&self) -> WorkerKind {
        self.worker.kind()
    }

    fn close_listeners(&mut self) {
        self.listeners.clear();
    }

    fn rss_bytes(&self, pid: Pid) -> Option<u64> {
        // statm: sizes in pages; the second field is the resident set.
        let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
        let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| u64::try_from(p).ok())
            .unwrap_or(4096);
        Some(pages.saturating_mul(page))
    }

    fn reopen_errorlog(&mut self, config: &Config) {
        if let Err(e) = crate::log::open_errorlog(&config.errorlog) {
            log_error!("cannot reopen the error log: {e}");
        }
    }
}
