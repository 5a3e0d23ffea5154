//! End-to-end tests of `sluice agent --datapath none` (gateway mode): the real binary on a temp config dir and
//! state dir, real backends and clients on loopback addresses, the CLI against its socket.
//!
//! Each test uses its own 127.x.0.0/16 range and ports, so tests can run in parallel.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sluice_agent::workload::{self, Outcome};

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

struct Agent {
    child: Child,
    state_dir: PathBuf,
}

impl Agent {
    fn start(config_dir: &Path, state_dir: &Path) -> Result<Agent> {
        let child = Command::new(SLUICE)
            .args(["agent", "--node", "node-a", "--datapath", "none", "--proxy-workers", "2"])
            .arg("--config-dir")
            .arg(config_dir)
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--metrics-address", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting sluice agent")?;
        let agent = Agent { child, state_dir: state_dir.to_path_buf() };
        agent.wait_for_generation_after(0)?;
        Ok(agent)
    }

    fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let output = Command::new(SLUICE)
            .args(args)
            .args(["-o", "json"])
            .arg("--state-dir")
            .arg(&self.state_dir)
            .output()
            .context("running the sluice CLI")?;
        if !output.status.success() {
            bail!("sluice {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    fn status(&self) -> Result<Value> {
        self.cli_json(&["status"])
    }

    fn generation(&self) -> u64 {
        self.status().ok().and_then(|s| s["generation"].as_u64()).unwrap_or(0)
    }

    /// Polls `sluice status` until a generation newer than `after` is applied (bounded).
    fn wait_for_generation_after(&self, after: u64) -> Result<Value> {
        for _ in 0..200 {
            if let Ok(status) = self.status() {
                if status["generation"].as_u64().is_some_and(|g| g > after) {
                    return Ok(status);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent did not apply a generation after {after}")
    }

    /// Polls until `status.errors` is non-empty (a bad file produces no new generation).
    fn wait_for_errors(&self) -> Result<Vec<String>> {
        for _ in 0..200 {
            let errors: Vec<String> = self.status()?["errors"]
                .as_array()
                .map(|a| a.iter().filter_map(|e| e.as_str().map(str::to_string)).collect())
                .unwrap_or_default();
            if !errors.is_empty() {
                return Ok(errors);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent reported no configuration error")
    }

    fn terminate(mut self) -> Result<std::process::ExitStatus> {
        let status = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM failed");
        }
        for _ in 0..200 {
            if let Some(exit) = self.child.try_wait()? {
                return Ok(exit);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent did not exit after SIGTERM")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Star Wars cluster on `127.<net>.0.0/16`: deathstar-0 at .0.1 (port 8080), tiefighter at
/// .0.2, xwing at .0.3; the deathstar Service at .1.1:8000.
fn star_wars(net: u8) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata:
  name: deathstar-0
  labels: {{org: empire, class: deathstar}}
spec:
  containers:
  - name: deathstar
    ports:
    - {{name: http, containerPort: 8080}}
status:
  podIP: 127.{net}.0.1
---
apiVersion: v1
kind: Pod
metadata:
  name: tiefighter
  labels: {{org: empire, class: tiefighter}}
status:
  podIP: 127.{net}.0.2
---
apiVersion: v1
kind: Pod
metadata:
  name: xwing
  labels: {{org: alliance, class: xwing}}
status:
  podIP: 127.{net}.0.3
---
apiVersion: v1
kind: Service
metadata:
  name: deathstar
spec:
  clusterIP: 127.{net}.1.1
  selector: {{org: empire, class: deathstar}}
  ports:
  - {{port: 8000, targetPort: http}}
"#
    )
}

/// Cilium's sw_l3_l4_l7_policy.yaml, with the backend's named port instead of 80.
const L7_POLICY: &str = r#"apiVersion: "cilium.io/v2"
kind: CiliumNetworkPolicy
metadata:
  name: "rule1"
spec:
  endpointSelector:
    matchLabels:
      org: empire
      class: deathstar
  ingress:
  - fromEndpoints:
    - matchLabels:
        org: empire
    toPorts:
    - ports:
      - port: "http"
        protocol: TCP
      rules:
        http:
        - method: "POST"
          path: "/v1/request-landing"
"#;

/// A temp dir (the caller keeps it alive) whose `config` folder holds `files`.
fn config_dir_with(files: &[(&str, &str)]) -> Result<(tempfile::TempDir, PathBuf)> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config)?;
    for (name, text) in files {
        std::fs::write(config.join(name), text)?;
    }
    Ok((dir, config))
}

fn ip(net: u8, host: u8) -> IpAddr {
    IpAddr::from([127, net, 0, host])
}

async fn land(from: IpAddr, target: SocketAddr, method: &str, path: &str) -> Outcome {
    workload::request(from, target, method, path, "deathstar", REQUEST_TIMEOUT).await
}

fn landed(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Response { status: 200, body } if body == "Ship landed\n")
}

fn denied(outcome: &Outcome) -> bool {
    matches!(outcome, Outcome::Response { status: 403, body } if body == "Access denied\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_is_enforced_reloaded_and_bad_yaml_keeps_the_last_good_state() -> Result<()> {
    let net = 31;
    let (dir, config) = config_dir_with(&[("app.yaml", &star_wars(net))])?;
    let _backend = workload::serve(SocketAddr::new(ip(net, 1), 8080), workload::deathstar()).await?;
    let agent = Agent::start(&config, &dir.path().join("state"))?;
    let frontend: SocketAddr = format!("127.{net}.1.1:8000").parse()?;
    let (tiefighter, xwing) = (ip(net, 2), ip(net, 3));

    // No policy: everyone lands, and the frontend is the Service's loopback cluster IP.
    assert!(landed(&land(xwing, frontend, "POST", "/v1/request-landing").await));
    let services = agent.cli_json(&["service", "list"])?;
    let deathstar = services.as_array().and_then(|s| s.iter().find(|s| s["name"] == "default/deathstar:8000"));
    assert_eq!(deathstar.map(|s| s["frontend"].clone()), Some(Value::from(frontend.to_string())));
    assert_eq!(deathstar.map(|s| s["backends"].clone()), Some(serde_json::json!([format!("127.{net}.0.1:8080")])));

    // L7 policy: empire may only POST the landing request; the alliance is dropped at L3.
    let before = agent.generation();
    std::fs::write(config.join("policy.yaml"), L7_POLICY)?;
    agent.wait_for_generation_after(before)?;
    assert!(landed(&land(tiefighter, frontend, "POST", "/v1/request-landing").await));
    assert!(denied(&land(tiefighter, frontend, "PUT", "/v1/exhaust-port").await));
    assert_eq!(land(xwing, frontend, "POST", "/v1/request-landing").await, Outcome::Closed);
    let endpoints = agent.cli_json(&["endpoint", "list"])?;
    let enforced: Vec<(String, bool)> = endpoints
        .as_array()
        .context("endpoint list")?
        .iter()
        .map(|e| (e["name"].as_str().unwrap_or_default().to_string(), e["ingress_enforced"] == true))
        .collect();
    assert_eq!(
        enforced,
        vec![("deathstar-0".into(), true), ("tiefighter".into(), false), ("xwing".into(), false)]
    );

    // A bad field: the exact error is reported, rule1 keeps its last good version.
    std::fs::write(config.join("policy.yaml"), L7_POLICY.replace("port: \"http\"", "port: \"99999\""))?;
    let errors = agent.wait_for_errors()?;
    assert_eq!(
        errors,
        vec![
            "policy.yaml: document 1 (CiliumNetworkPolicy default/rule1): spec.ingress[0].toPorts[0].ports[0].port: port `99999` is outside 0..=65535".to_string()
        ]
    );
    assert!(denied(&land(tiefighter, frontend, "PUT", "/v1/exhaust-port").await));
    assert_eq!(land(xwing, frontend, "POST", "/v1/request-landing").await, Outcome::Closed);
    // Status says per file what is loaded and which file is in trouble.
    assert_eq!(
        agent.status()?["files"],
        serde_json::json!([
            {"file": "app.yaml", "objects": 4, "kept_last_good": 0, "errors": []},
            {"file": "policy.yaml", "objects": 1, "kept_last_good": 1, "errors": errors},
        ])
    );

    // Broken YAML syntax: nothing of the file can be read; everything it defined stays.
    std::fs::write(config.join("policy.yaml"), "apiVersion: cilium.io/v2\nkind: [unclosed\n")?;
    let mut syntax_error = None;
    for _ in 0..200 {
        syntax_error = agent.wait_for_errors()?.into_iter().find(|e| e.starts_with("policy.yaml: document 1: "));
        if syntax_error.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        syntax_error.as_deref(),
        Some("policy.yaml: document 1: invalid YAML: did not find expected ',' or ']' at line 3 column 1, while parsing a flow sequence at line 2 column 7")
    );
    assert!(denied(&land(tiefighter, frontend, "PUT", "/v1/exhaust-port").await));
    assert_eq!(land(xwing, frontend, "POST", "/v1/request-landing").await, Outcome::Closed);

    // Removing the file removes the policy.
    let before = agent.generation();
    std::fs::remove_file(config.join("policy.yaml"))?;
    let status = agent.wait_for_generation_after(before)?;
    assert_eq!(status["errors"], serde_json::json!([]));
    assert!(landed(&land(xwing, frontend, "POST", "/v1/request-landing").await));

    // SIGTERM: clean exit, socket removed.
    let state_dir = agent.state_dir.clone();
    let exit = agent.terminate()?;
    assert!(exit.success(), "agent exited with {exit}");
    assert!(!state_dir.join("api.sock").exists());
    Ok(())
}

/// helloworld-v1 at .0.1, helloworld-v2 at .0.2 (port 5000), client at .0.3; Services
/// helloworld (.1.1:5000), helloworld-v1/-v2 without cluster IPs.
fn helloworld(net: u8) -> String {
    let mut out = String::new();
    for (host, version) in [(1, "v1"), (2, "v2")] {
        out.push_str(&format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: helloworld-{version}-0\n  labels: {{app: helloworld, version: {version}}}\nstatus:\n  podIP: 127.{net}.0.{host}\n---\n\
             apiVersion: v1\nkind: Service\nmetadata:\n  name: helloworld-{version}\nspec:\n  selector: {{app: helloworld, version: {version}}}\n  ports:\n  - {{port: 5000, name: http}}\n---\n"
        ));
    }
    out.push_str(&format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: client-0\n  labels: {{kind: client}}\nstatus:\n  podIP: 127.{net}.0.3\n---\n\
         apiVersion: v1\nkind: Service\nmetadata:\n  name: helloworld\nspec:\n  clusterIP: 127.{net}.1.1\n  selector: {{app: helloworld}}\n  ports:\n  - {{port: 5000, name: http}}\n"
    ));
    out
}

/// Cilium's envoy-helloworld-v1-90-v2-10.yaml with the weights as parameters.
fn canary(v1: u32, v2: u32) -> String {
    format!(
        r#"apiVersion: cilium.io/v2
kind: CiliumEnvoyConfig
metadata:
  name: envoy-lb-listener
spec:
  services:
    - name: helloworld
      namespace: default
  backendServices:
    - name: helloworld-v1
      namespace: default
    - name: helloworld-v2
      namespace: default
  resources:
    - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
      name: envoy-lb-listener
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: envoy-lb-listener
                rds:
                  route_config_name: lb_route
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
    - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
      name: lb_route
      virtual_hosts:
        - name: "lb_route"
          domains: [ "*" ]
          routes:
            - match:
                prefix: "/"
              route:
                weighted_clusters:
                  clusters:
                    - name: "default/helloworld-v1"
                      weight: {v1}
                    - name: "default/helloworld-v2"
                      weight: {v2}
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: "default/helloworld-v1"
      type: EDS
    - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
      name: "default/helloworld-v2"
      type: EDS
"#
    )
}

/// An L7 policy on the helloworld pods: the client may GET anything.
const HELLOWORLD_POLICY: &str = r#"apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata:
  name: helloworld-get
spec:
  endpointSelector:
    matchLabels: {app: helloworld}
  ingress:
  - fromEndpoints:
    - matchLabels: {kind: client}
    toPorts:
    - ports: [{port: "5000", protocol: TCP}]
      rules:
        http: [{method: GET}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn live_reload_of_routes_and_policies_under_load_fails_no_request() -> Result<()> {
    let net = 32;
    let (dir, config) = config_dir_with(&[("app.yaml", &helloworld(net)), ("canary.yaml", &canary(90, 10))])?;
    let _v1 = workload::serve(SocketAddr::new(ip(net, 1), 5000), workload::helloworld("v1", "helloworld-v1-0")).await?;
    let _v2 = workload::serve(SocketAddr::new(ip(net, 2), 5000), workload::helloworld("v2", "helloworld-v2-0")).await?;
    let agent = Agent::start(&config, &dir.path().join("state"))?;
    let frontend: SocketAddr = format!("127.{net}.1.1:5000").parse()?;
    let client = ip(net, 3);

    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut loaders = Vec::new();
    for _ in 0..4 {
        let (stop, sent) = (stop.clone(), sent.clone());
        loaders.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            // Bounded: stops when told, or after 20k requests per loader at most.
            for _ in 0..20_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let outcome = workload::request(client, frontend, "GET", "/hello", "helloworld", REQUEST_TIMEOUT).await;
                sent.fetch_add(1, Ordering::Relaxed);
                if !matches!(&outcome, Outcome::Response { status: 200, body } if body.starts_with("Hello version: v")) {
                    failures.push(outcome);
                }
            }
            failures
        }));
    }

    // Reload routes and policies while the load runs; each change must be applied.
    let changes: Vec<(&str, String)> = vec![
        ("canary.yaml", canary(50, 50)),
        ("policy.yaml", HELLOWORLD_POLICY.to_string()),
        ("canary.yaml", canary(10, 90)),
        ("policy.yaml", HELLOWORLD_POLICY.replace("method: GET", "method: \"GET|HEAD\"")),
        ("canary.yaml", canary(0, 100)),
    ];
    for (file, text) in changes {
        let before = agent.generation();
        std::fs::write(config.join(file), text)?;
        agent.wait_for_generation_after(before)?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for loader in loaders {
        failures.extend(loader.await?);
    }
    assert!(sent.load(Ordering::Relaxed) > 100, "the load generator barely ran");
    assert_eq!(failures, Vec::<Outcome>::new());

    // The last route (0/100) is in force.
    for _ in 0..20 {
        let outcome = workload::request(client, frontend, "GET", "/hello", "helloworld", REQUEST_TIMEOUT).await;
        assert!(matches!(&outcome, Outcome::Response { status: 200, body } if body.starts_with("Hello version: v2")), "{outcome}");
    }
    // And the last policy: POST is not allowed.
    let post = workload::request(client, frontend, "POST", "/hello", "helloworld", REQUEST_TIMEOUT).await;
    assert_eq!(post, Outcome::Response { status: 403, body: "Access denied\r\n".into() });
    agent.terminate()?;
    Ok(())
}

