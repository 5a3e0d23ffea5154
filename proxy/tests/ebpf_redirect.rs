//! The eBPF datapath end to end (kernel redirect -> **proxy** -> pod): sluice-ebpf's TC programs
//! hand a pod's flows to the proxy's transparent listener with `bpf_sk_assign`, the proxy
//! enforces the destination's HTTP rules, forwards from the node address with its mark, and the
//! kernel lets that connection through without redirecting or re-policing it.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use sluice_ebpf::testing::{self, http_request, Node, PodHttpServer, Reply, TestDir, NODE_IP};
use sluice_ebpf::{
    BpfState, Datapath, Direction, DropReason, Endpoint, FlowEvent, IpcacheEntry, L4Protocol, PolicyAction, PolicyEntry,
    PortRange, Protocol, Service, Verdict,
};
use sluice_proxy::flow::Verdict as ProxyVerdict;
use sluice_proxy::tables::{
    Bind, Listener, LbPolicy, ProxyTables, MARK_PROXY_EGRESS, MARK_PROXY_INGRESS,
};

use common::{allow, cluster, hcm, http_rule, ingress_only, peer, prefix_route, to_cluster, Proxy};

const CLIENT_ID: u32 = 1000;
const SERVER_ID: u32 = 2000;
/// The transparent listener every redirect of this test goes to.
const PROXY_PORT: u16 = 15080;
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);

#[test]
fn proxy_marks_agree_with_the_kernel_programs() {
    assert_eq!(MARK_PROXY_INGRESS, sluice_ebpf::abi::MARK_MAGIC_PROXY_INGRESS);
    assert_eq!(MARK_PROXY_EGRESS, sluice_ebpf::abi::MARK_MAGIC_PROXY_EGRESS);
}

/// The kernel's view: the server pod enforces ingress, port 80 from the client is redirected to
/// the proxy, and the Service VIP is an L7 (CiliumEnvoyConfig) service served by the proxy.
/// The node address is deliberately NOT in the ipcache: the proxy's upstream connection then
/// counts as `world`, which the server's policy drops, so only the proxy's mark lets it in
/// (with the node as `host` the kernel would let it pass by default and the mark would go
/// unseen).
fn kernel_state(node: &Node) -> Result<BpfState> {
    let (client, server) = (&node.pods[0], &node.pods[1]);
    let redirect_http = PolicyEntry {
        direction: Direction::Ingress,
        remote_identity: Some(CLIENT_ID),
        protocol: Protocol::Tcp,
        ports: Some(PortRange::single(80)),
        action: PolicyAction::Redirect { proxy_port: PROXY_PORT },
        auth_required: false,
    };
    Ok(BpfState {
        endpoints: vec![
            Endpoint { ip: client.ip, identity: CLIENT_ID, ifindex: node.ifindex(client)?, enforce_ingress: false, enforce_egress: false, policy: vec![] },
            Endpoint {
                ip: server.ip,
                identity: SERVER_ID,
                ifindex: node.ifindex(server)?,
                enforce_ingress: true,
                enforce_egress: false,
                policy: vec![redirect_http],
            },
        ],
        ipcache: [(client.ip, CLIENT_ID), (server.ip, SERVER_ID)]
            .into_iter()
            .map(|(ip, identity)| IpcacheEntry { cidr: ipnet::Ipv4Net::new(ip, 32).expect("/32"), identity })
            .collect(),
        services: vec![Service {
            vip: *VIP.ip(),
            port: VIP.port(),
            protocol: L4Protocol::Tcp,
            l7_proxy_port: Some(PROXY_PORT),
            backends: vec![SocketAddrV4::new(server.ip, 80)],
        }],
    })
}

