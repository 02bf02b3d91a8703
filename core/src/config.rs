//! Settings: the raw layer that mirrors the TOML file, `GPE_*` environment
//! variables and command-line flags (merged, flags win), and the validated
//! [`Config`] built from it. No syscalls happen here except reading the file.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::store::catalogue::DEFAULT_DURATION_BUCKETS;
use crate::store::layout::{CAPACITY, MAX_BUCKETS};

/// An invalid setting or an unreadable config file. The message always names
/// the setting (or the file) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A value is out of range or malformed.
    #[error("invalid value {value:?} for setting `{setting}`: expected {expected}")]
    Invalid {
        /// The setting's name, as in the config file.
        setting: &'static str,
        /// The offending value.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// The config file could not be read.
    #[error("cannot read config file (setting `config`) {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file or an environment variable did not parse.
    #[error("{origin}: {message}")]
    Parse {
        /// The file path or variable name.
        origin: String,
        /// The parser's message (it names the key).
        message: String,
    },
}

impl ConfigError {
    fn invalid(setting: &'static str, value: impl ToString, expected: impl Into<String>) -> Self {
        ConfigError::Invalid {
            setting,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// Settings as given by one source. Every field is optional; the TOML file uses
/// these names, the environment uses `GPE_` + the name in capitals, the command
/// line uses `--name-with-dashes`.
#[derive(Debug, Clone, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct RawSettings {
    /// Address to listen on: HOST:PORT or unix:PATH (repeatable) [default: 127.0.0.1:8000]
    #[arg(short = 'b', long = "bind", value_name = "ADDR")]
    pub bind: Vec<String>,
    /// Number of worker processes [default: 2]
    #[arg(short = 'w', long)]
    pub workers: Option<u32>,
    /// Worker type: sync, thread, eventloop or greenlet [default: sync]
    #[arg(short = 'k', long, value_name = "TYPE")]
    pub worker: Option<String>,
    /// App threads per thread worker [default: 4]
    #[arg(long)]
    pub threads: Option<u32>,
    /// Open connections per eventloop/greenlet worker [default: 1000]
    #[arg(long)]
    pub worker_connections: Option<u32>,
    /// Recycle a worker after this many requests; 0 = never [default: 0]
    #[arg(long)]
    pub max_requests: Option<u64>,
    /// Random extra requests (0..=N) added to max_requests per worker [default: 0]
    #[arg(long)]
    pub max_requests_jitter: Option<u64>,
    /// Seconds without a heartbeat before a worker is killed; 0 = off [default: 30]
    #[arg(short = 't', long)]
    pub timeout: Option<u64>,
    /// Seconds a stopping worker may take to finish its requests [default: 30]
    #[arg(long)]
    pub graceful_timeout: Option<u64>,
    /// Seconds an idle keep-alive connection stays open [default: 2]
    #[arg(long)]
    pub keepalive: Option<u64>,
    /// Listen backlog [default: 2048]
    #[arg(long)]
    pub backlog: Option<u32>,
    /// Longest request line in bytes [default: 4094]
    #[arg(long)]
    pub limit_request_line: Option<usize>,
    /// Most header fields per request [default: 100]
    #[arg(long)]
    pub limit_request_fields: Option<usize>,
    /// Longest header field in bytes [default: 8190]
    #[arg(long)]
    pub limit_request_field_size: Option<usize>,
    /// Largest request body in bytes; larger ones get 413 [default: 10485760]
    #[arg(long)]
    pub max_body_size: Option<u64>,
    /// Set SO_REUSEPORT on TCP listeners [default: false]
    #[arg(long)]
    pub reuse_port: Option<bool>,
    /// Thread, eventloop and greenlet workers: yield the CPU once before the event loop sleeps [default: true]
    #[arg(long)]
    pub idle_yield: Option<bool>,
    /// Write the master's pid to this file
    #[arg(short = 'p', long)]
    pub pidfile: Option<PathBuf>,
    /// Access log file, or - for stdout [default: none]
    #[arg(long)]
    pub accesslog: Option<String>,
    /// Error log file, or - for stderr [default: -]
    #[arg(long)]
    pub errorlog: Option<String>,
    /// Address of the metrics endpoint [default: 127.0.0.1:9091]
    #[arg(long)]
    pub metrics_bind: Option<String>,
    /// Path of the metrics endpoint [default: /metrics]
    #[arg(long)]
    pub metrics_path: Option<String>,
    /// Directory of the shared-memory metric store [default: private dir in /dev/shm]
    #[arg(long)]
    pub metrics_dir: Option<PathBuf>,
    /// Whether to record and export metrics (file/env only; see --no-metrics) [default: true]
    #[arg(skip)]
    pub metrics: Option<bool>,
    /// Duration histogram bucket bounds in seconds, comma-separated
    #[arg(long, value_delimiter = ',')]
    #[serde(default)]
    pub histogram_buckets: Option<Vec<f64>>,
    /// Label sets kept per metric family before the rest collapse into `other` [default: 1000]
    #[arg(long)]
    pub metrics_max_series: Option<u32>,
    /// `route` label of responses that name no route template; `path` labels them by path [default: unmatched]
    #[arg(long)]
    pub unmatched_route: Option<String>,
}

impl RawSettings {
    /// Takes every setting `other` gives, keeping ours where it gives none.
    pub fn merge(&mut self, other: RawSettings) {
        macro_rules! take {
            ($($f:ident),*) => { $( if other.$f.is_some() { self.$f = other.$f; } )* };
        }
        if !other.bind.is_empty() {
            self.bind = other.bind;
        }
        take!(
            workers,
            worker,
            threads,
            worker_connections,
            max_requests,
            max_requests_jitter,
            timeout,
            graceful_timeout,
            keepalive,
            backlog,
            limit_request_line,
            limit_request_fields,
            limit_request_field_size,
            max_body_size,
            reuse_port,
            idle_yield,
            pidfile,
            accesslog,
            errorlog,
            metrics_bind,
            metrics_path,
            metrics_dir,
            metrics,
            histogram_buckets,
            metrics_max_series,
            unmatched_route
        );
    }

    /// Parses a TOML config file.
    ///
    /// # Errors
    /// Unreadable file, TOML syntax, unknown key or wrong type (naming the key).
    pub fn from_file(path: &Path) -> Result<RawSettings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            origin: format!("config file {}", path.display()),
            message: e.to_string(),
        })
    }

    /// Reads `GPE_*` variables from `vars` (`GPE_CONFIG` and the upgrade
    /// hand-over variables excepted; any other unknown `GPE_*` name is an
    /// error, to catch typos). List
    /// settings (`bind`, `histogram_buckets`) are comma-separated.
    ///
    /// # Errors
    /// A variable's value does not fit its setting (naming the variable).
    pub fn from_env(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawSettings, ConfigError> {
        let mut out = RawSettings::default();
        for (name, value) in vars {
            let Some(key) = name.strip_prefix("GPE_") else {
                continue;
            };
            // Not settings: the config file path and what a binary upgrade hands over.
            if matches!(key, "CONFIG" | "LISTEN_FDS" | "METRICS_FD" | "UPGRADE_FROM") {
                continue;
            }
            let key = key.to_ascii_lowercase();
            let toml_value = match key.as_str() {
                "bind" => toml::Value::Array(
                    value
                        .split(',')
                        .filter(|s| !s.is_empty())
                        .map(|s| toml::Value::String(s.trim().to_owned()))
                        .collect(),
                ),
                "histogram_buckets" => toml::Value::Array(
                    value
                        .split(',')
                        .map(|s| scalar(s.trim()))
                        .collect::<Vec<_>>(),
                ),
                "worker" | "pidfile" | "accesslog" | "errorlog" | "metrics_bind"
                | "metrics_path" | "metrics_dir" | "unmatched_route" => {
                    toml::Value::String(value.clone())
                }
                _ => scalar(&value),
            };
            let mut table = toml::Table::new();
            table.insert(key, toml_value);
            let one: RawSettings =
                toml::Value::Table(table)
                    .try_into()
                    .map_err(|e: toml::de::Error| ConfigError::Parse {
                        origin: format!("environment variable {name}"),
                        message: e.to_string(),
                    })?;
            out.merge(one);
        }
        Ok(out)
    }
}

