//! The header lines of a request head that gpe checks, found in one pass.
//!
//! Each `HeaderMap` lookup hashes its name, and a name given as a string
//! (`traceparent`) is parsed first: five lookups and the limits' two walks
//! per request cost more than one walk over the few lines a request carries.

use http::{header, HeaderMap, HeaderValue};

/// What one walk over a request's header lines finds.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct HeadScan<'a> {
    /// The first `Host` value.
    pub host: Option<&'a HeaderValue>,
    /// How many `Host` lines there are, counted up to 2.
    pub hosts: u8,
    /// The first `Content-Length` value.
    pub content_length: Option<&'a HeaderValue>,
    /// The first `traceparent` value.
    pub traceparent: Option<&'a HeaderValue>,
    /// Whether an `Upgrade` line is present.
    pub upgrade: bool,
    /// How many times `chunked` is named across the `Transfer-Encoding` lines.
    pub chunked: usize,
    /// The longest header line, `name: value` and its CRLF.
    pub widest: usize,
    /// All header lines together, each with its CRLF.
    pub lines: usize,
}

impl<'a> HeadScan<'a> {
    /// Walks `headers` once.
    pub(crate) fn of(headers: &'a HeaderMap) -> HeadScan<'a> {
        let mut s = HeadScan::default();
        for (name, value) in headers {
            let line = name.as_str().len() + 2 + value.len() + 2;
            s.widest = s.widest.max(line);
            s.lines = s.lines.saturating_add(line);
            if *name == header::HOST {
                s.host = s.host.or(Some(value));
                s.hosts = s.hosts.saturating_add(1).min(2);
            } else if *name == header::CONTENT_LENGTH {
                s.content_length = s.content_length.or(Some(value));
            } else if *name == header::TRANSFER_ENCODING {
                s.chunked += value
                    .as_bytes()
                    .split(|b| *b == b',')
                    .filter(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
                    .count();
            } else if *name == header::UPGRADE {
                s.upgrade = true;
            } else if name.as_str() == "traceparent" {
                s.traceparent = s.traceparent.or(Some(value));
            }
        }
        s
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn map(lines: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (n, v) in lines {
            m.append(
                header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn one_walk_finds_what_the_lookups_would() {
        let m = map(&[
            ("Host", "a"),
            ("x-other", "1"),
            ("host", "b"),
            ("Content-Length", "5"),
            ("content-length", "6"),
            ("TraceParent", "00-t"),
            ("traceparent", "00-u"),
            ("transfer-encoding", "gzip, Chunked"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
        ]);
        let s = HeadScan::of(&m);
        assert_eq!(s.host, m.get(header::HOST));
        assert_eq!(s.hosts, 2);
        assert_eq!(s.content_length, m.get(header::CONTENT_LENGTH));
        assert_eq!(s.traceparent, m.get("traceparent"));
        assert_eq!(s.traceparent.unwrap(), "00-t");
        assert!(s.upgrade);
        assert_eq!(s.chunked, 2);
        let lines: Vec<usize> = m
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .collect();
        assert_eq!(s.widest, *lines.iter().max().unwrap());
        assert_eq!(s.lines, lines.iter().sum::<usize>());
    }

    #[test]
    fn chunked_counts_across_lines_and_lists() {
        let twice = |h: &[(&str, &str)]| HeadScan::of(&map(h)).chunked > 1;
        assert!(!twice(&[("transfer-encoding", "chunked")]));
        assert!(!twice(&[("transfer-encoding", "gzip, chunked")]));
        assert!(twice(&[("transfer-encoding", "chunked, chunked")]));
        assert!(twice(&[("transfer-encoding", "Chunked ,CHUNKED")]));
        assert!(twice(&[
            ("transfer-encoding", "chunked"),
            ("transfer-encoding", "chunked")
        ]));
    }

    #[test]
    fn an_empty_head_finds_nothing() {
        let m = HeaderMap::new();
        let s = HeadScan::of(&m);
        assert_eq!((s.host, s.hosts, s.upgrade, s.chunked), (None, 0, false, 0));
        assert_eq!((s.widest, s.lines), (0, 0));
        assert!(s.content_length.is_none() && s.traceparent.is_none());
    }
}