/// The proxy's view, as the agent would compile it: one transparent listener whose routes go
/// to the ORIGINAL_DST cluster, the VIP dispatched to the CEC listener (whose cluster balances
/// over the Service's backends), the same identities as the kernel, and the server's HTTP rules.
fn proxy_tables(node: &Node, generation: u64, mark_upstream: bool) -> ProxyTables {
    let (client, server) = (&node.pods[0], &node.pods[1]);
    let server_addr = SocketAddr::from(SocketAddrV4::new(server.ip, 80));
    let mut original_dst = cluster("original-dst", &[]);
    original_dst.lb_policy = LbPolicy::OriginalDestination;
    let mut backends = cluster("default/echo", &[server_addr]);
    // A dropped SYN (the negative control) fails fast instead of after Envoy's 5 s.
    original_dst.connect_timeout = Duration::from_secs(1);
    backends.connect_timeout = Duration::from_secs(1);
    let mut tables = ProxyTables {
        generation,
        listeners: vec![
            Listener {
                name: "policy-ingress".into(),
                bind: Bind::Transparent { port: PROXY_PORT },
                http: Arc::new(hcm(vec![prefix_route("/", to_cluster("original-dst"))])),
            },
            Listener { name: "cec".into(), bind: Bind::LoopbackAuto, http: Arc::new(hcm(vec![prefix_route("/", to_cluster("default/echo"))])) },
        ],
        clusters: [original_dst, backends].into_iter().map(|c| (c.name.clone(), Arc::new(c))).collect(),
        frontends: [(SocketAddr::from(VIP), "cec".to_string())].into_iter().collect(),
        upstream_source: Some(IpAddr::V4(NODE_IP)),
        mark_upstream,
        ..ProxyTables::default()
    };
    tables.peers.insert(IpAddr::V4(client.ip), peer(CLIENT_ID, "default/client"));
    tables.peers.insert(IpAddr::V4(server.ip), peer(SERVER_ID, "default/server"));
    tables.policies.insert(
        IpAddr::V4(server.ip),
        ingress_only(true, vec![allow(&[CLIENT_ID], 80, Some(vec![http_rule("GET", "/public")]), "server-http")]),
    );
    tables
}

