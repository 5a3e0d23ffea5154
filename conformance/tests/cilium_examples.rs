//! Cilium's own example policies and Envoy configs, unchanged, enforced end to end.
//!
//! Each test loads one file from `conformance/cilium-examples/` as written, plays the pods its
//! selectors name on loopback addresses, and checks the behaviour Cilium documents for it
//! (reference: cilium.md §1, §2, §6). In gateway mode an L3/L4 drop is a connection closed
//! without a response; an L7 denial is `403 Access denied`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::Result;
use sluice_conformance::{pod, pod_ip, request, service, service_ip, Node, RecordingBackend, Reply};

fn example(name: &str) -> Result<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("cilium-examples").join(name);
    Ok(std::fs::read_to_string(path)?)
}

/// A node running `policy_file` (unchanged) with `workloads`, and one recording backend per
/// `(pod number, port)`.
async fn node_with(net: u8, workloads: String, example_file: &str, backends: &[(u8, u16)]) -> Result<(Node, Vec<RecordingBackend>)> {
    let mut started = Vec::new();
    for (host, port) in backends {
        started.push(RecordingBackend::start(SocketAddr::new(pod_ip(net, *host), *port)).await?);
    }
    let node = Node::start(net, &[("workloads.yaml", workloads), (example_file, example(example_file)?)]).await?;
    Ok((node, started))
}

fn assert_forbidden(reply: &Reply, what: &str) {
    assert_eq!(reply.status(), Some(403), "{what}: {reply:?}");
    assert_eq!(reply.body(), "Access denied\r\n", "{what}");
}

fn assert_dropped(reply: &Reply, what: &str) {
    assert_eq!(reply, &Reply::Closed, "{what}: an L3/L4 drop closes the connection without a response");
}

/// `examples/policies/l7/http/http.yaml`: a peer-less L7 rule on port 80 of `app: myService`:
/// `GET /path1$` and `PUT /path2$` with `X-My-Header: true`, from anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_yaml_method_path_and_header_rules() -> Result<()> {
    let net = 63;
    let workloads = format!(
        "{}{}{}",
        pod("my-service-0", "default", "{app: myService}", pod_ip(net, 1), 80),
        pod("anyone", "default", "{app: client}", pod_ip(net, 2), 80),
        service("my-service", "default", "{app: myService}", service_ip(net, 1), 8000, 80),
    );
    let (node, _backends) = node_with(net, workloads, "http.yaml", &[(1, 80)]).await?;
    let client = pod_ip(net, 2);
    let frontend = SocketAddr::new(service_ip(net, 1), 8000);

    assert_eq!(request(client, frontend, "GET", "/path1", &[]).await?.status(), Some(200));
    assert_forbidden(&request(client, frontend, "GET", "/path1/more", &[]).await?, "the path regex is anchored");
    assert_forbidden(&request(client, frontend, "GET", "/path2", &[]).await?, "GET is only allowed on /path1");
    assert_forbidden(&request(client, frontend, "PUT", "/path2", &[("Content-Length", "0")]).await?, "PUT needs the header");
    let with_header = request(client, frontend, "PUT", "/path2", &[("X-My-Header", "true"), ("Content-Length", "0")]).await?;
    assert_eq!(with_header.status(), Some(200), "{with_header:?}");
    let wrong_value = request(client, frontend, "PUT", "/path2", &[("X-My-Header", "false"), ("Content-Length", "0")]).await?;
    assert_forbidden(&wrong_value, "the header value must match exactly");
    node.stop().await
}

/// `examples/policies/l7/http/simple/l7.yaml`: only `env: prod` may `GET /public` on port 80.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_yaml_allows_get_public_from_prod_only() -> Result<()> {
    let net = 64;
    let workloads = format!(
        "{}{}{}{}",
        pod("service-0", "default", "{app: service}", pod_ip(net, 1), 80),
        pod("prod", "default", "{env: prod}", pod_ip(net, 2), 80),
        pod("dev", "default", "{env: dev}", pod_ip(net, 3), 80),
        service("service", "default", "{app: service}", service_ip(net, 1), 8000, 80),
    );
    let (node, _backends) = node_with(net, workloads, "l7.yaml", &[(1, 80)]).await?;
    let frontend = SocketAddr::new(service_ip(net, 1), 8000);
    let (prod, dev) = (pod_ip(net, 2), pod_ip(net, 3));

    assert_eq!(request(prod, frontend, "GET", "/public", &[]).await?.status(), Some(200));
    assert_forbidden(&request(prod, frontend, "GET", "/public?page=2", &[]).await?, "Cilium matches the path with its query");
    assert_forbidden(&request(prod, frontend, "POST", "/public", &[("Content-Length", "0")]).await?, "only GET");
    let (reply, flow) = node.request_with_flow(dev, frontend, "GET", "/public", &[]).await?;
    assert_dropped(&reply, "env=dev has no L3 allow");
    assert_eq!(flow.verdict, "DROPPED");
    assert_eq!(flow.drop_reason_desc.as_deref(), Some("POLICY_DENIED"));
    node.stop().await
}

