//! compile (pure): an endpoint's `PolicyEntry` list -> the LPM entries of the kernel policy map,
//! with port ranges split into prefixes, `ANY` protocol with ports expanded, and deny-over-allow
//! made explicit so the kernel's precedence lookup (see `bpf/policy.h`) always picks a deny
//! when any deny covers the packet.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::state::{
    Direction, PolicyAction, PolicyEntry, Protocol, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP,
};

/// The match half of one policy-map entry: Cilium's key, led by the endpoint's address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyMatch {
    pub endpoint: Ipv4Addr,
    /// 0: any identity.
    pub remote_identity: u32,
    pub direction: Direction,
    /// IP protocol number, 0: any (then the port is wildcarded too).
    pub protocol: u8,
    /// First port of the prefix (host order).
    pub port: u16,
    /// Significant leading bits of `port`: 16 for one port, 0 for all ports.
    pub port_prefix_len: u8,
}

impl PolicyMatch {
    /// How specific the L4 part is, in LPM bits after the always-matched fields (0..=24).
    pub fn l4_prefix_len(&self) -> u8 {
        if self.protocol == 0 {
            0
        } else {
            8 + self.port_prefix_len
        }
    }

    /// Inclusive port range covered by this match.
    pub fn port_range(&self) -> (u16, u16) {
        if self.protocol == 0 || self.port_prefix_len == 0 {
            return (0, u16::MAX);
        }
        let span = (1u32 << (16 - u32::from(self.port_prefix_len))) - 1;
        (self.port, (u32::from(self.port) + span) as u16)
    }

    /// The 24 L4 bits (protocol, then port) as the LPM trie compares them.
    fn l4_bits(&self) -> u32 {
        (u32::from(self.protocol) << 16) | u32::from(self.port)
    }

    /// Does this match's L4 prefix contain `other`'s?
    fn l4_covers(&self, other: &PolicyMatch) -> bool {
        let len = u32::from(self.l4_prefix_len());
        if len > u32::from(other.l4_prefix_len()) {
            return false;
        }
        let mask = if len == 0 {
            0
        } else {
            (!0u32 << (24 - len)) & 0x00ff_ffff
        };
        self.l4_bits() & mask == other.l4_bits() & mask
    }
}

/// The value half: what happens to a packet that matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyDecision {
    pub deny: bool,
    /// Non-zero: redirect to the proxy listening on this port.
    pub proxy_port: u16,
    pub auth_required: bool,
}

/// Compiles one endpoint's policy into its policy-map entries.
pub fn compile_endpoint_policy(
    endpoint: Ipv4Addr,
    entries: &[PolicyEntry],
) -> BTreeMap<PolicyMatch, PolicyDecision> {
    let mut compiled: BTreeMap<PolicyMatch, PolicyDecision> = BTreeMap::new();
    for entry in entries {
        let decision = PolicyDecision {
            deny: entry.action == PolicyAction::Deny,
            proxy_port: match entry.action {
                PolicyAction::Redirect { proxy_port } => proxy_port,
                PolicyAction::Allow | PolicyAction::Deny => 0,
            },
            auth_required: entry.auth_required && entry.action != PolicyAction::Deny,
        };
        for key in expand(endpoint, entry) {
            let merged = match compiled.get(&key) {
                Some(existing) => merge(*existing, decision),
                None => decision,
            };
            compiled.insert(key, merged);
        }
    }
    add_deny_intersections(&mut compiled);
    compiled
}

/// Two rules selecting the same key: a deny wins; otherwise a redirect wins over a plain allow
/// (the L7 rules must still be enforced), the lower port first for a stable result; a required
/// authentication stays required.
fn merge(a: PolicyDecision, b: PolicyDecision) -> PolicyDecision {
    if a.deny || b.deny {
        return PolicyDecision {
            deny: true,
            proxy_port: 0,
            auth_required: false,
        };
    }
    let proxy_port = match (a.proxy_port, b.proxy_port) {
        (0, port) | (port, 0) => port,
        (x, y) => x.min(y),
    };
    PolicyDecision {
        deny: false,
        proxy_port,
        auth_required: a.auth_required || b.auth_required,
    }
}

