//! Unit tests of the app recorder over a real store directory.

use super::*;
use crate::store::index::Mirror;
use crate::store::{Index, RetiredFile, Snapshot, StoreDir, WorkerFile, WorkerKind};
use crate::{AppSeries, AppValue};

struct Fixture {
    _dir: tempfile::TempDir,
    store: StoreDir,
    index: Index,
    files: Vec<WorkerFile>,
    retired: RetiredFile,
}

fn fixture(cap: u32, workers: u32) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = StoreDir::new(dir.path().join("s"));
    store.prepare().unwrap();
    let index = Index::create(&store.index_path(), 4096, cap, &[0.1, 1.0]).unwrap();
    let retired = RetiredFile::create(&store).unwrap();
    let files = (0..workers)
        .map(|slot| WorkerFile::create(&store, slot, 1, WorkerKind::Thread).unwrap())
        .collect();
    Fixture {
        _dir: dir,
        store,
        index,
        files,
        retired,
    }
}

fn recorder(f: &Fixture, slot: u32, families: &[(&str, AppMetricSettings)]) -> AppRecorder {
    let store = AppStore::open(&f.store, slot, 1).unwrap();
    AppRecorder::new(
        store,
        AppMetricsSpec {
            families: families
                .iter()
                .map(|(n, s)| ((*n).to_owned(), s.clone()))
                .collect(),
            default_buckets: vec![1.0, 10.0],
        },
    )
}

fn app_series<'s>(snap: &'s Snapshot, name: &str) -> Vec<&'s AppSeries> {
    let fam = snap
        .app
        .families
        .iter()
        .position(|f| f.name == name)
        .unwrap_or_else(|| panic!("no family {name}"));
    snap.app.series.iter().filter(|s| s.family == fam).collect()
}

#[test]
fn counters_and_histograms_sum_over_workers_and_survive_a_fold() {
    let f = fixture(100, 2);
    for slot in 0..2 {
        let r = recorder(&f, slot, &[]);
        metrics::with_local_recorder(&r, || {
            metrics::describe_counter!("app_orders_total", "Orders taken");
            for i in 0..10u64 {
                let kind = if i % 2 == 0 { "a" } else { "b" };
                metrics::counter!("app_orders_total", "kind" => kind).increment(1);
                metrics::histogram!("app_order_value").record(i as f64 + 0.5);
            }
        });
    }
    // Worker 1 dies: its counts move into the retired totals, once.
    f.retired
        .fold_window()
        .fold(&f.index, &mut Mirror::default(), &f.files[1], 0)
        .unwrap();
    let snap = Snapshot::read(&f.store).unwrap();
    let orders = app_series(&snap, "app_orders");
    assert_eq!(orders.len(), 2);
    for s in &orders {
        assert_eq!(s.value, AppValue::Counter(10), "{s:?}");
    }
    assert_eq!(snap.app.families[0].help, "Orders taken");
    let value = app_series(&snap, "app_order_value");
    // Each worker: 0.5 (<=1), 1.5..9.5 (<=10): 1 and 9; the sum 50 each.
    assert_eq!(
        value[0].value,
        AppValue::Histogram {
            buckets: vec![2, 18, 0],
            sum: 100.0
        }
    );
}

