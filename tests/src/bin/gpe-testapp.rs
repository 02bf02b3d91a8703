//! gpe-testapp: a controllable app built on the gpe library, taking the same
//! command line as `gpe serve`. Routes:
//!
//! - `/` answers `ok`;
//! - `/sleep/{ms}` blocks for `ms` milliseconds (where blocking is allowed),
//!   then answers `slept`;
//! - `/spin/{ms}` blocks its thread for `ms` milliseconds inside the async
//!   handler (so it stalls an event loop), then answers `spun`;
//! - `/status/{code}` answers with that status;
//! - `/panic` panics (gpe answers 500);
//! - `/any/...` answers `any` and names no route;
//! - `/bytes/{n}` answers `n` bytes;
//! - `/hold/{mib}` allocates `mib` MiB (at most 1024), writes every page so
//!   that it is resident, and keeps it for the life of the worker process;
//! - `/order/{kind}/{value}` counts `app_orders_total{kind}` and observes
//!   `value` in the histogram `app_order_value` (with the request's
//!   `traceparent` trace id as its exemplar when it has one);
//! - `/gauge/{name}/set/{v}` and `/gauge/{name}/inc/{v}` set or raise the
//!   gauge `app_level_{name}` of the worker that serves it;
//! - `/user/{id}` counts `app_users_total{user}` (one label set per id);
//! - `/refuse/{what}` records a metric gpe refuses: `bad_name`, `gpe`
//!   (a `gpe_` name) or `clash` (a gauge named like the counter
//!   `app_orders_total`); answers `recorded`;
//! - anything else answers 404.
//!
//! With `TESTAPP_BOOT_FAIL=1` the app factory fails, for boot-error tests;
//! with `TESTAPP_BOOT_DELAY_MS=N` it first sleeps N ms (at most 60 s), for
//! tests of booting.

use std::process::ExitCode;
use std::time::Duration;

use gpe::{
    handler, text, with_route, FullRequest as Request, FullResponse as Response, StatusCode,
};

fn route(req: Request) -> Response {
    let path = req.uri().path().to_owned();
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    match (parts.next(), parts.next()) {
        (Some(""), None) => with_route(text(StatusCode::OK, "ok"), "/"),
        (Some("sleep"), Some(ms)) => match ms.parse::<u64>() {
            Ok(ms) if ms <= 60_000 => {
                std::thread::sleep(Duration::from_millis(ms));
                with_route(text(StatusCode::OK, "slept"), "/sleep/{ms}")
            }
            _ => with_route(text(StatusCode::BAD_REQUEST, "bad ms"), "/sleep/{ms}"),
        },
        (Some("status"), Some(code)) => {
            let status = code
                .parse::<u16>()
                .ok()
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::BAD_REQUEST);
            with_route(text(status, status.as_str().to_owned()), "/status/{code}")
        }
        (Some("panic"), None) => panic!("gpe-testapp: /panic was requested"),
        // Names no route: with `unmatched_route = path` each path is a label set.
        (Some("any"), Some(_)) => text(StatusCode::OK, "any"),
        (Some("bytes"), Some(n)) => match n.parse::<usize>() {
            Ok(n) if n <= 64 << 20 => with_route(text(StatusCode::OK, vec![b'x'; n]), "/bytes/{n}"),
            _ => with_route(text(StatusCode::BAD_REQUEST, "bad n"), "/bytes/{n}"),
        },
        (Some("hold"), Some(mib)) => match mib.parse::<usize>() {
            Ok(mib) if mib <= 1024 => {
                hold(mib);
                with_route(text(StatusCode::OK, "held"), "/hold/{mib}")
            }
            _ => with_route(text(StatusCode::BAD_REQUEST, "bad mib"), "/hold/{mib}"),
        },
        (Some("order"), Some(rest)) => order(&req, rest),
        (Some("gauge"), Some(rest)) => gauge(rest),
        (Some("user"), Some(id)) => {
            gpe::counter!("app_users_total", "user" => id.to_owned()).increment(1);
            with_route(text(StatusCode::OK, "counted"), "/user/{id}")
        }
        (Some("refuse"), Some(what)) => {
            match what {
                "bad_name" => gpe::counter!("app-bad-name").increment(1),
                "gpe" => gpe::counter!("gpe_app_total").increment(1),
                "clash" => gpe::gauge!("app_orders").set(1.0),
                _ => return with_route(text(StatusCode::BAD_REQUEST, "what?"), "/refuse/{what}"),
            }
            with_route(text(StatusCode::OK, "recorded"), "/refuse/{what}")
        }
        _ => text(StatusCode::NOT_FOUND, "not found"),
    }
}

