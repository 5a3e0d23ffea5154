//! Circuit breakers (503 + `x-envoy-overloaded`) and outlier ejection against real backends.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use http::StatusCode;
use sluice_proxy::flow::{DropReason, Verdict};
use sluice_proxy::tables::OutlierDetection;
use sluice_proxy::Handle;

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("never happened: {what}");
}

fn active_requests(handle: &Handle) -> u64 {
    handle.stats().clusters["svc"].upstream_rq_active
}

fn spawn_get(addr: SocketAddr) -> tokio::task::JoinHandle<Got> {
    tokio::spawn(async move { get(addr, "/").await })
}

#[tokio::test]
async fn max_requests_overflow_is_a_503_with_x_envoy_overloaded() {
    let (backend, release) = gated("gated").await;
    let mut proxy = Proxy::start();
    let mut svc = cluster("svc", &[backend.addr]);
    svc.circuit_breakers.max_requests = 1;
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("svc"))]), vec![svc]));

    let first = spawn_get(addr);
    wait_until("the first request reaches the backend", || backend.hits() == 1).await;
    let overflow = get(addr, "/").await;
    assert_eq!(overflow.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(overflow.headers["x-envoy-overloaded"], "true");
    release.send(true).unwrap();
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    assert_eq!(backend.hits(), 1);

    let flows = proxy.drain_flows();
    let overflowed = flows.iter().find(|f| f.drop_reason == Some(DropReason::Overflow)).expect("overflow flow");
    assert_eq!(overflowed.verdict, Verdict::Error);
    assert_eq!(proxy.handle.stats().clusters["svc"].upstream_rq_pending_overflow, 1);
    // Once the first request finished, the cluster takes requests again.
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn requests_queue_at_max_connections_until_max_pending_requests_overflows() {
    let (backend, release) = gated("gated").await;
    let proxy = Proxy::start();
    let mut svc = cluster("svc", &[backend.addr]);
    svc.circuit_breakers.max_connections = 1;
    svc.circuit_breakers.max_pending_requests = 1;
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("svc"))]), vec![svc]));

    let holding = spawn_get(addr);
    wait_until("the first request holds the only connection", || backend.hits() == 1).await;
    let queued = spawn_get(addr);
    wait_until("the second request waits for the connection", || active_requests(&proxy.handle) == 2).await;
    let overflow = get(addr, "/").await;
    assert_eq!(overflow.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(overflow.headers["x-envoy-overloaded"], "true");

    release.send(true).unwrap();
    assert_eq!(holding.await.unwrap().status, StatusCode::OK);
    assert_eq!(queued.await.unwrap().status, StatusCode::OK);
    assert_eq!(backend.hits(), 2);
    let stats = proxy.handle.stats().clusters["svc"];
    assert_eq!(stats.upstream_rq_pending_overflow, 1);
    assert_eq!(stats.upstream_cx_active, 1, "the queued request reused the one connection");
}

fn detection() -> OutlierDetection {
    OutlierDetection { consecutive_5xx: 3, max_ejection_percent: 50, ..OutlierDetection::default() }
}

#[tokio::test]
async fn consecutive_5xx_ejects_the_host_and_the_balancer_skips_it() {
    let bad = Backend::start("bad", |_, _| Box::pin(async { reply(StatusCode::INTERNAL_SERVER_ERROR, "bad") })).await;
    let good = Backend::echo("good").await;
    let proxy = Proxy::start();
    let mut svc = cluster("svc", &[bad.addr, good.addr]);
    svc.outlier_detection = Some(detection());
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("svc"))]), vec![svc]));

    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(get(addr, "/").await.status);
    }
    assert_eq!(bad.hits(), 3, "ejected after 3 consecutive 5xx");
    assert_eq!(good.hits(), 27);
    assert!(statuses[6..].iter().all(|s| *s == StatusCode::OK));
    let stats = proxy.handle.stats().clusters["svc"];
    assert_eq!((stats.ejections_enforced_total, stats.ejections_active), (1, 1));
}

#[tokio::test]
async fn split_local_origin_failures_eject_on_their_own_counter() {
    let refused = refused_addr().await;
    let good = Backend::echo("good").await;
    let proxy = Proxy::start();
    let mut svc = cluster("svc", &[refused, good.addr]);
    svc.outlier_detection = Some(OutlierDetection {
        split_external_local_origin_errors: true,
        consecutive_local_origin_failure: 2,
        ..detection()
    });
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("svc"))]), vec![svc]));

    let mut failures = 0;
    for _ in 0..20 {
        if get(addr, "/").await.status == StatusCode::SERVICE_UNAVAILABLE {
            failures += 1;
        }
    }
    assert_eq!(failures, 2, "two connect failures, then the refusing host is ejected");
    assert_eq!(good.hits(), 18);
    assert_eq!(proxy.handle.stats().clusters["svc"].ejections_active, 1);
}

#[tokio::test]
async fn max_ejection_percent_keeps_hosts_in_service() {
    let bad_a = Backend::start("a", |_, _| Box::pin(async { reply(StatusCode::BAD_GATEWAY, "a") })).await;
    let bad_b = Backend::start("b", |_, _| Box::pin(async { reply(StatusCode::BAD_GATEWAY, "b") })).await;
    let proxy = Proxy::start();
    let mut svc = cluster("svc", &[bad_a.addr, bad_b.addr]);
    svc.outlier_detection = Some(detection());
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("svc"))]), vec![svc]));
    for _ in 0..20 {
        assert_eq!(get(addr, "/").await.status, StatusCode::BAD_GATEWAY);
    }
    // 50% of two hosts: one may be ejected, never both.
    assert_eq!(proxy.handle.stats().clusters["svc"].ejections_active, 1);
    assert_eq!(bad_a.hits().min(bad_b.hits()), 3);
}
