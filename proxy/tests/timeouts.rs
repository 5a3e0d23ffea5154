//! Per-try, route, stream-idle and request timeouts under paused tokio time (the proxy runs on the
//! test's runtime, so its timers follow the paused clock and nothing here waits for real).

mod common;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::{StatusCode, Version};
use http_body::Frame;
use sluice_proxy::flow::{DropReason, Verdict};
use sluice_proxy::tables::{ForwardAction, MirrorPolicy, ProxyTables, RetryOn};

/// A backend that reads the request and never answers.
async fn hanging() -> Backend {
    Backend::start("hang", |_, _| Box::pin(std::future::pending())).await
}

/// What a test does to its route.
type Shape = fn(&mut ForwardAction);

fn on_5xx() -> RetryOn {
    RetryOn { server_error_5xx: true, ..RetryOn::default() }
}

#[tokio::test(start_paused = true)]
async fn per_try_timeouts_are_retried_until_the_route_timeout_gives_504() {
    let backend = hanging().await;
    let mut proxy = Proxy::start_here();
    let mut policy = retry_policy(on_5xx(), 3);
    policy.per_try_timeout = Some(Duration::from_millis(400));
    let mut action = to_cluster("svc");
    action.timeout = Some(Duration::from_secs(1));
    action.retry_policy = Some(policy);
    let addr = proxy.apply(svc_tables(action, &[backend.addr]));

    let got = get(addr, "/").await;
    assert_eq!(got.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(got.body, "upstream request timeout");
    let flow = &proxy.drain_flows()[0];
    // 400 ms tries with jittered back-off (< 25, then < 75 ms) inside 1 s: the third try starts
    // before 900 ms and the route timeout ends it, whatever the jitter drew. (With shorter tries
    // the route timeout could land in a back-off instead and count one more per-try timeout.)
    assert_eq!(flow.attempts, 3);
    assert_eq!(backend.hits(), 3);
    assert_eq!((flow.verdict, flow.drop_reason), (Verdict::Error, Some(DropReason::UpstreamTimeout)));
    let counts: Vec<String> = backend.seen().iter().map(|r| r.headers["x-envoy-attempt-count"].to_str().unwrap().to_owned()).collect();
    assert_eq!(counts.first().map(String::as_str), Some("1"));
    let stats = proxy.handle.stats().clusters["svc"];
    assert_eq!((stats.upstream_rq_timeout, stats.upstream_rq_per_try_timeout), (1, 2));
}

#[tokio::test(start_paused = true)]
async fn without_per_try_timeout_the_route_timeout_leaves_no_time_to_retry() {
    let backend = hanging().await;
    let mut proxy = Proxy::start_here();
    let mut action = to_cluster("svc");
    action.timeout = Some(Duration::from_secs(1));
    action.retry_policy = Some(retry_policy(on_5xx(), 3));
    let addr = proxy.apply(svc_tables(action, &[backend.addr]));

    let started = tokio::time::Instant::now();
    assert_eq!(get(addr, "/").await.status, StatusCode::GATEWAY_TIMEOUT);
    // Paused clock: this is the proxy's timer, not wall time.
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(backend.hits(), 1);
    assert_eq!(proxy.drain_flows()[0].attempts, 1);
    let stats = proxy.handle.stats().clusters["svc"];
    assert_eq!((stats.upstream_rq_timeout, stats.upstream_rq_per_try_timeout), (1, 0));
}

#[tokio::test(start_paused = true)]
async fn the_stream_idle_timeout_answers_408_when_it_ends_first() {
    let backend = hanging().await;
    let mut proxy = Proxy::start_here();
    let mut http = hcm(vec![prefix_route("/", to_cluster("svc"))]);
    http.stream_idle_timeout = Some(Duration::from_secs(2));
    let addr = proxy.apply(tables(1, http, vec![cluster("svc", &[backend.addr])]));
    assert_eq!(get(addr, "/").await.status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(proxy.drain_flows()[0].drop_reason, Some(DropReason::UpstreamTimeout));
}

#[tokio::test(start_paused = true)]
async fn a_zero_route_timeout_disables_it() {
    let backend = Backend::start("slow", |_, _| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            reply(StatusCode::OK, "slow")
        })
    })
    .await;
    let proxy = Proxy::start_here();
    let mut action = to_cluster("svc");
    action.timeout = Some(Duration::ZERO);
    let addr = proxy.apply(svc_tables(action, &[backend.addr]));
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
}

