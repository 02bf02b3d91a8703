//! Supervision rules, driven through the arbiter against a fake [`Os`]: no
//! process is forked, time moves only when a test moves it, and every signal
//! the arbiter sends is recorded in order.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::arbiter::{Arbiter, Phase, Upgrade, EXPORTER_RESTART, FOLD_INTERVAL, QUICK_STOP, TICK};
use super::health::{backoff, BACKOFF_AFTER, BACKOFF_BASE, BACKOFF_MAX};
use super::os::{Notice, Os};
use super::MasterError;
use crate::config::{Config, ConfigError, RawSettings};
use crate::store::WorkerState;
use crate::store::{ExitReason, MasterSignal, Snapshot, StoreDir, WorkerFile, WorkerKind};
use crate::sys::{Ended, Reaped};
use crate::worker::{EXIT_BOOT_ERROR, EXIT_MAX_REQUESTS};

/// What the fake started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Child {
    Worker { slot: u32, generation: u64 },
    Exporter,
    Master,
}

/// One thing the arbiter did, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Spawned(Pid, Child),
    Sent(Pid, Signal),
    Notified(Notice),
}

#[derive(Debug)]
struct World {
    start: Instant,
    elapsed: Duration,
    mono_start: u64,
    next_pid: i32,
    parent: Pid,
    pending: Vec<Signal>,
    exited: VecDeque<Reaped>,
    alive: Vec<(Pid, Child)>,
    events: Vec<Event>,
    reload: Option<Config>,
    /// Resident sets the fake reports, by pid.
    rss: Vec<(Pid, u64)>,
    /// The TLS files fail to load (HUP).
    tls_refused: bool,
}

#[derive(Debug, Clone)]
struct FakeOs(Rc<RefCell<World>>);

impl FakeOs {
    fn spawn(&self, child: Child) -> Pid {
        let mut w = self.0.borrow_mut();
        let pid = Pid::from_raw(w.next_pid);
        w.next_pid += 1;
        w.alive.push((pid, child));
        w.events.push(Event::Spawned(pid, child));
        pid
    }
}

impl Os for FakeOs {
    fn now(&self) -> Instant {
        let w = self.0.borrow();
        w.start + w.elapsed
    }
    fn mono_ns(&self) -> u64 {
        let w = self.0.borrow();
        w.mono_start + w.elapsed.as_nanos() as u64
    }
    fn wait(&mut self, _timeout: Duration) -> Vec<Signal> {
        std::mem::take(&mut self.0.borrow_mut().pending)
    }
    fn signal(&mut self, pid: Pid, sig: Signal) {
        self.0.borrow_mut().events.push(Event::Sent(pid, sig));
    }
    fn child_exited(&mut self) -> bool {
        !self.0.borrow().exited.is_empty()
    }
    fn reap(&mut self) -> io::Result<Option<Reaped>> {
        Ok(self.0.borrow_mut().exited.pop_front())
    }
    fn spawn_worker(&mut self, _: &Arc<Config>, slot: u32, generation: u64) -> io::Result<Pid> {
        Ok(self.spawn(Child::Worker { slot, generation }))
    }
    fn spawn_exporter(&mut self, _: &Config) -> io::Result<Pid> {
        Ok(self.spawn(Child::Exporter))
    }
    fn spawn_master(&mut self) -> io::Result<Pid> {
        Ok(self.spawn(Child::Master))
    }
    fn parent(&self) -> Pid {
        self.0.borrow().parent
    }
    fn notify(&mut self, notice: Notice) {
        self.0.borrow_mut().events.push(Event::Notified(notice));
    }
    fn reload(&mut self) -> Option<Result<Config, ConfigError>> {
        self.0.borrow().reload.clone().map(Ok)
    }
    fn check_tls(&self, _: &Config) -> Result<(), ConfigError> {
        if self.0.borrow().tls_refused {
            return Err(ConfigError::invalid(
                "certfile",
                "cert.pem",
                "a certificate",
            ));
        }
        Ok(())
    }
    fn choose_worker(&mut self, _: &str) -> Result<(), String> {
        Ok(())
    }
    fn worker_kind(&self) -> WorkerKind {
        WorkerKind::Sync
    }
    fn close_listeners(&mut self) {}
    fn reopen_errorlog(&mut self, _: &Config) {}
    fn rss_bytes(&self, pid: Pid) -> Option<u64> {
        self.0
            .borrow()
            .rss
            .iter()
            .find(|(p, _)| *p == pid)
            .map(|r| r.1)
    }
}

