//! gpe core: the vocabulary every gpe crate shares. Its modules are private;
//! this is the whole surface the worker crates, the exporter and the `gpe`
//! crate use, grouped by job:
//!
//! - the app interface and the HTTP layer (`http/`): a tower service over
//!   streaming bodies, one request, one connection, where the app runs;
//! - workers (`worker.rs`, `async_worker.rs`, `rt/`, `listener.rs`): the
//!   [`Worker`] trait, the shared lifecycle, the tokio edge, sockets;
//! - TLS on the app listener (`tls.rs`);
//! - settings (`config/`);
//! - the shared-memory metric store (`store/`);
//! - the master (`master/`).
#![deny(missing_docs)]

mod app_metrics;
mod async_worker;
mod balance;
mod config;
mod http;
mod listener;
mod log;
mod master;
mod rt;
mod store;
mod sys;
mod tls;
mod worker;

// The app interface.
pub use http::app::{
    blocking, box_body, empty_body, full, handler, service, text, with_route, App, AppFactory,
    AppFuture, BoxError, FullRequest, FullResponse, Handler, IntoApp, Request, Response,
    ResponseBody, Route, SharedApp,
};
pub use http::body::Body;

// The HTTP layer the workers share.
pub use http::conn::{
    policy as conn_policy, serve_http1, serve_io, ConnectionGuard, Policy, Protocol,
};
pub use http::h2::Rewind;
pub use http::instrument::Instrumented;
pub use http::limits::HeadLimits;
pub use http::run::{
    allow_blocking, catching, run_blocking, start as start_call, Failure, Inline, Runner,
};

// Workers: the trait, the shared lifecycle, the tokio edge, sockets.
pub use async_worker::{accept_retrying, supervise, take_listeners, Admission, Event, Gate, TICK};
pub use listener::{AcceptFailure, Listener, Stream, TokioListener, ACCEPT_BACKOFF};
pub use rt::idle::yield_when_idle;
pub use rt::tokio::{
    accept_loop, handshake, runtime as tokio_runtime, serve_accepted, serve_conn, serve_worker,
    worker_events, Acceptor, Conn, Ready, TlsAcceptor,
};
pub use tls::server_config as tls_server_config;
pub use worker::{Control, Worker, WorkerContext, WorkerExit};

// Settings.
pub use config::{
    check as check_setting, setting, AppMetricSettings, AppMetrics, BindAddr, Config, ConfigError,
    Flag, HostPort, Kind, LogTarget, RawSettings, Setting, TcpAddr, Value, SETTINGS, WORKER_TYPES,
};

// The app's own metrics (the `metrics` facade).
pub use app_metrics::{record_with_exemplar, AppMetricsSpec, AppRecorder};

// The metric store.
pub use store::catalogue::{Buckets, Shape, DEFAULT_DURATION_BUCKETS, SIZE_BUCKETS};
pub use store::index::OTHER;
pub use store::layout::{
    data_file_bytes, index_file_bytes, CELLS, DEFAULT_CAPACITY, MAX_FAMILIES, MAX_REJECT_REASONS,
};
pub use store::{
    trace_id_of, AppFamilyView, AppKind, AppSeries, AppSnapshot, AppStore, AppValue, ExemplarView,
    GaugeMode, GaugeSample, RejectReason,
};
pub use store::{
    unix_now_ns, ErrorKind, ExitReason, Family, Index, MasterSignal, MasterView, Recorder,
    RequestRecord, Series, Snapshot, SnapshotReader, StoreDir, WorkerFile, WorkerKind, WorkerState,
    WorkerView,
};

// The master and the logs.
pub use log::open_errorlog;
#[doc(hidden)]
pub use log::write_line;
pub use master::{run, ExporterContext, ExporterMain, MasterError, ServerSpec, WorkerSelector};