fn expand(endpoint: Ipv4Addr, entry: &PolicyEntry) -> Vec<PolicyMatch> {
    let base = PolicyMatch {
        endpoint,
        remote_identity: entry.remote_identity.unwrap_or(0),
        direction: entry.direction,
        protocol: 0,
        port: 0,
        port_prefix_len: 0,
    };
    let protocols: Vec<u8> = match (entry.protocol, entry.ports) {
        (Protocol::Any, None) => return vec![base],
        (Protocol::Any, Some(_)) => vec![IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP],
        (other, _) => other.number().into_iter().collect(),
    };
    let port_prefixes = match entry.ports {
        Some(range) if entry.protocol == Protocol::Any || entry.protocol.has_ports() => {
            port_range_prefixes(range.first, range.last)
        }
        _ => vec![(0, 0)],
    };
    protocols
        .iter()
        .flat_map(|&protocol| {
            port_prefixes
                .iter()
                .map(move |&(port, port_prefix_len)| PolicyMatch {
                    protocol,
                    port,
                    port_prefix_len,
                    ..base
                })
        })
        .collect()
}

/// Splits an inclusive port range into the fewest aligned prefixes (port, prefix length).
/// An inverted range yields nothing.
pub fn port_range_prefixes(first: u16, last: u16) -> Vec<(u16, u8)> {
    let mut prefixes = Vec::new();
    let (mut start, end) = (u32::from(first), u32::from(last));
    while start <= end {
        let mut block_bits = if start == 0 {
            16
        } else {
            start.trailing_zeros().min(16)
        };
        while start + (1u32 << block_bits) - 1 > end {
            block_bits -= 1;
        }
        prefixes.push((start as u16, (16 - block_bits) as u8));
        start += 1u32 << block_bits;
    }
    prefixes
}

/// For every deny that overlaps an allow, writes a deny at their intersection: that key is at
/// least as specific as the allow in both identity and L4, so the kernel's precedence lookup
/// reaches it (or an even more specific deny) before the allow.
fn add_deny_intersections(compiled: &mut BTreeMap<PolicyMatch, PolicyDecision>) {
    let denies: Vec<PolicyMatch> = compiled
        .iter()
        .filter(|(_, d)| d.deny)
        .map(|(k, _)| *k)
        .collect();
    let allows: Vec<PolicyMatch> = compiled
        .iter()
        .filter(|(_, d)| !d.deny)
        .map(|(k, _)| *k)
        .collect();
    let deny = PolicyDecision {
        deny: true,
        proxy_port: 0,
        auth_required: false,
    };
    for d in &denies {
        for a in &allows {
            if let Some(intersection) = intersect(d, a) {
                compiled.insert(intersection, deny);
            }
        }
    }
}

