//! Binary upgrade (USR2), both halves. The old master starts the new binary
//! with its listening sockets and keeps serving until told to stop; the new
//! master adopts the sockets (or systemd's), serves beside the old one, and
//! takes over the pid file and the exporter once the old master is gone.

use std::net::TcpListener;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::unistd::Pid;

use super::arbiter::{Arbiter, Upgrade};
use super::os::Os;
use super::MasterError;
use crate::listener::Listener;
use crate::{log_error, log_info, log_warn};

/// Environment variable naming the listening fds a binary upgrade hands over.
pub const ENV_LISTEN_FDS: &str = "GPE_LISTEN_FDS";
/// Environment variable naming the metrics listener fd a binary upgrade hands over.
pub const ENV_METRICS_FD: &str = "GPE_METRICS_FD";
/// Environment variable naming the old master's pid during a binary upgrade.
pub const ENV_UPGRADE_FROM: &str = "GPE_UPGRADE_FROM";

impl<O: Os> Arbiter<O> {
    /// USR2, the old half: start a new master from the current binary, handing
    /// it the listening sockets; this master keeps serving until told to stop.
    pub(super) fn upgrade(&mut self) {
        if !self.running() {
            return;
        }
        match self.upgrade {
            Upgrade::Spawned { child } => {
                log_warn!("USR2: an upgrade (pid {child}) is already running; ignored");
            }
            Upgrade::TakingOver { .. } => {
                log_warn!("USR2: this master is itself being upgraded into; ignored");
            }
            Upgrade::Idle => match self.os.spawn_master() {
                Ok(child) => {
                    log_info!("USR2: started new master {child}");
                    self.upgrade = Upgrade::Spawned { child };
                }
                Err(e) => log_error!("USR2: {e}"),
            },
        }
    }

    /// The new half: once the old master is gone (we are re-parented), take
    /// over the pid file; the exporter starts on the inherited metrics socket.
    pub(super) fn check_old_master(&mut self) {
        let Upgrade::TakingOver { old } = self.upgrade else {
            return;
        };
        if self.os.parent() == old {
            return;
        }
        self.upgrade = Upgrade::Idle;
        log_info!("old master {old} is gone; taking over");
        if let (Some(pf), Some(final_path)) = (&mut self.pidfile, &self.config.pidfile) {
            if let Err(e) = pf.promote(final_path) {
                log_error!("cannot move the pid file to {}: {e}", final_path.display());
            }
        }
    }
}

/// Starts the current binary as the new master, with `listeners` and
/// `metrics` inherited and named in its environment.
///
/// # Errors
/// The binary is unknown or cannot be started.
pub(super) fn spawn_new_master(
    listeners: &[Listener],
    metrics: Option<&TcpListener>,
) -> std::io::Result<Pid> {
    let mut args = std::env::args_os();
    let program = args
        .next()
        .ok_or_else(|| std::io::Error::other("cannot tell which binary to run"))?;
    let fds: Vec<BorrowedFd<'_>> = listeners.iter().map(AsFd::as_fd).collect();
    let metrics_fd = metrics.map(AsFd::as_fd);
    let all: Vec<_> = fds.iter().copied().chain(metrics_fd).collect();
    set_inheritable(&all, true);
    let list: Vec<String> = fds.iter().map(|fd| fd.as_raw_fd().to_string()).collect();
    let mut cmd = std::process::Command::new(&program);
    cmd.args(args)
        .env(ENV_LISTEN_FDS, list.join(","))
        .env(ENV_UPGRADE_FROM, std::process::id().to_string());
    if let Some(fd) = metrics_fd {
        cmd.env(ENV_METRICS_FD, fd.as_raw_fd().to_string());
    }
    let spawned = cmd.spawn();
    set_inheritable(&all, false);
    match spawned {
        Ok(child) => Ok(Pid::from_raw(child.id() as i32)),
        Err(e) => Err(std::io::Error::new(
            e.kind(),
            format!("cannot start {}: {e}", program.to_string_lossy()),
        )),
    }
}

/// Clears (or sets back) close-on-exec on `fds` around spawning the new master.
fn set_inheritable(fds: &[BorrowedFd<'_>], inherit: bool) {
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

/// Sockets and identity inherited from systemd or from an upgrading master.
#[derive(Debug, Default)]
pub(super) struct Inherited {
    pub listeners: Option<Vec<Listener>>,
    pub metrics: Option<TcpListener>,
    pub upgrade_from: Option<Pid>,
}

fn parse_fds(var: &str, value: &str) -> Result<Vec<RawFd>, MasterError> {
    value
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<RawFd>()
                .ok()
                .filter(|fd| *fd > 2)
                .ok_or_else(|| {
                    MasterError::Io(std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{var}: {value:?} is not a list of file descriptors"),
                    ))
                })
        })
        .collect()
}

/// Adopts listening sockets passed by an upgrading master (`GPE_LISTEN_FDS`)
/// or by systemd (`LISTEN_FDS`/`LISTEN_PID`), and clears those variables so
/// that workers do not see them.
pub(super) fn inherited() -> Result<Inherited, MasterError> {
    let mut out = Inherited::default();
    let adopt = |fds: Vec<RawFd>| -> Result<Vec<Listener>, MasterError> {
        fds.into_iter()
            .map(|fd| {
                // SAFETY: the fd was passed to this process for exactly this purpose
                // (by the upgrading master or by systemd) and nothing else owns it.
                unsafe { Listener::from_raw_fd(fd) }.map_err(MasterError::Io)
            })
            .collect()
    };
    if let Ok(v) = std::env::var(ENV_LISTEN_FDS) {
        out.listeners = Some(adopt(parse_fds(ENV_LISTEN_FDS, &v)?)?);
        if let Ok(m) = std::env::var(ENV_METRICS_FD) {
            if let Some(fd) = parse_fds(ENV_METRICS_FD, &m)?.first() {
                // SAFETY: as above: handed over by the old master for this use only.
                let owned = unsafe { OwnedFd::from_raw_fd(*fd) };
                out.metrics = Some(TcpListener::from(owned));
            }
        }
        out.upgrade_from = std::env::var(ENV_UPGRADE_FROM)
            .ok()
            .and_then(|p| p.parse().ok())
            .map(Pid::from_raw);
    } else {
        let fds: Vec<RawFd> = sd_notify::listen_fds().map_err(MasterError::Io)?.collect();
        if !fds.is_empty() {
            out.listeners = Some(adopt(fds)?);
        }
    }
    for var in [
        ENV_LISTEN_FDS,
        ENV_METRICS_FD,
        ENV_UPGRADE_FROM,
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
    ] {
        std::env::remove_var(var);
    }
    Ok(out)
}
