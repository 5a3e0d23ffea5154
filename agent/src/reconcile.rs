//! Reconcile (compile -> datapath): file changes -> store -> model -> identities -> compile ->
//! `apply` to the kernel (eBPF mode), then to the proxy -> the snapshot the API serves.
//!
//! A failed apply leaves the proxy (or the kernel) on its previous state; the error is reported
//! in status and the next change tries again.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use sluice_envoy_config::{parse_file, Kind, Model, Object, ObjectKey};
use sluice_proxy::{Applied, ApplyError, Handle, ProxyTables};

use arc_swap::ArcSwap;

use crate::compile::bpf::{self as bpf_compile, BpfCompiled};
use crate::compile::{self, Compiled, DatapathMode};
use crate::flows::KernelFlowContext;
use crate::identity::Identities;
use crate::kernel::{self, Kernel, KernelReadback, PodInterface};
use crate::metrics::Metrics;
use crate::source::FileChange;
use crate::store::{Parsed, Store};
use crate::view::{FileStatusView, SharedSnapshot, Snapshot, StatusView};

pub struct Reconciler {
    pub node: String,
    pub config_dir: PathBuf,
    pub proxy_workers: usize,
    store: Store<ObjectKey, Object>,
    identities: Identities,
    proxy: Handle,
    snapshot: SharedSnapshot,
    metrics: Metrics,
    /// The generation the next compile gets; never reused, so flows name one table set.
    next_generation: u64,
    /// Why the config dir cannot be read right now (shown first among the errors).
    source_problem: Option<String>,
    /// `--datapath ebpf`: the loaded kernel half.
    kernel: Option<KernelPart>,
    /// Who is behind the addresses kernel flow events carry.
    flow_context: Arc<ArcSwap<KernelFlowContext>>,
}

/// The kernel datapath and what the last reconcile found on the node.
struct KernelPart {
    kernel: Kernel,
    /// Local pod addresses and the interfaces they had, to notice veths coming and going.
    local_pods: BTreeMap<Ipv4Addr, String>,
    interfaces: BTreeMap<Ipv4Addr, PodInterface>,
}

/// What applying to the kernel gave.
struct KernelOutcome {
    compiled: BpfCompiled,
    readback: KernelReadback,
    /// Problems to show as errors (the kernel keeps its previous state for them).
    errors: Vec<String>,
    last_apply: Vec<String>,
}

fn delta_lines(delta: &sluice_ebpf::BpfDelta) -> Vec<String> {
    [
        ("ipcache", delta.ipcache),
        ("endpoints", delta.endpoints),
        ("policy", delta.policy),
        ("services", delta.services),
        ("backends", delta.backends),
        ("maglev", delta.maglev),
    ]
    .into_iter()
    .filter(|(_, c)| *c != sluice_ebpf::MapChanges::default())
    .map(|(map, c)| format!("{map} +{} ~{} -{}", c.added, c.updated, c.removed))
    .collect()
}

