//! The serving form of `ProxyTables` (compile -> **snapshot** -> datapath): built once per apply, read lock-free per request.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

use crate::authorize::CompiledPolicy;
use crate::tables::{EndpointPolicy, HttpConnectionManager, Peer, ProxyTables, IDENTITY_WORLD};
use crate::upstream::ClusterState;

/// One generation of tables as the request path uses them.
pub(crate) struct Snapshot {
    pub generation: u64,
    pub tables: ProxyTables,
    /// Listener settings by socket slot (see `listener::Sockets`); `None` for free slots.
    pub listeners: Vec<Option<ListenerEntry>>,
    pub clusters: HashMap<String, Arc<ClusterState>>,
    pub policies: HashMap<IpAddr, Arc<CompiledEndpoint>>,
}

pub(crate) struct ListenerEntry {
    pub name: String,
    pub http: Arc<HttpConnectionManager>,
    /// Connection settings derived from the HCM, shared by the listener's connections.
    pub builder: Arc<auto::Builder<TokioExecutor>>,
}

/// An endpoint's policy compiled for matching, both directions.
pub(crate) struct CompiledEndpoint {
    pub ingress: CompiledPolicy,
    pub egress: CompiledPolicy,
}

impl CompiledEndpoint {
    pub fn new(policy: &EndpointPolicy) -> Self {
        Self { ingress: CompiledPolicy::new(&policy.ingress), egress: CompiledPolicy::new(&policy.egress) }
    }
}

impl Snapshot {
    pub fn empty() -> Self {
        Self {
            generation: 0,
            tables: ProxyTables::default(),
            listeners: Vec::new(),
            clusters: HashMap::new(),
            policies: HashMap::new(),
        }
    }

    pub fn listener(&self, slot: usize) -> Option<&ListenerEntry> {
        self.listeners.get(slot).and_then(Option::as_ref)
    }

    /// Who is behind `ip`: a known pod or node, else the world identity.
    pub fn peer(&self, ip: IpAddr) -> (u32, Option<&Peer>) {
        match self.tables.peers.get(&ip) {
            Some(peer) => (peer.identity, Some(peer)),
            None => (IDENTITY_WORLD, None),
        }
    }
}

/// hyper's connection builder for one HCM: HTTP/1.1 and HTTP/2 prior knowledge on one port.
pub(crate) fn connection_builder(hcm: &HttpConnectionManager) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let header_bytes = hcm.max_request_headers_bytes;
    {
        let mut http1 = builder.http1();
        http1.timer(TokioTimer::new()).keep_alive(true).max_buf_size(header_bytes.max(8192));
        // hyper's default is 100; setting it moves the header array to the heap.
        if hcm.max_headers_count != 100 {
            http1.max_headers(hcm.max_headers_count);
        }
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(header_bytes).unwrap_or(u32::MAX))
        // Envoy's current defaults (envoy-ztunnel.md §2.11); also bounds Rapid Reset work.
        .max_concurrent_streams(1024)
        .max_pending_accept_reset_streams(100);
    builder
}
