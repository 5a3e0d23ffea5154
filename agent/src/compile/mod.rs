//! compile (pure): model + identities -> `ProxyTables` and the views `sluice` shows about them.
//!
//! No I/O and no clock: the same model, identities and node always give the same output, which
//! is what the golden tests under `agent/tests/golden/` pin down.

pub mod bpf;
pub mod envoy;
pub mod policy;
pub mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use sluice_envoy_config::{LabelSet, Model, Pod};
use sluice_proxy::tables::{
    AllowRule, DirectionPolicy, EndpointPolicy, FieldPattern, Identity, L4Match, Peer, PortRange, Protocol, ProxyTables, Remotes,
    IDENTITY_HOST,
};

use crate::identity::{self, Identities, IDENTITY_REMOTE_NODE, RESERVED};
use crate::view::{EndpointView, IdentityView, PolicyView, RuleView, ServiceView};
use policy::{NamedPolicy, PolicySubject, Universe, Warnings};

/// Everything `compile` produces.
#[derive(Debug, Default)]
pub struct Compiled {
    pub tables: ProxyTables,
    /// Accepted but not (fully) enforced, sorted.
    pub warnings: Vec<String>,
    /// References that do not resolve (the rest of the configuration still applies).
    pub errors: Vec<String>,
    pub endpoints: Vec<EndpointView>,
    pub identities: Vec<IdentityView>,
    /// `file` is left empty: the model does not know files; the caller fills it in.
    pub policies: Vec<PolicyView>,
    /// `frontend` is the configured address; automatic ports are known only after apply.
    pub services: Vec<ServiceView>,
    /// Service ports a CiliumEnvoyConfig redirects: (namespace, name, port) -> CEC listener.
    pub l7_service_ports: BTreeMap<(String, String, u16), String>,
}

/// Which datapath the proxy tables are compiled for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DatapathMode {
    /// `--datapath none`: clients connect to the proxy's listeners themselves.
    Gateway,
    /// `--datapath ebpf`: the kernel also redirects L7 flows to a transparent listener on
    /// `proxy_port`.
    Kernel { proxy_port: u16 },
}

/// The security-relevant labels of `pod` in `model` (its namespace's labels included).
pub fn pod_labels(model: &Model, pod: &Pod) -> LabelSet {
    let empty = BTreeMap::new();
    let namespace_labels = model.namespaces().find(|n| n.name == pod.namespace).map_or(&empty, |n| &n.labels);
    identity::pod_security_labels(&pod.labels, &pod.namespace, &pod.service_account, namespace_labels)
}

struct PodEntry<'a> {
    pod: &'a Pod,
    labels: LabelSet,
    identity: Identity,
}

/// Gateway-mode tables (`--datapath none`).
pub fn compile(model: &Model, identities: &Identities, node: &str, generation: u64) -> Compiled {
    compile_for(model, identities, node, generation, DatapathMode::Gateway)
}

