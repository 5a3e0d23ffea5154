//! Live reload: table swaps under continuous load fail no request, keep-alive connections and
//! automatic ports survive swaps, removed listeners drain, and a failed apply changes nothing.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::StatusCode;
use http_body_util::Full;
use sluice_proxy::tables::{Bind, Listener, ProxyTables};
use sluice_proxy::ApplyError;

const CLIENT: [u8; 4] = [127, 0, 0, 20];

fn generation(n: u64, blue: SocketAddr, green: SocketAddr) -> ProxyTables {
    // Even generations route to blue, odd ones to green; odd ones also carry an L7 policy that
    // allows the client's GETs, so policy compiles and swaps along with routes.
    let green_generation = n % 2 == 1;
    let target = if green_generation { "green" } else { "blue" };
    let mut t = tables(n, hcm(vec![prefix_route("/", to_cluster(target))]), vec![cluster("blue", &[blue]), cluster("green", &[green])]);
    t.peers.insert(IpAddr::from(CLIENT), peer(400, "default/client"));
    if green_generation {
        let backend_ip = green.ip();
        t.policies.insert(backend_ip, ingress_only(true, vec![allow(&[400], green.port(), Some(vec![http_rule("GET", "/.*")]), "reload")]));
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swapping_routes_and_policy_under_load_fails_no_request() {
    let blue = Backend::echo("blue").await;
    let green = Backend::echo("green").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(generation(0, blue.addr, green.addr));

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed: Arc<Mutex<Vec<String>>> = Arc::default();
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (stop, ok, failed) = (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed));
        clients.push(tokio::spawn(async move {
            let client = pooled_client(IpAddr::from(CLIENT));
            while !stop.load(Ordering::Relaxed) {
                match client.get(format!("http://{addr}/load").parse().unwrap()).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    other => failed.lock().unwrap().push(format!("{other:?}")),
                }
            }
        }));
    }
    for n in 1..=40u64 {
        let applied = proxy.handle.apply(generation(n, blue.addr, green.addr)).unwrap();
        assert_eq!(applied.listeners[0].addr, addr, "the automatic port stays across swaps");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let failed = failed.lock().unwrap();
    assert!(failed.is_empty(), "{} failed requests, e.g. {:?}", failed.len(), failed.first());
    assert!(ok.load(Ordering::Relaxed) > 100, "only {} requests ran", ok.load(Ordering::Relaxed));
    assert!(blue.hits() > 0 && green.hits() > 0, "both generations served");
    assert_eq!(proxy.handle.stats().generation, 40);
}

#[tokio::test]
async fn a_keep_alive_connection_survives_a_swap_and_sees_the_new_routes() {
    let blue = Backend::echo("blue").await;
    let green = Backend::echo("green").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(generation(0, blue.addr, green.addr));
    let mut sender = http1_connect(IpAddr::from(CLIENT), addr).await;
    let request = || http::Request::get("/").header("host", "app").body(Full::new(Bytes::new())).unwrap();
    assert_eq!(send(&mut sender, request()).await.unwrap().body, "blue");
    proxy.handle.apply(generation(1, blue.addr, green.addr)).unwrap();
    assert_eq!(send(&mut sender, request()).await.unwrap().body, "green");
    assert_eq!(proxy.handle.stats().downstream_cx_total, 1);
}

#[tokio::test]
async fn a_removed_listener_stops_accepting_and_lets_in_flight_requests_finish() {
    let (slow, release) = gated("slow").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(svc_tables(to_cluster("svc"), &[slow.addr]));
    let in_flight = tokio::spawn(async move { get(addr, "/").await });
    while slow.hits() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut empty = tables(2, hcm(vec![]), vec![]);
    empty.listeners.clear();
    assert!(proxy.handle.apply(empty).unwrap().listeners.is_empty());
    release.send(true).unwrap();
    assert_eq!(in_flight.await.unwrap().body, "slow");
    let mut refused = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_err() {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(refused, "the removed listener's port still accepts");
}

#[tokio::test]
async fn a_failed_apply_keeps_the_old_tables_and_listeners() {
    let blue = Backend::echo("blue").await;
    let green = Backend::echo("green").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(generation(0, blue.addr, green.addr));

    let occupied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = occupied.local_addr().unwrap();
    let mut broken = generation(1, blue.addr, green.addr);
    broken.listeners.push(Listener { name: "taken".into(), bind: Bind::Addr(taken), http: Arc::clone(&broken.listeners[0].http) });
    match proxy.handle.apply(broken) {
        Err(ApplyError::Bind { listener, addr, .. }) => assert_eq!((listener.as_str(), addr), ("taken", taken)),
        other => panic!("expected a bind error, got {other:?}"),
    }
    assert_eq!(get(addr, "/").await.body, "blue", "generation 0 still routes");
    assert_eq!(proxy.handle.stats().generation, 0);

    // Explicit addresses work once free, and keep their socket across a rename.
    drop(occupied);
    let mut fixed = generation(2, blue.addr, green.addr);
    fixed.listeners.push(Listener { name: "explicit".into(), bind: Bind::Addr(taken), http: Arc::clone(&fixed.listeners[0].http) });
    let applied = proxy.handle.apply(fixed).unwrap();
    assert_eq!(applied.listeners[1].addr, taken);
    assert_eq!(get(taken, "/").await.body, "blue");
    let mut renamed = generation(4, blue.addr, green.addr);
    renamed.listeners.push(Listener { name: "renamed".into(), bind: Bind::Addr(taken), http: Arc::clone(&renamed.listeners[0].http) });
    let applied = proxy.handle.apply(renamed).unwrap();
    assert_eq!(applied.listeners[1].name, "renamed");
    assert_eq!(get(taken, "/").await.body, "blue");
}
