//! The request corpus (`tests/requests/`, described in docs/http.md): every
//! case on every worker type, fed whole, byte by byte, and in chunks of
//! random sizes from a fixed seed. Each feeding must get the statuses of the
//! case's expectation file, close the connection or keep it usable as that
//! file says, and move `gpe_http_requests_total` and `gpe_http_errors_total`
//! by exactly what it says, no more.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use gpe_tests::*;
use rand::{Rng, SeedableRng};
use serde::Deserialize;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");

/// The limits the corpus's limit cases are written against.
const LIMITS: &[&str] = &[
    "--limit-request-line",
    "128",
    "--limit-request-fields",
    "10",
    "--limit-request-field-size",
    "128",
    "--max-body-size",
    "64",
];

/// The seed of the random chunk sizes (mixed with each case's name).
const SEED: u64 = 0x6770_655f_636f_7270;

/// How long one read may wait for the server.
const READ_LIMIT: Duration = Duration::from_secs(10);

per_worker!(corpus);

/// An expectation file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    /// Whether the server closes the connection after the last response.
    close: bool,
    response: Vec<Answer>,
    /// What the sync worker does instead, if it differs by more than the
    /// rule in [`Expect::for_worker`].
    sync: Option<Outcome>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Outcome {
    close: bool,
    response: Vec<Answer>,
}

/// One response, in order, and what it counts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    status: u16,
    /// Interim (1xx) statuses before it.
    #[serde(default)]
    interim: Vec<u16>,
    /// The response has no content whatever its header fields say (HEAD,
    /// a 2xx to CONNECT).
    #[serde(default)]
    bodyless: bool,
    method: String,
    route: String,
    /// The `kind` counted in `gpe_http_errors_total`, if any.
    kind: Option<String>,
    /// False when hyper's parser refused the head: no request is counted,
    /// only the error.
    #[serde(default = "yes")]
    counted: bool,
}

fn yes() -> bool {
    true
}

impl Expect {
    /// The outcome on `worker`. The sync worker keeps no connection alive:
    /// unless the file says otherwise, it answers the first request and
    /// closes.
    fn for_worker(&self, worker: &str) -> Outcome {
        match (&self.sync, worker) {
            (Some(o), "sync") => o.clone(),
            (None, "sync") => Outcome {
                close: true,
                response: self.response[..1].to_vec(),
            },
            _ => Outcome {
                close: self.close,
                response: self.response.clone(),
            },
        }
    }
}

struct Case {
    name: String,
    raw: Vec<u8>,
    expect: Expect,
}

/// Every case of `tests/requests/{valid,invalid}`, sorted by name.
fn cases() -> Vec<Case> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("requests");
    let mut out = Vec::new();
    for dir in ["valid", "invalid"] {
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "http"))
            .collect();
        files.sort();
        for http in files {
            let name = format!("{dir}/{}", http.file_stem().unwrap().to_string_lossy());
            let text = std::fs::read(&http).unwrap();
            let raw = decode(&text).unwrap_or_else(|e| panic!("{name}.http: {e}"));
            let toml = std::fs::read_to_string(http.with_extension("toml"))
                .unwrap_or_else(|e| panic!("{name}.toml: {e}"));
            let expect: Expect =
                toml::from_str(&toml).unwrap_or_else(|e| panic!("{name}.toml: {e}"));
            assert!(!expect.response.is_empty(), "{name}.toml: no response");
            out.push(Case { name, raw, expect });
        }
    }
    assert!(out.len() > 50, "the corpus has {} cases", out.len());
    out
}

/// The bytes a `.http` file stands for: the file's own line breaks are
/// dropped, and every byte on the wire is written out: `\r`, `\n`, `\t`,
/// `\0`, `\xHH`, `\\`, `\{`; `{{N*text}}` is `text` (escapes and all)
/// repeated N times.
fn decode(text: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < text.len() {
        match text[i] {
            b'\n' => i += 1,
            b'\r' => return Err("a raw CR: write \\r".into()),
            b'\\' => {
                let (byte, len) = match text.get(i + 1) {
                    Some(b'r') => (b'\r', 2),
                    Some(b'n') => (b'\n', 2),
                    Some(b't') => (b'\t', 2),
                    Some(b'0') => (0, 2),
                    Some(b'\\') => (b'\\', 2),
                    Some(b'{') => (b'{', 2),
                    Some(b'x') => {
                        let hex = text.get(i + 2..i + 4).ok_or("a cut \\x escape")?;
                        let hex = std::str::from_utf8(hex).map_err(|e| e.to_string())?;
                        (u8::from_str_radix(hex, 16).map_err(|e| e.to_string())?, 4)
                    }
                    other => return Err(format!("unknown escape \\{other:?}")),
                };
                out.push(byte);
                i += len;
            }
            b'{' if text[i..].starts_with(b"{{") => {
                let end = text[i..]
                    .windows(2)
                    .position(|w| w == b"}}")
                    .ok_or("an unclosed {{")?;
                let inner = &text[i + 2..i + end];
                let star = inner
                    .iter()
                    .position(|b| *b == b'*')
                    .ok_or("{{ without *")?;
                let n: usize = std::str::from_utf8(&inner[..star])
                    .map_err(|e| e.to_string())?
                    .parse()
                    .map_err(|e| format!("{{{{N*..}}}}: {e}"))?;
                out.extend(decode(&inner[star + 1..])?.repeat(n));
                i += end + 2;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy)]
enum Feed {
    Whole,
    ByteByByte,
    RandomChunks,
}

/// The pieces `raw` is written in.
fn pieces<'a>(raw: &'a [u8], feed: Feed, name: &str) -> Vec<&'a [u8]> {
    match feed {
        Feed::Whole => vec![raw],
        Feed::ByteByByte => raw.chunks(1).collect(),
        Feed::RandomChunks => {
            // FNV-1a of the name: each case its own fixed sequence.
            let mix = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            let mut rng = rand::rngs::StdRng::seed_from_u64(SEED ^ mix);
            let mut out = Vec::new();
            let mut rest = raw;
            while !rest.is_empty() {
                let n = rng.random_range(1..=16).min(rest.len());
                let (piece, tail) = rest.split_at(n);
                out.push(piece);
                rest = tail;
            }
            out
        }
    }
}