pub fn compile_for(model: &Model, identities: &Identities, node: &str, generation: u64, mode: DatapathMode) -> Compiled {
    let mut warnings = Warnings::new();
    let mut errors = Vec::new();

    let mut pods = Vec::new();
    for pod in model.pods().filter(|p| !p.pod_ips.is_empty()) {
        let labels = pod_labels(model, pod);
        match identities.get(&labels) {
            Some(identity) => pods.push(PodEntry { pod, labels, identity }),
            None => errors.push(format!("Pod {}/{}: no identity allocated for its labels", pod.namespace, pod.name)),
        }
    }

    // Peers: nodes first, so a pod address that is also a node address resolves to the pod.
    let mut peers = BTreeMap::new();
    for n in model.nodes() {
        let identity = if n.name == node { IDENTITY_HOST } else { IDENTITY_REMOTE_NODE };
        for ip in &n.addresses {
            peers.insert(*ip, Peer { identity, name: n.name.clone(), labels: Vec::new() });
        }
    }
    let mut owners: BTreeMap<IpAddr, String> = BTreeMap::new();
    for entry in &pods {
        let name = format!("{}/{}", entry.pod.namespace, entry.pod.name);
        for ip in &entry.pod.pod_ips {
            if let Some(first) = owners.get(ip) {
                errors.push(format!("Pod {name}: IP {ip} is already the address of Pod {first}; it keeps that identity"));
                continue;
            }
            owners.insert(*ip, name.clone());
            peers.insert(
                *ip,
                Peer { identity: entry.identity, name: name.clone(), labels: identity::label_strings(&entry.labels) },
            );
        }
    }

    let mut universe = Universe { own_node: node.to_string(), ..Universe::default() };
    for (id, _) in RESERVED {
        if let Some(labels) = identity::reserved_labels(id) {
            universe.identities.insert(id, labels);
        }
    }
    for entry in &pods {
        universe.identities.insert(entry.identity, entry.labels.clone());
        universe.pod_identities.insert(entry.identity);
        universe.ports_by_identity.entry(entry.identity).or_default().extend(entry.pod.container_ports.iter().cloned());
    }
    for n in model.nodes() {
        universe.nodes.insert(n.name.clone(), LabelSet::from_k8s(&n.labels));
    }

    let names: Vec<String> = model
        .network_policies()
        .map(|p| match &p.namespace {
            Some(namespace) => format!("CiliumNetworkPolicy {namespace}/{}", p.name),
            None => format!("CiliumClusterwideNetworkPolicy {}", p.name),
        })
        .collect();
    let named: Vec<NamedPolicy<'_>> =
        model.network_policies().zip(&names).map(|(policy, name)| NamedPolicy { name, policy }).collect();
    universe.cidr_identities = policy::cidr_identities(&named);

    let mut policies = BTreeMap::new();
    let mut endpoints = Vec::new();
    for entry in &pods {
        let subject = PolicySubject { labels: &entry.labels, container_ports: &entry.pod.container_ports };
        let compiled = policy::endpoint_policy(&subject, &named, &universe, &mut warnings);
        if let Some(compiled) = &compiled {
            let shared = Arc::new(compiled.clone());
            for ip in &entry.pod.pod_ips {
                if owners.get(ip).is_some_and(|owner| *owner == format!("{}/{}", entry.pod.namespace, entry.pod.name)) {
                    policies.insert(*ip, shared.clone());
                }
            }
        }
        endpoints.push(endpoint_view(entry, node, compiled.as_ref()));
    }

    let own_labels = model.nodes().find(|n| n.name == node).map(|n| LabelSet::from_k8s(&n.labels)).unwrap_or_default();
    let frontends = services::compile_frontends(model, &own_labels, &mut warnings);
    errors.extend(frontends.errors);

    let mut compiled = Compiled {
        tables: ProxyTables {
            generation,
            listeners: frontends.listeners,
            clusters: frontends.clusters,
            peers,
            cidr_identities: universe.cidr_identities.iter().map(|(prefix, id)| (*prefix, *id)).collect(),
            policies,
            ..ProxyTables::default()
        },
        warnings: warnings.into_iter().collect(),
        errors,
        identities: identity_views(&pods, &universe.cidr_identities),
        policies: policy_views(&named, &pods),
        endpoints,
        services: frontends.views,
        l7_service_ports: frontends.l7_service_ports,
    };
    if let DatapathMode::Kernel { proxy_port } = mode {
        bpf::add_transparent_proxy(model, node, &mut compiled, proxy_port);
    }
    compiled
}

fn endpoint_view(entry: &PodEntry<'_>, node: &str, policy: Option<&EndpointPolicy>) -> EndpointView {
    let empty = EndpointPolicy::default();
    let policy = policy.unwrap_or(&empty);
    EndpointView {
        namespace: entry.pod.namespace.clone(),
        name: entry.pod.name.clone(),
        ip: entry.pod.pod_ips[0],
        node: entry.pod.node_name.clone().unwrap_or_else(|| node.to_string()),
        identity: entry.identity,
        labels: identity::label_strings(&entry.labels),
        ingress_enforced: policy.ingress.default_deny,
        egress_enforced: policy.egress.default_deny,
        ingress: rule_views(&policy.ingress),
        egress: rule_views(&policy.egress),
        kernel: None,
    }
}

