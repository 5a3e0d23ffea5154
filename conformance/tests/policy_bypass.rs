//! The policy-bypass suite: crafted requests against an HTTP allow-list, through a real agent.
//!
//! The invariant is the one that matters to a user: whatever the client sends, the backend only
//! ever receives requests that the CiliumNetworkPolicy allows, in the canonical form the policy
//! matched. Each vector also states the answer the client must get (reference:
//! envoy-ztunnel.md §3, proxy/NORMALIZATION.md).

use std::net::SocketAddr;

use anyhow::Result;
use regex::Regex;
use sluice_conformance::{pod, pod_ip, raw_request, request, service, service_ip, Node, RecordingBackend, Reply};

const POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: api-allow-list
spec:
  endpointSelector:
    matchLabels: {app: api}
  ingress:
  - fromEndpoints:
    - matchLabels: {role: client}
    toPorts:
    - ports: [{port: "8080", protocol: TCP}]
      rules:
        http:
        - {method: GET, path: "/public/.*"}
        - {method: GET, path: "/api/v1/items"}
        - {method: GET, path: "/host-only", host: "api.example.com"}
        - method: PUT
          path: /api/v1/items
          headers: ["X-Role: editor"]
"#;

/// Whether a request the backend received is allowed by `POLICY` (what the proxy must enforce).
fn allowed_by_policy(method: &str, path: &str, host: Option<&str>, role: Option<&str>) -> bool {
    let full = |pattern: &str, text: &str| Regex::new(&format!("^(?:{pattern})$")).is_ok_and(|r| r.is_match(text));
    (method == "GET" && (full("/public/.*", path) || path == "/api/v1/items"))
        || (method == "GET" && path == "/host-only" && host == Some("api.example.com"))
        || (method == "PUT" && path == "/api/v1/items" && role == Some("editor"))
}

struct Suite {
    node: Node,
    backend: RecordingBackend,
    frontend: SocketAddr,
}

impl Suite {
    /// Starts the suite on `127.<net>.0.0/16`.
    async fn start(net: u8) -> Result<Suite> {
        let backend = RecordingBackend::start(SocketAddr::new(pod_ip(net, 1), 8080)).await?;
        let files = vec![
            (
                "workloads.yaml",
                format!(
                    "{}{}{}",
                    pod("api-0", "default", "{app: api}", pod_ip(net, 1), 8080),
                    pod("client", "default", "{role: client}", pod_ip(net, 2), 8080),
                    service("api", "default", "{app: api}", service_ip(net, 1), 8000, 8080),
                ),
            ),
            ("policy.yaml", POLICY.to_string()),
        ];
        let node = Node::start(net, &files).await?;
        let frontend = SocketAddr::new(node.service_ip(1), 8000);
        Ok(Suite { node, backend, frontend })
    }

    /// Sends `raw` from the client pod; checks the answer and that nothing the policy denies,
    /// or nothing non-canonical, reached the backend.
    async fn vector(&self, name: &str, raw: &str, expect: Expect) -> Result<()> {
        let reply = raw_request(self.node.pod_ip(2), self.frontend, raw.as_bytes()).await?;
        let seen = self.backend.take();
        for request in &seen {
            let header = |name: &str| {
                request.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
            };
            assert!(
                allowed_by_policy(&request.method, &request.path, header("host"), header("x-role")),
                "{name}: the backend received a request the policy denies: {request:?}"
            );
            for fragment in ["/../", "/./", "%2e", "%2E", "%2f", "%2F", "%5c", "%5C", "\\"] {
                assert!(!request.path.contains(fragment), "{name}: non-canonical path forwarded: {request:?}");
            }
        }
        match expect {
            Expect::Forwarded(path) => {
                assert_eq!(reply.status(), Some(200), "{name}: {reply:?}");
                let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
                assert_eq!(paths, vec![path], "{name}: what the backend received");
            }
            Expect::Forbidden => {
                assert_eq!(reply.status(), Some(403), "{name}: {reply:?}");
                assert_eq!(reply.body(), "Access denied\r\n", "{name}");
                assert!(seen.is_empty(), "{name}: {seen:?}");
            }
            Expect::Rejected => {
                let status = reply.status();
                assert!(
                    matches!(status, Some(400..=499)) || reply == Reply::Closed,
                    "{name}: expected a 4xx rejection or a closed connection, got {reply:?}"
                );
                assert!(seen.is_empty(), "{name}: {seen:?}");
            }
            Expect::DeniedOrRejected => {
                assert!(matches!(reply.status(), Some(400..=499)) || reply == Reply::Closed, "{name}: {reply:?}");
                assert!(seen.is_empty(), "{name}: {seen:?}");
            }
        }
        Ok(())
    }
}

