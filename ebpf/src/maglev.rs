//! compile (pure): Maglev lookup tables (Eisenbud et al., NSDI '16) for socket load balancing.
//! The kernel picks `table[hash(socket cookie) % M]`; removing a backend moves only the slots
//! that pointed to it (plus a small fraction), so most connections keep their backend.

use std::net::SocketAddrV4;

/// Table sizes (primes). Socket LB picks a backend once per connect, so a table size only has to
/// keep new connections evenly spread (Maglev gives every backend ⌊M/N⌋ or ⌈M/N⌉ slots);
/// established connections never move. M ≥ 10·N keeps the spread within 10% while 100k
/// two-backend Services (31 slots each) fit the 4M-slot map; Cilium's M > 100·N targets
/// per-packet N-S balancing, which sluice does not do. The largest table bounds memory per
/// service.
const TABLE_SIZES: [u32; 10] = [31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381];
const SLOTS_PER_BACKEND: u64 = 10;

/// M for a service with `backends` backends (0 for none).
pub fn table_size(backends: usize) -> u32 {
    match backends {
        0 => 0,
        1 => 1,
        n => TABLE_SIZES
            .iter()
            .copied()
            .find(|&m| u64::from(m) >= SLOTS_PER_BACKEND * n as u64)
            .unwrap_or(TABLE_SIZES[TABLE_SIZES.len() - 1]),
    }
}

/// The Maglev table of size `size`: each slot holds an index into `backends`. Backends are
/// identified by their address, so the table depends only on the set of backends (not their
/// order) and is the same after an agent restart.
pub fn table(backends: &[SocketAddrV4], size: u32) -> Vec<usize> {
    if backends.is_empty() || size == 0 {
        return Vec::new();
    }
    let m = u64::from(size);
    let mut order: Vec<usize> = (0..backends.len()).collect();
    order.sort_by_key(|&i| backends[i]);
    let permutations: Vec<(u64, u64)> = order
        .iter()
        .map(|&i| {
            let name = backends[i].to_string();
            let offset = fnv1a64(name.as_bytes(), OFFSET_SEED) % m;
            let skip = if m == 1 {
                1
            } else {
                fnv1a64(name.as_bytes(), SKIP_SEED) % (m - 1) + 1
            };
            (offset, skip)
        })
        .collect();
    let mut next = vec![0u64; order.len()];
    let mut slots: Vec<Option<usize>> = vec![None; size as usize];
    let mut filled = 0usize;
    'fill: loop {
        for (turn, &(offset, skip)) in permutations.iter().enumerate() {
            let mut candidate = ((offset + next[turn] * skip) % m) as usize;
            while slots[candidate].is_some() {
                next[turn] += 1;
                candidate = ((offset + next[turn] * skip) % m) as usize;
            }
            slots[candidate] = Some(order[turn]);
            next[turn] += 1;
            filled += 1;
            if filled == slots.len() {
                break 'fill;
            }
        }
    }
    slots.into_iter().map(|slot| slot.unwrap_or(0)).collect()
}

const OFFSET_SEED: u64 = 0xcbf2_9ce4_8422_2325;
const SKIP_SEED: u64 = 0x8422_2325_cbf2_9ce4;

/// FNV-1a: a hash that is stable across processes and Rust versions (std's hasher is not), so a
/// restarted agent computes the same table and established sockets keep their backend.
fn fnv1a64(bytes: &[u8], seed: u64) -> u64 {
    bytes.iter().fold(seed, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn backends(n: u8) -> Vec<SocketAddrV4> {
        (1..=n)
            .map(|i| SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, i), 8080))
            .collect()
    }

    #[test]
    fn sizes_grow_with_backends_and_are_prime() {
        assert_eq!(table_size(0), 0);
        assert_eq!(table_size(1), 1);
        assert_eq!(table_size(2), 31);
        assert_eq!(table_size(3), 31);
        assert_eq!(table_size(4), 61);
        assert_eq!(table_size(100), 1021);
        assert_eq!(table_size(1000), 16381);
        // 100k Services of two backends fit the kernel's 4M-slot Maglev map.
        assert!(100_000 * u64::from(table_size(2)) <= 4 * 1024 * 1024);
        for m in TABLE_SIZES {
            assert!(
                (2..m).take_while(|d| d * d <= m).all(|d| m % d != 0),
                "{m} is prime"
            );
        }
    }

    #[test]
    fn every_backend_gets_an_even_share() {
        for n in [2u8, 3, 7, 10, 33] {
            let list = backends(n);
            let size = table_size(list.len());
            let table = table(&list, size);
            let mut counts = vec![0usize; list.len()];
            for &slot in &table {
                counts[slot] += 1;
            }
            let (min, max) = (counts.iter().min().copied(), counts.iter().max().copied());
            assert!(
                min.zip(max).is_some_and(|(lo, hi)| hi - lo <= 1),
                "n={n} counts={counts:?}"
            );
        }
    }

    #[test]
    fn removing_a_backend_keeps_most_other_slots() {
        let list = backends(10);
        let size = table_size(list.len());
        let before: Vec<SocketAddrV4> = table(&list, size).into_iter().map(|i| list[i]).collect();
        let removed = list[3];
        let remaining: Vec<SocketAddrV4> = list.iter().copied().filter(|b| *b != removed).collect();
        let after: Vec<SocketAddrV4> = table(&remaining, size)
            .into_iter()
            .map(|i| remaining[i])
            .collect();
        assert!(after.iter().all(|b| *b != removed));
        let kept_slots = before.iter().filter(|b| **b != removed).count();
        let unchanged = before
            .iter()
            .zip(&after)
            .filter(|(b, a)| **b != removed && b == a)
            .count();
        // Maglev's bound: only a small fraction of the surviving backends' slots move.
        assert!(
            unchanged * 100 >= kept_slots * 90,
            "{unchanged} of {kept_slots} kept"
        );
    }

    #[test]
    fn the_table_does_not_depend_on_backend_order() {
        let list = backends(5);
        let mut reversed = list.clone();
        reversed.reverse();
        let size = table_size(5);
        let a: Vec<SocketAddrV4> = table(&list, size).into_iter().map(|i| list[i]).collect();
        let b: Vec<SocketAddrV4> = table(&reversed, size)
            .into_iter()
            .map(|i| reversed[i])
            .collect();
        assert_eq!(a, b);
    }
}