/// A stream that yields what was read while writing, then the socket.
struct Replay {
    early: std::io::Cursor<Vec<u8>>,
    stream: TcpStream,
}

impl Read for Replay {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.early.read(buf)? {
            0 => self.stream.read(buf),
            n => Ok(n),
        }
    }
}

/// Reads whatever the server has sent so far without waiting.
fn drain_now(s: &TcpStream, into: &mut Vec<u8>) {
    s.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match (&*s).read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => into.extend_from_slice(&buf[..n]),
        }
    }
    s.set_nonblocking(false).unwrap();
}

/// One response off `r`: its status, interim statuses, and whether the
/// connection ended while its body was read to the end of the stream.
fn read_answer(r: &mut impl BufRead, bodyless: bool) -> Result<(u16, Vec<u16>), String> {
    let mut interim = Vec::new();
    loop {
        let head = read_head(r).map_err(|e| format!("reading a response head: {e}"))?;
        if (100..200).contains(&head.status) {
            interim.push(head.status);
            continue;
        }
        if !bodyless {
            if let Some(n) = head
                .header("content-length")
                .map(|v| v.parse::<usize>().map_err(|e| e.to_string()))
                .transpose()?
            {
                let mut body = vec![0; n];
                r.read_exact(&mut body)
                    .map_err(|e| format!("reading a {n}-byte body: {e}"))?;
            } else if head.chunked() {
                return Err("a chunked response: the corpus app sends none".into());
            }
        }
        return Ok((head.status, interim));
    }
}

/// Whether the server closes `r` (end of stream or reset) with nothing more
/// to read.
fn closes(r: &mut impl BufRead) -> Result<(), String> {
    let mut rest = Vec::new();
    match r.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Ok(()),
        Ok(_) => Err(format!(
            "more bytes before the close: {:?}",
            String::from_utf8_lossy(&rest)
        )),
        Err(e) if e.kind() == ErrorKind::ConnectionReset && rest.is_empty() => Ok(()),
        Err(e) => Err(format!("no close within {READ_LIMIT:?}: {e}")),
    }
}

/// The request sent on a connection that must still be usable.
const PROBE: &[u8] = b"GET / HTTP/1.1\r\nHost: probe\r\nConnection: close\r\n\r\n";

/// Feeds one case on a new connection and checks what comes back.
fn feed(addr: SocketAddr, raw: &[u8], pieces: &[&[u8]], want: &Outcome) -> Result<(), String> {
    let s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(READ_LIMIT)).unwrap();
    // What the server sends while the case is written is read at once, so
    // that a close under a client still writing loses no response.
    let mut early = Vec::new();
    let mut written = 0;
    for piece in pieces {
        if (&s).write_all(piece).is_err() {
            break;
        }
        written += piece.len();
        if pieces.len() > 1 {
            drain_now(&s, &mut early);
        }
    }
    let mut r = BufReader::new(Replay {
        early: std::io::Cursor::new(early),
        stream: s.try_clone().unwrap(),
    });
    for (i, a) in want.response.iter().enumerate() {
        let (status, interim) = read_answer(&mut r, a.bodyless).map_err(|e| {
            format!(
                "response {}: {e} ({written} of {} bytes written)",
                i + 1,
                raw.len()
            )
        })?;
        if (status, &interim) != (a.status, &a.interim) {
            return Err(format!(
                "response {}: status {status} after {interim:?}, expected {} after {:?}",
                i + 1,
                a.status,
                a.interim
            ));
        }
    }
    if want.close {
        closes(&mut r)
    } else {
        // Still usable: one more request is answered on it.
        (&s).write_all(PROBE)
            .map_err(|e| format!("the connection is not usable: {e}"))?;
        let (status, _) =
            read_answer(&mut r, false).map_err(|e| format!("the probe after the case: {e}"))?;
        if status != 200 {
            return Err(format!("the probe after the case got {status}"));
        }
        closes(&mut r)
    }
}

