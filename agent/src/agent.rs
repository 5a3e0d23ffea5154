//! The agent runtime: wires source -> reconcile -> kernel and proxy, and the flows, API and metrics around it.

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
use crate::kernel::{Kernel, KernelConfig};
use crate::metrics::{self, Metrics};
use crate::reconcile::Reconciler;
use crate::source::{Synced, WatchedDir};
use crate::view::{SharedSnapshot, Snapshot};

/// Quiet period after a burst of file changes before the directory is read again.
const DEBOUNCE: Duration = Duration::from_millis(100);
/// How often the agent checks whether the config dir went away, came back or was replaced
/// (a watch cannot see its own directory being created again).
const RECHECK_INTERVAL: Duration = Duration::from_millis(500);
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

/// Which datapath the agent drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentDatapath {
    /// `--datapath none`: the proxy's listeners are the only enforcement point.
    Gateway,
    /// `--datapath ebpf`: kernel programs enforce L3/L4 and balance sockets; L7 flows are
    /// redirected to the proxy's transparent listener.
    Kernel(KernelConfig),
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

/// Reads the config dir after a change and applies what changed. While the directory is
/// missing or unreadable the last good state stays in force and status says why.
fn follow(dir: &mut WatchedDir, reconciler: &mut Reconciler, applied: &watch::Sender<u64>) {
    match dir.sync() {
        Ok(Synced::Changes(changes)) => {
            reconciler.set_source_problem(None);
            if !changes.is_empty() {
                reconciler.take_changes(changes);
                if let Some(generation) = reconciler.reconcile() {
                    let _ = applied.send(generation);
                }
            }
        }
        Ok(Synced::Settling) => tracing::info!(dir = %dir.root().display(), "config dir is back; reading it in a moment"),
        Ok(Synced::Missing) => reconciler.set_source_problem(Some(format!(
            "config dir {} is missing (or not a directory)",
            dir.root().display()
        ))),
        Err(e) => reconciler.set_source_problem(Some(e.to_string())),
    }
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

/// Starts an agent in gateway mode (`--datapath none`).
pub async fn start(config: AgentConfig) -> anyhow::Result<RunningAgent> {
    start_with(config, AgentDatapath::Gateway).await
}

/// Moves kernel flow events into the flow log (and the metrics) as the ring buffer fills.
async fn record_kernel_flows(
    events: sluice_ebpf::FlowEvents,
    log: FlowLog,
    context: Arc<ArcSwap<flows::KernelFlowContext>>,
) {
    // SAFETY: `FlowEvents` owns the ring buffer's map fd and returns that same fd for as long
    // as it lives, which is as long as the `AsyncFd` that takes ownership of it.
    let registered = unsafe { tokio::io::unix::AsyncFd::register_with_interest(events, tokio::io::Interest::READABLE) };
    let mut ring = match registered {
        Ok(ring) => ring,
        Err(error) => {
            tracing::error!(%error, "cannot poll the flow-event ring buffer; kernel flows are not observed");
            return;
        }
    };
    loop {
        let mut ready = match ring.readable_mut().await {
            Ok(ready) => ready,
            Err(error) => {
                tracing::error!(%error, "polling the flow-event ring buffer failed; kernel flows are not observed");
                return;
            }
        };
        // Cleared before draining: a record submitted after the drain wakes us again.
        ready.clear_ready();
        let events = ready.get_inner_mut().drain();
        if events.is_empty() {
            continue;
        }
        let context = context.load();
        let (now, now_ns) = (chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now()), monotonic_ns());
        for event in &events {
            let age = chrono::Duration::nanoseconds(i64::try_from(now_ns.saturating_sub(event.monotonic_ns)).unwrap_or(0));
            log.record_kernel(event, now - age, &context);
        }
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes into the timespec we own.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// Starts an agent. Everything that can fail for a reason the operator must fix (the config
/// dir, the API socket, the metrics address, the kernel datapath) fails here, before anything
/// runs.
pub async fn start_with(config: AgentConfig, datapath: AgentDatapath) -> anyhow::Result<RunningAgent> {
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
    let kernel = match datapath {
        AgentDatapath::Gateway => None,
        AgentDatapath::Kernel(kernel_config) => Some(Kernel::start(kernel_config)?),
    };
    let (mut dir, first, mut changed) = WatchedDir::start(&config.config_dir, DEBOUNCE)?;

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
    let mut cleanup_on_exit = false;
    if let Some((kernel, events)) = kernel {
        cleanup_on_exit = kernel.config().cleanup_on_exit;
        reconciler = reconciler.with_kernel(kernel);
        side_tasks.push(tokio::spawn(record_kernel_flows(events, flow_log.clone(), reconciler.flow_context())));
    }
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
            let mut ticker = tokio::time::interval(STATS_INTERVAL);
            let mut recheck = tokio::time::interval(RECHECK_INTERVAL);
            recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = &mut stop_rx => break,
                    signal = changed.recv() => {
                        // `dir` holds a sender, so the channel never closes while it runs.
                        if signal.is_some() {
                            while changed.try_recv().is_ok() {}
                            follow(&mut dir, &mut reconciler, &applied_tx);
                        }
                    }
                    _ = recheck.tick() => {
                        if dir.needs_sync() {
                            follow(&mut dir, &mut reconciler, &applied_tx);
                        } else if reconciler.pod_interfaces_changed() {
                            tracing::info!("a local pod's interface came, went or changed; reconciling");
                            if let Some(generation) = reconciler.reconcile() {
                                let _ = applied_tx.send(generation);
                            }
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
            // Without cleanup the programs stay attached and the maps pinned: the node keeps
            // enforcing the last state until the next agent takes over.
            if let Some(kernel) = reconciler.take_kernel() {
                if cleanup_on_exit {
                    match kernel.cleanup() {
                        Ok(()) => tracing::info!("kernel datapath detached and its pins removed"),
                        Err(error) => tracing::error!(error = format!("{error:#}"), "kernel datapath cleanup failed"),
                    }
                } else {
                    tracing::info!("kernel datapath stays attached and pinned");
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
pub async fn run(config: AgentConfig, datapath: AgentDatapath) -> anyhow::Result<()> {
    let agent = start_with(config, datapath).await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        _ = terminate.recv() => tracing::info!("SIGTERM: shutting down"),
    }
    agent.stop().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::tests::configmap_generation;
    use crate::view::FileStatusView;
    use std::path::Path;

    const APPLY: Duration = Duration::from_secs(10);

    fn pods(names: &[&str]) -> String {
        names
            .iter()
            .map(|name| format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {name}}}\n"))
            .collect::<Vec<_>>()
            .join("---\n")
    }

    async fn agent_on(config_dir: &Path, state_dir: &Path) -> anyhow::Result<RunningAgent> {
        start(AgentConfig {
            config_dir: config_dir.to_path_buf(),
            node: "node-a".to_owned(),
            state_dir: state_dir.to_path_buf(),
            proxy_workers: 1,
            metrics_address: None,
            serve_api: false,
        })
        .await
    }

    /// Polls the snapshot until `done` holds (bounded; a change without a new generation, such
    /// as an error report, has nothing else to wait on).
    async fn wait_until(agent: &RunningAgent, done: impl Fn(&Snapshot) -> bool) -> anyhow::Result<Arc<Snapshot>> {
        for _ in 0..500 {
            let snapshot = agent.snapshot();
            if done(&snapshot) {
                return Ok(snapshot);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        anyhow::bail!("the agent never reached the expected state: {:?}", agent.snapshot().status)
    }

    fn files(snapshot: &Snapshot) -> Vec<(String, usize)> {
        snapshot.status.files.iter().map(|f| (f.file.clone(), f.objects)).collect()
    }

    /// A config dir and a state dir beside it.
    fn dirs() -> anyhow::Result<(tempfile::TempDir, std::path::PathBuf, std::path::PathBuf)> {
        let work = tempfile::tempdir()?;
        let config = work.path().join("config");
        std::fs::create_dir(&config)?;
        let state = work.path().join("state");
        Ok((work, config, state))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_deleted_config_dir_keeps_the_last_good_state_until_it_is_back() -> anyhow::Result<()> {
        let (_work, config, state) = dirs()?;
        std::fs::write(config.join("app.yaml"), pods(&["a"]))?;
        let mut agent = agent_on(&config, &state).await?;
        let applied = agent.snapshot().status.generation;

        std::fs::remove_dir_all(&config)?;
        let missing = wait_until(&agent, |s| !s.status.errors.is_empty()).await?;
        assert_eq!(
            missing.status.errors,
            vec![format!(
                "config dir {} is missing (or not a directory): keeping the last good state (generation {applied})",
                config.display()
            )]
        );
        assert_eq!(missing.status.generation, applied);
        assert_eq!(missing.status.objects, vec![("Pod".to_owned(), 1)]);
        assert_eq!(files(&missing), vec![("app.yaml".to_owned(), 1)]);

        std::fs::create_dir(&config)?;
        std::fs::write(config.join("app.yaml"), pods(&["a", "b"]))?;
        let back = agent.wait_for_generation_after(applied, APPLY).await?;
        assert_eq!(back.status.errors, Vec::<String>::new());
        assert_eq!(back.status.objects, vec![("Pod".to_owned(), 2)]);

        // Deleted and recreated with the same content: nothing to apply, the report clears.
        std::fs::remove_dir_all(&config)?;
        wait_until(&agent, |s| !s.status.errors.is_empty()).await?;
        std::fs::create_dir(&config)?;
        std::fs::write(config.join("app.yaml"), pods(&["a", "b"]))?;
        let same = wait_until(&agent, |s| s.status.errors.is_empty()).await?;
        assert_eq!(same.status.generation, back.status.generation);
        agent.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_renamed_file_keeps_its_objects_under_the_new_name() -> anyhow::Result<()> {
        let (_work, config, state) = dirs()?;
        std::fs::write(config.join("app.yaml"), pods(&["a", "b"]))?;
        let mut agent = agent_on(&config, &state).await?;
        let before = agent.snapshot().status.generation;
        std::fs::rename(config.join("app.yaml"), config.join("renamed.yaml"))?;
        let after = agent.wait_for_generation_after(before, APPLY).await?;
        assert_eq!(
            after.status.files,
            vec![FileStatusView { file: "renamed.yaml".to_owned(), objects: 2, kept_last_good: 0, errors: vec![] }]
        );
        assert_eq!(after.status.errors, Vec::<String>::new());
        agent.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_editors_atomic_save_is_applied_exactly_once() -> anyhow::Result<()> {
        let (_work, config, state) = dirs()?;
        std::fs::write(config.join("app.yaml"), pods(&["a"]))?;
        let mut agent = agent_on(&config, &state).await?;
        let before = agent.snapshot().status.generation;

        let temp = config.join(".app.yaml.tmp");
        std::fs::write(&temp, pods(&["a", "b"]))?;
        std::fs::rename(&temp, config.join("app.yaml"))?;
        let saved = agent.wait_for_generation_after(before, APPLY).await?;
        assert_eq!(saved.status.generation, before + 1);
        assert_eq!(files(&saved), vec![("app.yaml".to_owned(), 2)]);

        // The next change gets the very next generation: the save was not applied twice.
        std::fs::write(config.join("marker.yaml"), pods(&["m"]))?;
        let next = agent.wait_for_generation_after(saved.status.generation, APPLY).await?;
        assert_eq!(next.status.generation, before + 2);
        agent.stop().await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_configmap_update_is_applied() -> anyhow::Result<()> {
        let (_work, config, state) = dirs()?;
        configmap_generation(&config, "..2024_01_01_00_00_00.1", &[("app.yaml", &pods(&["a"]))])?;
        let agent = agent_on(&config, &state).await?;
        assert_eq!(files(&agent.snapshot()), vec![("app.yaml".to_owned(), 1)]);
        let before = agent.snapshot().status.generation;

        configmap_generation(
            &config,
            "..2024_01_01_00_05_00.2",
            &[("app.yaml", &pods(&["a", "b"])), ("more.yaml", &pods(&["c"]))],
        )?;
        std::fs::remove_dir_all(config.join("..2024_01_01_00_00_00.1"))?;
        let updated = wait_until(&agent, |s| files(s) == [("app.yaml".to_owned(), 2), ("more.yaml".to_owned(), 1)]).await?;
        assert!(updated.status.generation > before);
        assert_eq!(updated.status.errors, Vec::<String>::new());
        agent.stop().await
    }
}
