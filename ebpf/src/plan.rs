//! compile (pure): `BpfState` -> the exact contents every BPF map should have, and the diff
//! between two map contents. The loader only does I/O around these two functions.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::Hash;
use std::net::{Ipv4Addr, SocketAddrV4};

use crate::abi::{
    BackendKey, BackendValue, EndpointInfo, EndpointKey, IpcacheKeyData, IpcacheValue, MaglevKey,
    MaglevValue, PolicyKeyData, PolicyValue, ServiceKey, ServiceValue, DIR_EGRESS, DIR_INGRESS,
    EP_F_ENFORCE_EGRESS, EP_F_ENFORCE_INGRESS, POLICY_PREFIX_BASE, SVC_F_L7,
};
use crate::maglev;
use crate::policy::{compile_endpoint_policy, PolicyMatch};
use crate::state::{BpfState, Direction, PolicyAction};

/// An LPM trie key: (prefix length, data), aya's `lpm_trie::Key` in hashable form.
pub type LpmKey<K> = (u32, K);

/// What every map should hold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MapContents {
    pub ipcache: HashMap<LpmKey<IpcacheKeyData>, IpcacheValue>,
    pub endpoints: HashMap<EndpointKey, EndpointInfo>,
    pub policy: HashMap<LpmKey<PolicyKeyData>, PolicyValue>,
    pub services: HashMap<ServiceKey, ServiceValue>,
    pub backends: HashMap<BackendKey, BackendValue>,
    pub maglev: HashMap<MaglevKey, MaglevValue>,
}

/// Ids already in the kernel, kept so that a reconcile (or a restarted agent) does not renumber
/// services and backends under established sockets.
#[derive(Debug, Clone, Default)]
pub struct ExistingIds {
    pub services: HashMap<ServiceKey, u32>,
    pub backends: HashMap<BackendValue, u32>,
    /// Maglev table sizes in use: a table never shrinks, since a new size reshuffles every slot.
    pub table_sizes: HashMap<ServiceKey, u32>,
}

