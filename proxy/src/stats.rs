//! Proxy counters (datapath -> **stats**): relaxed atomics bumped on the request path, read by `Handle::stats`.
//!
//! Names follow Envoy's statistics so dashboards and conformance tests can compare the two.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// A snapshot of the proxy's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// `ProxyTables::generation` currently serving new requests.
    pub generation: u64,
    /// Open downstream connections (Envoy `downstream_cx_active`).
    pub downstream_cx_active: u64,
    /// Downstream connections accepted since start (`downstream_cx_total`).
    pub downstream_cx_total: u64,
    /// Downstream requests received since start (`downstream_rq_total`).
    pub downstream_rq_total: u64,
    /// Open upstream connections over all clusters (`upstream_cx_active`).
    pub upstream_cx_active: u64,
    /// Flow events dropped because the agent did not keep up (Hubble `lost_events_total`).
    pub flows_lost: u64,
    /// Per cluster, by the cluster's qualified name; kept across table swaps while the name exists.
    pub clusters: BTreeMap<String, ClusterStats>,
}

/// Envoy's per-cluster counters (`cluster.<name>.*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClusterStats {
    /// Open connections to the cluster's hosts.
    pub upstream_cx_active: u64,
    /// Connections opened although `max_connections` was reached (a host with none gets one).
    pub upstream_cx_overflow: u64,
    /// Connection attempts that failed or timed out.
    pub upstream_cx_connect_fail: u64,
    /// Requests in flight (headers sent, response not finished).
    pub upstream_rq_active: u64,
    /// Upstream attempts started (first tries and retries).
    pub upstream_rq_total: u64,
    /// Requests refused by `max_requests` or `max_pending_requests` (503 + `x-envoy-overloaded`).
    pub upstream_rq_pending_overflow: u64,
    /// Retries made.
    pub upstream_rq_retry: u64,
    /// Retries not made because `max_retries` concurrent retries were already running.
    pub upstream_rq_retry_overflow: u64,
    /// Request bodies that outgrew the replay buffer, ending retries for them
    /// (`retry_or_shadow_abandoned`).
    pub retry_or_shadow_abandoned: u64,
    /// Requests that ran out of their route timeout (504).
    pub upstream_rq_timeout: u64,
    /// Attempts that ran out of their `per_try_timeout`.
    pub upstream_rq_per_try_timeout: u64,
    /// Outlier ejections enforced (`outlier_detection.ejections_enforced_total`).
    pub ejections_enforced_total: u64,
    /// Of those, by detector (`ejections_enforced_consecutive_5xx`, ...). The success-rate and
    /// failure-percentage counts include their local-origin variants.
    pub ejections_enforced_consecutive_5xx: u64,
    pub ejections_enforced_consecutive_gateway_failure: u64,
    pub ejections_enforced_consecutive_local_origin_failure: u64,
    pub ejections_enforced_success_rate: u64,
    pub ejections_enforced_failure_percentage: u64,
    /// Ejections refused by `max_ejection_percent` (`outlier_detection.ejections_overflow`).
    pub ejections_overflow: u64,
    /// Hosts ejected right now (`outlier_detection.ejections_active`).
    pub ejections_active: u64,
}

#[derive(Debug, Default)]
pub(crate) struct ProxyCounters {
    pub downstream_cx_active: AtomicU64,
    pub downstream_cx_total: AtomicU64,
    pub downstream_rq_total: AtomicU64,
    pub upstream_cx_active: AtomicU64,
}

/// Per-cluster counters; also the circuit breakers' gauges (`upstream_cx_active`,
/// `upstream_rq_active`, `pending_active`, `retries_active`).
#[derive(Debug, Default)]
pub(crate) struct ClusterCounters {
    pub upstream_cx_active: AtomicU64,
    pub upstream_cx_overflow: AtomicU64,
    pub upstream_cx_connect_fail: AtomicU64,
    pub upstream_rq_active: AtomicU64,
    pub upstream_rq_total: AtomicU64,
    pub upstream_rq_pending_overflow: AtomicU64,
    pub upstream_rq_retry: AtomicU64,
    pub upstream_rq_retry_overflow: AtomicU64,
    pub retry_or_shadow_abandoned: AtomicU64,
    pub upstream_rq_timeout: AtomicU64,
    pub upstream_rq_per_try_timeout: AtomicU64,
    pub ejections_enforced_total: AtomicU64,
    pub ejections_enforced_consecutive_5xx: AtomicU64,
    pub ejections_enforced_consecutive_gateway_failure: AtomicU64,
    pub ejections_enforced_consecutive_local_origin_failure: AtomicU64,
    pub ejections_enforced_success_rate: AtomicU64,
    pub ejections_enforced_failure_percentage: AtomicU64,
    pub ejections_overflow: AtomicU64,
    pub pending_active: AtomicU64,
    pub retries_active: AtomicU64,
}

impl ClusterCounters {
    pub fn snapshot(&self, ejections_active: u64) -> ClusterStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ClusterStats {
            upstream_cx_active: get(&self.upstream_cx_active),
            upstream_cx_overflow: get(&self.upstream_cx_overflow),
            upstream_cx_connect_fail: get(&self.upstream_cx_connect_fail),
            upstream_rq_active: get(&self.upstream_rq_active),
            upstream_rq_total: get(&self.upstream_rq_total),
            upstream_rq_pending_overflow: get(&self.upstream_rq_pending_overflow),
            upstream_rq_retry: get(&self.upstream_rq_retry),
            upstream_rq_retry_overflow: get(&self.upstream_rq_retry_overflow),
            retry_or_shadow_abandoned: get(&self.retry_or_shadow_abandoned),
            upstream_rq_timeout: get(&self.upstream_rq_timeout),
            upstream_rq_per_try_timeout: get(&self.upstream_rq_per_try_timeout),
            ejections_enforced_total: get(&self.ejections_enforced_total),
            ejections_enforced_consecutive_5xx: get(&self.ejections_enforced_consecutive_5xx),
            ejections_enforced_consecutive_gateway_failure: get(&self.ejections_enforced_consecutive_gateway_failure),
            ejections_enforced_consecutive_local_origin_failure: get(&self.ejections_enforced_consecutive_local_origin_failure),
            ejections_enforced_success_rate: get(&self.ejections_enforced_success_rate),
            ejections_enforced_failure_percentage: get(&self.ejections_enforced_failure_percentage),
            ejections_overflow: get(&self.ejections_overflow),
            ejections_active,
        }
    }
}

pub(crate) fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}
