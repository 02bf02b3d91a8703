//! The worker types built into this binary, chosen by cargo features.

use std::sync::Arc;

use gpe_core::Worker;

/// The worker implementation for `name`, or an error naming the cargo feature
/// that would provide it.
///
/// # Errors
/// Unknown type, or a type whose feature is off in this build.
pub fn select(name: &str) -> Result<Arc<dyn Worker>, String> {
    match name {
        #[cfg(feature = "sync")]
        "sync" => Ok(Arc::new(gpe_worker_sync::SyncWorker)),
        #[cfg(feature = "thread")]
        "thread" => Ok(Arc::new(gpe_worker_thread::ThreadWorker)),
        #[cfg(feature = "eventloop")]
        "eventloop" => Ok(Arc::new(gpe_worker_eventloop::EventloopWorker)),
        #[cfg(feature = "greenlet")]
        "greenlet" => Ok(Arc::new(gpe_worker_greenlet::GreenletWorker)),
        known if gpe_core::WORKER_TYPES.contains(&known) => Err(format!(
            "worker type `{known}` is not built into this binary; rebuild gpe with cargo feature `{known}` (for example `cargo build -p gpe --features {known}`)"
        )),
        other => Err(format!(
            "unknown worker type {other:?}; expected one of {}",
            gpe_core::WORKER_TYPES.join(", ")
        )),
    }
}

/// Worker types built into this binary.
pub fn available() -> Vec<&'static str> {
    gpe_core::WORKER_TYPES
        .iter()
        .copied()
        .filter(|w| select(w).is_ok())
        .collect()
}