/// Writes the first line of a request head and waits for the proxy to close the connection.
async fn half_a_head_is_closed(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(b"GET / HTTP/1.1\r\nhost: app.test\r\n").await.expect("write");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(60), stream.read(&mut buf)).await;
    // Closed: EOF or a reset; still open after a minute: the timeout.
    matches!(read, Ok(Ok(0) | Err(_)))
}

#[tokio::test(start_paused = true)]
async fn request_headers_timeout_closes_a_connection_whose_head_never_ends() {
    let backend = hanging().await;
    let proxy = Proxy::start_here();
    let mut http = hcm(vec![prefix_route("/", to_cluster("svc"))]);
    http.request_headers_timeout = Some(Duration::from_secs(5));
    let addr = proxy.apply(tables(1, http, vec![cluster("svc", &[backend.addr])]));
    let started = tokio::time::Instant::now();
    assert!(half_a_head_is_closed(addr).await);
    assert!(started.elapsed() >= Duration::from_secs(5));
    assert_eq!(backend.hits(), 0);
}

#[tokio::test(start_paused = true)]
async fn without_request_headers_timeout_a_slow_head_is_not_cut_off() {
    let backend = hanging().await;
    let proxy = Proxy::start_here();
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("svc"))]), vec![cluster("svc", &[backend.addr])]));
    // Envoy's default: no request head timeout (hyper's own default would close at 30 s).
    assert!(!half_a_head_is_closed(addr).await);
}

/// A client connected to an echo backend through a listener whose `idle_timeout` is 10 s; the
/// proxy is returned so that it lives as long as the test needs it.
async fn connected_with_a_10s_idle_timeout() -> (Backend, Proxy, tokio::net::TcpStream) {
    let backend = Backend::echo("backend").await;
    let proxy = Proxy::start_here();
    let mut http = hcm(vec![prefix_route("/", to_cluster("svc"))]);
    http.idle_timeout = Some(Duration::from_secs(10));
    let addr = proxy.apply(tables(1, http, vec![cluster("svc", &[backend.addr])]));
    let stream = connect_from([127, 0, 0, 1].into(), addr).await;
    (backend, proxy, stream)
}

#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (backend, _proxy, mut stream) = connected_with_a_10s_idle_timeout().await;
    let mut buf = [0u8; 1024];
    let opened = tokio::time::Instant::now();
    // Requests 6 s apart: never idle for 10 s, so the connection outlives the timeout.
    for _ in 0..3 {
        stream.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
        let read = stream.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..read]).ends_with("backend"));
        tokio::time::sleep(Duration::from_secs(6)).await;
    }
    assert!(opened.elapsed() >= Duration::from_secs(18));
    // Then silence: the proxy closes it 10 s after the last response.
    let read = stream.read(&mut buf).await.unwrap();
    assert_eq!(read, 0, "closed without a response");
    let idle = opened.elapsed() - Duration::from_secs(18);
    assert!(idle >= Duration::from_secs(4) && idle < Duration::from_secs(5), "closed after {idle:?} more");
    assert_eq!(backend.hits(), 3);
}

#[tokio::test(start_paused = true)]
async fn a_client_whose_first_bytes_leave_the_protocol_open_is_served_and_later_idles_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (backend, _proxy, mut stream) = connected_with_a_10s_idle_timeout().await;
    // `P` could still begin the HTTP/2 preface: the proxy has to wait for more to decide.
    stream.write_all(b"P").await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stream.write_all(b"UT / HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let read = stream.read(&mut buf).await.unwrap();
    let response = String::from_utf8_lossy(&buf[..read]).into_owned();
    assert!(response.starts_with("HTTP/1.1 200") && response.ends_with("backend"), "{response}");
    let answered = tokio::time::Instant::now();
    // The waits that found the socket empty must not leave it without its idle timer.
    let read = stream.read(&mut buf).await.unwrap();
    assert_eq!(read, 0, "closed without a response");
    let idle = answered.elapsed();
    assert!(idle >= Duration::from_secs(9) && idle < Duration::from_secs(11), "closed after {idle:?}");
    assert_eq!(backend.hits(), 1);
}