/// The outcome a vector must have.
enum Expect {
    /// 200, and the backend received exactly this path.
    Forwarded(&'static str),
    /// 403 `Access denied`.
    Forbidden,
    /// A 4xx from the proxy's request validation (or the connection closed), nothing forwarded.
    Rejected,
    /// Either of the two above: the vector is unsafe, how it is refused is the proxy's choice.
    DeniedOrRejected,
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crafted_requests_never_reach_a_denied_path() -> Result<()> {
    let suite = Suite::start(61).await?;
    use Expect::*;

    // Sanity: the allow-list itself.
    suite.vector("allowed prefix", &get("/public/index.html"), Forwarded("/public/index.html")).await?;
    suite.vector("allowed exact", &get("/api/v1/items"), Forwarded("/api/v1/items")).await?;
    suite.vector("denied path", &get("/admin"), Forbidden).await?;
    suite.vector("query is part of the path (Cilium)", &get("/api/v1/items?all=1"), Forbidden).await?;
    suite.vector("wrong method", "POST /public/x HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\nConnection: close\r\n\r\n", Forbidden).await?;

    // Dot segments, plain and encoded: resolved before policy (then denied) or refused.
    suite.vector("dot-dot", &get("/public/../admin"), DeniedOrRejected).await?;
    suite.vector("dot-dot inside allowed", &get("/public/a/../b"), DeniedOrRejected).await?;
    suite.vector("encoded dot-dot", &get("/public/%2e%2e/admin"), DeniedOrRejected).await?;
    suite.vector("upper encoded dot-dot", &get("/public/%2E%2E/admin"), DeniedOrRejected).await?;
    suite.vector("mixed dot-dot", &get("/public/.%2e/admin"), DeniedOrRejected).await?;
    suite.vector("dot segment", &get("/public/./../admin"), DeniedOrRejected).await?;
    suite.vector("dot-dot with params", &get("/public/..;x=1/admin"), DeniedOrRejected).await?;
    suite.vector("leading dot-dot", &get("/../public/x"), DeniedOrRejected).await?;

    // Escaped and back slashes: the backend may decode them into separators.
    suite.vector("escaped slash", &get("/public%2F..%2Fadmin"), Rejected).await?;
    suite.vector("escaped slash lower", &get("/public/..%2fadmin"), Rejected).await?;
    suite.vector("escaped backslash", &get("/public/..%5Cadmin"), Rejected).await?;
    suite.vector("backslash", &get("/public\\..\\admin"), DeniedOrRejected).await?;

    // Doubled slashes do not turn a denied path into an allowed one.
    suite.vector("doubled slash", &get("//admin"), DeniedOrRejected).await?;

    // Case: paths and methods are case-sensitive in the policy.
    suite.vector("path case", &get("/PUBLIC/x"), Forbidden).await?;
    suite.vector("method case", "get /public/x HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n", DeniedOrRejected).await?;

    // Host games against a host-restricted rule.
    suite.vector(
        "host exact",
        "GET /host-only HTTP/1.1\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        Forwarded("/host-only"),
    )
    .await?;
    suite.vector("host case", "GET /host-only HTTP/1.1\r\nHost: API.Example.COM\r\nConnection: close\r\n\r\n", Forwarded("/host-only")).await?;
    suite.vector("wrong host", "GET /host-only HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n", Forbidden).await?;
    suite.vector(
        "duplicate host",
        "GET /host-only HTTP/1.1\r\nHost: evil.example.com\r\nHost: api.example.com\r\nConnection: close\r\n\r\n",
        Rejected,
    )
    .await?;
    suite.vector(
        "absolute form with conflicting host",
        "GET http://api.example.com/host-only HTTP/1.1\r\nHost: evil.example.com\r\nConnection: close\r\n\r\n",
        Rejected,
    )
    .await?;
    suite.vector("absolute form to a denied path", "GET http://api/admin HTTP/1.1\r\nHost: api\r\nConnection: close\r\n\r\n", Forbidden).await?;
    suite.vector("no host", "GET /public/x HTTP/1.1\r\nConnection: close\r\n\r\n", Rejected).await?;

    // Header rules: the value must match exactly; repeated headers are joined, not picked.
    suite.vector(
        "header rule without header",
        "PUT /api/v1/items HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Forbidden,
    )
    .await?;
    suite.vector(
        "header rule with header",
        "PUT /api/v1/items HTTP/1.1\r\nHost: api\r\nX-Role: editor\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Forwarded("/api/v1/items"),
    )
    .await?;
    suite.vector(
        "repeated header",
        "PUT /api/v1/items HTTP/1.1\r\nHost: api\r\nX-Role: viewer\r\nX-Role: editor\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        Forbidden,
    )
    .await?;

    // Request smuggling: a second request hidden in the body must never be parsed as one.
    let smuggle = "GET /admin HTTP/1.1\r\nHost: api\r\n\r\n";
    suite.vector(
        "CL.TE",
        &format!(
            "POST /public/x HTTP/1.1\r\nHost: api\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{smuggle}",
            5 + smuggle.len()
        ),
        Rejected,
    )
    .await?;
    suite.vector(
        "TE list",
        &format!("GET /public/x HTTP/1.1\r\nHost: api\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n{smuggle}"),
        Rejected,
    )
    .await?;
    suite.vector(
        "double content-length",
        &format!("GET /public/x HTTP/1.1\r\nHost: api\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{smuggle}", smuggle.len()),
        Rejected,
    )
    .await?;
    suite.vector("obs-fold", "GET /public/x HTTP/1.1\r\nHost: api\r\nX-A: a\r\n b\r\nConnection: close\r\n\r\n", Rejected).await?;
    suite.vector("NUL in a header", "GET /public/x HTTP/1.1\r\nHost: api\r\nX-A: a\0b\r\nConnection: close\r\n\r\n", Rejected).await?;

    // Proxy-owned headers from the client are not honoured (CVE-2023-27487, CVE-2024-45806).
    let reply = request(
        suite.node.pod_ip(2),
        suite.frontend,
        "GET",
        "/public/x",
        &[("x-envoy-original-path", "/admin"), ("x-envoy-retry-on", "5xx")],
    )
    .await?;
    assert_eq!(reply.status(), Some(200));
    let seen = suite.backend.take();
    assert!(
        seen.iter().all(|s| s.headers.iter().all(|(k, _)| !k.starts_with("x-envoy-"))),
        "client-sent x-envoy-* headers reached the backend: {seen:?}"
    );

    suite.node.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_requests_get_the_same_policy() -> Result<()> {
    let suite = Suite::start(62).await?;
    let stream = sluice_conformance::connect_from(suite.node.pod_ip(2), suite.frontend).await?;
    let (client, connection) = h2::client::handshake(stream).await?;
    tokio::spawn(connection);
    let mut client = client.ready().await?;

    let mut send = |path: &str, authority: &str| {
        let request = http::Request::builder()
            .method("GET")
            .uri(format!("http://{authority}{path}"))
            .body(())
            .map_err(anyhow::Error::from)?;
        let (response, _) = client.send_request(request, true)?;
        Ok::<_, anyhow::Error>(response)
    };
    let allowed = send("/public/h2", "api")?.await?;
    assert_eq!(allowed.status(), 200);
    let denied = send("/admin", "api")?.await?;
    assert_eq!(denied.status(), 403);
    let traversal = send("/public/../admin", "api")?.await;
    assert!(traversal.map_or(true, |r| r.status().is_client_error()), "dot-dot over HTTP/2 must not pass");

    let seen = suite.backend.take();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, vec!["/public/h2"], "only the allowed HTTP/2 request reached the backend");
    suite.node.stop().await
}