/// Parses a scalar as TOML (numbers, booleans), else keeps it as a string.
fn scalar(raw: &str) -> toml::Value {
    format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
}

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for BindAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddr::Tcp(a) => write!(f, "{a}"),
            BindAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl BindAddr {
    /// Parses `HOST:PORT`, `[V6]:PORT` or `unix:PATH` for setting `setting`.
    ///
    /// # Errors
    /// Malformed or unresolvable addresses, naming the setting.
    pub fn parse(setting: &'static str, s: &str) -> Result<BindAddr, ConfigError> {
        const EXPECTED: &str = "HOST:PORT, [IPV6]:PORT or unix:PATH";
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ConfigError::invalid(setting, s, EXPECTED));
            }
            return Ok(BindAddr::Unix(PathBuf::from(path)));
        }
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(BindAddr::Tcp(addr));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(ConfigError::invalid(setting, s, EXPECTED));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(ConfigError::invalid(setting, s, EXPECTED));
        }
        s.to_socket_addrs()
            .ok()
            .and_then(|mut it| it.next())
            .map(BindAddr::Tcp)
            .ok_or_else(|| ConfigError::invalid(setting, s, format!("{EXPECTED} (host not found)")))
    }
}

/// Where a log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogTarget {
    /// Standard output (access log) or standard error (error log).
    Std,
    /// A file, opened for appending and reopened on USR1.
    File(PathBuf),
}

