//! Retries end to end: 5xx, resets and connect failures, with the attempt count visible to the
//! backend (`x-envoy-attempt-count`), in the flow event and in the stats; replay buffer limits;
//! request mirroring; gRPC conditions; 507 when a body outgrows the buffer during back-off; the
//! policy's header edits following the host of each attempt.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use sluice_proxy::flow::{DropReason, Verdict};
use http_body::Frame;
use sluice_proxy::tables::{HttpHeaderRule, MirrorPolicy, MismatchAction, RetryOn};
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

/// The client's own headers reach the backend on every attempt: a retry rebuilds them from the
/// normalized head, a route without retries hands them to its one attempt.
#[tokio::test]
async fn the_clients_headers_reach_every_attempt_with_or_without_a_retry_policy() {
    for (action, attempts) in [(retrying(retry_policy(on_5xx(), 1)), 2), (to_cluster("svc"), 1)] {
        let backend = failing_first(1).await;
        let proxy = Proxy::start();
        let addr = proxy.apply(svc_tables(action, &[backend.addr]));
        let mut sender = http1_connect(IpAddr::from([127, 0, 0, 1]), addr).await;
        let request = http::Request::get("/").header("host", "app.test").header("x-user", "u").body(Full::new(Bytes::new())).unwrap();
        send(&mut sender, request).await.expect("proxy answers");
        let seen: Vec<_> = backend.seen().iter().map(|r| r.headers.get("x-user").cloned()).collect();
        assert_eq!(seen, vec![Some(http::HeaderValue::from_static("u")); attempts]);
    }
}

/// Closes the first `resets` connections after reading the request, then answers `200 ok`.
async fn resetting_first(resets: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    raw_backend(move |index, mut stream| async move {
        let mut buffer = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buffer).await {
            if n == 0 || index < resets {
                return;
            }
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
        }
    })
    .await
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
    assert_eq!(proxy.handle.stats().clusters["svc"].retry_or_shadow_abandoned, 1);
}

/// A route retrying on `retry_on` with a request body buffer of `limit` bytes.
fn buffered_retry_tables(retry_on: RetryOn, limit: usize, backend: SocketAddr) -> sluice_proxy::ProxyTables {
    let mut policy = retry_policy(retry_on, 1);
    // Back-off is uniform in [0, 1 h): this test's back-off never ends before it is done.
    policy.base_interval = Duration::from_secs(3600);
    policy.max_interval = Duration::from_secs(36_000);
    let mut action = retrying(policy);
    action.timeout = Some(Duration::from_secs(600));
    let mut http = hcm(vec![prefix_route("/", action)]);
    let mut route_config = (*http.route_config).clone();
    route_config.virtual_hosts[0].request_body_buffer_limit = limit;
    http.route_config = Arc::new(route_config);
    tables(1, http, vec![cluster("svc", &[backend])])
}

/// Answers `503` as soon as a request's headers are in, reads (and drops) the rest.
async fn early_503() -> (SocketAddr, Arc<AtomicUsize>) {
    raw_backend(|_, mut stream| async move {
        let mut seen = Vec::new();
        let mut buffer = [0u8; 16 * 1024];
        let mut answered = false;
        while let Ok(n) = stream.read(&mut buffer).await {
            if n == 0 {
                return;
            }
            seen.extend_from_slice(&buffer[..n]);
            if !answered && seen.windows(4).any(|w| w == b"\r\n\r\n") {
                answered = true;
                let _ = stream.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n").await;
            }
        }
    })
    .await
}

#[tokio::test]
async fn a_body_that_outgrows_the_buffer_during_back_off_gets_507() {
    let (backend, accepted) = early_503().await;
    let mut proxy = Proxy::start();
    let addr = proxy.apply(buffered_retry_tables(on_5xx(), 16 * 1024, backend));

    // A chunked upload: 1 KiB now, the rest once the proxy is waiting to retry.
    let (chunks, response) = streaming_post(addr, http::Version::HTTP_11).await;
    chunks.send(Ok(Frame::data(Bytes::from(vec![b'a'; 1024])))).await.unwrap();
    wait_for_retry(&proxy).await;
    chunks.send(Ok(Frame::data(Bytes::from(vec![b'b'; 64 * 1024])))).await.unwrap();

    let response = tokio::time::timeout(Duration::from_secs(30), response).await.expect("answered during the back-off");
    let got = collect(response.unwrap().unwrap()).await.unwrap();
    assert_eq!(got.status, StatusCode::INSUFFICIENT_STORAGE);
    assert_eq!(got.body, "exceeded request buffer limit while retrying upstream");
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "no second attempt");
    let stats = proxy.handle.stats().clusters["svc"];
    assert_eq!(stats.retry_or_shadow_abandoned, 1);
    let flow = &proxy.drain_flows()[0];
    assert_eq!((flow.attempts, flow.verdict), (1, Verdict::Error));
}

