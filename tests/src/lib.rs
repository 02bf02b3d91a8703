//! Test harness for black-box tests: starts the real `gpe` / `gpe-testapp`
//! binaries on loopback ports, talks HTTP/1.1 to them over raw sockets, parses
//! their `/metrics`, sends signals, and kills whatever it started on drop.
#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::unistd::Pid;

/// The four worker types.
pub const WORKERS: [&str; 4] = ["sync", "thread", "eventloop", "greenlet"];

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running server started by a test.
pub struct Server {
    pub child: Option<Child>,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
    pub dir: tempfile::TempDir,
    pub workers: u32,
}

/// Options for [`Server::start`].
#[derive(Debug, Clone)]
pub struct Opts {
    pub worker: String,
    pub workers: u32,
    pub extra: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Use the `gpe` binary (built-in app) instead of gpe-testapp.
    pub bin: Option<PathBuf>,
}

impl Opts {
    pub fn new(worker: &str, workers: u32) -> Opts {
        Opts {
            worker: worker.to_owned(),
            workers,
            extra: Vec::new(),
            env: Vec::new(),
            bin: None,
        }
    }

    pub fn arg(mut self, a: &str) -> Opts {
        self.extra.push(a.to_owned());
        self
    }

    pub fn args(mut self, a: &[&str]) -> Opts {
        self.extra.extend(a.iter().map(|s| (*s).to_owned()));
        self
    }
}

impl Server {
    /// Starts gpe-testapp (path given by the test binary) and waits until all
    /// workers are idle and `/metrics` answers.
    pub fn start(testapp: &str, opts: Opts) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mport = free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let metrics: SocketAddr = format!("127.0.0.1:{mport}").parse().unwrap();
        let bin = opts.bin.clone().unwrap_or_else(|| PathBuf::from(testapp));
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let mut cmd = Command::new(bin);
        if opts.bin.is_some() {
            cmd.arg("serve");
        }
        cmd.args(["--bind", &addr.to_string()])
            .args(["--metrics-bind", &metrics.to_string()])
            .args(["-w", &opts.workers.to_string()])
            .args(["-k", &opts.worker])
            .args([
                "--metrics-dir",
                dir.path().join("metrics").to_str().unwrap(),
            ])
            .args(&opts.extra)
            .envs(opts.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let child = cmd.spawn().unwrap();
        let server = Server {
            child: Some(child),
            addr,
            metrics,
            dir,
            workers: opts.workers,
        };
        server.wait_ready(opts.workers);
        server
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.as_ref().unwrap().id() as i32)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn metrics_dir(&self) -> PathBuf {
        self.dir.path().join("metrics")
    }

    /// Waits until `n` workers serve, all idle, and `/metrics` answers.
    pub fn wait_ready(&self, n: u32) {
        let ok = wait_until(Duration::from_secs(20), || {
            let Ok(m) = self.try_scrape() else {
                return false;
            };
            m.value("gpe_master_workers", &[]) == Some(f64::from(n))
                && m.samples("gpe_worker_state")
                    .iter()
                    .filter(|(l, v)| {
                        l.get("state").map(String::as_str) == Some("idle") && *v == 1.0
                    })
                    .count()
                    == n as usize
        });
        assert!(
            ok,
            "server not ready with {n} workers; log:\n{}",
            self.log()
        );
    }

    pub fn signal(&self, sig: Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    pub fn try_scrape(&self) -> std::io::Result<Metrics> {
        let r = http(self.metrics, "GET", "/metrics", &[], b"")?;
        if r.status != 200 {
            return Err(std::io::Error::other(format!(
                "metrics status {}",
                r.status
            )));
        }
        Ok(Metrics::parse(&String::from_utf8_lossy(&r.body)))
    }

    pub fn scrape(&self) -> Metrics {
        self.try_scrape()
            .unwrap_or_else(|e| panic!("scrape failed: {e}; log:\n{}", self.log()))
    }

    /// Worker pids by slot, from `gpe_worker_info`.
    pub fn worker_pids(&self) -> BTreeMap<String, i32> {
        self.scrape()
            .samples("gpe_worker_info")
            .into_iter()
            .map(|(l, _)| (l["worker"].clone(), l["pid"].parse().unwrap()))
            .collect()
    }

    /// Sends TERM and waits for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        self.signal(Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("server did not exit; log:\n{}", self.log()))
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut()?;
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Polls `f` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A parsed HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn write_request(
    s: &mut impl Write,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    close: bool,
) -> std::io::Result<()> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PUT" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    if close {
        req.push_str("Connection: close\r\n");
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    s.write_all(&bytes)
}

fn read_response(r: &mut impl BufRead, head_only: bool) -> std::io::Result<Resp> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    let mut resp = Resp {
        status,
        headers,
        body: Vec::new(),
    };
    if head_only {
        return Ok(resp);
    }
    if let Some(n) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        resp.body.resize(n, 0);
        r.read_exact(&mut resp.body)?;
    } else if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let n = usize::from_str_radix(line.trim(), 16).map_err(std::io::Error::other)?;
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            resp.body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