/// A listener whose requests must have arrived whole within 5 s (`request_timeout`), routing
/// to `svc` on `backend` with `shape` applied to the route; `shadow` (for mirrors) is the same
/// backend.
fn five_second_request_timeout(backend: std::net::SocketAddr, shape: Shape) -> ProxyTables {
    let mut action = to_cluster("svc");
    shape(&mut action);
    let mut http = hcm(vec![prefix_route("/", action)]);
    http.request_timeout = Some(Duration::from_secs(5));
    tables(1, http, vec![cluster("svc", &[backend]), cluster("shadow", &[backend])])
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_body_stops_short_gets_408_at_the_request_timeout() {
    let backend = Backend::echo("echo").await;
    // The three ways a request body goes upstream, and HTTP/2's body; the attempts the flow
    // records (a mirrored body is read whole before the first attempt).
    let cases: [(Shape, Version, u32); 4] = [
        (streamed, Version::HTTP_11, 1),
        (teed_for_retries, Version::HTTP_11, 1),
        (buffered_for_a_mirror, Version::HTTP_11, 0),
        (streamed, Version::HTTP_2, 1),
    ];
    for (shape, version, attempts) in cases {
        let mut proxy = Proxy::start_here();
        let addr = proxy.apply(five_second_request_timeout(backend.addr, shape));
        let started = tokio::time::Instant::now();
        let (chunks, response) = streaming_post(addr, version).await;
        chunks.send(Ok(Frame::data(Bytes::from_static(b"the first half")))).await.unwrap();
        let got = collect(response.await.unwrap().unwrap()).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (StatusCode::REQUEST_TIMEOUT, "request timeout"), "{version:?}, {attempts}");
        assert!(started.elapsed() >= Duration::from_secs(5));
        if version == Version::HTTP_11 {
            // The rest of the body was never read: the connection cannot carry another request.
            assert_eq!(got.headers["connection"], "close");
        }
        let flow = &proxy.drain_flows()[0];
        assert_eq!((flow.verdict, flow.drop_reason, flow.attempts), (Verdict::Error, Some(DropReason::DownstreamTimeout), attempts));
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_that_arrived_whole_may_wait_past_the_request_timeout_for_its_response() {
    let backend = Backend::start("slow", |_, request| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            reply(StatusCode::OK, &String::from_utf8_lossy(&request.body))
        })
    })
    .await;
    let proxy = Proxy::start_here();
    let addr = proxy.apply(five_second_request_timeout(backend.addr, |_| {}));
    let started = tokio::time::Instant::now();
    let (chunks, response) = streaming_post(addr, Version::HTTP_11).await;
    chunks.send(Ok(Frame::data(Bytes::from_static(b"whole")))).await.unwrap();
    drop(chunks);
    let got = collect(response.await.unwrap().unwrap()).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "whole"));
    // A request without a body has arrived whole with its head.
    assert_eq!(get(addr, "/").await.status, StatusCode::OK);
    assert!(started.elapsed() >= Duration::from_secs(20));
}

