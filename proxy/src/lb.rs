//! Endpoint selection (split -> **pick endpoint** -> authorize -> forward): the cluster's lb_policy over usable hosts.
//!
//! Schedules, rings and tables are built once per table swap; a pick is a few atomics and array
//! reads. RING_HASH and MAGLEV place hosts as Envoy does (xxHash64 of `ip:port`), so a key lands
//! on the same backend as in an Envoy with the same endpoints. There is no `hash_policy`
//! support yet: the key is always the downstream source IP, which is Envoy's
//! `hash_policy: [{connection_properties: {source_ip: true}}]` (without a hash policy Envoy
//! picks at random). When the host a key maps to is not usable (ejected, or already tried by
//! a retry), the next entries of the ring or table are tried in order; Envoy rebuilds its table
//! without the host instead, which moves the same keys to a different, equally spread set of
//! hosts.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use xxhash_rust::xxh64::xxh64;

use crate::tables::LbPolicy;

/// The longest precomputed round-robin schedule; larger weight sums are scaled down.
const MAX_SCHEDULE_LEN: u64 = 4096;

#[derive(Debug)]
pub(crate) struct Balancer {
    strategy: Strategy,
    cursor: AtomicUsize,
}

#[derive(Debug)]
enum Strategy {
    /// Host indexes in smooth weighted round-robin order (plain `0..n` when weights are equal).
    RoundRobin { schedule: Box<[u32]> },
    /// Power of `choices` random choices on active requests.
    LeastRequest { choices: u32 },
    /// Weighted random: cumulative weights.
    Random { cumulative: Box<[u64]> },
    /// Ketama ring: points sorted by hash, each naming a host index.
    Ring { ring: Box<[(u64, u32)]> },
    /// Maglev lookup table: slot -> host index.
    Maglev { table: Box<[u32]> },
}

/// What a pick may depend on besides the hosts themselves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PickInput {
    pub random: u64,
    pub source: IpAddr,
    /// Where the client connected before the kernel redirected it (transparent listeners):
    /// the one host of an ORIGINAL_DST cluster.
    pub original_destination: Option<SocketAddr>,
}

impl Balancer {
    pub fn new(policy: LbPolicy, endpoints: &[(SocketAddr, u32)]) -> Self {
        let strategy = match policy {
            LbPolicy::RoundRobin => Strategy::RoundRobin { schedule: round_robin_schedule(endpoints) },
            LbPolicy::LeastRequest { choice_count } => Strategy::LeastRequest { choices: choice_count.max(1) },
            LbPolicy::Random => Strategy::Random {
                cumulative: endpoints
                    .iter()
                    .scan(0u64, |sum, (_, weight)| {
                        *sum += u64::from((*weight).max(1));
                        Some(*sum)
                    })
                    .collect(),
            },
            LbPolicy::RingHash { minimum_ring_size, maximum_ring_size } => {
                Strategy::Ring { ring: ketama_ring(endpoints, minimum_ring_size, maximum_ring_size) }
            }
            LbPolicy::Maglev { table_size } => Strategy::Maglev { table: maglev_table(endpoints, table_size) },
            // Its host comes from the downstream connection (`ClusterState::pick`), never from
            // a schedule: the cluster has no endpoints to balance.
            LbPolicy::OriginalDestination => Strategy::RoundRobin { schedule: Box::default() },
        };
        Self { strategy, cursor: AtomicUsize::new(0) }
    }

