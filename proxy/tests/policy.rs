//! L7 policy end to end: allowed, `403 Access denied`, and L3/L4 denial without a response,
//! with the caller's identity taken from its source address.

mod common;

use std::net::IpAddr;

use common::*;
use http::StatusCode;
use sluice_proxy::flow::{DropReason, TrafficDirection, Verdict};
use sluice_proxy::tables::{DirectionPolicy, EndpointPolicy, L4Match, PortRange, Protocol, Remotes, IDENTITY_WORLD};

const BACKEND_IP: [u8; 4] = [127, 0, 0, 10];
const FRONTEND: [u8; 4] = [127, 0, 0, 20];
const OTHER: [u8; 4] = [127, 0, 0, 30];
const STRANGER: [u8; 4] = [127, 0, 0, 99];

#[tokio::test]
async fn ingress_policy_allows_denies_with_403_and_drops_at_l4() {
    let backend = Backend::echo_on("backend", IpAddr::from(BACKEND_IP)).await;
    let mut proxy = Proxy::start();
    let mut tables = svc_tables(to_cluster("svc"), &[backend.addr]);
    tables.peers.insert(IpAddr::from(BACKEND_IP), peer(300, "default/backend"));
    tables.peers.insert(IpAddr::from(FRONTEND), peer(400, "default/frontend"));
    tables.peers.insert(IpAddr::from(OTHER), peer(500, "default/other"));
    tables.policies.insert(
        IpAddr::from(BACKEND_IP),
        ingress_only(
            true,
            vec![allow(&[400], backend.addr.port(), Some(vec![http_rule("GET", "/public(/.*)?")]), "CiliumNetworkPolicy default/l7 spec.ingress[0]")],
        ),
    );
    let addr = proxy.apply(tables);

    let allowed = get_from(IpAddr::from(FRONTEND), addr, "/public/page").await.unwrap();
    assert_eq!(allowed.status, StatusCode::OK);
    assert_eq!(allowed.body, "backend");

    let denied = get_from(IpAddr::from(FRONTEND), addr, "/private").await.unwrap();
    assert_eq!(denied.status, StatusCode::FORBIDDEN);
    assert_eq!(denied.body, "Access denied\r\n");

    // Identity 500 has no L3/L4 allow: no response at all, the connection just closes.
    let dropped = get_from(IpAddr::from(OTHER), addr, "/public/page").await;
    assert!(dropped.is_err(), "L3/L4 deny must not answer: {dropped:?}");
    let stranger = get_from(IpAddr::from(STRANGER), addr, "/public/page").await;
    assert!(stranger.is_err(), "world identity must not be answered: {stranger:?}");

    assert_eq!(backend.seen().iter().map(|r| r.path.as_str()).collect::<Vec<_>>(), vec!["/public/page"]);

    let flows = proxy.drain_flows();
    assert_eq!(flows.len(), 4);
    assert_eq!(flows[0].verdict, Verdict::Forwarded);
    assert_eq!(flows[0].source.identity, 400);
    assert_eq!(flows[0].source.name.as_deref(), Some("default/frontend"));
    assert_eq!(flows[0].destination.identity, 300);
    assert_eq!(flows[0].destination.ip, IpAddr::from(BACKEND_IP));
    assert_eq!(flows[0].attempts, 1);
    assert_eq!(flows[0].http.as_ref().and_then(|h| h.status), Some(200));
    assert_eq!(flows[0].policy.as_deref(), Some("CiliumNetworkPolicy default/l7 spec.ingress[0]"));
    assert_eq!(flows[0].direction, Some(TrafficDirection::Ingress), "allowed by the destination's ingress policy");

    assert_eq!(flows[1].verdict, Verdict::Dropped);
    assert_eq!(flows[1].drop_reason, Some(DropReason::L7PolicyDenied));
    assert_eq!(flows[1].direction, Some(TrafficDirection::Ingress));
    assert_eq!(flows[1].http.as_ref().and_then(|h| h.status), Some(403));
    assert_eq!(flows[1].attempts, 0);

    assert_eq!(flows[2].drop_reason, Some(DropReason::PolicyDenied));
    assert_eq!(flows[2].source.identity, 500);
    assert_eq!(flows[2].http.as_ref().and_then(|h| h.status), None);
    assert_eq!(flows[3].source.identity, IDENTITY_WORLD);
    assert_eq!(flows[3].source.name, None);
}