#[tokio::test(start_paused = true)]
async fn a_response_that_started_before_the_body_ended_is_not_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Answers as soon as it has a request head, and sends the response body 10 s later.
    let (backend, _) = raw_backend(|_, mut stream| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|window| window == b"\r\n\r\n") {
            let read = stream.read(&mut buf).await.unwrap();
            assert!(read > 0, "a whole request head");
            head.extend_from_slice(&buf[..read]);
        }
        stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n").await.unwrap();
        tokio::time::sleep(Duration::from_secs(10)).await;
        stream.write_all(b"early").await.unwrap();
        // Held open until the proxy has read the body.
        let _ = stream.read(&mut buf).await;
    })
    .await;
    let proxy = Proxy::start_here();
    let addr = proxy.apply(five_second_request_timeout(backend, |_| {}));
    let (chunks, response) = streaming_post(addr, Version::HTTP_11).await;
    chunks.send(Ok(Frame::data(Bytes::from_static(b"never finished")))).await.unwrap();
    let got = collect(response.await.unwrap().unwrap()).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "early"));
    drop(chunks);
}

/// A listener whose routes to `svc` on `backend` time out after `route` and whose streams idle
/// out after `stream_idle`, with `shape` applied to the route; `shadow` (for mirrors) is the
/// same backend.
fn timed(backend: std::net::SocketAddr, route: Duration, stream_idle: Duration, shape: Shape) -> ProxyTables {
    let mut action = to_cluster("svc");
    action.timeout = Some(route);
    shape(&mut action);
    let mut http = hcm(vec![prefix_route("/", action)]);
    http.stream_idle_timeout = Some(stream_idle);
    tables(1, http, vec![cluster("svc", &[backend]), cluster("shadow", &[backend])])
}

fn streamed(_: &mut ForwardAction) {}
fn teed_for_retries(action: &mut ForwardAction) {
    action.retry_policy = Some(retry_policy(on_5xx(), 1));
}
fn buffered_for_a_mirror(action: &mut ForwardAction) {
    action.mirrors = vec![MirrorPolicy { cluster: "shadow".into(), fraction_per_million: 1_000_000 }];
}

/// The three ways a request body goes upstream. (Under the paused clock hyper's HTTP/2 client
/// sends no DATA frame after the first, through the proxy or not, so HTTP/2 bodies that pause
/// are tested on the real clock, below.)
const BODY_PATHS: [Shape; 3] = [streamed, teed_for_retries, buffered_for_a_mirror];

/// A backend that answers with the request's body.
async fn body_echo() -> Backend {
    Backend::start("body", |_, request| Box::pin(async move { reply(StatusCode::OK, &String::from_utf8_lossy(&request.body)) })).await
}

/// A `POST` over `version` whose body is five pieces sent `gap` apart; the response.
async fn upload_five_pieces(addr: std::net::SocketAddr, version: Version, gap: Duration) -> Got {
    let (chunks, response) = streaming_post(addr, version).await;
    for piece in ["a", "b", "c", "d", "e"] {
        chunks.send(Ok(Frame::data(Bytes::from(piece)))).await.unwrap();
        tokio::time::sleep(gap).await;
    }
    drop(chunks);
    collect(response.await.unwrap().unwrap()).await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn an_upload_that_outlasts_the_route_timeout_is_answered() {
    let backend = body_echo().await;
    for shape in BODY_PATHS {
        let proxy = Proxy::start_here();
        // Envoy starts the route timeout at the end of the request: five pieces 500 ms apart
        // take 2.5 s, longer than the route timeout, and each gap is shorter than the idle one.
        let addr = proxy.apply(timed(backend.addr, Duration::from_secs(1), Duration::from_secs(2), shape));
        let got = upload_five_pieces(addr, Version::HTTP_11, Duration::from_millis(500)).await;
        assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "abcde"));
    }
}

#[tokio::test]
async fn an_http2_upload_that_outlasts_the_route_timeout_is_answered() {
    let backend = body_echo().await;
    let proxy = Proxy::start_here();
    // Real time: 750 ms of pieces against a 400 ms route timeout, each gap a tenth of the
    // idle timeout. Only the status is asserted.
    let addr = proxy.apply(timed(backend.addr, Duration::from_millis(400), Duration::from_millis(1500), streamed));
    let got = upload_five_pieces(addr, Version::HTTP_2, Duration::from_millis(150)).await;
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "abcde"));
}

