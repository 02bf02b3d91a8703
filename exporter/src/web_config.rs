//! The exporter's web config (`metrics_web_config`): the exporter-toolkit
//! YAML file of Prometheus exporters (`tls_server_config`, `basic_auth_users`,
//! `http_server_config.headers`). Parses and checks it, builds the rustls
//! server config, re-reads it when it or a file it names changes, and checks
//! basic auth (bcrypt off the accept loop, successes cached). Serving is left
//! to `lib.rs`, which asks [`Watched::current`] on every connection and request.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Read as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, DistinguishedName, RootCertStore, SignatureScheme};
use serde::Deserialize;

/// The largest web config file, certificate, key or CA file read.
const MAX_FILE: u64 = 1 << 20;

/// Successful basic-auth checks remembered, as exporter-toolkit's cache.
const AUTH_CACHE: usize = 100;

/// The hash an unknown user's password is checked against, so that a wrong
/// user name takes as long as a wrong password (exporter-toolkit's own).
const UNKNOWN_USER_HASH: &str = "$2y$10$QOauhQNbBCuQDKes6eFzPeMqBSjb7Mr5DUmpZ/VcEd00UAV/LDeSi";

/// The headers `http_server_config.headers` may set, with the values each
/// accepts (empty: any), as exporter-toolkit allows them.
const HEADERS: [(&str, &[&str]); 5] = [
    ("Strict-Transport-Security", &[]),
    ("X-Content-Type-Options", &["nosniff"]),
    ("X-Frame-Options", &["deny", "sameorigin"]),
    ("X-XSS-Protection", &[]),
    ("Content-Security-Policy", &[]),
];

/// The file as written; unknown keys are refused, as exporter-toolkit does.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    tls_server_config: Option<TlsSpec>,
    http_server_config: Option<HttpSpec>,
    basic_auth_users: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsSpec {
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    client_auth_type: Option<ClientAuth>,
    client_ca_file: Option<PathBuf>,
    min_version: Option<TlsVersion>,
    max_version: Option<TlsVersion>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpSpec {
    headers: Option<BTreeMap<String, String>>,
}

/// `client_auth_type`: Go's `tls.ClientAuthType` names.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
enum ClientAuth {
    #[default]
    NoClientCert,
    RequestClientCert,
    RequireAnyClientCert,
    VerifyClientCertIfGiven,
    RequireAndVerifyClientCert,
}

impl ClientAuth {
    fn verifies(self) -> bool {
        matches!(
            self,
            ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert
        )
    }
}

/// `min_version` / `max_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
enum TlsVersion {
    TLS10,
    TLS11,
    TLS12,
    TLS13,
}

/// A web config file that cannot be used, with the field at fault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {detail}", file.display())]
pub struct WebConfigError {
    file: PathBuf,
    detail: String,
}

/// The identity of a file as read: a change to any part means "read again".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    path: PathBuf,
    seen: Option<(u64, u64, u64, i64, i64, i64, i64)>,
}

impl Stamp {
    fn of_meta(path: &Path, m: Option<std::fs::Metadata>) -> Stamp {
        Stamp {
            path: path.to_owned(),
            seen: m.map(|m| {
                (
                    m.dev(),
                    m.ino(),
                    m.len(),
                    m.mtime(),
                    m.mtime_nsec(),
                    m.ctime(),
                    m.ctime_nsec(),
                )
            }),
        }
    }

    fn now(path: &Path) -> Stamp {
        Stamp::of_meta(path, std::fs::metadata(path).ok())
    }

    fn changed(&self) -> bool {
        Stamp::now(&self.path) != *self
    }
}

/// One loaded, checked web config.
#[derive(Debug)]
pub struct WebConfig {
    tls: Option<Arc<rustls::ServerConfig>>,
    users: BTreeMap<String, String>,
    headers: Vec<(HeaderName, HeaderValue)>,
    /// The files read to build it, as they were read.
    stamps: Vec<Stamp>,
}