    /// Picks a host index among `0..len` for which `usable` holds. `load` gives a host's active
    /// requests (LEAST_REQUEST only). `None` when no host is usable.
    pub fn pick(
        &self,
        len: usize,
        input: PickInput,
        usable: impl Fn(usize) -> bool,
        load: impl Fn(usize) -> u64,
    ) -> Option<usize> {
        if len == 0 {
            return None;
        }
        match &self.strategy {
            Strategy::RoundRobin { schedule } => {
                let start = self.cursor.fetch_add(1, Ordering::Relaxed);
                (0..schedule.len())
                    .map(|step| schedule[(start + step) % schedule.len()] as usize)
                    .find(|&index| index < len && usable(index))
            }
            Strategy::LeastRequest { choices } => {
                let mut random = input.random;
                let mut best: Option<usize> = None;
                for _ in 0..*choices {
                    let index = (random % len as u64) as usize;
                    random = splitmix(random);
                    if usable(index) && best.is_none_or(|b| load(index) < load(b)) {
                        best = Some(index);
                    }
                }
                best.or_else(|| scan_from((input.random % len as u64) as usize, len, &usable))
            }
            Strategy::Random { cumulative } => {
                let total = cumulative.last().copied().unwrap_or(0).max(1);
                let point = input.random % total;
                let index = cumulative.partition_point(|&sum| sum <= point);
                scan_from(index.min(len - 1), len, &usable)
            }
            Strategy::Ring { ring } => {
                let point = source_hash(input.source);
                // Ketama: the first point at or after the key's hash, wrapping around.
                let start = ring.partition_point(|&(hash, _)| hash < point);
                (0..ring.len())
                    .map(|step| ring[(start + step) % ring.len()].1 as usize)
                    .find(|&index| index < len && usable(index))
            }
            Strategy::Maglev { table } => {
                let start = (source_hash(input.source) % table.len().max(1) as u64) as usize;
                (0..table.len())
                    .map(|step| table[(start + step) % table.len()] as usize)
                    .find(|&index| index < len && usable(index))
            }
        }
    }
}

fn scan_from(start: usize, len: usize, usable: &impl Fn(usize) -> bool) -> Option<usize> {
    (0..len).map(|step| (start + step) % len).find(|&index| usable(index))
}

/// Smooth weighted round robin (nginx): spreads heavy hosts through the cycle instead of
/// sending them bursts.
fn round_robin_schedule(endpoints: &[(SocketAddr, u32)]) -> Box<[u32]> {
    let weights: Vec<u64> = endpoints.iter().map(|(_, weight)| u64::from((*weight).max(1))).collect();
    if weights.windows(2).all(|pair| pair[0] == pair[1]) {
        return (0..endpoints.len() as u32).collect();
    }
    let divisor = weights.iter().copied().fold(0, gcd).max(1);
    let mut weights: Vec<u64> = weights.iter().map(|w| w / divisor).collect();
    let sum: u64 = weights.iter().sum();
    if sum > MAX_SCHEDULE_LEN {
        weights.iter_mut().for_each(|w| *w = (*w * MAX_SCHEDULE_LEN / sum).max(1));
    }
    let total: i64 = weights.iter().map(|&w| w as i64).sum();
    let mut current = vec![0i64; weights.len()];
    (0..total)
        .map(|_| {
            for (c, w) in current.iter_mut().zip(&weights) {
                *c += *w as i64;
            }
            let (best, _) = current.iter().enumerate().max_by_key(|&(i, c)| (*c, std::cmp::Reverse(i))).unwrap_or((0, &0));
            current[best] -= total;
            best as u32
        })
        .collect()
}

/// Envoy's ring: the least-weighted host gets `ceil(min_weight x minimum_ring_size)` points
/// (scaled down to `maximum_ring_size`), the others proportionally more; point `i` of a host
/// is xxHash64 of `"<ip:port>_<i>"`.
fn ketama_ring(endpoints: &[(SocketAddr, u32)], minimum_ring_size: u64, maximum_ring_size: u64) -> Box<[(u64, u32)]> {
    let total: f64 = endpoints.iter().map(|(_, w)| f64::from((*w).max(1))).sum();
    let Some(min_weight) = endpoints.iter().map(|(_, w)| f64::from((*w).max(1)) / total).reduce(f64::min) else {
        return Box::new([]);
    };
    let scale = ((min_weight * minimum_ring_size as f64).ceil() / min_weight).min(maximum_ring_size as f64);
    let mut ring = Vec::with_capacity(scale.ceil() as usize);
    let (mut current, mut target) = (0.0f64, 0.0f64);
    let mut key = String::new();
    for (index, (addr, weight)) in endpoints.iter().enumerate() {
        target += scale * f64::from((*weight).max(1)) / total;
        let mut point = 0u64;
        while current < target {
            key.clear();
            let _ = write!(key, "{addr}_{point}");
            ring.push((xxh64(key.as_bytes(), 0), index as u32));
            point += 1;
            current += 1.0;
        }
    }
    ring.sort_unstable();
    ring.into_boxed_slice()
}