#[tokio::test(start_paused = true)]
async fn the_route_timeout_starts_when_the_request_has_arrived_whole() {
    let backend = hanging().await;
    for shape in BODY_PATHS {
        let mut proxy = Proxy::start_here();
        let addr = proxy.apply(timed(backend.addr, Duration::from_secs(1), Duration::from_secs(2), shape));
        let started = tokio::time::Instant::now();
        let (chunks, response) = streaming_post(addr, Version::HTTP_11).await;
        for _ in 0..3 {
            chunks.send(Ok(Frame::data(Bytes::from_static(b"piece")))).await.unwrap();
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        drop(chunks);
        let got = collect(response.await.unwrap().unwrap()).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"));
        // The body ended at 3 s; the route timeout ran 1 s from then.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(4) && elapsed < Duration::from_millis(4500), "{elapsed:?}");
        let flow = &proxy.drain_flows()[0];
        assert_eq!((flow.verdict, flow.drop_reason), (Verdict::Error, Some(DropReason::UpstreamTimeout)));
        assert_eq!(proxy.handle.stats().clusters["svc"].upstream_rq_timeout, 1);
    }
}

#[tokio::test(start_paused = true)]
async fn a_pause_in_an_upload_longer_than_the_stream_idle_timeout_gets_408() {
    let backend = Backend::echo("echo").await;
    let cases = BODY_PATHS.map(|shape| (shape, Version::HTTP_11));
    for (shape, version) in cases.into_iter().chain([(streamed as Shape, Version::HTTP_2)]) {
        let proxy = Proxy::start_here();
        let addr = proxy.apply(timed(backend.addr, Duration::from_secs(60), Duration::from_secs(2), shape));
        let (chunks, response) = streaming_post(addr, version).await;
        let started = tokio::time::Instant::now();
        chunks.send(Ok(Frame::data(Bytes::from_static(b"then nothing")))).await.unwrap();
        let got = collect(response.await.unwrap().unwrap()).await.unwrap();
        assert_eq!((got.status, got.body.as_str()), (StatusCode::REQUEST_TIMEOUT, "stream timeout"), "{version:?}");
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(2500), "{version:?}: {elapsed:?}");
        drop(chunks);
    }
}

/// A backend that answers `content-length: 10` and then sends the body a byte at a time,
/// `gap` apart; `None`: five bytes and then nothing.
async fn trickling(gap: Option<Duration>) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, _) = raw_backend(move |_, mut stream| async move {
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|window| window == b"\r\n\r\n") {
            let Ok(read @ 1..) = stream.read(&mut buf).await else { return };
            head.extend_from_slice(&buf[..read]);
        }
        let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\n").await;
        let sent = if gap.is_some() { 10 } else { 5 };
        for byte in &b"0123456789"[..sent] {
            let _ = stream.write_all(std::slice::from_ref(byte)).await;
            tokio::time::sleep(gap.unwrap_or_default()).await;
        }
        // Held open: the proxy has to give up on it.
        let _ = stream.read(&mut buf).await;
    })
    .await;
    addr
}

