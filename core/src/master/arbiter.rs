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
}

impl<'a> Arbiter<'a> {
    pub(super) fn start(
        spec: &'a ServerSpec,
        worker: Arc<dyn Worker>,
        listeners: Vec<Listener>,
        metrics_listener: Option<TcpListener>,
        store: StoreDir,
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
        })
    }

    pub(super) fn run(&mut self) -> Result<(), MasterError> {
        self.spawn_exporter();
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
                if self.exporter.is_none() {
                    self.spawn_exporter();
                }
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
            }
            MasterSignal::Usr2 => log_warn!("USR2: binary upgrade is not supported; ignored"),
            MasterSignal::Winch => log_info!("WINCH: ignored (gpe never daemonizes)"),
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
        if let Some(reload) = &self.spec.reload {
            match reload() {
                Ok(new) => match (self.spec.workers)(&new.worker) {
                    Ok(worker) => {
                        if new.binds != self.config.binds {
                            log_warn!("HUP: changed `bind` takes effect only after a restart");
                        }
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
            if now >= deadline {
                sys::send(pid, Signal::SIGKILL);
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
        while serving(&self.procs) < self.desired as usize {
            let slot = (0u32..)
                .find(|s| {
                    !self
                        .procs
                        .iter()
                        .any(|p| p.slot == *s && p.life == Life::Serving)
                })
                .unwrap_or(0);
            if let Err(e) = self.spawn_worker(slot) {
                log_error!("cannot start worker {slot}: {e}");
                break;
            }
        }
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
        // SAFETY: the master is single-threaded (no runtime, no helper thread).
        match unsafe { sys::fork() } {
            Err(e) => {
                let _ = std::fs::remove_file(&path);
                Err(e)
            }
            Ok(Forked::Child) => {
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
        let listener = match listener.try_clone() {
            Ok(l) => l,
            Err(e) => {
                log_error!("cannot hand the metrics socket to the exporter: {e}");
                return;
            }
        };
        // SAFETY: the master is single-threaded.
        match unsafe { sys::fork() } {
            Err(e) => log_error!("cannot start the exporter: {e}"),
            Ok(Forked::Child) => {
                self.become_child();
                self.listeners.clear();
                let _ = nix::sys::prctl::set_pdeathsig(Signal::SIGTERM);
                let code = main(ExporterContext {
                    listener,
                    store: self.store.clone(),
                    path: self.config.metrics_path.clone(),
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
