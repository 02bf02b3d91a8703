//! The master's loop. Signal handlers only queue bytes in a pipe; this loop
//! turns each signal into an action with one exhaustive match, reaps children
//! (folding their counters into the retired totals), enforces heartbeats and
//! deadlines, and keeps the desired number of workers in their slots.
//!
//! Supervision rules: reap until nothing is left; unknown pids are not ours;
//! a worker that exits with the boot-error code three times in a row stops the
//! server; stopping is a polite signal, a deadline, SIGKILL, a final reap; a
//! stale heartbeat gets SIGABRT, then SIGKILL; fork happens only from here,
//! while the process has one thread.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::{ExporterContext, MasterError, ServerSpec};
use crate::config::Config;
use crate::listener::Listener;
use crate::store::index::Mirror;
use crate::store::layout::FileKind;
use crate::store::{
    fold, fold_begin, fold_end, DataFile, ExitReason, FileIdentity, Index, MasterSignal, StoreDir,
    WorkerState,
};
use crate::sys::{self, Ended, Forked, Reaped, SignalPipe};
use crate::worker::{child_main, Placement, Worker, EXIT_BOOT_ERROR, EXIT_MAX_REQUESTS};
use crate::{log_error, log_info, log_warn};

/// Boot failures in a row that stop the server.
const BOOT_FAILURE_LIMIT: u32 = 3;
/// Time a quick stop (INT/QUIT) or a timed-out worker gets before SIGKILL.
const QUICK_STOP: Duration = Duration::from_secs(1);
/// Longest sleep of the loop: heartbeats are checked at least this often.
const TICK: Duration = Duration::from_millis(250);
/// Shortest time between two folds, so that a scrape (which retries when a
/// fold races it) always finds a quiet window, even in a SIGCHLD storm.
const FOLD_INTERVAL: Duration = Duration::from_millis(10);

const SIGNALS: [Signal; 10] = [
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

/// Where a worker process is in its life, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Life {
    /// Serving in its slot.
    Serving,
    /// Asked to stop (TERM or QUIT sent); killed at `deadline`.
    Retiring {
        reason: ExitReason,
        deadline: Instant,
        killed: bool,
    },
    /// Heartbeat went stale; SIGABRT sent, SIGKILL at `deadline`.
    TimedOut { deadline: Instant, killed: bool },
}

#[derive(Debug)]
struct Proc {
    pid: Pid,
    slot: u32,
    generation: u64,
    file: DataFile,
    life: Life,
    booted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Running,
    Stopping { deadline: Instant, graceful: bool },
}

pub(super) struct Arbiter<'a> {
    spec: &'a ServerSpec,
    config: Arc<Config>,
    worker: Arc<dyn Worker>,
    listeners: Vec<Listener>,
    metrics_listener: Option<TcpListener>,
    store: StoreDir,
    index: Index,
    mirror: Mirror,
    master_file: DataFile,
    retired: DataFile,
    signals: Option<SignalPipe>,
    procs: Vec<Proc>,
    exporter: Option<Pid>,
    generation: u64,
    desired: u32,
    phase: Phase,
    boot_failures: u32,
    failed: Option<MasterError>,
    /// The pid file this master wrote (`PIDFILE.2` during an upgrade).
    pub(super) pidfile: Option<super::Pidfile>,
    /// The new master started by USR2, while it runs.
    upgrade_child: Option<Pid>,
    /// The old master, while this master is the new half of an upgrade.
    upgrading_from: Option<Pid>,
    /// Whether READY=1 was sent for the current generation of workers.
    ready_notified: bool,
    /// When the last fold window closed.
    last_fold: Instant,
    /// Whether the exporter was sent SIGKILL at the stop deadline.
    exporter_killed: bool,
    /// Slots whose worker died on its own, to respawn into first.
    vacated: Vec<u32>,
    /// When the exporter was last started (restarts are spaced by a second).
    exporter_started: Option<Instant>,
}

/// What [`super::run`] needs back from the loop for clean-up.
#[derive(Debug)]
pub(super) struct Outcome {
    pub pidfile: Option<super::Pidfile>,
    pub upgrade_child_alive: bool,
}

