//! Policy-bypass attempts end to end, as raw bytes on the wire: whatever the spelling, a path
//! the policy denies never reaches the backend (it is answered 403 or rejected with 400).

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sends `raw` on a fresh connection and returns the response's status code (`None` when the
/// proxy closed the connection without one).
async fn raw_status(addr: SocketAddr, raw: &str) -> Option<u16> {
    let mut stream = connect_from([127, 0, 0, 20].into(), addr).await;
    stream.write_all(raw.as_bytes()).await.ok()?;
    let mut response = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await.ok()?.ok()?;
        if read == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..read]);
        if response.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&response);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// Sends `raw` (several pipelined requests) on one connection and returns the status of each
/// of the first `count` responses.
async fn raw_statuses(addr: SocketAddr, raw: &str, count: usize) -> Vec<u16> {
    let mut stream = connect_from([127, 0, 0, 20].into(), addr).await;
    stream.write_all(raw.as_bytes()).await.expect("request written");
    let mut response = Vec::new();
    let mut chunk = [0u8; 2048];
    let statuses = |response: &[u8]| -> Vec<u16> {
        let text = String::from_utf8_lossy(response);
        text.match_indices("HTTP/1.1 ").filter_map(|(at, _)| text.get(at + 9..at + 12)?.parse().ok()).collect()
    };
    while statuses(&response).len() < count {
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(read)) if read > 0 => response.extend_from_slice(&chunk[..read]),
            _ => break,
        }
    }
    statuses(&response)
}

fn get_line(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nhost: app.test\r\n\r\n")
}

#[tokio::test]
async fn crafted_requests_never_reach_a_denied_path() {
    let backend = Backend::echo_on("backend", [127, 0, 0, 10].into()).await;
    let proxy = Proxy::start();
    let mut t = svc_tables(to_cluster("svc"), &[backend.addr]);
    guard(&mut t, backend.addr, vec![http_rule("GET", "/public(/[^?]*)?"), http_rule("POST", "/public(/[^?]*)?")]);
    let addr = proxy.apply(t);

    assert_eq!(raw_status(addr, &get_line("/public/page")).await, Some(200));
    let forbidden = [
        // (request bytes, expected status)
        (get_line("/admin"), 403),
        (get_line("/public/../admin"), 403),
        (get_line("/public/%2e%2e/admin"), 403),
        (get_line("/public/%2E%2E/admin"), 403),
        (get_line("/public/..\\admin"), 403),
        (get_line("//admin"), 403),
        (get_line("/public/..%2fadmin"), 400),
        (get_line("/public/..%5cadmin"), 400),
        (get_line("/public/..;/admin"), 400),
        (get_line("/public/%00/../../admin"), 400),
        (get_line("http://app.test/admin"), 403),
        ("GET http://app.test/public/x HTTP/1.1\r\nhost: other.test\r\n\r\n".to_owned(), 400),
        ("GET /public/x HTTP/1.1\r\nhost: app.test\r\nhost: evil.test\r\n\r\n".to_owned(), 400),
    ];
    for (raw, expected) in &forbidden {
        let status = raw_status(addr, raw).await;
        assert_eq!(status, Some(*expected), "{raw:?}");
    }
    // CL.TE smuggling: a head with both framings is refused (Envoy's default, without
    // `allow_chunked_length`) and the connection closed, so the hidden `GET /admin` is never read.
    let smuggling = "GET /public/x HTTP/1.1\r\nhost: app.test\r\ncontent-length: 30\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nhost: app.test\r\n\r\n";
    assert_eq!(raw_status(addr, smuggling).await, Some(400));
    // TE.CL the other way round: the chunked body ends at `0`, the hidden request is one of its
    // own and policy denies it on the same connection.
    let pipelined = "POST /public/x HTTP/1.1\r\nhost: app.test\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nhost: app.test\r\n\r\n";
    assert_eq!(raw_statuses(addr, pipelined, 2).await, vec![200, 403]);
    let seen: Vec<(String, String)> = backend.seen().into_iter().map(|r| (r.path, String::from_utf8_lossy(&r.body).into_owned())).collect();
    let expected = [("/public/page", ""), ("/public/x", "abc")].map(|(path, body)| (path.to_owned(), body.to_owned()));
    assert_eq!(seen, expected, "the backend saw a path the policy denies");
}

#[tokio::test]
async fn the_backend_receives_the_canonical_path_that_policy_approved() {
    let backend = Backend::echo("backend").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend.addr]));
    assert_eq!(raw_status(addr, &get_line("/a/./b/../c//d?q=%2e")).await, Some(200));
    assert_eq!(raw_status(addr, &get_line("/%7euser")).await, Some(200));
    let seen: Vec<String> = backend.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(seen, vec!["/a/c/d?q=%2e", "/~user"]);
}
