//! Property tests of the store against damaged files: random, truncated,
//! bit-flipped, overwritten or replaced index, master, retired and worker
//! files, fed to the exporter's reader ([`Snapshot`]) and to the master's
//! repairs and fold. Nothing panics or spins, and the files that are whole
//! are still served. Bounded: 96 cases of a few milliseconds each
//! (`GPE_FUZZ_CASES=N` runs N).

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::index::Mirror;
use super::layout::{data_file_bytes, index_file_bytes};
use super::{
    Family, Index, MasterFile, Recorder, RequestRecord, RetiredFile, Snapshot, StoreDir,
    WorkerFile, WorkerKind,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Target {
    Index,
    Master,
    Retired,
    Worker,
}

#[derive(Debug, Clone)]
enum Damage {
    /// Cut to this many bytes.
    Truncate(usize),
    /// Flip these bits (byte offset, bit).
    Flip(Vec<(usize, u8)>),
    /// Overwrite the header word at this index with this value.
    Word(usize, u64),
    /// Replace the file by these bytes.
    Replace(Vec<u8>),
}

impl Damage {
    /// Whether the file can no longer be opened at all.
    fn unopenable(&self) -> bool {
        matches!(self, Damage::Truncate(_) | Damage::Replace(_))
    }

    /// Whether it may change value rows or index entries (past the header),
    /// and so the figures a whole file would give.
    fn touches_rows(&self, t: Target) -> bool {
        let header = if t == Target::Index { 512 } else { 1024 };
        match self {
            Damage::Flip(bits) => bits.iter().any(|(at, _)| *at >= header),
            _ => false,
        }
    }
}

fn a_target() -> impl Strategy<Value = Target> {
    prop_oneof![
        Just(Target::Index),
        Just(Target::Master),
        Just(Target::Retired),
        Just(Target::Worker)
    ]
}

fn a_damage() -> impl Strategy<Value = Damage> {
    let offset = prop_oneof![3 => 0..1024usize, 1 => 0..index_file_bytes(1024)];
    let word = prop_oneof![
        Just(0u64),
        Just(1),
        Just(0xffff_ffff),
        Just(0xffff_ffff_ffff_ffff),
        Just(0x4750_4553_544f_5245),
        any::<u64>()
    ];
    prop_oneof![
        (0..data_file_bytes(1024)).prop_map(Damage::Truncate),
        prop::collection::vec((offset, 0..8u8), 1..16).prop_map(Damage::Flip),
        (0..64usize, word).prop_map(|(i, v)| Damage::Word(i, v)),
        prop::collection::vec(any::<u8>(), 0..256).prop_map(Damage::Replace),
    ]
}

/// A store with two workers: worker 0 served 3 requests on `/a`, worker 1
/// served 5 on `/b`.
struct Fixture {
    _dir: tempfile::TempDir,
    store: StoreDir,
    index: Index,
    master: MasterFile,
    retired: RetiredFile,
    worker: WorkerFile,
    _other: WorkerFile,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreDir::new(dir.path().join("s"));
    store.prepare().unwrap();
    let index = Index::create(&store.index_path(), 1024, 100, &[0.1, 1.0]).unwrap();
    let master = MasterFile::create(&store).unwrap();
    let retired = RetiredFile::create(&store).unwrap();
    let worker = WorkerFile::create(&store, 0, 1, WorkerKind::Thread).unwrap();
    let other = WorkerFile::create(&store, 1, 2, WorkerKind::Thread).unwrap();
    for (slot, generation, route, n) in [(0, 1, "/a", 3), (1, 2, "/b", 5)] {
        let rec = Recorder::open(&store, slot, generation, true, true).unwrap();
        for _ in 0..n {
            let start = rec.begin();
            rec.finish(
                start,
                &RequestRecord {
                    method: "GET",
                    route,
                    status: 200,
                    request_bytes: 0,
                    response_bytes: 1,
                    error: None,
                    trace: None,
                },
            );
        }
    }
    Fixture {
        _dir: dir,
        store,
        index,
        master,
        retired,
        worker,
        _other: other,
    }
}

fn path_of(store: &StoreDir, t: Target) -> PathBuf {
    match t {
        Target::Index => store.index_path(),
        Target::Master => store.master_path(),
        Target::Retired => store.retired_path(),
        Target::Worker => store.worker_path(0, 1),
    }
}

fn damage(path: &PathBuf, d: &Damage) {
    let open = || std::fs::OpenOptions::new().write(true).open(path).unwrap();
    match d {
        Damage::Truncate(len) => open().set_len(*len as u64).unwrap(),
        Damage::Flip(bits) => {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            for (at, bit) in bits {
                let mut b = [0u8];
                f.read_exact_at(&mut b, *at as u64).unwrap();
                b[0] ^= 1 << bit;
                f.write_all_at(&b, *at as u64).unwrap();
            }
        }
        Damage::Word(i, v) => open()
            .write_all_at(&v.to_ne_bytes(), *i as u64 * 8)
            .unwrap(),
        Damage::Replace(bytes) => {
            std::fs::remove_file(path).unwrap();
            std::fs::write(path, bytes).unwrap();
        }
    }
}

fn requests(snap: &Snapshot, route: &str) -> u64 {
    snap.series
        .iter()
        .filter(|s| s.family == Family::HttpRequests && s.labels.get(1).is_some_and(|r| r == route))
        .map(|s| s.cells[0])
        .sum()
}

fn read(store: &StoreDir) -> std::io::Result<Snapshot> {
    Snapshot::read_within(store, Duration::from_millis(5), |_, _| ()).map(|(s, ())| s)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("GPE_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(96),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn damaged_files_never_panic_or_spin_and_whole_files_are_served(
        target in a_target(),
        d in a_damage(),
    ) {
        let started = Instant::now();
        let f = fixture();
        damage(&path_of(&f.store, target), &d);

        // The exporter's reader.
        let snap = read(&f.store);
        let exact = !d.touches_rows(target);
        if target != Target::Index {
            let snap = snap.unwrap();
            if exact {
                prop_assert_eq!(requests(&snap, "/b"), 5, "a whole worker file is served");
            }
            if target != Target::Worker && exact {
                prop_assert_eq!(requests(&snap, "/a"), 3);
            } else if d.unopenable() {
                prop_assert_eq!(requests(&snap, "/a"), 0, "an unopenable file is skipped");
            }
        }

        // The master: its repairs, then a fold of worker 0 (its mapping of a
        // cut file reads as zeroes), then the reader again.
        let _ = f.index.repair();
        let _ = f.retired.repair();
        let _ = f.master.repair();
        {
            let window = f.retired.fold_window();
            let _ = window.fold(&f.index, &mut Mirror::default(), &f.worker, 7);
        }
        let after = read(&f.store);
        if !(target == Target::Index && d.unopenable()) {
            let after = after.unwrap();
            if exact {
                prop_assert_eq!(requests(&after, "/b"), 5, "served again after the repairs");
            }
        }
        prop_assert!(started.elapsed() < Duration::from_secs(5));
    }
}
