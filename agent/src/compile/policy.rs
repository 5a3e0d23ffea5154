//! compile (pure), policy part: the CNP/CCNP rules selecting a pod -> its `EndpointPolicy`.
//!
//! Peers become identity sets over every known identity, ports are resolved against container
//! ports, HTTP rules are carried over as anchored regexes. What gateway mode cannot enforce
//! (FQDNs, Services as peers, DNS/Kafka rules, TLS interception, host policies) is left out
//! with a warning: these are allow rules, so leaving them out allows less, never more.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ipnet::IpNet;

use sluice_envoy_config::k8s::{ContainerPort, L4Protocol};
use sluice_envoy_config::labels::{LabelSet, Selector};
use sluice_envoy_config::policy::{
    AuthenticationMode, CidrRule, Entity, L7Rules, NetworkPolicy, PeerRule, Port, PortRule, Protocol, Subject,
};
use sluice_envoy_config::policy::{AnchoredRegex, HttpRule as CiliumHttpRule, MismatchAction as CiliumMismatch};
use sluice_proxy::tables::{
    AllowRule, DirectionPolicy, EndpointPolicy, FieldPattern, FullMatch, HttpHeaderRule, HttpRule, Identity, L4Match, MismatchAction,
    PortRange, Protocol as TableProtocol, Remotes, IDENTITY_HOST, IDENTITY_WORLD,
};

use crate::identity::{
    IDENTITY_HEALTH, IDENTITY_INIT, IDENTITY_KUBE_APISERVER, IDENTITY_REMOTE_NODE, IDENTITY_UNMANAGED,
};

/// Everything a selector can select: identities with their labels, and the nodes.
#[derive(Debug, Default)]
pub struct Universe {
    /// Every identity that exists (reserved and of pods), with its label set.
    pub identities: BTreeMap<Identity, LabelSet>,
    /// Identities of pods (the `cluster` entity's share of pods).
    pub pod_identities: BTreeSet<Identity>,
    /// Container ports of the pods of each identity, for named ports of egress rules.
    pub ports_by_identity: BTreeMap<Identity, Vec<ContainerPort>>,
    /// Node name -> labels, and which node this agent runs.
    pub nodes: BTreeMap<String, LabelSet>,
    pub own_node: String,
    /// Every CIDR prefix the policies use, with its local identity (see `cidr_identities`).
    pub cidr_identities: BTreeMap<IpNet, Identity>,
}

/// A pod being compiled.
#[derive(Debug)]
pub struct PolicySubject<'a> {
    pub labels: &'a LabelSet,
    pub container_ports: &'a [ContainerPort],
}

/// A policy with its printable name, e.g. `CiliumNetworkPolicy default/rule1`.
#[derive(Debug, Clone, Copy)]
pub struct NamedPolicy<'a> {
    pub name: &'a str,
    pub policy: &'a NetworkPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    Egress,
}

/// Warnings collected while compiling; a set, because one policy selecting many pods would
/// otherwise repeat the same warning per pod.
pub type Warnings = BTreeSet<String>;

