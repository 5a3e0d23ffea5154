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

use tokio::runtime::{Handle, Runtime};
use tokio_util::sync::CancellationToken;

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
            return Ok((runtime.handle().clone(), ProxyRuntime::Shared(runtime)));
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
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
