//! The proxy's control surface (agent -> **Handle** -> datapath): start, apply tables, stats, shutdown.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::error::{ApplyError, ProxyError};
use crate::flow::FlowSink;
use crate::listener::{self, SocketEntry};
use crate::server::Shared;
use crate::snapshot::{http1_settings, CompiledEndpoint, Http2Server, KnownPeer, ListenerEntry, PrefixTable, Snapshot};
use crate::stats::{ClusterCounters, ProxyCounters, ProxyStats};
use crate::tables::{Bind, ProxyTables};
use crate::upstream::{ClusterState, SocketPlan};
use crate::workers::ProxyRuntime;

/// How long `shutdown` waits for downstream connections to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
const DRAIN_POLL: Duration = Duration::from_millis(10);

#[derive(Debug)]
pub struct ProxyConfig {
    /// Worker threads of the proxy's runtime (at least 1).
    pub workers: usize,
    pub flows: FlowSink,
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    pub generation: u64,
    /// Every listener of the applied tables, in their order, with the address it listens on.
    pub listeners: Vec<BoundListener>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BoundListener {
    pub name: String,
    pub addr: SocketAddr,
}

/// The running proxy. Cheap to clone; every clone controls the same proxy.
#[derive(Clone)]
pub struct Handle {
    inner: Arc<Inner>,
}

// The agent moves handles across threads and runtimes.
const _: () = {
    fn shareable<T: Send + Sync + Clone + 'static>() {}
    let _ = shareable::<Handle>;
};

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handle").field("generation", &self.inner.shared.snapshot.load().generation).finish_non_exhaustive()
    }
}

struct Inner {
    shared: Arc<Shared>,
    runtime: tokio::runtime::Handle,
    /// `Some` when the proxy owns its runtime (`start`), taken by `shutdown`.
    owned_runtime: Mutex<Option<ProxyRuntime>>,
    /// Serializes `apply` and holds what it carries from one generation to the next.
    registry: Mutex<Registry>,
    /// Parent of every listener's stop token.
    root: CancellationToken,
    /// The accept loops, so `shutdown` knows when every listening socket is closed.
    accepting: TaskTracker,
}

#[derive(Default)]
struct Registry {
    /// Bound sockets by slot; a slot index is what `Snapshot::listeners` is keyed by.
    sockets: Vec<Option<SocketEntry>>,
    /// Per-cluster counters by name, kept while the name exists.
    cluster_counters: HashMap<String, Arc<ClusterCounters>>,
}

impl Handle {
    /// Starts the proxy on `workers` threads of its own (named `sluice-proxy`; see `workers`
    /// for the runtime they run), with no listeners.
    pub fn start(config: ProxyConfig) -> Result<Handle, ProxyError> {
        let (runtime, owned) = ProxyRuntime::start(config.workers).map_err(ProxyError::Runtime)?;
        Ok(Self::new(runtime, config.flows, Some(owned)))
    }

    /// Runs the proxy's tasks on an existing runtime (embedding it in another program, or
    /// tests under paused time). `shutdown` then stops the proxy but leaves the runtime alone.
    pub fn start_on(runtime: tokio::runtime::Handle, flows: FlowSink) -> Handle {
        Self::new(runtime, flows, None)
    }

