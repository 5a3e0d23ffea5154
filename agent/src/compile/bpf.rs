//! compile (pure), kernel part: the compiled model -> `BpfState` for `sluice_ebpf::Datapath`, and the proxy's transparent listener.
//!
//! The kernel enforces the same per-endpoint `DirectionPolicy` the proxy gets: each deny and
//! allow rule becomes policy entries keyed by remote identity, protocol and port range; an
//! allow rule carrying HTTP rules becomes a redirect to the proxy's transparent listener, which
//! then enforces the HTTP part. The ipcache is the proxy's peer table (pods and nodes, /32) plus
//! the CIDR identities' prefixes, so the kernel's longest-prefix match gives every address the
//! identity the proxy gives it; an address in neither is `world`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net};
use sluice_envoy_config::k8s::L4Protocol as K8sProtocol;
use sluice_envoy_config::Model;
use sluice_proxy::tables::{self, DirectionPolicy, L4Match, ProxyTables, Remotes};

use super::envoy as convert;
use super::services::service_port_backends;
use super::Compiled;

/// The listener the kernel hands redirected flows to (`Bind::Transparent`).
pub const TRANSPARENT_LISTENER: &str = "sluice:transparent";
/// The cluster whose one host is a redirected connection's original destination.
pub const ORIGINAL_DESTINATION_CLUSTER: &str = "sluice:original-destination";

/// What the kernel should enforce, with what could not be put there yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BpfCompiled {
    pub state: sluice_ebpf::BpfState,
    /// Service ports in the socket-LB table by `namespace/name:port/PROTOCOL`, in `state.services` order.
    pub service_names: Vec<String>,
    /// Local pods not enforced: no IPv4 address, or no host route to a pod interface yet.
    pub warnings: Vec<String>,
}

/// Pods of `node` by address: `namespace/name`.
pub fn local_pods(model: &Model, node: &str) -> BTreeMap<Ipv4Addr, String> {
    model
        .pods()
        .filter(|pod| pod.node_name.as_deref() == Some(node))
        .flat_map(|pod| {
            pod.pod_ips.iter().filter_map(move |ip| match ip {
                IpAddr::V4(v4) => Some((*v4, format!("{}/{}", pod.namespace, pod.name))),
                IpAddr::V6(_) => None,
            })
        })
        .collect()
}

/// The kernel state for `node`. `interfaces` maps each local pod address to the ifindex of its
/// host-side interface (found by route lookup); a pod without one is left out and reported.
pub fn compile_bpf(
    model: &Model,
    tables: &ProxyTables,
    l7_service_ports: &BTreeMap<(String, String, u16), String>,
    node: &str,
    interfaces: &BTreeMap<Ipv4Addr, u32>,
    proxy_port: u16,
) -> BpfCompiled {
    let mut out = BpfCompiled::default();
    for (ip, peer) in &tables.peers {
        if let IpAddr::V4(v4) = ip {
            out.state.ipcache.push(sluice_ebpf::IpcacheEntry { cidr: Ipv4Net::from(*v4), identity: peer.identity });
        }
    }
    for (prefix, identity) in &tables.cidr_identities {
        if let IpNet::V4(v4) = prefix {
            out.state.ipcache.push(sluice_ebpf::IpcacheEntry { cidr: v4.trunc(), identity: *identity });
        }
    }
    for pod in model.pods().filter(|pod| pod.node_name.as_deref() == Some(node)) {
        let name = format!("{}/{}", pod.namespace, pod.name);
        let v4: Vec<Ipv4Addr> = pod
            .pod_ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        if v4.len() < pod.pod_ips.len() {
            out.warnings.push(format!("Pod {name}: IPv6 addresses are not enforced by the kernel datapath"));
        }
        for ip in v4 {
            let Some(peer) = tables.peers.get(&IpAddr::V4(ip)).filter(|p| p.name == name) else {
                // No identity (reported by compile) or the address belongs to another pod.
                continue;
            };
            let Some(&ifindex) = interfaces.get(&ip) else {
                out.warnings.push(format!(
                    "Pod {name} ({ip}): no host route to a pod interface on this node yet; not enforced by the kernel"
                ));
                continue;
            };
            let policy = tables.policies.get(&IpAddr::V4(ip));
            let mut entries = Vec::new();
            if let Some(policy) = policy {
                entries.extend(direction_entries(sluice_ebpf::Direction::Ingress, &policy.ingress, proxy_port));
                entries.extend(direction_entries(sluice_ebpf::Direction::Egress, &policy.egress, proxy_port));
            }
            out.state.endpoints.push(sluice_ebpf::Endpoint {
                ip,
                identity: peer.identity,
                ifindex,
                enforce_ingress: policy.is_some_and(|p| p.ingress.default_deny),
                enforce_egress: policy.is_some_and(|p| p.egress.default_deny),
                policy: entries,
            });
        }
    }
    for service in model.services() {
        let Some(IpAddr::V4(vip)) = service.cluster_ip else { continue };
        for port in &service.ports {
            let protocol = match port.protocol {
                K8sProtocol::Tcp => sluice_ebpf::L4Protocol::Tcp,
                K8sProtocol::Udp => sluice_ebpf::L4Protocol::Udp,
                K8sProtocol::Sctp => {
                    out.warnings.push(format!(
                        "Service {}/{} port {}: SCTP is not load-balanced by the kernel datapath",
                        service.namespace, service.name, port.port
                    ));
                    continue;
                }
            };
            let key = (service.namespace.clone(), service.name.clone(), port.port);
            let l7 = protocol == sluice_ebpf::L4Protocol::Tcp && l7_service_ports.contains_key(&key);
            let backends = service_port_backends(model, service, port)
                .into_iter()
                .filter_map(|addr| match addr {
                    SocketAddr::V4(v4) => Some(v4),
                    SocketAddr::V6(_) => None,
                })
                .collect();
            let protocol_name = match protocol {
                sluice_ebpf::L4Protocol::Tcp => "TCP",
                sluice_ebpf::L4Protocol::Udp => "UDP",
            };
            out.service_names.push(format!("{}/{}:{}/{protocol_name}", service.namespace, service.name, port.port));
            out.state.services.push(sluice_ebpf::Service {
                vip,
                port: port.port,
                protocol,
                l7_proxy_port: l7.then_some(proxy_port),
                backends,
            });
        }
    }
    out
}

