//! Helpers for the tests of real apps (the axum example): locating its
//! binary, streaming large bodies both ways over raw sockets, reading
//! chunked and server-sent-event streams, and sampling a worker's resident
//! memory while a transfer runs.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::http::{http, read_head, Head, Resp};
use crate::metrics::Metrics;
use crate::server::Server;
use crate::wait::wait_until;

/// The worker types that keep connections open while a request runs
/// (SSE, WebSocket).
pub const ASYNC_WORKERS: [&str; 3] = ["thread", "eventloop", "greenlet"];

/// Generates one `#[test]` per worker type except sync, calling `$body(worker)`.
#[macro_export]
macro_rules! per_async_worker {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn thread() { super::$name("thread") }
                #[test]
                fn eventloop() { super::$name("eventloop") }
                #[test]
                fn greenlet() { super::$name("greenlet") }
            }
        )*
    };
}

/// The `gpe-axum-app` binary (examples/axum-app).
///
/// # Panics
/// If it has not been built.
pub fn axum_app_bin() -> String {
    example_bin("gpe-axum-app", "gpe-example-axum-app")
}

/// The binary `name` of the example package `package`, a sibling of the
/// target directory of the running test executable (`target/<profile>/deps/..`).
///
/// # Panics
/// If it has not been built.
pub fn example_bin(name: &str, package: &str) -> String {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(PathBuf::from)
        .unwrap();
    let bin = profile_dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: build the example first (`cargo build -p {package}`, \
         or run the tests with `--workspace`)",
        bin.display()
    );
    bin.to_str().unwrap().to_owned()
}

/// 1 MiB: the buffer size of every large transfer.
pub const MIB: usize = 1 << 20;

/// Opens a connection with 30 s timeouts both ways.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

/// Consumes `n` bytes of `r` without copying them, calling `seen` with each
/// slice.
fn skip(r: &mut impl BufRead, mut n: u64, seen: &mut impl FnMut(&[u8])) -> std::io::Result<()> {
    while n > 0 {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let take = buf.len().min(usize::try_from(n).unwrap_or(usize::MAX));
        seen(&buf[..take]);
        r.consume(take);
        n -= take as u64;
    }
    Ok(())
}

/// Reads a response body as `head` frames it (Content-Length, chunked, or
/// to the end of the stream), calling `seen` with every piece of data;
/// returns the number of body bytes.
pub fn read_body(
    r: &mut impl BufRead,
    head: &Head,
    mut seen: impl FnMut(&[u8]),
) -> std::io::Result<u64> {
    if let Some(n) = head
        .header("content-length")
        .and_then(|v| v.parse::<u64>().ok())
    {
        skip(r, n, &mut seen)?;
        return Ok(n);
    }
    if head.chunked() {
        let mut total = 0;
        let mut line = String::new();
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = line.trim().split(';').next().unwrap_or("");
            let n = u64::from_str_radix(size, 16).map_err(std::io::Error::other)?;
            if n == 0 {
                // Trailer section, up to the empty line.
                loop {
                    line.clear();
                    if r.read_line(&mut line)? == 0 || line.trim_end().is_empty() {
                        return Ok(total);
                    }
                }
            }
            skip(r, n, &mut seen)?;
            skip(r, 2, &mut |_| {})?;
            total += n;
        }
    }
    let mut total = 0;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(total);
        }
        let n = buf.len();
        seen(buf);
        r.consume(n);
        total += n as u64;
    }
}

/// `GET path` on a new connection (`Connection: close`), counting the body
/// bytes with a 1 MiB buffer; checks that every byte is `fill`.
pub fn download(addr: SocketAddr, path: &str, fill: u8) -> (Head, u64) {
    let mut s = connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::with_capacity(MIB, s);
    let head = read_head(&mut r).unwrap();
    // Compared with memcmp: a byte loop is slow in a debug build.
    let want = vec![fill; MIB];
    let mut wrong = 0u64;
    let n = read_body(&mut r, &head, |b| {
        for piece in b.chunks(MIB) {
            if piece != &want[..piece.len()] {
                wrong += 1;
            }
        }
    })
    .unwrap();
    assert_eq!(wrong, 0, "every byte of {path} is {fill:?}");
    (head, n)
}

/// `POST path` with a `Content-Length` body of `len` zero bytes, written in
/// 1 MiB pieces on a new connection (`Connection: close`); returns the
/// response.
pub fn upload(addr: SocketAddr, path: &str, len: u64) -> Resp {
    let mut s = connect(addr);
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len}\r\n\
         Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let buf = vec![0u8; MIB];
    let mut left = len;
    while left > 0 {
        let n = left.min(MIB as u64) as usize;
        s.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    let mut r = BufReader::new(s);
    let head = read_head(&mut r).unwrap();
    let mut body = Vec::new();
    read_body(&mut r, &head, |b| body.extend_from_slice(b)).unwrap();
    Resp {
        status: head.status,
        headers: head.headers,
        body,
    }
}

/// Scrapes `metrics` in a background thread every 20 ms, keeping the value
/// of the one `gpe_worker_resident_memory_bytes` sample, until stopped.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Vec<f64>>>,
}

impl RssSampler {
    pub fn start(metrics: SocketAddr) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut seen = Vec::new();
            while !flag.load(Ordering::Relaxed) && Instant::now() < deadline {
                if let Ok(r) = http(metrics, "GET", "/metrics", &[], b"") {
                    let m = Metrics::parse(&String::from_utf8_lossy(&r.body));
                    seen.push(m.one("gpe_worker_resident_memory_bytes", &[]));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            seen
        });
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling; returns every value seen.
    pub fn finish(mut self) -> Vec<f64> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One server-sent event's `data` and when it arrived.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub data: String,
    pub at: Instant,
}

/// Reads the events of an SSE response (chunked) until the stream ends,
/// calling `on_event` with each as it arrives. Returns the head and the
/// events in order of arrival.
pub fn read_sse(
    addr: SocketAddr,
    path: &str,
    mut on_event: impl FnMut(&SseEvent),
) -> (Head, Vec<SseEvent>) {
    let mut s = connect(addr);
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let head = read_head(&mut r).unwrap();
    let mut events = Vec::new();
    let mut pending = Vec::new();
    read_body(&mut r, &head, |b| {
        pending.extend_from_slice(b);
        // Events end with an empty line.
        while let Some(end) = pending.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = pending.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&event);
            let data = text
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect::<Vec<_>>()
                .join("\n");
            let event = SseEvent {
                data,
                at: Instant::now(),
            };
            on_event(&event);
            events.push(event);
        }
    })
    .unwrap();
    assert!(
        pending.is_empty(),
        "an incomplete event at the end: {pending:?}"
    );
    (head, events)
}

/// Waits (up to 20 s) until the sum of the samples of `name` matching
/// `labels` equals `want`; unlike [`Server::wait_for`] it also waits while no
/// such series exists yet. Panics with the last sum seen otherwise.
pub fn wait_sum(s: &Server, name: &str, labels: &[(&str, &str)], want: f64) {
    let mut last = None;
    let ok = wait_until(Duration::from_secs(20), || {
        last = s.try_scrape().ok().map(|m| m.sum(name, labels));
        last == Some(want)
    });
    assert!(
        ok,
        "{name}{labels:?} sums to {last:?}, expected {want}; log:\n{}",
        s.log()
    );
}
