//! gpe core: the vocabulary every gpe crate shares.
//!
//! - [`http`]: the app interface (a tower service over streaming bodies), the
//!   layer between hyper and the app, one connection;
//! - [`worker`]: the [`Worker`] trait the worker crates implement;
//! - [`config`]: settings from file, environment and flags;
//! - [`store`]: the shared-memory metric store;
//! - [`async_worker`]: the lifecycle the async workers share;
//! - [`rt`]: the tokio edge and the idle-yield hook;
//! - [`master`]: the supervising master process.
#![deny(missing_docs)]

pub mod async_worker;
pub mod balance;
pub mod config;
pub mod http;
pub mod listener;
pub mod log;
pub mod master;
pub mod rt;
pub mod store;
pub mod sys;
pub mod worker;

pub use config::{Config, ConfigError, RawSettings};
pub use http::app::{
    blocking, handler, text, with_route, App, AppFactory, BoxError, FullRequest, FullResponse,
    IntoApp, Request, Response, Route, SharedApp,
};
pub use master::{run, ExporterContext, ExporterMain, MasterError, ServerSpec, WorkerSelector};
pub use worker::{Control, Worker, WorkerContext, WorkerExit};
