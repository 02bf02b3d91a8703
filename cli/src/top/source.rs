//! Where `gpe top` reads its figures: a `/metrics` URL (plain HTTP, with
//! basic-auth credentials taken from the URL's userinfo) or a metrics
//! directory read directly through the exporter's own collect-and-render
//! path, so both give the same text exposition.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use gpe_core::StoreDir;
use http::{header, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;

/// The largest exposition `gpe top` reads from a URL.
const MAX_BODY: usize = 64 << 20;

/// The default source.
pub const DEFAULT_URL: &str = "http://127.0.0.1:9091/metrics";

/// A `/metrics` URL.
#[derive(Debug, Clone)]
pub struct UrlSource {
    /// `host:port` to connect to.
    addr: String,
    /// The `Host` header (the authority without userinfo).
    host: String,
    /// Path and query.
    target: String,
    /// `Basic ...` when the URL carries credentials.
    authorization: Option<String>,
    /// The URL as shown on screen, its password left out.
    shown: String,
}

/// What `gpe top` watches.
#[derive(Debug, Clone)]
pub enum Source {
    /// A `/metrics` URL.
    Url(UrlSource),
    /// A metrics directory, read directly.
    Dir(PathBuf),
}

impl Source {
    /// Reads the command-line argument: an `http://` or `https://` URL, or a
    /// directory path.
    ///
    /// # Errors
    /// A URL that cannot be parsed, or an `https` one (not supported).
    pub fn parse(arg: &str) -> Result<Source, String> {
        if arg.starts_with("https://") {
            return Err(format!(
                "{arg}: https is not supported by gpe top; give an http:// URL or the metrics directory"
            ));
        }
        if !arg.starts_with("http://") {
            return Ok(Source::Dir(PathBuf::from(arg)));
        }
        let uri: Uri = arg
            .parse()
            .map_err(|e| format!("{arg}: not a valid URL: {e}"))?;
        let authority = uri
            .authority()
            .ok_or_else(|| format!("{arg}: the URL has no host"))?;
        let (userinfo, hostport) = match authority.as_str().rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, authority.as_str()),
        };
        if authority.host().is_empty() {
            return Err(format!("{arg}: the URL has no host"));
        }
        let port = authority.port_u16().unwrap_or(80);
        let host = authority.host();
        let addr = format!("{host}:{port}");
        let target = uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
        let authorization = userinfo.map(|u| {
            let (user, pass) = u.split_once(':').unwrap_or((u, ""));
            let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
            let pair = format!("{}:{}", decode(user), decode(pass));
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair)
            )
        });
        let shown = match userinfo {
            Some(u) => {
                let user = u.split_once(':').map_or(u, |(user, _)| user);
                format!("http://{user}@{hostport}{target}")
            }
            None => format!("http://{hostport}{target}"),
        };
        Ok(Source::Url(UrlSource {
            addr,
            host: hostport.to_owned(),
            target,
            authorization,
            shown,
        }))
    }

    /// The source as shown on screen (a URL without its password).
    pub fn shown(&self) -> String {
        match self {
            Source::Url(u) => u.shown.clone(),
            Source::Dir(d) => d.display().to_string(),
        }
    }
}

/// Reads a [`Source`], again and again, each read bounded by a timeout.
pub struct Fetcher {
    source: Source,
    rt: tokio::runtime::Runtime,
    timeout: Duration,
}

impl Fetcher {
    /// A fetcher for `source` whose reads of a URL give up after `timeout`.
    ///
    /// # Errors
    /// The runtime for the HTTP client cannot be built.
    pub fn new(source: Source, timeout: Duration) -> std::io::Result<Fetcher> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Fetcher {
            source,
            rt,
            timeout,
        })
    }

    /// One exposition in the text format, or a message saying why not.
    pub fn fetch(&self) -> Result<String, String> {
        match &self.source {
            Source::Url(u) => {
                let shown = &u.shown;
                let read = async { tokio::time::timeout(self.timeout, get(u)).await };
                match self.rt.block_on(read) {
                    Ok(r) => r.map_err(|e| format!("{shown}: {e}")),
                    Err(_) => Err(format!(
                        "{shown}: no answer within {} s",
                        self.timeout.as_secs_f64()
                    )),
                }
            }
            Source::Dir(dir) => read_dir(dir),
        }
    }
}

/// The request `gpe top` sends to a URL source.
fn request(u: &UrlSource) -> Result<Request<Empty<Bytes>>, String> {
    let mut req = Request::get(u.target.as_str())
        .header(header::HOST, u.host.as_str())
        .header(header::ACCEPT, "text/plain; version=0.0.4")
        .header(
            header::USER_AGENT,
            concat!("gpe-top/", env!("CARGO_PKG_VERSION")),
        );
    if let Some(a) = &u.authorization {
        let v = HeaderValue::from_str(a).map_err(|e| format!("bad credentials: {e}"))?;
        req = req.header(header::AUTHORIZATION, v);
    }
    req.body(Empty::new()).map_err(|e| e.to_string())
}