async fn wait_for_retry(proxy: &Proxy) {
    let retried = async {
        while proxy.handle.stats().clusters["svc"].upstream_rq_retry == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), retried).await.expect("the proxy retries");
}

#[tokio::test]
async fn a_body_still_arriving_when_the_first_attempt_fails_is_replayed_whole() {
    let (refusing, _) = early_503().await;
    let good = Backend::echo("good").await;
    let proxy = Proxy::start();
    let mut policy = retry_policy(on_5xx(), 1);
    policy.avoid_previous_hosts = true;
    let addr = proxy.apply(svc_tables(retrying(policy), &[refusing, good.addr]));

    let (chunks, response) = streaming_post(addr, http::Version::HTTP_11).await;
    chunks.send(Ok(Frame::data(Bytes::from_static(b"sent before the 503, ")))).await.unwrap();
    wait_for_retry(&proxy).await;
    chunks.send(Ok(Frame::data(Bytes::from_static(b"sent after it")))).await.unwrap();
    drop(chunks);

    let response = tokio::time::timeout(Duration::from_secs(30), response).await.expect("answered");
    assert_eq!(collect(response.unwrap().unwrap()).await.unwrap().status, StatusCode::OK);
    assert_eq!(good.seen()[0].body, Bytes::from_static(b"sent before the 503, sent after it"));
}

#[tokio::test]
async fn a_body_that_overflows_during_the_attempt_ends_retries_with_the_upstream_answer() {
    let backend = failing_first(1).await;
    let proxy = Proxy::start();
    let addr = proxy.apply(buffered_retry_tables(on_5xx(), 16 * 1024, backend.addr));
    let large = Bytes::from(vec![b'L'; 64 * 1024]);
    assert_eq!(post(addr, large.clone()).await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(backend.seen().iter().map(|r| r.body.clone()).collect::<Vec<_>>(), vec![large]);
    assert_eq!(proxy.handle.stats().clusters["svc"].retry_or_shadow_abandoned, 1);
}

/// `grpc-status` in the response headers (a trailers-only gRPC answer): `code` for the first
/// `failures` requests, then 0.
async fn grpc_backend(code: u32, failures: usize) -> Backend {
    Backend::start("grpc", move |index, _| {
        Box::pin(async move {
            let status = if index < failures { code } else { 0 };
            http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", status.to_string())
                .body(Full::new(Bytes::new()))
                .unwrap()
        })
    })
    .await
}

#[tokio::test]
async fn grpc_conditions_retry_on_the_grpc_status_of_the_response_headers() {
    let cases = [
        (RetryOn { grpc_unavailable: true, ..RetryOn::default() }, 14, 2),
        (RetryOn { grpc_cancelled: true, ..RetryOn::default() }, 1, 2),
        (RetryOn { grpc_deadline_exceeded: true, ..RetryOn::default() }, 4, 2),
        (RetryOn { grpc_resource_exhausted: true, ..RetryOn::default() }, 8, 2),
        (RetryOn { grpc_internal: true, ..RetryOn::default() }, 13, 2),
        (RetryOn { grpc_unavailable: true, ..RetryOn::default() }, 13, 1),
        (on_5xx(), 14, 1),
    ];
    for (retry_on, code, attempts) in cases {
        let backend = grpc_backend(code, 1).await;
        let mut proxy = Proxy::start();
        let addr = proxy.apply(svc_tables(retrying(retry_policy(retry_on, 1)), &[backend.addr]));
        let got = get(addr, "/pkg.Service/Call").await;
        assert_eq!(got.status, StatusCode::OK);
        let expected_status = if attempts == 2 { "0".to_owned() } else { code.to_string() };
        assert_eq!(got.headers["grpc-status"], expected_status.as_str(), "{retry_on:?} with grpc-status {code}");
        assert_eq!(backend.hits(), attempts, "{retry_on:?} with grpc-status {code}");
        assert_eq!(proxy.drain_flows()[0].attempts, attempts as u32);
    }
}

#[tokio::test]
async fn a_retry_carries_the_header_edits_of_its_own_hosts_policy() {
    let first = Backend::start_on("first", IpAddr::from([127, 0, 0, 11]), |_, _| {
        Box::pin(async { reply(StatusCode::SERVICE_UNAVAILABLE, "first") })
    })
    .await;
    let second = Backend::echo_on("second", IpAddr::from([127, 0, 0, 12])).await;
    let mut proxy = Proxy::start();
    let mut policy = retry_policy(on_5xx(), 1);
    policy.avoid_previous_hosts = true;
    let mut tables = svc_tables(retrying(policy), &[first.addr, second.addr]);
    tables.peers.insert(IpAddr::from(CLIENT_400), peer(400, "default/client"));
    // Each backend's policy adds its own `x-policy` value when the request lacks it.
    for (backend, value) in [(&first, "first"), (&second, "second")] {
        let mut rule = http_rule("GET", "/.*");
        rule.headers = vec![HttpHeaderRule { name: "x-policy".into(), value: Some(value.into()), mismatch: Some(MismatchAction::Add) }];
        let origin = format!("policy of {value}");
        tables.policies.insert(backend.addr.ip(), ingress_only(true, vec![allow(&[400], backend.addr.port(), Some(vec![rule]), &origin)]));
    }
    let addr = proxy.apply(tables);

    let got = get_from(IpAddr::from(CLIENT_400), addr, "/").await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "second"));
    let values = |backend: &Backend| -> Vec<String> {
        backend.seen()[0].headers.get_all("x-policy").iter().map(|v| v.to_str().unwrap().to_owned()).collect()
    };
    assert_eq!(values(&first), vec!["first"]);
    assert_eq!(values(&second), vec!["second"], "the retry's host gets its own policy's edit, not the first host's");
    assert_eq!(proxy.drain_flows()[0].attempts, 2);
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

