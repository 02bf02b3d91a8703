//! `gpe-bench-ceiling --forked N`: N forked processes serve one listener,
//! and the parent reaps them when it is stopped or when one of them dies;
//! with `--balanced` they split connections evenly.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const DEADLINE: Duration = Duration::from_secs(10);

/// The ceiling's parent process, killed on drop if it is still running (a
/// failed test leaves no server behind: its children follow the parent).
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl std::ops::Deref for Server {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Server {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

/// Starts the ceiling with `--forked 2` (and `extra`) on an ephemeral port;
/// returns the process, its address and its two children.
fn start(extra: &[&str]) -> (Server, SocketAddr, Vec<i32>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpe-bench-ceiling"))
        .args(["--forked", "2", "--bind", "127.0.0.1:0"])
        .args(extra)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    stderr.read_line(&mut line).unwrap();
    // Keep reading, so that later messages do not meet a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
    let addr = line
        .split_whitespace()
        .nth(3)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let pid = child.id();
    let start = Instant::now();
    let kids = loop {
        let kids = children(pid);
        if kids.len() == 2 {
            break kids;
        }
        assert!(start.elapsed() < DEADLINE, "children: {kids:?}");
        std::thread::sleep(Duration::from_millis(20));
    };
    (Server(child), addr, kids)
}

fn children(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
    {
        let path = task.unwrap().path().join("children");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        out.extend(text.split_whitespace().map(|p| p.parse::<i32>().unwrap()));
    }
    out
}

fn get(addr: SocketAddr) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        assert!(start.elapsed() < DEADLINE, "the parent did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn gone(pid: i32) -> bool {
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn serves_then_stops_and_reaps_on_sigterm() {
    let (mut child, addr, kids) = start(&[]);
    for _ in 0..20 {
        let resp = get(addr);
        assert!(resp.starts_with("HTTP/1.1 200 OK\r\n"), "{resp}");
        assert!(resp.ends_with("\r\n\r\nHello, World!"), "{resp}");
    }
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut child).success());
    assert!(kids.iter().all(|&k| gone(k)), "children left: {kids:?}");
}

#[test]
fn a_dead_child_stops_the_rest() {
    let (mut child, addr, kids) = start(&[]);
    assert!(get(addr).ends_with("Hello, World!"));
    kill(Pid::from_raw(kids[0]), Signal::SIGKILL).unwrap();
    assert!(!wait_exit(&mut child).success());
    assert!(kids.iter().all(|&k| gone(k)), "children left: {kids:?}");
}

/// Established TCP connections to local port `port` that process `pid`
/// holds: its socket descriptors' inodes, looked up in /proc/net/tcp.
fn connections(pid: i32, port: u16) -> usize {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_owned())
        })
        .collect();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter(|row| {
            let cols: Vec<&str> = row.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; state 01 is ESTABLISHED.
            cols.len() > 9
                && cols[1].ends_with(&format!(":{port:04X}"))
                && cols[3] == "01"
                && inodes.iter().any(|i| i == cols[9])
        })
        .count()
}

/// A keep-alive connection that has been answered once (so it was accepted).
fn answered(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 512];
    while !got.ends_with(b"Hello, World!") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed after {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    s
}

/// Waits until each child holds `want` connections to `addr`.
fn wait_split(kids: &[i32], addr: SocketAddr, want: usize) {
    let start = Instant::now();
    loop {
        let held: Vec<usize> = kids.iter().map(|&k| connections(k, addr.port())).collect();
        if held.iter().all(|&h| h == want) {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "connections per child: {held:?}, want {want} each"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn balanced_children_take_turns_and_count_closed_connections_out() {
    // A child defers for up to 10 s, so a slow sibling cannot tip the split.
    let (mut child, addr, kids) = start(&["--balanced", "--max-defer-ms", "10000"]);
    let conns: Vec<TcpStream> = (0..4).map(|_| answered(addr)).collect();
    wait_split(&kids, addr, 2);
    drop(conns);
    wait_split(&kids, addr, 0);
    // The closed connections were counted out: two new ones split again.
    let conns: Vec<TcpStream> = (0..2).map(|_| answered(addr)).collect();
    wait_split(&kids, addr, 1);
    drop(conns);
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut child).success());
}

#[test]
fn balanced_needs_forked() {
    let out = Command::new(env!("CARGO_BIN_EXE_gpe-bench-ceiling"))
        .args(["--balanced", "--bind", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--balanced balances forked processes"),
        "{err}"
    );
}
