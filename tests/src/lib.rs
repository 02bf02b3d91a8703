//! Test harness for black-box tests: starts the real `gpe` / `gpe-testapp`
//! binaries on loopback ports, talks HTTP/1.1 to them over raw sockets, parses
//! their `/metrics`, sends signals, and kills whatever it started on drop.
//! One module per job; this file only re-exports them.
#![allow(missing_docs, clippy::unwrap_used)]

mod apps;
mod http;
mod load;
mod metrics;
mod procs;
mod server;
mod wait;
mod workers;

pub use apps::{
    axum_app_bin, connect, download, example_bin, read_body, read_sse, upload, wait_sum,
    RssSampler, SseEvent, ASYNC_WORKERS, MIB,
};
pub use http::{get, http, read_head, Head, KeepAlive, Resp};
pub use load::{parallel, Load};
pub use metrics::{promtool_check, Metrics};
pub use procs::{alive, signal_child, statm_rss, threads_of, wait_child, Process};
pub use server::{free_port, Opts, Server};
pub use wait::wait_until;
pub use workers::WORKERS;
