//! The built-in `static` app: tower-http's [`ServeFile`] streams the file
//! (Range, Last-Modified, If-Modified-Since), and [`StaticFiles`] in front of
//! it resolves the path safely and adds what `ServeFile` does not do:
//!
//! - the path is percent-decoded, then split on `/`. A `..` component is
//!   refused with 403, and so is a file whose real location (after symlinks)
//!   is outside the root;
//! - a component starting with `.` (in the request path, or in the real path
//!   below the root) answers 404, and so does anything that is neither a
//!   regular file nor a directory (FIFOs, sockets, devices). Their type is
//!   read with `stat`; they are never opened;
//! - a directory without a trailing slash answers 301 to the slash form; with
//!   one it serves its `index.html` (under the same rules), or 404;
//! - a weak `ETag` from size and mtime; `If-None-Match` answers 304, and takes
//!   precedence over `If-Modified-Since`. An `If-Range` that does not match
//!   the file's `Last-Modified` turns a Range request into a full 200;
//! - methods other than GET and HEAD answer 405;
//! - every response carries the route `/{path}`, so the `route` label stays
//!   bounded whatever paths clients send.

use std::convert::Infallible;
use std::ffi::OsStr;
use std::fs::Metadata;
use std::future::Future;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use gpe_core::run_blocking;
use gpe_core::{box_body, full, ResponseBody};
use gpe_core::{text, BoxError, IntoApp, Request, Route, SharedApp};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use tower::{Service, ServiceExt};
use tower_http::services::ServeFile;

/// The `route` label of every response of the static app.
pub const ROUTE: &str = "/{path}";

/// `static`: serves the files under `root` (see the module docs for the
/// rules).
///
/// # Errors
/// `root` does not exist or is not a directory.
pub fn static_files(root: &Path) -> Result<SharedApp, BoxError> {
    Ok(StaticFiles::new(root)?.into_app())
}

/// The static file service: resolves a request path under the root, then
/// streams the file with tower-http's [`ServeFile`].
#[derive(Debug, Clone)]
pub struct StaticFiles {
    root: Arc<PathBuf>,
}

impl StaticFiles {
    /// A service for the files under `root`.
    ///
    /// # Errors
    /// `root` does not exist or is not a directory.
    pub fn new(root: &Path) -> Result<StaticFiles, BoxError> {
        let root = root
            .canonicalize()
            .map_err(|e| format!("setting `root`: {}: {e}", root.display()))?;
        if !root.is_dir() {
            return Err(format!("setting `root`: {} is not a directory", root.display()).into());
        }
        Ok(StaticFiles {
            root: Arc::new(root),
        })
    }
}

type HttpResponse = http::Response<ResponseBody>;

impl Service<Request> for StaticFiles {
    type Response = HttpResponse;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<HttpResponse, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let root = self.root.clone();
        Box::pin(async move {
            let mut resp = serve(root, req).await;
            resp.extensions_mut().insert(Route::new(ROUTE));
            Ok(resp)
        })
    }
}

/// What a request path names, found without opening anything.
#[derive(Debug)]
enum Lookup {
    /// A regular file under the root: its real path and metadata.
    File(PathBuf, Metadata),
    /// A directory asked for without the trailing slash.
    AddSlash,
    /// Nothing to serve.
    Refused(Refusal),
}

/// Why a path is not served.
#[derive(Debug, Clone, Copy)]
enum Refusal {
    /// Outside the root (`..`, or a symlink that leads out): 403.
    Forbidden,
    /// Missing, a dotfile, or not a regular file: 404.
    NotFound,
}