type Counts = BTreeMap<(String, String, String), f64>;

/// The non-zero samples of `family` by the labels `method`, `route`, `third`.
fn counted(m: &Metrics, family: &str, third: &str) -> Counts {
    let mut out = Counts::new();
    for (labels, v) in m.samples(family) {
        if v != 0.0 {
            let key = (
                labels["method"].clone(),
                labels["route"].clone(),
                labels[third].clone(),
            );
            *out.entry(key).or_default() += v;
        }
    }
    out
}

/// What the counters must read: requests by (method, route, status),
/// errors by (method, route, kind).
#[derive(Debug, Default, Clone, PartialEq)]
struct Totals {
    requests: Counts,
    errors: Counts,
}

impl Totals {
    fn add(&mut self, a: &Answer) {
        if a.counted {
            let key = (a.method.clone(), a.route.clone(), a.status.to_string());
            *self.requests.entry(key).or_default() += 1.0;
        }
        if let Some(kind) = &a.kind {
            let key = (a.method.clone(), a.route.clone(), kind.clone());
            *self.errors.entry(key).or_default() += 1.0;
        }
    }

    /// The probe's `GET /` answered 200.
    fn add_probe(&mut self) {
        let key = ("GET".to_owned(), "/".to_owned(), "200".to_owned());
        *self.requests.entry(key).or_default() += 1.0;
    }

    /// The series where `seen` differs from `self`, one a line.
    fn diff(&self, seen: &Totals) -> String {
        let mut out = String::new();
        for (family, want, got) in [
            ("requests", &self.requests, &seen.requests),
            ("errors", &self.errors, &seen.errors),
        ] {
            let keys: std::collections::BTreeSet<_> = want.keys().chain(got.keys()).collect();
            for k in keys {
                let (w, g) = (want.get(k), got.get(k));
                if w != g {
                    out.push_str(&format!("  {family} {k:?}: {g:?}, {w:?}\n"));
                }
            }
        }
        out
    }

    fn scraped(m: &Metrics) -> Totals {
        Totals {
            requests: counted(m, "gpe_http_requests_total", "status"),
            errors: counted(m, "gpe_http_errors_total", "kind"),
        }
    }
}

fn corpus(worker: &str) {
    let s = Server::start(TESTAPP, Opts::new(worker, 1).args(LIMITS));
    let mut want_totals = Totals::default();
    let mut failures = Vec::new();
    for case in cases() {
        let want = case.expect.for_worker(worker);
        for mode in [Feed::Whole, Feed::ByteByByte, Feed::RandomChunks] {
            let parts = pieces(&case.raw, mode, &case.name);
            if let Err(e) = feed(s.addr, &case.raw, &parts, &want) {
                failures.push(format!("{} ({mode:?}): {e}", case.name));
            }
            want.response.iter().for_each(|a| want_totals.add(a));
            if !want.close {
                want_totals.add_probe();
            }
            // The counts are exact after every feeding, so a miscount names
            // its case.
            let mut seen = Totals::default();
            let exact = wait_until(Duration::from_secs(10), || {
                let Ok(m) = s.try_scrape() else { return false };
                seen = Totals::scraped(&m);
                seen == want_totals
            });
            assert!(
                exact,
                "{worker}: after {} ({mode:?}) the counts differ (series: seen, expected):\n{}failures so far: {failures:#?}",
                case.name,
                want_totals.diff(&seen)
            );
        }
    }
    assert!(failures.is_empty(), "{worker}: {failures:#?}");
}

#[test]
fn the_decoder_reads_escapes_and_repeats() {
    assert_eq!(decode(b"a\\r\\n\nb").unwrap(), b"a\r\nb");
    assert_eq!(decode(b"\\0\\x7f\\t\\\\\\{").unwrap(), b"\0\x7f\t\\{");
    assert_eq!(decode(b"<{{3*a\\r}}>").unwrap(), b"<a\ra\ra\r>");
    assert!(decode(b"a\rb").is_err());
    assert!(decode(b"\\q").is_err());
    assert!(decode(b"{{3a}}").is_err());
}

#[test]
fn random_chunks_cover_the_case_in_order() {
    let raw: Vec<u8> = (0..=255).collect();
    for feed in [Feed::Whole, Feed::ByteByByte, Feed::RandomChunks] {
        let p = pieces(&raw, feed, "x");
        assert_eq!(p.concat(), raw);
        assert!(p.iter().all(|c| !c.is_empty()));
    }
    assert_eq!(
        pieces(&raw, Feed::RandomChunks, "x"),
        pieces(&raw, Feed::RandomChunks, "x"),
        "the same case is cut the same way every run"
    );
}