/// Reads `path` (at most [`MAX_FILE`] bytes) and records its stamp as read.
/// A file that cannot be opened is recorded as missing, so that its
/// appearance is noticed too.
fn read(path: &Path, stamps: &mut Vec<Stamp>) -> std::io::Result<Vec<u8>> {
    let f = File::open(path).inspect_err(|_| stamps.push(Stamp::now(path)))?;
    stamps.push(Stamp::of_meta(path, f.metadata().ok()));
    let mut buf = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_FILE} bytes"
        )));
    }
    Ok(buf)
}

impl WebConfig {
    /// Reads and checks the web config at `file` and the files it names.
    ///
    /// # Errors
    /// The file cannot be read or parsed, has an unknown key, names a file
    /// that cannot be read, or its key does not match its certificate; the
    /// message names the field.
    pub fn load(file: &Path) -> Result<WebConfig, WebConfigError> {
        WebConfig::load_into(file, &mut Vec::new())
    }

    /// [`WebConfig::load`], recording in `stamps` every file it read or
    /// tried to read, also when it fails.
    fn load_into(file: &Path, stamps: &mut Vec<Stamp>) -> Result<WebConfig, WebConfigError> {
        let err = |detail: String| WebConfigError {
            file: file.to_owned(),
            detail,
        };
        let text = read(file, stamps).map_err(|e| err(format!("cannot read: {e}")))?;
        let spec: FileSpec = if text.iter().all(u8::is_ascii_whitespace) {
            FileSpec::default()
        } else {
            serde_yaml_ng::from_slice(&text).map_err(|e| err(e.to_string()))?
        };
        let tls = match spec.tls_server_config {
            Some(t) => tls_config(t, stamps).map_err(err)?,
            None => None,
        };
        let users = spec.basic_auth_users.unwrap_or_default();
        for (user, hash) in &users {
            if hash.parse::<bcrypt::HashParts>().is_err() {
                return Err(err(format!(
                    "basic_auth_users.{user}: not a bcrypt hash (make one with `htpasswd -nBC 10 \"\" | tr -d ':'`)"
                )));
            }
        }
        let headers = headers(spec.http_server_config.and_then(|h| h.headers)).map_err(err)?;
        Ok(WebConfig {
            tls,
            users,
            headers,
            stamps: stamps.clone(),
        })
    }

    /// The TLS server config, if the file asks for TLS.
    pub fn tls(&self) -> Option<&Arc<rustls::ServerConfig>> {
        self.tls.as_ref()
    }

    /// Whether requests need basic auth.
    pub fn needs_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// The headers to add to every response.
    pub fn headers(&self) -> &[(HeaderName, HeaderValue)] {
        &self.headers
    }
}