#[test]
fn gauges_merge_by_mode_and_a_dead_workers_gauge_vanishes() {
    let f = fixture(100, 3);
    let modes = [
        ("app_sum", GaugeMode::Sum),
        ("app_max", GaugeMode::Max),
        ("app_min", GaugeMode::Min),
        ("app_latest", GaugeMode::Latest),
        ("app_each", GaugeMode::PerWorker),
    ];
    let conf: Vec<(&str, AppMetricSettings)> = modes
        .iter()
        .map(|(n, m)| {
            (
                *n,
                AppMetricSettings {
                    gauge: Some(*m),
                    buckets: None,
                },
            )
        })
        .collect();
    for slot in 0..3u32 {
        let r = recorder(&f, slot, &conf);
        metrics::with_local_recorder(&r, || {
            for (name, _) in &modes {
                let g = metrics::gauge!(*name);
                g.set(f64::from(slot) + 1.0);
                g.increment(1.0);
            }
        });
    }
    let merged =
        |snap: &Snapshot, name: &str, mode: GaugeMode| match &app_series(snap, name)[0].value {
            AppValue::Gauge(samples) => mode.merge(samples),
            other => panic!("{other:?}"),
        };
    let snap = Snapshot::read(&f.store).unwrap();
    assert_eq!(merged(&snap, "app_sum", GaugeMode::Sum), [(None, 9.0)]);
    assert_eq!(merged(&snap, "app_max", GaugeMode::Max), [(None, 4.0)]);
    assert_eq!(merged(&snap, "app_min", GaugeMode::Min), [(None, 2.0)]);
    assert_eq!(
        merged(&snap, "app_latest", GaugeMode::Latest),
        [(None, 4.0)]
    );
    assert_eq!(
        merged(&snap, "app_each", GaugeMode::PerWorker),
        [(Some(0), 2.0), (Some(1), 3.0), (Some(2), 4.0)]
    );
    f.retired
        .fold_window()
        .fold(&f.index, &mut Mirror::default(), &f.files[2], 0)
        .unwrap();
    let snap = Snapshot::read(&f.store).unwrap();
    assert_eq!(merged(&snap, "app_sum", GaugeMode::Sum), [(None, 5.0)]);
    assert_eq!(merged(&snap, "app_max", GaugeMode::Max), [(None, 3.0)]);
    assert_eq!(
        merged(&snap, "app_each", GaugeMode::PerWorker),
        [(Some(0), 2.0), (Some(1), 3.0)]
    );
}

#[test]
fn bad_names_collisions_and_type_clashes_are_refused_once_each() {
    let f = fixture(100, 1);
    let r = recorder(&f, 0, &[]);
    metrics::with_local_recorder(&r, || {
        for _ in 0..3 {
            metrics::counter!("bad-name").increment(1);
            metrics::counter!("gpe_http_requests_total").increment(1);
            metrics::counter!("app_ok_total", "bad label" => "x").increment(1);
            metrics::counter!("app_clash").increment(1);
            metrics::gauge!("app_clash").set(1.0);
            metrics::histogram!("app_h", "le" => "1").record(1.0);
            metrics::gauge!("app_g_total").set(1.0);
        }
    });
    let snap = Snapshot::read(&f.store).unwrap();
    let r = &snap.app.rejected;
    // bad-name and app_ok_total's label, app_h's `le`, a gauge named `_total`.
    assert_eq!(r[RejectReason::InvalidName.code() as usize], 4);
    assert_eq!(r[RejectReason::GpeCollision.code() as usize], 1);
    assert_eq!(r[RejectReason::TypeClash.code() as usize], 1);
    assert_eq!(
        app_series(&snap, "app_clash")[0].value,
        AppValue::Counter(3)
    );
}

#[test]
fn the_cap_collapses_new_label_sets_into_other_and_counts_them() {
    let f = fixture(5, 1);
    let r = recorder(&f, 0, &[]);
    metrics::with_local_recorder(&r, || {
        for i in 0..50 {
            metrics::counter!("app_users_total", "user" => i.to_string()).increment(2);
        }
    });
    let snap = Snapshot::read(&f.store).unwrap();
    let s = app_series(&snap, "app_users");
    assert_eq!(s.len(), 6);
    let other = s
        .iter()
        .find(|s| s.labels == [("user".to_owned(), "other".to_owned())])
        .unwrap();
    assert_eq!(other.value, AppValue::Counter(90));
    assert_eq!(snap.app.families[0].dropped, 45);
}

#[test]
fn an_exemplar_is_kept_per_bucket_newest_first() {
    let f = fixture(100, 1);
    let r = recorder(&f, 0, &[]);
    let key = Key::from_name("app_latency_seconds");
    metrics::with_local_recorder(&r, || {
        let h = match r.handle(&key, AppKind::Histogram) {
            Handle::Histogram(h) => h,
            _ => panic!("refused"),
        };
        h.record_with_exemplar(0.5, 0xaa);
        h.record_with_exemplar(0.7, 0xbb);
        h.record_with_exemplar(5.0, 0xcc);
    });
    let snap = Snapshot::read(&f.store).unwrap();
    let s = app_series(&snap, "app_latency_seconds")[0];
    let got: Vec<(usize, u128, f64)> = s
        .exemplars
        .iter()
        .map(|(b, e)| (*b, e.trace_id, e.value))
        .collect();
    assert_eq!(got, [(0, 0xbb, 0.7), (1, 0xcc, 5.0)]);
}
