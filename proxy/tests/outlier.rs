//! Outlier detection on Envoy's interval timer, under paused time: success-rate and
//! failure-percentage ejection at the sweep, `max_ejection_percent` as Envoy computes it, and
//! ejection lengths that grow on quick re-ejection and decay while a host stays healthy.

mod common;

use std::time::Duration;

use common::*;
use http::StatusCode;
use sluice_proxy::tables::OutlierDetection;
use sluice_proxy::ClusterStats;
use tokio::time::Instant;

/// Fails every other request (503), starting with the first.
async fn half_failing() -> Backend {
    Backend::start("half", |index, _| {
        Box::pin(async move {
            if index % 2 == 0 { reply(StatusCode::SERVICE_UNAVAILABLE, "half") } else { reply(StatusCode::OK, "half") }
        })
    })
    .await
}

async fn always(status: StatusCode, name: &'static str) -> Backend {
    Backend::start(name, move |_, _| Box::pin(async move { reply(status, name) })).await
}

/// A round-robin cluster `svc` over `backends` with `detection`; returns the listener address.
fn serve(proxy: &Proxy, backends: &[&Backend], detection: OutlierDetection) -> std::net::SocketAddr {
    let mut svc = cluster("svc", &backends.iter().map(|b| b.addr).collect::<Vec<_>>());
    svc.outlier_detection = Some(detection);
    proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("svc"))]), vec![svc]))
}

async fn send(addr: std::net::SocketAddr, requests: usize) {
    for _ in 0..requests {
        get(addr, "/").await;
    }
}

fn stats(proxy: &Proxy) -> ClusterStats {
    proxy.handle.stats().clusters["svc"]
}

/// Four healthy hosts and one that fails half its requests (never 5 in a row), 20 requests each.
async fn success_rate_scenario(max_ejection_percent: u32) -> (Proxy, Backend, Vec<Backend>, std::net::SocketAddr) {
    let bad = half_failing().await;
    let mut good = Vec::new();
    for name in ["g1", "g2", "g3", "g4"] {
        good.push(Backend::echo(name).await);
    }
    let proxy = Proxy::start_here();
    let detection = OutlierDetection { success_rate_request_volume: 20, max_ejection_percent, ..OutlierDetection::default() };
    let mut hosts: Vec<&Backend> = good.iter().collect();
    hosts.push(&bad);
    let addr = serve(&proxy, &hosts, detection);
    send(addr, 100).await;
    assert_eq!(bad.hits(), 20);
    assert_eq!(stats(&proxy).ejections_active, 0, "consecutive 5xx never reached 5");
    (proxy, bad, good, addr)
}

#[tokio::test(start_paused = true)]
async fn success_rate_ejects_the_outlier_at_the_next_sweep() {
    let (proxy, bad, good, addr) = success_rate_scenario(20).await;
    // Rates {50, 100, 100, 100, 100}: mean 90, stdev 20, threshold 90 - 1.9 x 20 = 52.
    tokio::time::sleep(Duration::from_millis(10_001)).await;
    let after_sweep = stats(&proxy);
    assert_eq!((after_sweep.ejections_active, after_sweep.ejections_enforced_success_rate), (1, 1));
    send(addr, 40).await;
    assert_eq!(bad.hits(), 20, "the ejected host gets nothing");
    assert_eq!(good.iter().map(Backend::hits).sum::<usize>(), 80 + 40);
}

#[tokio::test(start_paused = true)]
async fn max_ejection_percent_is_envoys_share_of_all_hosts() {
    // Envoy's default 10%: ejecting 1 of 5 hosts would be 20% > 10%, so the outlier stays.
    let (proxy, bad, _good, addr) = success_rate_scenario(10).await;
    tokio::time::sleep(Duration::from_millis(10_001)).await;
    let after_sweep = stats(&proxy);
    assert_eq!((after_sweep.ejections_active, after_sweep.ejections_overflow), (0, 1));
    send(addr, 5).await;
    assert_eq!(bad.hits(), 21);
}

