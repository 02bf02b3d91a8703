//! TLS on the app listener: the rustls [`ServerConfig`] built from `certfile`,
//! `keyfile`, `ca_certs`, `cert_reqs` and `ciphers` (Gunicorn's names).
//!
//! The master loads it at start-up and before a HUP replaces the workers,
//! only to find bad files early; every worker loads it again after fork, so
//! the workers of a reload read the files as they are then, and the old ones
//! finish on what they loaded. Errors name the setting at fault.

use std::path::Path;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{Config, ConfigError};

/// The ALPN name of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";
/// The ALPN name of HTTP/1.1.
pub const ALPN_HTTP1: &[u8] = b"http/1.1";

fn refused(setting: &'static str, path: &Path, expected: String) -> ConfigError {
    ConfigError::invalid(setting, path.display(), expected)
}

/// The TLS configuration `config` asks for, or `None` when `certfile` and
/// `keyfile` are unset (plain HTTP). ALPN offers `h2` before `http/1.1` when
/// `h2` is true (the worker type serves HTTP/2 and `http2` is not `off`).
///
/// # Errors
/// A file that cannot be read or parsed, a key that does not match its
/// certificate, client verification without CAs, or an unknown cipher suite;
/// the error names the setting.
pub fn server_config(config: &Config, h2: bool) -> Result<Option<Arc<ServerConfig>>, ConfigError> {
    let (certfile, keyfile) = match (&config.certfile, &config.keyfile) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(ConfigError::invalid(
                "keyfile",
                "",
                "a PEM private key file (`certfile` is set)",
            ))
        }
        (None, Some(_)) => {
            return Err(ConfigError::invalid(
                "certfile",
                "",
                "a PEM certificate file (`keyfile` is set)",
            ))
        }
        (Some(c), Some(k)) => (c, k),
    };
    let provider = Arc::new(provider(config.ciphers.as_deref())?);
    let certs = certificates("certfile", certfile)?;
    let key = PrivateKeyDer::from_pem_file(keyfile).map_err(|e| {
        refused(
            "keyfile",
            keyfile,
            format!("a readable PEM private key ({e})"),
        )
    })?;
    let verifier = match config.cert_reqs.as_str() {
        "none" => WebPkiClientVerifier::no_client_auth(),
        reqs => {
            let Some(ca) = &config.ca_certs else {
                return Err(ConfigError::invalid(
                    "ca_certs",
                    "",
                    format!("a PEM file of CA certificates (`cert_reqs` is `{reqs}`)"),
                ));
            };
            let mut roots = RootCertStore::empty();
            for cert in certificates("ca_certs", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| refused("ca_certs", ca, format!("valid CA certificates ({e})")))?;
            }
            let builder =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let builder = if reqs == "optional" {
                builder.allow_unauthenticated()
            } else {
                builder
            };
            builder
                .build()
                .map_err(|e| refused("ca_certs", ca, format!("usable CA certificates ({e})")))?
        }
    };
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| {
            ConfigError::invalid(
                "ciphers",
                config.ciphers.as_deref().unwrap_or_default(),
                format!("suites usable with TLS 1.2 or 1.3 ({e})"),
            )
        })?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => refused(
                "keyfile",
                keyfile,
                format!("the private key of `certfile` ({e})"),
            ),
            rustls::Error::General(_) => {
                refused("keyfile", keyfile, format!("a usable private key ({e})"))
            }
            _ => refused("certfile", certfile, format!("a valid certificate ({e})")),
        })?;
    server.alpn_protocols = if h2 {
        vec![ALPN_H2.to_vec(), ALPN_HTTP1.to_vec()]
    } else {
        vec![ALPN_HTTP1.to_vec()]
    };
    Ok(Some(Arc::new(server)))
}

