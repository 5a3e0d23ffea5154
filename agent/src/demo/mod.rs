//! `sluice demo`: the Star Wars scenario in gateway mode on loopback, told as a story.
//!
//! It plays a whole node in one process: the Cilium example manifests (unchanged, embedded),
//! a scheduler stand-in that gives pods and Services loopback addresses, backends for the
//! pods, the agent itself, and clients that connect from their pod's address. Every step
//! checks what a Cilium user would expect; the result is the exit code, so CI can run it.

pub mod network;
pub mod scheduler;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;

use crate::agent::{self, AgentConfig, RunningAgent};
use crate::flows::{FilterArgs, FlowFilter};
use crate::render::render_flow_compact;
use crate::workload::{self, Backend, Outcome};
use network::Network;
use scheduler::{Addresses, ScheduledPod};

const NODE: &str = "demo-node";
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
const SPLIT_REQUESTS: usize = 1000;

/// Workloads, as Cilium ships them (`# source:` lines kept).
const APPS: [(&str, &str); 3] = [
    ("http-sw-app.yaml", include_str!("../../../conformance/cilium-examples/http-sw-app.yaml")),
    ("client-helloworld.yaml", include_str!("../../../conformance/cilium-examples/client-helloworld.yaml")),
    ("helloworld-service-v1-v2.yaml", include_str!("../../../conformance/cilium-examples/helloworld-service-v1-v2.yaml")),
];
const L3_L4_POLICY: &str = include_str!("../../../conformance/cilium-examples/sw_l3_l4_policy.yaml");
const L7_POLICY: &str = include_str!("../../../conformance/cilium-examples/sw_l3_l4_l7_policy.yaml");
const HELLOWORLD_CEC: &str = include_str!("../../../conformance/cilium-examples/envoy-helloworld-v1-90-v2-10.yaml");

/// The demo's verdicts, so the summary can say what failed.
#[derive(Default)]
struct Story {
    failures: Vec<String>,
}

impl Story {
    fn chapter(&self, title: &str) {
        println!("\n== {title}");
    }

    fn check(&mut self, what: &str, outcome: &Outcome, expected: &str, ok: bool) {
        let mark = if ok { "ok " } else { "FAIL" };
        println!("  [{mark}] {what}\n         -> {outcome}   (expected: {expected})");
        if !ok {
            self.failures.push(format!("{what}: got {outcome}, expected {expected}"));
        }
    }
}

fn is_response(outcome: &Outcome, status: u16, body: &str) -> bool {
    matches!(outcome, Outcome::Response { status: s, body: b } if *s == status && b == body)
}

struct Cast {
    pods: Vec<ScheduledPod>,
}

impl Cast {
    fn ip(&self, name: &str) -> anyhow::Result<IpAddr> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .map(|p| IpAddr::V4(p.ip))
            .with_context(|| format!("the scheduler placed no pod {name}"))
    }
}

fn frontend(agent: &RunningAgent, service: &str) -> anyhow::Result<SocketAddr> {
    agent
        .snapshot()
        .services
        .iter()
        .find(|s| s.name == service)
        .and_then(|s| s.frontend)
        .with_context(|| format!("no frontend for {service}"))
}

async fn ship(cast: &Cast, pod: &str, target: SocketAddr, method: &str, path: &str) -> anyhow::Result<Outcome> {
    Ok(workload::request(cast.ip(pod)?, target, method, path, "deathstar.default.svc.cluster.local", REQUEST_TIMEOUT).await)
}

/// Writes `text` as `file` in the config dir and waits for the agent to apply it.
async fn apply(agent: &mut RunningAgent, dir: &Path, file: &str, text: &str) -> anyhow::Result<()> {
    let before = agent.snapshot().status.generation;
    std::fs::write(dir.join(file), text).with_context(|| format!("writing {file}"))?;
    let snapshot = agent.wait_for_generation_after(before, APPLY_TIMEOUT).await?;
    println!("  applied {file}: generation {}", snapshot.status.generation);
    for error in &snapshot.status.errors {
        println!("  config error: {error}");
    }
    Ok(())
}

async fn start_backends(cast: &Cast) -> anyhow::Result<Vec<Backend>> {
    let mut backends = Vec::new();
    for pod in &cast.pods {
        let label = |k: &str| pod.labels.get(k).map(String::as_str);
        let (port, responder) = match (label("class"), label("app"), label("version")) {
            (Some("deathstar"), _, _) => (80, workload::deathstar()),
            (_, Some("helloworld"), Some(version)) => (5000, workload::helloworld(version, &pod.name)),
            _ => continue,
        };
        let addr = SocketAddr::new(IpAddr::V4(pod.ip), port);
        let backend = workload::serve(addr, responder).await.with_context(|| format!("cannot bind {addr}"))?;
        println!("  backend for {:<16} listening on {addr}", pod.name);
        backends.push(backend);
    }
    Ok(backends)
}

