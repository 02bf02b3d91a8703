//! Runtimes: the one tokio edge (runtime builder, socket registration) and
//! the idle-yield hook the async loops share.

pub mod idle;
pub mod tokio;
