//! Settings. One table (`settings`) lists every setting with its default,
//! accepted values, environment variable, flag and whether a HUP applies it.
//! The raw layer (`raw`) reads the TOML file, `GPE_*` variables and command-line
//! flags by that table and merges them (flags win); the resolved layer
//! (`resolve`) validates the result into the typed [`Config`]. No syscalls
//! happen here except reading the file: host names are looked up when bound.

mod raw;
mod resolve;
mod settings;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use raw::{RawSettings, Value};
pub use resolve::{BindAddr, Config, HostPort, LogTarget, TcpAddr};
pub use settings::{setting, Flag, Kind, Setting, MAX_WORKERS, SETTINGS, WORKER_TYPES};

/// The settings of one app metric family (`[app_metrics.NAME]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppMetricSettings {
    /// How the family's gauges merge over live workers (default `sum`).
    pub gauge: Option<crate::store::GaugeMode>,
    /// Histogram bucket bounds (default: `histogram_buckets`).
    pub buckets: Option<Vec<f64>>,
}

/// Settings of the app's own metric families, by metric name.
pub type AppMetrics = std::collections::BTreeMap<String, AppMetricSettings>;

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
    /// The config file, an environment variable or a flag did not parse.
    #[error("{origin}: {message}")]
    Parse {
        /// The file path, variable name or setting.
        origin: String,
        /// What is wrong (it names the setting when it is one).
        message: String,
    },
}

impl ConfigError {
    pub(crate) fn invalid(
        setting: &'static str,
        value: impl ToString,
        expected: impl Into<String>,
    ) -> Self {
        ConfigError::Invalid {
            setting,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// Checks `text` as a value of setting `name` on its own (for tools that take
/// one setting, like `gpe exporter --metrics-path`).
///
/// # Errors
/// `name` is not a setting, or `text` is not accepted, naming the setting.
pub fn check(name: &str, text: &str) -> Result<(), ConfigError> {
    let mut raw = RawSettings::default();
    raw.set(name, text)?;
    Config::resolve(raw, None).map(|_| ())
}