#[tokio::test]
async fn the_sources_egress_policy_applies_too() {
    let backend = Backend::echo_on("backend", IpAddr::from(BACKEND_IP)).await;
    let proxy = Proxy::start();
    let mut tables = svc_tables(to_cluster("svc"), &[backend.addr]);
    tables.peers.insert(IpAddr::from(BACKEND_IP), peer(300, "default/backend"));
    tables.peers.insert(IpAddr::from(FRONTEND), peer(400, "default/frontend"));
    // The frontend may only GET /api/* from identity 300; the backend has no policy.
    tables.policies.insert(
        IpAddr::from(FRONTEND),
        egress_only(true, vec![allow(&[300], backend.addr.port(), Some(vec![http_rule("GET", "/api/.*")]), "egress rule")]),
    );
    let addr = proxy.apply(tables);

    assert_eq!(get_from(IpAddr::from(FRONTEND), addr, "/api/v1").await.unwrap().status, StatusCode::OK);
    let denied = get_from(IpAddr::from(FRONTEND), addr, "/admin").await.unwrap();
    assert_eq!((denied.status, denied.body.as_str()), (StatusCode::FORBIDDEN, "Access denied\r\n"));
    // Another source has no egress policy and the backend none for ingress.
    assert_eq!(get_from(IpAddr::from(OTHER), addr, "/admin").await.unwrap().status, StatusCode::OK);
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn an_l7_denial_keeps_the_keep_alive_connection() {
    let backend = Backend::echo_on("backend", IpAddr::from(BACKEND_IP)).await;
    let proxy = Proxy::start();
    let mut tables = svc_tables(to_cluster("svc"), &[backend.addr]);
    tables.peers.insert(IpAddr::from(FRONTEND), peer(400, "default/frontend"));
    tables.policies.insert(
        IpAddr::from(BACKEND_IP),
        ingress_only(true, vec![allow(&[400], backend.addr.port(), Some(vec![http_rule("GET", "/ok")]), "rule")]),
    );
    let addr = proxy.apply(tables);

    // One keep-alive connection: allowed, then 403 (the connection stays), then allowed again.
    let mut sender = http1_connect(IpAddr::from(FRONTEND), addr).await;
    let request = |path: &str| http::Request::get(path).header("host", "x").body(http_body_util::Full::default()).unwrap();
    assert_eq!(send(&mut sender, request("/ok")).await.unwrap().status, StatusCode::OK);
    assert_eq!(send(&mut sender, request("/no")).await.unwrap().status, StatusCode::FORBIDDEN);
    assert_eq!(send(&mut sender, request("/ok")).await.unwrap().status, StatusCode::OK);
    assert_eq!(backend.hits(), 2);
}

#[tokio::test]
async fn a_deny_rule_drops_without_a_response_and_the_flow_names_it() {
    let backend = Backend::echo_on("backend", IpAddr::from(BACKEND_IP)).await;
    let mut proxy = Proxy::start();
    let mut tables = svc_tables(to_cluster("svc"), &[backend.addr]);
    tables.peers.insert(IpAddr::from(FRONTEND), peer(400, "default/frontend"));
    tables.peers.insert(IpAddr::from(OTHER), peer(500, "default/other"));
    let deny = L4Match {
        remotes: Remotes::Only([500].into()),
        ports: vec![PortRange { protocol: Protocol::Tcp, start: backend.addr.port(), end: backend.addr.port() }],
        origin: "CiliumNetworkPolicy default/lockdown spec.ingressDeny[0]".into(),
    };
    tables.policies.insert(
        IpAddr::from(BACKEND_IP),
        std::sync::Arc::new(EndpointPolicy {
            ingress: DirectionPolicy {
                default_deny: false,
                deny: vec![deny],
                allow: vec![allow(&[400, 500], backend.addr.port(), None, "CiliumNetworkPolicy default/open spec.ingress[0]")],
            },
            egress: DirectionPolicy::default(),
        }),
    );
    let addr = proxy.apply(tables);

    assert_eq!(get_from(IpAddr::from(FRONTEND), addr, "/").await.unwrap().status, StatusCode::OK);
    assert!(get_from(IpAddr::from(OTHER), addr, "/").await.is_err(), "a deny drop has no response");
    let flows = proxy.drain_flows();
    assert_eq!(flows[1].drop_reason, Some(DropReason::PolicyDeny));
    assert_eq!(flows[1].direction, Some(TrafficDirection::Ingress));
    assert_eq!(flows[1].policy.as_deref(), Some("CiliumNetworkPolicy default/lockdown spec.ingressDeny[0]"));
    assert_eq!(backend.hits(), 1);
}

/// Every flow says which side the proxy stood on (Hubble's `reporter`: server for ingress,
/// client for egress): whose policy was enforced, else whether the client is known.
#[tokio::test]
async fn every_flow_has_a_direction() {
    let backend = Backend::echo_on("backend", IpAddr::from(BACKEND_IP)).await;
    let mut proxy = Proxy::start();
    let mut tables = svc_tables(to_cluster("svc"), &[backend.addr]);
    tables.peers.insert(IpAddr::from(FRONTEND), peer(400, "default/frontend"));
    tables.peers.insert(IpAddr::from(OTHER), peer(500, "default/other"));
    // Only the frontend has a policy: egress to the (world) backend on its port.
    tables.policies.insert(IpAddr::from(FRONTEND), egress_only(true, vec![allow(&[IDENTITY_WORLD], backend.addr.port(), None, "egress rule")]));
    let addr = proxy.apply(tables);

    assert_eq!(get_from(IpAddr::from(FRONTEND), addr, "/").await.unwrap().status, StatusCode::OK);
    assert_eq!(get_from(IpAddr::from(OTHER), addr, "/").await.unwrap().status, StatusCode::OK);
    assert_eq!(get_from(IpAddr::from(STRANGER), addr, "/").await.unwrap().status, StatusCode::OK);
    let bad = get_from(IpAddr::from(STRANGER), addr, "/a%2Fb").await.unwrap();
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    let flows = proxy.drain_flows();
    let directions: Vec<_> = flows.iter().map(|flow| flow.direction).collect();
    assert_eq!(
        directions,
        vec![
            Some(TrafficDirection::Egress),  // the source's egress policy allowed it
            Some(TrafficDirection::Egress),  // no policy, a known workload as client
            Some(TrafficDirection::Ingress), // no policy, a world client: the gateway's server side
            Some(TrafficDirection::Ingress), // rejected before any policy, world client
        ]
    );
    assert_eq!(flows[0].policy.as_deref(), Some("egress rule"));
}
