//! gpe core: the vocabulary every gpe crate shares.
//!
//! - [`app`]: the [`App`] trait and the factory each worker calls after fork;
//! - [`worker`]: the [`Worker`] trait the worker crates implement;
//! - [`config`]: settings from file, environment and flags;
//! - [`store`]: the shared-memory metric store;
//! - [`instrument`]: the layer between hyper and the app;
//! - [`async_worker`]: pieces the eventloop and greenlet workers share;
//! - [`master`]: the supervising master process.
#![deny(missing_docs)]

pub mod app;
pub mod async_worker;
pub mod balance;
pub mod config;
pub mod idle;
pub mod instrument;
pub mod listener;
pub mod log;
pub mod master;
pub mod store;
pub mod sys;
pub mod worker;

pub use app::{blocking, handler, with_route, App, AppFactory, AppStyle, Reply, Request, Response};
pub use config::{Config, ConfigError, RawSettings};
pub use master::{run, ExporterContext, ExporterMain, MasterError, ServerSpec, WorkerSelector};
pub use worker::{Control, Worker, WorkerContext, WorkerExit};
