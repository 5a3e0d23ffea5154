//! End-to-end tests of `sluice agent --datapath ebpf` on a real kernel: a node namespace with pod
//! namespaces (sluice-ebpf's testing harness, tests/common/agent.rs), Cilium's example files
//! unchanged where one exists and small CNPs written like Cilium's docs otherwise, and the
//! agent's CLI, flows and metrics. They need root and BPF; without them they print a loud SKIPPED
//! line, and with `CI=true` they fail instead.

mod common;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::{bail, Context, Result};
use common::agent::{AgentProcess, TestNode, NODE};
use serde_json::Value;
use sluice_agent::demo::scheduler::{self, Addresses, Scheduled};
use sluice_ebpf::testing::{privileged, PodHttpServer, Reply, NODE_IP};

/// A manifest file: its name in the config dir and its text.
struct Manifest {
    file: String,
    text: String,
}

impl Manifest {
    /// A Cilium example from conformance/cilium-examples/, unchanged.
    fn example(file: &str) -> Result<Self> {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/cilium-examples").join(file);
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Self { file: file.to_owned(), text })
    }

    fn inline(file: &str, text: &str) -> Self {
        Self { file: file.to_owned(), text: text.to_owned() }
    }
}

/// Apps on a node: their pods wired into namespaces, HTTP servers started (each names itself
/// after its pod), the running manifests, this node's Node object and the applied policy files
/// in the config dir.
struct App {
    /// Dropped before the node: servers stop before their namespaces go.
    servers: BTreeMap<(String, u16), PodHttpServer>,
    node: TestNode,
    /// Cluster IPs by Service name.
    vips: BTreeMap<String, Ipv4Addr>,
}

impl App {
    fn new(tag: &str, workloads: &[Manifest], applied: &[Manifest], servers: &[(&str, u16)]) -> Result<Self> {
        let mut addresses = Addresses::for_namespaces();
        let mut running = Vec::new();
        for manifest in workloads {
            running.push((&manifest.file, scheduler::schedule(&manifest.file, &manifest.text, NODE, &mut addresses)?));
        }
        let pods: Vec<_> = running.iter().flat_map(|(_, s)| s.pods.iter().map(|p| (p.name.clone(), p.ip))).collect();
        let node = TestNode::new(tag, &pods)?;
        for (file, Scheduled { text, .. }) in &running {
            node.write_config(&format!("running-{file}"), text)?;
        }
        node.write_config(
            "node.yaml",
            &format!("apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {NODE_IP}}}]\n"),
        )?;
        for manifest in applied {
            node.write_config(&manifest.file, &manifest.text)?;
        }
        let mut started = BTreeMap::new();
        for (pod, port) in servers {
            let pod = node.pod(pod)?;
            started.insert((pod.name.clone(), *port), PodHttpServer::start(&pod.netns, SocketAddrV4::new(pod.ip, *port), &pod.name)?);
        }
        let vips = running.iter().flat_map(|(_, s)| s.services.iter().map(|v| (v.name.clone(), v.cluster_ip))).collect();
        Ok(Self { servers: started, node, vips })
    }

    /// The Star Wars app, with `policy` (a Cilium example file) applied.
    fn star_wars(tag: &str, policy: Option<&str>) -> Result<Self> {
        let applied = policy.map(Manifest::example).transpose()?;
        Self::new(tag, &[Manifest::example("http-sw-app.yaml")?], applied.as_slice(), &[("deathstar-0", 80), ("deathstar-1", 80)])
    }

    fn vip(&self, service: &str, port: u16) -> Result<SocketAddrV4> {
        let ip = self.vips.get(service).copied().with_context(|| format!("no Service {service}"))?;
        Ok(SocketAddrV4::new(ip, port))
    }

    fn pod_addr(&self, pod: &str, port: u16) -> Result<SocketAddrV4> {
        Ok(SocketAddrV4::new(self.node.pod(pod)?.ip, port))
    }

    fn server(&self, pod: &str, port: u16) -> Result<&PodHttpServer> {
        self.servers.get(&(pod.to_owned(), port)).with_context(|| format!("no server in {pod} on {port}"))
    }