/// The policy entries of one direction: denies, then allows (HTTP rules make a redirect).
fn direction_entries(
    direction: sluice_ebpf::Direction,
    policy: &DirectionPolicy,
    proxy_port: u16,
) -> Vec<sluice_ebpf::PolicyEntry> {
    let mut entries = Vec::new();
    for deny in &policy.deny {
        entries.extend(match_entries(direction, deny, sluice_ebpf::PolicyAction::Deny, false));
    }
    for allow in &policy.allow {
        let action = match allow.http {
            Some(_) => sluice_ebpf::PolicyAction::Redirect { proxy_port },
            None => sluice_ebpf::PolicyAction::Allow,
        };
        entries.extend(match_entries(direction, &allow.l4, action, allow.auth_required));
    }
    entries
}

/// One entry per (remote identity, port range) of a rule.
fn match_entries(
    direction: sluice_ebpf::Direction,
    l4: &L4Match,
    action: sluice_ebpf::PolicyAction,
    auth_required: bool,
) -> Vec<sluice_ebpf::PolicyEntry> {
    let remotes: Vec<Option<u32>> = match &l4.remotes {
        Remotes::Any => vec![None],
        Remotes::Only(ids) => ids.iter().map(|id| Some(*id)).collect(),
    };
    let ports: Vec<(sluice_ebpf::Protocol, Option<sluice_ebpf::PortRange>)> = if l4.ports.is_empty() {
        vec![(sluice_ebpf::Protocol::Any, None)]
    } else {
        l4.ports
            .iter()
            .map(|range| {
                let protocol = match range.protocol {
                    tables::Protocol::Tcp => sluice_ebpf::Protocol::Tcp,
                    tables::Protocol::Udp => sluice_ebpf::Protocol::Udp,
                    tables::Protocol::Sctp => sluice_ebpf::Protocol::Sctp,
                    tables::Protocol::Any => sluice_ebpf::Protocol::Any,
                };
                let ports = (range.start != 0)
                    .then(|| sluice_ebpf::PortRange { first: range.start, last: range.end.max(range.start) });
                (protocol, ports)
            })
            .collect()
    };
    remotes
        .iter()
        .flat_map(|remote| {
            ports.iter().map(move |(protocol, ports)| sluice_ebpf::PolicyEntry {
                direction,
                remote_identity: *remote,
                protocol: *protocol,
                ports: *ports,
                action,
                auth_required,
            })
        })
        .collect()
}