/// Every certificate in the PEM file `path` (at least one).
fn certificates(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bad = |e: String| {
        refused(
            setting,
            path,
            format!("a readable PEM certificate file ({e})"),
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no CERTIFICATE block found".to_owned()));
    }
    Ok(certs)
}

/// rustls' ring provider, its cipher suites narrowed to `ciphers` (IANA
/// names such as `TLS13_AES_128_GCM_SHA256` or
/// `TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256`, `:`- or `,`-separated) when set.
/// OpenSSL cipher strings are not understood: rustls has no such language.
fn provider(ciphers: Option<&str>) -> Result<CryptoProvider, ConfigError> {
    let mut provider = rustls::crypto::ring::default_provider();
    let Some(list) = ciphers else {
        return Ok(provider);
    };
    let known = |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite());
    let mut chosen = Vec::new();
    for name in list
        .split([':', ','])
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        match provider.cipher_suites.iter().find(|s| known(s) == name) {
            Some(s) if !chosen.contains(s) => chosen.push(*s),
            Some(_) => {}
            None => {
                let names: Vec<String> = provider.cipher_suites.iter().map(known).collect();
                return Err(ConfigError::invalid(
                    "ciphers",
                    list,
                    format!("cipher suites among {}", names.join(", ")),
                ));
            }
        }
    }
    if chosen.is_empty() {
        return Err(ConfigError::invalid(
            "ciphers",
            list,
            "at least one cipher suite",
        ));
    }
    provider.cipher_suites = chosen;
    Ok(provider)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::RawSettings;

    fn config(pairs: &[(&str, &str)]) -> Config {
        let mut raw = RawSettings::default();
        for (k, v) in pairs {
            raw.set(k, v).unwrap();
        }
        Config::resolve(raw, None).unwrap()
    }

    fn setting_of(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Invalid { setting, .. } => setting,
            other => panic!("{other}"),
        }
    }

    /// A self-signed certificate and its key, in `dir`.
    fn pair(dir: &Path, name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let c = dir.join(format!("{name}.crt"));
        let k = dir.join(format!("{name}.key"));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    }

    #[test]
    fn no_files_is_plain_http_and_a_pair_is_tls_with_alpn() {
        assert!(server_config(&config(&[]), true).unwrap().is_none());
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = pair(dir.path(), "a");
        let cfg = config(&[("certfile", &c), ("keyfile", &k)]);
        let tls = server_config(&cfg, true).unwrap().unwrap();
        assert_eq!(tls.alpn_protocols, [b"h2".to_vec(), b"http/1.1".to_vec()]);
        let tls = server_config(&cfg, false).unwrap().unwrap();
        assert_eq!(tls.alpn_protocols, [b"http/1.1".to_vec()]);
    }

    #[test]
    fn bad_files_name_their_setting() {
        let dir = tempfile::tempdir().unwrap();
        let (c, k) = pair(dir.path(), "a");
        let (c2, k2) = pair(dir.path(), "b");
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let junk = junk.display().to_string();
        let missing = dir.path().join("missing.pem").display().to_string();
        let cases: [(&[(&str, &str)], &str); 9] = [
            (&[("certfile", &c)], "keyfile"),
            (&[("keyfile", &k)], "certfile"),
            (&[("certfile", &missing), ("keyfile", &k)], "certfile"),
            (&[("certfile", &junk), ("keyfile", &k)], "certfile"),
            (&[("certfile", &c), ("keyfile", &junk)], "keyfile"),
            (&[("certfile", &c), ("keyfile", &k2)], "keyfile"),
            (
                &[("certfile", &c), ("keyfile", &k), ("cert_reqs", "required")],
                "ca_certs",
            ),
            (
                &[
                    ("certfile", &c),
                    ("keyfile", &k),
                    ("cert_reqs", "optional"),
                    ("ca_certs", &junk),
                ],
                "ca_certs",
            ),
            (
                &[("certfile", &c), ("keyfile", &k), ("ciphers", "RC4-MD5")],
                "ciphers",
            ),
        ];
        for (pairs, want) in cases {
            let e = server_config(&config(pairs), true).unwrap_err();
            assert_eq!(setting_of(e), want, "{pairs:?}");
        }
        // A client CA and a chosen suite are accepted.
        let cfg = config(&[
            ("certfile", &c),
            ("keyfile", &k),
            ("cert_reqs", "required"),
            ("ca_certs", &c2),
            (
                "ciphers",
                "TLS13_AES_128_GCM_SHA256:TLS13_CHACHA20_POLY1305_SHA256",
            ),
        ]);
        assert!(server_config(&cfg, true).unwrap().is_some());
    }
}