    /// The agent, once every pod of this node has its interface attached and its endpoint in
    /// the kernel, and the config dir has no errors.
    fn agent(&self, extra: &[&str]) -> Result<AgentProcess> {
        let agent = AgentProcess::start(&self.node, extra)?;
        let pods = self.node.net.pods.len() as u64;
        let status = agent.wait_for(|s| s["kernel"]["endpoints"].as_u64() == Some(pods))?;
        if !strings(&status["errors"]).is_empty() {
            bail!("configuration errors: {}", status["errors"]);
        }
        Ok(agent)
    }

    fn land(&self, ship: &str) -> Result<Reply> {
        self.node.request(ship, self.vip("deathstar", 80)?, "POST", "/v1/request-landing")
    }
}

/// What a pod's HTTP server answers when `method path` reached it.
fn served(by: &str, method: &str, path: &str) -> Reply {
    Reply::Http { status: 200, body: format!("{method} {path}\n"), served_by: Some(by.to_owned()) }
}

/// The proxy's answer to a request its HTTP rules deny.
fn access_denied() -> Reply {
    Reply::Http { status: 403, body: "Access denied\r\n".to_owned(), served_by: None }
}

/// A ClusterIP Service `name` on TCP `port` for the pods labelled `selector` (`key: value`).
fn service(name: &str, selector: &str, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  selector:\n    {selector}\n  ports:\n  - port: {port}\n    protocol: TCP\n    targetPort: {port}\n"
    )
}

/// A Pod `namespace/name` with `labels` (`key: value`) running as `service_account`.
fn pod(namespace: &str, name: &str, labels: &[&str], service_account: &str) -> String {
    let labels = match labels {
        [] => " {}".to_owned(),
        labels => labels.iter().map(|label| format!("\n    {label}")).collect(),
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:{labels}\nspec:\n  serviceAccountName: {service_account}\n  containers:\n  - name: main\n    image: nginx\n"
    )
}

/// Manifests as one multi-document YAML file.
fn workloads(file: &str, documents: &[String]) -> Manifest {
    Manifest::inline(file, &documents.join("---\n"))
}

fn landed(reply: &Reply) -> bool {
    matches!(reply, Reply::Http { status: 200, body, served_by: Some(by) }
        if body == "POST /v1/request-landing\n" && by.starts_with("deathstar-"))
}

fn metric(node: &TestNode, series: &str) -> Result<f64> {
    let text = node.net.exec(&["curl", "-sf", "http://127.0.0.1:9965/metrics"])?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0))
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// The one endpoint named `name` in `sluice endpoint list -o json`.
fn endpoint<'a>(endpoints: &'a Value, namespace: &str, name: &str) -> Result<&'a Value> {
    endpoints
        .as_array()
        .and_then(|e| e.iter().find(|e| e["namespace"] == namespace && e["name"] == name))
        .with_context(|| format!("{namespace}/{name} not listed"))
}

/// The drop `sluice observe --verdict DROPPED` shows for `from_pod` to one of `to`: its SYN,
/// denied by policy in `direction`.
fn assert_syn_dropped(agent: &AgentProcess, from_pod: &str, to: &[SocketAddrV4], direction: &str) -> Result<Value> {
    let drops = agent.observe(&["--verdict", "DROPPED", "--from-pod", from_pod])?;
    let destination = |d: &Value| format!("{}:{}", d["destination"]["ip"].as_str().unwrap_or_default(), d["destination"]["port"]);
    let drop = drops
        .iter()
        .find(|d| to.iter().any(|to| destination(d) == to.to_string()))
        .with_context(|| format!("no drop from {from_pod} to {to:?} observed: {drops:?}"))?;
    assert_eq!(drop["summary"], "Policy denied DROPPED (TCP Flags: SYN)", "{drop}");
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED", "{drop}");
    assert_eq!(drop["traffic_direction"], direction, "{drop}");
    Ok(drop.clone())
}