/// An arbiter over a fake OS and a real store in a temporary directory.
struct Harness {
    os: FakeOs,
    arbiter: Arbiter<FakeOs>,
    store: StoreDir,
    _dir: tempfile::TempDir,
}

fn config(workers: u32, tune: impl FnOnce(&mut Config)) -> Config {
    let mut c = Config::resolve(RawSettings::default(), None).unwrap();
    c.workers = workers;
    c.graceful_timeout = Duration::from_secs(30);
    tune(&mut c);
    c
}

impl Harness {
    fn new(config: Config, exporter: bool, upgrading_from: Option<Pid>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path().join("store"))
            .with_capacity(config.metrics_store_series as usize);
        store.prepare().unwrap();
        let os = FakeOs(Rc::new(RefCell::new(World {
            start: Instant::now(),
            elapsed: Duration::ZERO,
            mono_start: crate::store::monotonic_ns(),
            next_pid: 100,
            parent: Pid::from_raw(1),
            pending: Vec::new(),
            exited: VecDeque::new(),
            alive: Vec::new(),
            events: Vec::new(),
            reload: None,
            rss: Vec::new(),
            tls_refused: false,
        })));
        let arbiter = Arbiter::new(
            os.clone(),
            Arc::new(config),
            store.clone(),
            exporter,
            upgrading_from,
            None,
        )
        .unwrap();
        let mut h = Harness {
            os,
            arbiter,
            store,
            _dir: dir,
        };
        h.arbiter.begin();
        h
    }

    fn world(&self) -> std::cell::RefMut<'_, World> {
        self.os.0.borrow_mut()
    }

    /// Moves time on by `d`, then runs one turn of the loop; returns whether
    /// the master is done.
    fn step_after(&mut self, d: Duration) -> bool {
        self.world().elapsed += d;
        self.arbiter.step()
    }

    /// Delivers `sig` and runs one turn (after the fold interval, so that
    /// exits queued before are reaped too).
    fn signal(&mut self, sig: Signal) -> bool {
        self.world().pending.push(sig);
        self.step_after(FOLD_INTERVAL)
    }

    /// `pid` ends as `ended` (SIGCHLD follows), and one turn runs.
    fn exit(&mut self, pid: Pid, ended: Ended) -> bool {
        {
            let mut w = self.world();
            w.alive.retain(|(p, _)| *p != pid);
            w.exited.push_back(Reaped {
                pid,
                ended,
                cpu_ns: 0,
            });
        }
        self.signal(Signal::SIGCHLD)
    }

    /// Live workers as (pid, slot, generation), oldest first.
    fn workers(&self) -> Vec<(Pid, u32, u64)> {
        self.os
            .0
            .borrow()
            .alive
            .iter()
            .filter_map(|(pid, c)| match *c {
                Child::Worker { slot, generation } => Some((*pid, slot, generation)),
                _ => None,
            })
            .collect()
    }

    fn pid_of(&self, child: Child) -> Pid {
        let w = self.os.0.borrow();
        w.alive.iter().find(|(_, c)| *c == child).unwrap().0
    }

    /// Every live worker reports that it booted, and one turn runs.
    fn boot_all(&mut self) {
        for (_, slot, generation) in self.workers() {
            let f = WorkerFile::open(&self.store, slot, generation).unwrap();
            f.set_state(WorkerState::Idle);
        }
        self.step_after(Duration::from_millis(1));
    }

    /// Takes the events recorded so far.
    fn events(&self) -> Vec<Event> {
        std::mem::take(&mut self.world().events)
    }

    /// Takes the signals sent so far.
    fn sent(&self) -> Vec<(Pid, Signal)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Sent(p, s) => Some((p, s)),
                _ => None,
            })
            .collect()
    }

    fn exits(&self, reason: ExitReason) -> u64 {
        Snapshot::read(&self.store).unwrap().master.unwrap().exits[reason.code() as usize]
    }

    /// Ends every live child with `ended` (each gets its own turn).
    fn end_all(&mut self, ended: Ended) -> bool {
        let pids: Vec<Pid> = self.os.0.borrow().alive.iter().map(|(p, _)| *p).collect();
        let mut done = false;
        for pid in pids {
            done = self.exit(pid, ended);
        }
        done
    }
}

