//! The hot path of a worker: one request's worth of metric updates,
//! `Recorder::begin()` + `Recorder::finish(start, &RequestRecord { .. })` on a
//! label set that is already known (request counter, duration histogram,
//! size histograms, per-worker counter, in-flight gauge, busy/idle state).
//!
//! Run with `cargo bench -p gpe-core --bench hot_path` (`bench/run.sh` does).
//!
//! - `hot_path/one_thread_updates`: one thread, metrics on, the metric
//!   updates alone (`begin_at`/`finish_at` with timestamps the server already
//!   has): the figure the 50 ns target is about.
//! - `hot_path/one_thread`: the same plus the two monotonic clock reads of
//!   `begin`/`finish` (about 30 ns each on a VM without a fast TSC clock).
//! - `hot_path/one_thread_metrics_off`: one thread, `--no-metrics` (header only).
//!
//! Workers record from one thread, so these recorders are single-writer, as
//! in a worker; the four-thread case uses a multi-writer recorder.
//! - `hot_path/four_threads_one_slot`: one `Recorder` shared by 4 threads; the
//!   time reported is the wall time for each thread to do one request while
//!   the other three do the same (criterion's throughput line gives the
//!   aggregate requests/s across the 4 threads).

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use gpe_core::{Index, Recorder, RequestRecord, StoreDir, WorkerFile, WorkerKind};
use gpe_core::{DEFAULT_CAPACITY, DEFAULT_DURATION_BUCKETS};

/// A store in a temporary directory with one worker file (slot 0, generation 1)
/// and its recorder, set up the way the master and a worker do.
fn setup(metrics: bool, single_writer: bool) -> (tempfile::TempDir, Recorder) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StoreDir::new(dir.path().join("s"));
    store.prepare().expect("prepare");
    Index::create(
        &store.index_path(),
        DEFAULT_CAPACITY,
        1000,
        &DEFAULT_DURATION_BUCKETS,
    )
    .expect("index");
    WorkerFile::create(&store, 0, 1, WorkerKind::Sync).expect("data file");
    let rec = Recorder::open(&store, 0, 1, metrics, single_writer).expect("recorder");
    rec.ready();
    (dir, rec)
}

const RECORD: RequestRecord<'static> = RequestRecord {
    method: "GET",
    route: "/",
    status: 200,
    request_bytes: 0,
    response_bytes: 13,
    error: None,
    trace: None,
};

#[inline(always)]
fn one_request(rec: &Recorder) {
    let start = rec.begin();
    rec.finish(black_box(start), black_box(&RECORD));
}

fn hot_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("hot_path");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));

    g.throughput(Throughput::Elements(1));
    let (_d1, rec) = setup(true, true);
    one_request(&rec); // the label set is known from here on
    let mut clock = 1_000_000u64;
    g.bench_function("one_thread_updates", |b| {
        b.iter(|| {
            clock += 1_000;
            rec.begin_at(black_box(clock));
            rec.finish_at(clock, black_box(clock + 250), black_box(&RECORD));
        })
    });
    g.bench_function("one_thread", |b| b.iter(|| one_request(&rec)));

    let (_d2, rec_off) = setup(false, true);
    g.bench_function("one_thread_metrics_off", |b| {
        b.iter(|| one_request(&rec_off))
    });

    const THREADS: usize = 4;
    g.throughput(Throughput::Elements(THREADS as u64));
    let (_d3, shared) = setup(true, false);
    let shared = Arc::new(shared);
    one_request(&shared);
    g.bench_function("four_threads_one_slot", |b| {
        b.iter_custom(|iters| {
            let barrier = Arc::new(Barrier::new(THREADS + 1));
            let handles: Vec<_> = (0..THREADS)
                .map(|_| {
                    let rec = Arc::clone(&shared);
                    let barrier = Arc::clone(&barrier);
                    std::thread::spawn(move || {
                        barrier.wait();
                        for _ in 0..iters {
                            one_request(&rec);
                        }
                    })
                })
                .collect();
            barrier.wait();
            let t0 = Instant::now();
            for h in handles {
                h.join().expect("bench thread");
            }
            t0.elapsed()
        })
    });
    g.finish();
}

criterion_group!(benches, hot_path);
criterion_main!(benches);
