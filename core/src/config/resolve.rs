//! The resolved layer: the typed [`Config`], one field per row of the table,
//! validated against each row's [`Kind`]. Addresses are checked for syntax
//! only; a host name is looked up when the master binds it.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{RawSettings, Value};
use super::settings::{setting, with_settings, Kind, Setting};
use super::{AppMetrics, ConfigError};
use crate::store::layout::MAX_BUCKETS;

/// A host name and port, looked up only when bound ([`HostPort::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// The host name (syntax checked, not looked up).
    pub host: String,
    /// The port.
    pub port: u16,
}

impl HostPort {
    /// Looks the name up and returns its first address.
    ///
    /// # Errors
    /// The lookup fails or finds no address.
    pub fn resolve(&self) -> std::io::Result<SocketAddr> {
        (self.host.as_str(), self.port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("host {} not found", self.host),
                )
            })
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// A listening address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BindAddr {
    /// A TCP address given as an IP address.
    Tcp(SocketAddr),
    /// A TCP address given as a host name, looked up when bound.
    Host(HostPort),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for BindAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BindAddr::Tcp(a) => write!(f, "{a}"),
            BindAddr::Host(h) => write!(f, "{h}"),
            BindAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

const ADDR_SYNTAX: &str = "HOST:PORT, [IPV6]:PORT or unix:PATH";

/// Whether `host` is a syntactically valid DNS name: dot-separated labels of
/// letters, digits, `-` and `_`, not starting or ending with `-`, the last one
/// not all digits (that would be a malformed IPv4 address).
fn is_host_name(host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.is_empty() || host.len() > 253 {
        return false;
    }
    let label_ok = |l: &str| {
        (1..=63).contains(&l.len())
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    host.split('.').all(label_ok)
        && !host
            .rsplit('.')
            .next()
            .is_some_and(|last| last.bytes().all(|b| b.is_ascii_digit()))
}

impl BindAddr {
    /// Parses `HOST:PORT`, `[V6]:PORT` or `unix:PATH` for setting `setting`.
    /// Only the syntax is checked; a host name is looked up when bound.
    ///
    /// # Errors
    /// A malformed address, naming the setting.
    pub fn parse(setting: &'static str, s: &str) -> Result<BindAddr, ConfigError> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() || path.contains('\0') {
                return Err(ConfigError::invalid(setting, s, ADDR_SYNTAX));
            }
            return Ok(BindAddr::Unix(PathBuf::from(path)));
        }
        match TcpAddr::parse(setting, s) {
            Ok(TcpAddr::Ip(a)) => Ok(BindAddr::Tcp(a)),
            Ok(TcpAddr::Host(h)) => Ok(BindAddr::Host(h)),
            Err(_) => Err(ConfigError::invalid(setting, s, ADDR_SYNTAX)),
        }
    }
}

/// A TCP address: an IP address, or a host name looked up when bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpAddr {
    /// An IP address and port.
    Ip(SocketAddr),
    /// A host name and port.
    Host(HostPort),
}

impl TcpAddr {
    /// Parses `HOST:PORT` or `[V6]:PORT` for setting `setting` (syntax only).
    ///
    /// # Errors
    /// A malformed address, naming the setting.
    pub fn parse(setting: &'static str, s: &str) -> Result<TcpAddr, ConfigError> {
        const EXPECTED: &str = "HOST:PORT or [IPV6]:PORT";
        if let Ok(addr) = s.parse::<SocketAddr>() {
            return Ok(TcpAddr::Ip(addr));
        }
        let bad = || ConfigError::invalid(setting, s, EXPECTED);
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let port = port.parse::<u16>().map_err(|_| bad())?;
        if !is_host_name(host) {
            return Err(bad());
        }
        Ok(TcpAddr::Host(HostPort {
            host: host.to_owned(),
            port,
        }))
    }
}

impl std::fmt::Display for TcpAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TcpAddr::Ip(a) => write!(f, "{a}"),
            TcpAddr::Host(h) => write!(f, "{h}"),
        }
    }
}

/// Binding a [`TcpAddr`] (`TcpListener::bind(&addr)`) looks a host name up then.
impl ToSocketAddrs for TcpAddr {
    type Iter = std::vec::IntoIter<SocketAddr>;