fn pid(n: i32) -> Pid {
    Pid::from_raw(n)
}

#[test]
fn ttou_retires_the_oldest_worker() {
    let mut h = Harness::new(config(3, |_| {}), false, None);
    h.boot_all();
    let oldest = h.workers()[0];
    assert_eq!(oldest.2, 1);
    h.events();
    h.signal(Signal::SIGTTOU);
    assert_eq!(h.sent(), vec![(oldest.0, Signal::SIGTERM)]);
    assert_eq!(h.arbiter.desired, 2);
    h.exit(oldest.0, Ended::Exited(0));
    assert_eq!(h.exits(ExitReason::ScaleDown), 1);
    assert_eq!(
        h.workers().len(),
        2,
        "no replacement for a scaled-down worker"
    );
    let view = Snapshot::read(&h.store).unwrap().master.unwrap();
    assert_eq!((view.workers, view.workers_desired), (2, 2));
    assert_eq!(view.signals[MasterSignal::Ttou.code() as usize], 1);
}

#[test]
fn a_crashed_worker_is_respawned_into_its_slot() {
    let mut h = Harness::new(config(3, |_| {}), false, None);
    h.boot_all();
    let (crashed, slot, _) = h.workers()[1];
    assert_eq!(slot, 1);
    h.events();
    h.exit(crashed, Ended::Signaled(11));
    assert_eq!(
        h.events(),
        vec![Event::Spawned(
            pid(103),
            Child::Worker {
                slot: 1,
                generation: 4
            }
        )]
    );
    assert_eq!(h.exits(ExitReason::Crash), 1);
}

#[test]
fn three_boot_errors_in_a_row_stop_the_server() {
    let mut h = Harness::new(config(1, |_| {}), false, None);
    for round in 1..=3 {
        let (w, _, generation) = h.workers()[0];
        assert_eq!(generation, round);
        let done = h.exit(w, Ended::Exited(EXIT_BOOT_ERROR));
        assert_eq!(done, round == 3, "round {round}");
    }
    assert!(h.workers().is_empty(), "no fourth worker");
    assert_eq!(h.exits(ExitReason::BootError), 3);
    assert!(matches!(h.arbiter.run(), Err(MasterError::BootFailed(3))));
}

#[test]
fn a_booted_worker_resets_the_boot_error_count() {
    let mut h = Harness::new(config(1, |_| {}), false, None);
    for _ in 0..2 {
        let w = h.workers()[0].0;
        h.exit(w, Ended::Exited(EXIT_BOOT_ERROR));
    }
    h.boot_all();
    for _ in 0..2 {
        let w = h.workers()[0].0;
        assert!(!h.exit(w, Ended::Exited(EXIT_BOOT_ERROR)));
    }
    assert!(h.arbiter.running());
}

#[test]
fn respawns_back_off_exponentially_after_crashes_before_boot_and_reset_on_a_boot() {
    assert_eq!(backoff(BACKOFF_AFTER - 1), None);
    assert_eq!(backoff(BACKOFF_AFTER), Some(BACKOFF_BASE));
    assert_eq!(backoff(BACKOFF_AFTER + 2), Some(BACKOFF_BASE * 4));
    assert_eq!(backoff(u32::MAX), Some(BACKOFF_MAX));
    let mut h = Harness::new(config(1, |_| {}), false, None);
    let spawned = |h: &Harness| {
        h.events()
            .iter()
            .filter(|e| matches!(e, Event::Spawned(_, Child::Worker { .. })))
            .count()
    };
    h.events();
    // Workers that crash before they boot: the first two are respawned at once.
    for _ in 0..BACKOFF_AFTER - 1 {
        let w = h.workers()[0].0;
        h.exit(w, Ended::Signaled(11));
        assert_eq!(spawned(&h), 1);
    }
    // From the third on, each waits twice as long as the one before.
    let mut wait = BACKOFF_BASE;
    for _ in 0..4 {
        let w = h.workers()[0].0;
        h.exit(w, Ended::Signaled(11));
        assert_eq!(spawned(&h), 0, "no respawn during the back-off");
        h.step_after(wait - Duration::from_millis(1));
        assert_eq!(spawned(&h), 0, "no respawn before {wait:?}");
        h.step_after(Duration::from_millis(1));
        assert_eq!(spawned(&h), 1, "a respawn at {wait:?}");
        wait *= 2;
    }
    assert!(h.arbiter.running());
    // A worker that booted resets the count, and its crash is respawned at once.
    h.boot_all();
    h.events();
    let w = h.workers()[0].0;
    h.exit(w, Ended::Signaled(11));
    assert_eq!(spawned(&h), 1);
    assert_eq!(h.exits(ExitReason::Crash), 7);
}