/// Prints the newest flows of `pod`, once the last requests' flows have left their batch.
async fn print_flows(agent: &RunningAgent, pod: &str, last: usize) -> anyhow::Result<()> {
    tokio::time::sleep(crate::flows::FLOW_LAG_MAX * 2).await;
    let filter = FlowFilter::parse(&FilterArgs { pod: vec![pod.to_string()], ..FilterArgs::default() })
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    for record in agent.flows().recent(&filter, last) {
        println!("  {}", render_flow_compact(&record));
    }
    Ok(())
}

/// The commands to go on from where the demo stopped, with the demo's own paths and addresses.
fn next_steps(network: Network, kept: &Path, deathstar: SocketAddr, cast: &Cast) -> anyhow::Result<String> {
    let sluice = std::env::args().next().unwrap_or_else(|| "sluice".to_owned());
    let config = kept.join("config");
    let state = kept.join("state");
    let (config, state) = (config.display(), state.display());
    let root_note = match network {
        Network::Host => "",
        Network::Private => "   # as root: the deathstar frontend is port 80",
    };
    let (tiefighter, xwing) = (cast.ip("tiefighter")?, cast.ip("xwing")?);
    let commands = [
        format!("{sluice} agent --config-dir {config} --node {NODE} --datapath none --state-dir {state} --metrics-address 127.0.0.1:9965{root_note}"),
        format!("{sluice} status --state-dir {state}"),
        format!("{sluice} policy get --state-dir {state}"),
        format!("{sluice} service list --state-dir {state}"),
        format!("{sluice} observe --state-dir {state} --follow --to-pod default/deathstar"),
        format!("curl -X PUT --interface {tiefighter} http://{deathstar}/v1/exhaust-port     # tiefighter: 403 Access denied"),
        format!("curl -X POST --interface {xwing} http://{deathstar}/v1/request-landing   # xwing: dropped"),
    ];
    let mut out = format!("Next, on the demo's config (kept in {}; remove it when done):\n", kept.display());
    for command in commands {
        out.push_str(&format!("  {command}\n"));
    }
    Ok(out)
}

