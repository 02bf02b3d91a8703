//! The limits of a request head (`limit_request_line`,
//! `limit_request_field_size`, and the head budget `limit_request_head`),
//! checked once hyper has parsed the head.

use http::StatusCode;

use super::head::HeadScan;

use crate::config::Config;

/// The per-line limits of a request head (`limit_request_line`,
/// `limit_request_field_size`). hyper caps only the whole head
/// ([`Config::max_head_bytes`]), so gpe checks each line once hyper has
/// parsed it, before the body is read or the app is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// Longest request line (`METHOD SP target SP HTTP/x.y`), without CRLF.
    pub line: usize,
    /// Longest header line (`name: value` and its CRLF), as Gunicorn counts
    /// `limit_request_field_size`.
    pub field: usize,
    /// Largest whole head (request line, header lines, their CRLFs and the
    /// blank line): `limit_request_head`. hyper's buffer bound is the same
    /// figure but soft (one read may take it past it), so it is checked here.
    pub head: usize,
}

impl HeadLimits {
    /// The limits set by `config`.
    pub fn from_config(config: &Config) -> HeadLimits {
        HeadLimits {
            line: config.limit_request_line,
            field: config.limit_request_field_size,
            head: config.limit_request_head,
        }
    }

    /// `414 URI Too Long` for a request line over the limit, `431 Request
    /// Header Fields Too Large` for a header field or a whole head over its
    /// limit, else `None`.
    pub fn check(&self, parts: &http::request::Parts) -> Option<StatusCode> {
        self.check_scanned(parts, &HeadScan::of(&parts.headers))
    }