#[test]
fn a_quick_stop_kills_after_one_second() {
    let mut h = Harness::new(config(2, |_| {}), true, None);
    h.boot_all();
    let exporter = h.pid_of(Child::Exporter);
    let [a, b] = [h.workers()[0].0, h.workers()[1].0];
    h.events();
    h.signal(Signal::SIGQUIT);
    assert_eq!(
        h.events(),
        vec![
            Event::Notified(Notice::Stopping),
            Event::Sent(a, Signal::SIGQUIT),
            Event::Sent(b, Signal::SIGQUIT),
        ]
    );
    assert!(!h.step_after(QUICK_STOP - Duration::from_millis(1)));
    assert_eq!(
        h.sent(),
        vec![],
        "nothing is killed before the second is up"
    );
    assert!(!h.step_after(Duration::from_millis(1)));
    assert_eq!(
        h.sent(),
        vec![
            (a, Signal::SIGKILL),
            (b, Signal::SIGKILL),
            (exporter, Signal::SIGKILL)
        ]
    );
    assert!(!h.step_after(Duration::from_secs(5)));
    assert_eq!(h.sent(), vec![], "SIGKILL is sent once");
    assert!(h.end_all(Ended::Signaled(9)));
    assert_eq!(h.exits(ExitReason::Shutdown), 2);
}

#[test]
fn a_graceful_stop_waits_graceful_timeout_and_quit_overtakes_it() {
    let mut h = Harness::new(config(1, |_| {}), false, None);
    h.boot_all();
    let w = h.workers()[0].0;
    h.sent();
    h.signal(Signal::SIGTERM);
    assert_eq!(h.sent(), vec![(w, Signal::SIGTERM)]);
    h.step_after(Duration::from_secs(29));
    assert_eq!(h.sent(), vec![]);
    h.signal(Signal::SIGTERM);
    assert_eq!(h.sent(), vec![], "a second TERM changes nothing");
    h.signal(Signal::SIGQUIT);
    assert_eq!(h.sent(), vec![(w, Signal::SIGQUIT)]);
    h.step_after(QUICK_STOP);
    assert_eq!(h.sent(), vec![(w, Signal::SIGKILL)]);
}

#[test]
fn a_stale_heartbeat_gets_abort_then_kill_and_a_replacement() {
    let timeout = Duration::from_secs(30);
    let mut h = Harness::new(config(2, |c| c.timeout = Some(timeout)), false, None);
    h.boot_all();
    let (stale, _, _) = h.workers()[0];
    let (fresh, slot, generation) = h.workers()[1];
    h.events();
    // Both beat now; only the second keeps beating.
    let now = h.arbiter.os.mono_ns();
    WorkerFile::open(&h.store, 0, 1)
        .unwrap()
        .set_heartbeat_ns(now);
    WorkerFile::open(&h.store, slot, generation)
        .unwrap()
        .set_heartbeat_ns(now + timeout.as_nanos() as u64 + 1);
    h.step_after(timeout + Duration::from_nanos(1));
    assert_eq!(
        h.events(),
        vec![
            Event::Sent(stale, Signal::SIGABRT),
            Event::Spawned(
                pid(102),
                Child::Worker {
                    slot: 0,
                    generation: 3
                }
            ),
        ]
    );
    // The replacement beats too.
    let beat = h.arbiter.os.mono_ns() + QUICK_STOP.as_nanos() as u64;
    WorkerFile::open(&h.store, 0, 3)
        .unwrap()
        .set_heartbeat_ns(beat);
    h.step_after(QUICK_STOP);
    assert_eq!(h.sent(), vec![(stale, Signal::SIGKILL)]);
    h.exit(stale, Ended::Signaled(9));
    assert_eq!(h.exits(ExitReason::Timeout), 1);
    assert!(h.sent().iter().all(|(p, _)| *p != fresh));
}