/// A `GET /` over `version` whose response body is collected; how long it took.
async fn get_over(addr: std::net::SocketAddr, version: Version) -> (Result<Got, hyper::Error>, Duration) {
    let started = tokio::time::Instant::now();
    let (chunks, response) = streaming_post(addr, version).await;
    drop(chunks);
    let response = response.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // Bounded, so that a proxy that never ends the response fails the test instead of hanging it.
    let collected = tokio::time::timeout(Duration::from_secs(600), collect(response)).await.expect("the response ended within 10 minutes");
    (collected, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn an_upstream_that_stops_inside_the_body_is_cut_off_at_the_stream_idle_timeout() {
    let backend = trickling(None).await;
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let proxy = Proxy::start_here();
        // No route timeout: only the idle timer can end it.
        let addr = proxy.apply(timed(backend, Duration::ZERO, Duration::from_secs(2), streamed));
        let (got, elapsed) = get_over(addr, version).await;
        // HTTP/1: the connection closes before the announced length; HTTP/2: the stream is reset.
        assert!(got.is_err(), "{version:?}: {got:?}");
        assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(2500), "{version:?}: {elapsed:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_response_body_that_keeps_coming_outlives_the_stream_idle_timeout() {
    // A byte a second for 10 s against a 2 s idle timeout.
    let backend = trickling(Some(Duration::from_secs(1))).await;
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let proxy = Proxy::start_here();
        let addr = proxy.apply(timed(backend, Duration::ZERO, Duration::from_secs(2), streamed));
        let (got, elapsed) = get_over(addr, version).await;
        assert_eq!(got.expect("the whole body").body, "0123456789", "{version:?}");
        assert!(elapsed >= Duration::from_secs(9), "{version:?}: {elapsed:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn the_route_timeout_ends_a_response_whose_body_outlasts_it() {
    let backend = trickling(Some(Duration::from_secs(1))).await;
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let proxy = Proxy::start_here();
        // Envoy's route timeout runs to the end of the response, not only to its headers.
        let addr = proxy.apply(timed(backend, Duration::from_secs(3), Duration::from_secs(60), streamed));
        let (got, elapsed) = get_over(addr, version).await;
        assert!(got.is_err(), "{version:?}: {got:?}");
        assert!(elapsed >= Duration::from_secs(3) && elapsed < Duration::from_millis(3500), "{version:?}: {elapsed:?}");
        assert_eq!(proxy.handle.stats().clusters["svc"].upstream_rq_timeout, 1, "{version:?}");
    }
}

/// The body length of `huge_response`: more than HTTP/2's flow-control windows and the
/// loopback socket buffers on both sides hold.
const HUGE: usize = 64 << 20;

/// A backend that answers any request with `HUGE` bytes.
async fn huge_response() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (backend, _) = raw_backend(|_, mut stream| async move {
        let mut buf = [0u8; 1024];
        let _ = stream.read(&mut buf).await;
        let _ = stream.write_all(format!("HTTP/1.1 200 OK\r\ncontent-length: {HUGE}\r\n\r\n").as_bytes()).await;
        let _ = stream.write_all(&vec![b'x'; HUGE]).await;
    })
    .await;
    backend
}

#[tokio::test(start_paused = true)]
async fn a_client_that_stops_reading_is_cut_off_at_the_stream_idle_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backend = huge_response().await;
    let proxy = Proxy::start_here();
    let addr = proxy.apply(timed(backend, Duration::ZERO, Duration::from_secs(2), streamed));
    let mut client = connect_from([127, 0, 0, 1].into(), addr).await;
    client.write_all(b"GET / HTTP/1.1\r\nhost: app.test\r\n\r\n").await.unwrap();
    // The client reads nothing for a while; the proxy's writes stall meanwhile.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let mut received = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(60), client.read_to_end(&mut received)).await;
    // What the buffers held arrives, then the end: the proxy closed the connection.
    assert!(matches!(read, Ok(Ok(_)) | Ok(Err(_))), "still open after a minute");
    assert!(received.starts_with(b"HTTP/1.1 200 OK"));
    assert!(received.len() < HUGE, "the whole body arrived: {} bytes", received.len());
}

#[tokio::test(start_paused = true)]
async fn a_mirror_whose_shadow_never_answers_is_given_up_at_the_route_timeout() {
    use tokio::io::AsyncReadExt;
    let backend = Backend::echo("main").await;
    let (closed, mut shadow_closed) = tokio::sync::watch::channel(false);
    let closed = Arc::new(closed);
    // Reads the mirrored request, never answers, and reports when the proxy closes the connection.
    let (shadow, _) = raw_backend(move |_, mut stream| {
        let closed = Arc::clone(&closed);
        async move {
            let mut buf = [0u8; 1024];
            while matches!(stream.read(&mut buf).await, Ok(1..)) {}
            closed.send_replace(true);
        }
    })
    .await;
    let proxy = Proxy::start_here();
    let mut action = to_cluster("svc");
    action.timeout = Some(Duration::from_secs(3));
    action.mirrors = vec![MirrorPolicy { cluster: "shadow".into(), fraction_per_million: 1_000_000 }];
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", action)]), vec![cluster("svc", &[backend.addr]), cluster("shadow", &[shadow])]));
    let started = tokio::time::Instant::now();
    assert_eq!(get(addr, "/").await.body, "main");
    let gave_up = tokio::time::timeout(Duration::from_secs(600), shadow_closed.wait_for(|closed| *closed)).await;
    assert!(gave_up.is_ok(), "the shadow's connection was still open after 10 minutes");
    assert!(started.elapsed() >= Duration::from_secs(3), "{:?}", started.elapsed());
}

