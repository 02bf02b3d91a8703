//! The metric store may fail; the server may not. Real servers whose store
//! is damaged while they serve (a broken `used`, an odd fold epoch, a flipped
//! magic, a worker file cut short, a deleted index, a deleted directory), a
//! full filesystem, foreign files in `metrics_dir`, and the stale store of a
//! killed master. The file faults run on the thread and eventloop workers.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpe_tests::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

const TESTAPP: &str = env!("CARGO_BIN_EXE_gpe-testapp");

/// Byte offset of `used` (u32) in the index header: after the magic (u64)
/// and the version (u32).
const INDEX_USED: u64 = 12;
/// Byte offset of the fold epoch (u64) in a data file header.
const EPOCH: u64 = 88;
/// The index's magic, "GPEINDEX", as the file holds it.
const INDEX_MAGIC: u64 = 0x4750_4549_4e44_4558;

#[derive(Debug, Clone, Copy)]
enum Corruption {
    UsedMax,
    OddEpoch,
    FlippedMagic,
    TruncatedSlot,
    DeletedIndex,
}

impl Corruption {
    /// Damages the store of `s` and returns the log line that shows the
    /// master noticed.
    fn apply(self, s: &Server) -> &'static str {
        let dir = s.metrics_dir();
        let rw = |p: PathBuf| {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(p)
                .unwrap()
        };
        match self {
            Corruption::UsedMax => {
                rw(dir.join("index"))
                    .write_all_at(&u32::MAX.to_ne_bytes(), INDEX_USED)
                    .unwrap();
                "`used` 4294967295"
            }
            Corruption::OddEpoch => {
                rw(dir.join("retired"))
                    .write_all_at(&7u64.to_ne_bytes(), EPOCH)
                    .unwrap();
                "an odd fold epoch"
            }
            Corruption::FlippedMagic => {
                let f = rw(dir.join("index"));
                let mut b = [0u8; 8];
                f.read_exact_at(&mut b, 0).unwrap();
                assert_eq!(u64::from_ne_bytes(b), INDEX_MAGIC);
                b[0] ^= 0x10;
                f.write_all_at(&b, 0).unwrap();
                "its magic and version"
            }
            Corruption::TruncatedSlot => {
                rw(worker_file(&dir, 0)).set_len(0).unwrap();
                "its store file was cut short"
            }
            Corruption::DeletedIndex => {
                std::fs::remove_file(dir.join("index")).unwrap();
                "index was deleted; wrote it again"
            }
        }
    }

    /// Whether every request stays counted through the fault.
    fn keeps_counts(self) -> bool {
        !matches!(self, Corruption::TruncatedSlot)
    }
}

/// The newest data file of worker `slot` in `dir`.
fn worker_file(dir: &Path, slot: u32) -> PathBuf {
    let prefix = format!("worker-{slot}-");
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix))
        })
        .max_by_key(|p| {
            p.to_str()
                .and_then(|n| n.rsplit('-').next())
                .and_then(|g| g.parse::<u64>().ok())
        })
        .unwrap()
}

/// Lines of the log that record a worker exit (one per respawn).
fn exits_logged(log: &str) -> usize {
    log.lines().filter(|l| l.contains(") exited: ")).count()
}

/// Waits until `n` workers serve and `/metrics` answers, within `limit`.
fn serving(s: &Server, n: u32, limit: Duration) -> bool {
    wait_until(limit, || {
        s.try_scrape().is_ok_and(|m| {
            m.one("gpe_master_workers", &[]) == f64::from(n)
                && m.samples("gpe_worker_info").len() == n as usize
        })
    })
}

