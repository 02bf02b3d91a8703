//! The worker types, and a macro that runs one test body on each.

/// The four worker types.
pub const WORKERS: [&str; 4] = ["sync", "thread", "eventloop", "greenlet"];

/// Generates one `#[test]` per worker type calling `$body(worker)`.
#[macro_export]
macro_rules! per_worker {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn sync() { super::$name("sync") }
                #[test]
                fn thread() { super::$name("thread") }
                #[test]
                fn eventloop() { super::$name("eventloop") }
                #[test]
                fn greenlet() { super::$name("greenlet") }
            }
        )*
    };
}