fn tls_config(
    t: TlsSpec,
    stamps: &mut Vec<Stamp>,
) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    let nothing_set = t.cert_file.is_none()
        && t.key_file.is_none()
        && t.client_auth_type.is_none()
        && t.client_ca_file.is_none()
        && t.min_version.is_none()
        && t.max_version.is_none();
    if nothing_set {
        // exporter-toolkit serves plain HTTP for an empty section.
        return Ok(None);
    }
    let cert_file = t
        .cert_file
        .ok_or("tls_server_config.cert_file: missing (needed with any TLS setting)")?;
    let key_file = t
        .key_file
        .ok_or("tls_server_config.key_file: missing (needed with any TLS setting)")?;
    let pem = read(&cert_file, stamps).map_err(|e| {
        format!(
            "tls_server_config.cert_file: cannot read {}: {e}",
            cert_file.display()
        )
    })?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| {
            format!(
                "tls_server_config.cert_file: {}: not PEM certificates: {e}",
                cert_file.display()
            )
        })?;
    if certs.is_empty() {
        return Err(format!(
            "tls_server_config.cert_file: {} holds no certificate",
            cert_file.display()
        ));
    }
    let pem = read(&key_file, stamps).map_err(|e| {
        format!(
            "tls_server_config.key_file: cannot read {}: {e}",
            key_file.display()
        )
    })?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        format!(
            "tls_server_config.key_file: {} holds no PEM private key: {e}",
            key_file.display()
        )
    })?;

    let min = t.min_version.unwrap_or(TlsVersion::TLS12);
    let max = t.max_version.unwrap_or(TlsVersion::TLS13);
    if max < TlsVersion::TLS12 {
        return Err(format!(
            "tls_server_config.max_version: {max:?} is not offered (TLS12 and TLS13 are)"
        ));
    }
    if min > max {
        return Err(format!(
            "tls_server_config.min_version: {min:?} is above max_version {max:?}"
        ));
    }
    // rustls speaks TLS 1.2 and 1.3 only: a lower minimum is raised to 1.2.
    let mut versions = Vec::new();
    if min <= TlsVersion::TLS12 {
        versions.push(&rustls::version::TLS12);
    }
    versions.push(&rustls::version::TLS13);
    if max == TlsVersion::TLS12 {
        versions.retain(|v| v.version == rustls::ProtocolVersion::TLSv1_2);
    }

    let auth = t.client_auth_type.unwrap_or_default();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = match &t.client_ca_file {
        Some(ca) => {
            if auth == ClientAuth::NoClientCert {
                return Err(
                    "tls_server_config.client_ca_file: set, but client_auth_type is NoClientCert"
                        .into(),
                );
            }
            let pem = read(ca, stamps).map_err(|e| {
                format!(
                    "tls_server_config.client_ca_file: cannot read {}: {e}",
                    ca.display()
                )
            })?;
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(&pem) {
                let c = c.map_err(|e| {
                    format!(
                        "tls_server_config.client_ca_file: {}: not PEM certificates: {e}",
                        ca.display()
                    )
                })?;
                roots.add(c).map_err(|e| {
                    format!("tls_server_config.client_ca_file: {}: {e}", ca.display())
                })?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "tls_server_config.client_ca_file: {} holds no certificate",
                    ca.display()
                ));
            }
            Some(Arc::new(roots))
        }
        None if auth.verifies() => {
            return Err(format!(
                "tls_server_config.client_ca_file: needed by client_auth_type {auth:?}"
            ))
        }
        None => None,
    };
    let verifier: Arc<dyn ClientCertVerifier> = match (auth, roots) {
        (ClientAuth::NoClientCert, _) => rustls::server::WebPkiClientVerifier::no_client_auth(),
        (ClientAuth::RequestClientCert, _) => Arc::new(AnyCert {
            mandatory: false,
            provider: provider.clone(),
        }),
        (ClientAuth::RequireAnyClientCert, _) => Arc::new(AnyCert {
            mandatory: true,
            provider: provider.clone(),
        }),
        (ClientAuth::VerifyClientCertIfGiven | ClientAuth::RequireAndVerifyClientCert, roots) => {
            let roots = roots.ok_or("tls_server_config.client_ca_file: missing")?;
            let b = WebPkiClientVerifier::builder_with_provider(roots, provider.clone());
            let b = if auth == ClientAuth::VerifyClientCertIfGiven {
                b.allow_unauthenticated()
            } else {
                b
            };
            b.build()
                .map_err(|e| format!("tls_server_config.client_ca_file: {e}"))?
        }
    };
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&versions)
        .map_err(|e| format!("tls_server_config.min_version: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "tls_server_config.key_file: {} does not match the certificate of cert_file {}",
                key_file.display(),
                cert_file.display()
            ),
            e => format!("tls_server_config.key_file: {}: {e}", key_file.display()),
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(Arc::new(config)))
}