fn intersect(x: &PolicyMatch, y: &PolicyMatch) -> Option<PolicyMatch> {
    if x.endpoint != y.endpoint || x.direction != y.direction {
        return None;
    }
    let remote_identity = match (x.remote_identity, y.remote_identity) {
        (0, id) | (id, 0) => id,
        (a, b) if a == b => a,
        _ => return None,
    };
    let l4 = if x.l4_covers(y) {
        y
    } else if y.l4_covers(x) {
        x
    } else {
        return None;
    };
    Some(PolicyMatch {
        remote_identity,
        ..*l4
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PortRange;

    const EP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);

    fn entry(
        identity: Option<u32>,
        protocol: Protocol,
        ports: Option<(u16, u16)>,
        action: PolicyAction,
    ) -> PolicyEntry {
        PolicyEntry {
            direction: Direction::Ingress,
            remote_identity: identity,
            protocol,
            ports: ports.map(|(first, last)| PortRange { first, last }),
            action,
            auth_required: false,
        }
    }

    /// The decision the kernel's precedence rule (`bpf/policy.h`) reaches for a packet, replayed
    /// over the compiled entries: longest match per identity lookup, then the longer L4 match,
    /// then the identity-specific one.
    fn kernel_decision(
        compiled: &BTreeMap<PolicyMatch, PolicyDecision>,
        identity: u32,
        protocol: u8,
        port: u16,
    ) -> Option<PolicyDecision> {
        let lookup = |id: u32| {
            compiled
                .iter()
                .filter(|(k, _)| k.remote_identity == id && k.direction == Direction::Ingress)
                .filter(|(k, _)| {
                    k.protocol == 0
                        || (k.protocol == protocol
                            && (k.port_range().0..=k.port_range().1).contains(&port))
                })
                .max_by_key(|(k, _)| k.l4_prefix_len())
                .map(|(k, v)| (k.l4_prefix_len(), *v))
        };
        match (lookup(identity), lookup(0)) {
            (Some(by_id), Some(by_any)) => Some(if by_any.0 > by_id.0 {
                by_any.1
            } else {
                by_id.1
            }),
            (by_id, by_any) => by_id.or(by_any).map(|(_, v)| v),
        }
    }

    #[test]
    fn port_ranges_split_into_aligned_prefixes() {
        assert_eq!(port_range_prefixes(80, 80), vec![(80, 16)]);
        assert_eq!(port_range_prefixes(0, u16::MAX), vec![(0, 0)]);
        assert_eq!(port_range_prefixes(8080, 8083), vec![(8080, 14)]);
        assert_eq!(port_range_prefixes(79, 81), vec![(79, 16), (80, 15)]);
        assert!(port_range_prefixes(81, 80).is_empty());
        let covered: u32 = port_range_prefixes(1000, 2999)
            .iter()
            .map(|&(_, len)| 1u32 << (16 - len))
            .sum();
        assert_eq!(covered, 2000);
    }

    #[test]
    fn any_protocol_with_ports_expands_to_tcp_udp_sctp() {
        let compiled = compile_endpoint_policy(
            EP,
            &[entry(
                Some(7),
                Protocol::Any,
                Some((53, 53)),
                PolicyAction::Allow,
            )],
        );
        let protocols: Vec<u8> = compiled.keys().map(|k| k.protocol).collect();
        assert_eq!(protocols, vec![IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP]);
        assert!(compiled
            .keys()
            .all(|k| k.port == 53 && k.port_prefix_len == 16));
    }

    #[test]
    fn a_broad_deny_beats_a_more_specific_allow() {
        // deny from identity 7 on all ports; allow anyone on tcp/80.
        let compiled = compile_endpoint_policy(
            EP,
            &[
                entry(Some(7), Protocol::Any, None, PolicyAction::Deny),
                entry(None, Protocol::Tcp, Some((80, 80)), PolicyAction::Allow),
            ],
        );
        assert!(kernel_decision(&compiled, 7, IPPROTO_TCP, 80).is_some_and(|d| d.deny));
        assert!(kernel_decision(&compiled, 8, IPPROTO_TCP, 80).is_some_and(|d| !d.deny));
        assert!(kernel_decision(&compiled, 7, IPPROTO_UDP, 53).is_some_and(|d| d.deny));
    }

    #[test]
    fn a_deny_for_any_identity_beats_an_allow_for_one_identity() {
        let compiled = compile_endpoint_policy(
            EP,
            &[
                entry(None, Protocol::Tcp, Some((0, 1023)), PolicyAction::Deny),
                entry(
                    Some(7),
                    Protocol::Tcp,
                    Some((80, 80)),
                    PolicyAction::Redirect { proxy_port: 15001 },
                ),
                entry(
                    Some(7),
                    Protocol::Tcp,
                    Some((8080, 8080)),
                    PolicyAction::Allow,
                ),
            ],
        );
        assert!(kernel_decision(&compiled, 7, IPPROTO_TCP, 80).is_some_and(|d| d.deny));
        assert_eq!(
            kernel_decision(&compiled, 7, IPPROTO_TCP, 8080),
            Some(PolicyDecision {
                deny: false,
                proxy_port: 0,
                auth_required: false
            })
        );
        assert_eq!(kernel_decision(&compiled, 7, IPPROTO_UDP, 80), None);
    }

    #[test]
    fn overlapping_port_ranges_deny_only_the_overlap() {
        let compiled = compile_endpoint_policy(
            EP,
            &[
                entry(Some(7), Protocol::Tcp, Some((64, 127)), PolicyAction::Allow),
                entry(None, Protocol::Tcp, Some((80, 81)), PolicyAction::Deny),
            ],
        );
        for port in 64..=127u16 {
            let decision =
                kernel_decision(&compiled, 7, IPPROTO_TCP, port).expect("covered by the allow");
            assert_eq!(decision.deny, port == 80 || port == 81, "port {port}");
        }
    }

    #[test]
    fn redirect_wins_over_plain_allow_on_the_same_key() {
        let compiled = compile_endpoint_policy(
            EP,
            &[
                entry(Some(7), Protocol::Tcp, Some((80, 80)), PolicyAction::Allow),
                entry(
                    Some(7),
                    Protocol::Tcp,
                    Some((80, 80)),
                    PolicyAction::Redirect { proxy_port: 15001 },
                ),
            ],
        );
        assert_eq!(compiled.len(), 1);
        assert_eq!(compiled.values().next().map(|d| d.proxy_port), Some(15001));
    }
}
