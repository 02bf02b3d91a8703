//! Benchmark peers for gpe (`bench/run.sh`): the servers a Rust user would
//! pick instead, each answering `GET /` with the same 13-byte
//! `Hello, World!` and `content-type: text/plain; charset=utf-8` as gpe's
//! built-in `hello` app (plus the `server` and `date` headers every one of
//! them sends), loaded exactly like gpe:
//!
//! - `actix-plain`, `actix-prom`: actix-web 4 with 2 workers (one
//!   single-threaded runtime per worker thread), plain and wrapped in
//!   actix-web-prom (metrics at `/metrics`);
//! - `axum-plain`, `axum-prom`: axum 0.8 on a 2-thread tokio runtime, plain
//!   and with axum-prometheus' default layer and a `/metrics` route.
//!
//! ```text
//! BIN [--bind ADDR] [--workers N]
//! ```

use std::net::SocketAddr;
use std::process::ExitCode;

/// The body of every peer's `GET /`.
pub const HELLO: &str = "Hello, World!";

/// The content type of every peer's `GET /` (gpe's `hello` app sends the same).
pub const CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// Command-line options shared by the peers.
#[derive(Debug, Clone)]
pub struct Opts {
    /// Where to listen (`--bind`, default `127.0.0.1:8000`).
    pub bind: SocketAddr,
    /// Worker threads (`--workers`, default 2).
    pub workers: usize,
}

/// Parses `--bind ADDR` and `--workers N` from the process arguments.
///
/// # Errors
/// An unknown argument, a missing value, an address that does not parse or
/// a worker count below 1.
pub fn parse(name: &str) -> Result<Opts, String> {
    parse_from(name, std::env::args().skip(1))
}

fn parse_from(name: &str, args: impl IntoIterator<Item = String>) -> Result<Opts, String> {
    let mut opts = Opts {
        bind: SocketAddr::from(([127, 0, 0, 1], 8000)),
        workers: 2,
    };
    let mut args = args.into_iter();
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bind" => {
                let v = args.next().ok_or("--bind needs HOST:PORT")?;
                opts.bind = v.parse().map_err(|e| format!("--bind {v}: {e}"))?;
            }
            "--workers" | "-w" => {
                let v = args.next().ok_or("--workers needs N")?;
                opts.workers = v
                    .parse()
                    .ok()
                    .filter(|n| *n >= 1)
                    .ok_or(format!("--workers {v}: expected an integer >= 1"))?;
            }
            "-h" | "--help" => {
                println!("usage: {name} [--bind ADDR] [--workers N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

/// The `main` of every peer: parses the options (exit code 2 on a bad
/// one), runs `serve` with them, and reports its error (exit code 1).
pub fn main_with(name: &str, serve: impl FnOnce(Opts) -> std::io::Result<()>) -> ExitCode {
    let opts = match parse(name) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{name}: {e}");
            return ExitCode::from(2);
        }
    };
    match serve(opts) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The axum peers' runtime: multi-threaded, with `workers` threads.
///
/// # Errors
/// The runtime cannot be built.
pub fn tokio_runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

/// The actix peers' `GET /`.
pub async fn actix_hello() -> actix_web::HttpResponse {
    use actix_web::http::header;
    actix_web::HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, CONTENT_TYPE))
        .insert_header((header::SERVER, "actix"))
        .body(HELLO)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn defaults_and_flags() {
        let o = parse_from("t", args(&[])).unwrap();
        assert_eq!((o.bind.port(), o.workers), (8000, 2));
        let o = parse_from("t", args(&["--bind", "127.0.0.1:9", "-w", "3"])).unwrap();
        assert_eq!((o.bind.port(), o.workers), (9, 3));
        assert!(parse_from("t", args(&["--workers", "0"])).is_err());
        assert!(parse_from("t", args(&["--bind", "x"])).is_err());
        assert!(parse_from("t", args(&["--nope"])).is_err());
    }
}
