//! The command line: `gpe serve`, `gpe exporter`, `gpe check`, `gpe top`.
//! `main` parses and calls [`run`]; errors become exit statuses only in
//! [`exit_status`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use gpe_core::AppFactory;
use gpe_core::StoreDir;
use gpe_core::{Config, RawSettings, TcpAddr};
use gpe_core::{MasterError, ServerSpec};

/// gpe: a pre-fork HTTP application server with Prometheus metrics built in.
#[derive(Debug, Parser)]
#[command(name = "gpe", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a built-in app (hello, echo, static) with a master and workers.
    Serve(Box<ServeArgs>),
    /// Serve /metrics from a metrics directory (sidecar).
    Exporter(ExporterArgs),
    /// Validate a config file and print the resolved settings.
    Check(CheckArgs),
    /// Watch a running server live (or print one table with --once).
    #[cfg(feature = "top")]
    Top(crate::top::TopArgs),
}

/// Settings shared by `gpe serve` and binaries built on the gpe library.
#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// TOML config file (also GPE_CONFIG)
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Turn metrics off (no store writes, no exporter)
    #[arg(long)]
    pub no_metrics: bool,
    /// Server settings: one flag per setting of the table
    /// (`gpe_core::SETTINGS`).
    #[command(flatten)]
    pub settings: RawSettings,
}

impl ServerArgs {
    /// Parses the process arguments (for library users' binaries).
    pub fn parse() -> ServerArgs {
        #[derive(Parser)]
        #[command(version, about = "A gpe server")]
        struct Top {
            #[command(flatten)]
            args: ServerArgs,
        }
        Top::parse().args
    }

    fn flags(&self) -> Result<RawSettings, gpe_core::ConfigError> {
        let mut s = self.settings.clone();
        if self.no_metrics {
            s.set("metrics", "false")?;
        }
        Ok(s)
    }

    /// Loads the settings from all sources.
    ///
    /// # Errors
    /// A source fails to parse or a setting is invalid.
    pub fn load(&self) -> Result<Config, gpe_core::ConfigError> {
        Config::load(self.flags()?, self.config.clone(), std::env::vars())
    }
}

/// `gpe serve`.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Built-in app: hello, echo or static
    #[arg(long, default_value = "hello")]
    pub app: String,
    /// Directory served by the static app
    #[arg(long)]
    pub root: Option<PathBuf>,
    /// Server settings.
    #[command(flatten)]
    pub server: ServerArgs,
}

/// `gpe exporter`.
#[derive(Debug, Clone, Args)]
pub struct ExporterArgs {
    /// The metrics directory the server writes (its --metrics-dir)
    #[arg(long)]
    pub metrics_dir: PathBuf,
    /// Address to serve on
    #[arg(long, default_value = "127.0.0.1:9091")]
    pub metrics_bind: String,
    /// Path of the metrics endpoint
    #[arg(long, default_value = "/metrics")]
    pub metrics_path: String,
    /// Exporter-toolkit web config (YAML): TLS, client certificates, basic
    /// auth, headers; re-read when it changes
    #[arg(long, value_name = "FILE")]
    pub metrics_web_config: Option<PathBuf>,
    /// Serve /healthz without the basic auth of the web config
    #[arg(long, value_name = "BOOL", default_value_t = false, action = clap::ArgAction::Set)]
    pub metrics_health_public: bool,
}

/// `gpe check`.
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// The config file to validate
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: PathBuf,
}

/// A failure that already carries its exit code.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<MasterError> for Failure {
    fn from(e: MasterError) -> Self {
        Failure {
            code: e.exit_code().clamp(1, 255) as u8,
            error: e.into(),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Failure { code: 2, error }
    }
}

/// Runs a parsed command line.
///
/// # Errors
/// Whatever stopped the command, with its exit code.
pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve(args) => {
            let factory = crate::apps::factory(&args.app, args.root.clone())
                .map_err(|e| anyhow::anyhow!(e))?;
            run_server(args.server, factory)
        }
        Command::Exporter(args) => run_exporter(args),
        #[cfg(feature = "top")]
        Command::Top(args) => crate::top::run(args).map_err(Failure::from),
        Command::Check(args) => {
            let config = Config::load(
                RawSettings::default(),
                Some(args.config.clone()),
                Vec::new(),
            )
            .map_err(anyhow::Error::from)?;
            crate::workers::select(&config.worker)
                .map_err(|e| anyhow::anyhow!("setting `worker`: {e}"))?;
            if let Some(file) = &config.metrics_web_config {
                check_web_config(file)?;
            }
            use std::io::Write as _;
            // A closed stdout (`gpe check ... | head`) is not an error of the config.
            let _ = writeln!(
                std::io::stdout().lock(),
                "{} is valid:\n{config:#?}",
                args.config.display()
            );
            Ok(())
        }
    }
}

