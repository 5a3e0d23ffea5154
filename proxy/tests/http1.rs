//! sluice's HTTP/1.1 server and client on the wire: pipelining, keep-alive by version, `Expect:
//! 100-continue`, chunked bodies both ways, what a malformed body does to the connection, and
//! upstream responses ended by close, interim responses and pooled connections the upstream closed.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn connect(addr: SocketAddr) -> TcpStream {
    connect_from([127, 0, 0, 1].into(), addr).await
}

/// Reads until `done` says the bytes so far are enough, or the proxy closes (then `closed`).
async fn read_until(stream: &mut TcpStream, done: impl Fn(&str) -> bool) -> (String, bool) {
    let mut response = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&response).into_owned();
        if done(&text) {
            return (text, false);
        }
        match tokio::time::timeout(Duration::from_secs(10), stream.read(&mut chunk)).await {
            Ok(Ok(read)) if read > 0 => response.extend_from_slice(&chunk[..read]),
            Ok(_) => return (String::from_utf8_lossy(&response).into_owned(), true),
            Err(_) => panic!("no response within 10 s; so far: {}", String::from_utf8_lossy(&response)),
        }
    }
}

fn responses(text: &str) -> usize {
    text.matches("HTTP/1.1 ").count()
}

async fn echo_proxy() -> (Backend, Proxy, SocketAddr) {
    let backend = Backend::echo("backend").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend.addr]));
    (backend, proxy, addr)
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (backend, _proxy, addr) = echo_proxy().await;
    let mut stream = connect(addr).await;
    let raw = "GET /one HTTP/1.1\r\nhost: a\r\n\r\nPOST /two HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nxyzGET /three HTTP/1.1\r\nhost: a\r\n\r\n";
    stream.write_all(raw.as_bytes()).await.unwrap();
    let (text, closed) = read_until(&mut stream, |text| responses(text) == 3 && text.ends_with("backend")).await;
    assert!(!closed, "{text}");
    let paths: Vec<(String, Bytes)> = backend.seen().into_iter().map(|r| (r.path, r.body)).collect();
    assert_eq!(paths, [("/one", ""), ("/two", "xyz"), ("/three", "")].map(|(p, b)| (p.to_owned(), Bytes::from(b))));
}

#[tokio::test]
async fn keep_alive_follows_the_http_version() {
    let (_backend, _proxy, addr) = echo_proxy().await;
    // HTTP/1.0 closes after the response unless the client asks to keep the connection.
    let mut stream = connect(addr).await;
    stream.write_all(b"GET / HTTP/1.0\r\nhost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut stream, |_| false).await;
    assert!(closed && text.starts_with("HTTP/1.1 200") && text.contains("connection: close\r\n"), "{text}");

    let mut stream = connect(addr).await;
    for _ in 0..2 {
        stream.write_all(b"GET / HTTP/1.0\r\nhost: a\r\nconnection: keep-alive\r\n\r\n").await.unwrap();
        let (text, closed) = read_until(&mut stream, |text| text.ends_with("backend")).await;
        assert!(!closed && text.contains("connection: keep-alive\r\n"), "{text}");
    }
    // HTTP/1.1 `connection: close` is honoured and echoed.
    let mut stream = connect(addr).await;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut stream, |_| false).await;
    assert!(closed && text.contains("connection: close\r\n") && text.ends_with("backend"), "{text}");
}

#[tokio::test]
async fn expect_100_continue_is_answered_by_the_proxy() {
    let (backend, _proxy, addr) = echo_proxy().await;
    let mut stream = connect(addr).await;
    stream.write_all(b"PUT /up HTTP/1.1\r\nhost: a\r\ncontent-length: 5\r\nexpect: 100-continue\r\n\r\n").await.unwrap();
    let (text, _) = read_until(&mut stream, |text| text.contains("\r\n\r\n")).await;
    assert_eq!(text, "HTTP/1.1 100 Continue\r\n\r\n");
    stream.write_all(b"hello").await.unwrap();
    let (text, closed) = read_until(&mut stream, |text| text.ends_with("backend")).await;
    assert!(!closed && text.starts_with("HTTP/1.1 200"), "{text}");
    let seen = &backend.seen()[0];
    assert_eq!(seen.body, "hello");
    assert!(!seen.headers.contains_key("expect"), "the expectation is this hop's: {:?}", seen.headers);
}

