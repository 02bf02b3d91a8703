//! The master's loop. Signal handlers only queue bytes in a pipe; this loop
//! turns each signal into an action with one exhaustive match, reaps children
//! (folding their counters into the retired totals), enforces heartbeats and
//! deadlines, and keeps the desired number of workers in their slots. It acts
//! on the world only through [`Os`]; HUP lives in `reload`, USR2 in `upgrade`.
//!
//! Supervision rules: reap until nothing is left; unknown pids are not ours;
//! a worker that exits with the boot-error code three times in a row stops the
//! server; stopping is a polite signal, a deadline, SIGKILL, a final reap; a
//! stale heartbeat gets SIGABRT, then SIGKILL; fork happens only from here,
//! while the process has one thread.

use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::health::BACKOFF_BASE;
use super::os::{master_signal, Notice, Os};
use super::procs::{Life, Proc};
use super::{MasterError, Pidfile};
use crate::config::Config;
use crate::store::index::Mirror;
use crate::store::WorkerFile;
use crate::store::{ExitReason, Index, MasterFile, MasterSignal, RetiredFile, StoreDir};
use crate::sys::Reaped;
use crate::{log_error, log_info, log_warn};

/// Boot failures in a row that stop the server.
const BOOT_FAILURE_LIMIT: u32 = 3;
/// Time a quick stop (INT/QUIT) or a timed-out worker gets before SIGKILL.
pub(super) const QUICK_STOP: Duration = Duration::from_secs(1);
/// Longest sleep of the loop: heartbeats (and the store files) are checked
/// at least this often.
pub(super) const TICK: Duration = Duration::from_millis(250);
/// Shortest time between two folds, so that a scrape (which retries when a
/// fold races it) always finds a quiet window, even in a SIGCHLD storm.
pub(super) const FOLD_INTERVAL: Duration = Duration::from_millis(10);
/// Shortest time between two starts of the exporter.
pub(super) const EXPORTER_RESTART: Duration = Duration::from_secs(1);

/// The master's phase.
#[derive(Debug)]
pub(super) enum Phase {
    /// Supervising. `ready` once READY=1 went out for the current generation;
    /// `boot_failures` counts boot errors in a row.
    Running { ready: bool, boot_failures: u32 },
    /// Every worker was told to stop; SIGKILL at `deadline`. The exporter
    /// (answering `/readyz` with 503) gets SIGTERM once no worker is left
    /// (`exporter_stopped`), SIGKILL at `deadline`. `failure` is what
    /// [`Arbiter::run`] returns once all children are gone.
    Stopping {
        deadline: Instant,
        graceful: bool,
        exporter_stopped: bool,
        exporter_killed: bool,
        failure: Option<MasterError>,
    },
}

/// The exporter process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Exporter {
    /// This server has no exporter.
    Off,
    /// Not running; started again no sooner than [`EXPORTER_RESTART`] after
    /// `last_start`.
    Down { last_start: Option<Instant> },
    /// Running since `started`.
    Up { pid: Pid, started: Instant },
}

/// Where this master is in a binary upgrade (USR2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Upgrade {
    /// None under way.
    Idle,
    /// USR2 started the new master `child`, which still runs.
    Spawned { child: Pid },
    /// This master is the new half; the old master `old` still runs.
    TakingOver { old: Pid },
}

/// The master's state: its phase, its children and the store files it writes.
pub(super) struct Arbiter<O: Os> {
    pub(super) os: O,
    pub(super) config: Arc<Config>,
    pub(super) store: StoreDir,
    pub(super) index: Index,
    pub(super) mirror: Mirror,
    pub(super) master_file: MasterFile,
    /// Shared with the fold window open while reaping.
    pub(super) retired: Rc<RetiredFile>,
    pub(super) procs: Vec<Proc>,
    /// Slots whose worker died on its own, to respawn into first.
    pub(super) vacated: Vec<u32>,
    pub(super) generation: u64,
    pub(super) desired: u32,
    pub(super) phase: Phase,
    pub(super) exporter: Exporter,
    pub(super) upgrade: Upgrade,
    /// The pid file this master wrote (`PIDFILE.2` during an upgrade).
    pub(super) pidfile: Option<Pidfile>,
    /// When the last fold window closed.
    pub(super) last_fold: Instant,
    /// Workers in a row that died on their own before they booted (or could
    /// not be started).
    pub(super) fast_crashes: u32,
    /// No worker starts before this (the back-off after fast crashes).
    pub(super) respawn_at: Option<Instant>,
    /// When the store files were last checked (at most once a [`TICK`]).
    pub(super) last_store_check: Option<Instant>,
}

