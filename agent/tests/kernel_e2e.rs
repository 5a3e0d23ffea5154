//! End-to-end tests of `sluice agent --datapath ebpf` on a real kernel: a node namespace with pod
//! namespaces (tests/common/netns.rs), Cilium's Star Wars example files unchanged, and the
//! agent's CLI, flows and metrics. They need root and BPF; without them they print a loud
//! SKIPPED line, and with `CI=true` they fail instead.

mod common;

use std::net::Ipv4Addr;
use std::path::Path;

use anyhow::{bail, Context, Result};
use common::netns::{privileged, request, AgentProcess, PodClient, PodServer, Reply, TestNode, NODE, NODE_IP};
use serde_json::Value;
use sluice_agent::demo::scheduler::{self, Addresses, Scheduled};


fn example(name: &str) -> Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/cilium-examples").join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// Cilium example apps on a node: their pods wired into namespaces, servers started, the
/// running manifests, this node's Node object and the applied example files in the config dir.
struct App {
    node: TestNode,
    /// Cluster IPs by Service name.
    vips: std::collections::BTreeMap<String, Ipv4Addr>,
    _servers: Vec<PodServer>,
}

impl App {
    fn new(tag: &str, workloads: &[&str], applied: &[&str], servers: &[(&str, u16)]) -> Result<Self> {
        let mut addresses = Addresses::for_namespaces();
        let mut running = Vec::new();
        for file in workloads {
            running.push((*file, scheduler::schedule(file, &example(file)?, NODE, &mut addresses)?));
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
        for file in applied {
            node.write_config(file, &example(file)?)?;
        }
        let servers = servers.iter().map(|(pod, port)| PodServer::start(node.pod(pod)?, *port)).collect::<Result<Vec<_>>>()?;
        let vips = running.iter().flat_map(|(_, s)| s.services.iter().map(|v| (v.name.clone(), v.cluster_ip))).collect();
        Ok(Self { node, vips, _servers: servers })
    }

    /// The Star Wars app, with `policy` (a Cilium example file) applied.
    fn star_wars(tag: &str, policy: Option<&str>) -> Result<Self> {
        Self::new(tag, &["http-sw-app.yaml"], policy.as_slice(), &[("deathstar-0", 80), ("deathstar-1", 80)])
    }

    fn vip(&self, service: &str) -> Result<Ipv4Addr> {
        self.vips.get(service).copied().with_context(|| format!("no Service {service}"))
    }

    fn agent(&self, extra: &[&str]) -> Result<AgentProcess> {
        let agent = AgentProcess::start(&self.node, extra)?;
        // Every pod of this node has its interface attached and its endpoint in the kernel.
        let pods = self.node.pods.len() as u64;
        agent.wait_for(|s| s["kernel"]["endpoints"].as_u64() == Some(pods))?;
        Ok(agent)
    }

    fn land(&self, ship: &str) -> Result<Reply> {
        request(&self.node, ship, self.vip("deathstar")?, 80, "POST", "/v1/request-landing")
    }
}

fn landed(reply: &Reply) -> bool {
    matches!(reply, Reply::Http { status: 200, body, .. } if body == "Ship landed\n")
}

fn metric(node: &TestNode, series: &str) -> Result<f64> {
    let text = node.exec(&["curl", "-sf", "http://127.0.0.1:9965/metrics"])?;
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix(series).and_then(|rest| rest.trim().parse().ok()))
        .unwrap_or(0.0))
}

