//! `gpe-bench-ceiling --forked N`: N forked processes serve one listener,
//! and the parent reaps them when it is stopped or when one of them dies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const DEADLINE: Duration = Duration::from_secs(10);

/// Starts the ceiling with `--forked 2` on an ephemeral port; returns the
/// process, its address and its two children.
fn start() -> (Child, SocketAddr, Vec<i32>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_gpe-bench-ceiling"))
        .args(["--forked", "2", "--bind", "127.0.0.1:0"])
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
    (child, addr, kids)
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
    let (mut child, addr, kids) = start();
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
    let (mut child, addr, kids) = start();
    assert!(get(addr).ends_with("Hello, World!"));
    kill(Pid::from_raw(kids[0]), Signal::SIGKILL).unwrap();
    assert!(!wait_exit(&mut child).success());
    assert!(kids.iter().all(|&k| gone(k)), "children left: {kids:?}");
}
