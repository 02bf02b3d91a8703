//! Where `gpe top` reads its figures: a `/metrics` URL (HTTP, or HTTPS through
//! rustls with a CA file to trust and an optional client certificate; basic-auth
//! credentials taken from the URL's userinfo) or a metrics directory read
//! directly through the exporter's own collect-and-render path, so both give
//! the same text exposition.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use gpe_core::StoreDir;
use http::{header, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Empty, Limited};
use hyper_util::rt::TokioIo;
use percent_encoding::percent_decode_str;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

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
    /// The name the server's certificate is checked against, for `https`.
    tls_name: Option<ServerName<'static>>,
}

/// The files `gpe top` uses for an `https` source.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// PEM certificates of the CAs to trust (`--cacert`).
    pub cacert: Option<PathBuf>,
    /// PEM client certificate chain, for mutual TLS (`--cert`).
    pub cert: Option<PathBuf>,
    /// PEM private key of the client certificate (`--key`).
    pub key: Option<PathBuf>,
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
    /// A URL that cannot be parsed.
    pub fn parse(arg: &str) -> Result<Source, String> {
        let https = arg.starts_with("https://");
        if !https && !arg.starts_with("http://") {
            return Ok(Source::Dir(PathBuf::from(arg)));
        }
        let scheme = if https { "https" } else { "http" };
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
        let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
        let host = authority.host();
        let addr = format!("{host}:{port}");
        let tls_name = if https {
            // An IPv6 literal comes bracketed in a URL.
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            let name = ServerName::try_from(bare.to_owned())
                .map_err(|e| format!("{arg}: {bare} is not a valid TLS server name: {e}"))?;
            Some(name)
        } else {
            None
        };
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
                format!("{scheme}://{user}@{hostport}{target}")
            }
            None => format!("{scheme}://{hostport}{target}"),
        };
        Ok(Source::Url(UrlSource {
            addr,
            host: hostport.to_owned(),
            target,
            authorization,
            shown,
            tls_name,
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

/// Reads a PEM file named by flag `flag`.
fn read_pem(flag: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("{flag} {}: {e}", path.display()))
}

/// The rustls client configuration for an `https` source: the CAs of
/// `--cacert` as the only trust, and the client certificate of
/// `--cert`/`--key` when both are given.
///
/// # Errors
/// A flag missing or given alone, or a file that cannot be read or holds no
/// usable certificate or key; each message names the flag.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, String> {
    let Some(ca) = &files.cacert else {
        return Err(
            "an https source needs --cacert FILE, the CA that signed the exporter's certificate"
                .to_owned(),
        );
    };
    let pem = read_pem("--cacert", ca)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        let c = c.map_err(|e| format!("--cacert {}: {e}", ca.display()))?;
        roots
            .add(c)
            .map_err(|e| format!("--cacert {}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!(
            "--cacert {}: no certificate in the file",
            ca.display()
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots);
    match (&files.cert, &files.key) {
        (None, None) => Ok(builder.with_no_client_auth()),
        (Some(cert), Some(key)) => {
            let pem = read_pem("--cert", cert)?;
            let chain = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("--cert {}: {e}", cert.display()))?;
            if chain.is_empty() {
                return Err(format!(
                    "--cert {}: no certificate in the file",
                    cert.display()
                ));
            }
            let pem = read_pem("--key", key)?;
            let key_der = PrivateKeyDer::from_pem_slice(&pem)
                .map_err(|e| format!("--key {}: {e}", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("--cert/--key: {e}"))
        }
        (Some(_), None) => Err("--cert needs --key".to_owned()),
        (None, Some(_)) => Err("--key needs --cert".to_owned()),
    }
}

/// Reads a [`Source`], again and again, each read bounded by a timeout.
pub struct Fetcher {
    source: Source,
    rt: tokio::runtime::Runtime,
    timeout: Duration,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Fetcher {
    /// A fetcher for `source` whose reads of a URL give up after `timeout`;
    /// an `https` source uses `tls`.
    ///
    /// # Errors
    /// The TLS files are unusable (see [`client_config`]), or the runtime for
    /// the HTTP client cannot be built.
    pub fn new(source: Source, timeout: Duration, tls: &TlsFiles) -> Result<Fetcher, String> {
        let tls = match &source {
            Source::Url(u) if u.tls_name.is_some() => Some(tokio_rustls::TlsConnector::from(
                Arc::new(client_config(tls)?),
            )),
            _ => {
                if tls.cacert.is_some() || tls.cert.is_some() || tls.key.is_some() {
                    return Err(
                        "--cacert, --cert and --key apply to an https:// source only".to_owned(),
                    );
                }
                None
            }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("starting the HTTP client: {e}"))?;
        Ok(Fetcher {
            source,
            rt,
            timeout,
            tls,
        })
    }

    /// One exposition in the text format, or a message saying why not.
    pub fn fetch(&self) -> Result<String, String> {
        match &self.source {
            Source::Url(u) => {
                let shown = &u.shown;
                let read =
                    async { tokio::time::timeout(self.timeout, get(u, self.tls.as_ref())).await };
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

async fn get(u: &UrlSource, tls: Option<&tokio_rustls::TlsConnector>) -> Result<String, String> {
    let req = request(u)?;
    let stream = tokio::net::TcpStream::connect(&u.addr)
        .await
        .map_err(|e| format!("cannot connect: {e}"))?;
    match (tls, &u.tls_name) {
        (Some(c), Some(name)) => {
            let stream = c
                .connect(name.clone(), stream)
                .await
                .map_err(|e| format!("TLS handshake failed: {e}"))?;
            exchange(TokioIo::new(stream), req).await
        }
        _ => exchange(TokioIo::new(stream), req).await,
    }
}

/// One request and its answer over an open connection.
async fn exchange<I>(io: I, req: Request<Empty<Bytes>>) -> Result<String, String>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
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
    fn https_urls_take_port_443_and_a_server_name_bad_urls_are_refused() {
        let u = url("https://u:p@127.0.0.1/metrics");
        assert_eq!(u.addr, "127.0.0.1:443");
        assert_eq!(u.shown, "https://u@127.0.0.1/metrics");
        assert!(u.tls_name.is_some());
        assert!(url("http://127.0.0.1/").tls_name.is_none());
        // Without --cacert there is nothing to trust.
        let e = Fetcher::new(Source::Url(u), Duration::from_secs(1), &TlsFiles::default())
            .err()
            .unwrap();
        assert!(e.contains("--cacert"), "{e}");
        let e = client_config(&TlsFiles {
            cacert: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        })
        .unwrap_err();
        assert!(e.starts_with("--cacert /nonexistent/ca.pem: "), "{e}");
        let plain = Source::parse("http://127.0.0.1/").unwrap();
        let files = TlsFiles {
            cert: Some("c.pem".into()),
            ..TlsFiles::default()
        };
        let e = Fetcher::new(plain, Duration::from_secs(1), &files)
            .err()
            .unwrap();
        assert!(e.contains("https:// source only"), "{e}");
        assert!(Source::parse("http://").is_err());
        assert!(matches!(Source::parse("/var/lib/gpe"), Ok(Source::Dir(_))));
    }

    #[test]
    fn a_missing_or_empty_directory_and_a_closed_port_are_messages() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let f = Fetcher::new(
            Source::Dir(missing),
            Duration::from_secs(1),
            &TlsFiles::default(),
        )
        .unwrap();
        assert!(f.fetch().unwrap_err().ends_with("nope: no such directory"));
        let f = Fetcher::new(
            Source::Dir(dir.path().into()),
            Duration::from_secs(1),
            &TlsFiles::default(),
        )
        .unwrap();
        assert!(f.fetch().unwrap_err().contains("holds no gpe store"));
        // A port that was just free: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let src = Source::parse(&format!("http://127.0.0.1:{port}/metrics")).unwrap();
        let f = Fetcher::new(src, Duration::from_secs(2), &TlsFiles::default()).unwrap();
        assert!(f.fetch().unwrap_err().contains("cannot connect"));
    }

    #[test]
    fn a_server_that_never_answers_is_a_timeout() {
        // The kernel completes the handshake; nobody ever reads or answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let src = Source::parse(&format!("http://{addr}/metrics")).unwrap();
        let f = Fetcher::new(src, Duration::from_millis(300), &TlsFiles::default()).unwrap();
        let t = std::time::Instant::now();
        let e = f.fetch().unwrap_err();
        assert!(e.ends_with("no answer within 0.3 s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }
}
