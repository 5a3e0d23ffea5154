//! What the agent shows about itself: the snapshot behind the local API and the CLI tables.
//!
//! The reconcile loop builds a new `Snapshot` after every applied change and stores it in a
//! `SharedSnapshot`; the API serves it as JSON and the CLI renders it. Nothing here decides.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

pub type SharedSnapshot = Arc<ArcSwap<Snapshot>>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub status: StatusView,
    pub endpoints: Vec<EndpointView>,
    pub identities: Vec<IdentityView>,
    pub policies: Vec<PolicyView>,
    pub services: Vec<ServiceView>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatusView {
    pub node: String,
    /// `none` (gateway mode) or `ebpf`.
    pub datapath: String,
    pub config_dir: String,
    /// `ProxyTables::generation` currently applied.
    pub generation: u64,
    /// Unix seconds of the last successful apply.
    pub last_applied_unix: u64,
    /// Objects in the model, by kind (e.g. `Pod: 4`).
    pub objects: Vec<(String, usize)>,
    /// Current configuration errors: each names the file, the document, the field path and why.
    /// The objects they concern keep their last good state.
    pub errors: Vec<String>,
    /// Accepted but not (fully) enforced, e.g. `toFQDNs` in gateway mode.
    pub warnings: Vec<String>,
    pub proxy_workers: usize,
    pub listeners: usize,
    pub flows_seen: u64,
    pub flows_lost: u64,
    /// The config dir's manifests, in path order (absent from agents before it was added).
    #[serde(default)]
    pub files: Vec<FileStatusView>,
}

/// One manifest file of the config dir as the agent holds it now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStatusView {
    /// Relative to the config dir, `/`-separated.
    pub file: String,
    /// Objects this file contributes to the model.
    pub objects: usize,
    /// Of those, objects at their last good version because their document is now bad.
    pub kept_last_good: usize,
    /// This file's current errors (also listed in the status' `errors`).
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EndpointView {
    pub namespace: String,
    pub name: String,
    pub ip: IpAddr,
    pub node: String,
    pub identity: u32,
    /// `source:key=value`, sorted.
    pub labels: Vec<String>,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub ingress: Vec<RuleView>,
    pub egress: Vec<RuleView>,
}

/// One compiled allow or deny rule of an endpoint, in the terms the proxy enforces.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RuleView {
    /// `allow` or `deny`.
    pub action: String,
    /// Remote identities, or empty for any.
    pub remotes: Vec<u32>,
    /// `80/TCP`, `4096-8191/TCP`, `any`.
    pub ports: Vec<String>,
    /// HTTP rules in a compact form (`POST /v1/request-landing`), `None` for L4-only.
    pub http: Option<Vec<String>>,
    pub auth_required: bool,
    pub origin: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityView {
    pub id: u32,
    pub labels: Vec<String>,
    /// `namespace/pod` of the endpoints with this identity (empty for reserved identities).
    pub endpoints: Vec<String>,
}

/// A policy object as loaded (CNP or CCNP).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PolicyView {
    pub kind: String,
    pub namespace: Option<String>,
    pub name: String,
    pub file: String,
    /// The rules' field paths (`spec`, `specs[1]`) with a one-line summary each.
    pub rules: Vec<String>,
    /// `namespace/pod` of the endpoints it selects.
    pub selects: Vec<String>,
}

/// A frontend the proxy listens on: a Service port or a CiliumEnvoyConfig listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServiceView {
    /// `namespace/name:port` for a Service, the qualified listener name for a CEC listener.
    pub name: String,
    /// `ClusterIP`, `CEC-listener`.
    pub kind: String,
    /// The address clients connect to in gateway mode (bound by the proxy).
    pub frontend: Option<SocketAddr>,
    /// The proxy listener serving it.
    pub listener: String,
    /// The CiliumEnvoyConfig that redirects it, if any (`namespace/name`).
    pub envoy_config: Option<String>,
    pub backends: Vec<SocketAddr>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_from_an_agent_without_per_file_state_still_decodes() -> Result<(), serde_json::Error> {
        let older = r#"{"node":"n","datapath":"none","config_dir":"/c","generation":3,
            "last_applied_unix":0,"objects":[["Pod",1]],"errors":[],"warnings":[],
            "proxy_workers":1,"listeners":0,"flows_seen":0,"flows_lost":0}"#;
        let status: StatusView = serde_json::from_str(older)?;
        assert_eq!((status.generation, status.files), (3, vec![]));
        Ok(())
    }
}
