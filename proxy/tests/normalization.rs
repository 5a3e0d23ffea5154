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

fn get_line(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nhost: app.test\r\n\r\n")
}

#[tokio::test]
async fn crafted_requests_never_reach_a_denied_path() {
    let backend = Backend::echo_on("backend", [127, 0, 0, 10].into()).await;
    let proxy = Proxy::start();
    let mut t = svc_tables(to_cluster("svc"), &[backend.addr]);
    guard(&mut t, backend.addr, vec![http_rule("GET", "/public(/[^?]*)?")]);
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
    // CL.TE smuggling: chunked framing wins (the content-length is dropped), so the hidden
    // `GET /admin` is a request of its own, which policy sees and denies.
    let smuggling = "GET /public/x HTTP/1.1\r\nhost: app.test\r\ncontent-length: 30\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nhost: app.test\r\n\r\n";
    assert_eq!(raw_status(addr, smuggling).await, Some(200));
    let seen: Vec<String> = backend.seen().into_iter().map(|r| r.path).collect();
    assert_eq!(seen, vec!["/public/page", "/public/x"], "the backend saw a path the policy denies");
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