#[test]
fn star_wars_l7_policy_is_enforced_by_the_kernel_and_the_proxy() -> Result<()> {
    if !privileged("star_wars_l7_policy_is_enforced_by_the_kernel_and_the_proxy") {
        return Ok(());
    }
    let app = App::star_wars("sw7", Some("sw_l3_l4_l7_policy.yaml"))?;
    let agent = app.agent(&[])?;

    // xwing (org=alliance) is not allowed at L3: its SYN is dropped in the kernel.
    assert_eq!(app.land("xwing")?, Reply::TimedOut);
    // tiefighter's POST is redirected to the proxy, allowed by the HTTP rule and forwarded.
    let tiefighter = app.land("tiefighter")?;
    assert!(landed(&tiefighter), "{tiefighter:?}\n{}", agent.log_text());
    // The PUT is answered by the proxy with 403.
    let exhaust = app.node.request("tiefighter", app.vip("deathstar", 80)?, "PUT", "/v1/exhaust-port")?;
    assert_eq!(exhaust, access_denied());
    let mut seen = Vec::new();
    for server in app.servers.values() {
        seen.extend(server.seen()?.into_iter().map(|(_, line)| line));
    }
    assert_eq!(seen, vec!["POST /v1/request-landing HTTP/1.1"], "only the allowed request reached a deathstar");

    let xwing = app.node.pod("xwing")?.ip.to_string();
    // Socket LB picked one of the deathstars for xwing's connection.
    let deathstars = [app.pod_addr("deathstar-0", 80)?, app.pod_addr("deathstar-1", 80)?];
    let drop = assert_syn_dropped(&agent, "default/xwing", &deathstars, "INGRESS")?;
    assert_eq!(drop["source"]["ip"], xwing.as_str());
    assert!(drop["destination"]["pod_name"].as_str().is_some_and(|p| p.starts_with("deathstar-")), "{drop}");
    let denied = agent.observe_at_least(1, &["--http-status", "403"])?;
    assert!(denied.iter().any(|f| f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/v1/exhaust-port"))), "{denied:?}");
    assert!(metric(&app.node, "hubble_drop_total{reason=\"POLICY_DENIED\",protocol=\"TCP\"}")? >= 1.0);
    assert!(metric(&app.node, "hubble_flows_processed_total{type=\"Drop\",subtype=\"\",verdict=\"DROPPED\"}")? >= 1.0);

    // The kernel's view beside the intent.
    let endpoints = agent.cli_json(&["endpoint", "list"])?;
    let deathstar = endpoint(&endpoints, "default", "deathstar-0")?;
    assert_eq!(deathstar["kernel"]["entry"]["ingress_enforced"], true);
    assert_eq!(deathstar["kernel"]["interface"], "lxc0");
    let tiefighter_id = endpoint(&endpoints, "default", "tiefighter")?["identity"].as_u64().context("tiefighter's identity")?;
    assert!(strings(&deathstar["kernel"]["policy"]).contains(&format!("ingress redirect:15001 {tiefighter_id} TCP/80")));
    let services = agent.cli_json(&["service", "list"])?;
    let service = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "default/deathstar:80"))
        .context("deathstar Service listed")?;
    assert_eq!(service["kernel"]["vip"], app.vip("deathstar", 80)?.to_string());
    assert_eq!(service["kernel"]["backends"].as_array().map(Vec::len), Some(2));
    let policies = agent.cli_json(&["policy", "get", "rule1"])?;
    let kernel = &policies[0]["kernel"];
    assert_eq!(kernel.as_array().map(Vec::len), Some(2), "{policies}");
    Ok(())
}

