//! THE settings table: one row per setting. Every other part of the settings
//! layer is driven by it: the file/env/flag readers (`raw`), the typed
//! [`Config`](super::Config) and its validation (`resolve`), the restart-only
//! check on HUP, the `gpe serve` flags, and the test that diffs this table
//! against docs/configuration.md.
//!
//! Adding a setting means adding a row here (the `Config` field of the same
//! name appears with it), using the field, and documenting it.

use crate::store::layout::{DEFAULT_CAPACITY, MAX_CAPACITY, MIN_CAPACITY};

/// The four worker types.
pub const WORKER_TYPES: [&str; 4] = ["sync", "thread", "eventloop", "greenlet"];

/// The values of `cert_reqs`.
pub const CERT_REQS: [&str; 3] = ["none", "optional", "required"];

/// The values of `http2`.
pub const HTTP2_MODES: [&str; 3] = ["off", "tls", "always"];

/// Most worker processes (including those added by TTIN).
pub const MAX_WORKERS: u32 = 1024;

/// Families whose label sets are capped by `metrics_max_series`; with
/// [`SLOT_SERIES`] per worker they must fit in `metrics_store_series`.
pub const CAPPED_FAMILIES: u64 = 6;

/// Series (one row each, a histogram's too) that every worker slot adds to
/// the store: one per per-slot family.
pub const SLOT_SERIES: u64 = crate::store::catalogue::Family::PER_SLOT.len() as u64;

/// Most `metrics_max_series` in the largest store (the start-up check
/// against `metrics_store_series` is tighter).
const MAX_SERIES: u64 = MAX_CAPACITY as u64 / CAPPED_FAMILIES;

// `metrics_store_series` defaults to the store's default capacity.
const _: () = assert!(DEFAULT_CAPACITY == 16_384);

/// What a setting's values look like, how every source spells them, and what
/// is accepted.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Kind {
    /// `true` or `false`.
    Bool,
    /// A non-negative integer in `min..=max`.
    Int {
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
    /// One of a fixed list of words.
    Choice(&'static [&'static str]),
    /// Any string.
    Text,
    /// A file or directory path.
    Path,
    /// An HTTP path: starts with `/`, no blanks or control characters, not `/healthz` or `/readyz`.
    UrlPath,
    /// A non-empty list of listening addresses (`HOST:PORT`, `[IPV6]:PORT`, `unix:PATH`).
    Addrs,
    /// One TCP address (`HOST:PORT` or `[IPV6]:PORT`).
    TcpAddr,
    /// Histogram bounds: positive, finite, strictly ascending numbers.
    Buckets,
    /// Per-family settings of the app's own metrics: `[app_metrics.NAME]`
    /// tables of the config file (no environment variable or flag form).
    AppMetrics,
}

/// How a setting appears on the command line of `gpe serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flag {
    /// The one-letter flag, if any.
    pub short: Option<char>,
    /// The placeholder shown in `--help`.
    pub value_name: &'static str,
}

impl Flag {
    /// A `--long` flag only.
    pub const fn long(value_name: &'static str) -> Flag {
        Flag {
            short: None,
            value_name,
        }
    }

