//! Retries end to end: 5xx, resets and connect failures, with the attempt count visible to the
//! backend (`x-envoy-attempt-count`), in the flow event and in the stats; replay buffer limits;
//! request mirroring.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use sluice_proxy::flow::{DropReason, Verdict};
use sluice_proxy::tables::{MirrorPolicy, RetryOn};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn on_5xx() -> RetryOn {
    RetryOn { server_error_5xx: true, ..RetryOn::default() }
}

/// 503 for the first `failures` requests, then 200.
async fn failing_first(failures: usize) -> Backend {
    Backend::start("flaky", move |index, _| {
        Box::pin(async move {
            if index < failures { reply(StatusCode::SERVICE_UNAVAILABLE, "flaky") } else { reply(StatusCode::OK, "flaky") }
        })
    })
    .await
}

fn retrying(policy: sluice_proxy::tables::RetryPolicy) -> sluice_proxy::tables::ForwardAction {
    let mut action = to_cluster("svc");
    action.retry_policy = Some(policy);
    action
}

fn attempt_counts(backend: &Backend) -> Vec<String> {
    backend.seen().iter().map(|r| r.headers["x-envoy-attempt-count"].to_str().unwrap().to_owned()).collect()
}

#[tokio::test]
async fn a_5xx_is_retried_once_by_default_policy() {
    let backend = failing_first(1).await;
    let mut proxy = Proxy::start();
    let action = retrying(retry_policy(on_5xx(), 1));
    let addr = proxy.apply(svc_tables(action, &[backend.addr]));

    let got = get(addr, "/").await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(attempt_counts(&backend), vec!["1", "2"]);
    let flows = proxy.drain_flows();
    assert_eq!(flows[0].attempts, 2);
    assert_eq!(flows[0].verdict, Verdict::Forwarded);
    assert_eq!(proxy.handle.stats().clusters["svc"].upstream_rq_retry, 1);
}

#[tokio::test]
async fn retries_stop_at_num_retries_and_the_last_5xx_is_returned() {
    let backend = failing_first(10).await;
    let mut proxy = Proxy::start();
    let action = retrying(retry_policy(on_5xx(), 2));
    let addr = proxy.apply(svc_tables(action, &[backend.addr]));

    assert_eq!(get(addr, "/").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(attempt_counts(&backend), vec!["1", "2", "3"]);
    assert_eq!(proxy.drain_flows()[0].attempts, 3);
}

#[tokio::test]
async fn without_a_retry_policy_a_5xx_is_final() {
    let backend = failing_first(1).await;
    let mut proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend.addr]));
    assert_eq!(get(addr, "/").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(backend.hits(), 1);
    assert_eq!(proxy.drain_flows()[0].attempts, 1);
}

/// Closes the first `resets` connections after reading the request, then answers `200 ok`.
async fn resetting_first(resets: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let index = counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buffer).await {
                    if n == 0 || index < resets {
                        return;
                    }
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_reset_is_retried_under_retry_on_reset() {
    let (backend, accepted) = resetting_first(1).await;
    let mut proxy = Proxy::start();
    let action = retrying(retry_policy(RetryOn { reset: true, ..RetryOn::default() }, 1));
    let addr = proxy.apply(svc_tables(action, &[backend]));

    let got = get(addr, "/").await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(proxy.drain_flows()[0].attempts, 2);
}

#[tokio::test]
async fn a_reset_without_retry_is_a_503() {
    let (backend, _accepted) = resetting_first(1).await;
    let mut proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend]));
    assert_eq!(get(addr, "/").await.status, StatusCode::SERVICE_UNAVAILABLE);
    let flow = &proxy.drain_flows()[0];
    assert_eq!((flow.verdict, flow.drop_reason), (Verdict::Error, Some(DropReason::UpstreamFailure)));
}

#[tokio::test]
async fn connect_failures_are_retried_on_another_host() {
    let refused = refused_addr().await;
    let backend = Backend::echo("up").await;
    let mut proxy = Proxy::start();
    let mut policy = retry_policy(RetryOn { connect_failure: true, ..RetryOn::default() }, 1);
    policy.avoid_previous_hosts = true;
    let mut action = to_cluster("svc");
    action.retry_policy = Some(policy);
    let addr = proxy.apply(svc_tables(action, &[refused, backend.addr]));

    for _ in 0..10 {
        assert_eq!(get(addr, "/").await.status, StatusCode::OK);
    }
    let flows = proxy.drain_flows();
    // Every request that started on the refusing host took exactly one more attempt.
    let retried = flows.iter().filter(|f| f.attempts == 2).count() as u64;
    assert!(retried > 0 && flows.iter().all(|f| (1..=2).contains(&f.attempts)));
    assert_eq!(retried, proxy.handle.stats().clusters["svc"].upstream_cx_connect_fail);
    assert!(flows.iter().all(|f| f.destination.port == backend.addr.port()));
    assert_eq!(backend.hits(), 10);
}