impl LogTarget {
    fn parse(s: &str) -> LogTarget {
        if s == "-" {
            LogTarget::Std
        } else {
            LogTarget::File(PathBuf::from(s))
        }
    }
}

/// The four worker types.
pub const WORKER_TYPES: [&str; 4] = ["sync", "thread", "eventloop", "greenlet"];

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Listening addresses.
    pub binds: Vec<BindAddr>,
    /// Worker processes.
    pub workers: u32,
    /// Worker type name (one of [`WORKER_TYPES`]).
    pub worker: String,
    /// App threads per thread worker.
    pub threads: u32,
    /// Connections per eventloop/greenlet worker.
    pub worker_connections: u32,
    /// Requests before a worker recycles; 0 = never.
    pub max_requests: u64,
    /// Jitter added to `max_requests`.
    pub max_requests_jitter: u64,
    /// Heartbeat timeout; `None` = off.
    pub timeout: Option<Duration>,
    /// Time allowed for a graceful stop.
    pub graceful_timeout: Duration,
    /// Idle keep-alive time.
    pub keepalive: Duration,
    /// Listen backlog.
    pub backlog: u32,
    /// Longest request line.
    pub limit_request_line: usize,
    /// Most header fields.
    pub limit_request_fields: usize,
    /// Longest header field.
    pub limit_request_field_size: usize,
    /// Largest request body.
    pub max_body_size: u64,
    /// SO_REUSEPORT on TCP listeners.
    pub reuse_port: bool,
    /// Whether an async worker's loop yields the CPU before it sleeps.
    pub idle_yield: bool,
    /// Pid file.
    pub pidfile: Option<PathBuf>,
    /// Access log.
    pub accesslog: Option<LogTarget>,
    /// Error log.
    pub errorlog: LogTarget,
    /// Metrics endpoint address.
    pub metrics_bind: SocketAddr,
    /// Metrics endpoint path.
    pub metrics_path: String,
    /// Store directory; `None` = a private one.
    pub metrics_dir: Option<PathBuf>,
    /// Metrics on or off.
    pub metrics: bool,
    /// Duration histogram bounds (seconds).
    pub histogram_buckets: Vec<f64>,
    /// Series per family before `other`.
    pub metrics_max_series: u32,
    /// `route` label of responses without a route template (`path`: the path).
    pub unmatched_route: String,
    /// The config file these settings came from, reread on HUP.
    pub config_file: Option<PathBuf>,
}

/// Most worker processes (including those added by TTIN).
pub const MAX_WORKERS: u32 = 1024;

fn range<T: PartialOrd + std::fmt::Display + Copy>(
    setting: &'static str,
    v: T,
    lo: T,
    hi: T,
) -> Result<T, ConfigError> {
    if v < lo || v > hi {
        Err(ConfigError::invalid(setting, v, format!("{lo}..={hi}")))
    } else {
        Ok(v)
    }
}

impl Config {
    /// Loads settings the way `gpe serve` does: defaults, then the config file
    /// (`config_file`, else `GPE_CONFIG`), then `GPE_*` variables, then `flags`.
    ///
    /// # Errors
    /// Any source fails to parse, or a merged value is invalid.
    pub fn load(
        flags: RawSettings,
        config_file: Option<PathBuf>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = env.into_iter().collect();
        let config_file = config_file.or_else(|| {
            env.iter()
                .find(|(k, _)| k == "GPE_CONFIG")
                .map(|(_, v)| PathBuf::from(v))
        });
        let mut raw = match &config_file {
            Some(p) => RawSettings::from_file(p)?,
            None => RawSettings::default(),
        };
        raw.merge(RawSettings::from_env(env)?);
        raw.merge(flags);
        Config::resolve(raw, config_file)
    }