impl<O: Os> Arbiter<O> {
    /// Creates the store files and an arbiter with no children yet.
    ///
    /// # Errors
    /// A store file could not be created.
    pub(super) fn new(
        os: O,
        config: Arc<Config>,
        store: StoreDir,
        exporter: bool,
        upgrading_from: Option<Pid>,
        pidfile: Option<Pidfile>,
    ) -> Result<Arbiter<O>, MasterError> {
        let store_err = |source: std::io::Error| MasterError::Store {
            path: store.path().to_owned(),
            source: if source.kind() == std::io::ErrorKind::StorageFull {
                std::io::Error::new(
                    source.kind(),
                    format!(
                        "{source} (each store file has room for `metrics_store_series` = {} \
                         series; a smaller store needs less room)",
                        config.metrics_store_series
                    ),
                )
            } else {
                source
            },
        };
        let index = Index::create(
            &store.index_path(),
            config.metrics_store_series as usize,
            config.metrics_max_series,
            &config.histogram_buckets,
        )
        .map_err(store_err)?;
        let master_file = MasterFile::create(&store).map_err(store_err)?;
        let retired = Rc::new(RetiredFile::create(&store).map_err(store_err)?);
        let last_fold = os.now();
        Ok(Arbiter {
            os,
            desired: config.workers,
            config,
            store,
            index,
            mirror: Mirror::default(),
            master_file,
            retired,
            procs: Vec::new(),
            vacated: Vec::new(),
            generation: 0,
            phase: Phase::Running {
                ready: false,
                boot_failures: 0,
            },
            exporter: if exporter {
                Exporter::Down { last_start: None }
            } else {
                Exporter::Off
            },
            upgrade: upgrading_from.map_or(Upgrade::Idle, |old| Upgrade::TakingOver { old }),
            pidfile,
            last_fold,
            fast_crashes: 0,
            respawn_at: None,
            last_store_check: None,
        })
    }

    /// Whether the new master started by USR2 still runs (it then keeps
    /// serving on the unix sockets this one bound).
    pub(super) fn upgrade_child_alive(&self) -> bool {
        matches!(self.upgrade, Upgrade::Spawned { .. })
    }

    pub(super) fn running(&self) -> bool {
        matches!(self.phase, Phase::Running { .. })
    }

    /// Runs until every child is gone after a stop.
    ///
    /// # Errors
    /// Workers kept failing to boot.
    pub(super) fn run(&mut self) -> Result<(), MasterError> {
        self.begin();
        while !self.step() {}
        log_info!("Shutting down: Master");
        match &mut self.phase {
            Phase::Stopping { failure, .. } => failure.take().map_or(Ok(()), Err),
            Phase::Running { .. } => Ok(()),
        }
    }

    /// Starts the exporter and the first workers.
    pub(super) fn begin(&mut self) {
        self.keep_exporter();
        self.manage();
    }

    /// One turn of the loop: wait for a signal or a deadline, act, reap,
    /// supervise. Returns whether the master is done.
    pub(super) fn step(&mut self) -> bool {
        let wait = self.next_wake();
        for sig in self.os.wait(wait) {
            self.on_signal(sig);
        }
        self.reap();
        if self.running() {
            self.check_store();
        }
        if self.running() {
            self.check_workers();
            self.manage();
            self.check_old_master();
            self.keep_exporter();
            self.notify_ready();
        }
        self.enforce_deadlines();
        self.publish();
        !self.running() && self.procs.is_empty() && !matches!(self.exporter, Exporter::Up { .. })
    }

    fn next_wake(&mut self) -> Duration {
        let now = self.os.now();
        let mut wake = TICK;
        let mut consider = |d: Instant| wake = wake.min(d.saturating_duration_since(now));
        if let Phase::Stopping { deadline, .. } = self.phase {
            consider(deadline);
        }
        self.procs
            .iter()
            .filter_map(Proc::deadline)
            .for_each(&mut consider);
        if self.os.child_exited() {
            consider(self.last_fold + FOLD_INTERVAL);
        }
        if let Some(t) = self.respawn_at {
            consider(t);
        }
        wake.max(Duration::from_millis(1))
    }