#[test]
fn cluster_ip_is_balanced_across_replicas_by_socket_lb_and_veths_are_followed() -> Result<()> {
    if !privileged("cluster_ip_is_balanced_across_replicas_by_socket_lb_and_veths_are_followed") {
        return Ok(());
    }
    let app = App::star_wars("swlb", None)?;
    let agent = app.agent(&[])?;
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..24 {
        match app.land("tiefighter")? {
            Reply::Http { status: 200, served_by: Some(by), .. } => {
                answered.insert(by);
            }
            other => bail!("a landing through the VIP failed: {other:?}\n{}", agent.log_text()),
        }
    }
    // Each connection picks its backend (Maglev on the socket cookie): both replicas answer.
    assert_eq!(answered.into_iter().collect::<Vec<_>>(), vec!["deathstar-0", "deathstar-1"]);
    // Without policy xwing lands too.
    assert!(landed(&app.land("xwing")?));

    // A pod's veth goes away: the agent notices, drops its endpoint and says why.
    app.node.net.unwire("deathstar-1")?;
    let status = agent.wait_for(|s| s["kernel"]["endpoints"].as_u64() == Some(3))?;
    assert!(
        strings(&status["warnings"]).iter().any(|w| w.starts_with("Pod default/deathstar-1 (198.18.0.11): no host route")),
        "{status}"
    );
    // It comes back (a new interface): attached again, and it serves again.
    app.node.net.rewire("deathstar-1")?;
    let status = agent.wait_for(|s| s["kernel"]["endpoints"].as_u64() == Some(4))?;
    assert!(strings(&status["kernel"]["interfaces"]).contains(&"lxc1".to_owned()), "{status}");
    let reply = app.node.request("xwing", app.pod_addr("deathstar-1", 80)?, "POST", "/v1/request-landing")?;
    assert_eq!(reply, served("deathstar-1", "POST", "/v1/request-landing"));
    Ok(())
}

#[test]
fn an_agent_restart_keeps_established_connections_and_enforcement() -> Result<()> {
    if !privileged("an_agent_restart_keeps_established_connections_and_enforcement") {
        return Ok(());
    }
    let app = App::star_wars("swrs", Some("sw_l3_l4_policy.yaml"))?;
    let agent = app.agent(&[])?;
    let mut session = app.node.client("tiefighter", app.vip("deathstar", 80)?)?;
    assert!(landed(&session.request("POST", "/v1/request-landing")?));
    assert_eq!(app.land("xwing")?, Reply::TimedOut);

    let exit = agent.terminate()?;
    assert!(exit.success(), "the agent's exit after SIGTERM: {exit}");
    // No agent: the pinned programs and maps keep enforcing, the open connection keeps working.
    assert_eq!(app.land("xwing")?, Reply::TimedOut);
    assert!(landed(&session.request("POST", "/v1/request-landing")?));
    assert!(landed(&app.land("tiefighter")?));

    // A new agent reuses the pins: nothing to change in the maps.
    let agent = app.agent(&[])?;
    let status = agent.cli_json(&["status"])?;
    assert_eq!(strings(&status["kernel"]["last_apply"]), Vec::<String>::new(), "{status}");
    assert!(landed(&session.request("POST", "/v1/request-landing")?));
    assert_eq!(app.land("xwing")?, Reply::TimedOut);

    // Stopping with cleanup removes everything: xwing reaches a deathstar directly again.
    drop(agent);
    let agent = app.agent(&["--cleanup-on-exit"])?;
    assert!(agent.terminate()?.success());
    assert!(!app.node.pins.path.exists(), "pins left behind at {}", app.node.pins.path.display());
    assert!(landed(&app.node.request("xwing", app.pod_addr("deathstar-0", 80)?, "POST", "/v1/request-landing")?));
    Ok(())
}