/// A TCP connection to `target` from the pod address `source`.
async fn connect_from(source: IpAddr, target: SocketAddr) -> Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket.connect(target).await?)
}

/// Everything the proxy sends on `stream` until it closes it.
async fn response_until_closed(stream: &mut tokio::net::TcpStream) -> Result<String> {
    use tokio::io::AsyncReadExt;
    let mut response = Vec::new();
    tokio::time::timeout(REQUEST_TIMEOUT, stream.read_to_end(&mut response)).await.context("answered and closed")??;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// A backend that accepts connections, reads what comes and never answers.
async fn silent_backend(addr: SocketAddr) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::io::AsyncReadExt;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move { while matches!(stream.read(&mut [0u8; 1024]).await, Ok(1..)) {} });
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cec_request_timeout_answers_408_to_a_request_whose_body_stops_short() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let net = 34;
    let with_timeout = canary(100, 0).replace(
        "stat_prefix: envoy-lb-listener\n",
        "stat_prefix: envoy-lb-listener\n                request_timeout: 1s\n",
    );
    assert!(with_timeout.contains("request_timeout: 1s"));
    let (dir, config) = config_dir_with(&[("app.yaml", &helloworld(net)), ("canary.yaml", &with_timeout)])?;
    let _v1 = silent_backend(SocketAddr::new(ip(net, 1), 5000)).await?;
    let agent = Agent::start(&config, &dir.path().join("state"))?;
    let errors = agent.status()?["errors"].clone();
    assert_eq!(errors, serde_json::json!([]), "the CEC is accepted");

    let mut stream = connect_from(ip(net, 3), format!("127.{net}.1.1:5000").parse()?).await?;
    let started = std::time::Instant::now();
    stream.write_all(b"POST /upload HTTP/1.1\r\nhost: helloworld\r\ncontent-length: 10\r\n\r\nhalf").await?;
    let response = response_until_closed(&mut stream).await?;
    assert!(response.starts_with("HTTP/1.1 408 "), "{response}");
    assert!(response.ends_with("request timeout"), "{response}");
    // The route's own timeout (Envoy's default, 15 s) would have answered 504 much later.
    assert!(started.elapsed() >= Duration::from_secs(1), "{:?}", started.elapsed());
    agent.terminate()?;
    Ok(())
}

