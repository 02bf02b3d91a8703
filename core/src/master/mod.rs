//! The master (Gunicorn's arbiter): binds the sockets, creates the metric
//! store, forks the exporter and the workers, and supervises them from one
//! single-threaded loop (`arbiter`). This module owns start-up ([`run`]:
//! settings → [`Bound`] → arbiter) and clean-up (by drop); the loop's
//! decisions live in `arbiter`, `procs`, `reload` and `upgrade`, its effects
//! in `spawn` behind the `os` seam.

mod arbiter;
mod os;
mod pidfile;
mod procs;
mod reload;
mod spawn;
mod stop;
mod upgrade;

#[cfg(test)]
mod tests;

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use crate::config::{BindAddr, Config, ConfigError};
use crate::http::app::AppFactory;
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
    /// Time a connection has for a complete request head (`header_timeout`).
    pub header_timeout: std::time::Duration,
    /// Connections served at once (`metrics_max_connections`).
    pub max_connections: usize,
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

/// The store directory while this master owns it: emptied on drop (and
/// removed when this master made it), in the process that prepared it only.
struct OwnedStore {
    store: StoreDir,
    remove_dir: bool,
    owner: u32,
}

impl Drop for OwnedStore {
    fn drop(&mut self) {
        if self.owner == std::process::id() {
            self.store.cleanup(self.remove_dir);
        }
    }
}

/// Unix sockets this master bound: removed on drop unless `keep` (the new
/// master of an upgrade serves on them).
struct UnixSockets {
    paths: Vec<PathBuf>,
    keep: bool,
    owner: u32,
}

impl Drop for UnixSockets {
    fn drop(&mut self) {
        if !self.keep && self.owner == std::process::id() {
            for path in &self.paths {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

/// What start-up acquired before the loop runs: sockets, the prepared store
/// and the pid file, each given back when dropped.
struct Bound {
    listeners: Vec<Listener>,
    metrics: Option<TcpListener>,
    upgrade_from: Option<nix::unistd::Pid>,
    pidfile: Option<Pidfile>,
    sockets: UnixSockets,
    store: OwnedStore,
}

impl Bound {
    /// Adopts or binds the sockets, prepares the store and writes the pid file.
    fn acquire(config: &Config, metrics: bool) -> Result<Bound, MasterError> {
        let inherited = upgrade::inherited()?;
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
            drop(Pidfile::create(p).map_err(MasterError::Pidfile)?);
        }
        let owner = std::process::id();
        // Only sockets bound here are removed at the end (not inherited ones,
        // and not those of a server that made the bind fail).
        let bound_here = inherited.listeners.is_none();
        let listeners = match inherited.listeners {
            Some(l) => {
                crate::log_info!("Using {} inherited socket(s); `bind` is ignored", l.len());
                l
            }
            None => bind_all(config)?,
        };
        let sockets = UnixSockets {
            paths: config
                .binds
                .iter()
                .filter(|_| bound_here)
                .filter_map(|b| match b {
                    BindAddr::Unix(path) => Some(path.clone()),
                    _ => None,
                })
                .collect(),
            keep: false,
            owner,
        };
        let metrics = match (metrics, inherited.metrics) {
            (false, _) => None,
            (true, Some(l)) => Some(l),
            (true, None) => Some(TcpListener::bind(&config.metrics_bind).map_err(|source| {
                MasterError::Bind {
                    setting: "metrics_bind",
                    addr: config.metrics_bind.to_string(),
                    source,
                }
            })?),
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
        let store_err = |source| MasterError::Store {
            path: store.path().to_owned(),
            source,
        };
        // Never wipe the store of another live server sharing the directory.
        if let Ok(other) = crate::store::MasterFile::open(&store) {
            let pid = other.pid();
            let alive = pid != 0
                && pid != std::process::id()
                && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
            if alive {
                return Err(store_err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("the directory is in use by the gpe master with pid {pid}"),
                )));
            }
        }
        let created = store.prepare().map_err(store_err)?;
        let store = OwnedStore {
            store,
            remove_dir: own_dir || created,
            owner,
        };
        let pidfile = match &pid_path {
            Some(p) => Some(Pidfile::create(p).map_err(MasterError::Pidfile)?),
            None => None,
        };
        Ok(Bound {
            listeners,
            metrics,
            upgrade_from: inherited.upgrade_from,
            pidfile,
            sockets,
            store,
        })
    }
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
    let mut bound = Bound::acquire(config, config.metrics && spec.exporter.is_some())?;
    let os = spawn::SystemOs::new(
        &spec,
        worker,
        std::mem::take(&mut bound.listeners),
        bound.metrics.take(),
        bound.store.store.clone(),
    )?;
    for l in os.listeners() {
        crate::log_info!("Listening at: {} ({})", l.describe(), std::process::id());
    }
    crate::log_info!("Using worker: {}", config.worker);
    if let Some(addr) = os.metrics_listener().and_then(|m| m.local_addr().ok()) {
        crate::log_info!("Metrics at: http://{addr}{}", config.metrics_path);
    }
    let exporter = os.has_exporter();
    let mut arbiter = arbiter::Arbiter::new(
        os,
        Arc::new(config.clone()),
        bound.store.store.clone(),
        exporter,
        bound.upgrade_from,
        bound.pidfile.take(),
    )?;
    let result = arbiter.run();
    bound.sockets.keep = arbiter.upgrade_child_alive();
    // The pid file goes with the arbiter, the store and sockets with `bound`.
    drop(arbiter);
    result
}
