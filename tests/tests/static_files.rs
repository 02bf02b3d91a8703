//! The built-in `static` app (`gpe serve --app static --root DIR`) on every
//! worker type: a 1 GiB file streams in bounded memory, HEAD does not read
//! the file, Range answers 206 with the exact bytes, and paths that leave the
//! root, dotfiles and FIFOs are refused.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use gpe_tests::*;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");
const GPE: &str = env!("CARGO_BIN_EXE_gpe-bin");

/// 1 GiB.
const BIG: u64 = 1 << 30;
/// The bound on the worker's resident memory while it streams `BIG`.
const RSS_LIMIT: f64 = 32.0 * 1024.0 * 1024.0;
/// The route label of every static response.
const ROUTE: &str = "/{path}";

/// `dir/root` with a sparse 1 GiB `big.bin`, a 1,000-byte `data.bin`, a
/// dotfile, a FIFO, a directory with an index, and `dir/secret` outside the
/// root with a symlink `root/link` to it.
fn tree() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("site")).unwrap();
    std::fs::File::create(root.join("big.bin"))
        .unwrap()
        .set_len(BIG)
        .unwrap();
    std::fs::write(root.join("data.bin"), data()).unwrap();
    std::fs::write(root.join(".env"), "KEY=1").unwrap();
    std::fs::write(root.join("site/index.html"), "<p>home</p>").unwrap();
    nix::unistd::mkfifo(
        &root.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    std::fs::write(dir.path().join("secret"), "outside").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), root.join("link")).unwrap();
    (dir, root)
}

fn data() -> Vec<u8> {
    (0..=255u8).cycle().skip(7).take(1000).collect()
}

fn start(worker: &str, root: &Path) -> Server {
    Server::start(
        TESTAPP,
        Opts {
            bin: Some(PathBuf::from(GPE)),
            // On sync `timeout` caps one request; a 1 GiB transfer on a busy
            // host may take longer than the default 30 s.
            ..Opts::new(worker, 1).args(&[
                "--app",
                "static",
                "--root",
                root.to_str().unwrap(),
                "--timeout",
                "300",
            ])
        },
    )
}

/// Sends one request (`Connection: close`) and reads until the server
/// closes: the status, the head's fields and every byte after the head.
fn raw(addr: SocketAddr, method: &str, path: &str, headers: &[&str]) -> Raw {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    let mut r = BufReader::new(s);
    let head = read_head(&mut r);
    let mut rest = Vec::new();
    r.read_to_end(&mut rest).unwrap();
    Raw { head, rest }
}

struct Raw {
    head: Head,
    /// Everything the server sent after the head.
    rest: Vec<u8>,
}

struct Head {
    status: u16,
    fields: Vec<(String, String)>,
}

