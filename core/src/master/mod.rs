//! The master (Gunicorn's arbiter): binds the sockets, creates the metric
//! store, forks the exporter and the workers, and supervises them from one
//! single-threaded loop (`arbiter`). This module owns start-up ([`run`]:
//! settings → [`Bound`] → arbiter) and clean-up (by drop); the loop's
//! decisions live in `arbiter`, `procs`, `reload` and `upgrade`, its effects
//! in `spawn` behind the `os` seam.

mod arbiter;
mod health;
mod os;
mod pidfile;
mod procs;
mod reload;
mod spawn;
mod stop;
mod upgrade;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod stale_tests {
    use super::*;

    #[test]
    fn stores_of_dead_or_reused_pids_are_removed_and_others_kept() {
        let base = tempfile::tempdir().unwrap();
        // A dead pid (beyond the largest pid_max).
        let dead = StoreDir::new(base.path().join("gpe-4194305"));
        dead.prepare().unwrap();
        crate::store::Index::create(&dead.index_path(), 1024, 10, &[1.0]).unwrap();
        // A dead pid whose directory holds a foreign file: left alone.
        let foreign = StoreDir::new(base.path().join("gpe-4194306"));
        foreign.prepare().unwrap();
        std::fs::write(foreign.path().join("notes"), b"x").unwrap();
        // A live pid (1) with no master file yet: kept.
        let live = StoreDir::new(base.path().join("gpe-1"));
        live.prepare().unwrap();
        clean_stale_stores(base.path());
        assert!(!dead.path().exists());
        assert!(foreign.path().join("notes").exists());
        assert!(live.path().exists());
        // The pid test itself: dead, alive, reused.
        let now = crate::store::unix_now_ns();
        assert!(master_gone(4_194_305, now));
        assert!(!master_gone(std::process::id(), now));
        assert!(
            master_gone(std::process::id(), 0),
            "started after the file: reused"
        );
    }
}

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
    /// The exporter-toolkit web config file (`metrics_web_config`).
    pub web_config: Option<PathBuf>,
    /// `/healthz` needs no basic auth (`metrics_health_public`).
    pub health_public: bool,
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
    /// A file of the metric store was cut short or replaced while serving.
    #[error(
        "setting `metrics_dir`: {} was cut short or replaced by another program; stopped",
        .0.display()
    )]
    StoreLost(PathBuf),
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

/// Where the store lives when `metrics_dir` is not set.
fn default_store_base() -> PathBuf {
    if std::path::Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    }
}

fn private_store_dir() -> PathBuf {
    default_store_base().join(format!("gpe-{}", std::process::id()))
}

/// Start time of process `pid`, Unix nanoseconds, from `/proc` (`None` when
/// it cannot be read).
fn process_start_ns(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime, clock ticks since boot), counted after the `)`
    // that ends the command name.
    let rest = stat.rsplit_once(')')?.1;
    let ticks: u64 = rest.split_whitespace().nth(19)?.parse().ok()?;
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = u64::try_from(hz).ok().filter(|h| *h > 0)?;
    Some(
        btime
            .saturating_mul(1_000_000_000)
            .saturating_add(ticks.saturating_mul(1_000_000_000) / hz),
    )
}

/// Whether the gpe master that wrote a store's master file (pid, start
/// time) is gone: no such process, or the pid now belongs to a process that
/// started after that master did (the pid was reused).
fn master_gone(pid: u32, start_time_ns: u64) -> bool {
    /// Slack for the coarse boot time in `/proc/stat` (whole seconds).
    const SLACK_NS: u64 = 2_000_000_000;
    let Ok(raw) = i32::try_from(pid) else {
        return true;
    };
    if raw <= 0 {
        return true;
    }
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None)
        == Err(nix::errno::Errno::ESRCH)
    {
        return true;
    }
    process_start_ns(pid).is_some_and(|started| started > start_time_ns.saturating_add(SLACK_NS))
}

/// Removes from `base` the store directories (`gpe-<pid>`) of gpe masters
/// that no longer run, each logged. A directory holding anything gpe did not
/// write is left alone (and logged).
fn clean_stale_stores(base: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(base) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("gpe-"))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == std::process::id() || !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let store = StoreDir::new(entry.path());
        let master = crate::store::prove(&store.master_path());
        let gone = match master {
            Some(proof) if proof.pid == pid => master_gone(pid, proof.start_time_ns),
            // No master file (yet): only a dead pid makes it stale.
            _ => master_gone(pid, u64::MAX),
        };
        if !gone {
            continue;
        }
        match store.proven_files() {
            Ok(files) => {
                for f in files {
                    let _ = std::fs::remove_file(f);
                }
                match std::fs::remove_dir(store.path()) {
                    Ok(()) => crate::log_info!(
                        "Removed the stale metric store {} of gpe master {pid}, which no longer runs",
                        store.path().display()
                    ),
                    Err(e) => crate::log_warn!(
                        "cannot remove the stale metric store {}: {e}",
                        store.path().display()
                    ),
                }
            }
            Err(e) => crate::log_warn!(
                "leaving the stale metric store {} of gpe master {pid}: {e}",
                store.path().display()
            ),
        }
    }
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
            None => {
                clean_stale_stores(&default_store_base());
                (StoreDir::new(private_store_dir()), true)
            }
        };
        let store = store.with_capacity(config.metrics_store_series as usize);
        let store_err = |source| MasterError::Store {
            path: store.path().to_owned(),
            source,
        };
        // Refuse a directory holding anything gpe did not write, before
        // opening any file in it.
        if store.path().is_dir() {
            store.proven_files().map_err(store_err)?;
        }
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
    // The workers open the access log after fork; a path they cannot open is
    // found here, naming the setting, rather than by workers failing to boot.
    if let Some(crate::config::LogTarget::File(path)) = &config.accesslog {
        let opened = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Err(e) = opened {
            return Err(MasterError::Config(ConfigError::Invalid {
                setting: "accesslog",
                value: path.display().to_string(),
                expected: format!("a writable file ({e})"),
            }));
        }
    }
    // The workers load the TLS files after fork; bad ones are found here,
    // naming the setting, rather than by workers failing to boot.
    crate::tls::server_config(config, true).map_err(MasterError::Config)?;
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
        match &config.metrics_web_config {
            None => crate::log_info!("Metrics at: http://{addr}{}", config.metrics_path),
            Some(web) => crate::log_info!(
                "Metrics at: {addr}{} (web config {})",
                config.metrics_path,
                web.display()
            ),
        }
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
