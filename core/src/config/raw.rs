//! The raw layer: settings as one source gives them (the TOML file, `GPE_*`
//! variables, the `gpe serve` flags), read by the [`Kind`] of each row of the
//! table and merged, later sources winning. Values have their setting's shape
//! here; ranges and syntax are checked by `resolve`.

use std::collections::BTreeMap;
use std::path::Path;

use clap::{Arg, ArgAction, ArgMatches};

use super::settings::{setting, Kind, Setting, ENV_NOT_SETTINGS, SETTINGS};
use super::{AppMetricSettings, AppMetrics, ConfigError};
use crate::store::layout::MAX_BUCKETS;
use crate::store::GaugeMode;

/// One setting's value as a source gave it, in the shape of its [`Kind`].
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// [`Kind::Bool`].
    Bool(bool),
    /// [`Kind::Int`].
    Int(u64),
    /// [`Kind::Choice`], [`Kind::Text`], [`Kind::Path`], [`Kind::UrlPath`], [`Kind::TcpAddr`].
    Text(String),
    /// [`Kind::Addrs`].
    List(Vec<String>),
    /// [`Kind::Buckets`].
    Floats(Vec<f64>),
    /// [`Kind::AppMetrics`].
    AppMetrics(AppMetrics),
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Bool(b) => write!(f, "{b}"),
            Value::Int(n) => write!(f, "{n}"),
            Value::Text(s) => f.write_str(s),
            Value::List(l) => write!(f, "{l:?}"),
            Value::Floats(l) => write!(f, "{l:?}"),
            Value::AppMetrics(m) => write!(f, "{m:?}"),
        }
    }
}