/// `/order/{kind}/{value}`.
fn order(req: &Request, rest: &str) -> Response {
    let Some((kind, value)) = rest.split_once('/') else {
        return with_route(
            text(StatusCode::BAD_REQUEST, "bad order"),
            "/order/{kind}/{value}",
        );
    };
    let Ok(value) = value.parse::<f64>() else {
        return with_route(
            text(StatusCode::BAD_REQUEST, "bad value"),
            "/order/{kind}/{value}",
        );
    };
    gpe::counter!("app_orders_total", "kind" => kind.to_owned()).increment(1);
    let trace = req
        .headers()
        .get("traceparent")
        .and_then(|v| gpe::trace_id_of(v.as_bytes()));
    match trace {
        Some(t) => {
            gpe::record_with_exemplar(&gpe::metrics::Key::from_name("app_order_value"), value, t)
        }
        None => gpe::histogram!("app_order_value").record(value),
    }
    with_route(text(StatusCode::OK, "ordered"), "/order/{kind}/{value}")
}

/// `/gauge/{name}/{set|inc}/{value}`.
fn gauge(rest: &str) -> Response {
    let mut parts = rest.splitn(3, '/');
    let (Some(name), Some(op), Some(Ok(v))) = (
        parts.next(),
        parts.next(),
        parts.next().map(str::parse::<f64>),
    ) else {
        return with_route(
            text(StatusCode::BAD_REQUEST, "bad gauge"),
            "/gauge/{name}/{op}/{v}",
        );
    };
    let g = gpe::gauge!(format!("app_level_{name}"));
    match op {
        "set" => g.set(v),
        "inc" => g.increment(v),
        _ => {
            return with_route(
                text(StatusCode::BAD_REQUEST, "bad op"),
                "/gauge/{name}/{op}/{v}",
            )
        }
    }
    with_route(text(StatusCode::OK, "gauged"), "/gauge/{name}/{op}/{v}")
}

/// Memory that `/hold/{mib}` keeps for the life of the process.
static HELD: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());

/// Allocates `mib` MiB with every byte written (so every page is resident)
/// and keeps it in [`HELD`].
fn hold(mib: usize) {
    let block = vec![0xa5u8; mib << 20];
    HELD.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(block);
}

fn main() -> ExitCode {
    gpe::serve(|| {
        if std::env::var_os("TESTAPP_BOOT_FAIL").is_some() {
            return Err("TESTAPP_BOOT_FAIL is set".into());
        }
        if let Some(ms) = std::env::var("TESTAPP_BOOT_DELAY_MS")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            std::thread::sleep(Duration::from_millis(ms.min(60_000)));
        }
        gpe::describe_counter!("app_orders_total", "Orders the testapp took, by kind");
        gpe::describe_histogram!("app_order_value", "Value of each order");
        Ok(handler(|req: Request| async move {
            match req
                .uri()
                .path()
                .strip_prefix("/spin/")
                .map(str::parse::<u64>)
            {
                Some(Ok(ms)) if ms <= 60_000 => {
                    std::thread::sleep(Duration::from_millis(ms));
                    with_route(text(StatusCode::OK, "spun"), "/spin/{ms}")
                }
                Some(_) => with_route(text(StatusCode::BAD_REQUEST, "bad ms"), "/spin/{ms}"),
                None => gpe_core::run_blocking(move || route(req)).await,
            }
        }))
    })
}