fn corruption(worker: &str, c: Corruption) {
    let s = Server::start(TESTAPP, Opts::new(worker, 2));
    for _ in 0..20 {
        assert_eq!(get(s.addr, "/").status, 200);
    }
    s.wait_for("gpe_http_requests_total", &[("route", "/")], 20.0);
    let noticed = c.apply(&s);
    let t0 = Instant::now();
    assert!(
        wait_until(Duration::from_secs(10), || s.log().contains(noticed)),
        "{c:?}: the master did not say {noticed:?} within 10 s; log:\n{}",
        s.log()
    );
    assert!(
        serving(&s, 2, Duration::from_secs(10)),
        "{c:?}: not serving again; log:\n{}",
        s.log()
    );
    // The repair may replace the workers: the pid read from a scrape can
    // be of one that is already gone, so read it again until one is killed.
    let mut victim = 0;
    assert!(wait_until(Duration::from_secs(10), || {
        let Some(pid) = s.worker_pids().get("0").copied() else {
            return false;
        };
        victim = pid;
        signal_child(s.pid().as_raw(), victim, Signal::SIGKILL)
    }));
    assert!(
        wait_until(Duration::from_secs(10), || {
            serving(&s, 2, Duration::from_millis(1))
                && s.worker_pids().get("0").is_some_and(|p| *p != victim)
        }),
        "{c:?}: slot 0 not refilled within 10 s; log:\n{}",
        s.log()
    );
    for _ in 0..20 {
        assert_eq!(get(s.addr, "/").status, 200, "{c:?}");
    }
    assert!(t0.elapsed() < Duration::from_secs(30));
    if c.keeps_counts() {
        s.wait_for("gpe_http_requests_total", &[("route", "/")], 40.0);
    } else {
        assert!(wait_until(Duration::from_secs(10), || s
            .try_scrape()
            .is_ok_and(|m| m
                .sum("gpe_http_requests_total", &[("route", "/")])
                >= 20.0)));
    }
    let log = s.log();
    assert!(
        alive(s.pid().as_raw()),
        "{c:?}: the master died; log:\n{log}"
    );
    assert!(!log.contains("panicked"), "{c:?}: a panic; log:\n{log}");
    assert!(
        exits_logged(&log) <= 10,
        "{c:?}: {} respawns; log:\n{log}",
        exits_logged(&log)
    );
}

macro_rules! faults {
    ($($name:ident => $c:expr),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn thread() { super::corruption("thread", $c) }
                #[test]
                fn eventloop() { super::corruption("eventloop", $c) }
            }
        )*
    };
}

faults!(
    used_beyond_capacity => super::Corruption::UsedMax,
    odd_fold_epoch => super::Corruption::OddEpoch,
    flipped_index_magic => super::Corruption::FlippedMagic,
    truncated_slot_file => super::Corruption::TruncatedSlot,
    deleted_index => super::Corruption::DeletedIndex,
);