/// Runs the master for `factory` with the settings of `args`.
///
/// # Errors
/// Invalid settings, start-up failures, repeated boot failures.
pub fn run_server(args: ServerArgs, factory: AppFactory) -> Result<(), Failure> {
    let config = args.load().map_err(MasterError::from)?;
    if let (true, Some(file)) = (config.metrics, &config.metrics_web_config) {
        check_web_config(file)?;
    }
    let reload_args = args.clone();
    let spec = ServerSpec {
        config,
        app: factory,
        workers: Arc::new(crate::workers::select),
        exporter: Some(Arc::new(gpe_exporter::exporter_main)),
        reload: Some(Arc::new(move || reload_args.load())),
    };
    gpe_core::run(spec).map_err(Failure::from)
}

/// Refuses a web config the exporter could not serve with, before anything
/// starts; the exporter reads it again itself.
fn check_web_config(file: &std::path::Path) -> Result<gpe_exporter::WebConfig, Failure> {
    gpe_exporter::WebConfig::load(file)
        .map_err(|e| anyhow::anyhow!("setting `metrics_web_config`: {e}").into())
}

fn run_exporter(args: ExporterArgs) -> Result<(), Failure> {
    let addr = TcpAddr::parse("metrics_bind", &args.metrics_bind).map_err(anyhow::Error::from)?;
    gpe_core::check_setting("metrics_path", &args.metrics_path).map_err(anyhow::Error::from)?;
    let web = args
        .metrics_web_config
        .as_deref()
        .map(check_web_config)
        .transpose()?;
    let listener = std::net::TcpListener::bind(&addr).map_err(|e| Failure {
        code: 1,
        error: anyhow::anyhow!("setting `metrics_bind`: cannot listen on {addr}: {e}"),
    })?;
    let store = StoreDir::new(&args.metrics_dir);
    if !store.index_path().exists() {
        gpe_core::log_warn!(
            "{} holds no gpe store yet; /metrics answers 503 until a server writes it",
            args.metrics_dir.display()
        );
    }
    let scheme = match web.as_ref().and_then(gpe_exporter::WebConfig::tls) {
        Some(_) => "https",
        None => "http",
    };
    gpe_core::log_info!(
        "Exporter serving {} at {scheme}://{addr}{}",
        args.metrics_dir.display(),
        args.metrics_path
    );
    gpe_exporter::serve(
        listener,
        store,
        args.metrics_path,
        gpe_core::LogTarget::Std,
        gpe_exporter::Limits::default(),
        gpe_exporter::Access {
            web_config: args.metrics_web_config,
            health_public: args.metrics_health_public,
        },
    )
    .context("exporter failed")
    .map_err(Failure::from)
}

/// `e` and its causes, each cause once: one that the message above it
/// already quotes (as the master's errors quote their OS error) is left out.
fn message(e: &anyhow::Error) -> String {
    let mut msg = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !msg.contains(&cause) {
            msg.push_str(": ");
            msg.push_str(&cause);
        }
    }
    msg
}

/// Turns a result into the process exit status, printing the error.
pub fn exit_status(r: Result<(), Failure>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("gpe: error: {}", message(&f.error));
            ExitCode::from(f.code)
        }
    }
}

#[cfg(test)]
mod message_tests {
    use super::message;

    #[test]
    fn a_cause_the_message_already_quotes_is_printed_once() {
        let os = || std::io::Error::from(std::io::ErrorKind::AddrInUse);
        let bind = gpe_core::MasterError::Bind {
            setting: "metrics_bind",
            addr: "127.0.0.1:9091".into(),
            source: os(),
        };
        assert_eq!(
            message(&anyhow::Error::new(bind)),
            format!(
                "setting `metrics_bind`: cannot listen on 127.0.0.1:9091: {}",
                os()
            )
        );
        let chained = anyhow::Error::new(os()).context("exporter failed");
        assert_eq!(message(&chained), format!("exporter failed: {}", os()));
    }
}
