//! actix-web 4 with actix-web-prom: gpe's hello world at `GET /`, the
//! middleware's metrics at `GET /metrics` (see the crate docs).

use std::process::ExitCode;

use actix_web::http::header;
use actix_web::{web, App, HttpResponse, HttpServer};
use actix_web_prom::PrometheusMetricsBuilder;
use gpe_bench_peers::{parse, CONTENT_TYPE, HELLO};

async fn hello() -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, CONTENT_TYPE))
        .insert_header((header::SERVER, "actix"))
        .body(HELLO)
}

fn main() -> ExitCode {
    let opts = match parse("actix-prom") {
        Ok(o) => o,
        Err(e) => {
            eprintln!("actix-prom: {e}");
            return ExitCode::from(2);
        }
    };
    let prometheus = match PrometheusMetricsBuilder::new("actix")
        .endpoint("/metrics")
        .build()
    {
        Ok(p) => p,
        Err(e) => {
            eprintln!("actix-prom: metrics: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = actix_web::rt::System::new().block_on(async move {
        HttpServer::new(move || {
            App::new()
                .wrap(prometheus.clone())
                .route("/", web::get().to(hello))
        })
        .workers(opts.workers)
        .bind(opts.bind)?
        .run()
        .await
    });
    match run {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("actix-prom: {e}");
            ExitCode::FAILURE
        }
    }
}
