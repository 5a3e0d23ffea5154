//! Flow events: the proxy's record of every request (respond -> **log**), consumed by the agent.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::tables::Identity;

/// Hubble's verdict names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    Forwarded,
    Dropped,
    Error,
}

/// Why a request did not reach a backend (Hubble's drop-reason names where they exist).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DropReason {
    /// No L3/L4 allow rule matched (Cilium 133); the connection is closed without a response.
    PolicyDenied,
    /// An explicit deny rule matched (Cilium 181); closed without a response.
    PolicyDeny,
    /// L3/L4 allowed, no HTTP rule matched: answered `403 Access denied`.
    L7PolicyDenied,
    /// `authentication.mode: required` and the peer is not authenticated (Cilium 189).
    AuthRequired,
    /// Request could not be parsed or normalized safely (400/431...).
    InvalidRequest,
    /// No virtual host / route matched (404).
    NoRoute,
    /// The route names a cluster that does not exist, or it has no endpoints.
    NoHealthyUpstream,
    /// Circuit breaker overflow (503 + `x-envoy-overloaded`).
    Overflow,
    /// Connect failure or reset talking to the upstream; also the `507` of a retry whose
    /// request body outgrew the replay buffer during the back-off (the failed attempt is the
    /// cause).
    UpstreamFailure,
    UpstreamTimeout,
    /// The whole request did not arrive within the listener's `request_timeout` (408).
    DownstreamTimeout,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum TrafficDirection {
    Ingress,
    Egress,
}

/// One side of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowPeer {
    pub ip: IpAddr,
    pub port: u16,
    pub identity: Identity,
    /// `namespace/pod` (or node name); `None` for world. Shared with the tables: one event
    /// per request must not copy names.
    pub name: Option<Arc<str>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpFlow {
    pub method: http::Method,
    /// Path and query as the policy saw it (normalized).
    pub url: String,
    pub authority: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// `None` when no response was sent (L3/L4 drop).
    pub status: Option<u16>,
    pub latency: Duration,
}

/// One request through the proxy.
#[derive(Debug, Clone)]
pub struct FlowEvent {
    pub time: SystemTime,
    /// `ProxyTables::generation` that handled it.
    pub generation: u64,
    pub verdict: Verdict,
    pub drop_reason: Option<DropReason>,
    /// Which side of the flow the proxy stood on; always set. A policy drop has the direction
    /// of the policy that dropped it; an allowed request is `Ingress` when the destination's
    /// ingress policy was enforced, else `Egress` when the source's egress policy was; with no
    /// policy involved it is `Egress` for a known client (pod or node) and `Ingress` for
    /// `world` (gateway mode: the proxy is the server side for outside clients). Hubble's
    /// `reporter` label follows it: `server` for ingress, `client` for egress.
    pub direction: Option<TrafficDirection>,
    pub source: FlowPeer,
    /// The backend chosen, or the listener's own address when none was chosen.
    pub destination: FlowPeer,
    pub listener: Arc<str>,
    pub http: Option<HttpFlow>,
    pub cluster: Option<Arc<str>>,
    /// Upstream attempts made (1 + retries); 0 when no upstream was contacted.
    pub attempts: u32,
    /// The policy rule that decided, e.g. `CiliumNetworkPolicy default/rule1 spec.ingress[0]`.
    pub policy: Option<Arc<str>>,
}

/// Where the proxy sends flow events: a bounded queue that never blocks a request. Events that
/// do not fit are counted as lost (Hubble's `lost_events_total`).
#[derive(Debug, Clone)]
pub struct FlowSink {
    tx: tokio::sync::mpsc::Sender<FlowEvent>,
    lost: Arc<AtomicU64>,
}

impl FlowSink {
    pub fn new(capacity: usize) -> (Self, tokio::sync::mpsc::Receiver<FlowEvent>) {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        (Self { tx, lost: Arc::new(AtomicU64::new(0)) }, rx)
    }

    pub fn send(&self, event: FlowEvent) {
        if self.tx.try_send(event).is_err() {
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }
}