#[tokio::test]
async fn a_retry_carries_the_same_upstream_headers_as_the_first_attempt() {
    // The first attempt takes the request's own headers; a retry rebuilds them: every
    // mutation (route config, x-forwarded-for, rewrite, host rewrite) must come out the same.
    let backend = failing_first(1).await;
    let proxy = Proxy::start();
    let mut action = retrying(retry_policy(on_5xx(), 1));
    action.rewrite = Some(sluice_proxy::tables::PathRewrite::Prefix("/".into()));
    action.host_rewrite_literal = Some("new.host".into());
    let mut http = hcm(vec![prefix_route("/prefix/", action)]);
    http.use_remote_address = true;
    http.route_config = Arc::new(sluice_proxy::tables::RouteConfig {
        request_headers_to_add: vec![("x-added".into(), "yes".into())],
        request_headers_to_remove: vec!["x-secret".into()],
        ..(*http.route_config).clone()
    });
    let addr = proxy.apply(tables(1, http, vec![cluster("svc", &[backend.addr])]));
    let mut sender = http1_connect([127, 0, 0, 1].into(), addr).await;
    let request = http::Request::get("/prefix/etc?x=1")
        .header("host", "app.test")
        .header("x-secret", "s3cret")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("x-kept", "k")
        .body(Full::new(Bytes::new()))
        .unwrap();
    assert_eq!(send(&mut sender, request).await.unwrap().status, StatusCode::OK);

    let seen = backend.seen();
    assert_eq!(seen.len(), 2);
    let without_count = |headers: &http::HeaderMap| {
        let mut headers = headers.clone();
        headers.remove("x-envoy-attempt-count");
        headers
    };
    assert_eq!(without_count(&seen[1].headers), without_count(&seen[0].headers));
    assert_eq!(seen[1].path, seen[0].path);
    let first = &seen[0].headers;
    assert_eq!(first["x-added"], "yes");
    assert_eq!(first["x-envoy-original-path"], "/prefix/etc?x=1");
    assert_eq!(first["host"], "new.host");
    assert_eq!(first["x-forwarded-for"], "127.0.0.1");
    assert_eq!(first["x-kept"], "k");
    assert!(!first.contains_key("x-secret") && !first.contains_key("x-hop") && !first.contains_key("connection"));
}