/// Deleting the whole metrics directory under load: the master writes it
/// again, replaces every worker, and no slot stays empty; every request is
/// answered.
fn deleted_directory(worker: &str) {
    let s = Server::start(TESTAPP, Opts::new(worker, 2));
    let load = Load::start(s.addr, 4, "/");
    assert!(wait_until(Duration::from_secs(10), || load.ok() > 100));
    std::fs::remove_dir_all(s.metrics_dir()).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || s
            .log()
            .contains("replacing every worker")),
        "log:\n{}",
        s.log()
    );
    // While it recovers, the master always has both slots serving, and the
    // new workers come up within 10 s.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut recovered = false;
    while Instant::now() < deadline {
        if let Ok(m) = s.try_scrape() {
            let serving = m.one("gpe_master_workers", &[]);
            assert_eq!(serving, 2.0, "log:\n{}", s.log());
            let idle = m
                .samples("gpe_worker_state")
                .iter()
                .filter(|(l, v)| l["state"] == "idle" && *v == 1.0)
                .count();
            if idle == 2 && m.samples("gpe_worker_info").len() == 2 {
                recovered = true;
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(recovered, "log:\n{}", s.log());
    let (ok, failed) = load.finish();
    assert_eq!(failed, 0, "{ok} ok; log:\n{}", s.log());
    assert!(alive(s.pid().as_raw()));
    assert!(!s.log().contains("panicked"));
}

#[test]
fn deleted_directory_thread() {
    deleted_directory("thread");
}

#[test]
fn deleted_directory_eventloop() {
    deleted_directory("eventloop");
}

/// A server started by hand (the harness always picks `metrics_dir`).
struct Started {
    child: Option<Child>,
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    log: PathBuf,
}

impl Started {
    fn spawn(dir: &Path, worker: &str, metrics_dir: Option<&Path>, extra: &[&str]) -> Started {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = dir.join(format!("server-{}.log", addr.port()));
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = Command::new(TESTAPP);
        cmd.args(["--bind", &addr.to_string()])
            .args(["--metrics-bind", &metrics.to_string()])
            .args(["-w", "1", "-k", worker])
            .args(extra);
        if let Some(m) = metrics_dir {
            cmd.args(["--metrics-dir", m.to_str().unwrap()]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Started {
            child: Some(child),
            addr,
            metrics,
            log,
        }
    }

    fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn scrape(&self) -> Option<Metrics> {
        let r = http(self.metrics, "GET", "/metrics", &[], b"").ok()?;
        (r.status == 200).then(|| Metrics::parse(&String::from_utf8_lossy(&r.body)))
    }

    fn wait_serving(&self, n: f64) -> Metrics {
        let mut last = None;
        let ok = wait_until(Duration::from_secs(20), || {
            last = self.scrape();
            last.as_ref()
                .is_some_and(|m| m.samples("gpe_worker_info").len() as f64 == n)
        });
        assert!(ok, "not serving; log:\n{}", self.log());
        last.unwrap()
    }

    /// Waits (bounded) for the exit status.
    fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, limit)
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn a_foreign_file_in_metrics_dir_stops_start_up_and_is_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_dir = dir.path().join("m");
    std::fs::create_dir(&metrics_dir).unwrap();
    let user = metrics_dir.join("index");
    std::fs::write(&user, b"my own notes\n").unwrap();
    let mut s = Started::spawn(dir.path(), "thread", Some(&metrics_dir), &[]);
    let st = s
        .wait_exit(Duration::from_secs(20))
        .expect("start-up did not stop");
    assert!(!st.success());
    let log = s.log();
    assert!(
        log.contains(&format!("{} is not a gpe store file", user.display())),
        "{log}"
    );
    assert_eq!(std::fs::read(&user).unwrap(), b"my own notes\n");
    assert_eq!(std::fs::read_dir(&metrics_dir).unwrap().count(), 1);
}

#[test]
fn the_stale_store_of_a_killed_master_is_removed_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Started::spawn(dir.path(), "thread", None, &[]);
    let m = a.wait_serving(1.0);
    let a_pid = a.pid();
    let stale = PathBuf::from(format!("/dev/shm/gpe-{a_pid}"));
    assert!(
        stale.join("index").exists(),
        "the default store is under /dev/shm"
    );
    // Known by start time too: once orphaned (or gone) their pids may name
    // another process on this shared host.
    let workers: Vec<Process> = m
        .samples("gpe_worker_info")
        .iter()
        .filter_map(|(l, _)| Process::child_of(a_pid, l["pid"].parse().unwrap()))
        .collect();
    kill(Pid::from_raw(a_pid), Signal::SIGKILL).unwrap();
    a.wait_exit(Duration::from_secs(10)).unwrap();
    // The orphaned workers do not outlive the test.
    for w in workers {
        w.signal(Signal::SIGKILL);
        assert!(wait_until(Duration::from_secs(10), || !w.signal(Signal::SIGCONT)));
    }
    assert!(stale.exists(), "kill -9 leaves the store behind");
    let mut b = Started::spawn(dir.path(), "thread", None, &[]);
    b.wait_serving(1.0);
    assert!(!stale.exists(), "log:\n{}", b.log());
    assert!(
        b.log().contains(&format!(
            "Removed the stale metric store {} of gpe master {a_pid}, which no longer runs",
            stale.display()
        )),
        "log:\n{}",
        b.log()
    );
    assert_eq!(get(b.addr, "/").status, 200);
    let b_pid = b.pid();
    kill(Pid::from_raw(b_pid), Signal::SIGTERM).unwrap();
    assert!(b.wait_exit(Duration::from_secs(20)).unwrap().success());
    assert!(!PathBuf::from(format!("/dev/shm/gpe-{b_pid}")).exists());
}

/// A tmpfs mounted for one test, unmounted on drop.
struct Tmpfs(tempfile::TempDir);

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(Tmpfs(dir))
    }

    fn path(&self) -> &Path {
        self.0.path()
    }

    /// Writes a file until the filesystem is full.
    fn fill(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.path().join("filler")).unwrap();
        let chunk = vec![1u8; 64 << 10];
        while f.write_all(&chunk).is_ok() {}
        let _ = f.write_all(&[1]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.0.path()).status();
    }
}