/// Envoy's Maglev table (the paper's listing 1 with weights): hosts in the order of their
/// `ip:port` text take turns claiming their next preferred free slot; a host of weight w claims
/// on w/max_weight of the turns. `table_size` is a prime (the model checks it).
fn maglev_table(endpoints: &[(SocketAddr, u32)], table_size: u64) -> Box<[u32]> {
    struct Entry {
        host: u32,
        offset: u64,
        skip: u64,
        weight: f64,
        target: f64,
        next: u64,
    }
    if endpoints.is_empty() || table_size < 2 {
        return Box::new([]);
    }
    let max_weight = endpoints.iter().map(|(_, w)| (*w).max(1)).max().map_or(1.0, f64::from);
    let mut entries: Vec<(String, Entry)> = endpoints
        .iter()
        .enumerate()
        .map(|(index, (addr, weight))| {
            let key = addr.to_string();
            let entry = Entry {
                host: index as u32,
                offset: xxh64(key.as_bytes(), 0) % table_size,
                skip: xxh64(key.as_bytes(), 1) % (table_size - 1) + 1,
                weight: f64::from((*weight).max(1)),
                target: 0.0,
                next: 0,
            };
            (key, entry)
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let size = table_size as usize;
    let mut table = vec![u32::MAX; size];
    let mut filled = 0usize;
    let mut iteration = 1.0f64;
    while filled < size {
        for (_, entry) in entries.iter_mut() {
            if filled == size {
                break;
            }
            if iteration * entry.weight < entry.target {
                continue;
            }
            entry.target += max_weight;
            let mut slot = ((entry.offset + entry.skip * entry.next) % table_size) as usize;
            while table[slot] != u32::MAX {
                entry.next += 1;
                slot = ((entry.offset + entry.skip * entry.next) % table_size) as usize;
            }
            table[slot] = entry.host;
            entry.next += 1;
            filled += 1;
        }
        iteration += 1.0;
    }
    table.into_boxed_slice()
}

/// xxHash64 of the source IP's text, as Envoy's `source_ip` hash policy computes it. Formatted
/// on the stack: this runs on every pick of a hashing cluster.
fn source_hash(source: IpAddr) -> u64 {
    let mut text = StackText { bytes: [0; 48], len: 0 };
    let _ = write!(text, "{source}");
    xxh64(text.as_bytes(), 0)
}

/// Room for the longest IPv6 text (45 bytes).
struct StackText {
    bytes: [u8; 48],
    len: usize,
}

impl StackText {
    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl std::fmt::Write for StackText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        self.bytes.get_mut(self.len..end).ok_or(std::fmt::Error)?.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Derives further random values from one draw (splitmix64 step).
pub(crate) fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(weights: &[u32]) -> Vec<(SocketAddr, u32)> {
        weights.iter().enumerate().map(|(i, w)| (SocketAddr::from(([10, 0, 0, i as u8], 80)), *w)).collect()
    }

    fn input(random: u64) -> PickInput {
        PickInput { random, source: IpAddr::from([127, 0, 0, 1]), original_destination: None }
    }

    #[test]
    fn weighted_round_robin_follows_weights_and_interleaves() {
        let balancer = Balancer::new(LbPolicy::RoundRobin, &endpoints(&[3, 1]));
        let picks: Vec<usize> = (0..8).map(|_| balancer.pick(2, input(0), |_| true, |_| 0).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6);
        assert!(!picks.windows(4).any(|w| w.iter().all(|&i| i == 0)), "heavy host is not sent bursts: {picks:?}");
    }

    #[test]
    fn round_robin_skips_unusable_hosts() {
        let balancer = Balancer::new(LbPolicy::RoundRobin, &endpoints(&[1, 1, 1]));
        for _ in 0..6 {
            assert_ne!(balancer.pick(3, input(0), |i| i != 1, |_| 0), Some(1));
        }
        assert_eq!(balancer.pick(3, input(0), |_| false, |_| 0), None);
    }

    #[test]
    fn least_request_prefers_the_idle_host() {
        let balancer = Balancer::new(LbPolicy::LeastRequest { choice_count: 2 }, &endpoints(&[1, 1]));
        let load = |i: usize| if i == 0 { 10 } else { 0 };
        // Whenever the two choices differ, the idle host must win.
        for random in 0..64u64 {
            let first = (random % 2) as usize;
            let second = (splitmix(random) % 2) as usize;
            let picked = balancer.pick(2, input(random), |_| true, load).unwrap();
            if first != second {
                assert_eq!(picked, 1);
            }
        }
    }

    const RING: LbPolicy = LbPolicy::RingHash { minimum_ring_size: 1024, maximum_ring_size: 8 * 1024 * 1024 };
    const MAGLEV: LbPolicy = LbPolicy::Maglev { table_size: 65537 };

    fn source(i: u32) -> IpAddr {
        IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000u32 + i))
    }

    /// The address each of `keys` sources lands on.
    fn assignments(policy: LbPolicy, hosts: &[(SocketAddr, u32)], keys: u32) -> Vec<SocketAddr> {
        let balancer = Balancer::new(policy, hosts);
        (0..keys)
            .map(|i| {
                let picked = balancer.pick(hosts.len(), PickInput { random: 0, source: source(i), original_destination: None }, |_| true, |_| 0);
                hosts[picked.unwrap()].0
            })
            .collect()
    }

    fn shares(assigned: &[SocketAddr], hosts: &[(SocketAddr, u32)]) -> Vec<f64> {
        hosts.iter().map(|(addr, _)| assigned.iter().filter(|a| *a == addr).count() as f64 / assigned.len() as f64).collect()
    }

    #[test]
    fn hashing_policies_are_sticky_per_source() {
        for policy in [RING, MAGLEV] {
            let hosts = endpoints(&[1, 1, 1, 1]);
            let first = assignments(policy, &hosts, 200);
            assert_eq!(first, assignments(policy, &hosts, 200), "{policy:?}: same table, same picks");
            let distinct: std::collections::BTreeSet<_> = first.iter().collect();
            assert_eq!(distinct.len(), 4, "{policy:?}: 200 sources reach every host");
        }
    }

    #[test]
    fn maglev_table_gives_each_host_slots_in_proportion_to_its_weight() {
        for weights in [[1u32, 1, 1, 1], [1, 2, 3, 4]] {
            let table = maglev_table(&endpoints(&weights), 65537);
            assert_eq!(table.len(), 65537);
            let total: u32 = weights.iter().sum();
            for (host, weight) in weights.iter().enumerate() {
                let slots = table.iter().filter(|&&h| h as usize == host).count() as f64;
                let expected = 65537.0 * f64::from(*weight) / f64::from(total);
                assert!((slots - expected).abs() / expected < 0.01, "weights {weights:?} host {host}: {slots} slots, expected {expected}");
            }
        }
    }

    #[test]
    fn maglev_spreads_sources_within_five_percent_of_the_weights() {
        let hosts = endpoints(&[1, 1, 2, 4]);
        let shares = shares(&assignments(MAGLEV, &hosts, 20_000), &hosts);
        for (share, expected) in shares.iter().zip([0.125, 0.125, 0.25, 0.5]) {
            assert!((share - expected).abs() < 0.05 * expected.max(0.2), "shares {shares:?}");
        }
    }

    #[test]
    fn ring_hash_spreads_sources_within_a_fifth_of_the_weights() {
        // 1024 points for 4 hosts leave arcs of uneven length: Envoy documents the same skew.
        for weights in [[1u32, 1, 1, 1], [1, 1, 1, 3]] {
            let hosts = endpoints(&weights);
            let shares = shares(&assignments(RING, &hosts, 20_000), &hosts);
            let total: u32 = weights.iter().sum();
            for (share, weight) in shares.iter().zip(weights) {
                let expected = f64::from(weight) / f64::from(total);
                assert!((share - expected).abs() < 0.2 * expected, "weights {weights:?}: shares {shares:?}");
            }
        }
    }

    #[test]
    fn ring_has_at_least_minimum_ring_size_points_split_by_weight() {
        let split = |ring: &[(u64, u32)]| {
            let light = ring.iter().filter(|(_, host)| *host == 0).count();
            (light, ring.len() - light)
        };
        assert_eq!(split(&ketama_ring(&endpoints(&[1, 3]), 1024, 8 * 1024 * 1024)), (256, 768));
        // The lightest host gets a whole number of points: ceil(1024 / 3) x 3 in all.
        assert_eq!(split(&ketama_ring(&endpoints(&[1, 1, 1]), 1024, 8 * 1024 * 1024)), (342, 684));
        assert_eq!(split(&ketama_ring(&endpoints(&[1, 3]), 1024, 512)), (128, 384));
    }

    /// Removing one of ten hosts moves that host's keys and few others: Maglev about 0.2%; the
    /// ring about 8%, because a rebuilt ring gives each of the 9 hosts 114 points instead of
    /// 103 (Envoy's sizing), and the new points take keys from their neighbours.
    #[test]
    fn removing_a_backend_moves_few_other_keys() {
        let hosts = endpoints(&[1; 10]);
        let removed = hosts[3].0;
        let remaining: Vec<_> = hosts.iter().copied().filter(|(addr, _)| *addr != removed).collect();
        for (policy, tolerance) in [(RING, 0.10), (MAGLEV, 0.01)] {
            let before = assignments(policy, &hosts, 20_000);
            let after = assignments(policy, &remaining, 20_000);
            let kept: Vec<(SocketAddr, SocketAddr)> =
                before.into_iter().zip(after).filter(|(b, _)| *b != removed).collect();
            let moved = kept.iter().filter(|(b, a)| b != a).count() as f64 / kept.len() as f64;
            assert!(moved <= tolerance, "{policy:?}: {:.2}% of the surviving hosts' keys moved", moved * 100.0);
        }
    }

    #[test]
    fn an_unusable_host_sends_its_keys_to_the_others_and_only_its_keys() {
        for policy in [RING, MAGLEV] {
            let hosts = endpoints(&[1, 1, 1, 1]);
            let balancer = Balancer::new(policy, &hosts);
            for i in 0..500 {
                let input = PickInput { random: 0, source: source(i), original_destination: None };
                let free = balancer.pick(4, input, |_| true, |_| 0).unwrap();
                let without_host_0 = balancer.pick(4, input, |h| h != 0, |_| 0).unwrap();
                assert_ne!(without_host_0, 0);
                if free != 0 {
                    assert_eq!(without_host_0, free, "{policy:?}: a key of a usable host stays");
                }
            }
        }
    }

    #[test]
    fn random_respects_weights_with_zero_share_for_unusable() {
        let balancer = Balancer::new(LbPolicy::Random, &endpoints(&[1, 3]));
        let picks: Vec<usize> = (0..4).map(|r| balancer.pick(2, input(r), |_| true, |_| 0).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 1, 1]);
        assert_eq!(balancer.pick(2, input(0), |i| i == 1, |_| 0), Some(1));
    }
}
