//! Connection balancing between sibling workers. All workers accept from the
//! same sockets, and the kernel wakes them all; left alone, whichever process
//! runs first takes a burst of connections, and keep-alive keeps the skew. A
//! worker holding more open connections than its least-loaded serving sibling
//! therefore lets the sibling take the next one, but never waits longer than
//! [`MAX_DEFER`], so a stuck sibling cannot stop it accepting. The workers' own
//! store files (their connection counts) are the shared state; no lock is taken.

use std::time::{Duration, Instant};

use crate::store::{StoreDir, WorkerFile};

/// How long an accept loop pauses before asking again.
pub const BALANCE_PAUSE: Duration = Duration::from_millis(1);
/// Longest a worker defers to its siblings before accepting anyway.
pub const MAX_DEFER: Duration = Duration::from_millis(50);
/// How often the list of siblings is refreshed.
const RELIST: Duration = Duration::from_millis(500);
/// How often it is refreshed while no sibling is known.
const RELIST_ALONE: Duration = Duration::from_millis(10);

/// Decides whether this worker should accept the next connection.
#[derive(Debug)]
pub struct Balancer {
    store: StoreDir,
    slot: u32,
    generation: u64,
    siblings: Vec<WorkerFile>,
    listed: Option<Instant>,
    deferring: Option<Instant>,
}

impl Balancer {
    /// A balancer for the worker in `slot`/`generation` of `store`.
    pub fn new(store: StoreDir, slot: u32, generation: u64) -> Balancer {
        Balancer {
            store,
            slot,
            generation,
            siblings: Vec::new(),
            listed: None,
            deferring: None,
        }
    }

    fn relist(&mut self) {
        self.siblings.clear();
        if let Ok(files) = self.store.worker_files() {
            for (slot, generation, _) in files {
                if (slot, generation) == (self.slot, self.generation) {
                    continue;
                }
                if let Ok(f) = WorkerFile::open(&self.store, slot, generation) {
                    self.siblings.push(f);
                }
            }
        }
        self.listed = Some(Instant::now());
    }

    /// Whether to accept now: this worker, holding `mine` connections
    /// (counted at accept time, before their tasks run), holds no more than
    /// its least-loaded serving sibling, or it has deferred for [`MAX_DEFER`].
    pub fn my_turn(&mut self, mine: i64) -> bool {
        // Siblings start around the same time: while none is known, look again
        // soon rather than only every RELIST.
        let every = if self.siblings.is_empty() {
            RELIST_ALONE
        } else {
            RELIST
        };
        if self.listed.is_none_or(|t| t.elapsed() >= every) {
            self.relist();
        }
        let least = self
            .siblings
            .iter()
            .filter(|f| f.serving())
            .map(WorkerFile::connections)
            .min();
        if least.is_none_or(|least| mine <= least) {
            self.deferring = None;
            return true;
        }
        let since = *self.deferring.get_or_insert_with(Instant::now);
        if since.elapsed() >= MAX_DEFER {
            self.deferring = None;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Index, Recorder, WorkerKind};
    use std::sync::Arc;

    fn worker(store: &StoreDir, slot: u32, generation: u64) -> Arc<Recorder> {
        WorkerFile::create(store, slot, generation, WorkerKind::Eventloop).unwrap();
        let r = Arc::new(Recorder::open(store, slot, generation, true, true).unwrap());
        r.ready();
        r
    }

    #[test]
    fn the_busier_worker_defers_for_a_bounded_time() {
        let dir = tempfile::tempdir().unwrap();
        let store = StoreDir::new(dir.path().join("s"));
        store.prepare().unwrap();
        Index::create(&store.index_path(), 1024, 10, &[1.0]).unwrap();
        let a = worker(&store, 0, 1);
        let b = worker(&store, 1, 2);
        let mut ba = Balancer::new(store.clone(), 0, 1);
        let mut bb = Balancer::new(store.clone(), 1, 2);
        assert!(ba.my_turn(0) && bb.my_turn(0), "equal load: both accept");
        a.connection_opened();
        assert!(!ba.my_turn(1), "a holds more: it defers");
        assert!(bb.my_turn(0));
        std::thread::sleep(MAX_DEFER);
        assert!(ba.my_turn(1), "but not for longer than MAX_DEFER");
        b.connection_opened();
        assert!(ba.my_turn(1));
        // A draining sibling does not count.
        b.draining();
        a.connection_opened();
        assert!(ba.my_turn(2));
    }
}