fn strings(value: &Value) -> Vec<String> {
    value.as_array().map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect()).unwrap_or_default()
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
    let exhaust = request(&app.node, "tiefighter", app.vip("deathstar")?, 80, "PUT", "/v1/exhaust-port")?;
    assert_eq!(exhaust, Reply::Http { status: 403, body: "Access denied\r\n".to_owned(), served_by: None });

    let xwing = app.node.pod("xwing")?.ip.to_string();
    let drops = agent.observe(&["--verdict", "DROPPED", "--from-pod", "default/xwing"])?;
    let drop = drops.first().context("no drop of xwing observed")?;
    assert_eq!(drop["summary"], "Policy denied DROPPED (TCP Flags: SYN)");
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(drop["traffic_direction"], "INGRESS");
    assert_eq!(drop["source"]["ip"], xwing.as_str());
    assert!(drop["destination"]["pod_name"].as_str().is_some_and(|p| p.starts_with("deathstar-")), "{drop}");
    let denied = agent.observe(&["--http-status", "403"])?;
    assert!(denied.iter().any(|f| f["l7"]["http"]["url"].as_str().is_some_and(|u| u.ends_with("/v1/exhaust-port"))), "{denied:?}");
    assert!(metric(&app.node, "hubble_drop_total{reason=\"POLICY_DENIED\",protocol=\"TCP\"}")? >= 1.0);
    assert!(metric(&app.node, "hubble_flows_processed_total{type=\"Drop\",subtype=\"\",verdict=\"DROPPED\"}")? >= 1.0);

    // The kernel's view beside the intent.
    let endpoints = agent.cli_json(&["endpoint", "list"])?;
    let deathstar = endpoints
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "deathstar-0"))
        .context("deathstar-0 listed")?;
    assert_eq!(deathstar["kernel"]["entry"]["ingress_enforced"], true);
    assert_eq!(deathstar["kernel"]["interface"], "lxc0");
    let tiefighter_id = endpoints
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == "tiefighter"))
        .and_then(|e| e["identity"].as_u64())
        .context("tiefighter's identity")?;
    assert!(strings(&deathstar["kernel"]["policy"]).contains(&format!("ingress redirect:15001 {tiefighter_id} TCP/80")));
    let services = agent.cli_json(&["service", "list"])?;
    let service = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "default/deathstar:80"))
        .context("deathstar Service listed")?;
    assert_eq!(service["kernel"]["vip"], format!("{}:80", app.vip("deathstar")?));
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
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..24 {
        match app.land("tiefighter")? {
            Reply::Http { status: 200, served_by: Some(by), .. } => {
                served.insert(by);
            }
            other => bail!("a landing through the VIP failed: {other:?}\n{}", agent.log_text()),
        }
    }
    // Each connection picks its backend (Maglev on the socket cookie): both replicas answer.
    assert_eq!(served.into_iter().collect::<Vec<_>>(), vec!["deathstar-0", "deathstar-1"]);
    // Without policy xwing lands too.
    assert!(landed(&app.land("xwing")?));

    // A pod's veth goes away: the agent notices, drops its endpoint and says why.
    app.node.unwire("deathstar-1")?;
    let status = agent.wait_for(|s| s["kernel"]["endpoints"].as_u64() == Some(3))?;
    assert!(
        strings(&status["warnings"]).iter().any(|w| w.starts_with("Pod default/deathstar-1 (198.18.0.11): no host route")),
        "{status}"
    );
    // It comes back (a new interface): attached again, and it serves again.
    app.node.rewire("deathstar-1")?;
    let status = agent.wait_for(|s| s["kernel"]["endpoints"].as_u64() == Some(4))?;
    assert!(strings(&status["kernel"]["interfaces"]).contains(&"lxc1".to_owned()), "{status}");
    let deathstar_1 = app.node.pod("deathstar-1")?.ip;
    let reply = request(&app.node, "xwing", deathstar_1, 80, "POST", "/v1/request-landing")?;
    assert!(matches!(&reply, Reply::Http { served_by: Some(by), .. } if by == "deathstar-1"), "{reply:?}");
    Ok(())
}

#[test]
fn an_agent_restart_keeps_established_connections_and_enforcement() -> Result<()> {
    if !privileged("an_agent_restart_keeps_established_connections_and_enforcement") {
        return Ok(());
    }
    let app = App::star_wars("swrs", Some("sw_l3_l4_policy.yaml"))?;
    let agent = app.agent(&[])?;
    let mut session = PodClient::connect(&app.node, "tiefighter", app.vip("deathstar")?, 80, 3)?;
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
    assert!(!app.node.pins.exists(), "pins left behind at {}", app.node.pins.display());
    let deathstar = app.node.pod("deathstar-0")?.ip;
    assert!(landed(&request(&app.node, "xwing", deathstar, 80, "POST", "/v1/request-landing")?));
    Ok(())
}

#[test]
fn a_cec_canary_split_is_reached_through_the_service_vip() -> Result<()> {
    if !privileged("a_cec_canary_split_is_reached_through_the_service_vip") {
        return Ok(());
    }
    let app = App::new(
        "cec",
        &["client-helloworld.yaml", "helloworld-service-v1-v2.yaml"],
        &["envoy-helloworld-v1-90-v2-10.yaml"],
        &[("helloworld-v1-0", 5000), ("helloworld-v2-0", 5000)],
    )?;
    let agent = app.agent(&[])?;
    let vip = app.vip("helloworld")?;
    let services = agent.cli_json(&["service", "list"])?;
    let helloworld = services
        .as_array()
        .and_then(|s| s.iter().find(|s| s["name"] == "default/helloworld:5000"))
        .context("helloworld listed")?;
    assert_eq!(helloworld["kernel"]["l7_proxy_port"], 15001, "{helloworld}");

    // The VIP is not translated at connect(): TC hands the flow to the proxy, whose frontend for
    // this VIP is the CEC listener splitting 90/10 per request.
    let mut client = PodClient::connect(&app.node, "client-0", vip, 5000, 3)?;
    let mut served = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..100 {
        match client.request("GET", "/hello")? {
            Reply::Http { status: 200, served_by: Some(by), .. } => *served.entry(by).or_default() += 1,
            other => bail!("a request through the helloworld VIP failed: {other:?}\n{}", agent.log_text()),
        }
    }
    let v1 = served.get("helloworld-v1-0").copied().unwrap_or(0);
    let v2 = served.get("helloworld-v2-0").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 100, "{served:?}");
    assert!(v2 >= 1 && v1 > v2, "90/10 split expected: {served:?}");
    let redirected = agent.observe(&["--verdict", "REDIRECTED", "--from-pod", "default/client-0"])?;
    assert!(redirected.iter().any(|f| f["destination"]["ip"] == vip.to_string().as_str()), "{redirected:?}");
    Ok(())
}