impl Kind {
    /// What a source must spell, for error messages.
    fn shape(&self) -> &'static str {
        match self {
            Kind::Bool => "true or false",
            Kind::Int { .. } => "a non-negative integer",
            Kind::Choice(_) | Kind::Text | Kind::Path | Kind::UrlPath | Kind::TcpAddr => "a string",
            Kind::Addrs => "a list of addresses",
            Kind::Buckets => "a list of numbers",
            Kind::AppMetrics => "tables [app_metrics.NAME] in the config file",
        }
    }

    /// Reads a value spelt as in an environment variable or a flag; lists are
    /// comma-separated.
    pub(crate) fn parse_text(&self, text: &str) -> Result<Value, String> {
        let bad = || format!("expected {}, found {text:?}", self.shape());
        Ok(match self {
            Kind::Bool => Value::Bool(text.parse().map_err(|_| bad())?),
            Kind::Int { .. } => Value::Int(text.parse().map_err(|_| bad())?),
            Kind::Choice(_) | Kind::Text | Kind::Path | Kind::UrlPath | Kind::TcpAddr => {
                Value::Text(text.to_owned())
            }
            Kind::Addrs => Value::List(
                text.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            ),
            Kind::Buckets => Value::Floats(
                text.split(',')
                    .map(|s| s.trim().parse::<f64>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad())?,
            ),
            Kind::AppMetrics => {
                return Err("set only in the config file, as [app_metrics.NAME] tables".to_owned())
            }
        })
    }

    /// Reads a value from the TOML file.
    fn read_toml(&self, v: toml::Value) -> Result<Value, String> {
        let bad = |v: &toml::Value| format!("expected {}, found {}", self.shape(), v.type_str());
        Ok(match (self, v) {
            (Kind::Bool, toml::Value::Boolean(b)) => Value::Bool(b),
            (Kind::Int { .. }, toml::Value::Integer(i)) => Value::Int(
                u64::try_from(i).map_err(|_| format!("expected {}, found {i}", self.shape()))?,
            ),
            (
                Kind::Choice(_) | Kind::Text | Kind::Path | Kind::UrlPath | Kind::TcpAddr,
                toml::Value::String(s),
            ) => Value::Text(s),
            (Kind::Addrs, toml::Value::Array(items)) => Value::List(
                items
                    .into_iter()
                    .map(|item| match item {
                        toml::Value::String(s) => Ok(s),
                        other => Err(bad(&other)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            (Kind::Buckets, toml::Value::Array(items)) => Value::Floats(
                items
                    .into_iter()
                    .map(|item| match item {
                        toml::Value::Float(f) => Ok(f),
                        toml::Value::Integer(i) => Ok(i as f64),
                        other => Err(bad(&other)),
                    })
                    .collect::<Result<_, _>>()?,
            ),
            (Kind::AppMetrics, toml::Value::Table(t)) => Value::AppMetrics(app_metrics(t)?),
            (_, other) => return Err(bad(&other)),
        })
    }
}

/// Reads the `[app_metrics.NAME]` tables: each takes `gauge` (one of the
/// [`GaugeMode`] words) and `buckets` (histogram bounds); anything else is
/// refused naming its key.
fn app_metrics(t: toml::Table) -> Result<AppMetrics, String> {
    let mut out = AppMetrics::new();
    for (name, v) in t {
        let toml::Value::Table(fields) = v else {
            return Err(format!(
                "[app_metrics.{name}]: expected a table, found {}",
                v.type_str()
            ));
        };
        let mut s = AppMetricSettings::default();
        for (key, v) in fields {
            let at = format!("app_metrics.{name}.{key}");
            match (key.as_str(), v) {
                ("gauge", toml::Value::String(m)) => {
                    let mode = GaugeMode::ALL
                        .iter()
                        .find(|g| g.label() == m)
                        .ok_or_else(|| {
                            let words: Vec<_> = GaugeMode::ALL.iter().map(|g| g.label()).collect();
                            format!("`{at}`: expected one of {}, found {m:?}", words.join(", "))
                        })?;
                    s.gauge = Some(*mode);
                }
                ("buckets", toml::Value::Array(items)) => {
                    let b = items
                        .into_iter()
                        .map(|item| match item {
                            toml::Value::Float(f) => Ok(f),
                            toml::Value::Integer(i) => Ok(i as f64),
                            other => Err(format!(
                                "`{at}`: expected a list of numbers, found {}",
                                other.type_str()
                            )),
                        })
                        .collect::<Result<Vec<f64>, String>>()?;
                    if b.is_empty()
                        || b.len() > MAX_BUCKETS
                        || !b.windows(2).all(|w| w[0] < w[1])
                        || !b.iter().all(|x| x.is_finite())
                    {
                        return Err(format!(
                            "`{at}`: expected 1 to {MAX_BUCKETS} finite, strictly ascending bounds, found {b:?}"
                        ));
                    }
                    s.buckets = Some(b);
                }
                ("gauge" | "buckets", other) => {
                    return Err(format!("`{at}`: wrong type {}", other.type_str()))
                }
                _ => return Err(format!("`{at}`: unknown key (gauge and buckets are known)")),
            }
        }
        let mut chars = name.bytes();
        let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == b'_' || c == b':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b':');
        if !valid {
            return Err(format!("[app_metrics.{name}]: not a valid metric name"));
        }
        out.insert(name, s);
    }
    Ok(out)
}

/// Settings as given by one source, or merged from several. Names are those
/// of the table ([`SETTINGS`]); the environment uses each row's `env`, the
/// command line `--name-with-dashes`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawSettings {
    values: BTreeMap<&'static str, Value>,
}

impl RawSettings {
    /// Takes every setting `other` gives, keeping ours where it gives none.
    /// Lists are replaced whole.
    pub fn merge(&mut self, other: RawSettings) {
        self.values.extend(other.values);
    }

    /// The value given for `name`, if any.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    /// Removes and returns the value given for `name`.
    pub(crate) fn take(&mut self, name: &str) -> Option<Value> {
        self.values.remove(name)
    }

    /// Sets `name` from `text`, spelt as in its environment variable.
    ///
    /// # Errors
    /// `name` is not a setting, or `text` does not have its shape.
    pub fn set(&mut self, name: &str, text: &str) -> Result<(), ConfigError> {
        let s = setting(name).ok_or_else(|| ConfigError::Parse {
            origin: format!("setting `{name}`"),
            message: "no such setting".to_owned(),
        })?;
        let v = s
            .kind
            .parse_text(text)
            .map_err(|message| ConfigError::Parse {
                origin: format!("setting `{}`", s.name),
                message,
            })?;
        self.values.insert(s.name, v);
        Ok(())
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
        RawSettings::from_toml(&format!("config file {}", path.display()), &text)
    }

    /// Parses the text of a TOML config file; `origin` names it in errors.
    ///
    /// # Errors
    /// TOML syntax, unknown key or wrong type (naming the key).
    pub fn from_toml(origin: &str, text: &str) -> Result<RawSettings, ConfigError> {
        let err = |message: String| ConfigError::Parse {
            origin: origin.to_owned(),
            message,
        };
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| err(e.to_string()))?;
        let mut out = RawSettings::default();
        for (key, value) in table {
            let s = setting(&key).ok_or_else(|| {
                err(format!(
                    "unknown setting `{key}` (see docs/configuration.md)"
                ))
            })?;
            let v = s
                .kind
                .read_toml(value)
                .map_err(|m| err(format!("setting `{}`: {m}", s.name)))?;
            out.values.insert(s.name, v);
        }
        Ok(out)
    }

    /// Reads `GPE_*` variables from `vars`. An unknown `GPE_*` name is an
    /// error, to catch typos, except [`ENV_NOT_SETTINGS`]. Lists (`bind`,
    /// `histogram_buckets`) are comma-separated.
    ///
    /// # Errors
    /// An unknown variable, or a value that does not fit its setting (naming
    /// the variable).
    pub fn from_env(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<RawSettings, ConfigError> {
        let mut out = RawSettings::default();
        for (name, value) in vars {
            if !name.starts_with("GPE_") || ENV_NOT_SETTINGS.contains(&name.as_str()) {
                continue;
            }
            let err = |message: String| ConfigError::Parse {
                origin: format!("environment variable {name}"),
                message,
            };
            let s = SETTINGS
                .iter()
                .find(|s| s.env.eq_ignore_ascii_case(&name))
                .ok_or_else(|| err("not a gpe setting (see docs/configuration.md)".to_owned()))?;
            let v = s
                .kind
                .parse_text(&value)
                .map_err(|m| err(format!("setting `{}`: {m}", s.name)))?;
            out.values.insert(s.name, v);
        }
        Ok(out)
    }

    /// The flag of `s` as a clap argument.
    fn arg(s: &'static Setting) -> Option<Arg> {
        let flag = s.flag?;
        let help = match s.default {
            Some(d) => format!("{} [default: {d}]", s.doc),
            None => s.doc.to_owned(),
        };
        let arg = Arg::new(s.name)
            .long(s.name.replace('_', "-"))
            .value_name(flag.value_name)
            .help(help);
        let arg = match flag.short {
            Some(c) => arg.short(c),
            None => arg,
        };
        Some(match s.kind {
            Kind::Bool => arg.value_parser(clap::value_parser!(bool)),
            Kind::Int { .. } => arg.value_parser(clap::value_parser!(u64)),
            Kind::Choice(_) | Kind::Text | Kind::Path | Kind::UrlPath | Kind::TcpAddr => arg,
            Kind::Addrs => arg.action(ArgAction::Append),
            Kind::Buckets => arg
                .action(ArgAction::Append)
                .value_delimiter(',')
                .value_parser(clap::value_parser!(f64)),
            Kind::AppMetrics => return None,
        })
    }

    fn from_matches(m: &ArgMatches) -> Result<RawSettings, clap::Error> {
        fn one<T: Clone + Send + Sync + 'static>(
            m: &ArgMatches,
            id: &str,
        ) -> Result<Option<T>, clap::Error> {
            m.try_get_one::<T>(id).map(|v| v.cloned()).map_err(internal)
        }
        fn many<T: Clone + Send + Sync + 'static>(
            m: &ArgMatches,
            id: &str,
        ) -> Result<Option<Vec<T>>, clap::Error> {
            m.try_get_many::<T>(id)
                .map(|v| v.map(|it| it.cloned().collect()))
                .map_err(internal)
        }
        fn internal(e: clap::parser::MatchesError) -> clap::Error {
            clap::Error::raw(clap::error::ErrorKind::InvalidValue, e)
        }
        let mut out = RawSettings::default();
        for s in SETTINGS.iter().filter(|s| s.flag.is_some()) {
            let v = match s.kind {
                Kind::Bool => one::<bool>(m, s.name)?.map(Value::Bool),
                Kind::Int { .. } => one::<u64>(m, s.name)?.map(Value::Int),
                Kind::Choice(_) | Kind::Text | Kind::Path | Kind::UrlPath | Kind::TcpAddr => {
                    one::<String>(m, s.name)?.map(Value::Text)
                }
                Kind::Addrs => many::<String>(m, s.name)?.map(Value::List),
                Kind::Buckets => many::<f64>(m, s.name)?.map(Value::Floats),
                Kind::AppMetrics => None,
            };
            if let Some(v) = v {
                out.values.insert(s.name, v);
            }
        }
        Ok(out)
    }
}

/// The flags of `gpe serve`, one per row of the table that has a flag.
impl clap::Args for RawSettings {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        SETTINGS
            .iter()
            .filter_map(RawSettings::arg)
            .fold(cmd, clap::Command::arg)
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        RawSettings::augment_args(cmd)
    }
}

impl clap::FromArgMatches for RawSettings {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        RawSettings::from_matches(m)
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        self.merge(RawSettings::from_matches(m)?);
        Ok(())
    }
}
