//! The master (Gunicorn's arbiter): binds the sockets, creates the metric
//! store, forks the exporter and the workers, and supervises them from one
//! single-threaded loop (`arbiter`). This module owns start-up and clean-up;
//! the loop's decisions live in `arbiter`.

mod arbiter;
mod pidfile;

use std::net::TcpListener;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use crate::app::AppFactory;
use crate::config::{BindAddr, Config, ConfigError};
use crate::listener::Listener;
use crate::store::StoreDir;
use crate::worker::Worker;

pub use pidfile::Pidfile;

/// What the exporter process receives after fork.
#[derive(Debug)]
pub struct ExporterContext {
    /// The metrics listener, bound by the master (blocking mode).
    pub listener: TcpListener,
    /// The store to read.
    pub store: StoreDir,
    /// The metrics path (for example `/metrics`).
    pub path: String,
    /// The error log, reopened on USR1.
    pub errorlog: crate::config::LogTarget,
}

/// Runs the exporter in its own process; returns its exit code.
pub type ExporterMain = Arc<dyn Fn(ExporterContext) -> i32 + Send + Sync>;
/// Picks the worker implementation for a worker type name, or explains why
/// none is available (for example, a cargo feature that is off).
pub type WorkerSelector = Arc<dyn Fn(&str) -> Result<Arc<dyn Worker>, String> + Send + Sync>;
/// Rebuilds the settings from their sources, for HUP.
pub type Reloader = Arc<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Everything the master needs to run a server.
pub struct ServerSpec {
    /// The settings.
    pub config: Config,
    /// Builds the app in each worker.
    pub app: AppFactory,
    /// Worker implementations available in this binary.
    pub workers: WorkerSelector,
    /// The exporter, when metrics are on.
    pub exporter: Option<ExporterMain>,
    /// Reloads the settings on HUP; `None` keeps them.
    pub reload: Option<Reloader>,
}

impl std::fmt::Debug for ServerSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSpec")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum MasterError {
    /// A setting was refused at start-up.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The worker type is not available.
    #[error("setting `worker`: {0}")]
    Worker(String),
    /// A listener could not be bound.
    #[error("setting `{setting}`: cannot listen on {addr}: {source}")]
    Bind {
        /// `bind` or `metrics_bind`.
        setting: &'static str,
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The metric store could not be created.
    #[error("setting `metrics_dir`: cannot prepare {path}: {source}")]
    Store {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The pid file is in use or cannot be written.
    #[error("setting `pidfile`: {0}")]
    Pidfile(std::io::Error),
    /// Workers kept failing to boot.
    #[error("workers failed to boot {0} times in a row (see the errors above); stopping")]
    BootFailed(u32),
    /// Any other OS error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl MasterError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            MasterError::BootFailed(_) => crate::worker::EXIT_BOOT_ERROR,
            MasterError::Config(_) | MasterError::Worker(_) => 2,
            _ => 1,
        }
    }
}

/// Binds every configured listener.
///
/// # Errors
/// The first address that cannot be bound, naming the `bind` setting.
pub fn bind_all(config: &Config) -> Result<Vec<Listener>, MasterError> {
    config
        .binds
        .iter()
        .map(|addr| {
            Listener::bind(addr, config.backlog, config.reuse_port).map_err(|source| {
                MasterError::Bind {
                    setting: "bind",
                    addr: addr.to_string(),
                    source,
                }
            })
        })
        .collect()
}

fn private_store_dir() -> PathBuf {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    base.join(format!("gpe-{}", std::process::id()))
}

/// Environment variable naming the listening fds a binary upgrade hands over.
pub const ENV_LISTEN_FDS: &str = "GPE_LISTEN_FDS";
/// Environment variable naming the metrics listener fd a binary upgrade hands over.
pub const ENV_METRICS_FD: &str = "GPE_METRICS_FD";
/// Environment variable naming the old master's pid during a binary upgrade.
pub const ENV_UPGRADE_FROM: &str = "GPE_UPGRADE_FROM";

/// Sockets and identity inherited from systemd or from an upgrading master.
#[derive(Debug, Default)]
struct Inherited {
    listeners: Option<Vec<Listener>>,
    metrics: Option<TcpListener>,
    upgrade_from: Option<nix::unistd::Pid>,
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
fn inherited() -> Result<Inherited, MasterError> {
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
                let owned =
                    unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(*fd) };
                out.metrics = Some(TcpListener::from(owned));
            }
        }
        out.upgrade_from = std::env::var(ENV_UPGRADE_FROM)
            .ok()
            .and_then(|p| p.parse().ok())
            .map(nix::unistd::Pid::from_raw);
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