    /// A `--long` flag with a one-letter `-s` form.
    pub const fn short(short: char, value_name: &'static str) -> Flag {
        Flag {
            short: Some(short),
            value_name,
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting {
    /// The name: TOML key, and with dashes the `--flag`.
    pub name: &'static str,
    /// Its values.
    pub kind: Kind,
    /// The default, spelt as in an environment variable; `None` = unset.
    pub default: Option<&'static str>,
    /// The environment variable.
    pub env: &'static str,
    /// A HUP keeps the running value (with a warning) instead of applying a new one.
    pub restart_only: bool,
    /// The command-line flag; `None` = file and environment only.
    pub flag: Option<Flag>,
    /// One line for `--help` and the `Config` field.
    pub doc: &'static str,
}

/// Calls the macro `$then` with every row of the table. The rows are written
/// once, here; `settings.rs` builds [`SETTINGS`] from them and `resolve.rs`
/// the [`Config`](super::Config) struct.
macro_rules! with_settings {
    ($then:ident) => {
        $then! {
            binds = "bind": Vec<BindAddr> {
                kind: Kind::Addrs,
                default: Some("127.0.0.1:8000"),
                env: "GPE_BIND",
                restart_only: true,
                flag: Some(Flag::short('b', "ADDR")),
                doc: "Address to listen on: HOST:PORT, [IPV6]:PORT or unix:PATH (repeatable)",
            },
            workers = "workers": u32 {
                kind: Kind::Int { min: 1, max: MAX_WORKERS as u64 },
                default: Some("2"),
                env: "GPE_WORKERS",
                restart_only: false,
                flag: Some(Flag::short('w', "N")),
                doc: "Number of worker processes",
            },
            worker = "worker": String {
                kind: Kind::Choice(&WORKER_TYPES),
                default: Some("sync"),
                env: "GPE_WORKER",
                restart_only: false,
                flag: Some(Flag::short('k', "TYPE")),
                doc: "Worker type: sync, thread, eventloop or greenlet",
            },
            threads = "threads": u32 {
                kind: Kind::Int { min: 1, max: 1024 },
                default: Some("4"),
                env: "GPE_THREADS",
                restart_only: false,
                flag: Some(Flag::long("N")),
                doc: "App threads per thread worker",
            },
            worker_connections = "worker_connections": u32 {
                kind: Kind::Int { min: 1, max: 1_000_000 },
                default: Some("1000"),
                env: "GPE_WORKER_CONNECTIONS",
                restart_only: false,
                flag: Some(Flag::long("N")),
                doc: "Open connections per thread, eventloop or greenlet worker",
            },
            max_requests = "max_requests": u64 {
                kind: Kind::Int { min: 0, max: u64::MAX },
                default: Some("0"),
                env: "GPE_MAX_REQUESTS",
                restart_only: false,
                flag: Some(Flag::long("N")),
                doc: "Recycle a worker after this many requests; 0 = never",
            },
            max_requests_jitter = "max_requests_jitter": u64 {
                kind: Kind::Int { min: 0, max: u64::MAX },
                default: Some("0"),
                env: "GPE_MAX_REQUESTS_JITTER",
                restart_only: false,
                flag: Some(Flag::long("N")),
                doc: "Random extra requests (0..=N) added to max_requests per worker",
            },
            timeout = "timeout": Option<Duration> {
                kind: Kind::Int { min: 0, max: 86_400 },
                default: Some("30"),
                env: "GPE_TIMEOUT",
                restart_only: false,
                flag: Some(Flag::short('t', "SECONDS")),
                doc: "Seconds without a heartbeat before a worker is killed; 0 = off",
            },
            max_worker_memory = "max_worker_memory": u64 {
                kind: Kind::Int { min: 0, max: 1 << 50 },
                default: Some("0"),
                env: "GPE_MAX_WORKER_MEMORY",
                restart_only: false,
                flag: Some(Flag::long("BYTES")),
                doc: "Resident set in bytes above which a worker is retired and replaced; 0 = off",
            },
            graceful_timeout = "graceful_timeout": Duration {
                kind: Kind::Int { min: 0, max: 86_400 },
                default: Some("30"),
                env: "GPE_GRACEFUL_TIMEOUT",
                restart_only: false,
                flag: Some(Flag::long("SECONDS")),
                doc: "Seconds a stopping worker may take to finish its requests",
            },
            keepalive = "keepalive": Duration {
                kind: Kind::Int { min: 0, max: 3600 },
                default: Some("2"),
                env: "GPE_KEEPALIVE",
                restart_only: false,
                flag: Some(Flag::long("SECONDS")),
                doc: "Seconds an idle keep-alive connection stays open; 0 = off",
            },
            header_timeout = "header_timeout": Duration {
                kind: Kind::Int { min: 1, max: 3600 },
                default: Some("10"),
                env: "GPE_HEADER_TIMEOUT",
                restart_only: false,
                flag: Some(Flag::long("SECONDS")),
                doc: "Seconds a connection may take to deliver a complete request head",
            },
            backlog = "backlog": u32 {
                kind: Kind::Int { min: 1, max: 65_535 },
                default: Some("2048"),
                env: "GPE_BACKLOG",
                restart_only: true,
                flag: Some(Flag::long("N")),
                doc: "Listen backlog",
            },
            limit_request_line = "limit_request_line": usize {
                kind: Kind::Int { min: 64, max: 1 << 20 },
                default: Some("4094"),
                env: "GPE_LIMIT_REQUEST_LINE",
                restart_only: false,
                flag: Some(Flag::long("BYTES")),
                doc: "Longest request line in bytes",
            },
            limit_request_fields = "limit_request_fields": usize {
                kind: Kind::Int { min: 1, max: 32_768 },
                default: Some("100"),
                env: "GPE_LIMIT_REQUEST_FIELDS",
                restart_only: false,
                flag: Some(Flag::long("N")),
                doc: "Most header fields per request",
            },
            limit_request_field_size = "limit_request_field_size": usize {
                kind: Kind::Int { min: 64, max: 1 << 20 },
                default: Some("8190"),
                env: "GPE_LIMIT_REQUEST_FIELD_SIZE",
                restart_only: false,
                flag: Some(Flag::long("BYTES")),
                doc: "Longest header field in bytes",
            },
            limit_request_head = "limit_request_head": usize {
                kind: Kind::Int { min: 8192, max: 1 << 30 },
                default: Some("65536"),
                env: "GPE_LIMIT_REQUEST_HEAD",
                restart_only: false,
                flag: Some(Flag::long("BYTES")),
                doc: "Largest request head in bytes (request line and all header lines), the most a connection buffers for one head",
            },
            max_body_size = "max_body_size": u64 {
                kind: Kind::Int { min: 0, max: 1 << 40 },
                default: Some("10485760"),
                env: "GPE_MAX_BODY_SIZE",
                restart_only: false,
                flag: Some(Flag::long("BYTES")),
                doc: "Largest request body in bytes; larger ones get 413",
            },
            reuse_port = "reuse_port": bool {
                kind: Kind::Bool,
                default: Some("false"),
                env: "GPE_REUSE_PORT",
                restart_only: true,
                flag: Some(Flag::long("BOOL")),
                doc: "Set SO_REUSEPORT on TCP listeners",
            },
            idle_yield = "idle_yield": bool {
                kind: Kind::Bool,
                default: Some("true"),
                env: "GPE_IDLE_YIELD",
                restart_only: false,
                flag: Some(Flag::long("BOOL")),
                doc: "Thread, eventloop and greenlet workers: yield the CPU once before the event loop sleeps",
            },
            pidfile = "pidfile": Option<PathBuf> {
                kind: Kind::Path,
                default: None,
                env: "GPE_PIDFILE",
                restart_only: true,
                flag: Some(Flag::short('p', "FILE")),
                doc: "Write the master's pid to this file",
            },
            accesslog = "accesslog": Option<LogTarget> {
                kind: Kind::Text,
                default: None,
                env: "GPE_ACCESSLOG",
                restart_only: false,
                flag: Some(Flag::long("FILE")),
                doc: "Access log file, or - for stdout (default: off)",
            },
            errorlog = "errorlog": LogTarget {
                kind: Kind::Text,
                default: Some("-"),
                env: "GPE_ERRORLOG",
                restart_only: false,
                flag: Some(Flag::long("FILE")),
                doc: "Error log file, or - for stderr",
            },
            unmatched_route = "unmatched_route": String {
                kind: Kind::Text,
                default: Some("unmatched"),
                env: "GPE_UNMATCHED_ROUTE",
                restart_only: false,
                flag: Some(Flag::long("LABEL")),
                doc: "Route label of requests whose response names no route template; `path` uses the raw path",
            },
            certfile = "certfile": Option<PathBuf> {
                kind: Kind::Path,
                default: None,
                env: "GPE_CERTFILE",
                restart_only: false,
                flag: Some(Flag::long("FILE")),
                doc: "PEM certificate chain: serve HTTPS on every `bind` address (with `keyfile`)",
            },
            keyfile = "keyfile": Option<PathBuf> {
                kind: Kind::Path,
                default: None,
                env: "GPE_KEYFILE",
                restart_only: false,
                flag: Some(Flag::long("FILE")),
                doc: "PEM private key of `certfile`",
            },
            ca_certs = "ca_certs": Option<PathBuf> {
                kind: Kind::Path,
                default: None,
                env: "GPE_CA_CERTS",
                restart_only: false,
                flag: Some(Flag::long("FILE")),
                doc: "PEM certificates of the CAs that sign client certificates",
            },
            cert_reqs = "cert_reqs": String {
                kind: Kind::Choice(&CERT_REQS),
                default: Some("none"),
                env: "GPE_CERT_REQS",
                restart_only: false,
                flag: Some(Flag::long("WHEN")),
                doc: "Client certificates: none, optional or required (verified against `ca_certs`)",
            },
            ciphers = "ciphers": Option<String> {
                kind: Kind::Text,
                default: None,
                env: "GPE_CIPHERS",
                restart_only: false,
                flag: Some(Flag::long("SUITES")),
                doc: "TLS cipher suites to offer, by their IANA names, `:`- or `,`-separated (default: rustls' own)",
            },
            http2 = "http2": String {
                kind: Kind::Choice(&HTTP2_MODES),
                default: Some("tls"),
                env: "GPE_HTTP2",
                restart_only: false,
                flag: Some(Flag::long("MODE")),
                doc: "HTTP/2 on thread, eventloop and greenlet workers: off, tls (by ALPN) or always (also prior-knowledge h2c)",
            },
            metrics = "metrics": bool {
                kind: Kind::Bool,
                default: Some("true"),
                env: "GPE_METRICS",
                restart_only: true,
                flag: None,
                doc: "Whether to record and export metrics (the flag is --no-metrics)",
            },
            metrics_bind = "metrics_bind": TcpAddr {
                kind: Kind::TcpAddr,
                default: Some("127.0.0.1:9091"),
                env: "GPE_METRICS_BIND",
                restart_only: true,
                flag: Some(Flag::long("ADDR")),
                doc: "Address of the metrics endpoint: HOST:PORT or [IPV6]:PORT",
            },
            metrics_path = "metrics_path": String {
                kind: Kind::UrlPath,
                default: Some("/metrics"),
                env: "GPE_METRICS_PATH",
                restart_only: true,
                flag: Some(Flag::long("PATH")),
                doc: "Path of the metrics endpoint",
            },
            metrics_dir = "metrics_dir": Option<PathBuf> {
                kind: Kind::Path,
                default: None,
                env: "GPE_METRICS_DIR",
                restart_only: true,
                flag: Some(Flag::long("DIR")),
                doc: "Directory of the shared-memory metric store (default: a private one in /dev/shm)",
            },
            metrics_max_connections = "metrics_max_connections": u32 {
                kind: Kind::Int { min: 1, max: 1_000_000 },
                default: Some("64"),
                env: "GPE_METRICS_MAX_CONNECTIONS",
                restart_only: true,
                flag: Some(Flag::long("N")),
                doc: "Concurrent connections the exporter serves; more wait in the backlog",
            },
            metrics_web_config = "metrics_web_config": Option<PathBuf> {
                kind: Kind::Path,
                default: None,
                env: "GPE_METRICS_WEB_CONFIG",
                restart_only: true,
                flag: Some(Flag::long("FILE")),
                doc: "Exporter-toolkit web config (YAML) for the metrics endpoint: TLS, client certificates, basic auth, headers; re-read when it changes",
            },
            metrics_health_public = "metrics_health_public": bool {
                kind: Kind::Bool,
                default: Some("false"),
                env: "GPE_METRICS_HEALTH_PUBLIC",
                restart_only: true,
                flag: Some(Flag::long("BOOL")),
                doc: "Serve /healthz and /readyz without the basic auth of metrics_web_config",
            },
            histogram_buckets = "histogram_buckets": Vec<f64> {
                kind: Kind::Buckets,
                default: Some("0.005,0.01,0.025,0.05,0.1,0.25,0.5,1,2.5,5,10"),
                env: "GPE_HISTOGRAM_BUCKETS",
                restart_only: true,
                flag: Some(Flag::long("SECONDS,...")),
                doc: "Duration histogram bucket bounds in seconds, comma-separated",
            },
            app_metrics = "app_metrics": AppMetrics {
                kind: Kind::AppMetrics,
                default: None,
                env: "GPE_APP_METRICS",
                restart_only: true,
                flag: None,
                doc: "Per-family settings of the app's own metrics: `[app_metrics.NAME]` tables with `gauge` and `buckets` (config file only)",
            },
            metrics_max_series = "metrics_max_series": u32 {
                kind: Kind::Int { min: 1, max: MAX_SERIES },
                default: Some("1000"),
                env: "GPE_METRICS_MAX_SERIES",
                restart_only: true,
                flag: Some(Flag::long("N")),
                doc: "Label sets kept per metric family before the rest collapse into `other`",
            },
            metrics_store_series = "metrics_store_series": u32 {
                kind: Kind::Int { min: MIN_CAPACITY as u64, max: MAX_CAPACITY as u64 },
                default: Some("16384"),
                env: "GPE_METRICS_STORE_SERIES",
                restart_only: true,
                flag: Some(Flag::long("N")),
                doc: "Series every store file has room for, 128 bytes each, reserved at start-up",
            },
        }
    };
}
pub(crate) use with_settings;

macro_rules! table {
    ($(
        $field:ident = $name:literal : $ty:ty {
            kind: $kind:expr,
            default: $default:expr,
            env: $env:literal,
            restart_only: $ro:literal,
            flag: $flag:expr,
            doc: $doc:literal $(,)?
        }
    ),* $(,)?) => {
        /// Every setting, in the order `--help` and `gpe check` show them.
        pub static SETTINGS: &[Setting] = &[$(
            Setting {
                name: $name,
                kind: $kind,
                default: $default,
                env: $env,
                restart_only: $ro,
                flag: $flag,
                doc: $doc,
            },
        )*];
    };
}
with_settings!(table);

/// The row of setting `name`.
pub fn setting(name: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.name == name)
}

/// The environment variables that start with `GPE_` but are not settings: the
/// config file and what a binary upgrade hands to the new master.
pub const ENV_NOT_SETTINGS: [&str; 4] = [
    "GPE_CONFIG",
    "GPE_LISTEN_FDS",
    "GPE_METRICS_FD",
    "GPE_UPGRADE_FROM",
];
