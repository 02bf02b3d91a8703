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

use super::os::{Notice, Os};
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
/// Workers in a row that die on their own before they finish booting (or
/// cannot be started) after which respawns back off.
pub(super) const BACKOFF_AFTER: u32 = 3;
/// The first back-off; each further fast crash doubles it.
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// The longest back-off.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// The wait before the next respawn after `fast_crashes` fast crashes in a
/// row (none below [`BACKOFF_AFTER`]).
pub(super) fn backoff(fast_crashes: u32) -> Option<Duration> {
    let n = fast_crashes.checked_sub(BACKOFF_AFTER)?;
    Some(
        BACKOFF_BASE
            .saturating_mul(1u32.checked_shl(n.min(16)).unwrap_or(u32::MAX))
            .min(BACKOFF_MAX),
    )
}

/// The master's phase.
#[derive(Debug)]
pub(super) enum Phase {
    /// Supervising. `ready` once READY=1 went out for the current generation;
    /// `boot_failures` counts boot errors in a row.
    Running { ready: bool, boot_failures: u32 },
    /// Every worker was told to stop; SIGKILL at `deadline`. `failure` is
    /// what [`Arbiter::run`] returns once all children are gone.
    Stopping {
        deadline: Instant,
        graceful: bool,
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
    store: StoreDir,
    index: Index,
    mirror: Mirror,
    pub(super) master_file: MasterFile,
    /// Shared with the fold window open while reaping.
    retired: Rc<RetiredFile>,
    pub(super) procs: Vec<Proc>,
    /// Slots whose worker died on its own, to respawn into first.
    vacated: Vec<u32>,
    generation: u64,
    pub(super) desired: u32,
    pub(super) phase: Phase,
    pub(super) exporter: Exporter,
    pub(super) upgrade: Upgrade,
    /// The pid file this master wrote (`PIDFILE.2` during an upgrade).
    pub(super) pidfile: Option<Pidfile>,
    /// When the last fold window closed.
    last_fold: Instant,
    /// Workers in a row that died on their own before they booted (or could
    /// not be started).
    fast_crashes: u32,
    /// No worker starts before this (the back-off after fast crashes).
    respawn_at: Option<Instant>,
    /// When the store files were last checked (at most once a [`TICK`]).
    last_store_check: Option<Instant>,
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

    /// Counts a worker that died on its own (`fast`: before it finished
    /// booting, or it could not be started) and sets the back-off of the next
    /// start.
    fn note_start_outcome(&mut self, fast: bool) {
        if !fast {
            self.fast_crashes = 0;
            return;
        }
        self.fast_crashes = self.fast_crashes.saturating_add(1);
        if let Some(wait) = backoff(self.fast_crashes) {
            log_warn!(
                "{} workers in a row died before they booted; next start in {wait:?}",
                self.fast_crashes
            );
            self.respawn_at = Some(self.os.now() + wait);
        }
    }

    /// Checks the store files this master holds mapped: recreates the
    /// directory and the index, master and retired files when they were
    /// deleted (from its own mappings; the workers are then replaced, since
    /// they map the old index), repairs what a foreign write broke in them,
    /// replaces a worker whose file was cut short, deleted or replaced, and
    /// stops the server when a file it needs was cut short or replaced by
    /// another file (its contents are gone).
    fn check_store(&mut self) {
        let now = self.os.now();
        if self
            .last_store_check
            .is_some_and(|t| now.saturating_duration_since(t) < TICK)
        {
            return;
        }
        self.last_store_check = Some(now);
        if let Err(path) = self.recreate_deleted() {
            log_error!(
                "the metric store's {} was cut short or replaced by another program, or cannot be \
                 written again; stopping (a new worker could not open the store)",
                path.display()
            );
            self.fail(MasterError::StoreLost(path));
            return;
        }
        match self.index.repair() {
            Ok(fixed) if !fixed.is_empty() => log_warn!(
                "repaired the metric store's {} (a foreign write): {}",
                self.store.index_path().display(),
                fixed.join(", ")
            ),
            Ok(_) => {}
            Err(e) => log_warn!("cannot check the metric store's index: {e}"),
        }
        let fixed = self.retired.repair();
        if !fixed.is_empty() {
            log_warn!(
                "repaired the metric store's {} (a foreign write): {}",
                self.store.retired_path().display(),
                fixed.join(", ")
            );
        }
        if self.master_file.repair() {
            log_warn!(
                "repaired the metric store's {} (a foreign write): its header",
                self.store.master_path().display()
            );
        }
        let deadline = self.os.now() + self.config.graceful_timeout;
        for p in self.procs.iter_mut().filter(|p| p.serving()) {
            if !p.file.intact() {
                log_warn!(
                    "worker {} (pid {}): its store file was cut short, deleted or replaced; replacing the worker",
                    p.slot,
                    p.pid
                );
                p.retire(&mut self.os, ExitReason::Crash, deadline, Signal::SIGTERM);
                self.vacated.push(p.slot);
            }
        }
    }

    /// Recreates a deleted store directory and the deleted files among the
    /// index, master and retired files. Returns the path that is beyond
    /// repair, if any.
    fn recreate_deleted(&mut self) -> Result<(), std::path::PathBuf> {
        let store = self.store.clone();
        if !store.path().is_dir() {
            std::fs::create_dir(store.path()).map_err(|_| store.path().to_owned())?;
            log_warn!(
                "the metric store directory {} was deleted; recreated it",
                store.path().display()
            );
        }
        let recreate = |path: std::path::PathBuf,
                        intact: bool,
                        f: &mut dyn FnMut() -> std::io::Result<()>|
         -> Result<bool, std::path::PathBuf> {
            if intact {
                return Ok(false);
            }
            if path.symlink_metadata().is_ok() {
                return Err(path);
            }
            match f() {
                Ok(()) => {
                    log_warn!(
                        "the metric store's {} was deleted; wrote it again from this master's copy",
                        path.display()
                    );
                    Ok(true)
                }
                Err(e) => {
                    log_error!("cannot write {} again: {e}", path.display());
                    Err(path)
                }
            }
        };
        let index = &mut self.index;
        let index_intact = index.intact();
        let index_new = recreate(store.index_path(), index_intact, &mut || index.recreate())?;
        let master = &mut self.master_file;
        let master_intact = master.intact(&store);
        recreate(store.master_path(), master_intact, &mut || {
            master.recreate(&store)
        })?;
        let retired_intact = self.retired.intact(&store);
        let retired = &mut self.retired;
        recreate(store.retired_path(), retired_intact, &mut || {
            Rc::get_mut(retired)
                .ok_or_else(|| std::io::Error::other("the retired file is in use"))?
                .recreate(&store)
        })?;
        if index_new {
            log_warn!("replacing every worker: they map the index that was deleted");
            self.retire_serving(ExitReason::Reload);
        }
        Ok(())
    }

    /// Notes booted workers and enforces the heartbeat timeout.
    fn check_workers(&mut self) {
        let now_mono = self.os.mono_ns();
        let now = self.os.now();
        for p in &mut self.procs {
            if !p.booted && p.file.booted() {
                p.booted = true;
                self.fast_crashes = 0;
                if let Phase::Running { boot_failures, .. } = &mut self.phase {
                    *boot_failures = 0;
                }
            }
            let Some(timeout) = self.config.timeout else {
                continue;
            };
            let stale = now_mono.saturating_sub(p.file.heartbeat_ns()) > timeout.as_nanos() as u64;
            if p.serving() && stale {
                p.time_out(&mut self.os, timeout.as_secs(), now + QUICK_STOP);
                self.vacated.push(p.slot);
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

    fn publish(&self) {
        self.master_file
            .publish_workers(self.serving() as u32, self.desired);
    }

    /// Sends READY=1 once every desired worker of the current generation booted.
    fn notify_ready(&mut self) {
        let booted = self
            .procs
            .iter()
            .filter(|p| p.serving() && p.booted)
            .count();
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

#[cfg(test)]
#[test]
fn only_the_masters_signals_are_commands() {
    assert_eq!(master_signal(Signal::SIGCHLD), Some(MasterSignal::Chld));
    assert_eq!(master_signal(Signal::SIGPIPE), None);
}