/// What the proxy needs on top of its gateway tables when the kernel redirects flows to it: a
/// transparent listener on `proxy_port` forwarding to each flow's original destination, CEC
/// Service VIPs mapped to their CEC listener, marked upstream sockets, and the node address as
/// the upstream source.
pub fn add_transparent_proxy(model: &Model, node: &str, compiled: &mut Compiled, proxy_port: u16) {
    let tables = &mut compiled.tables;
    let mut cluster = convert::default_cluster(ORIGINAL_DESTINATION_CLUSTER, Vec::new());
    cluster.lb_policy = tables::LbPolicy::OriginalDestination;
    tables.clusters.insert(ORIGINAL_DESTINATION_CLUSTER.to_string(), Arc::new(cluster));
    tables.listeners.push(tables::Listener {
        name: TRANSPARENT_LISTENER.to_string(),
        bind: tables::Bind::Transparent { port: proxy_port },
        http: Arc::new(convert::default_http_connection_manager(
            TRANSPARENT_LISTENER,
            Arc::new(convert::forward_all(TRANSPARENT_LISTENER, ORIGINAL_DESTINATION_CLUSTER)),
        )),
    });
    for ((namespace, name, port), listener) in &compiled.l7_service_ports {
        let vip = model.services().find(|s| &s.namespace == namespace && &s.name == name).and_then(|s| s.cluster_ip);
        if let Some(IpAddr::V4(vip)) = vip {
            tables.frontends.insert(SocketAddr::V4(SocketAddrV4::new(vip, *port)), listener.clone());
        }
    }
    tables.upstream_source = model
        .nodes()
        .find(|n| n.name == node)
        .and_then(|n| n.addresses.iter().find(|ip| ip.is_ipv4()).copied());
    tables.mark_upstream = true;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{compile_for, model_with_identities, DatapathMode};
    use crate::kernel_view::policy_entry_text;

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec: {nodeName: node-a}\nstatus: {podIP: 198.18.0.10}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, labels: {app: client}}\nspec: {nodeName: node-a}\nstatus: {podIP: 198.18.0.11}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: remote, labels: {app: client}}\nspec: {nodeName: node-b}\nstatus: {podIP: 198.18.1.10}\n";

    /// The kernel state of `PODS` plus `extra` on node-a, with only `web` behind an interface.
    fn kernel_state(extra: &str) -> BpfCompiled {
        let (model, identities) = model_with_identities(&format!("{PODS}---\n{extra}"));
        let compiled = compile_for(&model, &identities, "node-a", 1, DatapathMode::Kernel { proxy_port: 15001 });
        let interfaces = BTreeMap::from([(Ipv4Addr::new(198, 18, 0, 10), 7)]);
        compile_bpf(&model, &compiled.tables, &compiled.l7_service_ports, "node-a", &interfaces, 15001)
    }

    #[test]
    fn port_ranges_any_protocol_denies_and_http_rules_become_entries() {
        let state = kernel_state("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"8000\", endPort: 8100, protocol: ANY}]}]\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules: {http: [{method: GET}]}\n  ingressDeny:\n  - fromEntities: [world]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n  egress:\n  - toEntities: [cluster]\n");
        let web = state.state.endpoints.iter().find(|e| e.ip == Ipv4Addr::new(198, 18, 0, 10));
        let entries: Vec<String> = web.map(|e| e.policy.iter().map(policy_entry_text).collect()).unwrap_or_default();
        // Identities: default/client 256 (both client pods share it), default/remote's labels
        // are the same set, default/web 257.
        assert_eq!(
            entries,
            vec![
                "ingress deny 2 TCP/8080",
                "ingress allow 256 ANY/8000-8100",
                "ingress redirect:15001 any TCP/80",
                "egress allow 1 ANY",
                "egress allow 3 ANY",
                "egress allow 4 ANY",
                "egress allow 5 ANY",
                "egress allow 6 ANY",
                "egress allow 7 ANY",
                "egress allow 256 ANY",
                "egress allow 257 ANY",
            ]
        );
        assert_eq!(web.map(|e| (e.ifindex, e.enforce_ingress, e.enforce_egress)), Some((7, true, true)));
    }

    #[test]
    fn only_local_pods_with_an_interface_are_endpoints_and_every_pod_is_in_the_ipcache() {
        let state = kernel_state("");
        assert_eq!(state.state.endpoints.iter().map(|e| e.ip).collect::<Vec<_>>(), vec![Ipv4Addr::new(198, 18, 0, 10)]);
        assert_eq!(
            state.warnings,
            vec!["Pod default/client (198.18.0.11): no host route to a pod interface on this node yet; not enforced by the kernel"]
        );
        let ipcache: Vec<String> = state.state.ipcache.iter().map(|e| format!("{} {}", e.cidr, e.identity)).collect();
        assert_eq!(ipcache, vec!["198.18.0.10/32 257", "198.18.0.11/32 256", "198.18.1.10/32 256"]);
    }

    #[test]
    fn cidr_prefixes_are_in_the_ipcache_with_the_identities_the_rules_name() {
        let state = kernel_state("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.96.0.0/12]}, {cidr: \"fd00::/8\"}]\n");
        let ipcache: Vec<String> = state.state.ipcache.iter().map(|e| format!("{} {:#x}", e.cidr, e.identity)).collect();
        assert_eq!(
            ipcache,
            vec!["198.18.0.10/32 0x101", "198.18.0.11/32 0x100", "198.18.1.10/32 0x100", "10.0.0.0/8 0x1000001", "10.96.0.0/12 0x1000002"]
        );
        let web = state.state.endpoints.iter().find(|e| e.ip == Ipv4Addr::new(198, 18, 0, 10));
        let entries: Vec<String> = web.map(|e| e.policy.iter().map(policy_entry_text).collect()).unwrap_or_default();
        // fd00::/8 has an identity for the proxy; IPv6 is not in the kernel's ipcache.
        assert_eq!(entries, vec!["egress allow 16777217 ANY", "egress allow 16777219 ANY"]);
    }
}
