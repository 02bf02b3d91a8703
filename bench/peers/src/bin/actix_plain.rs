//! actix-web 4, plain: `GET /` answers gpe's hello world (see the crate docs).

use std::process::ExitCode;

use actix_web::{web, App, HttpServer};
use gpe_bench_peers::actix_hello as hello;

fn main() -> ExitCode {
    gpe_bench_peers::main_with("actix-plain", |opts| {
        actix_web::rt::System::new().block_on(async move {
            HttpServer::new(|| App::new().route("/", web::get().to(hello)))
                .workers(opts.workers)
                .bind(opts.bind)?
                .run()
                .await
        })
    })
}