    fn new(runtime: tokio::runtime::Handle, flows: FlowSink, owned: Option<ProxyRuntime>) -> Handle {
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(Snapshot::empty()),
            flows,
            counters: Arc::new(ProxyCounters::default()),
        });
        Handle {
            inner: Arc::new(Inner {
                shared,
                runtime,
                owned_runtime: Mutex::new(owned),
                registry: Mutex::new(Registry::default()),
                root: CancellationToken::new(),
                accepting: TaskTracker::new(),
            }),
        }
    }

    /// Binds listeners that are new, keeps the sockets of listeners whose `(name, bind)` did
    /// not change (automatic ports stay stable; an explicit address also survives a rename),
    /// closes removed ones (their in-flight requests finish), then swaps the tables atomically
    /// so new requests see them. On any error nothing changes. Synchronous; callable from any
    /// thread or runtime.
    pub fn apply(&self, tables: ProxyTables) -> Result<Applied, ApplyError> {
        let inner = &*self.inner;
        let mut registry = inner.registry.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.root.is_cancelled() {
            return Err(ApplyError::Stopped);
        }
        let _entered = inner.runtime.enter();

        // 1. Sockets: reuse what matches, bind the rest. Nothing is started yet, so an error
        //    just drops the new sockets.
        if let Some((destination, listener)) =
            tables.frontends.iter().find(|(_, name)| !tables.listeners.iter().any(|l| &l.name == *name))
        {
            return Err(ApplyError::UnknownFrontendListener { destination: *destination, listener: listener.clone() });
        }
        let slots = plan_slots(&registry.sockets, &tables);
        let mut fresh: Vec<(usize, listener::Listening, SocketAddr)> = Vec::new();
        for (index, listener) in tables.listeners.iter().enumerate() {
            if slots[index].is_some() {
                continue;
            }
            let bind_error = |source| ApplyError::Bind {
                listener: listener.name.clone(),
                addr: listener.bind.socket_addr(),
                source,
            };
            let bound = listener::bind(&listener.bind).map_err(bind_error)?;
            let addr = bound.local_addr().map_err(bind_error)?;
            fresh.push((index, bound, addr));
        }

        // 2. Compile the serving snapshot.
        let previous = inner.shared.snapshot.load_full();
        registry.cluster_counters.retain(|name, _| tables.clusters.contains_key(name));
        let sockets = Arc::new(SocketPlan::new(&tables));
        let clusters: foldhash::HashMap<String, Arc<ClusterState>> = tables
            .clusters
            .iter()
            .map(|(name, config)| {
                let prior = previous.clusters.get(name);
                let state = match prior {
                    Some(state) if state.serves(config, &sockets) => Arc::clone(state),
                    _ => {
                        let counters = Arc::clone(registry.cluster_counters.entry(name.clone()).or_default());
                        let state = Arc::new(ClusterState::new(
                            Arc::clone(config),
                            prior.map(|p| &**p),
                            counters,
                            &inner.shared.counters,
                            Arc::clone(&sockets),
                        ));
                        state.start_outlier_sweeps();
                        state
                    }
                };
                (name.clone(), state)
            })
            .collect();
        let policies = tables.policies.iter().map(|(ip, policy)| (*ip, Arc::new(CompiledEndpoint::new(policy)))).collect();

        // 3. Give new sockets free slots and lay out the listener table by slot.
        let mut sockets = std::mem::take(&mut registry.sockets);
        let mut slot_of: Vec<usize> = slots.iter().map(|slot| slot.unwrap_or(usize::MAX)).collect();
        let kept: Vec<bool> = (0..sockets.len()).map(|s| slots.contains(&Some(s))).collect();
        let mut removed: Vec<SocketEntry> = Vec::new();
        for (slot, entry) in sockets.iter_mut().enumerate() {
            if !kept[slot] {
                removed.extend(entry.take());
            }
        }
        let mut started: Vec<(usize, listener::Listening, CancellationToken)> = Vec::new();
        for (index, bound, addr) in fresh {
            let listener = &tables.listeners[index];
            let slot = match sockets.iter().position(Option::is_none) {
                Some(slot) => slot,
                None => {
                    sockets.push(None);
                    sockets.len() - 1
                }
            };
            let stop = inner.root.child_token();
            sockets[slot] = Some(SocketEntry { name: listener.name.clone(), bind: listener.bind.clone(), addr, stop: stop.clone() });
            slot_of[index] = slot;
            started.push((slot, bound, stop));
        }
        for (index, listener) in tables.listeners.iter().enumerate() {
            if let Some(entry) = sockets[slot_of[index]].as_mut() {
                // A kept explicit address may have been renamed.
                entry.name.clone_from(&listener.name);
            }
        }
        let mut listeners: Vec<Option<ListenerEntry>> = (0..sockets.len()).map(|_| None).collect();
        for (index, listener) in tables.listeners.iter().enumerate() {
            listeners[slot_of[index]] = Some(ListenerEntry {
                name: Arc::from(listener.name.as_str()),
                transparent: matches!(listener.bind, Bind::Transparent { .. }).then(|| listener.bind.socket_addr()),
                http: Arc::clone(&listener.http),
                http1: http1_settings(&listener.http),
                http2: Arc::new(Http2Server::new(&listener.http)),
            });
        }
        let applied = Applied {
            generation: tables.generation,
            listeners: tables
                .listeners
                .iter()
                .enumerate()
                .filter_map(|(index, l)| sockets[slot_of[index]].as_ref().map(|e| BoundListener { name: l.name.clone(), addr: e.addr }))
                .collect(),
        };
        let frontends = tables
            .frontends
            .iter()
            .filter_map(|(destination, name)| {
                let index = tables.listeners.iter().position(|l| &l.name == name)?;
                Some((*destination, slot_of[index]))
            })
            .collect();
        let prefixes = PrefixTable::new(&tables.cidr_identities);
        let peers = KnownPeer::index(&tables.peers);
        let snapshot =
            Snapshot { generation: tables.generation, listeners, clusters, policies, frontends, prefixes, peers };

        // 4. Swap, then serve the new sockets and drain the removed ones; replaced cluster
        //    states stop sweeping (their hosts, if kept, are swept by the new state).
        let snapshot = Arc::new(snapshot);
        inner.shared.snapshot.store(Arc::clone(&snapshot));
        for (name, state) in &previous.clusters {
            let kept = snapshot.clusters.get(name).is_some_and(|now| Arc::ptr_eq(now, state));
            if !kept {
                state.retire();
            }
        }
        for (slot, bound, stop) in started {
            inner.accepting.spawn_on(listener::accept_loop(bound, slot, Arc::clone(&inner.shared), stop), &inner.runtime);
        }
        for entry in removed {
            tracing::info!(listener = %entry.name, addr = %entry.addr, "closing listener");
            entry.stop.cancel();
        }
        registry.sockets = sockets;
        Ok(applied)
    }

    /// Counters of the running proxy; see [`ProxyStats`] for the names.
    pub fn stats(&self) -> ProxyStats {
        let shared = &self.inner.shared;
        let snapshot = shared.snapshot.load();
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        ProxyStats {
            generation: snapshot.generation,
            downstream_cx_active: get(&shared.counters.downstream_cx_active),
            downstream_cx_total: get(&shared.counters.downstream_cx_total),
            downstream_rq_total: get(&shared.counters.downstream_rq_total),
            upstream_cx_active: get(&shared.counters.upstream_cx_active),
            flows_lost: shared.flows.lost(),
            clusters: snapshot
                .clusters
                .iter()
                .map(|(name, cluster)| (name.clone(), cluster.counters.snapshot(cluster.ejections_active())))
                .collect(),
        }
    }

    /// Stops accepting (every listening socket is closed when this returns), lets open
    /// connections finish for up to a second, then stops the runtime. Blocks the caller while
    /// draining. On a runtime given to `start_on` it only signals: listeners and connections
    /// wind down on that runtime, which keeps running.
    pub fn shutdown(&self) {
        let inner = &*self.inner;
        inner.root.cancel();
        // Outlier sweeps would otherwise go on in a runtime given to `start_on`.
        for cluster in inner.shared.snapshot.load().clusters.values() {
            cluster.retire();
        }
        let owned = inner.owned_runtime.lock().unwrap_or_else(PoisonError::into_inner).take();
        let Some(runtime) = owned else { return };
        let mut waited = Duration::ZERO;
        let draining = || {
            !inner.accepting.is_empty()
                || inner.shared.counters.downstream_cx_active.load(std::sync::atomic::Ordering::Relaxed) > 0
        };
        while waited < DRAIN_TIMEOUT && draining() {
            std::thread::sleep(DRAIN_POLL);
            waited += DRAIN_POLL;
        }
        runtime.stop();
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.root.cancel();
        if let Some(runtime) = self.owned_runtime.get_mut().unwrap_or_else(PoisonError::into_inner).take() {
            runtime.stop();
        }
    }
}

/// For every listener of `tables`, the slot of an existing socket it keeps: same name and
/// bind first, then (for explicit addresses) a socket on the same address under another name.
fn plan_slots(sockets: &[Option<SocketEntry>], tables: &ProxyTables) -> Vec<Option<usize>> {
    let mut taken = vec![false; sockets.len()];
    let mut slots = vec![None; tables.listeners.len()];
    let mut claim = |matches: &dyn Fn(&SocketEntry, &crate::tables::Listener) -> bool, slots: &mut Vec<Option<usize>>| {
        for (index, listener) in tables.listeners.iter().enumerate() {
            if slots[index].is_some() {
                continue;
            }
            let found = sockets
                .iter()
                .enumerate()
                .find(|(slot, entry)| !taken[*slot] && entry.as_ref().is_some_and(|e| matches(e, listener)));
            if let Some((slot, _)) = found {
                taken[slot] = true;
                slots[index] = Some(slot);
            }
        }
    };
    claim(&|entry, listener| entry.name == listener.name && entry.bind == listener.bind, &mut slots);
    claim(&|entry, listener| !matches!(listener.bind, Bind::LoopbackAuto) && entry.bind == listener.bind, &mut slots);
    slots
}
