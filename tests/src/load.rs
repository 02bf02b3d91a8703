//! Load generators: client threads that each run a fixed number of calls, or
//! loop on one path until stopped.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::http::http;

/// Runs `f` on `clients` threads, each doing `per_client` iterations; returns
/// the results in order of completion.
pub fn parallel<T: Send + 'static>(
    clients: usize,
    per_client: usize,
    f: impl Fn(usize, usize) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let f = std::sync::Arc::new(f);
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let f = f.clone();
            std::thread::spawn(move || (0..per_client).map(|i| f(c, i)).collect::<Vec<T>>())
        })
        .collect();
    handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect()
}

/// Clients that send `GET /` until stopped (Connection: close), counting.
pub struct Load {
    pub stop: Arc<AtomicBool>,
    pub ok: Arc<AtomicU64>,
    pub failed: Arc<AtomicU64>,
    pub threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(addr: std::net::SocketAddr, clients: usize, path: &'static str) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                std::thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(90);
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        match http(addr, "GET", path, &[], b"") {
                            Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            threads,
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok.load(Ordering::Relaxed)
    }

    pub fn finish(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            t.join().unwrap();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
