//! The built-in apps of `gpe serve --app`: `hello`, `echo` and `static`.

use std::path::PathBuf;
use std::sync::Arc;

use gpe_core::{
    handler, text, with_route, AppFactory, FullRequest as Request, FullResponse as Response,
    IntoApp, SharedApp,
};
use http::{header, HeaderValue, Method, StatusCode};

mod static_files;

pub use static_files::{static_files, StaticFiles};

/// `hello`: `GET /` answers `Hello, World!`; other paths 404. It never
/// blocks, so it is an async handler: every worker type runs it on its IO
/// thread without a hand-off.
pub fn hello() -> SharedApp {
    handler(|req: Request| std::future::ready(say_hello(&req))).into_app()
}

fn say_hello(req: &Request) -> Response {
    if req.uri().path() != "/" {
        return text(StatusCode::NOT_FOUND, "Not Found\n");
    }
    let resp = match *req.method() {
        Method::GET | Method::HEAD => text(StatusCode::OK, "Hello, World!"),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n"),
    };
    with_route(resp, "/")
}

/// `echo`: answers any method on any path with the request body (an async
/// handler, like `hello`).
pub fn echo() -> SharedApp {
    handler(|req: Request| std::future::ready(echo_body(req))).into_app()
}

fn echo_body(req: Request) -> Response {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .cloned()
        .unwrap_or(HeaderValue::from_static("application/octet-stream"));
    let mut resp = Response::new(req.into_body());
    resp.headers_mut().insert(header::CONTENT_TYPE, ctype);
    with_route(resp, "/{path}")
}

/// The factory for built-in app `name` (`root` for `static`).
///
/// # Errors
/// Unknown app name, or `static` without `--root`.
pub fn factory(name: &str, root: Option<PathBuf>) -> Result<AppFactory, String> {
    match name {
        "hello" => Ok(Arc::new(|| Ok(hello()))),
        "echo" => Ok(Arc::new(|| Ok(echo()))),
        "static" => {
            let root = root.ok_or("setting `app`: `static` needs --root DIR")?;
            Ok(Arc::new(move || static_files(&root)))
        }
        other => Err(format!(
            "invalid value {other:?} for setting `app`: expected hello, echo or static"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(app: &SharedApp, method: Method, path: &str, body: &'static str) -> Response {
        use gpe_core::Runner;
        use http_body_util::BodyExt;
        let mut req = gpe_core::Request::new(body.into());
        *req.method_mut() = method;
        *req.uri_mut() = path.parse().unwrap();
        let resp = futures_executor::block_on(gpe_core::Inline.run(app, req)).unwrap();
        let (parts, body) = resp.into_parts();
        let body = futures_executor::block_on(body.collect())
            .unwrap()
            .to_bytes();
        Response::from_parts(parts, body)
    }

    #[test]
    fn hello_and_echo() {
        let h = hello();
        let r = call(&h, Method::GET, "/", "");
        assert_eq!(r.status(), 200);
        assert_eq!(r.body().as_ref(), b"Hello, World!");
        assert_eq!(call(&h, Method::GET, "/x", "").status(), 404);
        assert_eq!(call(&h, Method::POST, "/", "").status(), 405);
        let e = echo();
        assert_eq!(
            call(&e, Method::PUT, "/a/b", "payload").body().as_ref(),
            b"payload"
        );
    }
}