#[tokio::test]
async fn connection_specific_request_headers_stop_at_the_proxy_except_te_trailers() {
    let (backend, _proxy, addr) = echo_proxy().await;
    let mut stream = connect(addr).await;
    let first = "GET /a HTTP/1.1\r\nhost: a\r\nconnection: X-Hop, host\r\nx-hop: 1\r\nkeep-alive: timeout=5\r\nproxy-connection: keep-alive\r\nte: trailers\r\nx-kept: 1\r\n\r\n";
    let second = "GET /b HTTP/1.1\r\nhost: a\r\nte: gzip\r\nx-kept: 2\r\n\r\n";
    stream.write_all(format!("{first}{second}").as_bytes()).await.unwrap();
    let (text, closed) = read_until(&mut stream, |text| responses(text) == 2 && text.ends_with("backend")).await;
    assert!(!closed, "{text}");
    let seen = backend.seen();
    let first = &seen[0].headers;
    for gone in ["x-hop", "keep-alive", "proxy-connection"] {
        assert!(!first.contains_key(gone), "{gone} crossed the proxy: {first:?}");
    }
    assert!(first.get("connection").is_none_or(|value| !value.to_str().unwrap().contains("X-Hop")), "{first:?}");
    assert_eq!(first.get("te").unwrap(), "trailers", "gRPC needs te: trailers: {first:?}");
    assert_eq!(first.get("host").unwrap(), "a", "a Connection header cannot remove host: {first:?}");
    assert_eq!(first.get("x-kept").unwrap(), "1");
    let second = &seen[1].headers;
    assert!(!second.contains_key("te"), "te other than trailers is this hop's: {second:?}");
    assert_eq!(second.get("x-kept").unwrap(), "2");
}

/// A backend that reads request heads (bodiless requests only) and answers each with `reply`,
/// closing the connection after it when `close` says so. Returns its address and a count of the
/// connections it accepted.
async fn scripted_backend(reply: &'static [u8], close: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    let (addr, accepted, _) = scripted_backend_counting_closes(reply, close).await;
    (addr, accepted)
}

/// `scripted_backend`, also counting the connections the proxy closed.
async fn scripted_backend_counting_closes(reply: &'static [u8], close: bool) -> (SocketAddr, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed_by_proxy = Arc::new(AtomicUsize::new(0));
    let (counter, closes) = (Arc::clone(&accepted), Arc::clone(&closed_by_proxy));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            let closes = Arc::clone(&closes);
            tokio::spawn(async move {
                loop {
                    let (head, closed) = read_until(&mut stream, |text| text.contains("\r\n\r\n")).await;
                    if closed {
                        closes.fetch_add(1, Ordering::SeqCst);
                    }
                    if closed || head.is_empty() || stream.write_all(reply).await.is_err() || close {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted, closed_by_proxy)
}

#[tokio::test]
async fn pooled_connections_of_a_removed_cluster_are_closed() {
    let (backend, accepted, closed) = scripted_backend_counting_closes(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
    let other = Backend::echo("other").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend]));
    assert!(get_through(addr).await.ends_with("\r\n\r\nok"));
    assert_eq!((accepted.load(Ordering::SeqCst), closed.load(Ordering::SeqCst)), (1, 0), "pooled, open");
    // The same service now has another endpoint: the old host and its pool go away.
    proxy.apply(svc_tables(to_cluster("svc"), &[other.addr]));
    let gone = async {
        while closed.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone).await.expect("the proxy closes the removed host's pooled connection");
}

/// A backend answering every request with a body of unknown length, in two chunks.
async fn chunked_backend() -> SocketAddr {
    scripted_backend(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\ngot:\r\n3\r\nxyz\r\n0\r\n\r\n", false).await.0
}

async fn get_through(addr: SocketAddr) -> String {
    let mut stream = connect(addr).await;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n").await.unwrap();
    read_until(&mut stream, |_| false).await.0
}

#[tokio::test]
async fn an_upstream_body_ended_by_close_is_passed_on_and_its_connection_not_reused() {
    let (backend, accepted) = scripted_backend(b"HTTP/1.1 200 OK\r\nx-from: raw\r\n\r\nuntil close", true).await;
    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend]));
    for _ in 0..2 {
        let text = get_through(addr).await;
        assert!(text.starts_with("HTTP/1.1 200") && text.contains("x-from: raw"), "{text}");
        // Of unknown length, so chunked for this HTTP/1.1 client.
        let body = &text[text.find("\r\n\r\n").expect("head end") + 4..];
        assert_eq!(dechunk(body), "until close");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "a close-delimited response ends its connection");
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_not_used_again() {
    // Answers with a length (so the proxy pools the connection), then closes it anyway.
    let (backend, accepted) = scripted_backend(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", true).await;
    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend]));
    for _ in 0..3 {
        let text = get_through(addr).await;
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nok"), "{text}");
        // Let the close reach the proxy's pooled connection before the next request.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
    assert_eq!(proxy.handle.stats().clusters["svc"].upstream_rq_total, 3, "no request failed and was retried");
}

