//! Yielding the CPU before an event loop sleeps (setting `idle_yield`).
//!
//! An async worker's loop that has no ready task sleeps in the kernel's poller
//! until IO arrives. Under load, when workers share cores with each other or
//! with their clients (a proxy or a load generator on the same host), such a
//! sleep is often microseconds long, and each one costs a context switch out,
//! a wake-up by the peer that sends the next bytes, and a switch back in.
//! Yielding once first lets whatever is runnable on this core (often that very
//! peer) run before the loop polls again, so the poll more often finds work
//! and the loop does not sleep at all. On an otherwise idle core
//! `sched_yield(2)` returns at once: one cheap syscall per sleep.
//!
//! tokio runs [`before_sleep`] through its park hook ([`tokio_runtime`]);
//! smol's `block_on` has no such hook, so its top-level future is wrapped in
//! [`yield_when_idle`].

use std::future::Future;
use std::io;
use std::task::Poll;

#[cfg(test)]
thread_local! {
    static YIELDS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Gives up the CPU once, letting any runnable thread on this core go first.
pub fn before_sleep() {
    #[cfg(test)]
    YIELDS.with(|y| y.set(y.get() + 1));
    std::thread::yield_now();
}

/// A current-thread tokio runtime with IO and timers for a worker's event
/// loop; with `idle_yield`, it calls [`before_sleep`] each time it is about to
/// park.
///
/// # Errors
/// The runtime could not be built (no epoll instance or eventfd).
pub fn tokio_runtime(idle_yield: bool) -> io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_all();
    if idle_yield {
        builder.on_thread_park(before_sleep);
    }
    builder.build()
}

/// Runs `fut`, calling [`before_sleep`] after every poll that leaves it
/// pending (with `idle_yield`), for executors whose `block_on` polls the
/// future and then sleeps in the poller.
pub async fn yield_when_idle<F: Future>(fut: F, idle_yield: bool) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    std::future::poll_fn(|cx| match fut.as_mut().poll(cx) {
        Poll::Ready(out) => Poll::Ready(out),
        Poll::Pending => {
            if idle_yield {
                before_sleep();
            }
            Poll::Pending
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn yields() -> u64 {
        YIELDS.with(std::cell::Cell::get)
    }

    /// Pending `n` times (waking itself each time), then ready with `n`.
    fn pending_times(n: u32) -> impl Future<Output = u32> {
        let mut left = n;
        std::future::poll_fn(move |cx| {
            if left == 0 {
                Poll::Ready(n)
            } else {
                left -= 1;
                cx.waker().wake_by_ref();
                Poll::Pending
            }
        })
    }

    #[test]
    fn the_wrapper_yields_once_per_pending_poll_and_passes_the_output_through() {
        let before = yields();
        let out = futures_executor::block_on(yield_when_idle(pending_times(3), true));
        assert_eq!(out, 3);
        assert_eq!(yields() - before, 3);
        let before = yields();
        let out = futures_executor::block_on(yield_when_idle(pending_times(3), false));
        assert_eq!(out, 3);
        assert_eq!(yields(), before, "idle_yield off never yields");
    }

    #[test]
    fn the_tokio_runtime_yields_before_it_parks_only_when_asked() {
        let rt = tokio_runtime(true).unwrap();
        let before = yields();
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        assert!(yields() > before, "the runtime parked without yielding");

        let rt = tokio_runtime(false).unwrap();
        let before = yields();
        rt.block_on(async { tokio::time::sleep(Duration::from_millis(20)).await });
        assert_eq!(yields(), before);
    }
}