/// Runs a server until it is stopped. Returns once every child has exited and
/// the pid file, store and unix sockets are cleaned up.
///
/// # Errors
/// Start-up failures (bad worker type, bind, store, pid file) or repeated
/// worker boot failures.
pub fn run(spec: ServerSpec) -> Result<(), MasterError> {
    let config = &spec.config;
    let worker = (spec.workers)(&config.worker).map_err(MasterError::Worker)?;
    crate::log::open_errorlog(&config.errorlog).map_err(|e| {
        MasterError::Config(ConfigError::Invalid {
            setting: "errorlog",
            value: format!("{:?}", config.errorlog),
            expected: format!("a writable file ({e})"),
        })
    })?;
    let inherited = inherited()?;
    let upgrading = inherited.upgrade_from.is_some();
    // During an upgrade the new master writes PIDFILE.2 until the old one exits.
    let pid_path = config.pidfile.as_ref().map(|p| {
        if upgrading {
            let mut s = p.clone().into_os_string();
            s.push(".2");
            PathBuf::from(s)
        } else {
            p.clone()
        }
    });
    // Refuse a live pid file before binding anything.
    if let Some(p) = &pid_path {
        Pidfile::create(p).map_err(MasterError::Pidfile)?.remove();
    }
    let bound_here = inherited.listeners.is_none();
    let listeners = match inherited.listeners {
        Some(l) => {
            crate::log_info!("Using {} inherited socket(s); `bind` is ignored", l.len());
            l
        }
        None => bind_all(config)?,
    };
    let metrics_listener = if config.metrics && spec.exporter.is_some() {
        match inherited.metrics {
            Some(l) => Some(l),
            None => Some(TcpListener::bind(&config.metrics_bind).map_err(|source| {
                MasterError::Bind {
                    setting: "metrics_bind",
                    addr: config.metrics_bind.to_string(),
                    source,
                }
            })?),
        }
    } else {
        None
    };
    let (store, own_dir) = match &config.metrics_dir {
        // A new generation never shares the old one's store.
        Some(p) if upgrading => {
            let mut s = p.clone().into_os_string();
            s.push(format!(".{}", std::process::id()));
            (StoreDir::new(PathBuf::from(s)), true)
        }
        Some(p) => (StoreDir::new(p), false),
        None => (StoreDir::new(private_store_dir()), true),
    };
    // Never wipe the store of another live server sharing the directory.
    // SAFETY: a file named `master` in a gpe store directory is a gpe data file;
    // a foreign file fails the size or magic check.
    if let Ok(other) = unsafe { crate::store::DataFile::open(&store.master_path()) } {
        let pid = other
            .header()
            .pid
            .load(std::sync::atomic::Ordering::Relaxed);
        let alive = pid != 0
            && pid != std::process::id()
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
        if alive {
            return Err(MasterError::Store {
                path: store.path().to_owned(),
                source: std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("the directory is in use by the gpe master with pid {pid}"),
                ),
            });
        }
    }
    let created = store.prepare().map_err(|source| MasterError::Store {
        path: store.path().to_owned(),
        source,
    })?;
    let pidfile = match &pid_path {
        Some(p) => Some(Pidfile::create(p).map_err(MasterError::Pidfile)?),
        None => None,
    };
    let mut outcome = arbiter::Outcome {
        pidfile,
        upgrade_child_alive: false,
    };
    let result = arbiter::Arbiter::start(
        &spec,
        worker,
        listeners,
        metrics_listener,
        store.clone(),
        inherited.upgrade_from,
    )
    .and_then(|mut a| {
        a.pidfile = outcome.pidfile.take();
        let r = a.run();
        outcome = a.outcome();
        r
    });
    store.cleanup(own_dir || created);
    if let Some(p) = &outcome.pidfile {
        p.remove();
    }
    // The new master of an upgrade keeps serving on the same unix sockets.
    if bound_here && !outcome.upgrade_child_alive {
        for b in &spec.config.binds {
            if let BindAddr::Unix(path) = b {
                let _ = std::fs::remove_file(path);
            }
        }
    }
    result
}
