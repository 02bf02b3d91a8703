//! Starting and stopping a server under test: ports, command line, readiness,
//! signals, scrapes, and the kill on drop.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use crate::http::http;
use crate::metrics::Metrics;
use crate::wait::wait_until;

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
        // A port found free can be taken by another test before the server
        // binds it: start again on new ports (a bounded number of times).
        for _ in 0..5 {
            let mut server = Server::spawn(testapp, &opts);
            let exited = wait_until(Duration::from_secs(20), || {
                server.is_ready(opts.workers)
                    || server
                        .child
                        .as_mut()
                        .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
            });
            let lost_port = exited
                && !server.is_ready(opts.workers)
                && server.log().contains("Address already in use");
            if !lost_port {
                server.wait_ready(opts.workers);
                return server;
            }
        }
        panic!("no free pair of ports in 5 tries");
    }

    /// Starts gpe-testapp and waits (up to 20 s) until `ready` holds, for an
    /// exporter the harness cannot scrape itself (TLS, credentials).
    pub fn launch_until(testapp: &str, opts: Opts, ready: impl Fn(&Server) -> bool) -> Server {
        for _ in 0..5 {
            let mut server = Server::spawn(testapp, &opts);
            wait_until(Duration::from_secs(20), || {
                ready(&server)
                    || server
                        .child
                        .as_mut()
                        .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
            });
            if ready(&server) {
                return server;
            }
            assert!(
                server.log().contains("Address already in use"),
                "the server never got ready; log:\n{}",
                server.log()
            );
        }
        panic!("no free pair of ports in 5 tries");
    }

    /// Starts gpe-testapp and returns as soon as its exporter answers, without
    /// waiting for the workers (for tests of booting).
    pub fn launch(testapp: &str, opts: Opts) -> Server {
        for _ in 0..5 {
            let mut server = Server::spawn(testapp, &opts);
            wait_until(Duration::from_secs(20), || {
                http(server.metrics, "GET", "/healthz", &[], b"").is_ok()
                    || server
                        .child
                        .as_mut()
                        .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
            });
            if http(server.metrics, "GET", "/healthz", &[], b"").is_ok() {
                return server;
            }
            assert!(
                server.log().contains("Address already in use"),
                "the exporter does not answer; log:\n{}",
                server.log()
            );
        }
        panic!("no free pair of ports in 5 tries");
    }

    fn spawn(testapp: &str, opts: &Opts) -> Server {
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
        Server {
            child: Some(child),
            addr,
            metrics,
            dir,
            workers: opts.workers,
        }
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

    /// Whether `n` workers serve, all idle, and `/metrics` answers.
    fn is_ready(&self, n: u32) -> bool {
        let Ok(m) = self.try_scrape() else {
            return false;
        };
        m.one("gpe_master_workers", &[]) == f64::from(n)
            && m.samples("gpe_worker_state")
                .iter()
                .filter(|(l, v)| l.get("state").map(String::as_str) == Some("idle") && *v == 1.0)
                .count()
                == n as usize
    }

    /// Waits until `n` workers serve, all idle, and `/metrics` answers.
    pub fn wait_ready(&self, n: u32) {
        let ok = wait_until(Duration::from_secs(20), || self.is_ready(n));
        assert!(
            ok,
            "server not ready with {n} workers; log:\n{}",
            self.log()
        );
    }

    /// Waits (up to 20 s) until exactly one sample of `name` matches `labels`
    /// and equals `want`, and panics with the last samples seen otherwise. A
    /// scrape without the sample (a gauge while the processes that set it are
    /// replaced) is one more look, not a failure.
    pub fn wait_for(&self, name: &str, labels: &[(&str, &str)], want: f64) {
        let mut last = None;
        let ok = wait_until(Duration::from_secs(20), || {
            last = self.try_scrape().ok().map(|m| m.matching(name, labels));
            last.as_deref() == Some(&[want][..])
        });
        assert!(
            ok,
            "{name}{labels:?} stays at {last:?}, expected {want}; log:\n{}",
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
        crate::procs::wait_child(&mut self.child, timeout)
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
