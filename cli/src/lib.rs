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
//!         Ok(blocking(|req: gpe::FullRequest| {
//!             with_route(text(StatusCode::OK, format!("hi {}", req.uri().path())), "/{name}")
//!         }))
//!     })
//! }
//! ```
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod apps;
pub mod cli;
#[cfg(feature = "axum")]
mod route_layer;
#[cfg(feature = "top")]
pub mod top;
pub mod workers;

#[cfg(feature = "axum")]
pub use route_layer::{MatchedPathFuture, MatchedPathLayer, MatchedPathService};

use std::process::ExitCode;
use std::sync::Arc;

pub use gpe_core::Body;
pub use gpe_core::Handler;
pub use gpe_core::{
    blocking, handler, text, with_route, BoxError, FullRequest, FullResponse, IntoApp, Request,
    Response, Route,
};
pub use gpe_core::{Config, RawSettings};
pub use http::StatusCode;

/// The `metrics` facade (0.24): in a gpe worker its `counter!`, `gauge!`
/// and `histogram!` (and every library instrumented with it) record into
/// gpe's store, merged across workers in the scrape. See docs/metrics.md.
pub use metrics;
pub use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};

/// Exemplars on the app's own histograms: [`record_with_exemplar`] records a
/// value with a W3C trace id ([`trace_id_of`] reads one from a
/// `traceparent` header value).
pub use gpe_core::{record_with_exemplar, trace_id_of};

/// Runs a server for the app built by `factory` (called once in every worker
/// after fork), taking the same command line, config file, `GPE_*` variables
/// and signals as `gpe serve`. The app is any tower service over
/// `http::Request<gpe::Body>` (an axum `Router`, a [`blocking`] or
/// [`handler`] closure, ...). Returns the process exit status.
pub fn serve<F, A>(factory: F) -> ExitCode
where
    F: Fn() -> Result<A, BoxError> + Send + Sync + 'static,
    A: IntoApp,
{
    let args = cli::ServerArgs::parse();
    let factory: gpe_core::AppFactory = Arc::new(move || factory().map(IntoApp::into_app));
    cli::exit_status(cli::run_server(args, factory))
}
