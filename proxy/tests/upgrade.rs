//! WebSocket (`Upgrade`) passthrough: allowed by the listener and policy, refused by either,
//! and never switched on anything but a `101` from the upstream (CVE-2024-23326).

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use sluice_proxy::tables::HttpConnectionManager;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Reads up to the end of an HTTP head; returns the head and whatever followed it.
async fn read_head(stream: &mut TcpStream) -> (String, Vec<u8>) {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let n = stream.read(&mut chunk).await.unwrap_or(0);
        if n == 0 {
            return (String::from_utf8_lossy(&buffer).into_owned(), Vec::new());
        }
        buffer.extend_from_slice(&chunk[..n]);
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buffer.split_off(end + 4);
            return (String::from_utf8_lossy(&buffer).into_owned(), rest);
        }
    }
}

/// A raw backend that answers the first request head with `answer` and then records (and,
/// after a 101, echoes) every byte it receives. Returns its address and the bytes received.
async fn upgrade_backend(answer: &'static str, echo: bool) -> (SocketAddr, Arc<Mutex<Vec<u8>>>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Arc<Mutex<Vec<u8>>> = Arc::default();
    let heads: Arc<Mutex<Vec<String>>> = Arc::default();
    let (received_in, heads_in) = (Arc::clone(&received), Arc::clone(&heads));
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else { continue };
            let (received, heads) = (Arc::clone(&received_in), Arc::clone(&heads_in));
            tokio::spawn(async move {
                let (head, rest) = read_head(&mut stream).await;
                heads.lock().unwrap().push(head);
                received.lock().unwrap().extend_from_slice(&rest);
                let _ = stream.write_all(answer.as_bytes()).await;
                let mut chunk = [0u8; 1024];
                while let Ok(n) = stream.read(&mut chunk).await {
                    if n == 0 {
                        break;
                    }
                    received.lock().unwrap().extend_from_slice(&chunk[..n]);
                    if echo {
                        let _ = stream.write_all(&chunk[..n]).await;
                    }
                }
            });
        }
    });
    (addr, received, heads)
}

const SWITCH: &str = "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\r\n";
const UPGRADE_REQUEST: &[u8] = b"GET /ws HTTP/1.1\r\nhost: app.test\r\nconnection: Upgrade\r\nupgrade: websocket\r\n\r\n";

fn websocket_listener(upgrades: &[&str]) -> HttpConnectionManager {
    let mut http = hcm(vec![prefix_route("/", to_cluster("ws"))]);
    http.upgrades = upgrades.iter().map(|u| (*u).to_owned()).collect();
    http
}

#[tokio::test]
async fn an_allowed_websocket_upgrade_switches_and_copies_both_ways() {
    let (backend, received, heads) = upgrade_backend(SWITCH, true).await;
    let proxy = Proxy::start();
    let addr = proxy.apply(tables(1, websocket_listener(&["websocket"]), vec![cluster("ws", &[backend])]));

    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(UPGRADE_REQUEST).await.unwrap();
    let (head, _) = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    client.write_all(b"ping-frame").await.unwrap();
    let mut echoed = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut echoed)).await.unwrap().unwrap();
    assert_eq!(&echoed, b"ping-frame");
    assert_eq!(received.lock().unwrap().as_slice(), b"ping-frame");
    let upstream_head = heads.lock().unwrap()[0].to_ascii_lowercase();
    assert!(upstream_head.contains("upgrade: websocket") && upstream_head.contains("connection: upgrade"), "{upstream_head}");
}

#[tokio::test]
async fn a_listener_without_the_upgrade_type_answers_403() {
    let (backend, _, heads) = upgrade_backend(SWITCH, true).await;
    let proxy = Proxy::start();
    let addr = proxy.apply(tables(1, websocket_listener(&[]), vec![cluster("ws", &[backend])]));
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(UPGRADE_REQUEST).await.unwrap();
    let (head, _) = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(heads.lock().unwrap().is_empty(), "the backend never saw the upgrade");
}

#[tokio::test]
async fn policy_denies_the_upgrade_request_with_403() {
    let (backend, _, heads) = upgrade_backend(SWITCH, true).await;
    let proxy = Proxy::start();
    let mut t = tables(1, websocket_listener(&["websocket"]), vec![cluster("ws", &[backend])]);
    guard(&mut t, backend, vec![http_rule("GET", "/api/.*")]);
    let addr = proxy.apply(t);
    let mut client = connect_from([127, 0, 0, 20].into(), addr).await;
    client.write_all(UPGRADE_REQUEST).await.unwrap();
    let (head, _) = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(head.ends_with("\r\n\r\n"));
    assert!(heads.lock().unwrap().is_empty());
}

#[tokio::test]
async fn an_upstream_200_with_upgrade_does_not_switch_protocols() {
    let liar = "HTTP/1.1 200 OK\r\nupgrade: websocket\r\nconnection: Upgrade\r\ncontent-length: 2\r\n\r\nno";
    let (backend, received, _) = upgrade_backend(liar, false).await;
    let proxy = Proxy::start();
    let addr = proxy.apply(tables(1, websocket_listener(&["websocket"]), vec![cluster("ws", &[backend])]));
    let mut client = TcpStream::connect(addr).await.unwrap();
    client.write_all(UPGRADE_REQUEST).await.unwrap();
    let (head, _) = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("upgrade: websocket"), "hop-by-hop upgrade header leaked: {head}");
    // Bytes after a non-101 are HTTP again, never tunnelled to the backend.
    let _ = client.write_all(b"tunnel-attempt\r\n\r\n").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(received.lock().unwrap().is_empty(), "bytes reached the backend: {:?}", received.lock().unwrap());
}