/// Tells systemd (when `NOTIFY_SOCKET` is set) about a state change.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        log_warn!("sd_notify failed: {e}");
    }
}

impl<'a> Arbiter<'a> {
    pub(super) fn start(
        spec: &'a ServerSpec,
        worker: Arc<dyn Worker>,
        listeners: Vec<Listener>,
        metrics_listener: Option<TcpListener>,
        store: StoreDir,
        upgrading_from: Option<Pid>,
    ) -> Result<Arbiter<'a>, MasterError> {
        let config = Arc::new(spec.config.clone());
        let store_err = |source| MasterError::Store {
            path: store.path().to_owned(),
            source,
        };
        let index = Index::create(
            &store.index_path(),
            config.metrics_max_series,
            &config.histogram_buckets,
        )
        .map_err(store_err)?;
        let ident = |kind| FileIdentity {
            kind,
            slot: 0,
            generation: 0,
            worker_kind: None,
        };
        let master_file =
            DataFile::create(&store.master_path(), ident(FileKind::Master)).map_err(store_err)?;
        let retired =
            DataFile::create(&store.retired_path(), ident(FileKind::Retired)).map_err(store_err)?;
        master_file
            .header()
            .pid
            .store(std::process::id(), Ordering::Relaxed);
        let signals = SignalPipe::install(&SIGNALS)?;
        for l in &listeners {
            log_info!("Listening at: {} ({})", l.describe(), std::process::id());
        }
        log_info!("Using worker: {}", config.worker);
        if let Some(m) = &metrics_listener {
            if let Ok(a) = m.local_addr() {
                log_info!("Metrics at: http://{a}{}", config.metrics_path);
            }
        }
        Ok(Arbiter {
            spec,
            desired: config.workers,
            config,
            worker,
            listeners,
            metrics_listener,
            store,
            index,
            mirror: Mirror::default(),
            master_file,
            retired,
            signals: Some(signals),
            procs: Vec::new(),
            exporter: None,
            generation: 0,
            phase: Phase::Running,
            boot_failures: 0,
            failed: None,
            pidfile: None,
            upgrade_child: None,
            upgrading_from,
            ready_notified: false,
            last_fold: Instant::now(),
            exporter_killed: false,
            vacated: Vec::new(),
            exporter_started: None,
        })
    }

    pub(super) fn outcome(&mut self) -> Outcome {
        Outcome {
            pidfile: self.pidfile.take(),
            upgrade_child_alive: self.upgrade_child.is_some(),
        }
    }

    pub(super) fn run(&mut self) -> Result<(), MasterError> {
        if self.upgrading_from.is_none() {
            self.spawn_exporter();
        }
        self.manage();
        loop {
            let wait = self.next_wake();
            let pending = match &self.signals {
                Some(pipe) => {
                    pipe.wait(wait);
                    pipe.drain()
                }
                None => Vec::new(),
            };
            for sig in pending {
                self.on_signal(sig);
            }
            self.reap();
            if self.phase == Phase::Running {
                self.check_workers();
                self.manage();
                self.check_old_master();
                if self.exporter.is_none() && self.upgrading_from.is_none() {
                    self.spawn_exporter();
                }
                self.notify_ready();
            }
            self.enforce_deadlines();
            self.publish();
            if matches!(self.phase, Phase::Stopping { .. })
                && self.procs.is_empty()
                && self.exporter.is_none()
            {
                break;
            }
        }
        log_info!("Shutting down: Master");
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn next_wake(&self) -> Duration {
        let now = Instant::now();
        let mut wake = TICK;
        let mut consider = |d: Instant| wake = wake.min(d.saturating_duration_since(now));
        if let Phase::Stopping { deadline, .. } = self.phase {
            consider(deadline);
        }
        for p in &self.procs {
            match p.life {
                Life::Retiring { deadline, .. } | Life::TimedOut { deadline, .. } => {
                    consider(deadline)
                }
                Life::Serving => {}
            }
        }
        if sys::child_exited() {
            consider(self.last_fold + FOLD_INTERVAL);
        }
        wake.max(Duration::from_millis(1))
    }

    fn count(&self, sig: MasterSignal) {
        self.master_file.header().signals[sig.code() as usize].fetch_add(1, Ordering::Relaxed);
    }

    fn on_signal(&mut self, sig: Signal) {
        let Some(ms) = master_signal(sig) else { return };
        self.count(ms);
        match ms {
            MasterSignal::Chld => {} // reaping follows every wake-up
            MasterSignal::Hup => self.reload(),
            MasterSignal::Ttin => {
                if self.phase == Phase::Running {
                    self.desired = (self.desired + 1).min(crate::config::MAX_WORKERS);
                    log_info!("TTIN: {} workers", self.desired);
                }
            }
            MasterSignal::Ttou => {
                if self.phase == Phase::Running && self.desired > 1 {
                    self.desired -= 1;
                    log_info!("TTOU: {} workers", self.desired);
                }
            }
            MasterSignal::Usr1 => {
                log_info!("USR1: reopening log files");
                if let Err(e) = crate::log::open_errorlog(&self.config.errorlog) {
                    log_error!("cannot reopen the error log: {e}");
                }
                for p in &self.procs {
                    sys::send(p.pid, Signal::SIGUSR1);
                }
                if let Some(pid) = self.exporter {
                    sys::send(pid, Signal::SIGUSR1);
                }
            }
            MasterSignal::Usr2 => self.upgrade(),
            MasterSignal::Winch => self.stop_workers(),
            MasterSignal::Term => self.stop(true),
            MasterSignal::Int | MasterSignal::Quit => self.stop(false),
        }
    }

    /// HUP: reload the settings, start a new generation in every slot, retire
    /// the old one gracefully.
    fn reload(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        log_info!("HUP: reloading");
        let mut reloading = vec![sd_notify::NotifyState::Reloading];
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            reloading.push(now);
        }
        notify(&reloading);
        self.ready_notified = false;
        if let Some(reload) = &self.spec.reload {
            match reload() {
                Ok(new) => match (self.spec.workers)(&new.worker) {
                    Ok(worker) => {
                        let new = keep_restart_only(&self.config, new);
                        self.worker = worker;
                        self.desired = new.workers;
                        self.config = Arc::new(new);
                        if let Err(e) = crate::log::open_errorlog(&self.config.errorlog) {
                            log_error!("cannot reopen the error log: {e}");
                        }
                    }
                    Err(e) => log_error!("HUP: setting `worker`: {e}; keeping the old settings"),
                },
                Err(e) => log_error!("HUP: {e}; keeping the old settings"),
            }
        }
        let deadline = Instant::now() + self.config.graceful_timeout;
        let mut old = Vec::new();
        for p in &mut self.procs {
            if p.life == Life::Serving {
                p.life = Life::Retiring {
                    reason: ExitReason::Reload,
                    deadline,
                    killed: false,
                };
                old.push(p.pid);
            }
        }
        self.manage();
        for pid in old {
            sys::send(pid, Signal::SIGTERM);
        }
        self.master_file
            .header()
            .reloads
            .fetch_add(1, Ordering::Relaxed);
    }

    fn stop(&mut self, graceful: bool) {
        if let Phase::Stopping {
            graceful: false, ..
        } = self.phase
        {
            return;
        }
        if let Phase::Stopping { graceful: true, .. } = self.phase {
            if graceful {
                return;
            }
        }
        let deadline = Instant::now()
            + if graceful {
                self.config.graceful_timeout
            } else {
                QUICK_STOP
            };
        log_info!(
            "{} stop: {} workers",
            if graceful { "Graceful" } else { "Quick" },
            self.procs.len()
        );
        self.phase = Phase::Stopping { deadline, graceful };
        notify(&[sd_notify::NotifyState::Stopping]);
        let sig = if graceful {
            Signal::SIGTERM
        } else {
            Signal::SIGQUIT
        };
        for p in &mut self.procs {
            let reason = match p.life {
                Life::Retiring { reason, .. } => reason,
                _ => ExitReason::Shutdown,
            };
            p.life = Life::Retiring {
                reason,
                deadline,
                killed: false,
            };
            sys::send(p.pid, sig);
        }
        if let Some(pid) = self.exporter {
            sys::send(pid, Signal::SIGTERM);
        }
    }

    /// Reaps every exited child, folding workers' counters into the retired
    /// totals inside one fold window.
    fn reap(&mut self) {
        // Open the fold window only when there is something to fold, so that
        // scrapes racing a busy loop are not retried for nothing.
        if !sys::child_exited() || self.last_fold.elapsed() < FOLD_INTERVAL {
            return;
        }
        fold_begin(&self.retired);
        loop {
            match sys::reap_one() {
                Ok(Some(r)) => self.on_exit(r),
                Ok(None) => break,
                Err(e) => {
                    log_error!("wait4 failed: {e}");
                    break;
                }
            }
        }
        fold_end(&self.retired);
        self.last_fold = Instant::now();
    }

    fn on_exit(&mut self, r: Reaped) {
        if Some(r.pid) == self.exporter {
            self.exporter = None;
            if self.phase == Phase::Running {
                log_warn!(
                    "exporter (pid {}) exited ({:?}); restarting",
                    r.pid,
                    r.ended
                );
            }
            return;
        }
        if Some(r.pid) == self.upgrade_child {
            self.upgrade_child = None;
            log_warn!("the new master (pid {}) exited ({:?})", r.pid, r.ended);
            return;
        }
        let Some(i) = self.procs.iter().position(|p| p.pid == r.pid) else {
            return; // not ours
        };
        let p = self.procs.remove(i);
        let reason = exit_reason(p.life, r.ended);
        if let Err(e) = fold(
            &self.index,
            &mut self.mirror,
            &self.retired,
            &p.file,
            r.cpu_ns,
        ) {
            log_error!("cannot fold the counters of worker {}: {e}", p.slot);
        }
        let _ = std::fs::remove_file(self.store.worker_path(p.slot, p.generation));
        self.master_file.header().exits[reason.code() as usize].fetch_add(1, Ordering::Relaxed);
        if !matches!(p.life, Life::Retiring { .. }) {
            self.vacated.push(p.slot);
        }
        match reason {
            ExitReason::Crash | ExitReason::Timeout => log_warn!(
                "worker {} (pid {}) exited: {} ({:?})",
                p.slot,
                p.pid,
                reason.label(),
                r.ended
            ),
            _ => log_info!(
                "worker {} (pid {}) exited: {}",
                p.slot,
                p.pid,
                reason.label()
            ),
        }
        if reason == ExitReason::BootError {
            self.boot_failures += 1;
            if self.boot_failures >= BOOT_FAILURE_LIMIT && self.failed.is_none() {
                log_error!(
                    "workers failed to boot {} times in a row",
                    self.boot_failures
                );
                self.failed = Some(MasterError::BootFailed(self.boot_failures));
                self.stop(false);
            }
        }
    }

    /// Notes booted workers and enforces the heartbeat timeout.
    fn check_workers(&mut self) {
        let now_mono = crate::store::monotonic_ns();
        let timeout = self.config.timeout;
        for p in &mut self.procs {
            let h = p.file.header();
            if !p.booted && h.state.load(Ordering::Relaxed) != WorkerState::Booting.code() {
                p.booted = true;
                self.boot_failures = 0;
            }
            let Some(timeout) = timeout else { continue };
            if p.life != Life::Serving {
                continue;
            }
            let beat = h.heartbeat_ns.load(Ordering::Relaxed);
            if now_mono.saturating_sub(beat) > timeout.as_nanos() as u64 {
                log_error!(
                    "worker {} (pid {}) timed out after {}s without a heartbeat",
                    p.slot,
                    p.pid,
                    timeout.as_secs()
                );
                sys::send(p.pid, Signal::SIGABRT);
                self.vacated.push(p.slot);
                p.life = Life::TimedOut {
                    deadline: Instant::now() + QUICK_STOP,
                    killed: false,
                };
            }
        }
    }

    fn enforce_deadlines(&mut self) {
        let now = Instant::now();
        for p in &mut self.procs {
            match &mut p.life {
                Life::Retiring {
                    deadline, killed, ..
                }
                | Life::TimedOut { deadline, killed } => {
                    if !*killed && now >= *deadline {
                        log_warn!(
                            "worker {} (pid {}) did not stop in time; killing",
                            p.slot,
                            p.pid
                        );
                        sys::send(p.pid, Signal::SIGKILL);
                        *killed = true;
                    }
                }
                Life::Serving => {}
            }
        }
        if let (Phase::Stopping { deadline, .. }, Some(pid)) = (self.phase, self.exporter) {
            if now >= deadline && !self.exporter_killed {
                sys::send(pid, Signal::SIGKILL);
                self.exporter_killed = true;
            }
        }
    }

    /// Keeps `desired` workers serving: fills the lowest free slots, retires the
    /// oldest extras.
    fn manage(&mut self) {
        if self.phase != Phase::Running || self.failed.is_some() {
            return;
        }
        let serving = |procs: &[Proc]| procs.iter().filter(|p| p.life == Life::Serving).count();
        let taken =
            |procs: &[Proc], s: u32| procs.iter().any(|p| p.slot == s && p.life == Life::Serving);
        while serving(&self.procs) < self.desired as usize {
            // A dead worker's replacement goes into its slot; new ones into the
            // lowest free slot.
            let slot = loop {
                match self.vacated.pop() {
                    Some(s) if !taken(&self.procs, s) => break s,
                    Some(_) => continue,
                    None => break (0u32..).find(|s| !taken(&self.procs, *s)).unwrap_or(0),
                }
            };
            if let Err(e) = self.spawn_worker(slot) {
                log_error!("cannot start worker {slot}: {e}");
                break;
            }
        }
        self.vacated.clear();
        while serving(&self.procs) > self.desired as usize {
            let deadline = Instant::now() + self.config.graceful_timeout;
            let Some(oldest) = self
                .procs
                .iter_mut()
                .filter(|p| p.life == Life::Serving)
                .min_by_key(|p| p.generation)
            else {
                break;
            };
            oldest.life = Life::Retiring {
                reason: ExitReason::ScaleDown,
                deadline,
                killed: false,
            };
            sys::send(oldest.pid, Signal::SIGTERM);
        }
    }

    fn publish(&self) {
        let h = self.master_file.header();
        let serving = self
            .procs
            .iter()
            .filter(|p| p.life == Life::Serving)
            .count();
        h.workers.store(serving as u64, Ordering::Relaxed);
        h.workers_desired
            .store(u64::from(self.desired), Ordering::Relaxed);
    }

    /// Sends READY=1 once every desired worker of the current generation booted.
    fn notify_ready(&mut self) {
        if self.ready_notified {
            return;
        }
        let booted = self
            .procs
            .iter()
            .filter(|p| p.life == Life::Serving && p.booted)
            .count();
        if booted >= self.desired as usize {
            self.ready_notified = true;
            if self.upgrading_from.is_some() {
                // Take over as the service's main process before the old master
                // exits, so systemd does not end the service with it.
                notify(&[
                    sd_notify::NotifyState::MainPid(std::process::id()),
                    sd_notify::NotifyState::Ready,
                ]);
            } else {
                notify(&[sd_notify::NotifyState::Ready]);
            }
        }
    }

    /// The new half of an upgrade: once the old master is gone (we are
    /// re-parented), take over the pid file, tell systemd our pid and start
    /// the exporter on the inherited metrics socket.
    fn check_old_master(&mut self) {
        let Some(old) = self.upgrading_from else {
            return;
        };
        if nix::unistd::getppid() == old {
            return;
        }
        self.upgrading_from = None;
        log_info!("old master {old} is gone; taking over");
        if let (Some(pf), Some(final_path)) = (&mut self.pidfile, &self.config.pidfile) {
            if let Err(e) = pf.promote(final_path) {
                log_error!("cannot move the pid file to {}: {e}", final_path.display());
            }
        }
    }

    /// USR2: start a new master from the current binary, handing it the
    /// listening sockets; this master keeps serving until told to stop.
    fn upgrade(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        if let Some(pid) = self.upgrade_child {
            log_warn!("USR2: an upgrade (pid {pid}) is already running; ignored");
            return;
        }
        if self.upgrading_from.is_some() {
            log_warn!("USR2: this master is itself being upgraded into; ignored");
            return;
        }
        let mut args = std::env::args_os();
        let Some(program) = args.next() else {
            log_error!("USR2: cannot tell which binary to run");
            return;
        };
        let fds: Vec<std::os::fd::BorrowedFd<'_>> = self
            .listeners
            .iter()
            .map(std::os::fd::AsFd::as_fd)
            .collect();
        let metrics_fd = self.metrics_listener.as_ref().map(std::os::fd::AsFd::as_fd);
        let all: Vec<_> = fds.iter().copied().chain(metrics_fd).collect();
        set_inheritable(&all, true);
        let list: Vec<String> = fds
            .iter()
            .map(|fd| std::os::fd::AsRawFd::as_raw_fd(fd).to_string())
            .collect();
        let mut cmd = std::process::Command::new(&program);
        cmd.args(args)
            .env(super::ENV_LISTEN_FDS, list.join(","))
            .env(super::ENV_UPGRADE_FROM, std::process::id().to_string());
        if let Some(fd) = metrics_fd {
            cmd.env(
                super::ENV_METRICS_FD,
                std::os::fd::AsRawFd::as_raw_fd(&fd).to_string(),
            );
        }
        let spawned = cmd.spawn();
        set_inheritable(&all, false);
        match spawned {
            Ok(child) => {
                log_info!("USR2: started new master {}", child.id());
                self.upgrade_child = Some(Pid::from_raw(child.id() as i32));
            }
            Err(e) => log_error!("USR2: cannot start {}: {e}", program.to_string_lossy()),
        }
    }

    /// WINCH: stop every worker gracefully and keep the master (used with USR2:
    /// the old generation stops serving while the new one takes over).
    fn stop_workers(&mut self) {
        if self.phase != Phase::Running {
            return;
        }
        log_info!("WINCH: stopping all workers, keeping the master");
        self.desired = 0;
        let deadline = Instant::now() + self.config.graceful_timeout;
        for p in &mut self.procs {
            if p.life == Life::Serving {
                p.life = Life::Retiring {
                    reason: ExitReason::Shutdown,
                    deadline,
                    killed: false,
                };
                sys::send(p.pid, Signal::SIGTERM);
            }
        }
    }

    fn spawn_worker(&mut self, slot: u32) -> std::io::Result<()> {
        self.generation += 1;
        let generation = self.generation;
        let path = self.store.worker_path(slot, generation);
        let file = DataFile::create(
            &path,
            FileIdentity {
                kind: FileKind::Worker,
                slot,
                generation,
                worker_kind: Some(self.worker.kind()),
            },
        )?;
        let mask = sys::block(&SIGNALS)?;
        // SAFETY: the master is single-threaded (no runtime, no helper thread).
        let forked = unsafe { sys::fork() };
        if !matches!(forked, Ok(Forked::Child)) {
            sys::restore_mask(&mask);
        }
        match forked {
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
            Ok(Forked::Child) => {
                // The master's signals stay blocked until the worker installs its
                // own handlers (TERM, INT, QUIT, USR1); the others stay blocked.
                self.become_child();
                let listeners = std::mem::take(&mut self.listeners);
                let code = child_main(
                    self.worker.as_ref(),
                    &self.spec.app,
                    self.config.clone(),
                    listeners,
                    Placement {
                        store: self.store.clone(),
                        slot,
                        generation,
                    },
                );
                std::process::exit(code);
            }
            Ok(Forked::Parent(pid)) => {
                file.header()
                    .pid
                    .store(pid.as_raw() as u32, Ordering::Relaxed);
                self.procs.push(Proc {
                    pid,
                    slot,
                    generation,
                    file,
                    life: Life::Serving,
                    booted: false,
                });
                Ok(())
            }
        }
    }

    fn spawn_exporter(&mut self) {
        let (Some(main), Some(listener)) = (&self.spec.exporter, &self.metrics_listener) else {
            return;
        };
        if self
            .exporter_started
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return; // a crashing exporter is restarted at most once a second
        }
        self.exporter_started = Some(Instant::now());
        let listener = match listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                log_error!("cannot hand the metrics socket to the exporter: {e}");
                return;
            }
        };
        let mask = match sys::block(&SIGNALS) {
            Ok(m) => m,
            Err(e) => {
                log_error!("cannot block signals to start the exporter: {e}");
                return;
            }
        };
        // SAFETY: the master is single-threaded.
        let forked = unsafe { sys::fork() };
        if !matches!(forked, Ok(Forked::Child)) {
            sys::restore_mask(&mask);
        }
        match forked {
            Err(e) => log_error!("cannot start the exporter: {e}"),
            Ok(Forked::Child) => {
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
                    path: self.config.metrics_path.clone(),
                    errorlog: self.config.errorlog.clone(),
                });
                std::process::exit(code);
            }
            Ok(Forked::Parent(pid)) => self.exporter = Some(pid),
        }
    }

    /// In a freshly forked child: give back the master's signal handling.
    fn become_child(&mut self) {
        if let Some(pipe) = self.signals.take() {
            pipe.reset();
        }
        self.metrics_listener = None;
    }
}