/// Runs the demo on `network` (see [`network::prepare`]); `Ok(true)` when every step behaved
/// as expected.
pub async fn run(network: Network) -> anyhow::Result<bool> {
    let work = tempfile::Builder::new().prefix("sluice-demo-").tempdir().context("creating the demo's temp dir")?;
    let config_dir = work.path().join("config");
    std::fs::create_dir_all(&config_dir)?;
    let mut story = Story::default();
    if network == Network::Private {
        println!(
            "Port 80 is privileged here and this user may not bind it: the demo runs in a private \
             user and network namespace of its own, where its pods listen on port 80 as the \
             manifests say."
        );
    }

    story.chapter("A node in a box: scheduling the Star Wars and helloworld apps onto loopback");
    let mut addresses = Addresses::default();
    let mut pods = Vec::new();
    for (file, text) in APPS {
        let scheduled = scheduler::schedule(file, text, NODE, &mut addresses)?;
        for service in &scheduled.services {
            println!("  service {}/{:<16} clusterIP {}", service.namespace, service.name, service.cluster_ip);
        }
        for pod in &scheduled.pods {
            let labels: Vec<String> = pod.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("  pod     {}/{:<16} podIP     {:<11} {}", pod.namespace, pod.name, pod.ip, labels.join(","));
        }
        std::fs::write(config_dir.join(format!("running-{file}")), &scheduled.text)?;
        pods.extend(scheduled.pods);
    }
    let cast = Cast { pods };
    let _backends = start_backends(&cast).await?;

    let mut agent = agent::start(AgentConfig {
        config_dir: config_dir.clone(),
        node: NODE.to_string(),
        state_dir: work.path().join("state"),
        proxy_workers: 2,
        metrics_address: None,
        serve_api: false,
    })
    .await?;
    let status = agent.snapshot().status.clone();
    println!(
        "  sluice agent (gateway mode) applied generation {} with {} listeners, {} errors",
        status.generation,
        status.listeners,
        status.errors.len()
    );
    for error in &status.errors {
        println!("  config error: {error}");
    }
    let deathstar = frontend(&agent, "default/deathstar:80")?;

    story.chapter("No policy: every ship may land");
    let o = ship(&cast, "xwing", deathstar, "POST", "/v1/request-landing").await?;
    story.check("xwing      POST /v1/request-landing", &o, "200 Ship landed", is_response(&o, 200, "Ship landed\n"));
    let o = ship(&cast, "tiefighter", deathstar, "POST", "/v1/request-landing").await?;
    story.check("tiefighter POST /v1/request-landing", &o, "200 Ship landed", is_response(&o, 200, "Ship landed\n"));

    story.chapter("kubectl apply -f sw_l3_l4_policy.yaml: only empire ships reach the deathstar on TCP/80");
    apply(&mut agent, &config_dir, "policy-rule1.yaml", L3_L4_POLICY).await?;
    let o = ship(&cast, "xwing", deathstar, "POST", "/v1/request-landing").await?;
    story.check("xwing      POST /v1/request-landing", &o, "dropped: connection closed, no response", o == Outcome::Closed);
    let o = ship(&cast, "tiefighter", deathstar, "POST", "/v1/request-landing").await?;
    story.check("tiefighter POST /v1/request-landing", &o, "200 Ship landed", is_response(&o, 200, "Ship landed\n"));
    let o = ship(&cast, "tiefighter", deathstar, "PUT", "/v1/exhaust-port").await?;
    story.check(
        "tiefighter PUT  /v1/exhaust-port",
        &o,
        "the deathstar explodes (L3/L4 cannot tell the calls apart)",
        is_response(&o, 503, "Panic: deathstar exploded\n"),
    );

    story.chapter("kubectl apply -f sw_l3_l4_l7_policy.yaml: rule1 now allows only POST /v1/request-landing");
    apply(&mut agent, &config_dir, "policy-rule1.yaml", L7_POLICY).await?;
    let o = ship(&cast, "tiefighter", deathstar, "POST", "/v1/request-landing").await?;
    story.check("tiefighter POST /v1/request-landing", &o, "200 Ship landed", is_response(&o, 200, "Ship landed\n"));
    let o = ship(&cast, "tiefighter", deathstar, "PUT", "/v1/exhaust-port").await?;
    story.check("tiefighter PUT  /v1/exhaust-port", &o, "403 Access denied", is_response(&o, 403, "Access denied\r\n"));
    let o = ship(&cast, "xwing", deathstar, "POST", "/v1/request-landing").await?;
    story.check("xwing      POST /v1/request-landing", &o, "dropped: connection closed, no response", o == Outcome::Closed);

    story.chapter("What the proxy saw (sluice observe --pod deathstar)");
    print_flows(&agent, "default/deathstar", 8).await?;

    story.chapter("kubectl apply -f envoy-helloworld-v1-90-v2-10.yaml: a 90/10 canary split for helloworld");
    apply(&mut agent, &config_dir, "envoy-helloworld-v1-90-v2-10.yaml", HELLOWORLD_CEC).await?;
    let helloworld = frontend(&agent, "default/helloworld:5000")?;
    let client = cast.ip("client-0")?;
    let mut v1 = 0usize;
    let mut v2 = 0usize;
    let mut other = Vec::new();
    for _ in 0..SPLIT_REQUESTS {
        let o = workload::request(client, helloworld, "GET", "/hello", "helloworld:5000", REQUEST_TIMEOUT).await;
        match &o {
            Outcome::Response { status: 200, body } if body.starts_with("Hello version: v1") => v1 += 1,
            Outcome::Response { status: 200, body } if body.starts_with("Hello version: v2") => v2 += 1,
            _ => other.push(o),
        }
    }
    let v2_share = v2 as f64 / SPLIT_REQUESTS as f64;
    // Binomial(1000, 0.1) has a standard deviation of ~0.95 points: 6-14% is over 4 of them.
    let split_ok = other.is_empty() && (0.06..=0.14).contains(&v2_share);
    let summary = Outcome::Response {
        status: 200,
        body: format!("v1 {v1} ({:.1}%), v2 {v2} ({:.1}%), failed {}", v1 as f64 / 10.0, v2_share * 100.0, other.len()),
    };
    story.check(&format!("client-0   {SPLIT_REQUESTS} x GET /hello"), &summary, "~90% v1 / ~10% v2 (v2 within 6-14%), none failed", split_ok);
    print_flows(&agent, "default/helloworld", 3).await?;

    agent.stop().await?;
    println!();
    let kept = work.keep();
    if story.failures.is_empty() {
        println!("Every step behaved as expected: allowed, dropped, denied with 403, split 90/10.\n");
        print!("{}", next_steps(network, &kept, deathstar, &cast)?);
        Ok(true)
    } else {
        println!("{} step(s) did not behave as expected:", story.failures.len());
        for failure in &story.failures {
            println!("  - {failure}");
        }
        println!("The demo's config is kept in {} for a look.", kept.display());
        Ok(false)
    }
}
