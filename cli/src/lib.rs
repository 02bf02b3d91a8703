//! gpe: a pre-fork HTTP application server with Prometheus metrics built in.
//!
//! Use it three ways: `gpe serve` on a built-in app, your own binary through
//! this crate ([`serve`] with an app factory), or `gpe exporter` as a sidecar.
//!
//! ```no_run
//! use gpe::{blocking, text, with_route, StatusCode};
//!
//! fn main() -> std::process::ExitCode {
//!     gpe::serve(|| {
//!         Ok(blocking(|req| {
//!             with_route(text(StatusCode::OK, format!("hi {}", req.uri().path())), "/{name}")
//!         }))
//!     })
//! }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod apps;
pub mod cli;
pub mod workers;

use std::process::ExitCode;
use std::sync::Arc;

pub use gpe_core::app::{
    blocking, handler, text, with_route, App, AppFactory, AppStyle, BoxError, Reply, Request,
    Response, Route, SharedApp,
};
pub use gpe_core::config::{Config, RawSettings};
pub use http::StatusCode;

/// Runs a server for the app built by `factory` (called once in every worker
/// after fork), taking the same command line, config file, `GPE_*` variables
/// and signals as `gpe serve`. Returns the process exit status.
pub fn serve<F>(factory: F) -> ExitCode
where
    F: Fn() -> Result<SharedApp, BoxError> + Send + Sync + 'static,
{
    let args = cli::ServerArgs::parse();
    cli::exit_status(cli::run_server(args, Arc::new(factory)))
}