    fn on_signal(&mut self, sig: Signal) {
        let Some(ms) = master_signal(sig) else { return };
        self.master_file.count_signal(ms);
        match ms {
            MasterSignal::Chld => {} // reaping follows every wake-up
            MasterSignal::Hup => self.reload(),
            MasterSignal::Ttin => {
                if self.running() {
                    self.desired = (self.desired + 1).min(crate::config::MAX_WORKERS);
                    log_info!("TTIN: {} workers", self.desired);
                }
            }
            MasterSignal::Ttou => {
                if self.running() && self.desired > 1 {
                    self.desired -= 1;
                    log_info!("TTOU: {} workers", self.desired);
                }
            }
            MasterSignal::Usr1 => {
                log_info!("USR1: reopening log files");
                self.os.reopen_errorlog(&self.config);
                let exporter = match self.exporter {
                    Exporter::Up { pid, .. } => Some(pid),
                    _ => None,
                };
                let pids: Vec<Pid> = self.procs.iter().map(|p| p.pid).chain(exporter).collect();
                for pid in pids {
                    self.os.signal(pid, Signal::SIGUSR1);
                }
            }
            MasterSignal::Usr2 => self.upgrade(),
            MasterSignal::Winch => self.stop_workers(),
            MasterSignal::Term => self.stop(true),
            MasterSignal::Int | MasterSignal::Quit => self.stop(false),
        }
    }

    /// Reaps every exited child, folding workers' counters into the retired
    /// totals inside one fold window.
    fn reap(&mut self) {
        // Open the fold window only when there is something to fold, so that
        // scrapes racing a busy loop are not retried for nothing.
        if !self.os.child_exited()
            || self.os.now().saturating_duration_since(self.last_fold) < FOLD_INTERVAL
        {
            return;
        }
        // Everything a reaped worker changes (its exit count, a halt) happens
        // inside the window, so that a scrape sees all of it or none.
        let retired = Rc::clone(&self.retired);
        let window = retired.fold_window();
        loop {
            match self.os.reap() {
                Ok(Some(r)) => match self.take_proc(r.pid) {
                    Some(p) => {
                        let folded = window.fold(&self.index, &mut self.mirror, &p.file, r.cpu_ns);
                        if let Err(e) = folded {
                            log_error!("cannot fold the counters of worker {}: {e}", p.slot);
                        }
                        self.on_worker_exit(p, r);
                    }
                    None => self.on_other_exit(r),
                },
                Ok(None) => break,
                Err(e) => {
                    log_error!("wait4 failed: {e}");
                    break;
                }
            }
        }
        drop(window);
        self.last_fold = self.os.now();
    }

    fn take_proc(&mut self, pid: Pid) -> Option<Proc> {
        let i = self.procs.iter().position(|p| p.pid == pid)?;
        Some(self.procs.remove(i))
    }

    /// A reaped child that is not a worker: the exporter, the new master, or
    /// not ours.
    fn on_other_exit(&mut self, r: Reaped) {
        match (self.exporter, self.upgrade) {
            (Exporter::Up { pid, started }, _) if pid == r.pid => {
                self.exporter = Exporter::Down {
                    last_start: Some(started),
                };
                if self.running() {
                    log_warn!("exporter (pid {pid}) exited ({:?}); restarting", r.ended);
                }
            }
            (_, Upgrade::Spawned { child }) if child == r.pid => {
                self.upgrade = Upgrade::Idle;
                log_warn!("the new master (pid {child}) exited ({:?})", r.ended);
            }
            _ => {}
        }
    }

    /// A worker was reaped (its counters are folded).
    fn on_worker_exit(&mut self, p: Proc, r: Reaped) {
        let reason = p.exit_reason(r.ended);
        self.master_file.count_exit(reason);
        if !matches!(p.life, Life::Retiring { .. }) {
            self.vacated.push(p.slot);
        }
        let (slot, pid) = (p.slot, p.pid);
        if matches!(p.life, Life::Serving)
            && matches!(reason, ExitReason::Crash | ExitReason::BootError)
        {
            self.note_start_outcome(!(p.booted || p.file.booted()));
        }
        p.file.keep_as_spare(&self.store);
        match reason {
            ExitReason::Crash | ExitReason::Timeout => log_warn!(
                "worker {slot} (pid {pid}) exited: {} ({:?})",
                reason.label(),
                r.ended
            ),
            _ => log_info!("worker {slot} (pid {pid}) exited: {}", reason.label()),
        }
        if reason != ExitReason::BootError {
            return;
        }
        if let Phase::Running { boot_failures, .. } = &mut self.phase {
            *boot_failures += 1;
            let n = *boot_failures;
            if n >= BOOT_FAILURE_LIMIT {
                log_error!("workers failed to boot {n} times in a row");
                self.fail(MasterError::BootFailed(n));
            }
        }
    }