/// One request on a new connection (`Connection: close`), 30 s timeout.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write_request(&mut s, method, path, headers, body, true)?;
    let mut r = BufReader::new(s);
    read_response(&mut r, method == "HEAD")
}

/// `GET path`, panicking on transport errors.
pub fn get(addr: SocketAddr, path: &str) -> Resp {
    http(addr, "GET", path, &[], b"").unwrap()
}

/// A persistent (keep-alive) connection.
pub struct KeepAlive {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> std::io::Result<KeepAlive> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok(KeepAlive {
            writer: s.try_clone()?,
            reader: BufReader::new(s),
        })
    }

    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> std::io::Result<Resp> {
        self.request_with(method, path, &[], body)
    }

    /// A request with extra header fields.
    pub fn request_with(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Resp> {
        write_request(&mut self.writer, method, path, headers, body, false)?;
        read_response(&mut self.reader, method == "HEAD")
    }

    /// Waits up to `limit` for the server to close the connection; true if
    /// it did (end of stream or reset) without sending anything more.
    pub fn closed_by_server_within(&mut self, limit: Duration) -> bool {
        if self.writer.set_read_timeout(Some(limit)).is_err() {
            return false;
        }
        let mut byte = [0u8; 1];
        match self.reader.read(&mut byte) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }

    /// Writes several requests at once (pipelining), then reads the responses.
    pub fn pipeline(&mut self, paths: &[&str]) -> std::io::Result<Vec<Resp>> {
        let mut buf = Vec::new();
        for p in paths {
            write_request(&mut buf, "GET", p, &[], b"", false)?;
        }
        self.writer.write_all(&buf)?;
        paths
            .iter()
            .map(|_| read_response(&mut self.reader, false))
            .collect()
    }
}

/// Parsed Prometheus text exposition (0.0.4 or OpenMetrics).
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub samples: Vec<(String, BTreeMap<String, String>, f64)>,
    pub types: Vec<(String, String)>,
    pub text: String,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let mut m = Metrics {
            text: text.to_owned(),
            ..Metrics::default()
        };
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut it = rest.split_whitespace();
                if let (Some(n), Some(t)) = (it.next(), it.next()) {
                    m.types.push((n.to_owned(), t.to_owned()));
                }
                continue;
            }
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let (name_labels, value) = match line.rfind(' ') {
                Some(i) => (&line[..i], &line[i + 1..]),
                None => continue,
            };
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or(f64::NAN),
            };
            let (name, labels) = match name_labels.find('{') {
                Some(i) => (
                    &name_labels[..i],
                    parse_labels(&name_labels[i + 1..name_labels.len() - 1]),
                ),
                None => (name_labels, BTreeMap::new()),
            };
            m.samples.push((name.to_owned(), labels, value));
        }
        m
    }

    /// All samples of `name`.
    pub fn samples(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, l, v)| (l.clone(), *v))
            .collect()
    }

    /// The sample of `name` whose labels include all of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let matching: Vec<f64> = self
            .samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
            .collect();
        match matching.len() {
            0 => None,
            _ => Some(matching.iter().sum()),
        }
    }

    /// Sum over all samples of `name`.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples(name).iter().map(|(_, v)| v).sum()
    }
}

fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq].trim_start_matches(',').trim().to_owned();
        let after = &rest[eq + 1..];
        let after = after.strip_prefix('"').unwrap_or(after);
        let mut val = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        val.push(match n {
                            'n' => '\n',
                            o => o,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => val.push(c),
            }
        }
        out.insert(key, val);
        rest = &after[end..];
    }
    out
}

/// Runs `f` on `clients` threads, each doing `per_client` iterations; returns
/// the results in order of completion.
pub fn parallel<T: Send + 'static>(
    clients: usize,
    per_client: usize,
    f: impl Fn(usize, usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || (0..per_client).map(|i| f(c, i)).collect::<Vec<T>>())
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// `promtool check metrics` on `text`; returns (success, output).
pub fn promtool_check(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is required (Debian package `prometheus`)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), s)
}

/// Thread count of process `pid`.
pub fn threads_of(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// Resident bytes of `pid` from `/proc/<pid>/statm`.
pub fn statm_rss(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = s.split_whitespace().nth(1)?.parse().ok()?;
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    Some(pages * page)
}

/// Whether process `pid` exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit(')')
            .next()
            .is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Generates one `#[test]` per worker type calling `$body(worker)`.
#[macro_export]
macro_rules! per_worker {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sync() { super::$name("sync") }
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

/// Clients that send `GET /` until stopped (Connection: close), counting.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: std::net::SocketAddr, clients: usize, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(90);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match http(addr, "GET", path, &[], b"") {
                            Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