/// A backend that answers `200 got it` only once it has read a request ending in `END`.
async fn whole_body_backend(addr: SocketAddr) -> Result<tokio::task::JoinHandle<()>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind(addr).await?;
    Ok(tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut received = Vec::new();
                let mut buf = [0u8; 1024];
                while !received.ends_with(b"END") {
                    let Ok(read @ 1..) = stream.read(&mut buf).await else { return };
                    received.extend_from_slice(&buf[..read]);
                }
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\ngot it").await;
            });
        }
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cec_route_timeout_starts_when_the_upload_has_arrived() -> Result<()> {
    use tokio::io::AsyncWriteExt;
    let net = 35;
    let with_timeout = canary(100, 0).replace("              route:\n", "              route:\n                timeout: 1s\n");
    assert!(with_timeout.contains("timeout: 1s"));
    let (dir, config) = config_dir_with(&[("app.yaml", &helloworld(net)), ("canary.yaml", &with_timeout)])?;
    let _v1 = whole_body_backend(SocketAddr::new(ip(net, 1), 5000)).await?;
    let agent = Agent::start(&config, &dir.path().join("state"))?;
    assert_eq!(agent.status()?["errors"], serde_json::json!([]), "the CEC is accepted");

    let mut stream = connect_from(ip(net, 3), format!("127.{net}.1.1:5000").parse()?).await?;
    let started = std::time::Instant::now();
    stream.write_all(b"POST /upload HTTP/1.1\r\nhost: helloworld\r\ncontent-length: 9\r\nconnection: close\r\n\r\n").await?;
    // An upload of 1.5 s on a route whose timeout is 1 s: Envoy counts the route timeout from
    // the end of the request, so the answer is the backend's, not a 504 at 1 s.
    for piece in [&b"abc"[..], b"def", b"END"] {
        stream.write_all(piece).await?;
        tokio::time::sleep(Duration::from_millis(750)).await;
    }
    let response = response_until_closed(&mut stream).await?;
    assert!(response.starts_with("HTTP/1.1 200 "), "{response}");
    assert!(response.ends_with("got it"), "{response}");
    assert!(started.elapsed() >= Duration::from_millis(1500), "{:?}", started.elapsed());
    agent.terminate()?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_survive_a_restart() -> Result<()> {
    let net = 33;
    let (dir, config) = config_dir_with(&[("app.yaml", &star_wars(net))])?;
    let state = dir.path().join("state");
    let ids = |agent: &Agent| -> Result<Vec<(u64, Value)>> {
        Ok(agent
            .cli_json(&["identity", "list"])?
            .as_array()
            .context("identity list")?
            .iter()
            .filter(|i| i["id"].as_u64().is_some_and(|id| id >= 256))
            .map(|i| (i["id"].as_u64().unwrap_or_default(), i["endpoints"].clone()))
            .collect())
    };
    let agent = Agent::start(&config, &state)?;
    let first = ids(&agent)?;
    assert_eq!(first.len(), 3);
    agent.terminate()?;

    // A new pod that sorts first would take 256 on a fresh table; the persisted numbers stay.
    let mut app = star_wars(net);
    app.push_str(&format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: a-probe\n  labels: {{org: rebels}}\nstatus:\n  podIP: 127.{net}.0.9\n"
    ));
    std::fs::write(config.join("app.yaml"), app)?;
    let agent = Agent::start(&config, &state)?;
    let second = ids(&agent)?;
    for identity in &first {
        assert!(second.contains(identity), "{identity:?} changed after restart: {second:?}");
    }
    assert!(second.iter().any(|(id, eps)| *id == 259 && *eps == serde_json::json!(["default/a-probe"])));
    agent.terminate()?;
    Ok(())
}

