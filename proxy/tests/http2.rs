//! HTTP/2: prior-knowledge downstream on the same port as HTTP/1.1, HTTP/2 upstreams, and an
//! L3/L4 denial that resets only the denied stream.

mod common;

use std::net::IpAddr;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use sluice_proxy::tables::UpstreamProtocol;

async fn h2_client(source: IpAddr, proxy: std::net::SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = connect_from(source, proxy).await;
    let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

fn h2_get(path: &str) -> Request<Full<Bytes>> {
    Request::get(format!("http://app.test{path}")).version(Version::HTTP_2).body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test]
async fn http2_prior_knowledge_downstream_to_an_http1_upstream() {
    let backend = Backend::echo("h1").await;
    let mut proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend.addr]));
    let mut client = h2_client([127, 0, 0, 1].into(), addr).await;
    let response = client.send_request(h2_get("/two?x=1")).await.unwrap();
    assert_eq!(response.version(), Version::HTTP_2);
    assert_eq!(collect(response).await.unwrap().body, "h1");
    // HTTP/1.1 on the same port still works.
    assert_eq!(get(addr, "/one").await.status, StatusCode::OK);

    let seen = backend.seen();
    assert_eq!(seen[0].version, Version::HTTP_11);
    assert_eq!(seen[0].path, "/two?x=1");
    assert_eq!(seen[0].headers["host"], "app.test");
    assert_eq!(proxy.drain_flows()[0].http.as_ref().unwrap().protocol, "HTTP/2");
}

#[tokio::test]
async fn http2_upstreams_multiplex_over_one_connection() {
    let backend = Backend::echo("h2").await;
    let proxy = Proxy::start();
    let mut svc = cluster("svc", &[backend.addr]);
    svc.protocol = UpstreamProtocol::Http2;
    let addr = proxy.apply(tables(1, hcm(vec![prefix_route("/", to_cluster("svc"))]), vec![svc]));

    let requests: Vec<_> = (0..20).map(|i| tokio::spawn(async move { get(addr, &format!("/r{i}")).await })).collect();
    for request in requests {
        assert_eq!(request.await.unwrap().status, StatusCode::OK);
    }
    let seen = backend.seen();
    assert_eq!(seen.len(), 20);
    assert!(seen.iter().all(|r| r.version == Version::HTTP_2));
    assert_eq!(proxy.handle.stats().clusters["svc"].upstream_cx_active, 1);
}

#[tokio::test]
async fn an_l4_denial_resets_the_stream_and_the_connection_carries_on() {
    let backend = Backend::echo_on("backend", [127, 0, 0, 10].into()).await;
    let proxy = Proxy::start();
    let mut t = svc_tables(to_cluster("svc"), &[backend.addr]);
    // Identity 400 may GET /ok; everyone else is denied at L3/L4.
    guard(&mut t, backend.addr, vec![http_rule("GET", "/ok")]);
    let addr = proxy.apply(t);

    let mut allowed = h2_client([127, 0, 0, 20].into(), addr).await;
    assert_eq!(allowed.send_request(h2_get("/ok")).await.unwrap().status(), StatusCode::OK);
    assert_eq!(allowed.send_request(h2_get("/nope")).await.unwrap().status(), StatusCode::FORBIDDEN);

    // A world-identity client is denied at L3/L4: its stream is reset, no response.
    let mut stranger = h2_client([127, 0, 0, 99].into(), addr).await;
    let reset = stranger.send_request(h2_get("/ok")).await;
    assert!(reset.is_err(), "expected a reset stream, got {reset:?}");
    assert_eq!(backend.hits(), 1);
    // The denied client's connection stays usable at the protocol level (another reset, no hang).
    assert!(stranger.send_request(h2_get("/ok")).await.is_err());
    // The allowed client is unaffected.
    assert_eq!(allowed.send_request(h2_get("/ok")).await.unwrap().status(), StatusCode::OK);
}

/// The bytes `/big/N` answers with: distinct per stream, larger than what one connection
/// stages before writing and than a stream's initial flow-control window.
fn big_body(path: &str) -> String {
    path.repeat(300 * 1024 / path.len())
}

#[tokio::test]
async fn concurrent_http2_streams_get_their_own_large_bodies_whole() {
    let backend = Backend::start("big", |_, request| {
        Box::pin(async move { http::Response::new(Full::new(Bytes::from(big_body(&request.path)))) })
    })
    .await;
    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend.addr]));
    let client = h2_client([127, 0, 0, 1].into(), addr).await;
    let streams: Vec<_> = (0..16)
        .map(|i| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let path = format!("/big/{i}");
                let response = client.send_request(h2_get(&path)).await.unwrap();
                (path, collect(response).await.unwrap())
            })
        })
        .collect();
    for stream in streams {
        let (path, got) = tokio::time::timeout(std::time::Duration::from_secs(10), stream).await.expect("every stream ends").unwrap();
        assert_eq!(got.status, StatusCode::OK);
        assert!(got.body == big_body(&path), "{path}: {} bytes, not its own body", got.body.len());
    }
}
