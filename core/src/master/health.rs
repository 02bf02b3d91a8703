//! The health of what the master supervises beyond single signals: the
//! store files it holds mapped (recreated when deleted, repaired after a
//! foreign write, the server stopped when one is gone for good), stale
//! heartbeats, and the back-off of respawns after workers that die before
//! they boot.

use std::rc::Rc;
use std::time::Duration;

use nix::sys::signal::Signal;

use super::arbiter::{Arbiter, Phase, QUICK_STOP, TICK};
use super::os::Os;
use super::MasterError;
use crate::store::ExitReason;
use crate::{log_error, log_warn};

/// Workers in a row that die on their own before they finish booting (or
/// cannot be started) after which respawns back off.
pub(super) const BACKOFF_AFTER: u32 = 3;
/// The first back-off; each further fast crash doubles it.
pub(super) const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// The longest back-off.
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How often a worker's resident set is read for `max_worker_memory`: the
/// workers' heartbeat tick.
pub(super) const MEMORY_TICK: Duration = crate::async_worker::TICK;

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

impl<O: Os> Arbiter<O> {
    /// Counts a worker that died on its own (`fast`: before it finished
    /// booting, or it could not be started) and sets the back-off of the next
    /// start.
    pub(super) fn note_start_outcome(&mut self, fast: bool) {
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
    pub(super) fn check_store(&mut self) {
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
    pub(super) fn recreate_deleted(&mut self) -> Result<(), std::path::PathBuf> {
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
    /// Notes booted workers, enforces the heartbeat timeout and the memory
    /// limit.
    pub(super) fn check_workers(&mut self) {
        self.check_memory();
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

    /// `max_worker_memory`: reads each serving worker's resident set once a
    /// worker heartbeat tick; a worker found above the limit on two reads in
    /// a row is retired gracefully (counted as `memory`) and its slot is
    /// filled again at once.
    fn check_memory(&mut self) {
        let limit = self.config.max_worker_memory;
        if limit == 0 {
            return;
        }
        let now = self.os.now();
        let deadline = now + self.config.graceful_timeout;
        for p in self.procs.iter_mut().filter(|p| p.serving() && p.booted) {
            let (last, over) = p.memory;
            if last.is_some_and(|t| now.saturating_duration_since(t) < MEMORY_TICK) {
                continue;
            }
            let rss = self.os.rss_bytes(p.pid);
            let above = rss.is_some_and(|r| r > limit);
            p.memory = (Some(now), if above { over + 1 } else { 0 });
            if p.memory.1 >= 2 {
                log_warn!(
                    "worker {} (pid {}): resident set {} bytes is above max_worker_memory ({limit}); retiring it",
                    p.slot,
                    p.pid,
                    rss.unwrap_or(0)
                );
                p.retire(&mut self.os, ExitReason::Memory, deadline, Signal::SIGTERM);
                self.vacated.push(p.slot);
            }
        }
    }
}