async fn get(u: &UrlSource) -> Result<String, String> {
    let req = request(u)?;
    let stream = tokio::net::TcpStream::connect(&u.addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let resp = sender.send_request(req).await.map_err(|e| e.to_string());
    let out = async {
        let resp = resp?;
        let status = resp.status();
        let body = Limited::new(resp.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| format!("reading the answer: {e}"))?
            .to_bytes();
        let text = String::from_utf8_lossy(&body).into_owned();
        if status != StatusCode::OK {
            let first = text.lines().next().unwrap_or("").trim();
            return Err(format!("answered {status}: {first}"));
        }
        Ok(text)
    }
    .await;
    conn.abort();
    out
}

fn read_dir(dir: &std::path::Path) -> Result<String, String> {
    let shown = dir.display();
    if !dir.is_dir() {
        return Err(format!("{shown}: no such directory"));
    }
    let store = StoreDir::new(dir);
    if !store.index_path().exists() {
        return Err(format!(
            "{shown} holds no gpe store (no server has written it yet)"
        ));
    }
    let scrape = gpe_exporter::render::Scrape::collect(&store)
        .map_err(|e| format!("{shown}: store unreadable: {e}"))?;
    gpe_exporter::render(scrape, gpe_exporter::Format::Text004).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> UrlSource {
        match Source::parse(s).unwrap() {
            Source::Url(u) => u,
            Source::Dir(d) => panic!("{} read as a directory", d.display()),
        }
    }

    #[test]
    fn a_url_gives_address_target_and_no_credentials() {
        let u = url("http://127.0.0.1:9091/metrics");
        assert_eq!(u.addr, "127.0.0.1:9091");
        assert_eq!(u.host, "127.0.0.1:9091");
        assert_eq!(u.target, "/metrics");
        assert_eq!(u.authorization, None);
        let r = request(&u).unwrap();
        assert!(r.headers().get(header::AUTHORIZATION).is_none());
        assert_eq!(url("http://localhost").addr, "localhost:80");
        assert_eq!(url("http://localhost").target, "/");
    }

    #[test]
    fn userinfo_becomes_basic_auth_and_is_not_shown() {
        // "user:p@ss word" in base64.
        let u = url("http://user:p%40ss%20word@127.0.0.1:9091/m?x=1");
        assert_eq!(
            u.authorization.as_deref(),
            Some("Basic dXNlcjpwQHNzIHdvcmQ=")
        );
        assert_eq!(u.host, "127.0.0.1:9091");
        assert_eq!(u.target, "/m?x=1");
        assert_eq!(u.shown, "http://user@127.0.0.1:9091/m?x=1");
        let r = request(&u).unwrap();
        assert_eq!(
            r.headers()[header::AUTHORIZATION],
            "Basic dXNlcjpwQHNzIHdvcmQ="
        );
        assert_eq!(r.headers()[header::HOST], "127.0.0.1:9091");
    }

    #[test]
    fn https_and_bad_urls_are_refused_and_paths_are_directories() {
        assert!(Source::parse("https://x/metrics")
            .unwrap_err()
            .contains("https is not supported"));
        assert!(Source::parse("http://").is_err());
        assert!(matches!(Source::parse("/var/lib/gpe"), Ok(Source::Dir(_))));
    }

    #[test]
    fn a_missing_or_empty_directory_and_a_closed_port_are_messages() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let f = Fetcher::new(Source::Dir(missing), Duration::from_secs(1)).unwrap();
        assert!(f.fetch().unwrap_err().ends_with("nope: no such directory"));
        let f = Fetcher::new(Source::Dir(dir.path().into()), Duration::from_secs(1)).unwrap();
        assert!(f.fetch().unwrap_err().contains("holds no gpe store"));
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let src = Source::parse(&format!("http://127.0.0.1:{port}/metrics")).unwrap();
        let f = Fetcher::new(src, Duration::from_secs(2)).unwrap();
        assert!(f.fetch().unwrap_err().contains("cannot connect"));
    }

    #[test]
    fn a_server_that_never_answers_is_a_timeout() {
        // The kernel completes the handshake; nobody ever reads or answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let src = Source::parse(&format!("http://{addr}/metrics")).unwrap();
        let f = Fetcher::new(src, Duration::from_millis(300)).unwrap();
        let t = std::time::Instant::now();
        let e = f.fetch().unwrap_err();
        assert!(e.ends_with("no answer within 0.3 s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