/// `examples/policies/l7/http/l7_multi.yaml` (`specs:`): ingress lets prod `GET /public`, but
/// prod's own egress rule on port 80 only allows `POST` to `external-service.org`, and both
/// policies apply to the same request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_multi_yaml_applies_source_egress_and_destination_ingress() -> Result<()> {
    let net = 65;
    let workloads = format!(
        "{}{}{}",
        pod("service-0", "default", "{app: service}", pod_ip(net, 1), 80),
        pod("prod", "default", "{env: prod}", pod_ip(net, 2), 80),
        service("service", "default", "{app: service}", service_ip(net, 1), 8000, 80),
    );
    let (node, _backends) = node_with(net, workloads, "l7_multi.yaml", &[(1, 80)]).await?;
    let frontend = SocketAddr::new(service_ip(net, 1), 8000);
    let prod = pod_ip(net, 2);

    let (reply, flow) = node.request_with_flow(prod, frontend, "GET", "/public", &[]).await?;
    assert_forbidden(&reply, "prod's egress only allows POST");
    assert_eq!(flow.traffic_direction.as_deref(), Some("EGRESS"), "the source's egress policy decided: {flow:?}");

    let (post, flow) =
        node.request_with_flow(prod, frontend, "POST", "/public", &[("Host", "external-service.org"), ("Content-Length", "0")]).await?;
    assert_forbidden(&post, "egress allows it, the destination's ingress only allows GET");
    assert_eq!(flow.traffic_direction.as_deref(), Some("INGRESS"), "the destination's ingress policy decided: {flow:?}");
    node.stop().await
}

/// `examples/policies/l3/egress-deny/egress-deny.yaml`: `role: frontend` may talk to everything
/// except `role: backend` (deny beats the `all` allow).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_deny_yaml_beats_allow_all() -> Result<()> {
    let net = 66;
    let workloads = format!(
        "{}{}{}{}{}",
        pod("backend", "default", "{role: backend}", pod_ip(net, 1), 8080),
        pod("frontend", "default", "{role: frontend}", pod_ip(net, 2), 8080),
        pod("other", "default", "{role: other}", pod_ip(net, 3), 8080),
        service("backend", "default", "{role: backend}", service_ip(net, 1), 8000, 8080),
        service("other", "default", "{role: other}", service_ip(net, 2), 8000, 8080),
    );
    let (node, _backends) = node_with(net, workloads, "egress-deny.yaml", &[(1, 8080), (3, 8080)]).await?;
    let frontend_pod = pod_ip(net, 2);

    let (reply, flow) = node.request_with_flow(frontend_pod, SocketAddr::new(service_ip(net, 1), 8000), "GET", "/", &[]).await?;
    assert_dropped(&reply, "egressDeny to backend");
    assert_eq!(flow.drop_reason_desc.as_deref(), Some("POLICY_DENY"), "an explicit deny: {flow:?}");
    let other = request(frontend_pod, SocketAddr::new(service_ip(net, 2), 8000), "GET", "/", &[]).await?;
    assert_eq!(other.status(), Some(200), "toEntities all still allows the rest: {other:?}");
    node.stop().await
}

/// `examples/policies/l3/entities/from_world_deny.yaml` (CCNP): every pod accepts traffic from
/// `all` entities except `world` (addresses that are no pod or node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_world_deny_yaml_blocks_world_only() -> Result<()> {
    let net = 67;
    let workloads = format!(
        "{}{}{}",
        pod("echo", "default", "{app: echo}", pod_ip(net, 1), 8080),
        pod("client", "other", "{app: client}", pod_ip(net, 2), 8080),
        service("echo", "default", "{app: echo}", service_ip(net, 1), 8000, 8080),
    );
    let (node, _backends) = node_with(net, workloads, "from_world_deny.yaml", &[(1, 8080)]).await?;
    let frontend = SocketAddr::new(service_ip(net, 1), 8000);
    let outsider = IpAddr::V4(Ipv4Addr::new(127, net, 9, 9));

    assert_eq!(request(pod_ip(net, 2), frontend, "GET", "/", &[]).await?.status(), Some(200), "a pod in another namespace");
    let (reply, flow) = node.request_with_flow(outsider, frontend, "GET", "/", &[]).await?;
    assert_dropped(&reply, "world is denied");
    assert_eq!(flow.source.identity, 2, "an unknown address is the world identity: {flow:?}");
    node.stop().await
}