#[test]
fn a_cec_canary_split_is_reached_through_the_service_vip() -> Result<()> {
    if !privileged("a_cec_canary_split_is_reached_through_the_service_vip") {
        return Ok(());
    }
    let app = App::new(
        "cec",
        &[Manifest::example("client-helloworld.yaml")?, Manifest::example("helloworld-service-v1-v2.yaml")?],
        &[Manifest::example("envoy-helloworld-v1-90-v2-10.yaml")?],
        &[("helloworld-v1-0", 5000), ("helloworld-v2-0", 5000)],
    )?;
    let agent = app.agent(&[])?;
    let vip = app.vip("helloworld", 5000)?;
    let services = agent.cli_json(&["service", "list"])?;
    let helloworld = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "default/helloworld:5000"))
        .context("helloworld listed")?;
    assert_eq!(helloworld["kernel"]["l7_proxy_port"], 15001, "{helloworld}");

    // The VIP is not translated at connect(): TC hands the flow to the proxy, whose frontend for
    // this VIP is the CEC listener splitting 90/10 per request.
    let mut client = app.node.client("client-0", vip)?;
    let mut split = BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        match client.request("GET", "/hello")? {
            Reply::Http { status: 200, served_by: Some(by), .. } => *split.entry(by).or_default() += 1,
            other => bail!("a request through the helloworld VIP failed: {other:?}\n{}", agent.log_text()),
        }
    }
    let v1 = split.get("helloworld-v1-0").copied().unwrap_or(0);
    let v2 = split.get("helloworld-v2-0").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 100, "{split:?}");
    assert!(v2 >= 1 && v1 > v2, "90/10 split expected: {split:?}");
    let redirected = agent.observe(&["--verdict", "REDIRECTED", "--from-pod", "default/client-0"])?;
    assert!(redirected.iter().any(|f| f["destination"]["ip"] == vip.ip().to_string().as_str()), "{redirected:?}");
    Ok(())
}

/// Cilium's labels-dependent L4 example (docs "Layer 4 Examples"): only `role=frontend` may
/// reach `role=backend`, and only on TCP/80.
const FRONTEND_ONLY_POLICY: &str = r#"apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "l4-rule"
spec:
  endpointSelector:
    matchLabels:
      role: backend
  ingress:
  - fromEndpoints:
    - matchLabels:
        role: frontend
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
"#;

#[test]
fn a_frontend_only_policy_admits_the_frontend_on_port_80_and_drops_everyone_else() -> Result<()> {
    if !privileged("a_frontend_only_policy_admits_the_frontend_on_port_80_and_drops_everyone_else") {
        return Ok(());
    }
    let app = App::new(
        "fe",
        &[workloads(
            "frontend-backend.yaml",
            &[
                service("backend", "role: backend", 80),
                pod("default", "backend", &["role: backend"], "default"),
                pod("default", "frontend", &["role: frontend"], "default"),
                pod("default", "intruder", &["role: other"], "default"),
            ],
        )],
        &[Manifest::inline("l4-rule.yaml", FRONTEND_ONLY_POLICY)],
        &[("backend", 80), ("backend", 8080)],
    )?;
    let agent = app.agent(&[])?;
    let backend = app.vip("backend", 80)?;

    // The frontend reaches the backend through its Service (socket LB) on port 80.
    assert_eq!(app.node.request("frontend", backend, "GET", "/")?, served("backend", "GET", "/"));
    // Another client's SYN is dropped at the backend's veth: its connect times out.
    assert_eq!(app.node.request("intruder", backend, "GET", "/")?, Reply::TimedOut);
    // The frontend itself gets nothing but port 80.
    let other_port = app.pod_addr("backend", 8080)?;
    assert_eq!(app.node.request("frontend", other_port, "GET", "/")?, Reply::TimedOut);

    let backend_0 = app.pod_addr("backend", 80)?;
    let drop = assert_syn_dropped(&agent, "default/intruder", &[backend_0], "INGRESS")?;
    assert_eq!(drop["source"]["pod_name"], "intruder");
    assert_eq!(drop["destination"]["pod_name"], "backend");
    assert_syn_dropped(&agent, "default/frontend", &[other_port], "INGRESS")?;
    let frontend_drops = agent.observe(&["--verdict", "DROPPED", "--from-pod", "default/frontend", "--port", "80"])?;
    assert_eq!(frontend_drops, Vec::<Value>::new(), "the frontend's port-80 flow is never dropped");

    // The kernel's policy map holds exactly that rule for the backend.
    let endpoints = agent.cli_json(&["endpoint", "list"])?;
    let frontend_id = endpoint(&endpoints, "default", "frontend")?["identity"].as_u64().context("frontend identity")?;
    let kernel = &endpoint(&endpoints, "default", "backend")?["kernel"];
    assert_eq!(kernel["entry"]["ingress_enforced"], true);
    assert_eq!(strings(&kernel["policy"]), vec![format!("ingress allow {frontend_id} TCP/80")]);
    Ok(())
}