#[tokio::test(start_paused = true)]
async fn a_route_idle_timeout_replaces_the_listeners() {
    let stalls = trickling(None).await;
    let echo = body_echo().await;
    // The listener's 60 s, the route's 2 s: a response body that stops is cut at 2 s.
    let mut action = to_cluster("svc");
    action.timeout = None;
    action.idle_timeout = Some(Duration::from_secs(2));
    for version in [Version::HTTP_11, Version::HTTP_2] {
        let proxy = Proxy::start_here();
        let mut http = hcm(vec![prefix_route("/", action.clone())]);
        http.stream_idle_timeout = Some(Duration::from_secs(60));
        let addr = proxy.apply(tables(1, http, vec![cluster("svc", &[stalls])]));
        let (got, elapsed) = get_over(addr, version).await;
        assert!(got.is_err(), "{version:?}: {got:?}");
        assert!(elapsed >= Duration::from_secs(2) && elapsed < Duration::from_millis(2500), "{version:?}: {elapsed:?}");
    }
    // The listener's 2 s, the route's zero: an upload may pause for 5 s.
    action.idle_timeout = Some(Duration::ZERO);
    let proxy = Proxy::start_here();
    let mut http = hcm(vec![prefix_route("/", action)]);
    http.stream_idle_timeout = Some(Duration::from_secs(2));
    let addr = proxy.apply(tables(1, http, vec![cluster("svc", &[echo.addr])]));
    let (chunks, response) = streaming_post(addr, Version::HTTP_11).await;
    chunks.send(Ok(Frame::data(Bytes::from_static(b"before ")))).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    chunks.send(Ok(Frame::data(Bytes::from_static(b"after")))).await.unwrap();
    drop(chunks);
    let got = collect(response.await.unwrap().unwrap()).await.unwrap();
    assert_eq!((got.status, got.body.as_str()), (StatusCode::OK, "before after"));
}

#[tokio::test(start_paused = true)]
async fn an_http2_client_that_stops_reading_is_cut_off_at_the_stream_idle_timeout() {
    let backend = huge_response().await;
    let proxy = Proxy::start_here();
    let addr = proxy.apply(timed(backend, Duration::ZERO, Duration::from_secs(2), streamed));
    let (chunks, response) = streaming_post(addr, Version::HTTP_2).await;
    drop(chunks);
    let response = response.await.unwrap().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // The client reads none of the body for a while: its window closes and nothing moves.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let collected = tokio::time::timeout(Duration::from_secs(600), collect(response)).await.expect("the body ended within 10 minutes");
    assert!(collected.is_err(), "the whole body arrived");
}

#[tokio::test(start_paused = true)]
async fn an_http2_connection_without_streams_outlives_the_stream_idle_timeout() {
    let backend = Backend::echo("echo").await;
    let proxy = Proxy::start_here();
    let addr = proxy.apply(timed(backend.addr, Duration::ZERO, Duration::from_secs(2), streamed));
    let stream = hyper_util::rt::TokioIo::new(connect_from([127, 0, 0, 1].into(), addr).await);
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), stream).await.unwrap();
    tokio::spawn(connection);
    for _ in 0..2 {
        let request = http::Request::get("http://app.test/").body(http_body_util::Full::new(Bytes::new())).unwrap();
        let got = collect(sender.send_request(request).await.expect("the connection is still open")).await.unwrap();
        assert_eq!(got.body, "echo");
        // Only the listener's idle timeout (1 h) may close a connection with no stream open.
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
