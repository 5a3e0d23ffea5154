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
    /// `--datapath ebpf`: the kernel half; absent in gateway mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelStatusView>,
}

/// The kernel datapath as the last apply left it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelStatusView {
    /// Where maps and links are pinned (`--bpffs`).
    pub pin_dir: String,
    /// The cgroup whose sockets are load-balanced (`--cgroup`).
    pub cgroup: String,
    /// The proxy's transparent listener (127.0.0.1), where L7 flows are redirected.
    pub proxy_port: u16,
    /// Host-side interfaces with the TC programs attached.
    pub interfaces: Vec<String>,
    /// Entries in the kernel's maps, read back after the last apply.
    pub endpoints: usize,
    pub services: usize,
    pub policy_entries: usize,
    /// What the last apply changed, e.g. `policy +4 ~0 -2`.
    pub last_apply: Vec<String>,
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
    /// `--datapath ebpf`, pods of this node: what the kernel holds for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelEndpointView>,
}

/// A local endpoint as the kernel's maps hold it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEndpointView {
    /// The host-side interface its TC programs are attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The endpoints map's entry; `None`: the kernel does not enforce this pod (see warnings).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry: Option<KernelEndpointEntry>,
    /// The policy map's entries for this endpoint (after range splitting and deny
    /// intersection), e.g. `ingress allow 257 TCP/80`, `egress redirect:15001 any TCP/80`.
    pub policy: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelEndpointEntry {
    pub identity: u32,
    pub ifindex: u32,
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
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
    /// `--datapath ebpf`: the kernel's policy entries of the selected pods of this node (all
    /// policies selecting a pod together make its entries).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kernel: Vec<KernelPolicyView>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelPolicyView {
    /// `namespace/pod`.
    pub endpoint: String,
    /// As in [`KernelEndpointView::policy`].
    pub entries: Vec<String>,
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
    /// `--datapath ebpf`: the socket-LB entry for this Service port, read back from the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelServiceView>,
}

/// A Service port in the kernel's socket load-balancing maps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelServiceView {
    /// `ClusterIP:port`.
    pub vip: SocketAddr,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// Listed in a CiliumEnvoyConfig: connect() keeps the VIP and TC redirects to this proxy port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7_proxy_port: Option<u16>,
    /// The backends the Maglev table points to.
    pub backends: Vec<SocketAddr>,
    pub maglev_size: u32,
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