    /// Keeps `desired` workers serving: fills the vacated slots first, then
    /// the lowest free ones; retires the oldest extras.
    pub(super) fn manage(&mut self) {
        if !self.running() {
            return;
        }
        let taken = |procs: &[Proc], s: u32| procs.iter().any(|p| p.slot == s && p.serving());
        let now = self.os.now();
        let backing_off = self.respawn_at.is_some_and(|t| now < t);
        if !backing_off {
            self.respawn_at = None;
        }
        while !backing_off && self.serving() < self.desired as usize {
            let slot = loop {
                match self.vacated.pop() {
                    Some(s) if !taken(&self.procs, s) => break s,
                    Some(_) => continue,
                    None => break (0u32..).find(|s| !taken(&self.procs, *s)).unwrap_or(0),
                }
            };
            if let Err(e) = self.spawn_worker(slot) {
                log_error!("cannot start worker {slot}: {e}");
                self.note_start_outcome(true);
                if self.respawn_at.is_none() {
                    self.respawn_at = Some(now + BACKOFF_BASE);
                }
                break;
            }
        }
        if !backing_off {
            self.vacated.clear();
        }
        while self.serving() > self.desired as usize {
            let deadline = self.os.now() + self.config.graceful_timeout;
            let Some(oldest) = self
                .procs
                .iter_mut()
                .filter(|p| p.serving())
                .min_by_key(|p| p.generation)
            else {
                break;
            };
            oldest.retire(
                &mut self.os,
                ExitReason::ScaleDown,
                deadline,
                Signal::SIGTERM,
            );
        }
    }

    fn serving(&self) -> usize {
        self.procs.iter().filter(|p| p.serving()).count()
    }

    /// Retires every serving worker with `reason`: TERM and `graceful_timeout`.
    pub(super) fn retire_serving(&mut self, reason: ExitReason) {
        let deadline = self.os.now() + self.config.graceful_timeout;
        for p in self.procs.iter_mut().filter(|p| p.serving()) {
            p.retire(&mut self.os, reason, deadline, Signal::SIGTERM);
        }
    }

    fn spawn_worker(&mut self, slot: u32) -> std::io::Result<()> {
        self.generation += 1;
        let generation = self.generation;
        let kind = self.os.worker_kind();
        let file = match WorkerFile::create(&self.store, slot, generation, kind) {
            Ok(f) => f,
            // No room for a new file: the last reaped worker's will do.
            Err(e) => {
                let spare =
                    WorkerFile::from_spare(&self.store, slot, generation, kind).map_err(|_| e)?;
                log_warn!("no room for a new worker file; worker {slot} reuses the spare one");
                spare
            }
        };
        match self.os.spawn_worker(&self.config, slot, generation) {
            Ok(pid) => {
                file.set_pid(pid.as_raw() as u32);
                self.procs.push(Proc::new(pid, slot, generation, file));
                Ok(())
            }
            Err(e) => {
                file.remove();
                Err(e)
            }
        }
    }

    /// Starts the exporter when it is down and may start (not while the old
    /// master of an upgrade still serves metrics; at most once a second).
    fn keep_exporter(&mut self) {
        let Exporter::Down { last_start } = self.exporter else {
            return;
        };
        let now = self.os.now();
        if matches!(self.upgrade, Upgrade::TakingOver { .. })
            || last_start.is_some_and(|t| now.saturating_duration_since(t) < EXPORTER_RESTART)
        {
            return;
        }
        self.exporter = match self.os.spawn_exporter(&self.config) {
            Ok(pid) => Exporter::Up { pid, started: now },
            Err(e) => {
                log_error!("cannot start the exporter: {e}");
                Exporter::Down {
                    last_start: Some(now),
                }
            }
        };
    }

    /// Publishes the worker counts and the readiness (`/readyz`): running,
    /// at least one worker desired, and every desired worker booted.
    pub(super) fn publish(&self) {
        let ready = self.running() && self.desired > 0 && self.booted() >= self.desired as usize;
        self.master_file
            .publish_workers(self.serving() as u32, self.desired, ready);
    }

    /// Serving workers that have booted.
    fn booted(&self) -> usize {
        self.procs
            .iter()
            .filter(|p| p.serving() && p.booted)
            .count()
    }

    /// Sends READY=1 once every desired worker of the current generation booted.
    fn notify_ready(&mut self) {
        let booted = self.booted();
        let Phase::Running { ready, .. } = &mut self.phase else {
            return;
        };
        if *ready || booted < self.desired as usize {
            return;
        }
        *ready = true;
        self.os.notify(match self.upgrade {
            Upgrade::TakingOver { .. } => Notice::ReadyAsMain,
            _ => Notice::Ready,
        });
    }
}
