//! actix-web 4 with actix-web-prom: gpe's hello world at `GET /`, the
//! middleware's metrics at `GET /metrics` (see the crate docs).

use std::process::ExitCode;

use actix_web::{web, App, HttpServer};
use actix_web_prom::PrometheusMetricsBuilder;
use gpe_bench_peers::actix_hello as hello;

fn main() -> ExitCode {
    gpe_bench_peers::main_with("actix-prom", |opts| {
        let prometheus = PrometheusMetricsBuilder::new("actix")
            .endpoint("/metrics")
            .build()
            .map_err(|e| std::io::Error::other(format!("metrics: {e}")))?;
        actix_web::rt::System::new().block_on(async move {
            HttpServer::new(move || {
                App::new()
                    .wrap(prometheus.clone())
                    .route("/", web::get().to(hello))
            })
            .workers(opts.workers)
            .bind(opts.bind)?
            .run()
            .await
        })
    })
}