/// The policy of one pod, or `None` when no rule selects it.
pub fn endpoint_policy(
    subject: &PolicySubject<'_>,
    policies: &[NamedPolicy<'_>],
    universe: &Universe,
    warnings: &mut Warnings,
) -> Option<EndpointPolicy> {
    let mut selected = false;
    let mut policy = EndpointPolicy::default();
    let mut requires: [Vec<&Selector>; 2] = [Vec::new(), Vec::new()];
    for named in policies {
        for rule in &named.policy.rules {
            let selector = match &rule.subject {
                Subject::Endpoints(selector) => selector,
                Subject::Nodes(_) => {
                    warnings.insert(format!(
                        "{} {}: host policies (nodeSelector) are not enforced in gateway mode",
                        named.name, rule.path
                    ));
                    continue;
                }
            };
            if !selector.matches(subject.labels) {
                continue;
            }
            selected = true;
            let sections = [
                (Direction::Ingress, &rule.ingress, &rule.ingress_deny, rule.enable_default_deny.ingress),
                (Direction::Egress, &rule.egress, &rule.egress_deny, rule.enable_default_deny.egress),
            ];
            for (direction, allows, denies, default_deny) in sections {
                let target = match direction {
                    Direction::Ingress => &mut policy.ingress,
                    Direction::Egress => &mut policy.egress,
                };
                let has_section = !allows.is_empty() || !denies.is_empty();
                if default_deny.unwrap_or(has_section) {
                    target.default_deny = true;
                }
                let context = RuleContext { policy: named.name, direction, subject, universe };
                for allow in allows.iter() {
                    requires[direction as usize].extend(allow.requires.iter());
                    target.allow.extend(context.allow_rules(allow, warnings));
                }
                for deny in denies.iter() {
                    target.deny.extend(context.deny_matches(deny, warnings));
                }
            }
        }
    }
    if !selected {
        return None;
    }
    apply_requires(&mut policy.ingress, &requires[Direction::Ingress as usize], universe);
    apply_requires(&mut policy.egress, &requires[Direction::Egress as usize], universe);
    Some(policy)
}

/// `fromRequires`/`toRequires` constrain every allowed peer of the endpoint in that direction.
fn apply_requires(direction: &mut DirectionPolicy, requires: &[&Selector], universe: &Universe) {
    if requires.is_empty() {
        return;
    }
    let satisfies = |id: &Identity| {
        universe.identities.get(id).is_some_and(|labels| requires.iter().all(|r| r.matches(labels)))
    };
    for rule in &mut direction.allow {
        rule.l4.remotes = match &rule.l4.remotes {
            Remotes::Any => Remotes::Only(universe.identities.keys().copied().filter(satisfies).collect()),
            Remotes::Only(ids) => Remotes::Only(ids.iter().copied().filter(satisfies).collect()),
        };
    }
}

struct RuleContext<'a> {
    policy: &'a str,
    direction: Direction,
    subject: &'a PolicySubject<'a>,
    universe: &'a Universe,
}

/// Whether a rule allows or denies: decides which way an approximation may err.
#[derive(Clone, Copy)]
enum RuleEffect {
    Allow,
    Deny,
}