fn remotes_view(remotes: &Remotes) -> Vec<u32> {
    match remotes {
        Remotes::Any => Vec::new(),
        Remotes::Only(ids) => ids.iter().copied().collect(),
    }
}

fn port_view(range: &PortRange) -> String {
    let protocol = match range.protocol {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
        Protocol::Any => "ANY",
    };
    match (range.start, range.end) {
        (0, _) => format!("all/{protocol}"),
        (start, end) if end > start => format!("{start}-{end}/{protocol}"),
        (start, _) => format!("{start}/{protocol}"),
    }
}

fn ports_view(l4: &L4Match) -> Vec<String> {
    if l4.ports.is_empty() {
        vec!["any".to_string()]
    } else {
        l4.ports.iter().map(port_view).collect()
    }
}

/// The policy's own text of a field pattern (a literal, or an anchored `^(?:...)$` regex).
fn regex_text(pattern: &FieldPattern) -> &str {
    let text = match pattern {
        FieldPattern::Literal(literal) => return literal,
        FieldPattern::Regex(regex) => regex.as_str(),
    };
    text.strip_prefix("^(?:").and_then(|t| t.strip_suffix(")$")).unwrap_or(text)
}

fn http_view(rule: &AllowRule) -> Option<Vec<String>> {
    rule.http.as_ref().map(|rules| {
        rules
            .iter()
            .map(|h| {
                let mut parts = vec![
                    h.method.as_ref().map_or("*", regex_text).to_string(),
                    h.path.as_ref().map_or("*", regex_text).to_string(),
                ];
                if let Some(host) = &h.host {
                    parts.push(format!("host={}", regex_text(host)));
                }
                for header in &h.headers {
                    let value = header.value.as_deref().map(|v| format!(": {v}")).unwrap_or_default();
                    let mismatch = header.mismatch.map(|m| format!(" (mismatch {m:?})")).unwrap_or_default();
                    parts.push(format!("[{}{value}]{mismatch}", header.name));
                }
                parts.join(" ")
            })
            .collect()
    })
}

fn rule_views(direction: &DirectionPolicy) -> Vec<RuleView> {
    let denies = direction.deny.iter().map(|deny| RuleView {
        action: "deny".to_string(),
        remotes: remotes_view(&deny.remotes),
        ports: ports_view(deny),
        http: None,
        auth_required: false,
        origin: deny.origin.to_string(),
    });
    let allows = direction.allow.iter().map(|allow| RuleView {
        action: "allow".to_string(),
        remotes: remotes_view(&allow.l4.remotes),
        ports: ports_view(&allow.l4),
        http: http_view(allow),
        auth_required: allow.auth_required,
        origin: allow.origin.to_string(),
    });
    denies.chain(allows).collect()
}