#[test]
fn hup_forks_the_new_generation_before_retiring_the_old_and_is_ready_once_it_boots() {
    let mut h = Harness::new(config(2, |_| {}), false, None);
    h.boot_all();
    assert_eq!(h.events().last(), Some(&Event::Notified(Notice::Ready)));
    let old: Vec<Pid> = h.workers().iter().map(|w| w.0).collect();
    h.world().reload = Some(config(3, |_| {}));
    h.signal(Signal::SIGHUP);
    let worker = |slot, generation| Child::Worker { slot, generation };
    assert_eq!(
        h.events(),
        vec![
            Event::Notified(Notice::Reloading),
            Event::Spawned(pid(102), worker(0, 3)),
            Event::Spawned(pid(103), worker(1, 4)),
            Event::Spawned(pid(104), worker(2, 5)),
            Event::Sent(old[0], Signal::SIGTERM),
            Event::Sent(old[1], Signal::SIGTERM),
        ]
    );
    h.step_after(Duration::from_millis(1));
    assert_eq!(h.events(), vec![], "not ready while the new ones boot");
    for pid in old {
        h.exit(pid, Ended::Exited(0));
    }
    h.boot_all();
    assert_eq!(h.events(), vec![Event::Notified(Notice::Ready)]);
    assert_eq!(h.exits(ExitReason::Reload), 2);
    let view = Snapshot::read(&h.store).unwrap().master.unwrap();
    assert_eq!(
        (view.reloads, view.workers, view.workers_desired),
        (1, 3, 3)
    );
}

#[test]
fn hup_with_tls_files_that_do_not_load_keeps_the_running_workers() {
    let mut h = Harness::new(config(2, |_| {}), false, None);
    h.boot_all();
    h.events();
    h.world().reload = Some(config(3, |_| {}));
    h.world().tls_refused = true;
    h.signal(Signal::SIGHUP);
    assert_eq!(h.events(), vec![], "nothing forked, nothing signalled");
    assert_eq!(h.workers().len(), 2);
    let view = Snapshot::read(&h.store).unwrap().master.unwrap();
    assert_eq!((view.reloads, view.workers_desired), (0, 2));
    // Once the files load again, a HUP reloads.
    h.world().tls_refused = false;
    h.signal(Signal::SIGHUP);
    assert_eq!(
        h.events().first(),
        Some(&Event::Notified(Notice::Reloading))
    );
}

#[test]
fn a_worker_that_reached_max_requests_is_replaced() {
    let mut h = Harness::new(config(1, |c| c.max_requests = 10), false, None);
    h.boot_all();
    let w = h.workers()[0].0;
    h.events();
    h.exit(w, Ended::Exited(EXIT_MAX_REQUESTS));
    assert_eq!(
        h.events(),
        vec![Event::Spawned(
            pid(101),
            Child::Worker {
                slot: 0,
                generation: 2
            }
        )]
    );
    assert_eq!(h.exits(ExitReason::MaxRequests), 1);
    assert_eq!(h.exits(ExitReason::Crash), 0);
}

#[test]
fn a_vacated_slot_is_refilled_before_the_lowest_free_one() {
    let mut h = Harness::new(config(3, |_| {}), false, None);
    h.boot_all();
    // TTOU retires slot 0 (the oldest) and leaves it free.
    h.signal(Signal::SIGTTOU);
    let slot0 = h.workers()[0].0;
    h.exit(slot0, Ended::Exited(0));
    h.events();
    // Slot 2 crashes: its replacement goes into slot 2, not into free slot 0.
    let crashed = h.workers().iter().find(|w| w.1 == 2).unwrap().0;
    h.exit(crashed, Ended::Signaled(11));
    // TTIN then fills the lowest free slot.
    h.signal(Signal::SIGTTIN);
    let spawned: Vec<Child> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Spawned(_, c) => Some(c),
            _ => None,
        })
        .collect();
    let worker = |slot, generation| Child::Worker { slot, generation };
    assert_eq!(spawned, vec![worker(2, 4), worker(0, 5)]);
}

