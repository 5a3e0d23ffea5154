//! Endpoint selection (split -> **pick endpoint** -> authorize -> forward): the cluster's lb_policy over usable hosts.
//!
//! Schedules and rings are built once per table swap; a pick is a few atomics and array reads.
//! RING_HASH and MAGLEV both hash the downstream source IP onto one consistent-hash ring
//! (Envoy's default `hash_policy`-less behaviour would be random; hashing the source gives
//! clients sticky backends, which is what users of these policies ask for).

use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::tables::LbPolicy;

/// The longest precomputed round-robin schedule; larger weight sums are scaled down.
const MAX_SCHEDULE_LEN: u64 = 4096;
/// Envoy's `minimum_ring_size` default.
const MIN_RING_SIZE: u64 = 1024;

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
    /// Points sorted by hash, each naming a host index.
    Ring { ring: Box<[(u64, u32)]> },
}

/// What a pick may depend on besides the hosts themselves.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PickInput {
    pub random: u64,
    pub source: IpAddr,
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
            LbPolicy::RingHash | LbPolicy::Maglev => Strategy::Ring { ring: hash_ring(endpoints) },
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
                let point = hash_of(&input.source);
                let start = ring.partition_point(|&(hash, _)| hash < point);
                (0..ring.len())
                    .map(|step| ring[(start + step) % ring.len()].1 as usize)
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

fn hash_ring(endpoints: &[(SocketAddr, u32)]) -> Box<[(u64, u32)]> {
    let total_weight: u64 = endpoints.iter().map(|(_, w)| u64::from((*w).max(1))).sum::<u64>().max(1);
    let points_per_weight = MIN_RING_SIZE.div_ceil(total_weight);
    let mut ring: Vec<(u64, u32)> = endpoints
        .iter()
        .enumerate()
        .flat_map(|(index, (addr, weight))| {
            (0..u64::from((*weight).max(1)) * points_per_weight).map(move |replica| (hash_of(&(addr, replica)), index as u32))
        })
        .collect();
    ring.sort_unstable();
    ring.into_boxed_slice()
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// Stable within the process (SipHash with fixed keys), which is all a ring needs.
fn hash_of(value: &impl Hash) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
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
        PickInput { random, source: IpAddr::from([127, 0, 0, 1]) }
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

    #[test]
    fn ring_hash_is_sticky_per_source() {
        let balancer = Balancer::new(LbPolicy::RingHash, &endpoints(&[1, 1, 1, 1]));
        let pick = |source: [u8; 4]| {
            balancer.pick(4, PickInput { random: 0, source: IpAddr::from(source) }, |_| true, |_| 0).unwrap()
        };
        let sources: Vec<[u8; 4]> = (1..=40).map(|i| [127, 0, 0, i]).collect();
        let first: Vec<usize> = sources.iter().map(|s| pick(*s)).collect();
        let second: Vec<usize> = sources.iter().map(|s| pick(*s)).collect();
        assert_eq!(first, second);
        let distinct: std::collections::BTreeSet<_> = first.iter().collect();
        assert!(distinct.len() > 1, "40 sources all hashed to one host");
    }

    #[test]
    fn random_respects_weights_with_zero_share_for_unusable() {
        let balancer = Balancer::new(LbPolicy::Random, &endpoints(&[1, 3]));
        let picks: Vec<usize> = (0..4).map(|r| balancer.pick(2, input(r), |_| true, |_| 0).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 1, 1]);
        assert_eq!(balancer.pick(2, input(0), |i| i == 1, |_| 0), Some(1));
    }
}