    /// Validates merged settings.
    ///
    /// # Errors
    /// The first invalid setting, by name.
    pub fn resolve(raw: RawSettings, config_file: Option<PathBuf>) -> Result<Config, ConfigError> {
        let binds = if raw.bind.is_empty() {
            vec![BindAddr::Tcp(SocketAddr::from(([127, 0, 0, 1], 8000)))]
        } else {
            raw.bind
                .iter()
                .map(|b| BindAddr::parse("bind", b))
                .collect::<Result<_, _>>()?
        };
        let worker = raw.worker.unwrap_or_else(|| "sync".to_owned());
        if !WORKER_TYPES.contains(&worker.as_str()) {
            return Err(ConfigError::invalid(
                "worker",
                worker,
                WORKER_TYPES.join(", "),
            ));
        }
        let metrics_bind = match raw.metrics_bind {
            None => SocketAddr::from(([127, 0, 0, 1], 9091)),
            Some(s) => match BindAddr::parse("metrics_bind", &s)? {
                BindAddr::Tcp(a) => a,
                BindAddr::Unix(_) => {
                    return Err(ConfigError::invalid("metrics_bind", s, "HOST:PORT"))
                }
            },
        };
        let metrics_path = raw.metrics_path.unwrap_or_else(|| "/metrics".to_owned());
        if !metrics_path.starts_with('/') || metrics_path == "/healthz" {
            return Err(ConfigError::invalid(
                "metrics_path",
                metrics_path,
                "a path starting with / other than /healthz",
            ));
        }
        let histogram_buckets = raw
            .histogram_buckets
            .unwrap_or_else(|| DEFAULT_DURATION_BUCKETS.to_vec());
        let ascending = histogram_buckets.windows(2).all(|w| w[0] < w[1]);
        if histogram_buckets.is_empty()
            || histogram_buckets.len() > MAX_BUCKETS
            || !ascending
            || histogram_buckets
                .iter()
                .any(|b| !b.is_finite() || *b <= 0.0)
        {
            return Err(ConfigError::invalid(
                "histogram_buckets",
                format!("{histogram_buckets:?}"),
                format!("1 to {MAX_BUCKETS} positive, finite, strictly ascending bounds"),
            ));
        }
        // Each of the HTTP families may fill its cap, plus per-slot families.
        let max_series_hi = (CAPACITY as u32 - 3 * MAX_WORKERS) / 6;
        let metrics_max_series = range(
            "metrics_max_series",
            raw.metrics_max_series.unwrap_or(1000),
            1,
            max_series_hi,
        )?;
        let timeout = range("timeout", raw.timeout.unwrap_or(30), 0, 86_400)?;
        Ok(Config {
            binds,
            workers: range("workers", raw.workers.unwrap_or(2), 1, MAX_WORKERS)?,
            worker,
            threads: range("threads", raw.threads.unwrap_or(4), 1, 1024)?,
            worker_connections: range(
                "worker_connections",
                raw.worker_connections.unwrap_or(1000),
                1,
                1_000_000,
            )?,
            max_requests: raw.max_requests.unwrap_or(0),
            max_requests_jitter: raw.max_requests_jitter.unwrap_or(0),
            timeout: (timeout > 0).then(|| Duration::from_secs(timeout)),
            graceful_timeout: Duration::from_secs(range(
                "graceful_timeout",
                raw.graceful_timeout.unwrap_or(30),
                0,
                86_400,
            )?),
            keepalive: Duration::from_secs(range(
                "keepalive",
                raw.keepalive.unwrap_or(2),
                0,
                3600,
            )?),
            backlog: range("backlog", raw.backlog.unwrap_or(2048), 1, 65_535)?,
            limit_request_line: range(
                "limit_request_line",
                raw.limit_request_line.unwrap_or(4094),
                64,
                1 << 20,
            )?,
            limit_request_fields: range(
                "limit_request_fields",
                raw.limit_request_fields.unwrap_or(100),
                1,
                32_768,
            )?,
            limit_request_field_size: range(
                "limit_request_field_size",
                raw.limit_request_field_size.unwrap_or(8190),
                64,
                1 << 20,
            )?,
            max_body_size: range(
                "max_body_size",
                raw.max_body_size.unwrap_or(10 << 20),
                0,
                1 << 40,
            )?,
            reuse_port: raw.reuse_port.unwrap_or(false),
            idle_yield: raw.idle_yield.unwrap_or(true),
            pidfile: raw.pidfile,
            accesslog: raw.accesslog.as_deref().map(LogTarget::parse),
            errorlog: raw
                .errorlog
                .as_deref()
                .map_or(LogTarget::Std, LogTarget::parse),
            metrics_bind,
            metrics_path,
            metrics_dir: raw.metrics_dir,
            metrics: raw.metrics.unwrap_or(true),
            histogram_buckets,
            metrics_max_series,
            unmatched_route: match raw.unmatched_route {
                Some(r) if r.is_empty() => {
                    return Err(ConfigError::invalid(
                        "unmatched_route",
                        r,
                        "a non-empty label, or `path`",
                    ))
                }
                Some(r) => r,
                None => "unmatched".to_owned(),
            },
            config_file,
        })
    }