    fn to_socket_addrs(&self) -> std::io::Result<Self::Iter> {
        match self {
            TcpAddr::Ip(a) => Ok(vec![*a].into_iter()),
            TcpAddr::Host(h) => Ok(vec![h.resolve()?].into_iter()),
        }
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

impl Kind {
    /// What is accepted, for error messages.
    pub(crate) fn expected(&self) -> String {
        match self {
            Kind::Bool => "true or false".to_owned(),
            Kind::Int { min, max } => format!("{min}..={max}"),
            Kind::Choice(words) => words.join(", "),
            Kind::Text | Kind::Path => "a string".to_owned(),
            Kind::UrlPath => {
                "a path starting with / other than /healthz and /readyz, without blanks or control characters"
                    .to_owned()
            }
            Kind::Addrs => format!("one or more addresses: {ADDR_SYNTAX}"),
            Kind::TcpAddr => "HOST:PORT or [IPV6]:PORT".to_owned(),
            Kind::Buckets => {
                format!("1 to {MAX_BUCKETS} positive, finite, strictly ascending bounds")
            }
            Kind::AppMetrics => {
                "[app_metrics.NAME] tables with gauge and buckets, in the config file".to_owned()
            }
        }
    }

    /// Whether `v` is accepted (the shape is the raw layer's job; a value of
    /// another shape is refused here too).
    fn accepts(&self, v: &Value) -> bool {
        match (self, v) {
            (Kind::Bool, Value::Bool(_)) => true,
            (Kind::Int { min, max }, Value::Int(n)) => (min..=max).contains(&n),
            (Kind::Choice(words), Value::Text(s)) => words.contains(&s.as_str()),
            (Kind::Text | Kind::Path | Kind::TcpAddr, Value::Text(_)) => true,
            (Kind::UrlPath, Value::Text(s)) => {
                s.starts_with('/')
                    && s != "/healthz"
                    && s != "/readyz"
                    && !s.chars().any(|c| c.is_whitespace() || c.is_control())
            }
            (Kind::Addrs, Value::List(l)) => !l.is_empty(),
            (Kind::AppMetrics, Value::AppMetrics(_)) => true,
            (Kind::Buckets, Value::Floats(b)) => {
                !b.is_empty()
                    && b.len() <= MAX_BUCKETS
                    && b.windows(2).all(|w| w[0] < w[1])
                    && b.iter().all(|x| x.is_finite() && *x > 0.0)
            }
            _ => false,
        }
    }
}

/// A typed field of [`Config`] built from its setting's checked value
/// (`None`: neither a source nor the table gave one).
trait FromValue: Sized {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError>;
}

fn refused(s: &Setting, v: Option<&Value>) -> ConfigError {
    ConfigError::invalid(
        s.name,
        v.map_or_else(String::new, Value::to_string),
        s.kind.expected(),
    )
}

fn int<T: TryFrom<u64>>(s: &Setting, v: Option<Value>) -> Result<T, ConfigError> {
    match v {
        Some(Value::Int(n)) => T::try_from(n).map_err(|_| refused(s, Some(&Value::Int(n)))),
        other => Err(refused(s, other.as_ref())),
    }
}

fn text(s: &Setting, v: Option<Value>) -> Result<Option<String>, ConfigError> {
    match v {
        None => Ok(None),
        Some(Value::Text(t)) => Ok(Some(t)),
        Some(other) => Err(refused(s, Some(&other))),
    }
}

fn required<T>(s: &Setting, v: Option<T>) -> Result<T, ConfigError> {
    v.ok_or_else(|| refused(s, None))
}

impl FromValue for u32 {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        int(s, v)
    }
}

impl FromValue for u64 {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        int(s, v)
    }
}

impl FromValue for usize {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        int(s, v)
    }
}

/// Whole seconds.
impl FromValue for Duration {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        int(s, v).map(Duration::from_secs)
    }
}

/// Whole seconds; `0` = off.
impl FromValue for Option<Duration> {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        let secs: u64 = int(s, v)?;
        Ok((secs > 0).then(|| Duration::from_secs(secs)))
    }
}

impl FromValue for bool {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        match v {
            Some(Value::Bool(b)) => Ok(b),
            other => Err(refused(s, other.as_ref())),
        }
    }
}

impl FromValue for String {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        required(s, text(s, v)?)
    }
}

impl FromValue for Option<String> {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        text(s, v)
    }
}

impl FromValue for Option<PathBuf> {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        Ok(text(s, v)?.map(PathBuf::from))
    }
}

impl FromValue for LogTarget {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        Ok(LogTarget::parse(&required(s, text(s, v)?)?))
    }
}

impl FromValue for Option<LogTarget> {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        Ok(text(s, v)?.as_deref().map(LogTarget::parse))
    }
}

impl FromValue for TcpAddr {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        TcpAddr::parse(s.name, &required(s, text(s, v)?)?)
    }
}