/// An API open only to GET and POST under `/api/v1/`, and only for pods of the `luke` service
/// account in namespace `ns1` (Cilium's service-account and namespace selectors, docs "Service
/// Accounts" and "Namespaces", with an L7 HTTP rule as in docs "Layer 7 Examples").
const API_POLICY: &str = r#"apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "api-v1-from-luke-in-ns1"
spec:
  endpointSelector:
    matchLabels:
      app: api
  ingress:
  - fromEndpoints:
    - matchLabels:
        "k8s:io.cilium.k8s.policy.serviceaccount": luke
        "k8s:io.kubernetes.pod.namespace": ns1
    toPorts:
    - ports:
      - port: "80"
        protocol: TCP
      rules:
        http:
        - method: "GET"
          path: "/api/v1/.*"
        - method: "POST"
          path: "/api/v1/.*"
"#;

#[test]
fn an_api_is_open_to_get_and_post_only_for_one_service_account_in_one_namespace() -> Result<()> {
    if !privileged("an_api_is_open_to_get_and_post_only_for_one_service_account_in_one_namespace") {
        return Ok(());
    }
    let app = App::new(
        "sa",
        &[workloads(
            "api.yaml",
            &[
                service("api", "app: api", 80),
                pod("default", "api", &["app: api"], "api"),
                pod("ns1", "luke", &[], "luke"),
                pod("ns1", "leia", &[], "leia"),
                pod("ns2", "han", &[], "luke"),
            ],
        )],
        &[Manifest::inline("api-policy.yaml", API_POLICY)],
        &[("api", 80)],
    )?;
    let agent = app.agent(&[])?;
    let api = app.vip("api", 80)?;

    // luke in ns1: GET and POST under /api/v1/ go through the proxy to the API.
    let mut luke = app.node.client("luke", api)?;
    assert_eq!(luke.request("GET", "/api/v1/users")?, served("api", "GET", "/api/v1/users"));
    assert_eq!(luke.request("POST", "/api/v1/users")?, served("api", "POST", "/api/v1/users"));
    // Other methods, and paths outside /api/v1/, are answered 403 by the proxy.
    assert_eq!(luke.request("DELETE", "/api/v1/users/1")?, access_denied());
    assert_eq!(luke.request("GET", "/api/v2/users")?, access_denied());
    let seen: Vec<String> = app.server("api", 80)?.seen()?.into_iter().map(|(_, line)| line).collect();
    assert_eq!(seen, vec!["GET /api/v1/users HTTP/1.1", "POST /api/v1/users HTTP/1.1"]);

    // Another service account in ns1, and the same service account in ns2: SYN dropped.
    assert_eq!(app.node.request("leia", api, "GET", "/api/v1/users")?, Reply::TimedOut);
    assert_eq!(app.node.request("han", api, "GET", "/api/v1/users")?, Reply::TimedOut);
    let api_pod = app.pod_addr("api", 80)?;
    for (pod, ip) in [("ns1/leia", app.node.pod("leia")?.ip), ("ns2/han", app.node.pod("han")?.ip)] {
        let drop = assert_syn_dropped(&agent, pod, &[api_pod], "INGRESS")?;
        assert_eq!(drop["source"]["ip"], ip.to_string().as_str());
    }
    assert_eq!(app.server("api", 80)?.seen()?.len(), 2, "nothing of leia's or han's reached the API");

    // The proxy's flows: luke's requests, with their verdicts.
    let l7: Vec<(String, String, u64)> = agent
        .observe_at_least(4, &["--from-pod", "ns1/luke", "--type", "l7"])?
        .iter()
        .map(|f| {
            let http = &f["l7"]["http"];
            let path = http["url"].as_str().and_then(|u| u.split_once("/api/")).map(|(_, p)| format!("/api/{p}"));
            (http["method"].as_str().unwrap_or_default().to_owned(), path.unwrap_or_default(), http["code"].as_u64().unwrap_or(0))
        })
        .collect();
    assert_eq!(
        l7,
        vec![
            ("GET".to_owned(), "/api/v1/users".to_owned(), 200),
            ("POST".to_owned(), "/api/v1/users".to_owned(), 200),
            ("DELETE".to_owned(), "/api/v1/users/1".to_owned(), 403),
            ("GET".to_owned(), "/api/v2/users".to_owned(), 403),
        ],
        "{l7:?}"
    );
    Ok(())
}

