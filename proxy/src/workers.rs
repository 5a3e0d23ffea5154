//! The proxy's threads (agent -> Handle -> **workers** -> listeners): the runtime its listeners,
//! connections and upstream pools run on.
//!
//! One worker gets a single-threaded tokio runtime on a thread of its own: it skips the
//! work-stealing scheduler's bookkeeping, +7% req/s on one pinned core against a one-worker
//! multi-thread runtime (benches/README.md, profile section). Several workers share tokio's
//! work-stealing runtime: a task woken from a worker runs on that worker, so a request and the
//! pooled upstream connection it borrows meet on one thread whichever worker opened the
//! connection. Separate single-threaded runtimes would pay a cross-thread wake-up each way
//! for every request that borrows another worker's connection.

use std::io;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::runtime::{Handle, Runtime};
use tokio_util::sync::CancellationToken;

/// tokio's timer driver writes to its own wake-up eventfd whenever a timer is armed earlier
/// than the earliest one it last slept toward, even when the thread arming it is the one that
/// runs the driver and nothing sleeps. Every request arms a deadline (route, per-try) and every
/// connection an idle timer; with no request in flight the earliest timer is far off, so each
/// one paid a `write(2)` plus a spurious `epoll_wait` wake-up (0.6 writes per request at 5000
/// req/s, benches/README.md). A timer that always fires within this keeps the driver's next
/// wake-up that close, and deadlines further out no longer wake it; the cost is one wake-up
/// per period.
const TIMER_FLOOR: Duration = Duration::from_millis(500);

async fn keep_timer_floor() {
    let mut tick = tokio::time::interval(TIMER_FLOOR);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
    }
}

/// The runtime of a proxy that owns its threads (`Handle::start`).
pub(crate) enum ProxyRuntime {
    Single { stop: CancellationToken, thread: JoinHandle<()> },
    Shared(Runtime),
}

impl ProxyRuntime {
    /// Starts `workers` (at least 1) threads named `sluice-proxy`.
    pub fn start(workers: usize) -> io::Result<(Handle, ProxyRuntime)> {
        if workers > 1 {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("sluice-proxy")
                .enable_all()
                .build()?;
            runtime.spawn(keep_timer_floor());
            return Ok((runtime.handle().clone(), ProxyRuntime::Shared(runtime)));
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        handle.spawn(keep_timer_floor());
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let thread = std::thread::Builder::new().name("sluice-proxy".to_owned()).spawn(move || {
            runtime.block_on(stopped.cancelled_owned());
            // Drops the remaining tasks without waiting for any blocking ones.
            runtime.shutdown_background();
        })?;
        Ok((handle, ProxyRuntime::Single { stop, thread }))
    }

    /// Ends the runtime (its remaining tasks are dropped). Safe from any thread, including
    /// the proxy's own; waits for the single worker thread only when called from outside it.
    pub fn stop(self) {
        match self {
            ProxyRuntime::Shared(runtime) => runtime.shutdown_background(),
            ProxyRuntime::Single { stop, thread } => {
                stop.cancel();
                if thread.thread().id() != std::thread::current().id() {
                    let _ = thread.join();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::task::Poll;

    /// Write system calls made by the calling thread so far (eventfd wake-ups among them).
    fn thread_writes() -> u64 {
        let io = std::fs::read_to_string("/proc/thread-self/io").unwrap_or_default();
        io.lines().find_map(|line| line.strip_prefix("syscw:")).and_then(|n| n.trim().parse().ok()).unwrap_or(u64::MAX)
    }

    /// What a request does on an otherwise idle worker: the worker parks with no deadline
    /// armed, then the request arms one (its per-try timeout) and drops it when answered.
    async fn arm_deadlines_between_parks(rounds: u32) -> u64 {
        // Let the timer floor be armed and the driver turn once.
        tokio::task::yield_now().await;
        let before = thread_writes();
        for _ in 0..rounds {
            tokio::task::yield_now().await;
            let mut deadline = std::pin::pin!(tokio::time::sleep(Duration::from_secs(2)));
            std::future::poll_fn(|cx| {
                assert!(deadline.as_mut().poll(cx).is_pending());
                Poll::Ready(())
            })
            .await;
        }
        thread_writes() - before
    }

    #[test]
    fn arming_a_deadline_does_not_wake_the_workers_own_driver() -> anyhow::Result<()> {
        assert_ne!(thread_writes(), u64::MAX, "/proc/thread-self/io is unreadable");
        for workers in [1, 2] {
            let (handle, runtime) = ProxyRuntime::start(workers)?;
            let (tx, rx) = std::sync::mpsc::channel();
            // The fewest of three measurements: with the tests running in parallel, about one
            // measurement in fifteen saw 2 writes whose cause was not pinned down; they do not
            // recur in all three, while a write per deadline shows in every one.
            handle.spawn(async move {
                let mut fewest = u64::MAX;
                for _ in 0..3 {
                    fewest = fewest.min(arm_deadlines_between_parks(20).await);
                }
                tx.send(fewest)
            });
            let writes = rx.recv_timeout(Duration::from_secs(10))?;
            runtime.stop();
            // Several workers also wake each other (a task yielded on one may be stolen by
            // another); without the floor every deadline adds a write, 20 in all.
            let allowed = if workers == 1 { 0 } else { 5 };
            assert!(writes <= allowed, "{workers} worker(s): arming 20 deadlines made {writes} write(2) calls");
        }
        Ok(())
    }
}