#[tokio::test]
async fn connect_failure_without_retry_is_a_503() {
    let refused = refused_addr().await;
    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[refused]));
    let got = get(addr, "/").await;
    assert_eq!(got.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(proxy.handle.stats().clusters["svc"].upstream_cx_connect_fail, 1);
}

#[tokio::test]
async fn max_retries_zero_means_the_retry_overflows() {
    let backend = failing_first(1).await;
    let proxy = Proxy::start();
    let action = retrying(retry_policy(on_5xx(), 3));
    let mut svc = cluster("svc", &[backend.addr]);
    svc.circuit_breakers.max_retries = 0;
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", action)]), vec![svc]));
    assert_eq!(get(addr, "/").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(backend.hits(), 1);
    assert_eq!(proxy.handle.stats().clusters["svc"].upstream_rq_retry_overflow, 1);
}

async fn post(addr: SocketAddr, body: Bytes) -> Got {
    let mut sender = http1_connect([127, 0, 0, 1].into(), addr).await;
    let request = http::Request::post("/upload").header("host", "app.test").body(Full::new(body)).unwrap();
    send(&mut sender, request).await.unwrap()
}

#[tokio::test]
async fn bodies_within_the_buffer_are_replayed_and_larger_ones_are_not_retried() {
    let backend = failing_first(1).await;
    let proxy = Proxy::start();
    let action = retrying(retry_policy(on_5xx(), 1));
    let mut http = hcm(vec![prefix_route("/", action)]);
    let mut route_config = (*http.route_config).clone();
    route_config.virtual_hosts[0].request_body_buffer_limit = 1024;
    http.route_config = Arc::new(route_config);
    let addr = proxy.apply(tables(1, http, vec![cluster("svc", &[backend.addr])]));

    let small = Bytes::from(vec![b's'; 1000]);
    assert_eq!(post(addr, small.clone()).await.status, StatusCode::OK);
    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|r| r.body == small), "the retry carries the same body");

    // Swap in a fresh failing backend for the large body.
    let large_backend = failing_first(1).await;
    let action = retrying(retry_policy(on_5xx(), 1));
    let mut http = hcm(vec![prefix_route("/", action)]);
    let mut route_config = (*http.route_config).clone();
    route_config.virtual_hosts[0].request_body_buffer_limit = 1024;
    http.route_config = Arc::new(route_config);
    proxy.handle.apply(tables(2, http, vec![cluster("svc", &[large_backend.addr])])).unwrap();
    let large = Bytes::from(vec![b'L'; 64 * 1024]);
    assert_eq!(post(addr, large.clone()).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(large_backend.hits(), 1, "a body over the buffer limit is streamed once, never retried");
    assert_eq!(large_backend.seen()[0].body, large);
}

#[tokio::test]
async fn mirrors_get_a_shadow_copy_and_never_affect_the_response() {
    let primary = Backend::echo("primary").await;
    let (shadow_seen, mut shadow_rx) = tokio::sync::mpsc::unbounded_channel();
    let shadow = Backend::start("shadow", move |_, request| {
        let _ = shadow_seen.send(request);
        Box::pin(async { reply(StatusCode::INTERNAL_SERVER_ERROR, "shadow") })
    })
    .await;
    let proxy = Proxy::start();
    let mut action = to_cluster("primary");
    action.mirrors = vec![MirrorPolicy { cluster: "shadow".into(), fraction_per_million: 1_000_000 }];
    let addr = proxy.apply(tables(
        1,
        hcm(vec![prefix_route("/", action)]),
        vec![cluster("primary", &[primary.addr]), cluster("shadow", &[shadow.addr])],
    ));
    let got = get(addr, "/mirrored?q=1").await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "primary"));
    let copy = tokio::time::timeout(std::time::Duration::from_secs(10), shadow_rx.recv()).await.unwrap().unwrap();
    assert_eq!(copy.path, "/mirrored?q=1");
    assert_eq!(copy.headers["host"], "app.test-shadow");
    assert_eq!(primary.seen()[0].headers["host"], "app.test");
}