    /// [`check`](Self::check) with the header lines already walked.
    pub(crate) fn check_scanned(
        &self,
        parts: &http::request::Parts,
        scan: &HeadScan<'_>,
    ) -> Option<StatusCode> {
        let uri = &parts.uri;
        let target = uri.scheme_str().map_or(0, |s| s.len() + 3)
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        // Two spaces and "HTTP/1.1".
        let line = parts.method.as_str().len() + target + 10;
        if line > self.line {
            return Some(StatusCode::URI_TOO_LONG);
        }
        // Header lines count "name: value" and CRLF, as Gunicorn counts them;
        // the head adds the request line's CRLF and the blank line.
        let total = (line + 2 + 2).saturating_add(scan.lines);
        (scan.widest > self.field || total > self.head)
            .then_some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(method: &str, uri: &str, headers: &[(&str, &str)]) -> http::request::Parts {
        let mut b = http::Request::builder().method(method).uri(uri);
        for (n, v) in headers {
            b = b.header(*n, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    const LIMITS: HeadLimits = HeadLimits {
        line: 100,
        field: 50,
        head: 200,
    };

    #[test]
    fn the_head_budget_counts_every_line_and_the_blank_one() {
        // "GET / HTTP/1.1" CRLF (16), four 40-byte fields (160), CRLF (2): 178.
        let v = "v".repeat(40 - 5 - 2);
        let mut at = vec![("x-a", v.as_str()), ("x-b", &v), ("x-c", &v), ("x-d", &v)];
        // And 22 bytes more: exactly 200.
        let fill = "f".repeat(22 - 7);
        at.push(("x-e", &fill));
        assert_eq!(LIMITS.check(&parts("GET", "/", &at)), None);
        let more = format!("{fill}f");
        at[4] = ("x-e", &more);
        assert_eq!(
            LIMITS.check(&parts("GET", "/", &at)),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
    }

    #[test]
    fn the_request_line_limit_counts_method_target_and_version() {
        // "GET " + target + " HTTP/1.1" is 13 bytes plus the target.
        let at = format!("/{}", "a".repeat(100 - 13 - 1));
        assert_eq!(LIMITS.check(&parts("GET", &at, &[])), None);
        let over = format!("{at}a");
        assert_eq!(
            LIMITS.check(&parts("GET", &over, &[])),
            Some(StatusCode::URI_TOO_LONG)
        );
        // The query counts; so do scheme and authority in absolute form.
        let with_query = format!("/?{}", "q".repeat(100 - 13 - 1));
        assert_eq!(
            LIMITS.check(&parts("GET", &with_query, &[])),
            Some(StatusCode::URI_TOO_LONG)
        );
        let absolute = format!("http://example.com/{}", "a".repeat(100 - 13 - 19));
        assert_eq!(LIMITS.check(&parts("GET", &absolute, &[])), None);
        let absolute = format!("{absolute}a");
        assert_eq!(
            LIMITS.check(&parts("GET", &absolute, &[])),
            Some(StatusCode::URI_TOO_LONG)
        );
    }

    #[test]
    fn other_request_target_forms_count_as_sent() {
        // CONNECT host:port (authority-form) and OPTIONS * (asterisk-form).
        let authority = format!("{}.example:443", "h".repeat(100 - 17 - 12));
        assert_eq!(LIMITS.check(&parts("CONNECT", &authority, &[])), None);
        assert_eq!(
            LIMITS.check(&parts("CONNECT", &format!("h{authority}"), &[])),
            Some(StatusCode::URI_TOO_LONG)
        );
        assert_eq!(LIMITS.check(&parts("OPTIONS", "*", &[])), None);
    }

    #[test]
    fn the_field_limit_counts_name_separator_value_and_crlf() {
        // "x-a: " is 5 bytes, CRLF 2.
        let at = "v".repeat(50 - 5 - 2);
        assert_eq!(LIMITS.check(&parts("GET", "/", &[("x-a", &at)])), None);
        let over = format!("{at}v");
        assert_eq!(
            LIMITS.check(&parts("GET", "/", &[("host", "h"), ("x-a", &over)])),
            Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
        );
        // The request line is checked first.
        let long = format!("/{}", "a".repeat(100));
        assert_eq!(
            LIMITS.check(&parts("GET", &long, &[("x-a", &over)])),
            Some(StatusCode::URI_TOO_LONG)
        );
    }
}

/// Property tests: for any request head in the forms RFC 9112 allows, the
/// checks agree with the lengths of the lines as they are sent on the wire
/// (request line without its CRLF; `name: value` with its CRLF), and they
/// never panic.
#[cfg(test)]
mod props {
    use http::{header, HeaderValue};
    use proptest::prelude::*;

    use super::*;

    /// A request target in one of the four forms (RFC 9112 §3.2).
    fn a_target() -> impl Strategy<Value = String> {
        prop_oneof![
            "/[a-zA-Z0-9._~%!$&'()*+,;=:@/-]{0,300}(\\?[a-zA-Z0-9=&/?]{0,100})?",
            "https?://[a-z0-9.-]{1,40}(:[0-9]{1,5})?/[a-z0-9/]{0,200}",
            "[a-z0-9.-]{1,60}:[0-9]{1,5}",
            Just("*".to_owned()),
        ]
    }

    /// Header lines as a client sends them, `name: value` (one SP after the
    /// colon, no trailing whitespace).
    fn headers() -> impl Strategy<Value = Vec<(String, String)>> {
        proptest::collection::vec(
            ("[a-z][a-z0-9-]{0,40}", "([!-~]([ !-~]{0,300}[!-~])?)?"),
            0..8,
        )
    }

    fn config() -> ProptestConfig {
        ProptestConfig {
            cases: 512,
            failure_persistence: None,
            ..ProptestConfig::default()
        }
    }

    proptest! {
        #![proptest_config(config())]

        #[test]
        fn the_checks_agree_with_the_lines_on_the_wire(
            method in "[A-Z]{1,10}",
            target in a_target(),
            headers in headers(),
            line in 64usize..600,
            field in 64usize..400,
        ) {
            let Ok(mut b) = http::Request::builder()
                .method(method.as_str())
                .uri(target.as_str())
                .body(())
                .map(|r| r.into_parts().0)
            else {
                // Not a head hyper would hand over.
                return Ok(());
            };
            for (n, v) in &headers {
                b.headers.append(
                    header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_str(v).unwrap(),
                );
            }
            let request_line = format!("{method} {target} HTTP/1.1").len();
            let longest_field = headers
                .iter()
                .map(|(n, v)| format!("{n}: {v}\r\n").len())
                .max()
                .unwrap_or(0);
            let want = if request_line > line {
                Some(StatusCode::URI_TOO_LONG)
            } else if longest_field > field {
                Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE)
            } else {
                None
            };
            // No whole-head budget here: the per-line checks alone.
            let limits = HeadLimits { line, field, head: usize::MAX };
            prop_assert_eq!(limits.check(&b), want);
        }
    }
}