fn headers(
    spec: Option<BTreeMap<String, String>>,
) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    let mut out = Vec::new();
    for (name, value) in spec.unwrap_or_default() {
        let Some((canon, allowed)) = HEADERS.iter().find(|(h, _)| h.eq_ignore_ascii_case(&name))
        else {
            return Err(format!(
                "http_server_config.headers.{name}: this header cannot be configured (allowed: {})",
                HEADERS.map(|(h, _)| h).join(", ")
            ));
        };
        if !allowed.is_empty() && !allowed.iter().any(|a| a.eq_ignore_ascii_case(&value)) {
            return Err(format!(
                "http_server_config.headers.{name}: {value:?} is not one of {allowed:?}"
            ));
        }
        let v = HeaderValue::from_str(&value)
            .map_err(|_| format!("http_server_config.headers.{name}: not a header value"))?;
        let n = HeaderName::from_bytes(canon.as_bytes())
            .map_err(|_| format!("http_server_config.headers.{name}: not a header name"))?;
        out.push((n, v));
    }
    Ok(out)
}

/// `RequestClientCert` and `RequireAnyClientCert`: asks for a certificate
/// and accepts any, unverified (Go's semantics), but still checks that the
/// client holds its key. rustls has no such verifier built in.
#[derive(Debug)]
struct AnyCert {
    mandatory: bool,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AnyCert {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The web config in force, re-read when its file or a file it names changes.
#[derive(Debug)]
pub struct Watched {
    file: PathBuf,
    current: RefCell<Rc<WebConfig>>,
    /// The stamps of the last attempt, so a bad new file is logged once.
    tried: RefCell<Vec<Stamp>>,
}

impl Watched {
    /// Loads the web config at `file`.
    ///
    /// # Errors
    /// As [`WebConfig::load`].
    pub fn load(file: PathBuf) -> Result<Watched, WebConfigError> {
        let config = WebConfig::load(&file)?;
        let tried = config.stamps.clone();
        Ok(Watched {
            file,
            current: RefCell::new(Rc::new(config)),
            tried: RefCell::new(tried),
        })
    }

    /// The config in force, after reading the file again if it or a file it
    /// names changed. A new file that cannot be used is logged and the old
    /// config stays in force.
    pub fn current(&self) -> Rc<WebConfig> {
        let changed = self.tried.borrow().iter().any(Stamp::changed);
        if changed {
            let mut stamps = Vec::new();
            match WebConfig::load_into(&self.file, &mut stamps) {
                Ok(new) => {
                    gpe_core::log_info!("exporter: web config {} re-read", self.file.display());
                    *self.current.borrow_mut() = Rc::new(new);
                }
                Err(e) => {
                    gpe_core::log_error!(
                        "exporter: setting `metrics_web_config`: {e}; the previous web config stays in force"
                    );
                    // The files of the config in force, as they are now.
                    let current = self.current.borrow();
                    stamps.extend(current.stamps.iter().map(|s| Stamp::now(&s.path)));
                }
            }
            // Watched from now on: what this attempt read or tried to read.
            *self.tried.borrow_mut() = stamps;
        }
        self.current.borrow().clone()
    }
}

/// Why a client was refused; the `reason` label of
/// `gpe_exporter_auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// A request without basic-auth credentials, where they are required.
    MissingCredentials,
    /// An unknown user or a wrong password.
    WrongCredentials,
    /// A handshake without the client certificate the config requires.
    MissingClientCert,
    /// A handshake whose client certificate did not verify.
    BadClientCert,
    /// A handshake that failed otherwise (not TLS, no common version, the
    /// client refused the server's certificate, or it took too long).
    TlsHandshake,
}

impl AuthFailure {
    /// Every reason, in label order.
    pub const ALL: [AuthFailure; 5] = [
        AuthFailure::MissingCredentials,
        AuthFailure::WrongCredentials,
        AuthFailure::MissingClientCert,
        AuthFailure::BadClientCert,
        AuthFailure::TlsHandshake,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::MissingCredentials => "missing_credentials",
            AuthFailure::WrongCredentials => "wrong_credentials",
            AuthFailure::MissingClientCert => "missing_client_cert",
            AuthFailure::BadClientCert => "bad_client_cert",
            AuthFailure::TlsHandshake => "tls_handshake",
        }
    }