#[tokio::test]
async fn a_frontend_naming_no_listener_is_refused_and_the_old_tables_stay() {
    let backend = common::Backend::echo("old").await;
    let proxy = Proxy::start();
    let addr = proxy.apply(common::svc_tables(to_cluster("svc"), &[backend.addr]));
    let mut broken = common::svc_tables(to_cluster("svc"), &[backend.addr]);
    broken.generation = 2;
    broken.frontends.insert(SocketAddr::from(VIP), "no-such-listener".into());
    match proxy.handle.apply(broken) {
        Err(sluice_proxy::ApplyError::UnknownFrontendListener { destination, listener }) => {
            assert_eq!((destination, listener.as_str()), (SocketAddr::from(VIP), "no-such-listener"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(proxy.handle.stats().generation, 1);
    assert_eq!(common::get(addr, "/").await.status, http::StatusCode::OK);
}

fn redirected_to_proxy(events: &[FlowEvent], destination: SocketAddrV4) -> bool {
    events.iter().any(|e| e.verdict == Verdict::Redirected && e.destination == destination && e.proxy_port == PROXY_PORT)
}

#[test]
fn redirected_pod_traffic_is_policed_by_the_proxy_and_forwarded_marked() -> Result<()> {
    let test = "redirected_pod_traffic_is_policed_by_the_proxy_and_forwarded_marked";
    if !testing::privileged(test) {
        return Ok(());
    }
    let node = Node::new("rdr", 2)?;
    let _in_node = node.enter()?;
    let pins = TestDir::pins("rdr")?;
    let mut datapath = Datapath::load(&pins.path)?;
    let mut kernel_events = datapath.flow_events()?;
    datapath.apply(&kernel_state(&node)?)?;
    for pod in &node.pods {
        datapath.attach_interface(&pod.host_if)?;
    }
    // Started in the node namespace, so the proxy's runtime threads live there too.
    let mut proxy = Proxy::start();
    proxy.handle.apply(proxy_tables(&node, 1, true)).context("proxy tables")?;
    let (client, server) = (&node.pods[0], &node.pods[1]);
    let server_addr = SocketAddrV4::new(server.ip, 80);
    let server_http = PodHttpServer::start(&server.netns, server_addr, "server-pod")?;
    let get = |target, path| http_request(&client.netns, None, target, "GET", path);
    let answered = |path: &str| Reply::Http { status: 200, body: format!("GET {path}\n"), served_by: Some("server-pod".into()) };
    let denied = Reply::Http { status: 403, body: "Access denied\r\n".into(), served_by: None };

    // Allowed by the HTTP rules: the request reaches the server pod, from the node address
    // (the proxy's upstream), through the server's ingress policy thanks to the mark.
    assert_eq!(get(server_addr, "/public")?, answered("/public"));
    let seen = server_http.seen()?;
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].0.ip(), IpAddr::V4(NODE_IP), "the proxy connects from upstream_source");
    assert_eq!(seen[0].1, "GET /public HTTP/1.1");

    // Denied by the HTTP rules: 403 from the proxy, nothing reaches the server.
    assert_eq!(get(server_addr, "/private")?, denied);
    assert_eq!(server_http.seen()?.len(), 1);

    // The CiliumEnvoyConfig VIP: redirected with the VIP intact, dispatched to the CEC listener
    // by its original destination, balanced to the backend, policed like the direct flow.
    assert_eq!(get(VIP, "/public")?, answered("/public"));
    assert_eq!(get(VIP, "/private")?, denied);
    assert_eq!(server_http.seen()?.len(), 2);

    let flows = proxy.drain_flows();
    let listeners: Vec<(&str, ProxyVerdict, Option<u16>)> =
        flows.iter().map(|f| (&*f.listener, f.verdict, f.http.as_ref().and_then(|h| h.status))).collect();
    assert_eq!(
        listeners,
        vec![
            ("policy-ingress", ProxyVerdict::Forwarded, Some(200)),
            ("policy-ingress", ProxyVerdict::Dropped, Some(403)),
            ("cec", ProxyVerdict::Forwarded, Some(200)),
            ("cec", ProxyVerdict::Dropped, Some(403)),
        ]
    );
    assert!(flows.iter().all(|f| f.source.identity == CLIENT_ID), "source identity from the peer IP");

    let events = kernel_events.drain();
    assert!(redirected_to_proxy(&events, server_addr), "{events:?}");
    assert!(redirected_to_proxy(&events, VIP), "{events:?}");
    // The proxy's own connections: never redirected, never dropped.
    let from_node: Vec<&FlowEvent> = events.iter().filter(|e| *e.source.ip() == NODE_IP).collect();
    assert!(!from_node.is_empty(), "the kernel saw the proxy's connection: {events:?}");
    assert!(from_node.iter().all(|e| e.verdict == Verdict::Forwarded && e.proxy_port == 0), "{from_node:?}");
    assert!(events.iter().all(|e| e.verdict != Verdict::Dropped), "{events:?}");

    // A node process connecting to the transparent listener itself was not redirected: it has
    // no original destination, so the ORIGINAL_DST cluster has no host (no proxy-to-itself loop).
    let direct = http_request(&node.netns, None, SocketAddrV4::new(Ipv4Addr::LOCALHOST, PROXY_PORT), "GET", "/public")?;
    assert!(matches!(&direct, Reply::Http { status: 503, body, .. } if body == "no healthy upstream"), "{direct:?}");
    assert_eq!(server_http.seen()?.len(), 2);

    // Negative control: the same tables without the mark. The server's policy drops the
    // proxy's SYN (the node is `world` here), so the proxy answers 503 after its connect timeout.
    proxy.handle.apply(proxy_tables(&node, 2, false)).context("unmarked tables")?;
    match get(server_addr, "/public")? {
        Reply::Http { status, .. } => assert_eq!(status, 503),
        other => panic!("unmarked upstream: {other:?}"),
    }
    assert_eq!(server_http.seen()?.len(), 2);
    let dropped: Vec<FlowEvent> = kernel_events.drain().into_iter().filter(|e| e.verdict == Verdict::Dropped).collect();
    assert!(
        dropped.iter().any(|e| *e.source.ip() == NODE_IP
            && e.destination == server_addr
            && e.drop_reason == Some(DropReason::PolicyDenied)),
        "{dropped:?}"
    );

    proxy.handle.shutdown();
    datapath.cleanup()?;
    Ok(())
}
