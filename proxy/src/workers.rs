//! The proxy's threads (agent -> Handle -> **workers** -> listeners): one single-threaded tokio
//! runtime per worker, as Envoy runs one event loop per worker thread.
//!
//! A connection lives on one worker from accept to close, with the upstream connections its
//! requests open, so its tasks wake each other without crossing threads. Single-threaded
//! runtimes skip the work-stealing scheduler's bookkeeping: +7% req/s on one pinned core
//! against a one-worker multi-thread runtime (benches/README.md, profile section).

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;

use tokio::net::TcpStream;
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

/// Where accepted connections are served.
pub(crate) struct Workers {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Workers {
    /// Everything on one given runtime (`Handle::start_on`).
    pub fn on(runtime: Handle) -> Self {
        Self { handles: vec![runtime], next: AtomicUsize::new(0) }
    }

    /// The runtime of worker 0: accept loops, table swaps and outlier sweeps run there.
    pub fn primary(&self) -> &Handle {
        &self.handles[0]
    }

    /// Serves `stream` with `serve` on the next worker, round robin. Called on worker 0 (the
    /// accept loops' runtime): a connection for another worker leaves this runtime's reactor
    /// and joins that worker's.
    pub fn spawn_connection<F, Fut>(&self, stream: TcpStream, serve: F)
    where
        F: FnOnce(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let index = match self.handles.len() {
            1 => 0,
            count => self.next.fetch_add(1, Ordering::Relaxed) % count,
        };
        if index == 0 {
            tokio::spawn(serve(stream));
            return;
        }
        let stream = match stream.into_std() {
            Ok(stream) => stream,
            Err(error) => {
                tracing::debug!(%error, "could not hand an accepted connection to a worker");
                return;
            }
        };
        self.handles[index].spawn(async move {
            match TcpStream::from_std(stream) {
                Ok(stream) => serve(stream).await,
                Err(error) => tracing::debug!(%error, "worker could not take an accepted connection"),
            }
        });
    }
}

/// The worker threads of a proxy that owns them (`Handle::start`).
pub(crate) struct WorkerThreads {
    stop: CancellationToken,
    threads: Vec<JoinHandle<()>>,
}

impl WorkerThreads {
    /// Starts `count` (at least 1) threads named `sluice-proxy`, each running its own runtime
    /// until `stop`.
    pub fn start(count: usize) -> io::Result<(Workers, WorkerThreads)> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            handles.push(runtime.handle().clone());
            let stopped = stop.clone();
            let spawned = std::thread::Builder::new()
                .name("sluice-proxy".to_owned())
                .spawn(move || {
                    runtime.block_on(stopped.cancelled_owned());
                    // Drops the remaining tasks without waiting for any blocking ones.
                    runtime.shutdown_background();
                });
            match spawned {
                Ok(thread) => threads.push(thread),
                Err(error) => {
                    stop.cancel();
                    return Err(error);
                }
            }
        }
        Ok((Workers { handles, next: AtomicUsize::new(0) }, WorkerThreads { stop, threads }))
    }

    /// Ends every worker's runtime (its remaining tasks are dropped). Safe from any thread,
    /// including a worker's own; waits for the threads only when called from outside them.
    pub fn stop(self) {
        self.stop.cancel();
        let current = std::thread::current().id();
        if self.threads.iter().any(|thread| thread.thread().id() == current) {
            return;
        }
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}