    /// The reason a failed TLS accept stands for.
    pub fn of_handshake(e: &std::io::Error) -> AuthFailure {
        match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(rustls::Error::NoCertificatesPresented) => AuthFailure::MissingClientCert,
            Some(rustls::Error::InvalidCertificate(_)) => AuthFailure::BadClientCert,
            _ => AuthFailure::TlsHandshake,
        }
    }
}

/// Basic-auth checking: one bcrypt comparison at a time on a blocking
/// thread (as exporter-toolkit serialises them), successes cached.
#[derive(Debug)]
pub struct BasicAuth {
    one_at_a_time: tokio::sync::Semaphore,
    ok: RefCell<HashSet<(String, String, String)>>,
}

impl Default for BasicAuth {
    fn default() -> BasicAuth {
        BasicAuth {
            one_at_a_time: tokio::sync::Semaphore::new(1),
            ok: RefCell::new(HashSet::new()),
        }
    }
}

impl BasicAuth {
    /// Checks the `Authorization` header value `auth` against `config`.
    ///
    /// # Errors
    /// The reason the request is refused.
    pub async fn check(&self, config: &WebConfig, auth: Option<&[u8]>) -> Result<(), AuthFailure> {
        if config.users.is_empty() {
            return Ok(());
        }
        let (user, pass) = auth
            .and_then(parse_basic)
            .ok_or(AuthFailure::MissingCredentials)?;
        let known = config.users.get(&user);
        let hash = known.map_or(UNKNOWN_USER_HASH, String::as_str).to_owned();
        let key = (user, hash, pass);
        if known.is_some() && self.ok.borrow().contains(&key) {
            return Ok(());
        }
        let matched = {
            let _permit = self
                .one_at_a_time
                .acquire()
                .await
                .map_err(|_| AuthFailure::WrongCredentials)?;
            let (pass, hash) = (key.2.clone(), key.1.clone());
            tokio::task::spawn_blocking(move || bcrypt::verify(pass, &hash).unwrap_or(false))
                .await
                .unwrap_or(false)
        };
        if !(matched && known.is_some()) {
            return Err(AuthFailure::WrongCredentials);
        }
        let mut ok = self.ok.borrow_mut();
        if ok.len() >= AUTH_CACHE {
            if let Some(old) = ok.iter().next().cloned() {
                ok.remove(&old);
            }
        }
        ok.insert(key);
        Ok(())
    }
}