    /// Bytes hyper may buffer for one request head, derived from the request
    /// line and header limits.
    pub fn max_head_bytes(&self) -> usize {
        (self.limit_request_line + 2)
            .saturating_add(
                self.limit_request_fields
                    .saturating_mul(self.limit_request_field_size + 2),
            )
            .max(8192)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags(args: &[&str]) -> RawSettings {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            s: RawSettings,
        }
        let mut v = vec!["x"];
        v.extend_from_slice(args);
        <P as clap::Parser>::try_parse_from(v).unwrap().s
    }

    #[test]
    fn defaults() {
        let c = Config::load(RawSettings::default(), None, vec![]).unwrap();
        assert_eq!(c.workers, 2);
        assert_eq!(c.worker, "sync");
        assert_eq!(c.metrics_bind.to_string(), "127.0.0.1:9091");
        assert_eq!(c.timeout, Some(Duration::from_secs(30)));
        assert!(c.metrics);
        assert!(c.idle_yield);
    }

    #[test]
    fn idle_yield_comes_from_every_source_and_must_be_a_boolean() {
        let off = Config::load(flags(&["--idle-yield", "false"]), None, vec![]).unwrap();
        assert!(!off.idle_yield);
        let env = vec![("GPE_IDLE_YIELD".to_owned(), "false".to_owned())];
        assert!(!Config::load(flags(&[]), None, env).unwrap().idle_yield);
        let env = vec![("GPE_IDLE_YIELD".to_owned(), "maybe".to_owned())];
        let e = Config::load(flags(&[]), None, env).unwrap_err();
        assert!(e.to_string().contains("GPE_IDLE_YIELD"), "{e}");
    }

    #[test]
    fn file_then_env_then_flags() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("gpe.toml");
        std::fs::write(
            &f,
            "workers = 3\nthreads = 7\nbind = [\"127.0.0.1:1\"]\nmetrics = false\n",
        )
        .unwrap();
        let env = vec![
            ("GPE_THREADS".to_owned(), "9".to_owned()),
            ("GPE_BIND".to_owned(), "127.0.0.1:2,unix:/tmp/s".to_owned()),
            ("HOME".to_owned(), "/root".to_owned()),
        ];
        let c = Config::load(flags(&["-w", "5"]), Some(f), env).unwrap();
        assert_eq!(c.workers, 5);
        assert_eq!(c.threads, 9);
        assert!(!c.metrics);
        assert_eq!(
            c.binds,
            vec![
                BindAddr::Tcp("127.0.0.1:2".parse().unwrap()),
                BindAddr::Unix("/tmp/s".into())
            ]
        );
    }

    #[test]
    fn bad_values_name_their_setting() {
        let e = Config::load(flags(&["-w", "0"]), None, vec![]).unwrap_err();
        assert!(e.to_string().contains("`workers`"), "{e}");
        let e = Config::load(flags(&["--bind", "nonsense"]), None, vec![]).unwrap_err();
        assert!(e.to_string().contains("`bind`"), "{e}");
        let e = Config::load(flags(&["-k", "fibers"]), None, vec![]).unwrap_err();
        assert!(e.to_string().contains("`worker`"), "{e}");
        let e = Config::load(flags(&[]), Some("/nonexistent/gpe.toml".into()), vec![]).unwrap_err();
        assert!(e.to_string().contains("config file"), "{e}");
        let e = Config::load(
            flags(&[]),
            None,
            vec![("GPE_WORKERS".to_owned(), "many".to_owned())],
        )
        .unwrap_err();
        assert!(e.to_string().contains("GPE_WORKERS"), "{e}");
        let e = Config::load(flags(&["--histogram-buckets", "1,0.5"]), None, vec![]).unwrap_err();
        assert!(e.to_string().contains("`histogram_buckets`"), "{e}");
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("gpe.toml");
        std::fs::write(&f, "wokers = 3\n").unwrap();
        let e = Config::load(RawSettings::default(), Some(f), vec![]).unwrap_err();
        assert!(e.to_string().contains("wokers"), "{e}");
    }
}
