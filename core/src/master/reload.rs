//! HUP: reload the settings, start a new generation in every slot, retire the
//! old one gracefully. Settings that need a restart keep their running values.

use std::sync::Arc;

use super::arbiter::{Arbiter, Phase};
use super::os::{Notice, Os};
use crate::config::Config;
use crate::store::ExitReason;
use crate::{log_error, log_info, log_warn};

impl<O: Os> Arbiter<O> {
    /// HUP, only while running: new settings (or the old ones, if they fail to
    /// load), a new worker forked for every slot, then SIGTERM to every old one.
    /// When the TLS files do not load, nothing changes and the old workers
    /// serve on.
    pub(super) fn reload(&mut self) {
        if !matches!(self.phase, Phase::Running { .. }) {
            return;
        }
        log_info!("HUP: reloading");
        let new = match self.os.reload() {
            None => None,
            Some(Ok(new)) => Some(keep_restart_only(&self.config, new)),
            Some(Err(e)) => {
                log_error!("HUP: {e}; keeping the old settings");
                None
            }
        };
        // The new workers load the TLS files after fork: if they cannot, the
        // old workers go on serving with what they loaded.
        if let Err(e) = self.os.check_tls(new.as_ref().unwrap_or(&self.config)) {
            log_error!("HUP: {e}; the running workers keep serving");
            return;
        }
        if let Phase::Running { ready, .. } = &mut self.phase {
            *ready = false;
        }
        self.os.notify(Notice::Reloading);
        if let Some(new) = new {
            match self.os.choose_worker(&new.worker) {
                Ok(()) => {
                    self.desired = new.workers;
                    self.config = Arc::new(new);
                    self.os.reopen_errorlog(&self.config);
                }
                Err(e) => log_error!("HUP: setting `worker`: {e}; keeping the old settings"),
            }
        }
        let old: Vec<usize> = (0..self.procs.len())
            .filter(|&i| self.procs[i].serving())
            .collect();
        // Mark the old generation first, so that `manage` forks a new worker
        // for every slot; signal it only once the new one is forked.
        let deadline = self.os.now() + self.config.graceful_timeout;
        for &i in &old {
            self.procs[i].mark_retiring(ExitReason::Reload, deadline);
        }
        let pids: Vec<_> = old.iter().map(|&i| self.procs[i].pid).collect();
        self.manage();
        for pid in pids {
            self.os.signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
        self.master_file.count_reload();
    }
}

/// Settings a reload cannot change (sockets, the store, the exporter): keeps
/// the running values and warns about each one that changed.
pub(super) fn keep_restart_only(old: &Config, new: Config) -> Config {
    let (new, kept) = old.keep_restart_only(new);
    for name in kept {
        log_warn!("HUP: changed `{}` takes effect only after a restart", name);
    }
    new
}
