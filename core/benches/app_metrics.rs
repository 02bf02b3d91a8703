//! The app's own metrics on the hot path.
//!
//! Run with `cargo bench -p gpe-core --bench app_metrics`.
//!
//! - `app_metrics/counter_known_labels`: `counter!("app_orders_total",
//!   "kind" => "book").increment(1)` through the installed global recorder,
//!   the label set already known (target: at most 30 ns).
//! - `app_metrics/request_updates` and `app_metrics/request_updates_traced`:
//!   one request's metric updates (as `hot_path/one_thread_updates`) without
//!   and with a `traceparent` trace id; the difference is the exemplar
//!   update (target: at most 10 ns added).

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gpe_core::DEFAULT_DURATION_BUCKETS;
use gpe_core::{AppMetricsSpec, AppRecorder, AppStore};
use gpe_core::{Index, Recorder, RequestRecord, StoreDir, WorkerFile, WorkerKind};

fn store() -> (tempfile::TempDir, StoreDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = StoreDir::new(dir.path().join("s"));
    store.prepare().expect("prepare");
    Index::create(
        &store.index_path(),
        gpe_core::DEFAULT_CAPACITY,
        1000,
        &DEFAULT_DURATION_BUCKETS,
    )
    .expect("index");
    WorkerFile::create(&store, 0, 1, WorkerKind::Sync).expect("data file");
    (dir, store)
}

const PLAIN: RequestRecord<'static> = RequestRecord {
    method: "GET",
    route: "/",
    status: 200,
    request_bytes: 0,
    response_bytes: 13,
    error: None,
    trace: None,
};

fn app_metrics(c: &mut Criterion) {
    let mut g = c.benchmark_group("app_metrics");
    g.measurement_time(Duration::from_secs(3));
    g.warm_up_time(Duration::from_secs(1));

    let (_d, store) = store();
    let app = AppStore::open(&store, 0, 1).expect("app store");
    AppRecorder::new(app, AppMetricsSpec::default())
        .install()
        .expect("install");
    metrics::counter!("app_orders_total", "kind" => "book").increment(1);
    g.bench_function("counter_known_labels", |b| {
        b.iter(|| metrics::counter!("app_orders_total", "kind" => "book").increment(black_box(1)))
    });

    let rec = Recorder::open(&store, 0, 1, true, true).expect("recorder");
    rec.ready();
    let traced = RequestRecord {
        trace: Some(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
        ..PLAIN
    };
    let mut clock = 1_000_000u64;
    for (name, record) in [
        ("request_updates", PLAIN),
        ("request_updates_traced", traced),
    ] {
        rec.begin_at(clock);
        rec.finish_at(clock, clock + 250, &record);
        g.bench_function(name, |b| {
            b.iter(|| {
                clock += 1_000;
                rec.begin_at(black_box(clock));
                rec.finish_at(clock, black_box(clock + 250), black_box(&record));
            })
        });
    }
    g.finish();
}

criterion_group!(benches, app_metrics);
criterion_main!(benches);
