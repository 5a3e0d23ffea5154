//! The agent runtime: wires source -> reconcile -> proxy, and the flows, API and metrics around it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use sluice_proxy::{FlowSink, Handle, ProxyConfig};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::flows::{self, FlowLog};
use crate::identity::Identities;
use crate::metrics::{self, Metrics};
use crate::reconcile::Reconciler;
use crate::source::{self, ConfigDir};
use crate::view::{SharedSnapshot, Snapshot};

/// Quiet period after a burst of file changes before the directory is read again.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often proxy counters are copied into metrics and status.
const STATS_INTERVAL: Duration = Duration::from_secs(1);
/// Capacity of the proxy's flow-event queue.
const FLOW_QUEUE: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub config_dir: PathBuf,
    pub node: String,
    pub state_dir: PathBuf,
    pub proxy_workers: usize,
    /// `None`: no metrics endpoint (the in-process demo).
    pub metrics_address: Option<SocketAddr>,
    /// Serve the local API on `<state-dir>/api.sock`.
    pub serve_api: bool,
}

/// A started agent. Stop it with `stop`; dropping it also stops the proxy.
pub struct RunningAgent {
    snapshot: SharedSnapshot,
    applied: watch::Receiver<u64>,
    flows: FlowLog,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    side_tasks: Vec<JoinHandle<()>>,
    proxy: Handle,
}

fn load_identities(config: &AgentConfig) -> Identities {
    match Identities::load(&config.state_dir.join("identities.json")) {
        Ok(identities) => identities,
        Err(e) => {
            // The broken file is left alone for inspection; numbers are not persisted this run.
            tracing::error!(error = %e, "using an in-memory identity table; numbers may differ from before and are not persisted");
            Identities::in_memory()
        }
    }
}

/// Starts an agent. Everything that can fail for a reason the operator must fix (the config
/// dir, the API socket, the metrics address) fails here, before anything runs.
pub async fn start(config: AgentConfig) -> anyhow::Result<RunningAgent> {
    if !config.config_dir.is_dir() {
        anyhow::bail!("--config-dir {}: not a directory", config.config_dir.display());
    }
    let api_listener = if config.serve_api {
        Some(crate::api::bind_api(&crate::api::socket_path(&config.state_dir)).await?)
    } else {
        None
    };
    let metrics_listener = match config.metrics_address {
        Some(addr) => Some(metrics::bind_metrics(addr).await?),
        None => None,
    };
    let mut dir = ConfigDir::new(&config.config_dir);
    // Watch before the first scan, so a change during startup is not missed.
    let (debouncer, mut changed) = source::watch(dir.root(), DEBOUNCE)?;
    let first = dir.rescan()?;

    let metrics = Metrics::new();
    let flow_log = FlowLog::new(flows::DEFAULT_FLOW_CAPACITY, metrics.clone());
    let (sink, events) = FlowSink::new(FLOW_QUEUE);
    let proxy = Handle::start(ProxyConfig { workers: config.proxy_workers, flows: sink })?;
    let snapshot: SharedSnapshot = Arc::new(ArcSwap::from_pointee(Snapshot::default()));
    let mut side_tasks = vec![tokio::spawn(flows::record_from(events, flow_log.clone()))];

    let mut reconciler = Reconciler::new(
        config.node.clone(),
        config.config_dir.clone(),
        config.proxy_workers,
        load_identities(&config),
        proxy.clone(),
        snapshot.clone(),
        metrics.clone(),
    );
    reconciler.take_changes(first);
    let (applied_tx, applied) = watch::channel(reconciler.reconcile().unwrap_or(0));

    if let Some(api) = api_listener {
        side_tasks.push(tokio::spawn(crate::api::serve_api(api, snapshot.clone(), flow_log.clone())));
    }
    if let Some(listener) = metrics_listener {
        side_tasks.push(tokio::spawn(metrics::serve_metrics(listener, metrics.clone())));
    }

    let (stop_tx, mut stop_rx) = oneshot::channel();
    let task = {
        let proxy = proxy.clone();
        let snapshot = snapshot.clone();
        let flow_log = flow_log.clone();
        let workers = config.proxy_workers;
        tokio::spawn(async move {
            let _watching = debouncer;
            let mut ticker = tokio::time::interval(STATS_INTERVAL);
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    signal = changed.recv() => {
                        if signal.is_none() {
                            tracing::error!("config dir watcher stopped; no further changes are applied");
                            break;
                        }
                        while changed.try_recv().is_ok() {}
                        match dir.rescan() {
                            Ok(changes) if changes.is_empty() => {}
                            Ok(changes) => {
                                reconciler.take_changes(changes);
                                if let Some(generation) = reconciler.reconcile() {
                                    let _ = applied_tx.send(generation);
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "cannot read the config dir; keeping the current state"),
                        }
                    }
                    _ = ticker.tick() => {
                        let current = snapshot.load();
                        metrics.set_proxy_stats(&proxy.stats(), workers, current.status.listeners);
                        let mut next = (**current).clone();
                        next.status.flows_seen = flow_log.seen();
                        next.status.flows_lost = flow_log.lost();
                        snapshot.store(Arc::new(next));
                    }
                }
            }
        })
    };

    Ok(RunningAgent { snapshot, applied, flows: flow_log, stop: Some(stop_tx), task, side_tasks, proxy })
}

impl RunningAgent {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    pub fn flows(&self) -> &FlowLog {
        &self.flows
    }

    /// Waits until a generation newer than `after` is applied, and returns the snapshot.
    pub async fn wait_for_generation_after(&mut self, after: u64, timeout: Duration) -> anyhow::Result<Arc<Snapshot>> {
        tokio::time::timeout(timeout, self.applied.wait_for(|g| *g > after))
            .await
            .context("timed out waiting for the agent to apply the change")?
            .context("the agent stopped")?;
        Ok(self.snapshot())
    }

    /// Stops watching, stops the proxy (open connections get a moment to finish), stops the
    /// API and removes its socket.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.context("agent loop panicked")?;
        let proxy = self.proxy.clone();
        tokio::task::spawn_blocking(move || proxy.shutdown()).await.context("proxy shutdown panicked")?;
        for task in &self.side_tasks {
            task.abort();
        }
        // An aborted task has dropped its future (and so closed the API socket and removed its
        // file) once awaiting it returns.
        for task in &mut self.side_tasks {
            let _ = task.await;
        }
        Ok(())
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.task.abort();
        for task in &self.side_tasks {
            task.abort();
        }
    }
}

/// `sluice agent`: runs until SIGINT or SIGTERM, then shuts down cleanly.
pub async fn run(config: AgentConfig) -> anyhow::Result<()> {
    let agent = start(config).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    agent.stop().await
}
