//! The master's view of its worker processes: each [`Proc`] is in one
//! [`Life`] and moves on only through the named transitions below, which log
//! and send the signal that goes with them.

use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::os::Os;
use crate::store::{ExitReason, InFlightRequest, WorkerFile};
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
    /// The memory watch: when its resident set was last read, and how many
    /// reads in a row found it above `max_worker_memory`.
    pub memory: (Option<Instant>, u32),
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
            memory: (None, 0),
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
    /// follows at `deadline`. The log names the requests the worker had in
    /// flight (method, path, age), read from its store file.
    pub fn time_out(&mut self, os: &mut impl Os, timeout_secs: u64, deadline: Instant) {
        debug_assert!(self.serving());
        let (named, all) = self.file.in_flight();
        log_error!(
            "worker {} (pid {}) timed out after {timeout_secs}s without a heartbeat; {}",
            self.slot,
            self.pid,
            describe_in_flight(&named, all, os.mono_ns())
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

/// "in flight: GET /a for 2.1s, POST /b for 0.3s and 3 more", or "no request
/// in flight".
fn describe_in_flight(named: &[InFlightRequest], all: u64, now_ns: u64) -> String {
    if named.is_empty() && all == 0 {
        return "no request in flight".to_owned();
    }
    let mut s = String::from("in flight: ");
    for (i, r) in named.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        let age = Duration::from_nanos(now_ns.saturating_sub(r.start_ns));
        let path: String = r
            .path
            .chars()
            .map(|c| if c.is_control() { '?' } else { c })
            .collect();
        s.push_str(&format!(
            "{} {path} for {:.1}s",
            r.method,
            age.as_secs_f64()
        ));
    }
    let more = all.saturating_sub(named.len() as u64);
    if more > 0 {
        if named.is_empty() {
            s.push_str(&format!("{more} unnamed requests"));
        } else {
            s.push_str(&format!(" and {more} more"));
        }
    }
    s
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
    fn in_flight_requests_are_described_with_their_age() {
        let r = |method: &str, path: &str, start_ns| InFlightRequest {
            method: method.to_owned(),
            path: path.to_owned(),
            start_ns,
        };
        let s = 1_000_000_000;
        assert_eq!(describe_in_flight(&[], 0, s), "no request in flight");
        assert_eq!(
            describe_in_flight(
                &[r("GET", "/sleep/60000", s / 2), r("POST", "/a\nb", s)],
                4,
                s * 3
            ),
            "in flight: GET /sleep/60000 for 2.5s, POST /a?b for 2.0s and 2 more"
        );
        assert_eq!(
            describe_in_flight(&[], 2, s),
            "in flight: 2 unnamed requests"
        );
    }

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