impl FromValue for Vec<BindAddr> {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        match v {
            Some(Value::List(l)) => l.iter().map(|b| BindAddr::parse(s.name, b)).collect(),
            other => Err(refused(s, other.as_ref())),
        }
    }
}

impl FromValue for Vec<f64> {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        match v {
            Some(Value::Floats(b)) => Ok(b),
            other => Err(refused(s, other.as_ref())),
        }
    }
}

/// `[app_metrics.NAME]` tables, checked as they were read; none = empty.
impl FromValue for AppMetrics {
    fn from_value(s: &Setting, v: Option<Value>) -> Result<Self, ConfigError> {
        match v {
            None => Ok(AppMetrics::new()),
            Some(Value::AppMetrics(m)) => Ok(m),
            Some(other) => Err(refused(s, Some(&other))),
        }
    }
}

/// The value of setting `name`: the one `raw` gives, else the table's
/// default; checked against the row's kind, then typed.
fn field<T: FromValue>(raw: &mut RawSettings, name: &'static str) -> Result<T, ConfigError> {
    let s =
        setting(name).ok_or_else(|| ConfigError::invalid(name, "", "a setting of the table"))?;
    let v = match raw.take(name) {
        Some(v) => Some(v),
        None => match s.default {
            Some(d) => Some(
                s.kind
                    .parse_text(d)
                    .map_err(|m| ConfigError::invalid(name, d, m))?,
            ),
            None => None,
        },
    };
    if let Some(v) = &v {
        if !s.kind.accepts(v) {
            return Err(refused(s, Some(v)));
        }
    }
    T::from_value(s, v)
}

/// Whether a HUP keeps the running value of setting `name`.
fn restart_only(name: &str) -> bool {
    setting(name).is_some_and(|s| s.restart_only)
}

macro_rules! config_struct {
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
        /// Validated settings: one field per row of the settings table
        /// ([`SETTINGS`](super::SETTINGS)), plus the file they came from.
        #[derive(Debug, Clone, PartialEq)]
        pub struct Config {
            $(
                #[doc = concat!("`", $name, "`: ", $doc, ".")]
                pub $field: $ty,
            )*
            /// The config file these settings came from, reread on HUP.
            pub config_file: Option<PathBuf>,
        }

        impl Config {
            /// Validates merged settings; unset ones take the table's default.
            ///
            /// # Errors
            /// The first invalid setting, by name.
            pub fn resolve(
                mut raw: RawSettings,
                config_file: Option<PathBuf>,
            ) -> Result<Config, ConfigError> {
                let config = Config {
                    $( $field: field(&mut raw, $name)?, )*
                    config_file,
                };
                config.check_store_room()?;
                Ok(config)
            }

            /// For a HUP: `new` with every restart-only setting set back to
            /// its running value, and the names of those that differed.
            pub fn keep_restart_only(&self, mut new: Config) -> (Config, Vec<&'static str>) {
                let mut kept = Vec::new();
                $(
                    if restart_only($name) && new.$field != self.$field {
                        new.$field = self.$field.clone();
                        kept.push($name);
                    }
                )*
                (new, kept)
            }
        }
    };
}
with_settings!(config_struct);

impl Config {
    /// The store must hold every capped family full and the per-slot series
    /// of every worker ([`SLOT_SERIES`](super::settings::SLOT_SERIES) each).
    fn check_store_room(&self) -> Result<(), ConfigError> {
        use super::settings::{CAPPED_FAMILIES, SLOT_SERIES};
        let slots = SLOT_SERIES * u64::from(self.workers);
        let need = CAPPED_FAMILIES * u64::from(self.metrics_max_series) + slots;
        if need > u64::from(self.metrics_store_series) {
            return Err(ConfigError::invalid(
                "metrics_max_series",
                self.metrics_max_series,
                format!(
                    "at most {} with `metrics_store_series` = {} and `workers` = {} \
                     (the store must hold {CAPPED_FAMILIES} families of it plus \
                     {SLOT_SERIES} series per worker)",
                    u64::from(self.metrics_store_series).saturating_sub(slots) / CAPPED_FAMILIES,
                    self.metrics_store_series,
                    self.workers,
                ),
            ));
        }
        Ok(())
    }

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

    /// Bytes a connection may buffer for one request head: the head budget
    /// `limit_request_head`, or less when the request line and header limits
    /// allow less in all (never below hyper's smallest buffer, 8,192).
    pub fn max_head_bytes(&self) -> usize {
        (self.limit_request_line + 2)
            .saturating_add(
                self.limit_request_fields
                    .saturating_mul(self.limit_request_field_size + 2),
            )
            .min(self.limit_request_head)
            .max(8192)
    }
}