impl RuleContext<'_> {
    fn origin(&self, rule: &PeerRule) -> Arc<str> {
        Arc::from(format!("{} {}", self.policy, rule.path))
    }

    fn warn(&self, warnings: &mut Warnings, rule: &PeerRule, what: &str) {
        warnings.insert(format!("{} {}: {what}", self.policy, rule.path));
    }

    /// The identities a rule's peer fields select (their union). Where a peer can only be
    /// approximated (CIDR groups), the approximation errs on the closed side for `effect`: it
    /// selects less in an allow rule and more in a deny rule.
    fn remotes(&self, rule: &PeerRule, effect: RuleEffect, warnings: &mut Warnings) -> Remotes {
        if rule.has_no_peers() {
            return Remotes::Any;
        }
        let universe = self.universe;
        let mut ids = BTreeSet::new();
        for selector in &rule.endpoints {
            ids.extend(universe.identities.iter().filter(|(_, labels)| selector.matches(labels)).map(|(id, _)| *id));
        }
        for entity in &rule.entities {
            match entity_identities(*entity, universe) {
                Remotes::Any => return Remotes::Any,
                Remotes::Only(set) => ids.extend(set),
            }
            if *entity == Entity::Ingress {
                self.warn(warnings, rule, "the `ingress` entity has no identity in gateway mode and selects nothing");
            }
        }
        for cidr_rule in &rule.cidrs {
            match cidr_rule.cidr {
                Some(cidr) => ids.extend(cidr_peer_identities(cidr, &cidr_rule.except, &universe.cidr_identities)),
                None => {
                    let group = cidr_rule.group_ref.as_deref().map_or("cidrGroupSelector".to_string(), |g| format!("cidrGroupRef {g}"));
                    match effect {
                        RuleEffect::Allow => self.warn(
                            warnings,
                            rule,
                            &format!("{group}: CiliumCIDRGroups are not read, so this allow rule allows nothing for it"),
                        ),
                        RuleEffect::Deny => {
                            self.warn(
                                warnings,
                                rule,
                                &format!("{group}: CiliumCIDRGroups are not read, so this deny rule denies all of `world` for it"),
                            );
                            ids.insert(IDENTITY_WORLD);
                        }
                    }
                }
            }
        }
        for selector in &rule.nodes {
            for (name, labels) in &universe.nodes {
                if selector.matches(labels) {
                    ids.insert(if *name == universe.own_node { IDENTITY_HOST } else { IDENTITY_REMOTE_NODE });
                }
            }
        }
        if !rule.nodes.is_empty() {
            self.warn(warnings, rule, "node peers are enforced as the `host`/`remote-node` identities (all remote nodes share one)");
        }
        if !rule.groups.is_empty() {
            self.warn(warnings, rule, "`toGroups`/`fromGroups` (cloud provider groups) are not resolved; they select nothing");
        }
        if !rule.services.is_empty() {
            self.warn(warnings, rule, "`toServices` is not enforced in gateway mode; it selects nothing");
        }
        if !rule.fqdns.is_empty() {
            self.warn(warnings, rule, "`toFQDNs` is not enforced in gateway mode (no DNS proxy); it selects nothing");
        }
        Remotes::Only(ids)
    }

    fn allow_rules(&self, rule: &PeerRule, warnings: &mut Warnings) -> Vec<AllowRule> {
        if rule.has_no_peers() && rule.to_ports.is_empty() {
            // `{}`: only flips default deny (cilium.md §1.7).
            if !rule.icmps.is_empty() {
                self.warn(warnings, rule, "ICMP rules are not enforced by the proxy");
            }
            return Vec::new();
        }
        let remotes = self.remotes(rule, RuleEffect::Allow, warnings);
        if remotes == Remotes::Only(BTreeSet::new()) {
            // Every peer was unenforceable (warned above): the rule allows nothing.
            return Vec::new();
        }
        let auth_required = match rule.authentication {
            Some(AuthenticationMode::Required) | Some(AuthenticationMode::TestAlwaysFail) => true,
            Some(AuthenticationMode::Disabled) | None => false,
        };
        let origin = self.origin(rule);
        if rule.to_ports.is_empty() {
            let l4 = L4Match { remotes, ports: Vec::new(), origin: origin.clone() };
            return vec![AllowRule { l4, http: None, auth_required, origin }];
        }
        let mut out = Vec::new();
        for port_rule in &rule.to_ports {
            let Some(ports) = self.port_ranges(rule, port_rule, &remotes, warnings) else { continue };
            let http = match &port_rule.rules {
                None => None,
                Some(L7Rules::Http(rules)) => Some(self.http_rules(rule, rules, warnings)),
                Some(L7Rules::Dns(_)) => {
                    self.warn(warnings, rule, "DNS rules are not enforced in gateway mode (no DNS proxy); this port rule allows nothing");
                    continue;
                }
                Some(L7Rules::Kafka(_)) => {
                    self.warn(warnings, rule, "Kafka rules are not enforced; this port rule allows nothing");
                    continue;
                }
                Some(L7Rules::Generic { proto, .. }) => {
                    self.warn(warnings, rule, &format!("`l7proto: {proto}` rules are not enforced; this port rule allows nothing"));
                    continue;
                }
            };
            if port_rule.terminating_tls.is_some() || port_rule.originating_tls.is_some() || !port_rule.server_names.is_empty() {
                self.warn(warnings, rule, "TLS interception and serverNames are not supported in gateway mode; this port rule allows nothing");
                continue;
            }
            if port_rule.listener.is_some() {
                self.warn(warnings, rule, "`toPorts.listener` redirection is not supported; the rule is enforced by the policy proxy");
            }
            out.push(AllowRule {
                l4: L4Match { remotes: remotes.clone(), ports, origin: origin.clone() },
                http,
                auth_required,
                origin: origin.clone(),
            });
        }
        out
    }

    fn deny_matches(&self, rule: &PeerRule, warnings: &mut Warnings) -> Vec<L4Match> {
        if rule.has_no_peers() && rule.to_ports.is_empty() {
            return Vec::new();
        }
        if !rule.groups.is_empty() || !rule.services.is_empty() || !rule.fqdns.is_empty() {
            self.warn(warnings, rule, "this deny rule is enforced only for its other peers: traffic to the unresolved peers is NOT denied");
        }
        let remotes = self.remotes(rule, RuleEffect::Deny, warnings);
        if remotes == Remotes::Only(BTreeSet::new()) {
            return Vec::new();
        }
        let origin = self.origin(rule);
        if rule.to_ports.is_empty() {
            return vec![L4Match { remotes, ports: Vec::new(), origin }];
        }
        rule.to_ports
            .iter()
            .filter_map(|port_rule| self.port_ranges(rule, port_rule, &remotes, warnings))
            .map(|ports| L4Match { remotes: remotes.clone(), ports, origin: origin.clone() })
            .collect()
    }

    /// The ports of one `toPorts` entry; `None` when none of them can be resolved (the entry
    /// then matches nothing). An empty list means all ports.
    fn port_ranges(
        &self,
        rule: &PeerRule,
        port_rule: &PortRule,
        remotes: &Remotes,
        warnings: &mut Warnings,
    ) -> Option<Vec<PortRange>> {
        if port_rule.ports.is_empty() {
            return Some(Vec::new());
        }
        let mut ranges = Vec::new();
        for port in &port_rule.ports {
            let protocols = match table_protocol(port.protocol) {
                Some(protocol) => protocol,
                None => {
                    self.warn(warnings, rule, &format!("protocol {:?} is not handled by the proxy; that port matches nothing", port.protocol));
                    continue;
                }
            };
            match &port.port {
                Port::Number(number) => ranges.push(PortRange {
                    protocol: protocols,
                    start: *number,
                    end: port.end_port.unwrap_or(*number),
                }),
                Port::Name(name) => {
                    let resolved = self.named_port(name, port.protocol, remotes);
                    if resolved.is_empty() {
                        self.warn(warnings, rule, &format!("named port `{name}` matches no container port; it matches nothing"));
                    }
                    ranges.extend(resolved.into_iter().map(|n| PortRange { protocol: protocols, start: n, end: n }));
                }
            }
        }
        if ranges.is_empty() {
            None
        } else {
            Some(ranges)
        }
    }

    /// Ingress: the subject pod's container ports; egress: those of the pods the rule reaches.
    fn named_port(&self, name: &str, protocol: Protocol, remotes: &Remotes) -> BTreeSet<u16> {
        let protocol_matches = |p: &ContainerPort| match protocol {
            Protocol::Any => true,
            Protocol::Tcp => p.protocol == L4Protocol::Tcp,
            Protocol::Udp => p.protocol == L4Protocol::Udp,
            Protocol::Sctp => p.protocol == L4Protocol::Sctp,
            Protocol::Vrrp | Protocol::Igmp => false,
        };
        let matching = |ports: &[ContainerPort]| -> Vec<u16> {
            ports
                .iter()
                .filter(|p| p.name.as_deref().is_some_and(|n| n.eq_ignore_ascii_case(name)) && protocol_matches(p))
                .map(|p| p.port)
                .collect()
        };
        match self.direction {
            Direction::Ingress => matching(self.subject.container_ports).into_iter().collect(),
            Direction::Egress => self
                .universe
                .ports_by_identity
                .iter()
                .filter(|(id, _)| match remotes {
                    Remotes::Any => true,
                    Remotes::Only(ids) => ids.contains(id),
                })
                .flat_map(|(_, ports)| matching(ports))
                .collect(),
        }
    }

    fn http_rules(&self, rule: &PeerRule, rules: &[CiliumHttpRule], warnings: &mut Warnings) -> Vec<HttpRule> {
        if rules.is_empty() {
            // `http: []`: everything allowed, still through the proxy (visibility).
            return vec![HttpRule::default()];
        }
        let mut out = Vec::new();
        'rules: for (index, http) in rules.iter().enumerate() {
            let mut headers: Vec<HttpHeaderRule> = http
                .headers
                .iter()
                .map(|h| HttpHeaderRule { name: h.name.to_ascii_lowercase(), value: h.value.clone(), mismatch: None })
                .collect();
            for matcher in &http.header_matches {
                let value = matcher.value.clone().filter(|v| !v.is_empty());
                if let Some(secret) = &matcher.secret {
                    if value.is_none() {
                        self.warn(
                            warnings,
                            rule,
                            &format!(
                                "rules.http[{index}]: headerMatches `{}` takes its value from Secret {}; Secrets are not read, so this HTTP rule never matches",
                                matcher.name, secret.name
                            ),
                        );
                        continue 'rules;
                    }
                }
                headers.push(HttpHeaderRule {
                    name: matcher.name.to_ascii_lowercase(),
                    value,
                    mismatch: matcher.mismatch.map(|m| match m {
                        CiliumMismatch::Log => MismatchAction::Log,
                        CiliumMismatch::Add => MismatchAction::Add,
                        CiliumMismatch::Delete => MismatchAction::Delete,
                        CiliumMismatch::Replace => MismatchAction::Replace,
                    }),
                });
            }
            out.push(HttpRule {
                method: http.method.as_ref().map(field_pattern),
                path: http.path.as_ref().map(field_pattern),
                host: http.host.as_ref().map(field_pattern),
                headers,
            });
        }
        out
    }
}

