//! The built-in apps of `gpe serve --app`: `hello`, `echo` and `static`.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use gpe_core::{
    blocking, handler, text, with_route, AppFactory, BoxError, FullRequest as Request,
    FullResponse as Response, IntoApp, SharedApp,
};
use http::{header, HeaderValue, Method, StatusCode};

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

/// `static`: serves files under `root`. Paths with `..`, and files whose real
/// location (after symlinks) is outside `root`, are refused with 403.
///
/// # Errors
/// `root` does not exist or is not a directory.
pub fn static_files(root: &Path) -> Result<SharedApp, BoxError> {
    let root = root
        .canonicalize()
        .map_err(|e| format!("setting `root`: {}: {e}", root.display()))?;
    if !root.is_dir() {
        return Err(format!("setting `root`: {} is not a directory", root.display()).into());
    }
    let root = Arc::new(root);
    Ok(blocking(move |req: Request| serve_file(&root, &req)).into_app())
}

fn serve_file(root: &Path, req: &Request) -> Response {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n");
    }
    let rel = PathBuf::from(req.uri().path().trim_start_matches('/'));
    if rel.components().any(|c| !matches!(c, Component::Normal(_))) {
        return text(StatusCode::FORBIDDEN, "Forbidden\n");
    }
    let mut path = root.join(&rel);
    if path.is_dir() {
        path.push("index.html");
    }
    let real = match path.canonicalize() {
        Ok(p) => p,
        Err(_) => return text(StatusCode::NOT_FOUND, "Not Found\n"),
    };
    if !real.starts_with(root) {
        return text(StatusCode::FORBIDDEN, "Forbidden\n");
    }
    match std::fs::read(&real) {
        Ok(body) => {
            let mut resp = Response::new(Bytes::from(body));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(content_type(&real)),
            );
            resp
        }
        Err(_) => text(StatusCode::NOT_FOUND, "Not Found\n"),
    }
}

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" | "htm" => "text/html; charset=utf-8",
        "css" => "text/css",
        "js" => "text/javascript",
        "json" => "application/json",
        "txt" => "text/plain; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
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

    #[test]
    fn static_refuses_escapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::write(root.join("a.txt"), "inside").unwrap();
        std::fs::write(dir.path().join("secret"), "outside").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        let app = static_files(&root).unwrap();
        let r = call(&app, Method::GET, "/a.txt", "");
        assert_eq!(r.status(), 200);
        assert_eq!(r.body().as_ref(), b"inside");
        assert_eq!(call(&app, Method::GET, "/../secret", "").status(), 403);
        assert_eq!(call(&app, Method::GET, "/link", "").status(), 403);
        assert_eq!(call(&app, Method::GET, "/missing", "").status(), 404);
        assert!(static_files(&dir.path().join("nope")).is_err());
    }
}