#[test]
fn the_exporter_is_respawned_at_most_once_a_second() {
    let mut h = Harness::new(config(1, |_| {}), true, None);
    let first = h.pid_of(Child::Exporter);
    h.events();
    h.exit(first, Ended::Signaled(9));
    assert_eq!(h.events(), vec![], "not within a second of its start");
    h.step_after(EXPORTER_RESTART);
    assert_eq!(h.events(), vec![Event::Spawned(pid(102), Child::Exporter)]);
    let second = h.pid_of(Child::Exporter);
    h.step_after(EXPORTER_RESTART);
    h.exit(second, Ended::Exited(1));
    assert_eq!(
        h.events(),
        vec![Event::Spawned(pid(103), Child::Exporter)],
        "a second after its start, at once"
    );
}

#[test]
fn usr2_starts_one_new_master_and_quit_leaves_it_running() {
    let mut h = Harness::new(config(2, |_| {}), true, None);
    h.boot_all();
    h.events();
    h.signal(Signal::SIGUSR2);
    assert_eq!(h.events(), vec![Event::Spawned(pid(103), Child::Master)]);
    h.signal(Signal::SIGUSR2);
    assert_eq!(h.events(), vec![], "a second upgrade is refused");
    h.signal(Signal::SIGQUIT);
    let sent = h.sent();
    assert_eq!(
        sent.len(),
        2,
        "the two workers; the exporter once they are gone"
    );
    assert!(sent.iter().all(|(p, _)| *p != pid(103)), "{sent:?}");
    let workers_and_exporter: Vec<Pid> =
        h.os.0
            .borrow()
            .alive
            .iter()
            .map(|(p, _)| *p)
            .filter(|p| *p != pid(103))
            .collect();
    let mut done = false;
    for p in workers_and_exporter {
        done = h.exit(p, Ended::Exited(0));
    }
    assert!(done, "the master stops without waiting for the new one");
    assert!(h.arbiter.upgrade_child_alive());
    assert!(matches!(
        h.arbiter.phase,
        Phase::Stopping {
            graceful: false,
            ..
        }
    ));
}

#[test]
fn the_new_half_of_an_upgrade_starts_the_exporter_once_the_old_master_is_gone() {
    let old = pid(1);
    let mut h = Harness::new(config(1, |_| {}), true, Some(old));
    h.boot_all();
    let spawned_exporter = |events: &[Event]| {
        events
            .iter()
            .any(|e| matches!(e, Event::Spawned(_, Child::Exporter)))
    };
    let events = h.events();
    assert!(!spawned_exporter(&events), "{events:?}");
    assert!(events.contains(&Event::Notified(Notice::ReadyAsMain)));
    h.world().parent = pid(2);
    h.step_after(Duration::from_millis(1));
    assert_eq!(h.arbiter.upgrade, Upgrade::Idle);
    assert!(spawned_exporter(&h.events()));
}

#[test]
fn winch_stops_the_workers_and_hup_brings_them_back() {
    let mut h = Harness::new(config(2, |_| {}), false, None);
    h.boot_all();
    let old: Vec<Pid> = h.workers().iter().map(|w| w.0).collect();
    h.events();
    h.signal(Signal::SIGWINCH);
    assert_eq!(
        h.sent(),
        vec![(old[0], Signal::SIGTERM), (old[1], Signal::SIGTERM)]
    );
    for p in old {
        h.exit(p, Ended::Exited(0));
    }
    assert!(h.workers().is_empty());
    assert_eq!(h.exits(ExitReason::Shutdown), 2);
    h.world().reload = Some(config(2, |_| {}));
    h.signal(Signal::SIGHUP);
    assert_eq!(h.workers().len(), 2);
}

