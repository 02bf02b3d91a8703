//! The seam between the arbiter's decisions and the outside world: processes,
//! signals, clocks, systemd and the settings sources. [`SystemOs`] (in
//! `spawn`) is the real one; the unit tests drive the arbiter with a fake.

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::config::{Config, ConfigError};
use crate::store::{MasterSignal, WorkerKind};
use crate::sys::Reaped;

/// A state change systemd is told about (when `NOTIFY_SOCKET` is set).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Notice {
    /// `READY=1`: every desired worker has booted.
    Ready,
    /// `MAINPID=` this process and `READY=1`: the new half of an upgrade took over.
    ReadyAsMain,
    /// `RELOADING=1` with `MONOTONIC_USEC`.
    Reloading,
    /// `STOPPING=1`.
    Stopping,
}

/// Everything the arbiter does to or learns from the world.
pub(super) trait Os {
    /// Now, on the clock of deadlines.
    fn now(&self) -> Instant;
    /// Now in monotonic nanoseconds, the clock of the workers' heartbeats.
    fn mono_ns(&self) -> u64;
    /// Waits at most `timeout` for signals and returns those that arrived.
    fn wait(&mut self, timeout: Duration) -> Vec<Signal>;
    /// Sends `sig` to `pid` (a process that is gone is ignored).
    fn signal(&mut self, pid: Pid, sig: Signal);
    /// Whether a child waits to be reaped.
    fn child_exited(&mut self) -> bool;
    /// Reaps one exited child, if any.
    fn reap(&mut self) -> io::Result<Option<Reaped>>;
    /// Starts a worker for `slot`/`generation`, whose store file exists.
    fn spawn_worker(&mut self, config: &Arc<Config>, slot: u32, generation: u64)
        -> io::Result<Pid>;
    /// Starts the exporter.
    fn spawn_exporter(&mut self, config: &Config) -> io::Result<Pid>;
    /// Starts a new master from the current binary, handing it the sockets (USR2).
    fn spawn_master(&mut self) -> io::Result<Pid>;
    /// This process's parent (the old master, while this is the new half of an
    /// upgrade).
    fn parent(&self) -> Pid;
    /// Tells systemd about a state change.
    fn notify(&mut self, notice: Notice);
    /// Rebuilds the settings from their sources (HUP); `None` keeps them.
    fn reload(&mut self) -> Option<Result<Config, ConfigError>>;
    /// Loads the TLS files `config` names, as the workers about to be forked
    /// with it will (HUP).
    fn check_tls(&self, config: &Config) -> Result<(), ConfigError>;
    /// Switches to the worker type `name`, for the workers spawned from now on.
    fn choose_worker(&mut self, name: &str) -> Result<(), String>;
    /// The type of the workers spawned now.
    fn worker_kind(&self) -> WorkerKind;
    /// Closes this process's copies of the listening sockets (a stop: new
    /// clients are refused once the workers have closed theirs too).
    fn close_listeners(&mut self);
    /// Reopens the error log (USR1, HUP).
    fn reopen_errorlog(&mut self, config: &Config);
    /// The resident set of `pid` in bytes, if it can be read.
    fn rss_bytes(&self, pid: Pid) -> Option<u64>;
}

/// The master's command (and metric label) for a signal it handles; `None`
/// for the others.
pub(super) fn master_signal(sig: Signal) -> Option<MasterSignal> {
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