async fn serve(root: Arc<PathBuf>, req: Request) -> HttpResponse {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = full(text(StatusCode::METHOD_NOT_ALLOWED, "Method Not Allowed\n"));
        resp.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    let raw = req.uri().path().to_owned();
    let (path, meta) = match run_blocking(move || lookup(&root, &raw)).await {
        Lookup::File(path, meta) => (path, meta),
        Lookup::AddSlash => return redirect_to_slash(req.uri()),
        Lookup::Refused(Refusal::Forbidden) => {
            return full(text(StatusCode::FORBIDDEN, "Forbidden\n"))
        }
        Lookup::Refused(Refusal::NotFound) => {
            return full(text(StatusCode::NOT_FOUND, "Not Found\n"))
        }
    };
    let etag = etag(&meta);
    let last_modified = meta.modified().ok().map(httpdate::fmt_http_date);
    let (mut parts, _body) = req.into_parts();
    if parts.headers.contains_key(header::IF_NONE_MATCH) {
        if none_match_fails(&parts.headers, &etag) {
            let mut resp = http::Response::new(gpe_core::empty_body());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            set_validators(resp.headers_mut(), &etag, last_modified.as_deref());
            return resp;
        }
        // RFC 9110 13.2.2: If-None-Match is evaluated instead of
        // If-Modified-Since.
        parts.headers.remove(header::IF_MODIFIED_SINCE);
    }
    if !if_range_holds(&parts.headers, last_modified.as_deref()) {
        parts.headers.remove(header::RANGE);
    }
    let req = http::Request::from_parts(parts, ());
    let Ok(resp) = ServeFile::new(&path).oneshot(req).await;
    let mut resp = resp.map(box_body);
    if matches!(
        resp.status(),
        StatusCode::OK | StatusCode::PARTIAL_CONTENT | StatusCode::NOT_MODIFIED
    ) {
        set_validators(resp.headers_mut(), &etag, last_modified.as_deref());
    }
    resp
}

/// Resolves the request path `raw` (still percent-encoded) under `root`.
fn lookup(root: &Path, raw: &str) -> Lookup {
    let decoded: Vec<u8> = percent_encoding::percent_decode_str(raw).collect();
    let parts: Vec<&[u8]> = decoded
        .split(|b| *b == b'/')
        .filter(|p| !p.is_empty())
        .collect();
    if parts.iter().any(|p| *p == b"..") {
        return Lookup::Refused(Refusal::Forbidden);
    }
    if parts.iter().any(|p| p.starts_with(b".") || p.contains(&0)) {
        return Lookup::Refused(Refusal::NotFound);
    }
    let mut path = root.to_path_buf();
    path.extend(parts.iter().map(|p| OsStr::from_bytes(p)));
    let (real, meta) = match resolve(root, &path) {
        Ok(found) => found,
        Err(refused) => return Lookup::Refused(refused),
    };
    if meta.is_dir() {
        if !raw.ends_with('/') {
            return Lookup::AddSlash;
        }
        return match resolve(root, &real.join("index.html")) {
            Ok((index, meta)) if meta.is_file() => Lookup::File(index, meta),
            Ok(_) => Lookup::Refused(Refusal::NotFound),
            Err(refused) => Lookup::Refused(refused),
        };
    }
    if meta.is_file() {
        Lookup::File(real, meta)
    } else {
        Lookup::Refused(Refusal::NotFound)
    }
}

/// The real path of `path` (symlinks followed) and its metadata, if it lies
/// under `root` and no component of it below `root` starts with `.`.
fn resolve(root: &Path, path: &Path) -> Result<(PathBuf, Metadata), Refusal> {
    let real = path.canonicalize().map_err(|_| Refusal::NotFound)?;
    let Ok(below) = real.strip_prefix(root) else {
        return Err(Refusal::Forbidden);
    };
    if below
        .components()
        .any(|c| c.as_os_str().as_bytes().starts_with(b"."))
    {
        return Err(Refusal::NotFound);
    }
    let meta = std::fs::metadata(&real).map_err(|_| Refusal::NotFound)?;
    Ok((real, meta))
}

/// 301 to the path with a slash appended (query kept). Leading slashes are
/// collapsed to one so that `//host` cannot become a redirect off-site.
fn redirect_to_slash(uri: &http::Uri) -> HttpResponse {
    let mut location = format!("/{}/", uri.path().trim_start_matches('/'));
    if let Some(q) = uri.query() {
        location.push('?');
        location.push_str(q);
    }
    let mut resp = full(text(StatusCode::MOVED_PERMANENTLY, "Moved Permanently\n"));
    match HeaderValue::from_str(&location) {
        Ok(v) => {
            resp.headers_mut().insert(header::LOCATION, v);
            resp
        }
        Err(_) => full(text(StatusCode::BAD_REQUEST, "Bad Request\n")),
    }
}

/// The weak entity tag of a file: size and mtime (seconds and nanoseconds).
fn etag(meta: &Metadata) -> String {
    format!(
        "W/\"{:x}-{:x}.{:x}\"",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec()
    )
}