fn to_parsed(result: Result<Object, sluice_envoy_config::ConfigError>) -> Parsed<ObjectKey, Object> {
    match result {
        Ok(object) => Parsed::Object { key: object.key(), object },
        Err(error) => Parsed::Error { key: error.object.clone(), message: error.to_string() },
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Reconciler {
    pub fn new(
        node: String,
        config_dir: PathBuf,
        proxy_workers: usize,
        identities: Identities,
        proxy: Handle,
        snapshot: SharedSnapshot,
        metrics: Metrics,
    ) -> Self {
        Self {
            node,
            config_dir,
            proxy_workers,
            store: Store::new(),
            identities,
            proxy,
            snapshot,
            metrics,
            next_generation: 1,
            source_problem: None,
            kernel: None,
            flow_context: Arc::new(ArcSwap::from_pointee(KernelFlowContext::default())),
        }
    }

    /// Enforces through `kernel` from the next reconcile on.
    pub fn with_kernel(mut self, kernel: Kernel) -> Self {
        self.kernel = Some(KernelPart { kernel, local_pods: BTreeMap::new(), interfaces: BTreeMap::new() });
        self
    }

    /// Names and generation for kernel flow events, kept current by every reconcile.
    pub fn flow_context(&self) -> Arc<ArcSwap<KernelFlowContext>> {
        self.flow_context.clone()
    }

    /// Gives up the kernel half (to clean it up when the agent stops).
    pub fn take_kernel(&mut self) -> Option<Kernel> {
        self.kernel.take().map(|part| part.kernel)
    }

    /// Whether a local pod's interface appeared, disappeared or changed since the last
    /// reconcile (then the kernel state must be compiled again).
    pub fn pod_interfaces_changed(&self) -> bool {
        self.kernel.as_ref().is_some_and(|part| kernel::find_pod_interfaces(&part.local_pods) != part.interfaces)
    }

    fn mode(&self) -> DatapathMode {
        match &self.kernel {
            Some(part) => DatapathMode::Kernel { proxy_port: part.kernel.config().proxy_port },
            None => DatapathMode::Gateway,
        }
    }

    /// Attaches to the local pods' interfaces, compiles the kernel state and applies it.
    fn apply_kernel(&mut self, model: &Model, compiled: &Compiled) -> Option<KernelOutcome> {
        let node = self.node.clone();
        let part = self.kernel.as_mut()?;
        let proxy_port = part.kernel.config().proxy_port;
        part.local_pods = bpf_compile::local_pods(model, &node);
        part.interfaces = kernel::find_pod_interfaces(&part.local_pods);
        let (ready, mut errors) = part.kernel.attach_pods(&part.interfaces);
        let bpf = bpf_compile::compile_bpf(model, &compiled.tables, &compiled.l7_service_ports, &node, &ready, proxy_port);
        let last_apply = match part.kernel.apply(&bpf.state) {
            Ok(delta) => delta_lines(&delta),
            Err(e) => {
                errors.push(format!("kernel datapath: {e}; the kernel keeps its previous state"));
                Vec::new()
            }
        };
        let readback = part.kernel.read_back().unwrap_or_else(|e| {
            errors.push(format!("kernel datapath: reading the maps back: {e}"));
            KernelReadback::default()
        });
        Some(KernelOutcome { compiled: bpf, readback, errors, last_apply })
    }

    /// Reports (or, with `None`, clears) a problem with the config dir as a whole. The applied
    /// state does not change: the objects keep the versions last read.
    pub fn set_source_problem(&mut self, problem: Option<String>) {
        let problem = problem.map(|problem| {
            format!("{problem}: keeping the last good state (generation {})", self.snapshot.load().status.generation)
        });
        if self.source_problem == problem {
            return;
        }
        match &problem {
            Some(message) => tracing::error!(error = %message, "config dir"),
            None => tracing::info!("config dir is readable again"),
        }
        let mut next = (**self.snapshot.load()).clone();
        if let Some(old) = &self.source_problem {
            next.status.errors.retain(|error| error != old);
        }
        if let Some(new) = &problem {
            next.status.errors.insert(0, new.clone());
        }
        self.metrics.set_config_state(next.status.errors.len(), next.status.generation);
        self.snapshot.store(Arc::new(next));
        self.source_problem = problem;
    }

    /// Feeds file changes into the store, logging every document error.
    pub fn take_changes(&mut self, changes: Vec<FileChange>) {
        for change in changes {
            match change {
                FileChange::Changed { file, text: Ok(text) } => {
                    let results: Vec<_> = parse_file(&file, &text).into_iter().map(to_parsed).collect();
                    for result in &results {
                        if let Parsed::Error { message, .. } = result {
                            tracing::warn!(error = %message, "configuration error");
                        }
                    }
                    let update = self.store.set_file(&file, results);
                    for kept in update.kept_last_good {
                        tracing::warn!(file = %file, object = %kept, "document is invalid; keeping the object's last good version");
                    }
                    tracing::info!(file = %file, errors = update.errors, "loaded");
                }
                FileChange::Changed { file, text: Err(reason) } => {
                    tracing::warn!(file = %file, error = %reason, "cannot read; keeping what it defined");
                    self.store.set_unreadable(&file, reason);
                }
                FileChange::Removed { file } => {
                    if self.store.remove_file(&file) {
                        tracing::info!(file = %file, "removed; its objects are gone");
                    }
                }
            }
        }
    }

    /// Compiles the current store and applies it. Returns the applied generation, or `None`
    /// when the proxy refused the tables (the previous ones stay in place).
    pub fn reconcile(&mut self) -> Option<u64> {
        let merged = self.store.merged();
        let files: BTreeMap<ObjectKey, String> =
            merged.objects.iter().map(|(key, (file, _))| (key.clone(), (*file).to_string())).collect();
        let model: Model = merged.objects.values().map(|(_, object)| (*object).clone()).collect();
        let config_errors: Vec<String> = self.source_problem.iter().cloned().chain(merged.errors).collect();
        let file_views: Vec<FileStatusView> = merged
            .files
            .into_iter()
            .map(|summary| FileStatusView {
                file: summary.file.to_string(),
                objects: summary.objects,
                kept_last_good: summary.kept_last_good,
                errors: summary.errors,
            })
            .collect();

        let mut allocated = false;
        for pod in model.pods().filter(|p| !p.pod_ips.is_empty()) {
            let (identity, new) = self.identities.allocate(&compile::pod_labels(&model, pod));
            if new {
                tracing::info!(pod = %format!("{}/{}", pod.namespace, pod.name), identity, "allocated identity");
                allocated = true;
            }
        }
        if allocated {
            if let Err(e) = self.identities.save() {
                tracing::error!(error = %e, "cannot persist identities; numbers may change after a restart");
            }
        }

        let generation = self.next_generation;
        self.next_generation += 1;
        let compiled = compile::compile_for(&model, &self.identities, &self.node, generation, self.mode());
        let kernel = self.apply_kernel(&model, &compiled);
        let (result, left_out) = apply_leaving_out_unbindable(&self.proxy, compiled.tables.clone());
        let mut config_errors = config_errors;
        config_errors.extend(left_out);
        match result {
            Ok(applied) => {
                self.flow_context.store(Arc::new(KernelFlowContext { peers: compiled.tables.peers.clone(), generation }));
                let mut snapshot = self.snapshot_of(&model, &files, file_views, config_errors, compiled, &applied);
                if let Some(outcome) = kernel {
                    self.add_kernel_state(&mut snapshot, outcome);
                }
                for error in &snapshot.status.errors {
                    tracing::warn!(%error, "configuration error");
                }
                tracing::info!(
                    generation,
                    listeners = applied.listeners.len(),
                    errors = snapshot.status.errors.len(),
                    warnings = snapshot.status.warnings.len(),
                    "applied"
                );
                self.metrics.set_config_state(snapshot.status.errors.len(), generation);
                self.snapshot.store(Arc::new(snapshot));
                Some(generation)
            }
            Err(e) => {
                let message = format!("proxy refused generation {generation}: {e}; generation {} stays in place", self.snapshot.load().status.generation);
                tracing::error!(error = %message, "apply failed");
                let mut previous = (**self.snapshot.load()).clone();
                previous.status.errors = config_errors;
                previous.status.files = file_views;
                previous.status.errors.extend(compiled.errors);
                if let Some(outcome) = kernel {
                    previous.status.errors.extend(outcome.errors);
                }
                previous.status.errors.push(message);
                self.metrics.set_config_state(previous.status.errors.len(), previous.status.generation);
                self.snapshot.store(Arc::new(previous));
                None
            }
        }
    }

    fn add_kernel_state(&self, snapshot: &mut Snapshot, outcome: KernelOutcome) {
        let Some(part) = &self.kernel else { return };
        let names: BTreeMap<u32, String> =
            part.interfaces.values().map(|interface| (interface.ifindex, interface.name.clone())).collect();
        crate::kernel_view::add_kernel_views(snapshot, &part.local_pods, &outcome.compiled, &outcome.readback, &names);
        for error in &outcome.errors {
            tracing::error!(%error, "kernel datapath");
        }
        snapshot.status.errors.extend(outcome.errors);
        snapshot.status.warnings.extend(outcome.compiled.warnings.iter().cloned());
        snapshot.status.warnings.sort();
        let config = part.kernel.config();
        snapshot.status.datapath = "ebpf".to_string();
        snapshot.status.kernel = Some(crate::view::KernelStatusView {
            pin_dir: config.pin_dir.display().to_string(),
            cgroup: config.cgroup.display().to_string(),
            proxy_port: config.proxy_port,
            interfaces: outcome
                .readback
                .endpoints
                .iter()
                .filter_map(|e| names.get(&e.ifindex).cloned())
                .collect(),
            endpoints: outcome.readback.endpoints.len(),
            services: outcome.readback.services.len(),
            policy_entries: outcome.readback.policy.len(),
            last_apply: outcome.last_apply,
        });
    }

    fn snapshot_of(
        &self,
        model: &Model,
        files: &BTreeMap<ObjectKey, String>,
        file_views: Vec<FileStatusView>,
        mut errors: Vec<String>,
        compiled: Compiled,
        applied: &Applied,
    ) -> Snapshot {
        let mut objects: BTreeMap<String, usize> = BTreeMap::new();
        for (key, _) in model.iter() {
            *objects.entry(key.kind.to_string()).or_default() += 1;
        }
        errors.extend(compiled.errors);
        let bound: BTreeMap<&str, std::net::SocketAddr> =
            applied.listeners.iter().map(|l| (l.name.as_str(), l.addr)).collect();
        let services = compiled
            .services
            .into_iter()
            .map(|mut service| {
                service.frontend = bound.get(service.listener.as_str()).copied().or(service.frontend);
                service
            })
            .collect();
        let policies = compiled
            .policies
            .into_iter()
            .map(|mut policy| {
                let kind = Kind::from_kind_name(&policy.kind);
                let key = ObjectKey::new(kind, policy.namespace.as_deref(), &policy.name);
                policy.file = files.get(&key).cloned().unwrap_or_default();
                policy
            })
            .collect();
        let previous = self.snapshot.load();
        Snapshot {
            status: StatusView {
                node: self.node.clone(),
                datapath: "none".to_string(),
                config_dir: self.config_dir.display().to_string(),
                generation: applied.generation,
                last_applied_unix: unix_now(),
                objects: objects.into_iter().collect(),
                errors,
                warnings: compiled.warnings,
                proxy_workers: self.proxy_workers,
                listeners: applied.listeners.len(),
                flows_seen: previous.status.flows_seen,
                flows_lost: previous.status.flows_lost,
                files: file_views,
                kernel: None,
            },
            endpoints: compiled.endpoints,
            identities: compiled.identities,
            policies,
            services,
        }
    }
}

/// Applies `tables`, leaving out any listener whose address cannot be bound (and the frontends
/// it serves), each reported as an error: one busy port must never hold back a policy or route
/// change for everything else. Any other refusal refuses the whole generation.
fn apply_leaving_out_unbindable(proxy: &Handle, mut tables: ProxyTables) -> (Result<Applied, ApplyError>, Vec<String>) {
    let mut left_out = Vec::new();
    loop {
        match proxy.apply(tables.clone()) {
            Err(ApplyError::Bind { listener, addr, source }) if tables.listeners.iter().any(|l| l.name == listener) => {
                left_out.push(format!("listener {listener} is left out: cannot bind {addr}: {source}"));
                tables.listeners.retain(|l| l.name != listener);
                tables.frontends.retain(|_, name| *name != listener);
            }
            result => return (result, left_out),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_proxy::tables::{Bind, Listener};
    use sluice_proxy::{FlowSink, Handle, ProxyConfig, ProxyTables};

    use super::apply_leaving_out_unbindable;
    use crate::compile::envoy::{default_http_connection_manager, forward_all};

    fn listener(name: &str, bind: Bind) -> Listener {
        let routes = Arc::new(forward_all(name, "default/nowhere"));
        Listener { name: name.to_string(), bind, http: Arc::new(default_http_connection_manager(name, routes)) }
    }

    #[test]
    fn a_listener_on_a_busy_address_is_left_out_and_the_rest_applies() -> anyhow::Result<()> {
        let busy = std::net::TcpListener::bind("127.0.0.1:0")?;
        let busy_addr = busy.local_addr()?;
        let (flows, _events) = FlowSink::new(8);
        let proxy = Handle::start(ProxyConfig { workers: 1, flows })?;
        let tables = ProxyTables {
            generation: 1,
            listeners: vec![listener("busy", Bind::Addr(busy_addr)), listener("free", Bind::LoopbackAuto)],
            ..ProxyTables::default()
        };

        let (result, left_out) = apply_leaving_out_unbindable(&proxy, tables);

        let applied = result?;
        let names: Vec<&str> = applied.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["free"]);
        assert_eq!(left_out.len(), 1, "{left_out:?}");
        assert!(left_out[0].starts_with(&format!("listener busy is left out: cannot bind {busy_addr}")), "{left_out:?}");
        proxy.shutdown();
        Ok(())
    }
}
