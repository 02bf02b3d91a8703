//! One scrape of a busy store: gpe's own families for 8 workers beside 10
//! app families (4 counters, 3 gauges, 3 histograms) of 100 series each,
//! recorded by all 8 workers. Reading the store and encoding it in each
//! format (target: at most 10 ms p50).
//!
//! Run with `cargo bench -p gpe-exporter --bench scrape`.

// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use gpe_core::{AppMetricsSpec, AppRecorder, AppStore, DEFAULT_DURATION_BUCKETS};
use gpe_core::{Index, Recorder, RequestRecord, StoreDir, WorkerFile, WorkerKind};
use gpe_exporter::render::Scrape;
use gpe_exporter::{render, Format};

const WORKERS: u32 = 8;

fn fill() -> (tempfile::TempDir, StoreDir, Vec<WorkerFile>) {
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
    let mut files = Vec::new();
    for slot in 0..WORKERS {
        files.push(WorkerFile::create(&store, slot, 1, WorkerKind::Thread).expect("file"));
        let rec = Recorder::open(&store, slot, 1, true, false).expect("recorder");
        for route in ["/", "/users/{id}", "/orders/{id}"] {
            let start = rec.begin();
            rec.finish(
                start,
                &RequestRecord {
                    method: "GET",
                    route,
                    status: 200,
                    request_bytes: 0,
                    response_bytes: 10,
                    error: None,
                    trace: Some(7),
                },
            );
        }
        let app = AppRecorder::new(
            AppStore::open(&store, slot, 1).expect("app store"),
            AppMetricsSpec {
                default_buckets: DEFAULT_DURATION_BUCKETS.to_vec(),
                ..AppMetricsSpec::default()
            },
        );
        metrics::with_local_recorder(&app, || {
            for f in 0..10 {
                for s in 0..100 {
                    let label = s.to_string();
                    match f % 3 {
                        0 => {
                            metrics::counter!(format!("app_c{f}_total"), "id" => label).increment(1)
                        }
                        1 => metrics::gauge!(format!("app_g{f}"), "id" => label).set(1.0),
                        _ => metrics::histogram!(format!("app_h{f}"), "id" => label).record(0.2),
                    }
                }
            }
        });
    }
    (dir, store, files)
}

fn scrape(c: &mut Criterion) {
    let (_dir, store, _files) = fill();
    let mut g = c.benchmark_group("scrape");
    g.measurement_time(Duration::from_secs(5));
    for (name, format) in [
        ("text", Format::Text004),
        ("openmetrics", Format::OpenMetrics),
    ] {
        g.bench_function(format!("10x100_app_series_8_workers_{name}"), |b| {
            b.iter(|| {
                let s = Scrape::collect(&store).expect("collect");
                render(s, format).expect("render").len()
            })
        });
    }
    g.finish();
}

criterion_group!(benches, scrape);
criterion_main!(benches);
