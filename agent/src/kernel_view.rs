//! Observe: the kernel's maps as read back after an apply, set beside the agent's intent in the views `sluice endpoint list`, `service list` and `policy get` show.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};

use sluice_ebpf::{KernelPolicyEntry, L4Protocol, PolicyAction, PolicyEntry, Protocol};

use crate::compile::bpf::BpfCompiled;
use crate::kernel::KernelReadback;
use crate::view::{KernelEndpointEntry, KernelEndpointView, KernelPolicyView, KernelServiceView, ServiceView, Snapshot};

/// One policy-map entry in words: `ingress allow 257 TCP/80`, `egress redirect:15001 any TCP/80`,
/// `ingress deny any ANY`; ` auth` when it requires authentication.
pub fn policy_entry_text(entry: &PolicyEntry) -> String {
    let direction = match entry.direction {
        sluice_ebpf::Direction::Ingress => "ingress",
        sluice_ebpf::Direction::Egress => "egress",
    };
    let action = match entry.action {
        PolicyAction::Allow => "allow".to_owned(),
        PolicyAction::Deny => "deny".to_owned(),
        PolicyAction::Redirect { proxy_port } => format!("redirect:{proxy_port}"),
    };
    let remote = entry.remote_identity.map_or_else(|| "any".to_owned(), |id| id.to_string());
    let protocol = match entry.protocol {
        Protocol::Any => "ANY",
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
        Protocol::Icmp => "ICMP",
    };
    let ports = match entry.ports {
        None => String::new(),
        Some(range) if range.first == range.last => format!("/{}", range.first),
        Some(range) => format!("/{}-{}", range.first, range.last),
    };
    let auth = if entry.auth_required { " auth" } else { "" };
    format!("{direction} {action} {remote} {protocol}{ports}{auth}")
}

fn protocol_name(protocol: L4Protocol) -> &'static str {
    match protocol {
        L4Protocol::Tcp => "TCP",
        L4Protocol::Udp => "UDP",
    }
}

/// Adds the kernel's view to `snapshot`: a `kernel` part on each local endpoint, on each
/// Service port in the socket-LB table (Service ports only the kernel serves, such as UDP,
/// get a view of their own), and on each policy for the local pods it selects.
pub fn add_kernel_views(
    snapshot: &mut Snapshot,
    local_pods: &BTreeMap<std::net::Ipv4Addr, String>,
    compiled: &BpfCompiled,
    readback: &KernelReadback,
    interface_names: &BTreeMap<u32, String>,
) {
    let mut policy_by_endpoint: BTreeMap<std::net::Ipv4Addr, Vec<String>> = BTreeMap::new();
    for KernelPolicyEntry { endpoint, entry } in &readback.policy {
        policy_by_endpoint.entry(*endpoint).or_default().push(policy_entry_text(entry));
    }
    for view in &mut snapshot.endpoints {
        let IpAddr::V4(ip) = view.ip else { continue };
        if !local_pods.contains_key(&ip) {
            continue;
        }
        let entry = readback.endpoints.iter().find(|e| e.ip == ip);
        view.kernel = Some(KernelEndpointView {
            interface: entry.and_then(|e| interface_names.get(&e.ifindex).cloned()),
            entry: entry.map(|e| KernelEndpointEntry {
                identity: e.identity,
                ifindex: e.ifindex,
                ingress_enforced: e.enforce_ingress,
                egress_enforced: e.enforce_egress,
            }),
            policy: policy_by_endpoint.get(&ip).cloned().unwrap_or_default(),
        });
    }

    for policy in &mut snapshot.policies {
        policy.kernel = policy
            .selects
            .iter()
            .filter_map(|pod| {
                let (ip, _) = local_pods.iter().find(|(_, name)| *name == pod)?;
                Some(KernelPolicyView {
                    endpoint: pod.clone(),
                    entries: policy_by_endpoint.get(ip).cloned().unwrap_or_default(),
                })
            })
            .collect();
    }

    let names: BTreeMap<(std::net::Ipv4Addr, u16, L4Protocol), &str> = compiled
        .state
        .services
        .iter()
        .zip(&compiled.service_names)
        .map(|(service, name)| ((service.vip, service.port, service.protocol), name.as_str()))
        .collect();
    for service in &readback.services {
        let kernel = KernelServiceView {
            vip: SocketAddr::V4(SocketAddrV4::new(service.vip, service.port)),
            protocol: protocol_name(service.protocol).to_owned(),
            l7_proxy_port: service.l7_proxy_port,
            backends: service.backends.iter().map(|b| SocketAddr::V4(*b)).collect(),
            maglev_size: service.maglev_size,
        };
        let name = names.get(&(service.vip, service.port, service.protocol)).copied();
        // The gateway view of a TCP Service port is named `namespace/name:port`.
        let gateway_name = name.and_then(|n| n.strip_suffix("/TCP"));
        match snapshot.services.iter_mut().find(|v| gateway_name.is_some_and(|g| v.name == g)) {
            Some(view) => view.kernel = Some(kernel),
            None => snapshot.services.push(ServiceView {
                name: name.map_or_else(|| kernel.vip.to_string(), str::to_owned),
                kind: if name.is_some() { "ClusterIP" } else { "kernel-only" }.to_owned(),
                frontend: None,
                listener: String::new(),
                envoy_config: None,
                backends: kernel.backends.clone(),
                kernel: Some(kernel),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_ebpf::{Direction, PortRange};

    #[test]
    fn policy_entries_read_as_direction_action_remote_and_ports() {
        let entry = PolicyEntry {
            direction: Direction::Ingress,
            remote_identity: Some(257),
            protocol: Protocol::Tcp,
            ports: Some(PortRange::single(80)),
            action: PolicyAction::Redirect { proxy_port: 15001 },
            auth_required: false,
        };
        assert_eq!(policy_entry_text(&entry), "ingress redirect:15001 257 TCP/80");
        let any = PolicyEntry {
            direction: Direction::Egress,
            remote_identity: None,
            protocol: Protocol::Any,
            ports: None,
            action: PolicyAction::Deny,
            auth_required: false,
        };
        assert_eq!(policy_entry_text(&any), "egress deny any ANY");
        let range = PolicyEntry { ports: Some(PortRange { first: 8192, last: 8255 }), protocol: Protocol::Udp, action: PolicyAction::Allow, auth_required: true, ..any };
        assert_eq!(policy_entry_text(&range), "egress allow any UDP/8192-8255 auth");
    }
}
