//! Unit tests of the recorder.

use super::*;
use crate::store::layout::FileKind;
use crate::store::{ExemplarView, FileIdentity, Snapshot, WorkerKind};

fn setup(cap: u32) -> (tempfile::TempDir, StoreDir, Recorder) {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreDir::new(dir.path().join("s"));
    store.prepare().unwrap();
    Index::create(&store.index_path(), 4096, cap, &[0.001, 1.0]).unwrap();
    DataFile::create(
        &store.worker_path(0, 1),
        4096,
        FileIdentity {
            kind: FileKind::Worker,
            slot: 0,
            generation: 1,
            worker_kind: Some(WorkerKind::Sync),
        },
    )
    .unwrap();
    let rec = Recorder::open(&store, 0, 1, true, true).unwrap();
    (dir, store, rec)
}

#[test]
fn status_strings() {
    let mut b = [0; 3];
    assert_eq!(status_str(200, &mut b), "200");
    assert_eq!(status_str(404, &mut b), "404");
    assert_eq!(status_str(5, &mut b), "100");
}

#[test]
fn buckets_are_the_first_fitting_bound() {
    assert_eq!(bucket_of(&[10, 100], 10), 0);
    assert_eq!(bucket_of(&[10, 100], 11), 1);
    assert_eq!(bucket_of(&[10, 100], 1000), 2);
}

#[test]
fn requests_are_counted_exactly_and_state_follows_in_flight() {
    let (_d, store, rec) = setup(100);
    rec.ready();
    for i in 0..10u16 {
        let start = rec.begin();
        assert_eq!(
            rec.file().header().state.load(Ordering::Relaxed),
            WorkerState::Busy.code()
        );
        rec.finish(
            start,
            &RequestRecord {
                status: if i % 2 == 0 { 200 } else { 500 },
                error: (i % 2 == 1).then_some(ErrorKind::AppError),
                ..RequestRecord::hello()
            },
        );
    }
    assert_eq!(
        rec.file().header().state.load(Ordering::Relaxed),
        WorkerState::Idle.code()
    );
    let snap = Snapshot::read(&store).unwrap();
    let get = |fam: Family, labels: &[&str]| -> u64 {
        snap.series
            .iter()
            .find(|s| s.family == fam && s.labels == labels)
            .map_or(0, |s| s.cells[0])
    };
    assert_eq!(get(Family::HttpRequests, &["GET", "/", "200"]), 5);
    assert_eq!(get(Family::HttpRequests, &["GET", "/", "500"]), 5);
    assert_eq!(get(Family::HttpErrors, &["GET", "/", "app_error"]), 5);
    assert_eq!(get(Family::WorkerRequests, &["0"]), 10);
    assert_eq!(rec.requests(), 10);
}

#[test]
fn a_file_is_marked_once_it_holds_an_exemplar() {
    let (_d, store, rec) = setup(100);
    rec.ready();
    let record = |trace| {
        let start = rec.begin();
        rec.finish(
            start,
            &RequestRecord {
                trace,
                ..RequestRecord::hello()
            },
        );
    };
    let exemplars = || -> Vec<ExemplarView> {
        Snapshot::read(&store)
            .unwrap()
            .series
            .iter()
            .filter(|s| s.family == Family::HttpDuration)
            .flat_map(|s| s.exemplars.iter().map(|(_, e)| *e))
            .collect()
    };
    record(None);
    assert_eq!(rec.file().header().exemplars.load(Ordering::Relaxed), 0);
    assert!(exemplars().is_empty());
    record(Some(0xabc));
    assert_eq!(rec.file().header().exemplars.load(Ordering::Relaxed), 1);
    assert_eq!(
        exemplars().iter().map(|e| e.trace_id).collect::<Vec<_>>(),
        [0xabc]
    );
}

#[test]
fn overflow_goes_to_other_and_counts_drops() {
    let (_d, store, rec) = setup(5);
    for i in 0..50 {
        let route = format!("/p/{i}");
        let start = rec.begin();
        rec.finish(
            start,
            &RequestRecord {
                route: &route,
                status: 404,
                response_bytes: 0,
                ..RequestRecord::hello()
            },
        );
    }
    let snap = Snapshot::read(&store).unwrap();
    let reqs: Vec<_> = snap
        .series
        .iter()
        .filter(|s| s.family == Family::HttpRequests)
        .collect();
    assert_eq!(reqs.len(), 6, "cap of 5 plus other");
    assert_eq!(reqs.iter().map(|s| s.cells[0]).sum::<u64>(), 50);
    assert_eq!(snap.dropped[Family::HttpRequests.code() as usize], 45);
}

#[test]
fn tracked_requests_are_named_in_the_file_until_dropped() {
    let (_d, store, rec) = setup(100);
    let rec = Arc::new(rec);
    let file = crate::store::WorkerFile::open(&store, 0, 1).unwrap();
    let long = format!("/{}", "é".repeat(200));
    let a = rec.track(5, "GET", "/sleep/60000");
    let b = rec.track(7, "OPTIONS", &long);
    let (named, _) = file.in_flight();
    assert_eq!(named.len(), 2);
    assert_eq!(
        (
            named[0].method.as_str(),
            named[0].path.as_str(),
            named[0].start_ns
        ),
        ("GET", "/sleep/60000", 5)
    );
    // Cut to 256 bytes at a character boundary; the method to 8 bytes.
    assert_eq!(named[1].method, "OPTIONS");
    assert!(named[1].path.len() <= 256 && long.starts_with(&named[1].path));
    assert_eq!(named[1].path.len(), 255);
    drop(a);
    assert_eq!(file.in_flight().0.len(), 1);
    // A full table names no more, and frees what it was given.
    let many: Vec<_> = (0..40).map(|i| rec.track(10 + i, "PUT", "/x")).collect();
    assert_eq!(file.in_flight().0.len(), 32);
    drop(many);
    drop(b);
    assert_eq!(file.in_flight().0, vec![]);
}

#[test]
fn the_slot_histogram_counts_every_route_in_the_same_buckets() {
    let (_d, store, rec) = setup(1);
    // Buckets 0.001 s and 1 s: 0.5 ms, 2 ms, 3 ms and 2 s, over two routes
    // (the second one goes to `other`: the slot's row counts it too).
    for (i, ns) in [500_000u64, 2_000_000, 3_000_000, 2_000_000_000]
        .into_iter()
        .enumerate()
    {
        let route = if i % 2 == 0 { "/a" } else { "/b" };
        rec.begin_at(1_000);
        rec.finish_at(
            1_000,
            1_000 + ns,
            &RequestRecord {
                route,
                response_bytes: 0,
                ..RequestRecord::hello()
            },
        );
    }
    let snap = Snapshot::read(&store).unwrap();
    let slot: Vec<_> = snap
        .series
        .iter()
        .filter(|s| s.family == Family::WorkerDuration)
        .collect();
    assert_eq!(slot.len(), 1);
    assert_eq!(slot[0].labels, ["0"]);
    assert_eq!(slot[0].cells[..3], [1, 2, 1]);
    assert_eq!(slot[0].cells[CELLS - 1], 2_005_500_000);
    // The same observations as the route histograms, summed.
    let mut routes = [0u64; CELLS];
    for s in snap
        .series
        .iter()
        .filter(|s| s.family == Family::HttpDuration)
    {
        for (a, c) in routes.iter_mut().zip(s.cells) {
            *a += c;
        }
    }
    assert_eq!(routes, slot[0].cells);
}
