//! axum 0.8 on a 2-thread tokio runtime, plain: `GET /` answers gpe's hello
//! world (see the crate docs).

use std::process::ExitCode;

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use gpe_bench_peers::{Opts, CONTENT_TYPE, HELLO};

async fn hello() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, CONTENT_TYPE),
            (header::SERVER, "axum"),
        ],
        HELLO,
    )
}

async fn serve(opts: Opts) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let listener = tokio::net::TcpListener::bind(opts.bind).await?;
    // Nagle off, as gpe and the ceiling have it.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, Router::new().route("/", get(hello))).await
}

fn main() -> ExitCode {
    gpe_bench_peers::main_with("axum-plain", |opts| {
        gpe_bench_peers::tokio_runtime(opts.workers)?.block_on(serve(opts))
    })
}
