//! Weighted clusters (canary splits) and lb policies measured over thousands of real requests.

mod common;

use std::net::IpAddr;

use common::*;
use http::StatusCode;
use sluice_proxy::tables::LbPolicy;

async fn count_backends(client_ip: IpAddr, addr: std::net::SocketAddr, requests: usize) -> std::collections::BTreeMap<String, usize> {
    let client = pooled_client(client_ip);
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..requests {
        let response = client.get(format!("http://{addr}/").parse().unwrap()).await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let backend = response.headers()["x-backend"].to_str().unwrap().to_owned();
        *counts.entry(backend).or_insert(0) += 1;
    }
    counts
}

/// 90/10 over 5000 requests; tolerance ±3 percentage points (the binomial standard deviation
/// is 0.42 points, so this fails only on a real bias).
#[tokio::test]
async fn weighted_clusters_split_90_10_within_3_points() {
    let stable = Backend::echo("stable").await;
    let canary = Backend::echo("canary").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(tables(
        1,
        hcm(vec![prefix_route("/", to_clusters(&[("stable", 90), ("canary", 10)]))]),
        vec![cluster("stable", &[stable.addr]), cluster("canary", &[canary.addr])],
    ));
    let counts = count_backends(IpAddr::from([127, 0, 0, 1]), addr, 5000).await;
    let canary_share = counts.get("canary").copied().unwrap_or(0) as f64 / 5000.0 * 100.0;
    assert!((7.0..=13.0).contains(&canary_share), "canary got {canary_share:.2}% ({counts:?})");
    assert_eq!(counts.values().sum::<usize>(), 5000);
}

#[tokio::test]
async fn round_robin_spreads_evenly_and_zero_weight_cluster_gets_nothing() {
    let a = Backend::echo("a").await;
    let b = Backend::echo("b").await;
    let unused = Backend::echo("unused").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(tables(
        1,
        hcm(vec![prefix_route("/", to_clusters(&[("never", 0), ("pair", 1)]))]),
        vec![cluster("pair", &[a.addr, b.addr]), cluster("never", &[unused.addr])],
    ));
    let counts = count_backends(IpAddr::from([127, 0, 0, 1]), addr, 1000).await;
    assert_eq!(counts.get("a"), Some(&500), "{counts:?}");
    assert_eq!(counts.get("b"), Some(&500), "{counts:?}");
    assert_eq!(unused.hits(), 0);
    // Keep-alive pooling: a thousand sequential requests reuse a handful of connections.
    let open = proxy.handle.stats().clusters["pair"].upstream_cx_active;
    assert!((2..=10).contains(&open), "{open} upstream connections for 1000 requests");
}

/// Each client (source IP) sticks to one backend; the clients spread over the backends.
async fn hashing_keeps_each_client_on_one_backend(policy: LbPolicy) {
    let backends = [Backend::echo("a").await, Backend::echo("b").await, Backend::echo("c").await];
    let proxy = Proxy::start();
    let mut hashed = cluster("hashed", &backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    hashed.lb_policy = policy;
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("hashed"))]), vec![hashed]));
    let mut chosen = std::collections::BTreeSet::new();
    for last_octet in 40..60u8 {
        let counts = count_backends(IpAddr::from([127, 0, 0, last_octet]), addr, 20).await;
        assert_eq!(counts.len(), 1, "client .{last_octet} was spread over {counts:?}");
        chosen.extend(counts.into_keys());
    }
    assert!(chosen.len() > 1, "20 clients all hashed to {chosen:?}");
}

#[tokio::test]
async fn ring_hash_keeps_each_client_on_one_backend() {
    hashing_keeps_each_client_on_one_backend(LbPolicy::RingHash { minimum_ring_size: 1024, maximum_ring_size: 8 << 20 }).await;
}

#[tokio::test]
async fn maglev_keeps_each_client_on_one_backend() {
    hashing_keeps_each_client_on_one_backend(LbPolicy::Maglev { table_size: 65537 }).await;
}

#[tokio::test]
async fn least_request_avoids_the_busy_backend() {
    use std::time::Duration;
    let (slow, release) = gated("slow").await;
    let fast = Backend::echo("fast").await;
    let proxy = Proxy::start();
    let mut least = cluster("least", &[slow.addr, fast.addr]);
    least.lb_policy = LbPolicy::LeastRequest { choice_count: 2 };
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("least"))]), vec![least]));

    // Park requests until the slow backend holds some.
    let client = pooled_client(IpAddr::from([127, 0, 0, 1]));
    let mut parked = Vec::new();
    while slow.hits() < 3 {
        let client = client.clone();
        parked.push(tokio::spawn(async move { client.get(format!("http://{addr}/").parse().unwrap()).await }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fast_before = fast.hits();
    let slow_before = slow.hits();
    // With 3+ requests active on `slow`, P2C sends every request whose two choices differ to
    // `fast`; when both choices are `slow` the request parks too, so count only what completes.
    for _ in 0..50 {
        let client = client.clone();
        let response = tokio::time::timeout(Duration::from_millis(500), client.get(format!("http://{addr}/").parse().unwrap())).await;
        if let Ok(Ok(response)) = response {
            assert_eq!(response.headers()["x-backend"], "fast");
        }
    }
    assert!(fast.hits() - fast_before >= 20, "fast got {} of 50", fast.hits() - fast_before);
    assert!(slow.hits() - slow_before <= 30);
    release.send(true).unwrap();
    for request in parked {
        let _ = request.await;
    }
}