#[test]
fn a_deleted_store_directory_is_written_again_and_every_worker_replaced() {
    let mut h = Harness::new(config(2, |_| {}), false, None);
    h.boot_all();
    let [a, b] = [h.workers()[0].0, h.workers()[1].0];
    h.exit(a, Ended::Signaled(9));
    h.step_after(TICK);
    let a = h.workers().iter().find(|w| w.0 != b).unwrap().0;
    h.events();
    std::fs::remove_dir_all(h.store.path()).unwrap();
    h.step_after(TICK);
    let events = h.events();
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Sent(p, Signal::SIGTERM) if *p == a || *p == b))
            .count(),
        2,
        "{events:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Spawned(_, Child::Worker { .. })))
            .count(),
        2,
        "no slot stays empty: {events:?}"
    );
    assert!(h.arbiter.running());
    // The copies hold what the master had: one crash.
    assert_eq!(h.exits(ExitReason::Crash), 1);
    assert!(h.store.index_path().exists() && h.store.retired_path().exists());
}

#[test]
fn a_store_file_cut_short_stops_the_server_naming_it() {
    let mut h = Harness::new(config(1, |_| {}), false, None);
    h.boot_all();
    std::fs::OpenOptions::new()
        .write(true)
        .open(h.store.index_path())
        .unwrap()
        .set_len(10)
        .unwrap();
    h.step_after(TICK);
    assert!(!h.arbiter.running());
    let Phase::Stopping { failure, .. } = &h.arbiter.phase else {
        panic!("not stopping")
    };
    let msg = failure.as_ref().unwrap().to_string();
    assert!(
        msg.contains(&h.store.index_path().display().to_string()),
        "{msg}"
    );
}

fn ready(h: &Harness) -> bool {
    Snapshot::read(&h.store).unwrap().master.unwrap().ready
}

#[test]
fn readiness_waits_for_every_desired_worker_and_ends_with_the_stop() {
    let mut h = Harness::new(config(2, |_| {}), true, None);
    h.step_after(Duration::from_millis(1));
    assert!(!ready(&h), "booting");
    let first = h.workers()[0];
    WorkerFile::open(&h.store, first.1, first.2)
        .unwrap()
        .set_state(WorkerState::Idle);
    h.step_after(Duration::from_millis(1));
    assert!(!ready(&h), "one of two booted");
    h.boot_all();
    assert!(ready(&h));
    h.signal(Signal::SIGTTIN);
    assert!(!ready(&h), "the third worker boots");
    h.boot_all();
    assert!(ready(&h));
    h.signal(Signal::SIGWINCH);
    assert!(!ready(&h), "no worker is desired after WINCH");
    let exporter = h.pid_of(Child::Exporter);
    h.events();
    h.signal(Signal::SIGTERM);
    assert!(!ready(&h), "still 503 once stopping");
    assert!(
        !h.sent().contains(&(exporter, Signal::SIGTERM)),
        "the exporter answers while the workers drain"
    );
    let workers: Vec<Pid> = h.workers().iter().map(|w| w.0).collect();
    for w in workers {
        h.exit(w, Ended::Exited(0));
    }
    assert_eq!(
        h.sent(),
        vec![(exporter, Signal::SIGTERM)],
        "the exporter stops once the last worker is gone"
    );
    assert!(h.exit(exporter, Ended::Signaled(15)));
}

#[test]
fn a_worker_above_max_worker_memory_on_two_reads_in_a_row_is_retired_and_replaced() {
    use super::health::MEMORY_TICK;
    let mut h = Harness::new(config(1, |c| c.max_worker_memory = 1000), false, None);
    h.boot_all();
    let w = h.workers()[0].0;
    h.world().rss.push((w, 2000));
    h.events();
    // Above once, then below: no retirement.
    h.step_after(MEMORY_TICK);
    h.world().rss = vec![(w, 500)];
    h.step_after(MEMORY_TICK);
    h.world().rss = vec![(w, 2000)];
    h.step_after(MEMORY_TICK);
    assert_eq!(h.events(), vec![]);
    // Above on the next read too: TERM, and the slot is filled at once.
    h.step_after(MEMORY_TICK);
    assert_eq!(
        h.events(),
        vec![
            Event::Sent(w, Signal::SIGTERM),
            Event::Spawned(
                pid(101),
                Child::Worker {
                    slot: 0,
                    generation: 2
                }
            )
        ]
    );
    h.exit(w, Ended::Exited(0));
    assert_eq!(h.exits(ExitReason::Memory), 1);
    assert_eq!(h.exits(ExitReason::Crash), 0);
}