/// Settings a reload cannot change (sockets, the store, the exporter): keeps
/// the running values and warns about each one that changed.
fn keep_restart_only(old: &Config, new: Config) -> Config {
    let (new, kept) = old.keep_restart_only(new);
    for name in kept {
        log_warn!("HUP: changed `{}` takes effect only after a restart", name);
    }
    new
}

/// Clears (or sets back) close-on-exec on `fds` around spawning the new master.
fn set_inheritable(fds: &[std::os::fd::BorrowedFd<'_>], inherit: bool) {
    use nix::fcntl::{fcntl, FcntlArg, FdFlag};
    let flags = if inherit {
        FdFlag::empty()
    } else {
        FdFlag::FD_CLOEXEC
    };
    for fd in fds {
        if let Err(e) = fcntl(fd, FcntlArg::F_SETFD(flags)) {
            log_error!("fcntl(F_SETFD): {e}");
        }
    }
}

fn master_signal(sig: Signal) -> Option<MasterSignal> {
    Some(match sig {
        Signal::SIGHUP => MasterSignal::Hup,
        Signal::SIGUSR1 => MasterSignal::Usr1,
        Signal::SIGUSR2 => MasterSignal::Usr2,
        Signal::SIGCHLD => MasterSignal::Chld,
        Signal::SIGTTIN => MasterSignal::Ttin,
        Signal::SIGTTOU => MasterSignal::Ttou,
        Signal::SIGTERM => MasterSignal::Term,
        Signal::SIGINT => MasterSignal::Int,
        Signal::SIGQUIT => MasterSignal::Quit,
        Signal::SIGWINCH => MasterSignal::Winch,
        _ => return None,
    })
}

fn exit_reason(life: Life, ended: Ended) -> ExitReason {
    match (life, ended) {
        (Life::Retiring { reason, .. }, _) => reason,
        (Life::TimedOut { .. }, _) => ExitReason::Timeout,
        (Life::Serving, Ended::Exited(EXIT_BOOT_ERROR)) => ExitReason::BootError,
        (Life::Serving, Ended::Exited(EXIT_MAX_REQUESTS)) => ExitReason::MaxRequests,
        (Life::Serving, _) => ExitReason::Crash,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_reasons_follow_the_rules() {
        let later = Instant::now();
        assert_eq!(
            exit_reason(Life::Serving, Ended::Signaled(9)),
            ExitReason::Crash
        );
        assert_eq!(
            exit_reason(Life::Serving, Ended::Exited(EXIT_BOOT_ERROR)),
            ExitReason::BootError
        );
        assert_eq!(
            exit_reason(Life::Serving, Ended::Exited(EXIT_MAX_REQUESTS)),
            ExitReason::MaxRequests
        );
        assert_eq!(
            exit_reason(
                Life::Retiring {
                    reason: ExitReason::Reload,
                    deadline: later,
                    killed: true
                },
                Ended::Signaled(9)
            ),
            ExitReason::Reload
        );
        assert_eq!(
            exit_reason(
                Life::TimedOut {
                    deadline: later,
                    killed: false
                },
                Ended::Signaled(6)
            ),
            ExitReason::Timeout
        );
        assert_eq!(master_signal(Signal::SIGCHLD), Some(MasterSignal::Chld));
        assert_eq!(master_signal(Signal::SIGPIPE), None);
    }
}
