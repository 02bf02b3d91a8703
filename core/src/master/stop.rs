//! Stopping: the whole server (TERM gracefully, INT/QUIT quickly, a halt
//! after repeated boot errors) or only its workers (WINCH), and the deadlines
//! after which SIGKILL follows.

use nix::sys::signal::Signal;

use super::arbiter::{Arbiter, Exporter, Phase, QUICK_STOP};
use super::os::{Notice, Os};
use super::MasterError;
use crate::log_info;
use crate::store::ExitReason;

impl<O: Os> Arbiter<O> {
    /// Running → Stopping (graceful: TERM and `graceful_timeout`; quick: QUIT
    /// and a second). A quick stop overtakes a graceful one, never the reverse.
    pub(super) fn stop(&mut self, graceful: bool) {
        if let Phase::Stopping { graceful: was, .. } = self.phase {
            if !was || graceful {
                return;
            }
        }
        let (timeout, sig) = if graceful {
            (self.config.graceful_timeout, Signal::SIGTERM)
        } else {
            (QUICK_STOP, Signal::SIGQUIT)
        };
        let deadline = self.os.now() + timeout;
        log_info!(
            "{} stop: {} workers",
            if graceful { "Graceful" } else { "Quick" },
            self.procs.len()
        );
        let failure = match &mut self.phase {
            Phase::Stopping { failure, .. } => failure.take(),
            Phase::Running { .. } => None,
        };
        let exporter_stopped = match &self.phase {
            Phase::Stopping {
                exporter_stopped, ..
            } => *exporter_stopped,
            Phase::Running { .. } => false,
        };
        self.phase = Phase::Stopping {
            deadline,
            graceful,
            exporter_stopped,
            exporter_killed: false,
            failure,
        };
        // `/readyz` turns 503 before anything closes, so that load balancers
        // stop sending while the workers drain; the exporter keeps answering
        // until the last worker is gone.
        self.publish();
        self.os.notify(Notice::Stopping);
        // Listeners close first (the workers close theirs on the signal), so
        // new clients are refused at once rather than accepted and dropped.
        self.os.close_listeners();
        for p in &mut self.procs {
            p.retire(&mut self.os, ExitReason::Shutdown, deadline, sig);
        }
    }

    /// Running → Stopping (quick), to return `failure` once stopped.
    pub(super) fn fail(&mut self, failure: MasterError) {
        self.stop(false);
        if let Phase::Stopping { failure: f, .. } = &mut self.phase {
            *f = Some(failure);
        }
    }

    /// Kills what outlived its deadline; while stopping, stops the exporter
    /// once no worker is left.
    pub(super) fn enforce_deadlines(&mut self) {
        let now = self.os.now();
        for p in &mut self.procs {
            p.kill_if_due(&mut self.os, now);
        }
        if let (
            Phase::Stopping {
                deadline,
                exporter_stopped,
                exporter_killed,
                ..
            },
            Exporter::Up { pid, .. },
        ) = (&mut self.phase, self.exporter)
        {
            if self.procs.is_empty() && !*exporter_stopped {
                self.os.signal(pid, Signal::SIGTERM);
                *exporter_stopped = true;
            }
            if now >= *deadline && !*exporter_killed {
                self.os.signal(pid, Signal::SIGKILL);
                *exporter_killed = true;
            }
        }
    }

    /// WINCH: stop every worker gracefully and keep the master (used with USR2:
    /// the old generation stops serving while the new one takes over).
    pub(super) fn stop_workers(&mut self) {
        if !self.running() {
            return;
        }
        log_info!("WINCH: stopping all workers, keeping the master");
        self.desired = 0;
        self.retire_serving(ExitReason::Shutdown);
    }
}
