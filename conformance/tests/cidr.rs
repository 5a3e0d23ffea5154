//! CIDR peers end to end: a `fromCIDR` rule lets in clients whose address is inside the prefix
//! (they take the prefix's local identity, no pod has their address) and drops the rest.
//!
//! Gateway mode: an L3/L4 drop is a connection closed without a response (cilium.md §1.4).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Result;
use sluice_conformance::{pod, pod_ip, service, service_ip, Node, RecordingBackend, Reply};

/// Cilium's local-scope (CIDR) identities have bit 24 set.
const LOCAL_IDENTITY_SCOPE: u32 = 1 << 24;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_cidr_admits_addresses_inside_the_prefix_only() -> Result<()> {
    let net = 71;
    let workloads = format!(
        "{}{}",
        pod("web-0", "default", "{app: web}", pod_ip(net, 1), 80),
        service("web", "default", "{app: web}", service_ip(net, 1), 8000, 80),
    );
    let policy = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: from-cidr, namespace: default}}\n\
         spec:\n  endpointSelector: {{matchLabels: {{app: web}}}}\n  ingress:\n  - fromCIDR: [127.{net}.9.0/24]\n"
    );
    let backend = RecordingBackend::start(SocketAddr::new(pod_ip(net, 1), 80)).await?;
    let node = Node::start(net, &[("workloads.yaml", workloads), ("policy.yaml", policy)]).await?;
    let frontend = SocketAddr::new(service_ip(net, 1), 8000);
    let inside = IpAddr::V4(Ipv4Addr::new(127, net, 9, 9));
    let outside = IpAddr::V4(Ipv4Addr::new(127, net, 8, 8));

    let (admitted, flow) = node.request_with_flow(inside, frontend, "GET", "/inside", &[]).await?;
    assert_eq!(admitted.status(), Some(200), "{admitted:?}");
    assert_eq!(admitted.body(), "/inside");
    assert_eq!(flow.verdict, "FORWARDED");
    assert_ne!(flow.source.identity & LOCAL_IDENTITY_SCOPE, 0, "the client has the prefix's CIDR identity: {flow:?}");

    let (refused, flow) = node.request_with_flow(outside, frontend, "GET", "/outside", &[]).await?;
    assert_eq!(refused, Reply::Closed, "an L3/L4 drop closes the connection without a response");
    assert_eq!(flow.verdict, "DROPPED");
    assert_eq!(flow.drop_reason_desc.as_deref(), Some("POLICY_DENIED"));
    assert_eq!(flow.source.identity, 2, "outside every prefix is world");

    let paths: Vec<String> = backend.take().into_iter().map(|seen| seen.path).collect();
    assert_eq!(paths, vec!["/inside"]);
    node.stop().await
}