/// `Basic base64(user:password)` into its two halves.
fn parse_basic(v: &[u8]) -> Option<(String, String)> {
    use base64::Engine as _;
    let v = std::str::from_utf8(v).ok()?.trim();
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let raw = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let raw = String::from_utf8(raw).ok()?;
    let (user, pass) = raw.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };

    /// A CA, a server certificate for 127.0.0.1 and a client certificate it
    /// signed, and a client certificate nobody trusts, as PEM files in a
    /// temporary directory.
    struct Pki {
        dir: tempfile::TempDir,
    }

    fn leaf(issuer: &Issuer<'_, KeyPair>, eku: ExtendedKeyUsagePurpose) -> (String, String) {
        let mut p = CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
        p.extended_key_usages = vec![eku];
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "gpe test leaf");
        let key = KeyPair::generate().unwrap();
        (
            p.signed_by(&key, issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    }

    fn ca() -> (String, Issuer<'static, KeyPair>) {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        // A subject of its own: one equal to the leaf's reads as self-signed.
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "gpe test CA");
        let key = KeyPair::generate().unwrap();
        let pem = p.self_signed(&key).unwrap().pem();
        (pem, Issuer::new(p, key))
    }

    impl Pki {
        fn new() -> Pki {
            let dir = tempfile::tempdir().unwrap();
            let w = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
            let (ca_pem, issuer) = ca();
            let (cert, key) = leaf(&issuer, ExtendedKeyUsagePurpose::ServerAuth);
            let (ccert, ckey) = leaf(&issuer, ExtendedKeyUsagePurpose::ClientAuth);
            let (_, stranger) = ca();
            let (scert, skey) = leaf(&stranger, ExtendedKeyUsagePurpose::ClientAuth);
            w("ca.pem", &ca_pem);
            w("server.pem", &cert);
            w("server.key", &key);
            w("client.pem", &ccert);
            w("client.key", &ckey);
            w("stranger.pem", &scert);
            w("stranger.key", &skey);
            Pki { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        /// Writes `yaml` (with `{dir}` standing for the directory) as the
        /// web config and loads it.
        fn load(&self, yaml: &str) -> Result<WebConfig, WebConfigError> {
            let file = self.dir.path().join("web.yml");
            std::fs::write(&file, yaml.replace("{dir}", &self.path(""))).unwrap();
            WebConfig::load(&file)
        }

        fn refusal(&self, yaml: &str) -> String {
            self.load(yaml).unwrap_err().to_string()
        }
    }

    const TLS: &str =
        "tls_server_config:\n  cert_file: {dir}server.pem\n  key_file: {dir}server.key\n";

    #[test]
    fn a_full_file_loads_and_an_empty_one_serves_plain_http() {
        let pki = Pki::new();
        let hash = bcrypt::hash("secret", 4).unwrap();
        let full = format!(
            "{TLS}  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: {{dir}}ca.pem\n  min_version: TLS12\n  max_version: TLS13\nbasic_auth_users:\n  prometheus: '{hash}'\nhttp_server_config:\n  headers:\n    X-Frame-Options: deny\n    Strict-Transport-Security: max-age=31536000\n"
        );
        let c = pki.load(&full).unwrap();
        assert!(c.tls().is_some());
        assert!(c.needs_auth());
        assert_eq!(c.headers().len(), 2);
        assert_eq!(c.stamps.len(), 4, "the file, cert, key and CA are watched");
        for plain in ["", "\n", "tls_server_config: {}\n"] {
            let c = pki.load(plain).unwrap();
            assert!(c.tls().is_none() && !c.needs_auth(), "{plain:?}");
        }
    }

    #[test]
    fn each_refusal_names_the_field() {
        let pki = Pki::new();
        let cases = [
            ("tls_server_config: [\n", "tls_server_config"),
            ("web: {}\n", "unknown field `web`"),
            (
                "tls_server_config:\n  cert_fil: x\n",
                "tls_server_config: unknown field `cert_fil`",
            ),
            (
                "http_server_config:\n  http3: true\n",
                "http_server_config: unknown field `http3`",
            ),
            (
                &format!("{TLS}  client_auth_type: Sometimes\n"),
                "tls_server_config.client_auth_type: unknown variant `Sometimes`",
            ),
            (
                "tls_server_config:\n  cert_file: {dir}nothing.pem\n  key_file: {dir}server.key\n",
                "tls_server_config.cert_file: cannot read",
            ),
            (
                "tls_server_config:\n  cert_file: {dir}server.pem\n",
                "tls_server_config.key_file: missing",
            ),
            (
                "tls_server_config:\n  cert_file: {dir}server.pem\n  key_file: {dir}client.key\n",
                "tls_server_config.key_file: ",
            ),
            (
                "tls_server_config:\n  cert_file: {dir}server.pem\n  key_file: {dir}server.pem\n",
                "tls_server_config.key_file: ",
            ),
            (
                &format!("{TLS}  client_auth_type: VerifyClientCertIfGiven\n"),
                "tls_server_config.client_ca_file: needed",
            ),
            (
                &format!("{TLS}  client_ca_file: {{dir}}ca.pem\n"),
                "tls_server_config.client_ca_file: set, but client_auth_type is NoClientCert",
            ),
            (
                &format!("{TLS}  max_version: TLS11\n"),
                "tls_server_config.max_version",
            ),
            (
                &format!("{TLS}  min_version: TLS13\n  max_version: TLS12\n"),
                "tls_server_config.min_version",
            ),
            (
                &format!("{TLS}  min_version: SSL3\n"),
                "tls_server_config.min_version: unknown variant",
            ),
            (
                "basic_auth_users:\n  alice: plain\n",
                "basic_auth_users.alice: not a bcrypt hash",
            ),
            (
                "http_server_config:\n  headers:\n    Server: gpe\n",
                "http_server_config.headers.Server: this header cannot be configured",
            ),
            (
                "http_server_config:\n  headers:\n    X-Frame-Options: allow\n",
                "http_server_config.headers.X-Frame-Options",
            ),
        ];
        for (yaml, want) in cases {
            let msg = pki.refusal(yaml);
            assert!(msg.contains(want), "{yaml:?}: {msg}");
            assert!(msg.starts_with(&pki.path("web.yml")), "{msg}");
        }
        let mismatch = pki.refusal(
            "tls_server_config:\n  cert_file: {dir}server.pem\n  key_file: {dir}client.key\n",
        );
        assert!(
            mismatch.contains("does not match the certificate"),
            "{mismatch}"
        );
    }

    #[test]
    fn a_changed_file_is_read_again_and_a_bad_change_keeps_the_old_config() {
        let pki = Pki::new();
        let file = pki.dir.path().join("web.yml");
        std::fs::write(&file, "").unwrap();
        let w = Watched::load(file.clone()).unwrap();
        assert!(w.current().tls().is_none());
        let tls = TLS.replace("{dir}", &pki.path(""));
        // A new file (a new inode), as editors and config managers write it.
        std::fs::write(pki.dir.path().join("new.yml"), &tls).unwrap();
        std::fs::rename(pki.dir.path().join("new.yml"), &file).unwrap();
        assert!(w.current().tls().is_some());
        std::fs::write(pki.dir.path().join("new.yml"), "nonsense: 1\n").unwrap();
        std::fs::rename(pki.dir.path().join("new.yml"), &file).unwrap();
        assert!(w.current().tls().is_some(), "the bad file is not used");
        // A replaced key file that no longer matches is refused the same way.
        std::fs::write(&file, &tls).unwrap();
        std::fs::copy(
            pki.dir.path().join("client.key"),
            pki.dir.path().join("server.key"),
        )
        .unwrap();
        assert!(w.current().tls().is_some());
        // A file it names that appears later is noticed too.
        std::fs::write(&file, "").unwrap();
        std::fs::write(pki.dir.path().join("new.yml"), "").unwrap();
        std::fs::rename(pki.dir.path().join("new.yml"), &file).unwrap();
        assert!(w.current().tls().is_none());
        let later = TLS
            .replace("{dir}", &pki.path(""))
            .replace("server.pem", "later.pem")
            .replace("server.key", "later.key");
        std::fs::write(pki.dir.path().join("new.yml"), later).unwrap();
        std::fs::rename(pki.dir.path().join("new.yml"), &file).unwrap();
        assert!(w.current().tls().is_none(), "later.pem is missing");
        assert!(w.current().tls().is_none(), "and nothing changed since");
        // (server.key holds the client's key now: use the client's pair.)
        std::fs::copy(
            pki.dir.path().join("client.pem"),
            pki.dir.path().join("later.pem"),
        )
        .unwrap();
        std::fs::copy(
            pki.dir.path().join("server.pem"),
            pki.dir.path().join("later.key"),
        )
        .unwrap();
        assert!(w.current().tls().is_none(), "later.key holds no key yet");
        std::fs::remove_file(pki.dir.path().join("later.key")).unwrap();
        std::fs::copy(
            pki.dir.path().join("client.key"),
            pki.dir.path().join("later.key"),
        )
        .unwrap();
        assert!(w.current().tls().is_some());
    }

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn header(user: &str, pass: &str) -> Vec<u8> {
        use base64::Engine as _;
        let b = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
        format!("Basic {b}").into_bytes()
    }

    #[test]
    fn basic_auth_refuses_by_reason_and_caches_successes() {
        let pki = Pki::new();
        let hash = bcrypt::hash("secret", 4).unwrap();
        let c = pki
            .load(&format!("basic_auth_users:\n  prom: '{hash}'\n"))
            .unwrap();
        let auth = BasicAuth::default();
        run(async {
            assert_eq!(
                auth.check(&c, None).await,
                Err(AuthFailure::MissingCredentials)
            );
            assert_eq!(
                auth.check(&c, Some(b"Bearer x")).await,
                Err(AuthFailure::MissingCredentials)
            );
            let wrong = header("prom", "guess");
            assert_eq!(
                auth.check(&c, Some(&wrong)).await,
                Err(AuthFailure::WrongCredentials)
            );
            let stranger = header("eve", "secret");
            assert_eq!(
                auth.check(&c, Some(&stranger)).await,
                Err(AuthFailure::WrongCredentials)
            );
            assert!(auth.ok.borrow().is_empty(), "failures are not cached");
            let right = header("prom", "secret");
            assert_eq!(auth.check(&c, Some(&right)).await, Ok(()));
            assert_eq!(auth.ok.borrow().len(), 1);
            assert_eq!(auth.check(&c, Some(&right)).await, Ok(()));
        });
        let open = pki.load("").unwrap();
        run(async { assert_eq!(auth.check(&open, None).await, Ok(())) });
    }

    /// One in-memory handshake against `server`; the server's verdict.
    fn handshake(
        pki: &Pki,
        server: &WebConfig,
        client_cert: Option<&str>,
    ) -> Result<(), AuthFailure> {
        let mut roots = RootCertStore::empty();
        let ca = std::fs::read(pki.path("ca.pem")).unwrap();
        roots
            .add(CertificateDer::from_pem_slice(&ca).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let client = match client_cert {
            None => b.with_no_client_auth(),
            Some(name) => {
                let cert = std::fs::read(pki.path(&format!("{name}.pem"))).unwrap();
                let key = std::fs::read(pki.path(&format!("{name}.key"))).unwrap();
                b.with_client_auth_cert(
                    vec![CertificateDer::from_pem_slice(&cert).unwrap()],
                    PrivateKeyDer::from_pem_slice(&key).unwrap(),
                )
                .unwrap()
            }
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(server.tls().unwrap().clone());
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        run(async {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
            let (s, _c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
            s.map(drop).map_err(|e| AuthFailure::of_handshake(&e))
        })
    }

    #[test]
    fn the_five_client_auth_types_admit_and_refuse_as_go_does() {
        use AuthFailure::{BadClientCert as Bad, MissingClientCert as Missing};
        let pki = Pki::new();
        // (type, no certificate, a certificate of the CA, an unknown one)
        let table = [
            ("NoClientCert", Ok(()), Ok(()), Ok(())),
            ("RequestClientCert", Ok(()), Ok(()), Ok(())),
            ("RequireAnyClientCert", Err(Missing), Ok(()), Ok(())),
            ("VerifyClientCertIfGiven", Ok(()), Ok(()), Err(Bad)),
            ("RequireAndVerifyClientCert", Err(Missing), Ok(()), Err(Bad)),
        ];
        for (kind, none, trusted, unknown) in table {
            let ca = if kind == "NoClientCert" {
                ""
            } else {
                "  client_ca_file: {dir}ca.pem\n"
            };
            let c = pki
                .load(&format!("{TLS}  client_auth_type: {kind}\n{ca}"))
                .unwrap();
            assert_eq!(
                handshake(&pki, &c, None),
                none,
                "{kind} without a certificate"
            );
            assert_eq!(
                handshake(&pki, &c, Some("client")),
                trusted,
                "{kind} with the CA's"
            );
            assert_eq!(
                handshake(&pki, &c, Some("stranger")),
                unknown,
                "{kind} with an unknown one"
            );
        }
    }
}
