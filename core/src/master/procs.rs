//! The master's view of its worker processes: each [`Proc`] is in one
//! [`Life`] and moves on only through the named transitions below, which log
//! and send the signal that goes with them.

use std::time::Instant;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::os::Os;
use crate::store::{ExitReason, WorkerFile};
use crate::sys::Ended;
use crate::worker::{EXIT_BOOT_ERROR, EXIT_MAX_REQUESTS};
use crate::{log_error, log_warn};

/// Where a worker process is in its life, as the master sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Life {
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

/// One worker process.
#[derive(Debug)]
pub(super) struct Proc {
    pub pid: Pid,
    pub slot: u32,
    pub generation: u64,
    pub file: WorkerFile,
    pub life: Life,
    pub booted: bool,
}

impl Proc {
    /// A freshly forked worker.
    pub fn new(pid: Pid, slot: u32, generation: u64, file: WorkerFile) -> Proc {
        Proc {
            pid,
            slot,
            generation,
            file,
            life: Life::Serving,
            booted: false,
        }
    }

    /// Whether it serves in its slot.
    pub fn serving(&self) -> bool {
        self.life == Life::Serving
    }

    /// Serving → Retiring: sends `sig` (TERM or QUIT); SIGKILL follows at
    /// `deadline`. A worker already retiring keeps its reason and gets the
    /// new deadline and signal (a quick stop overtaking a graceful one).
    pub fn retire(&mut self, os: &mut impl Os, reason: ExitReason, deadline: Instant, sig: Signal) {
        self.mark_retiring(reason, deadline);
        os.signal(self.pid, sig);
    }

    /// As [`Proc::retire`], with the signal left to the caller (HUP sends it
    /// once the replacement is forked).
    pub fn mark_retiring(&mut self, reason: ExitReason, deadline: Instant) {
        let reason = match self.life {
            Life::Retiring { reason, .. } => reason,
            _ => reason,
        };
        self.life = Life::Retiring {
            reason,
            deadline,
            killed: false,
        };
    }

    /// Serving → TimedOut: the heartbeat is stale; sends SIGABRT, SIGKILL
    /// follows at `deadline`.
    pub fn time_out(&mut self, os: &mut impl Os, timeout_secs: u64, deadline: Instant) {
        debug_assert!(self.serving());
        log_error!(
            "worker {} (pid {}) timed out after {timeout_secs}s without a heartbeat",
            self.slot,
            self.pid
        );
        self.life = Life::TimedOut {
            deadline,
            killed: false,
        };
        os.signal(self.pid, Signal::SIGABRT);
    }

    /// The deadline of a retiring or timed-out worker not yet killed.
    pub fn deadline(&self) -> Option<Instant> {
        match self.life {
            Life::Retiring {
                deadline,
                killed: false,
                ..
            }
            | Life::TimedOut {
                deadline,
                killed: false,
            } => Some(deadline),
            _ => None,
        }
    }

    /// Sends SIGKILL once the deadline of a retiring or timed-out worker has
    /// passed (once).
    pub fn kill_if_due(&mut self, os: &mut impl Os, now: Instant) {
        if self.deadline().is_none_or(|d| now < d) {
            return;
        }
        log_warn!(
            "worker {} (pid {}) did not stop in time; killing",
            self.slot,
            self.pid
        );
        os.signal(self.pid, Signal::SIGKILL);
        if let Life::Retiring { killed, .. } | Life::TimedOut { killed, .. } = &mut self.life {
            *killed = true;
        }
    }

    /// Why it exited, given how it ended.
    pub fn exit_reason(&self, ended: Ended) -> ExitReason {
        exit_reason(self.life, ended)
    }
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
        let cases = [
            (Life::Serving, Ended::Signaled(9), ExitReason::Crash),
            (
                Life::Serving,
                Ended::Exited(EXIT_BOOT_ERROR),
                ExitReason::BootError,
            ),
            (
                Life::Serving,
                Ended::Exited(EXIT_MAX_REQUESTS),
                ExitReason::MaxRequests,
            ),
            (
                Life::Retiring {
                    reason: ExitReason::Reload,
                    deadline: later,
                    killed: true,
                },
                Ended::Signaled(9),
                ExitReason::Reload,
            ),
            (
                Life::TimedOut {
                    deadline: later,
                    killed: false,
                },
                Ended::Signaled(6),
                ExitReason::Timeout,
            ),
        ];
        for (life, ended, want) in cases {
            assert_eq!(exit_reason(life, ended), want, "{life:?} {ended:?}");
        }
    }
}