fn set_validators(headers: &mut HeaderMap, etag: &str, last_modified: Option<&str>) {
    if let Ok(v) = HeaderValue::from_str(etag) {
        headers.insert(header::ETAG, v);
    }
    if let Some(v) = last_modified.and_then(|lm| HeaderValue::from_str(lm).ok()) {
        headers.insert(header::LAST_MODIFIED, v);
    }
}

/// Whether `If-None-Match` names `etag` (weak comparison) or is `*`: the
/// condition fails and the answer is 304.
fn none_match_fails(headers: &HeaderMap, etag: &str) -> bool {
    let opaque = |t: &str| t.trim().trim_start_matches("W/").to_owned();
    let ours = opaque(etag);
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim() == "*" || opaque(t) == ours)
}

/// Whether a Range request may be answered with a part (RFC 9110 13.1.5): no
/// `If-Range`, or one that is exactly the file's `Last-Modified`. Our entity
/// tags are weak, and a weak tag never matches `If-Range`.
fn if_range_holds(headers: &HeaderMap, last_modified: Option<&str>) -> bool {
    let Some(cond) = headers.get(header::IF_RANGE) else {
        return true;
    };
    let (Ok(cond), Some(lm)) = (cond.to_str(), last_modified) else {
        return false;
    };
    match (
        httpdate::parse_http_date(cond),
        httpdate::parse_http_date(lm),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http_body_util::BodyExt;

    struct Resp {
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        route: Option<Route>,
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn call(root: &Path, method: Method, path: &str, headers: &[(&str, &str)]) -> Resp {
        let mut svc = StaticFiles::new(root).unwrap();
        let mut req = Request::new(gpe_core::Body::from(""));
        *req.method_mut() = method;
        *req.uri_mut() = path.parse().unwrap();
        for (k, v) in headers {
            req.headers_mut().append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        let rt = rt();
        let out = rt.block_on(async {
            let fut = svc.call(req);
            let resp = tokio::time::timeout(std::time::Duration::from_secs(10), fut)
                .await
                .expect("the static app answers within 10 s")
                .unwrap();
            let route = resp.extensions().get::<Route>().cloned();
            let (parts, body) = resp.into_parts();
            Resp {
                status: parts.status,
                headers: parts.headers,
                body: body.collect().await.unwrap().to_bytes(),
                route,
            }
        });
        rt.shutdown_background();
        out
    }

    fn get(root: &Path, path: &str) -> Resp {
        call(root, Method::GET, path, &[])
    }

    /// `dir/root` with `a.txt` ("inside"), `sub/b.txt`, `site/index.html`,
    /// `.env`, `.git/config`, and `dir/secret` outside the root.
    fn tree() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        std::fs::create_dir_all(root.join("site")).unwrap();
        std::fs::create_dir_all(root.join(".git")).unwrap();
        std::fs::write(root.join("a.txt"), "inside").unwrap();
        std::fs::write(root.join("sub/b.txt"), "bee").unwrap();
        std::fs::write(root.join("site/index.html"), "<p>home</p>").unwrap();
        std::fs::write(root.join(".env"), "KEY=1").unwrap();
        std::fs::write(root.join(".git/config"), "[core]").unwrap();
        std::fs::write(dir.path().join("secret"), "outside").unwrap();
        (dir, root)
    }

    #[test]
    fn serves_a_file_with_type_length_validators_and_route() {
        let (_d, root) = tree();
        let r = get(&root, "/a.txt");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_ref(), b"inside");
        assert_eq!(r.headers["content-type"], "text/plain");
        assert_eq!(r.headers["content-length"], "6");
        assert_eq!(r.headers["accept-ranges"], "bytes");
        let meta = std::fs::metadata(root.join("a.txt")).unwrap();
        assert_eq!(r.headers["etag"].to_str().unwrap(), etag(&meta));
        assert!(r.headers["etag"].to_str().unwrap().starts_with("W/\"6-"));
        assert_eq!(
            r.headers["last-modified"].to_str().unwrap(),
            httpdate::fmt_http_date(meta.modified().unwrap())
        );
        assert_eq!(r.route, Some(Route::new(ROUTE)));
        let r = get(&root, "/sub/b.txt");
        assert_eq!(r.body.as_ref(), b"bee");
        // Percent-encoded names are decoded.
        assert_eq!(get(&root, "/%61.txt").body.as_ref(), b"inside");
        assert_eq!(get(&root, "/sub%2fb.txt").body.as_ref(), b"bee");
    }

    #[test]
    fn head_answers_the_length_without_a_body() {
        let (_d, root) = tree();
        let r = call(&root, Method::HEAD, "/a.txt", &[]);
        assert_eq!(r.status, 200);
        assert_eq!(r.headers["content-length"], "6");
        assert!(r.body.is_empty());
        assert!(r.headers.contains_key("etag"));
    }

    #[test]
    fn traversal_is_refused_with_403() {
        let (dir, root) = tree();
        std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
        std::os::unix::fs::symlink(dir.path(), root.join("up")).unwrap();
        for path in [
            "/../secret",
            "/%2e%2e/secret",
            "/%2E%2E/secret",
            "/sub/%2e%2e/%2e%2e/secret",
            "/a/%2e%2e/%2e%2e/secret",
            "/..%2fsecret",
            "/%2e%2e%2fsecret",
            "/sub%2f..%2f..%2fsecret",
            "/link",
            "/up/secret",
        ] {
            let r = get(&root, path);
            assert_eq!(r.status, 403, "{path}");
            assert_eq!(r.body.as_ref(), b"Forbidden\n", "{path}");
            assert_eq!(r.route, Some(Route::new(ROUTE)), "{path}");
        }
        // A symlink whose real location is inside the root is followed.
        std::os::unix::fs::symlink(root.join("a.txt"), root.join("alias")).unwrap();
        assert_eq!(get(&root, "/alias").body.as_ref(), b"inside");
        assert_eq!(get(&root, "/up/root/a.txt").body.as_ref(), b"inside");
    }

    #[test]
    fn dotfiles_are_not_found() {
        let (_d, root) = tree();
        for path in ["/.env", "/%2eenv", "/.git/config", "/.git/", "/sub/./b.txt"] {
            let r = get(&root, path);
            assert_eq!(r.status, 404, "{path}");
            assert_eq!(r.body.as_ref(), b"Not Found\n", "{path}");
        }
        // Nor through a symlink inside the root.
        std::os::unix::fs::symlink(root.join(".env"), root.join("env")).unwrap();
        assert_eq!(get(&root, "/env").status, 404);
        assert_eq!(get(&root, "/missing").status, 404);
        assert_eq!(get(&root, "/a%00.txt").status, 404);
    }

    #[test]
    fn a_fifo_is_not_found_and_never_opened() {
        let (_d, root) = tree();
        let fifo = root.join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        // Opening a FIFO without a writer blocks: `call` would time out.
        assert_eq!(get(&root, "/pipe").status, 404);
        assert_eq!(call(&root, Method::HEAD, "/pipe", &[]).status, 404);
        // Nor as a directory index.
        std::fs::create_dir(root.join("p")).unwrap();
        nix::unistd::mkfifo(
            &root.join("p/index.html"),
            nix::sys::stat::Mode::from_bits_truncate(0o600),
        )
        .unwrap();
        assert_eq!(get(&root, "/p/").status, 404);
    }

    #[test]
    fn directories_redirect_to_the_slash_form_and_serve_their_index() {
        let (_d, root) = tree();
        let r = get(&root, "/site");
        assert_eq!(r.status, 301);
        assert_eq!(r.headers["location"], "/site/");
        assert_eq!(r.route, Some(Route::new(ROUTE)));
        let r = get(&root, "/site?x=1");
        assert_eq!(r.headers["location"], "/site/?x=1");
        assert_eq!(get(&root, "//site").headers["location"], "/site/");
        let r = get(&root, "/site/");
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_ref(), b"<p>home</p>");
        assert_eq!(r.headers["content-type"], "text/html");
        assert_eq!(get(&root, "/sub/").status, 404);
        assert_eq!(get(&root, "/").status, 404);
    }

    #[test]
    fn etag_and_last_modified_give_304() {
        let (_d, root) = tree();
        let first = get(&root, "/a.txt");
        let tag = first.headers["etag"].to_str().unwrap().to_owned();
        let lm = first.headers["last-modified"].to_str().unwrap().to_owned();
        for inm in [tag.as_str(), &tag[2..], "\"x\", W/\"y\"", "*"] {
            let r = call(&root, Method::GET, "/a.txt", &[("if-none-match", inm)]);
            let want = if inm.starts_with("\"x\"") { 200 } else { 304 };
            assert_eq!(r.status, want, "{inm}");
        }
        let r = call(&root, Method::GET, "/a.txt", &[("if-none-match", &tag)]);
        assert!(r.body.is_empty());
        assert_eq!(r.headers["etag"].to_str().unwrap(), tag);
        assert_eq!(r.headers["last-modified"].to_str().unwrap(), lm);
        assert_eq!(r.route, Some(Route::new(ROUTE)));
        let r = call(&root, Method::HEAD, "/a.txt", &[("if-none-match", &tag)]);
        assert_eq!(r.status, 304);
        // Last-Modified works on its own ...
        let r = call(&root, Method::GET, "/a.txt", &[("if-modified-since", &lm)]);
        assert_eq!(r.status, 304);
        assert_eq!(r.headers["etag"].to_str().unwrap(), tag);
        // ... but a failing If-None-Match takes precedence over it.
        let r = call(
            &root,
            Method::GET,
            "/a.txt",
            &[("if-none-match", "\"other\""), ("if-modified-since", &lm)],
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_ref(), b"inside");
        // Changing the file changes the tag.
        std::fs::write(root.join("a.txt"), "changed!").unwrap();
        let r = call(&root, Method::GET, "/a.txt", &[("if-none-match", &tag)]);
        assert_eq!(r.status, 200);
        assert_eq!(r.body.as_ref(), b"changed!");
    }

    #[test]
    fn range_gets_206_with_exact_bytes() {
        let (_d, root) = tree();
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        std::fs::write(root.join("data.bin"), &data).unwrap();
        let r = call(&root, Method::GET, "/data.bin", &[("range", "bytes=0-9")]);
        assert_eq!(r.status, 206);
        assert_eq!(r.body.as_ref(), &data[..10]);
        assert_eq!(r.headers["content-length"], "10");
        assert_eq!(r.headers["content-range"], "bytes 0-9/10000");
        assert!(r.headers.contains_key("etag"));
        let r = call(&root, Method::GET, "/data.bin", &[("range", "bytes=9990-")]);
        assert_eq!(r.status, 206);
        assert_eq!(r.body.as_ref(), &data[9990..]);
        let r = call(&root, Method::GET, "/data.bin", &[("range", "bytes=-3")]);
        assert_eq!(r.body.as_ref(), &data[9997..]);
        let r = call(
            &root,
            Method::GET,
            "/data.bin",
            &[("range", "bytes=20000-")],
        );
        assert_eq!(r.status, 416);
        assert_eq!(r.headers["content-range"], "bytes */10000");
        // If-Range: the file's Last-Modified keeps the range; anything else
        // (a weak tag, another date) answers the whole file.
        let lm = get(&root, "/data.bin").headers["last-modified"]
            .to_str()
            .unwrap()
            .to_owned();
        let tag = get(&root, "/data.bin").headers["etag"]
            .to_str()
            .unwrap()
            .to_owned();
        let ranged = |cond: &str| {
            call(
                &root,
                Method::GET,
                "/data.bin",
                &[("range", "bytes=0-9"), ("if-range", cond)],
            )
        };
        assert_eq!(ranged(&lm).status, 206);
        let r = ranged(&tag);
        assert_eq!(r.status, 200);
        assert_eq!(r.body.len(), 10_000);
        assert_eq!(ranged("Thu, 01 Jan 1970 00:00:00 GMT").status, 200);
    }

    #[test]
    fn other_methods_get_405() {
        let (_d, root) = tree();
        let r = call(&root, Method::POST, "/a.txt", &[]);
        assert_eq!(r.status, 405);
        assert_eq!(r.headers["allow"], "GET, HEAD");
        assert_eq!(r.route, Some(Route::new(ROUTE)));
    }

    #[test]
    fn the_root_must_be_a_directory() {
        let (dir, root) = tree();
        assert!(StaticFiles::new(&dir.path().join("nope")).is_err());
        assert!(StaticFiles::new(&root.join("a.txt")).is_err());
    }
}