/// A 1 MiB metrics filesystem that is full: the store, sized to fit
/// (`metrics_store_series`), reserved every file whole at creation, so
/// requests never meet a SIGBUS; new label sets beyond the cap are dropped
/// and counted; a worker killed meanwhile is replaced on the spare file of
/// the one reaped.
fn full_filesystem(worker: &str) {
    let Some(fs) = Tmpfs::mount("1m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let metrics_dir = fs.path().join("m");
    let s = Started::spawn(
        work.path(),
        worker,
        Some(&metrics_dir),
        &[
            "--unmatched-route",
            "path",
            "--metrics-max-series",
            "100",
            "--metrics-store-series",
            "1024",
        ],
    );
    s.wait_serving(1.0);
    fs.fill();
    let addr = s.addr;
    let statuses = parallel(4, 2_500, move |c, i| {
        http(addr, "GET", &format!("/any/{c}/{i}"), &[], b"").map_or(0, |r| r.status)
    });
    // Every request is answered (`/any/...` names no route, so with
    // `unmatched_route = path` each is a new label set).
    assert_eq!(statuses.len(), 10_000);
    assert!(statuses.iter().all(|st| *st == 200), "log:\n{}", s.log());
    // A worker dies; the filesystem has no room for a new file.
    let victim = s.wait_serving(1.0).samples("gpe_worker_info")[0].0["pid"]
        .parse::<i32>()
        .unwrap();
    assert!(signal_child(s.pid(), victim, Signal::SIGKILL));
    assert!(wait_until(Duration::from_secs(10), || s
        .scrape()
        .is_some_and(|m| {
            m.samples("gpe_worker_info")
                .first()
                .is_some_and(|(l, _)| l["pid"] != victim.to_string())
        })));
    assert!(
        s.log()
            .contains("no room for a new worker file; worker 0 reuses the spare one"),
        "log:\n{}",
        s.log()
    );
    for _ in 0..20 {
        assert_eq!(get(s.addr, "/").status, 200);
    }
    let m = s.wait_serving(1.0);
    let dropped = m.one(
        "gpe_metrics_series_dropped_total",
        &[("family", "gpe_http_requests_total")],
    );
    // 100 label sets got their own series; the other 9,900 and the 20 on
    // `/` (a new label set too) went to `other`.
    assert_eq!(dropped, 9_920.0, "log:\n{}", s.log());
    assert_eq!(m.sum("gpe_http_requests_total", &[]), 10_020.0);
    assert!(alive(s.pid()));
    assert!(!s.log().contains("panicked"));
}

#[test]
fn full_filesystem_thread() {
    full_filesystem("thread");
}

#[test]
fn full_filesystem_eventloop() {
    full_filesystem("eventloop");
}

/// A metrics filesystem too small for one store file of the default size
/// (1 MiB; each file is 2 MiB, reserved whole): start-up stops naming the
/// file and the setting that sizes it, without a SIGBUS.
#[test]
fn a_filesystem_too_small_for_the_store_stops_start_up_naming_the_file() {
    let Some(fs) = Tmpfs::mount("1m") else {
        eprintln!("skipped: cannot mount a tmpfs here (needs root)");
        return;
    };
    let work = tempfile::tempdir().unwrap();
    let metrics_dir = fs.path().join("m");
    let mut s = Started::spawn(work.path(), "thread", Some(&metrics_dir), &[]);
    let st = s
        .wait_exit(Duration::from_secs(20))
        .expect("start-up did not stop");
    assert_eq!(
        st.code(),
        Some(1),
        "an exit, not a signal; log:\n{}",
        s.log()
    );
    let log = s.log();
    assert!(
        log.contains(&format!(
            "cannot reserve {} bytes for {}",
            gpe_core::index_file_bytes(gpe_core::DEFAULT_CAPACITY),
            metrics_dir.join("index").display()
        )) && log.contains("`metrics_store_series` = 16384"),
        "{log}"
    );
    assert!(!metrics_dir.exists(), "what it made is removed");
}
