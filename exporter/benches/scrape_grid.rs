//! Scrape time against workers × series: one full scrape (read every
//! worker's store file and `/proc`, merge, encode the text exposition) of a
//! store in which every worker answered requests on the same `series`
//! routes, for a grid of worker and series counts. Prints one CSV row per
//! point: `workers,series,p50_ms,p99_ms,bytes`.
//!
//! `bench/scrape.sh` runs it; by hand:
//! `cargo bench -p gpe-exporter --bench scrape_grid -- [--quick | --point W,S]`.
//! `SCRAPE_SECONDS` bounds the time spent measuring each point (default 3).

use std::path::Path;
use std::time::{Duration, Instant};

use gpe_core::{Index, Recorder, RequestRecord, SnapshotReader, StoreDir};
use gpe_core::{WorkerFile, WorkerKind, DEFAULT_DURATION_BUCKETS};
use gpe_exporter::render::Scrape;
use gpe_exporter::{render, Format};

/// Rows each store file has room for (`metrics_store_series`): 1,000
/// routes take two rows each (requests, duration) and 256 workers two
/// per-slot rows each, about 2,600 in all.
const CAPACITY: usize = 4096;
/// Label sets per family before `other` (`metrics_max_series`).
const FAMILY_CAP: u32 = 1000;

/// A store of `workers` workers (generation 1, slots 0..workers), each of
/// which answered one `GET` on each of `series` routes (no master or retired
/// file: each would add one file's read).
fn fill(root: &Path, workers: u32, series: u32) -> StoreDir {
    let store = StoreDir::new(root.join(format!("s-{workers}-{series}"))).with_capacity(CAPACITY);
    store.prepare().expect("prepare");
    Index::create(
        &store.index_path(),
        CAPACITY,
        FAMILY_CAP,
        &DEFAULT_DURATION_BUCKETS,
    )
    .expect("index");
    let routes: Vec<String> = (0..series).map(|r| format!("/path/{r}")).collect();
    for slot in 0..workers {
        WorkerFile::create(&store, slot, 1, WorkerKind::Thread).expect("worker file");
        let rec = Recorder::open(&store, slot, 1, true, true).expect("recorder");
        rec.ready();
        for (i, route) in routes.iter().enumerate() {
            let start = 1_000_000;
            // Durations spread over the buckets, different per slot.
            let took = ((i as u64 * 7 + u64::from(slot) * 13) % 200) * 1_000_000;
            rec.begin_at(start);
            rec.finish_at(
                start,
                start + took,
                &RequestRecord {
                    method: "GET",
                    route,
                    status: 200,
                    request_bytes: 0,
                    response_bytes: 13,
                    error: None,
                    trace: None,
                },
            );
        }
    }
    store
}

/// One scrape through `reader` (as the exporter's, which keeps the files
/// mapped): its body's length, and how long reading and encoding took.
fn one_scrape(reader: &mut SnapshotReader) -> (usize, Duration, Duration) {
    let t = Instant::now();
    let s = Scrape::collect_with(reader).expect("collect");
    let read = t.elapsed();
    let n = render(s, Format::Text004).expect("render").len();
    (n, read, t.elapsed() - read)
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let budget = Duration::from_secs_f64(
        std::env::var("SCRAPE_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(if quick { 1.0 } else { 3.0 }),
    );
    // `--point W,S`: that one point only (for a profiler).
    let point: Option<[u32; 2]> = args
        .iter()
        .position(|a| a == "--point")
        .and_then(|i| args.get(i + 1))
        .and_then(|p| p.split_once(','))
        .and_then(|(w, s)| Some([w.parse().ok()?, s.parse().ok()?]));
    let (workers, series): (&[u32], &[u32]) = if let Some([w, s]) = &point {
        (std::slice::from_ref(w), std::slice::from_ref(s))
    } else if quick {
        (&[1, 16, 64, 256], &[1000])
    } else {
        (&[1, 4, 16, 64, 256], &[100, 1000])
    };
    // The store lives where a server's does by default.
    let base = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm")
    } else {
        tempfile::tempdir()
    }
    .expect("tempdir");
    println!("workers,series,p50_ms,p99_ms,bytes");
    for &s in series {
        for &w in workers {
            let store = fill(base.path(), w, s);
            let mut reader = SnapshotReader::new(store.clone());
            let mut bytes = 0;
            for _ in 0..3 {
                bytes = one_scrape(&mut reader).0;
            }
            // At least 50 scrapes (for a p99 that means something), at most
            // 2,000, within the time budget once 50 are done.
            let (mut times, mut reads, mut encodes) = (Vec::new(), Vec::new(), Vec::new());
            let began = Instant::now();
            while times.len() < 2000 && (times.len() < 50 || began.elapsed() < budget) {
                let t = Instant::now();
                // The size moves by a byte or two (uptime, CPU seconds).
                let (n, read, encode) = one_scrape(&mut reader);
                times.push(t.elapsed().as_secs_f64() * 1e3);
                reads.push(read.as_secs_f64() * 1e3);
                encodes.push(encode.as_secs_f64() * 1e3);
                bytes = n;
            }
            for t in [&mut times, &mut reads, &mut encodes] {
                t.sort_by(f64::total_cmp);
            }
            eprintln!(
                "{w} workers x {s} series: {} scrapes, p50 read {:.3} ms + encode {:.3} ms",
                times.len(),
                quantile(&reads, 0.5),
                quantile(&encodes, 0.5)
            );
            println!(
                "{w},{s},{:.3},{:.3},{bytes}",
                quantile(&times, 0.5),
                quantile(&times, 0.99)
            );
            store.cleanup(true);
        }
    }
}
