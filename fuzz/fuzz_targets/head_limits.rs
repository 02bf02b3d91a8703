//! Any bytes as a request head, parsed by httparse (hyper's parser) and
//! turned into the `http::request::Parts` hyper would hand over: the
//! head-limit checks never panic and agree with the lengths of the lines
//! sent (request line without CRLF, `name: value` with it). The first two
//! bytes pick the limits.
#![no_main]

use gpe_core::HeadLimits;
use http::StatusCode;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [a, b, raw @ ..] = data else { return };
    let limits = HeadLimits {
        line: 64 + usize::from(*a) * 4,
        field: 64 + usize::from(*b) * 4,
        // No whole-head budget: the per-line checks alone.
        head: usize::MAX,
    };
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut fields);
    let Ok(httparse::Status::Complete(_)) = req.parse(raw) else {
        return;
    };
    let (Some(method), Some(target), Some(1)) = (req.method, req.path, req.version) else {
        return;
    };
    let mut builder = http::Request::builder().method(method).uri(target);
    for h in req.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    let Ok(parts) = builder.body(()).map(|r| r.into_parts().0) else {
        return;
    };
    let got = limits.check(&parts);
    // The target as hyper keeps it may be shorter than sent (never longer),
    // so only a line within the limit as sent is sure to pass.
    let line = method.len() + 1 + target.len() + 9;
    let longest = req
        .headers
        .iter()
        .map(|h| h.name.len() + 2 + h.value.len() + 2)
        .max()
        .unwrap_or(0);
    if line <= limits.line && parts.uri.to_string() == target {
        assert_ne!(got, Some(StatusCode::URI_TOO_LONG), "{line} <= {}", limits.line);
        if longest <= limits.field {
            assert_eq!(got, None);
        } else {
            assert_eq!(got, Some(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
    }
});