/// Egress default deny for `env=dev` pods with cluster traffic allowed (Cilium's entities,
/// docs "Entities Based": `cluster` is every pod and node of the cluster, not `world`).
const CLUSTER_ONLY_EGRESS: &str = r#"apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "dev-to-cluster-only"
spec:
  endpointSelector:
    matchLabels:
      env: dev
  egress:
  - toEntities:
    - cluster
"#;

/// An address of the node namespace that is neither a pod nor the node: outside the cluster.
const OUTSIDE: Ipv4Addr = Ipv4Addr::new(198, 18, 200, 1);

#[test]
fn egress_to_world_is_denied_while_cluster_traffic_flows() -> Result<()> {
    if !privileged("egress_to_world_is_denied_while_cluster_traffic_flows") {
        return Ok(());
    }
    let dev_app = workloads(
        "dev.yaml",
        &[service("web", "app: web", 80), pod("default", "web", &["app: web"], "default"), pod("default", "dev", &["env: dev"], "default")],
    );
    let app = App::new("egr", &[dev_app], &[], &[("web", 80)])?;
    app.node.net.add_outside_address(OUTSIDE)?;
    let outside_server = PodHttpServer::start(&app.node.net.netns, SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 8080), "outside")?;
    let (outside, node) = (SocketAddrV4::new(OUTSIDE, 8080), SocketAddrV4::new(NODE_IP, 8080));
    let agent = app.agent(&[])?;
    // Without the policy the outside address answers: what follows is the policy's doing.
    assert_eq!(app.node.request("dev", outside, "GET", "/")?, served("outside", "GET", "/"));

    let generation = agent.cli_json(&["status"])?["generation"].as_u64().context("generation")?;
    app.node.write_config("dev-to-cluster-only.yaml", CLUSTER_ONLY_EGRESS)?;
    agent.wait_for(|s| s["generation"].as_u64() > Some(generation))?;
    let endpoints = agent.cli_json(&["endpoint", "list"])?;
    assert_eq!(endpoint(&endpoints, "default", "dev")?["kernel"]["entry"]["egress_enforced"], true);

    // Cluster traffic: another pod directly and through its Service, and the node.
    assert_eq!(app.node.request("dev", app.pod_addr("web", 80)?, "GET", "/direct")?, served("web", "GET", "/direct"));
    assert_eq!(app.node.request("dev", app.vip("web", 80)?, "GET", "/vip")?, served("web", "GET", "/vip"));
    assert_eq!(app.node.request("dev", node, "GET", "/node")?, served("outside", "GET", "/node"));
    // The world: dev's SYN is dropped on its way out, and observed as an egress policy drop.
    assert_eq!(app.node.request("dev", outside, "GET", "/world")?, Reply::TimedOut);
    let drop = assert_syn_dropped(&agent, "default/dev", &[outside], "EGRESS")?;
    assert_eq!(drop["destination"]["identity"], 2, "reserved:world: {drop}");
    assert_eq!(drop["destination"].get("pod_name"), None, "{drop}");
    // A pod the policy does not select still reaches the world.
    assert_eq!(app.node.request("web", outside, "GET", "/web")?, served("outside", "GET", "/web"));
    let seen: Vec<String> = outside_server.seen()?.into_iter().map(|(_, line)| line).collect();
    assert_eq!(seen, vec!["GET / HTTP/1.1", "GET /node HTTP/1.1", "GET /web HTTP/1.1"]);
    Ok(())
}