impl Head {
    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn read_head(r: &mut impl BufRead) -> Head {
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut fields = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        fields.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Head { status, fields }
}

fn worker_rss(s: &Server) -> f64 {
    s.scrape()
        .one("gpe_worker_resident_memory_bytes", &[("worker", "0")])
}

fn large_file_streams_in_bounded_memory(worker: &str) {
    let (_dir, root) = tree();
    let s = start(worker, &root);
    let mut conn = TcpStream::connect_timeout(&s.addr, Duration::from_secs(5)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(b"GET /big.bin HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut r = BufReader::with_capacity(256 << 10, conn);
    let head = read_head(&mut r);
    assert_eq!(head.status, 200);
    assert_eq!(head.get("content-length"), Some("1073741824"));
    // Count every byte up to the close. At each 64 MiB the client stops
    // reading and samples the worker's memory, so samples are taken while
    // the worker is in the middle of the transfer.
    let mut total: u64 = 0;
    let mut rss = Vec::new();
    let mut next_sample: u64 = 64 << 20;
    let mut nonzero = false;
    let mut buf = vec![0u8; 256 << 10];
    let started = Instant::now();
    loop {
        let n = r.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        nonzero |= buf[..n].iter().any(|b| *b != 0);
        total += n as u64;
        if total >= next_sample && total < BIG {
            rss.push(worker_rss(&s));
            next_sample += 64 << 20;
        }
        assert!(
            started.elapsed() < Duration::from_secs(240),
            "{worker}: {total} bytes after 240 s"
        );
    }
    assert_eq!(total, BIG, "{worker}: the whole file, not a byte more");
    assert!(!nonzero, "{worker}: a sparse file reads as zeros");
    assert_eq!(rss.len(), 15, "{worker}: one sample per 64 MiB");
    let max = rss.iter().copied().fold(0.0, f64::max);
    assert!(
        max < RSS_LIMIT,
        "{worker}: worker RSS reached {max} bytes during the transfer: {rss:?}"
    );
    let labels = [("method", "GET"), ("route", ROUTE), ("status", "200")];
    s.wait_for("gpe_http_requests_total", &labels, 1.0);
    s.wait_for("gpe_http_response_size_bytes_sum", &[], BIG as f64);
}

fn head_range_and_refusals(worker: &str) {
    let (_dir, root) = tree();
    let s = start(worker, &root);

    // HEAD on the 1 GiB file: the length, no body, and the file is not
    // read (the worker's `rchar` grows by far less than the file).
    let pid = s.worker_pids()["0"];
    let read_chars = || {
        let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
        io.lines()
            .find_map(|l| l.strip_prefix("rchar: "))
            .unwrap()
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    let before = read_chars();
    for _ in 0..5 {
        let r = raw(s.addr, "HEAD", "/big.bin", &[]);
        assert_eq!(r.head.status, 200);
        assert_eq!(r.head.get("content-length"), Some("1073741824"));
        assert!(r.head.get("etag").unwrap().starts_with("W/\"40000000-"));
        assert!(r.head.get("last-modified").is_some());
        assert!(
            r.rest.is_empty(),
            "{worker}: HEAD sent {} bytes",
            r.rest.len()
        );
    }
    let read = read_chars() - before;
    assert!(read < 1 << 20, "{worker}: five HEADs read {read} bytes");

    // Range: exactly the bytes asked for, then the close.
    let r = raw(s.addr, "GET", "/big.bin", &["Range: bytes=0-9"]);
    assert_eq!(r.head.status, 206);
    assert_eq!(r.head.get("content-range"), Some("bytes 0-9/1073741824"));
    assert_eq!(r.rest, [0u8; 10]);
    let r = raw(s.addr, "GET", "/data.bin", &["Range: bytes=0-9"]);
    assert_eq!(r.head.status, 206);
    assert_eq!(r.rest, data()[..10]);
    let r = raw(s.addr, "GET", "/data.bin", &["Range: bytes=990-"]);
    assert_eq!(r.head.status, 206);
    assert_eq!(r.rest, data()[990..]);

    // ETag round trip.
    let r = raw(s.addr, "GET", "/data.bin", &[]);
    assert_eq!(r.head.status, 200);
    assert_eq!(r.rest, data());
    let tag = r.head.get("etag").unwrap().to_owned();
    let r = raw(
        s.addr,
        "GET",
        "/data.bin",
        &[&format!("If-None-Match: {tag}")],
    );
    assert_eq!(r.head.status, 304);
    assert!(r.rest.is_empty());

    // Refused: out of the root (403), dotfiles and a FIFO (404).
    for path in [
        "/../secret",
        "/%2e%2e/secret",
        "/a/%2e%2e/%2e%2e/secret",
        "/..%2fsecret",
        "/%2e%2e%2fsecret",
        "/site%2f..%2f..%2fsecret",
        "/link",
    ] {
        let r = raw(s.addr, "GET", path, &[]);
        assert_eq!(r.head.status, 403, "{worker}: {path}");
        assert_eq!(r.rest, b"Forbidden\n", "{worker}: {path}");
    }
    for path in ["/.env", "/%2eenv", "/pipe", "/missing"] {
        let r = raw(s.addr, "GET", path, &[]);
        assert_eq!(r.head.status, 404, "{worker}: {path}");
    }

    // Directories.
    let r = raw(s.addr, "GET", "/site", &[]);
    assert_eq!(r.head.status, 301);
    assert_eq!(r.head.get("location"), Some("/site/"));
    let r = raw(s.addr, "GET", "/site/", &[]);
    assert_eq!(r.head.status, 200);
    assert_eq!(r.rest, b"<p>home</p>");

    // Every response above is labelled with the one static route.
    let sent = 5 + 3 + 2 + 7 + 4 + 2;
    let counted = wait_until(Duration::from_secs(20), || {
        s.try_scrape()
            .is_ok_and(|m| m.sum("gpe_http_requests_total", &[]) == f64::from(sent))
    });
    let m = s.scrape();
    assert!(counted, "{worker}: {}", m.text);
    let routes: Vec<String> = m
        .samples("gpe_http_requests_total")
        .into_iter()
        .map(|(l, _)| l["route"].clone())
        .collect();
    assert!(routes.iter().all(|r| r == ROUTE), "{worker}: {routes:?}");
    for (status, n) in [
        ("200", 7.0),
        ("206", 3.0),
        ("304", 1.0),
        ("403", 7.0),
        ("404", 4.0),
        ("301", 1.0),
    ] {
        assert_eq!(
            m.sum("gpe_http_requests_total", &[("status", status)]),
            n,
            "{worker}: status {status}"
        );
    }
}

per_worker!(
    large_file_streams_in_bounded_memory,
    head_range_and_refusals
);