fn identity_views(pods: &[PodEntry<'_>], cidr_identities: &BTreeMap<IpNet, Identity>) -> Vec<IdentityView> {
    let mut by_id: BTreeMap<Identity, (Vec<String>, BTreeSet<String>)> = BTreeMap::new();
    for (id, _) in RESERVED {
        let labels = identity::reserved_labels(id).map(|l| identity::label_strings(&l)).unwrap_or_default();
        by_id.insert(id, (labels, BTreeSet::new()));
    }
    for (prefix, id) in cidr_identities {
        // As Cilium labels them: the prefix, and `world` (CIDR identities are part of it).
        by_id.insert(*id, (vec![format!("cidr:{prefix}="), "reserved:world=".to_string()], BTreeSet::new()));
    }
    for entry in pods {
        by_id
            .entry(entry.identity)
            .or_insert_with(|| (identity::label_strings(&entry.labels), BTreeSet::new()))
            .1
            .insert(format!("{}/{}", entry.pod.namespace, entry.pod.name));
    }
    by_id
        .into_iter()
        .map(|(id, (labels, endpoints))| IdentityView { id, labels, endpoints: endpoints.into_iter().collect() })
        .collect()
}

fn policy_views(named: &[NamedPolicy<'_>], pods: &[PodEntry<'_>]) -> Vec<PolicyView> {
    named
        .iter()
        .map(|n| {
            let mut selects = BTreeSet::new();
            let rules = n
                .policy
                .rules
                .iter()
                .map(|rule| {
                    let subject = match &rule.subject {
                        sluice_envoy_config::policy::Subject::Endpoints(selector) => {
                            for entry in pods.iter().filter(|e| selector.matches(&e.labels)) {
                                selects.insert(format!("{}/{}", entry.pod.namespace, entry.pod.name));
                            }
                            format!("endpoints {selector}")
                        }
                        sluice_envoy_config::policy::Subject::Nodes(selector) => format!("nodes {selector}"),
                    };
                    format!(
                        "{}: {subject}: {} ingress, {} ingressDeny, {} egress, {} egressDeny",
                        rule.path,
                        rule.ingress.len(),
                        rule.ingress_deny.len(),
                        rule.egress.len(),
                        rule.egress_deny.len()
                    )
                })
                .collect();
            let (kind, namespace) = match &n.policy.namespace {
                Some(namespace) => ("CiliumNetworkPolicy", Some(namespace.clone())),
                None => ("CiliumClusterwideNetworkPolicy", None),
            };
            PolicyView {
                kind: kind.to_string(),
                namespace,
                name: n.policy.name.clone(),
                file: String::new(),
                rules,
                selects: selects.into_iter().collect(),
                kernel: Vec::new(),
            }
        })
        .collect()
}

/// Tests: the model of `yaml` with an identity allocated for every pod, in pod key order.
#[cfg(test)]
pub(crate) fn model_with_identities(yaml: &str) -> (Model, Identities) {
    let model: Model = sluice_envoy_config::parse_file("t.yaml", yaml).into_iter().filter_map(Result::ok).collect();
    let mut identities = Identities::in_memory();
    for pod in model.pods() {
        identities.allocate(&pod_labels(&model, pod));
    }
    (model, identities)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PODS: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec:\n  containers:\n  - ports: [{name: http, containerPort: 8080}]\nstatus: {podIP: 127.0.0.1}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: client, labels: {app: client, env: prod}}\nstatus: {podIP: 127.0.0.2}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: other, namespace: team, labels: {app: client}}\nstatus: {podIP: 127.0.0.3}\n";

    /// Compiles `PODS` plus `policy` and returns the web pod's policy.
    fn web_policy(policy: &str) -> Option<EndpointPolicy> {
        let (model, identities) = model_with_identities(&format!("{PODS}---\n{policy}"));
        let compiled = compile(&model, &identities, "node-a", 1);
        compiled.tables.policies.get(&IpAddr::from([127, 0, 0, 1])).map(|p| (**p).clone())
    }

    fn only(ids: &[Identity]) -> Remotes {
        Remotes::Only(ids.iter().copied().collect())
    }

    #[test]
    fn cnp_peers_stay_in_the_policy_namespace_and_named_ports_resolve() {
        let policy = web_policy("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: http, protocol: TCP}]}]\n");
        let ingress = policy.map(|p| p.ingress).unwrap_or_default();
        assert!(ingress.default_deny);
        // Identities follow pod key order: default/client 256, default/web 257, team/other 258.
        // `app: client` in a CNP of `default` is default/client only, not team/other.
        assert_eq!(ingress.allow.len(), 1);
        assert_eq!(ingress.allow[0].l4.remotes, only(&[256]));
        assert_eq!(ingress.allow[0].l4.ports, vec![PortRange { protocol: Protocol::Tcp, start: 8080, end: 8080 }]);
        assert_eq!(&*ingress.allow[0].origin, "CiliumNetworkPolicy default/p spec.ingress[0]");
    }

    #[test]
    fn ccnp_entities_and_deny_rules() {
        let policy = web_policy("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: lockdown}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEntities: [cluster]\n  ingressDeny:\n  - fromEntities: [world]\n  egress:\n  - toEndpoints: [{}]\n");
        let policy = policy.unwrap_or_default();
        assert_eq!(policy.ingress.deny.iter().map(|d| d.remotes.clone()).collect::<Vec<_>>(), vec![only(&[2])]);
        assert_eq!(policy.ingress.allow[0].l4.remotes, only(&[1, 3, 4, 5, 6, 7, 256, 257, 258]));
        // A CCNP `{}` peer means every pod of every namespace, not the reserved identities.
        assert_eq!(policy.egress.allow[0].l4.remotes, only(&[256, 257, 258]));
        assert!(policy.egress.default_deny);
    }

    #[test]
    fn enable_default_deny_false_keeps_l7_rules_but_not_default_deny() {
        let policy = web_policy("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  enableDefaultDeny: {ingress: false}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"8080\"}]\n      rules:\n        http: [{method: GET, path: /public}]\n");
        let ingress = policy.map(|p| p.ingress).unwrap_or_default();
        assert!(!ingress.default_deny);
        assert_eq!(ingress.allow[0].l4.remotes, Remotes::Any);
        let http = ingress.allow[0].http.clone().unwrap_or_default();
        assert_eq!(http.len(), 1);
        assert!(http[0].path.as_ref().is_some_and(|p| p.is_match("/public") && !p.is_match("/public/x")));
    }

    #[test]
    fn from_requires_narrows_every_allowed_peer() {
        let policy = web_policy("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromRequires: [{matchLabels: {env: prod}}]\n  - fromEntities: [all]\n    toPorts: [{ports: [{port: \"8080\"}]}]\n");
        let ingress = policy.map(|p| p.ingress).unwrap_or_default();
        assert_eq!(ingress.allow.len(), 1);
        assert_eq!(ingress.allow[0].l4.remotes, only(&[256]));
    }

    /// The identity the proxy (and the kernel's LPM) gives `ip`: its pod or node, else the
    /// longest CIDR prefix holding it, else world.
    fn identity_of(tables: &ProxyTables, ip: IpAddr) -> Identity {
        tables.peers.get(&ip).map(|p| p.identity).unwrap_or_else(|| {
            let holding = tables.cidr_identities.iter().filter(|(prefix, _)| prefix.contains(&ip));
            holding.max_by_key(|(prefix, _)| prefix.prefix_len()).map_or(sluice_proxy::tables::IDENTITY_WORLD, |(_, id)| *id)
        })
    }

    /// Whether `direction` lets a TCP connection to/from `ip` on `port` through.
    fn allows(tables: &ProxyTables, direction: &DirectionPolicy, ip: &str, port: u16) -> bool {
        let ip: IpAddr = ip.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let head = sluice_proxy::request::RequestHead {
            method: http::Method::GET,
            path_and_query: "/".to_string(),
            authority: "example".to_string(),
            headers: http::HeaderMap::new(),
            version: http::Version::HTTP_11,
        };
        let policy = sluice_proxy::authorize::CompiledPolicy::new(direction);
        matches!(
            policy.authorize(identity_of(tables, ip), Protocol::Tcp, port, &head),
            sluice_proxy::authorize::Decision::Allow { .. }
        )
    }

    /// `PODS` plus `policy` compiled; the web pod's egress.
    fn web_egress(policy: &str) -> (Compiled, DirectionPolicy) {
        let (model, identities) = model_with_identities(&format!("{PODS}---\n{policy}"));
        let compiled = compile(&model, &identities, "node-a", 1);
        let egress = compiled.tables.policies.get(&IpAddr::from([127, 0, 0, 1])).map(|p| p.egress.clone());
        (compiled, egress.unwrap_or_default())
    }

    #[test]
    fn cidr_peers_select_the_identities_of_the_prefixes_inside_them() {
        let corpus = include_str!("../../../conformance/cilium-examples/cidr.yaml").replace("app: myService", "app: web");
        let (compiled, egress) = web_egress(&corpus);
        let tables = &compiled.tables;
        // One local identity per prefix, in prefix order, with bit 24 set.
        let prefixes: Vec<String> = tables.cidr_identities.iter().map(|(p, id)| format!("{p} {id:#x}")).collect();
        assert_eq!(prefixes, vec!["10.0.0.0/8 0x1000001", "10.96.0.0/12 0x1000002", "20.1.1.1/32 0x1000003"]);
        assert!(allows(tables, &egress, "20.1.1.1", 443));
        assert!(allows(tables, &egress, "10.1.2.3", 80));
        assert!(!allows(tables, &egress, "10.96.0.5", 80), "inside the except prefix");
        assert!(!allows(tables, &egress, "20.1.1.2", 443));
        assert!(!allows(tables, &egress, "8.8.8.8", 443));
        // Pods keep their own identities: a pod address inside 127.0.0.0/8 is not selected.
        assert!(!allows(tables, &egress, "127.0.0.2", 80));
        let views: Vec<(u32, Vec<String>)> =
            compiled.identities.iter().filter(|v| v.id >= 1 << 24).map(|v| (v.id, v.labels.clone())).collect();
        assert_eq!(
            views,
            vec![
                (0x1000001, vec!["cidr:10.0.0.0/8=".to_string(), "reserved:world=".to_string()]),
                (0x1000002, vec!["cidr:10.96.0.0/12=".to_string(), "reserved:world=".to_string()]),
                (0x1000003, vec!["cidr:20.1.1.1/32=".to_string(), "reserved:world=".to_string()]),
            ]
        );
        let rule_remotes: Vec<Vec<u32>> = compiled.endpoints.iter().find(|e| e.name == "web").map(|e| e.egress.iter().map(|r| r.remotes.clone()).collect()).unwrap_or_default();
        assert_eq!(rule_remotes, vec![vec![0x1000003], vec![0x1000001]]);
    }

    #[test]
    fn cidr_denies_cover_only_their_prefixes_and_world_covers_every_cidr_identity() {
        let (compiled, egress) = web_egress("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toEntities: [world]\n  egressDeny:\n  - toCIDR: [10.0.0.0/8]\n");
        let tables = &compiled.tables;
        assert!(!allows(tables, &egress, "10.1.2.3", 80));
        assert!(allows(tables, &egress, "8.8.8.8", 80));
        assert!(!allows(tables, &egress, "127.0.0.2", 80), "a pod is not world");
    }

    #[test]
    fn everything_except_some_prefixes_still_covers_addresses_in_no_policy_prefix() {
        let (compiled, egress) = web_egress("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toCIDRSet: [{cidr: 0.0.0.0/0, except: [10.0.0.0/8, 192.168.0.0/16]}]\n  - toCIDRSet: [{cidr: 0.0.0.0/0}]\n    toPorts: [{ports: [{port: \"443\"}]}]\n");
        let tables = &compiled.tables;
        assert!(allows(tables, &egress, "8.8.8.8", 80));
        assert!(allows(tables, &egress, "255.255.255.255", 80));
        assert!(allows(tables, &egress, "192.169.0.1", 80));
        assert!(!allows(tables, &egress, "10.1.2.3", 80));
        assert!(!allows(tables, &egress, "192.168.3.4", 80));
        // 0.0.0.0/0 is all of world, the prefixes included.
        assert!(allows(tables, &egress, "10.1.2.3", 443));
        assert!(allows(tables, &egress, "192.168.3.4", 443));
    }
}