fn field_pattern(pattern: &AnchoredRegex) -> FieldPattern {
    match pattern.regex() {
        Some(regex) => FieldPattern::Regex(FullMatch::new(regex.clone())),
        None => FieldPattern::Literal(pattern.source.clone()),
    }
}

fn table_protocol(protocol: Protocol) -> Option<TableProtocol> {
    match protocol {
        Protocol::Tcp => Some(TableProtocol::Tcp),
        Protocol::Udp => Some(TableProtocol::Udp),
        Protocol::Sctp => Some(TableProtocol::Sctp),
        Protocol::Any => Some(TableProtocol::Any),
        Protocol::Vrrp | Protocol::Igmp => None,
    }
}

/// Cilium's local-scope identities (CIDR identities, never shared across nodes) have this bit set.
pub const LOCAL_IDENTITY_SCOPE: Identity = 1 << 24;

/// Every CIDR prefix (and `except` prefix) the policies use, each with a local identity,
/// allocated in prefix order so the same policies always give the same numbers. An address then
/// takes the identity of the longest prefix containing it (pods and nodes keep their own), and
/// a CIDR peer selects the identities of the prefixes inside it (`cidr_peer_identities`).
///
/// `/0` is `world` and gets no identity. For `0.0.0.0/0 except E` the prefixes covering the
/// rest of the address space are added as well: otherwise an address in no prefix would be
/// `world`, which that peer must not select as a whole.
pub fn cidr_identities(policies: &[NamedPolicy<'_>]) -> BTreeMap<IpNet, Identity> {
    let mut prefixes = BTreeSet::new();
    let cidr_rules = policies
        .iter()
        .flat_map(|named| &named.policy.rules)
        .flat_map(|rule| rule.ingress.iter().chain(&rule.ingress_deny).chain(&rule.egress).chain(&rule.egress_deny))
        .flat_map(|peer| &peer.cidrs);
    for CidrRule { cidr, except, .. } in cidr_rules {
        let Some(cidr) = cidr else { continue };
        prefixes.extend(std::iter::once(cidr).chain(except).map(IpNet::trunc));
        if cidr.prefix_len() == 0 && !except.is_empty() {
            prefixes.extend(prefixes_outside(*cidr, except));
        }
    }
    prefixes
        .into_iter()
        .filter(|prefix| prefix.prefix_len() > 0)
        .zip(1..)
        .map(|(prefix, n)| (prefix, LOCAL_IDENTITY_SCOPE | n))
        .collect()
}

/// The prefixes covering `whole` minus `except`: each except prefix splits the prefix holding it
/// into halves down to its own length, keeping the halves outside it.
fn prefixes_outside(whole: IpNet, except: &[IpNet]) -> Vec<IpNet> {
    let mut remaining = vec![whole.trunc()];
    for hole in except {
        let mut next = Vec::new();
        for prefix in remaining {
            if hole.contains(&prefix) {
                continue;
            }
            if !prefix.contains(hole) {
                next.push(prefix);
                continue;
            }
            let mut holding = prefix;
            while holding.prefix_len() < hole.prefix_len() {
                let Ok(halves) = holding.subnets(holding.prefix_len() + 1) else { break };
                for half in halves {
                    if half.contains(hole) {
                        holding = half;
                    } else {
                        next.push(half);
                    }
                }
            }
        }
        remaining = next;
    }
    remaining
}

/// The identities a CIDR peer `cidr except except` selects: those of the known prefixes inside
/// `cidr` and not inside an except prefix, and `world` for a whole `/0`. Pods and nodes are
/// never selected: they keep their own identities.
fn cidr_peer_identities(cidr: IpNet, except: &[IpNet], known: &BTreeMap<IpNet, Identity>) -> BTreeSet<Identity> {
    let mut ids: BTreeSet<Identity> = known
        .iter()
        .filter(|(prefix, _)| cidr.contains(*prefix) && !except.iter().any(|e| e.contains(*prefix)))
        .map(|(_, id)| *id)
        .collect();
    if cidr.prefix_len() == 0 && except.is_empty() {
        ids.insert(IDENTITY_WORLD);
    }
    ids
}

/// The identities an entity stands for (cilium.md §1.4).
fn entity_identities(entity: Entity, universe: &Universe) -> Remotes {
    let only = |ids: &[Identity]| Remotes::Only(ids.iter().copied().collect());
    match entity {
        Entity::All => Remotes::Any,
        // CIDR identities are part of `world` (Cilium labels them `reserved:world` too).
        Entity::World | Entity::WorldIpv4 | Entity::WorldIpv6 => {
            let family = |prefix: &IpNet| {
                !matches!((entity, prefix), (Entity::WorldIpv4, IpNet::V6(_)) | (Entity::WorldIpv6, IpNet::V4(_)))
            };
            let cidrs = universe.cidr_identities.iter().filter(|(prefix, _)| family(prefix)).map(|(_, id)| *id);
            Remotes::Only(std::iter::once(IDENTITY_WORLD).chain(cidrs).collect())
        }
        Entity::Host => only(&[IDENTITY_HOST]),
        Entity::RemoteNode => only(&[IDENTITY_REMOTE_NODE]),
        Entity::Init => only(&[IDENTITY_INIT]),
        Entity::Health => only(&[IDENTITY_HEALTH]),
        Entity::Unmanaged => only(&[IDENTITY_UNMANAGED]),
        Entity::KubeApiserver => only(&[IDENTITY_KUBE_APISERVER]),
        Entity::Ingress | Entity::None => only(&[]),
        Entity::Cluster => {
            let mut ids: BTreeSet<Identity> = universe.pod_identities.clone();
            ids.extend([
                IDENTITY_HOST,
                IDENTITY_REMOTE_NODE,
                IDENTITY_INIT,
                IDENTITY_HEALTH,
                IDENTITY_UNMANAGED,
                IDENTITY_KUBE_APISERVER,
            ]);
            Remotes::Only(ids)
        }
    }
}