impl ExistingIds {
    pub fn from_maps(
        services: &HashMap<ServiceKey, ServiceValue>,
        backends: &HashMap<BackendKey, BackendValue>,
    ) -> Self {
        Self {
            services: services.iter().map(|(k, v)| (*k, v.service_id)).collect(),
            backends: backends.iter().map(|(k, v)| (*v, k.backend_id)).collect(),
            table_sizes: services.iter().map(|(k, v)| (*k, v.maglev_size)).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("endpoint {0} is listed twice")]
    DuplicateEndpoint(Ipv4Addr),
    #[error("service {vip}:{port}/{protocol:?} is listed twice")]
    DuplicateService {
        vip: Ipv4Addr,
        port: u16,
        protocol: crate::state::L4Protocol,
    },
    #[error("endpoint {endpoint}: a redirect to the proxy needs a non-zero proxy port")]
    RedirectWithoutPort { endpoint: Ipv4Addr },
    #[error("service {vip}:{port}: an L7 service needs a non-zero proxy port")]
    L7ServiceWithoutPort { vip: Ipv4Addr, port: u16 },
    #[error("service {vip}:{port} has {count} backends, more than {max}")]
    TooManyBackends {
        vip: Ipv4Addr,
        port: u16,
        count: usize,
        max: usize,
    },
}

/// The map contents that enforce `state`.
pub fn plan(state: &BpfState, existing: &ExistingIds) -> Result<MapContents, StateError> {
    let mut out = MapContents::default();
    for entry in &state.ipcache {
        out.ipcache.insert(
            (
                u32::from(entry.cidr.prefix_len()),
                IpcacheKeyData {
                    addr: be_addr(entry.cidr.network()),
                },
            ),
            IpcacheValue {
                identity: entry.identity,
                _pad: 0,
            },
        );
    }
    for endpoint in &state.endpoints {
        let key = EndpointKey {
            addr: be_addr(endpoint.ip),
        };
        let flags = (if endpoint.enforce_ingress {
            EP_F_ENFORCE_INGRESS
        } else {
            0
        }) | (if endpoint.enforce_egress {
            EP_F_ENFORCE_EGRESS
        } else {
            0
        });
        let info = EndpointInfo {
            identity: endpoint.identity,
            ifindex: endpoint.ifindex,
            flags,
            _pad: 0,
        };
        if out.endpoints.insert(key, info).is_some() {
            return Err(StateError::DuplicateEndpoint(endpoint.ip));
        }
        if endpoint
            .policy
            .iter()
            .any(|e| e.action == PolicyAction::Redirect { proxy_port: 0 })
        {
            return Err(StateError::RedirectWithoutPort {
                endpoint: endpoint.ip,
            });
        }
        for (matched, decision) in compile_endpoint_policy(endpoint.ip, &endpoint.policy) {
            out.policy.insert(
                policy_key(&matched),
                PolicyValue {
                    proxy_port: decision.proxy_port,
                    deny: u8::from(decision.deny),
                    auth_required: u8::from(decision.auth_required),
                    l4_prefixlen: matched.l4_prefix_len(),
                    _pad: [0; 3],
                },
            );
        }
    }
    plan_services(state, existing, &mut out)?;
    Ok(out)
}

fn plan_services(
    state: &BpfState,
    existing: &ExistingIds,
    out: &mut MapContents,
) -> Result<(), StateError> {
    let mut service_ids = IdAllocator::new(existing.services.values().copied());
    let mut backend_ids = IdAllocator::new(existing.backends.values().copied());
    let mut backend_id_of: HashMap<BackendValue, u32> = HashMap::new();
    for service in &state.services {
        let key = ServiceKey {
            vip: be_addr(service.vip),
            dport: service.port.to_be(),
            protocol: service.protocol.number(),
            _pad: 0,
        };
        if out.services.contains_key(&key) {
            return Err(StateError::DuplicateService {
                vip: service.vip,
                port: service.port,
                protocol: service.protocol,
            });
        }
        if service.l7_proxy_port == Some(0) {
            return Err(StateError::L7ServiceWithoutPort {
                vip: service.vip,
                port: service.port,
            });
        }
        let mut backends: Vec<SocketAddrV4> = service.backends.clone();
        backends.sort();
        backends.dedup();
        if backends.len() > usize::from(u16::MAX) {
            return Err(StateError::TooManyBackends {
                vip: service.vip,
                port: service.port,
                count: backends.len(),
                max: usize::from(u16::MAX),
            });
        }
        let service_id = existing
            .services
            .get(&key)
            .copied()
            .unwrap_or_else(|| service_ids.next());
        let needed = maglev::table_size(backends.len());
        let size = match existing.table_sizes.get(&key) {
            _ if service.l7_proxy_port.is_some() => 0,
            Some(&in_use) if needed > 1 && in_use >= needed => in_use,
            _ => needed,
        };
        out.services.insert(
            key,
            ServiceValue {
                service_id,
                maglev_size: size,
                backend_count: backends.len() as u16,
                l7_proxy_port: service.l7_proxy_port.unwrap_or(0),
                flags: if service.l7_proxy_port.is_some() {
                    SVC_F_L7
                } else {
                    0
                },
            },
        );
        if service.l7_proxy_port.is_some() {
            // The proxy balances L7 services; the kernel never picks their backends.
            continue;
        }
        let ids: Vec<u32> = backends
            .iter()
            .map(|addr| {
                let value = BackendValue {
                    addr: be_addr(*addr.ip()),
                    port: addr.port().to_be(),
                    protocol: service.protocol.number(),
                    _pad: 0,
                };
                let id = *backend_id_of.entry(value).or_insert_with(|| {
                    existing
                        .backends
                        .get(&value)
                        .copied()
                        .unwrap_or_else(|| backend_ids.next())
                });
                out.backends.insert(BackendKey { backend_id: id }, value);
                id
            })
            .collect();
        for (slot, index) in maglev::table(&backends, size).into_iter().enumerate() {
            out.maglev.insert(
                MaglevKey {
                    service_id,
                    slot: slot as u32,
                },
                MaglevValue {
                    backend_id: ids[index],
                },
            );
        }
    }
    Ok(())
}

fn policy_key(matched: &PolicyMatch) -> LpmKey<PolicyKeyData> {
    (
        POLICY_PREFIX_BASE + u32::from(matched.l4_prefix_len()),
        PolicyKeyData {
            endpoint_addr: be_addr(matched.endpoint),
            remote_identity: matched.remote_identity,
            egress: match matched.direction {
                Direction::Ingress => DIR_INGRESS,
                Direction::Egress => DIR_EGRESS,
            },
            protocol: matched.protocol,
            dport: matched.port.to_be(),
        },
    )
}

/// An IPv4 address as the kernel keys hold it (network byte order in a native u32).
pub fn be_addr(ip: Ipv4Addr) -> u32 {
    u32::from(ip).to_be()
}

pub fn addr_from_be(addr: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr))
}