/// `examples/kubernetes/servicemesh/cnp-with-mutual-auth.yaml` and its twin without: the same
/// L7 rule, but `authentication.mode: required` cannot be satisfied without mTLS, so it fails
/// closed instead of letting traffic through unauthenticated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_auth_required_fails_closed_until_mtls_exists() -> Result<()> {
    let net = 68;
    let workloads = format!(
        "{}{}{}",
        pod("echo", "default", "{app: echo}", pod_ip(net, 1), 3000),
        pod("pod-worker", "default", "{app: pod-worker}", pod_ip(net, 2), 3000),
        service("echo", "default", "{app: echo}", service_ip(net, 1), 3000, 3000),
    );
    let (mut node, _backends) = node_with(net, workloads, "cnp-without-mutual-auth.yaml", &[(1, 3000)]).await?;
    let frontend = SocketAddr::new(service_ip(net, 1), 3000);
    let worker = pod_ip(net, 2);

    assert_eq!(request(worker, frontend, "GET", "/headers", &[]).await?.status(), Some(200));
    assert_forbidden(&request(worker, frontend, "GET", "/ip", &[]).await?, "only GET /headers");

    std::fs::remove_file(node.config_dir().join("cnp-without-mutual-auth.yaml"))?;
    node.apply("cnp-with-mutual-auth.yaml", &example("cnp-with-mutual-auth.yaml")?).await?;
    let (reply, flow) = node.request_with_flow(worker, frontend, "GET", "/headers", &[]).await?;
    assert_dropped(&reply, "authentication required, none possible");
    assert_eq!(flow.drop_reason_desc.as_deref(), Some("AUTH_REQUIRED"), "{flow:?}");
    node.stop().await
}

/// `examples/kubernetes/servicemesh/envoy/envoy-traffic-management-test.yaml` (CCEC): the two
/// echo Services are served by one listener that splits 50/50, rewrites `^/foo.*$` to `/` and
/// retries 5xx.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_traffic_management_splits_and_rewrites() -> Result<()> {
    let net = 69;
    let workloads = format!(
        "{}{}{}{}{}",
        pod("echo-service-1-0", "default", "{kind: echo, name: echo-service-1}", pod_ip(net, 1), 8080),
        pod("echo-service-2-0", "default", "{kind: echo, name: echo-service-2}", pod_ip(net, 2), 8080),
        pod("client", "default", "{kind: client, name: client}", pod_ip(net, 3), 8080),
        service("echo-service-1", "default", "{name: echo-service-1}", service_ip(net, 1), 8080, 8080),
        service("echo-service-2", "default", "{name: echo-service-2}", service_ip(net, 2), 8080, 8080),
    );
    let (node, backends) =
        node_with(net, workloads, "envoy-traffic-management-test.yaml", &[(1, 8080), (2, 8080)]).await?;
    let client = pod_ip(net, 3);
    let frontend = SocketAddr::new(service_ip(net, 1), 8080);

    let total = 1000;
    for _ in 0..total {
        let reply = request(client, frontend, "GET", "/", &[]).await?;
        assert_eq!(reply.status(), Some(200), "{reply:?}");
    }
    let first = backends[0].take().len();
    let second = backends[1].take().len();
    assert_eq!(first + second, total);
    // 50/50 over 1000 requests: a binomial standard deviation is ~16, so ±80 is 5 sigma.
    assert!((420..=580).contains(&first), "echo-service-1 got {first} of {total}");

    let rewritten = request(client, frontend, "GET", "/foo/bar?x=1", &[]).await?;
    assert_eq!(rewritten.status(), Some(200), "{rewritten:?}");
    let seen: Vec<_> = backends.iter().flat_map(|b| b.take()).collect();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/?x=1", "regex_rewrite replaces the path and keeps the query");
    let original = seen[0].headers.iter().find(|(k, _)| k == "x-envoy-original-path").map(|(_, v)| v.as_str());
    assert_eq!(original, Some("/foo/bar?x=1"));
    node.stop().await
}