#[tokio::test]
async fn interim_upstream_responses_are_skipped() {
    let (backend, accepted) = scripted_backend(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nfinal", false).await;
    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[backend]));
    for _ in 0..2 {
        let text = get_through(addr).await;
        assert!(text.starts_with("HTTP/1.1 200") && text.ends_with("\r\n\r\nfinal") && responses(&text) == 1, "{text}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the connection was pooled and reused");
}

#[tokio::test]
async fn chunked_bodies_pass_through_both_ways() {
    let (backend, _proxy, addr) = echo_proxy().await;
    let mut stream = connect(addr).await;
    stream.write_all(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n4\r\nab").await.unwrap();
    stream.write_all(b"cd\r\n2;ext=1\r\nef\r\n0\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut stream, |text| text.ends_with("backend")).await;
    assert!(!closed && text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(backend.seen()[0].body, "abcdef");

    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[chunked_backend().await]));
    let mut stream = connect(addr).await;
    stream.write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut stream, |text| text.ends_with("0\r\n\r\n")).await;
    assert!(!closed && text.contains("transfer-encoding: chunked\r\n"), "{text}");
    let body = &text[text.find("\r\n\r\n").expect("head end") + 4..];
    assert_eq!(dechunk(body), "got:xyz");

    // An HTTP/1.0 client cannot read chunked framing: the end of the connection ends the body.
    let mut stream = connect(addr).await;
    stream.write_all(b"GET / HTTP/1.0\r\nhost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut stream, |_| false).await;
    assert!(closed && !text.contains("transfer-encoding") && text.ends_with("\r\n\r\ngot:xyz"), "{text}");
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n").expect("chunk size line");
        let size = usize::from_str_radix(size, 16).expect("hex size");
        if size == 0 {
            return out;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
}

#[tokio::test]
async fn a_malformed_chunked_body_never_reaches_the_backend_whole() {
    let (backend, _proxy, addr) = echo_proxy().await;
    let mut stream = connect(addr).await;
    // A chunk size with a sign in it: the proxy cannot know where this body ends.
    stream.write_all(b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n+3\r\nabc\r\n0\r\n\r\nGET /next HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut stream, |_| false).await;
    assert!(closed, "the connection must not carry on: {text}");
    assert!(responses(&text) <= 1 && !text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(backend.seen().iter().all(|r| r.path != "/next" && r.body != "abc"), "{:?}", backend.seen().len());
}

#[tokio::test]
async fn a_head_request_gets_the_length_but_no_body() {
    let (_backend, _proxy, addr) = echo_proxy().await;
    let mut stream = connect(addr).await;
    stream.write_all(b"HEAD / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n").await.unwrap();
    let (text, closed) = read_until(&mut stream, |text| responses(text) == 2 && text.ends_with("backend")).await;
    assert!(!closed, "{text}");
    let head = &text[..text.find("\r\n\r\n").expect("head end") + 4];
    assert!(head.contains("content-length: 7\r\n"), "{head}");
    assert!(text[head.len()..].starts_with("HTTP/1.1 200"), "no body after a HEAD response: {text}");
}