#[test]
fn the_default_ebpf_datapath_needs_a_cgroup_and_says_so() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let output = Command::new(SLUICE)
        .args(["agent", "--node", "n", "--config-dir"])
        .arg(dir.path())
        .arg("--state-dir")
        .arg(dir.path())
        .output()?;
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--datapath ebpf needs --cgroup PATH"), "{stderr}");
    Ok(())
}

/// Runs `sluice agent` with `args` expecting it to stop by itself (bounded); returns its exit
/// status and stderr.
fn agent_that_should_exit(config_dir: &Path, state_dir: &Path, args: &[&str]) -> Result<(std::process::ExitStatus, String)> {
    let mut child = Command::new(SLUICE)
        .args(["agent", "--node", "node-a", "--datapath", "none", "--proxy-workers", "1"])
        .arg("--config-dir")
        .arg(config_dir)
        .arg("--state-dir")
        .arg(state_dir)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting sluice agent")?;
    for _ in 0..200 {
        if let Some(exit) = child.try_wait()? {
            let mut stderr = String::new();
            if let Some(mut pipe) = child.stderr.take() {
                std::io::Read::read_to_string(&mut pipe, &mut stderr)?;
            }
            return Ok((exit, stderr));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("the agent kept running although it could not start properly")
}

#[test]
fn startup_errors_stop_the_agent_and_name_the_address_or_path() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("config");
    std::fs::create_dir_all(&config)?;

    // A busy metrics address: no agent without its metrics, and no socket left behind.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let busy = taken.local_addr()?.to_string();
    let state = dir.path().join("state");
    let (exit, stderr) = agent_that_should_exit(&config, &state, &["--metrics-address", &busy])?;
    assert!(!exit.success(), "{exit}");
    assert!(stderr.contains(&format!("binding the metrics address {busy}: ")), "{stderr}");
    assert!(!state.join("api.sock").exists(), "a failed start left its API socket");

    // A state dir that cannot exist (its parent is a file).
    let file = dir.path().join("a-file");
    std::fs::write(&file, "")?;
    let (exit, stderr) =
        agent_that_should_exit(&config, &file.join("state"), &["--metrics-address", "127.0.0.1:0"])?;
    assert!(!exit.success(), "{exit}");
    assert!(stderr.contains(&format!("creating the state dir {}", file.join("state").display())), "{stderr}");

    // Another agent answers on the socket: refuse, and leave that agent alone.
    let first = Agent::start(&config, &state)?;
    let (exit, stderr) = agent_that_should_exit(&config, &state, &["--metrics-address", "127.0.0.1:0"])?;
    assert!(!exit.success(), "{exit}");
    assert!(
        stderr.contains(&format!("another agent is serving {}", state.join("api.sock").display())),
        "{stderr}"
    );
    assert_eq!(first.status()?["node"], "node-a");
    first.terminate()?;
    Ok(())
}

fn running_as_root() -> Result<bool> {
    Ok(std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self")?) == 0)
}

/// `program` as `nobody` when the tests run as root, else as the tests' own user.
fn as_unprivileged_user(program: &str) -> Result<Command> {
    if !running_as_root()? {
        return Ok(Command::new(program));
    }
    let mut command = Command::new("setpriv");
    command.args(["--reuid=65534", "--regid=65534", "--clear-groups", program]);
    Ok(command)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_runs_without_root_and_its_next_steps_work() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    std::os::unix::fs::chown(tmp.path(), Some(65534), Some(65534))?;
    let output = as_unprivileged_user(SLUICE)?
        .arg("demo")
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .output()
        .context("running sluice demo")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("Every step behaved as expected"), "{stdout}");
    let unprivileged_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_unprivileged_port_start")?;
    if unprivileged_from.trim().parse::<u16>()? > 80 {
        assert!(stdout.starts_with("Port 80 is privileged here and this user may not bind it: the demo runs in a private user and network namespace"), "{stdout}");
    }

    // The printed next steps name the kept config; run its agent line (it binds the deathstar
    // frontend on port 80, so only as root) and the printed status and curl.
    let next: Vec<&str> = stdout.lines().skip_while(|line| !line.starts_with("Next, on the demo's config (kept in ")).collect();
    let kept = next
        .first()
        .and_then(|line| line.strip_prefix("Next, on the demo's config (kept in "))
        .and_then(|rest| rest.split(';').next())
        .context("no next steps printed")?;
    assert!(kept.starts_with(&tmp.path().join("sluice-demo-").display().to_string()), "{kept}");
    let command_line = |needle: &str| -> Result<Vec<String>> {
        let line = next.iter().find(|line| line.contains(needle)).with_context(|| format!("no {needle:?} line in {next:?}"))?;
        let command = line.split('#').next().unwrap_or_default();
        Ok(command.split_whitespace().map(str::to_owned).collect())
    };
    let agent_line = command_line(" agent --config-dir ")?;
    assert_eq!(agent_line[0], SLUICE);
    let state_dir = PathBuf::from(kept).join("state");
    if !running_as_root()? {
        return Ok(());
    }
    let args: Vec<String> = agent_line[1..]
        .iter()
        .map(|arg| if arg == "127.0.0.1:9965" { "127.0.0.1:0".to_owned() } else { arg.clone() })
        .collect();
    let child = Command::new(SLUICE).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let agent = Agent { child, state_dir };
    let status = agent.wait_for_generation_after(0)?;
    assert_eq!(status["files"].as_array().map(Vec::len), Some(5), "{status}");
    assert_eq!(status["errors"], serde_json::json!([]));
    let status_line = command_line(" status --state-dir ")?;
    let printed = Command::new(&status_line[0]).args(&status_line[1..]).output()?;
    assert!(String::from_utf8_lossy(&printed.stdout).contains("Files:           5 loaded"), "{printed:?}");
    // The printed curl for the tiefighter: the L7 policy still answers 403 without backends.
    let curl = command_line("curl -X PUT")?;
    let from: IpAddr = curl[4].parse()?;
    let url = curl[5].strip_prefix("http://").context("url")?;
    let (target, path) = url.split_at(url.find('/').context("path")?);
    assert!(denied(&workload::request(from, target.parse()?, "PUT", path, "deathstar", REQUEST_TIMEOUT).await));
    agent.terminate()?;
    Ok(())
}