/// Hands out the smallest ids (from 1) not taken yet.
struct IdAllocator {
    taken: HashSet<u32>,
    next_candidate: u32,
}

impl IdAllocator {
    fn new(taken: impl Iterator<Item = u32>) -> Self {
        Self {
            taken: taken.collect(),
            next_candidate: 1,
        }
    }

    fn next(&mut self) -> u32 {
        while self.taken.contains(&self.next_candidate) {
            self.next_candidate += 1;
        }
        self.taken.insert(self.next_candidate);
        self.next_candidate
    }
}

/// Writes and removals that turn one map's contents into another's.
#[derive(Debug, Clone, PartialEq)]
pub struct MapDiff<K, V> {
    /// Keys to write: `added` new ones first, then `updated` changed ones.
    pub upserts: Vec<(K, V)>,
    pub added: usize,
    pub removals: Vec<K>,
}

pub fn diff<K: Hash + Eq + Copy + Ord, V: PartialEq + Copy>(
    current: &HashMap<K, V>,
    desired: &HashMap<K, V>,
) -> MapDiff<K, V> {
    let desired_sorted: BTreeMap<&K, &V> = desired.iter().collect();
    let mut added = Vec::new();
    let mut updated = Vec::new();
    for (key, value) in desired_sorted {
        match current.get(key) {
            None => added.push((*key, *value)),
            Some(old) if old != value => updated.push((*key, *value)),
            Some(_) => {}
        }
    }
    let mut removals: Vec<K> = current
        .keys()
        .filter(|k| !desired.contains_key(k))
        .copied()
        .collect();
    removals.sort();
    let added_count = added.len();
    added.extend(updated);
    MapDiff {
        upserts: added,
        added: added_count,
        removals,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, IpcacheEntry, L4Protocol, PolicyEntry, Protocol, Service};

    fn service(vip: [u8; 4], backends: &[[u8; 4]]) -> Service {
        Service {
            vip: Ipv4Addr::from(vip),
            port: 80,
            protocol: L4Protocol::Tcp,
            l7_proxy_port: None,
            backends: backends
                .iter()
                .map(|b| SocketAddrV4::new(Ipv4Addr::from(*b), 8080))
                .collect(),
        }
    }

    #[test]
    fn diff_reports_added_updated_and_removed_keys() {
        let current: HashMap<u32, u32> = [(1, 10), (2, 20), (3, 30)].into();
        let desired: HashMap<u32, u32> = [(2, 20), (3, 31), (4, 40)].into();
        let d = diff(&current, &desired);
        assert_eq!(d.upserts, vec![(4, 40), (3, 31)]);
        assert_eq!(d.added, 1);
        assert_eq!(d.removals, vec![1]);
        assert!(diff(&desired, &desired).upserts.is_empty());
    }

    #[test]
    fn ids_survive_a_replan_and_new_services_take_free_ids() {
        let state = BpfState {
            services: vec![
                service([198, 19, 0, 1], &[[198, 18, 0, 10]]),
                service([198, 19, 0, 2], &[[198, 18, 0, 11]]),
            ],
            ..Default::default()
        };
        let first = plan(&state, &ExistingIds::default()).expect("valid state");
        let existing = ExistingIds::from_maps(&first.services, &first.backends);
        let mut changed = state.clone();
        changed.services.remove(0);
        changed
            .services
            .push(service([198, 19, 0, 3], &[[198, 18, 0, 12]]));
        let second = plan(&changed, &existing).expect("valid state");
        let id_of = |contents: &MapContents, vip: [u8; 4]| {
            contents
                .services
                .iter()
                .find(|(k, _)| k.vip == be_addr(Ipv4Addr::from(vip)))
                .map(|(_, v)| v.service_id)
        };
        assert_eq!(
            id_of(&first, [198, 19, 0, 2]),
            id_of(&second, [198, 19, 0, 2])
        );
        // 198.19.0.1 is gone but its id is still in the kernel until the diff removes it, so the
        // new service does not reuse it within the same reconcile.
        assert_eq!(id_of(&second, [198, 19, 0, 3]), Some(3));
    }

    #[test]
    fn a_maglev_table_keeps_its_size_when_backends_go() {
        let four = BpfState {
            services: vec![service(
                [198, 19, 0, 1],
                &[[198, 18, 0, 10], [198, 18, 0, 11], [198, 18, 0, 12], [198, 18, 0, 13]],
            )],
            ..Default::default()
        };
        let first = plan(&four, &ExistingIds::default()).expect("valid state");
        let two = BpfState {
            services: vec![service(
                [198, 19, 0, 1],
                &[[198, 18, 0, 10], [198, 18, 0, 11]],
            )],
            ..Default::default()
        };
        let second = plan(
            &two,
            &ExistingIds::from_maps(&first.services, &first.backends),
        )
        .expect("valid state");
        let size = |c: &MapContents| c.services.values().next().map(|v| v.maglev_size);
        // Four backends need 61 slots, two only 31: the table stays at 61.
        assert_eq!(size(&first), Some(61));
        assert_eq!(size(&second), Some(61));
        assert_eq!(second.maglev.len(), 61);
    }

    #[test]
    fn a_service_without_backends_has_no_table_and_an_l7_service_keeps_its_vip() {
        let mut l7 = service([198, 19, 0, 2], &[[198, 18, 0, 10]]);
        l7.l7_proxy_port = Some(15001);
        let state = BpfState {
            services: vec![service([198, 19, 0, 1], &[]), l7],
            ..Default::default()
        };
        let contents = plan(&state, &ExistingIds::default()).expect("valid state");
        assert!(contents.maglev.is_empty());
        let l7_value = contents
            .services
            .values()
            .find(|v| v.flags == SVC_F_L7)
            .expect("the L7 service");
        assert_eq!(l7_value.l7_proxy_port, 15001);
        assert!(contents
            .services
            .values()
            .any(|v| v.backend_count == 0 && v.flags == 0));
    }

    #[test]
    fn endpoints_ipcache_and_policy_become_keys() {
        let ip = Ipv4Addr::new(198, 18, 0, 10);
        let state = BpfState {
            endpoints: vec![Endpoint {
                ip,
                identity: 1000,
                ifindex: 7,
                enforce_ingress: true,
                enforce_egress: false,
                policy: vec![PolicyEntry {
                    direction: Direction::Ingress,
                    remote_identity: Some(1001),
                    protocol: Protocol::Tcp,
                    ports: Some(crate::state::PortRange::single(80)),
                    action: PolicyAction::Allow,
                    auth_required: false,
                }],
            }],
            ipcache: vec![IpcacheEntry {
                cidr: "198.18.0.0/24".parse().expect("cidr"),
                identity: 1001,
            }],
            services: vec![],
        };
        let contents = plan(&state, &ExistingIds::default()).expect("valid state");
        assert_eq!(
            contents.endpoints.get(&EndpointKey { addr: be_addr(ip) }),
            Some(&EndpointInfo {
                identity: 1000,
                ifindex: 7,
                flags: EP_F_ENFORCE_INGRESS,
                _pad: 0
            })
        );
        assert_eq!(
            contents
                .ipcache
                .get(&(
                    24,
                    IpcacheKeyData {
                        addr: be_addr(Ipv4Addr::new(198, 18, 0, 0))
                    }
                ))
                .map(|v| v.identity),
            Some(1001)
        );
        let (key, value) = contents.policy.iter().next().expect("one policy entry");
        assert_eq!(key.0, POLICY_PREFIX_BASE + 24);
        assert_eq!(key.1.dport, 80u16.to_be());
        assert_eq!(value.l4_prefixlen, 24);
    }

    #[test]
    fn invalid_states_are_refused() {
        let mut dup = service([198, 19, 0, 1], &[]);
        dup.backends.clear();
        let state = BpfState {
            services: vec![dup.clone(), dup],
            ..Default::default()
        };
        assert!(matches!(
            plan(&state, &ExistingIds::default()),
            Err(StateError::DuplicateService { .. })
        ));
    }
}