#[tokio::test(start_paused = true)]
async fn failure_percentage_ejects_a_host_that_fails_too_often() {
    let bad = always(StatusCode::INTERNAL_SERVER_ERROR, "bad").await;
    let good = Backend::echo("good").await;
    let proxy = Proxy::start_here();
    let detection = OutlierDetection {
        // Detected but not enforced: only the failure percentage may eject here.
        enforcing_consecutive_5xx: 0,
        enforcing_failure_percentage: 100,
        failure_percentage_minimum_hosts: 2,
        failure_percentage_request_volume: 10,
        max_ejection_percent: 50,
        ..OutlierDetection::default()
    };
    let addr = serve(&proxy, &[&bad, &good], detection);
    send(addr, 20).await;
    assert_eq!((bad.hits(), stats(&proxy).ejections_active), (10, 0));
    tokio::time::sleep(Duration::from_millis(10_001)).await;
    let after_sweep = stats(&proxy);
    assert_eq!(after_sweep.ejections_enforced_failure_percentage, 1);
    assert_eq!(after_sweep.ejections_enforced_consecutive_5xx, 0);
    send(addr, 10).await;
    assert_eq!((bad.hits(), good.hits()), (10, 20));
}

/// A failing and a healthy host; two 5xx in a row eject, up to one host of the two.
struct Pair {
    bad: Backend,
    good: Backend,
    proxy: Proxy,
    start: Instant,
    detection: OutlierDetection,
    addr: std::net::SocketAddr,
}

async fn pair() -> Pair {
    let bad = always(StatusCode::INTERNAL_SERVER_ERROR, "bad").await;
    let good = Backend::echo("good").await;
    let proxy = Proxy::start_here();
    let start = Instant::now();
    let detection = OutlierDetection { consecutive_5xx: 2, max_ejection_percent: 50, ..OutlierDetection::default() };
    let addr = serve(&proxy, &[&bad, &good], detection);
    Pair { bad, good, proxy, start, detection, addr }
}

#[tokio::test(start_paused = true)]
async fn ejections_end_at_a_sweep_grow_when_repeated_and_decay_while_healthy() {
    let Pair { bad, good, proxy, start, addr, .. } = pair().await;
    let ejected_at = |secs: u64| {
        let proxy = &proxy;
        async move {
            tokio::time::sleep_until(start + Duration::from_secs(secs)).await;
            stats(proxy).ejections_active == 1
        }
    };

    // Sweeps run at t = 10, 20, 30, ... Two 5xx in a row eject at once (t = 1), for 30 s
    // (multiplier 1): the host comes back at the first sweep 30 s or more later, t = 40.
    tokio::time::sleep_until(start + Duration::from_secs(1)).await;
    send(addr, 4).await;
    assert_eq!(stats(&proxy).ejections_active, 1, "consecutive ejection is immediate");
    assert!(ejected_at(35).await, "the 30 s are not over at the sweep at t = 30");
    assert!(!ejected_at(45).await);

    // Ejected again at t = 45 before any sweep saw it healthy: multiplier 2, 60 s, back at 110.
    send(addr, 4).await;
    assert!(ejected_at(105).await);
    assert!(!ejected_at(115).await);

    // Healthy through the sweeps at 120 and 130: the multiplier decays 2 -> 1 -> 0. Ejected
    // at 135 it is 1 again (30 s, back at 170), not 3 (90 s).
    tokio::time::sleep_until(start + Duration::from_secs(135)).await;
    send(addr, 4).await;
    assert!(ejected_at(165).await);
    assert!(!ejected_at(175).await);
    let totals = stats(&proxy);
    assert_eq!((totals.ejections_enforced_total, totals.ejections_enforced_consecutive_5xx), (3, 3));
    assert_eq!((bad.hits(), good.hits()), (6, 6));
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_ejections_and_the_sweeps_go_on() {
    let Pair { bad, good, proxy, start, detection, addr } = pair().await;
    tokio::time::sleep_until(start + Duration::from_secs(1)).await;
    send(addr, 4).await;
    assert_eq!(stats(&proxy).ejections_active, 1);
    // A new generation with a different detector keeps the hosts and their ejection; its
    // sweeps run at t = 11, 21, ... and the old ones stop.
    serve(&proxy, &[&bad, &good], OutlierDetection { base_ejection_time: Duration::from_secs(20), ..detection });
    assert_eq!(stats(&proxy).ejections_active, 1);
    tokio::time::sleep_until(start + Duration::from_secs(15)).await;
    assert_eq!(stats(&proxy).ejections_active, 1);
    // The new 20 s apply: back at t = 21, where the old 30 s would still hold.
    tokio::time::sleep_until(start + Duration::from_secs(25)).await;
    assert_eq!(stats(&proxy).ejections_active, 0);
}
