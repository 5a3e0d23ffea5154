//! Harness for the end-to-end suites: a config dir, an in-process agent (gateway mode), pods
//! played by loopback addresses, backends that record what reached them, raw clients.
//!
//! Each suite picks its own `127.<net>.0.0/16`: pod `h` is `127.<net>.0.<h>`, Service `s` is
//! `127.<net>.1.<s>`, so suites run in parallel without sharing addresses.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use sluice_agent::agent::{self, AgentConfig, RunningAgent};
use sluice_agent::flows::{FlowFilter, FlowRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::task::JoinHandle;

/// How long a suite waits for the agent to apply a change or for one response.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// A throw-away node: config dir, state dir and a running agent.
pub struct Node {
    pub net: u8,
    config_dir: tempfile::TempDir,
    _state_dir: tempfile::TempDir,
    agent: RunningAgent,
    generation: u64,
}

impl Node {
    /// Writes `files` into a fresh config dir and starts an agent on it.
    pub async fn start(net: u8, files: &[(&str, String)]) -> Result<Node> {
        let config_dir = tempfile::tempdir()?;
        let state_dir = tempfile::tempdir()?;
        for (name, content) in files {
            std::fs::write(config_dir.path().join(name), content)?;
        }
        let mut agent = agent::start(AgentConfig {
            config_dir: config_dir.path().to_path_buf(),
            node: "node-a".to_string(),
            state_dir: state_dir.path().to_path_buf(),
            proxy_workers: 2,
            metrics_address: None,
            serve_api: false,
        })
        .await?;
        let snapshot = agent.wait_for_generation_after(0, PATIENCE).await?;
        if !snapshot.status.errors.is_empty() {
            bail!("the suite's own config has errors: {:#?}", snapshot.status.errors);
        }
        let generation = snapshot.status.generation;
        Ok(Node { net, config_dir, _state_dir: state_dir, agent, generation })
    }

    /// Writes (or replaces) one file and waits until the agent applied it without errors.
    pub async fn apply(&mut self, name: &str, content: &str) -> Result<()> {
        std::fs::write(self.config_dir.path().join(name), content)?;
        let snapshot = self.agent.wait_for_generation_after(self.generation, PATIENCE).await?;
        if !snapshot.status.errors.is_empty() {
            bail!("applying {name} gave errors: {:#?}", snapshot.status.errors);
        }
        self.generation = snapshot.status.generation;
        Ok(())
    }

    pub fn config_dir(&self) -> &Path {
        self.config_dir.path()
    }

    pub fn agent(&self) -> &RunningAgent {
        &self.agent
    }

    pub fn pod_ip(&self, host: u8) -> IpAddr {
        pod_ip(self.net, host)
    }

    pub fn service_ip(&self, service: u8) -> IpAddr {
        service_ip(self.net, service)
    }

    /// Flows recorded so far whose source is `source` (oldest first).
    fn flows_from(&self, source: IpAddr) -> Vec<FlowRecord> {
        let all = self.agent.flows().recent(&FlowFilter::default(), usize::MAX);
        all.into_iter().filter(|flow| flow.source.ip == source).collect()
    }

    /// Sends one request from `source` (see [`request`]) and returns the reply together with the
    /// flow the agent recorded for it. Flows reach the log in batches, so this waits for a flow
    /// newer than the ones from `source` before the request.
    pub async fn request_with_flow(
        &self,
        source: IpAddr,
        target: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(Reply, FlowRecord)> {
        let before = self.flows_from(source).len();
        let reply = request(source, target, method, path, headers).await?;
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            if let Some(flow) = self.flows_from(source).into_iter().nth(before) {
                return Ok((reply, flow));
            }
            if tokio::time::Instant::now() > deadline {
                bail!("no flow from {source} was recorded for {method} {path}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn stop(self) -> Result<()> {
        self.agent.stop().await
    }
}

/// Address of pod number `host` in suite `net` (backends must listen before the node starts).
pub fn pod_ip(net: u8, host: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 0, host))
}

/// Address of Service number `service` in suite `net`.
pub fn service_ip(net: u8, service: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, net, 1, service))
}

/// A YAML Pod with labels, an IP, and one named container port.
pub fn pod(name: &str, namespace: &str, labels: &str, ip: IpAddr, port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {labels}\n\
         spec:\n  containers:\n  - name: main\n    ports:\n    - {{name: http, containerPort: {port}}}\n\
         status:\n  podIP: {ip}\n---\n"
    )
}

/// A YAML ClusterIP Service with one port.
pub fn service(name: &str, namespace: &str, selector: &str, ip: IpAddr, port: u16, target_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\n\
         spec:\n  clusterIP: {ip}\n  selector: {selector}\n  ports:\n  - {{port: {port}, targetPort: {target_port}, protocol: TCP}}\n---\n"
    )
}

/// One request as the backend received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

/// An HTTP/1.1 backend that answers `200 <path>` and records every request it receives.
pub struct RecordingBackend {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl RecordingBackend {
    pub async fn start(addr: SocketAddr) -> Result<RecordingBackend> {
        let listener = TcpListener::bind(addr).await.with_context(|| format!("binding backend {addr}"))?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = seen.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let recorder = recorder.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
                        let path = request.uri().path_and_query().map_or("", |p| p.as_str()).to_string();
                        let headers = request
                            .headers()
                            .iter()
                            .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into_owned()))
                            .collect();
                        if let Ok(mut seen) = recorder.lock() {
                            seen.push(Seen { method: request.method().to_string(), path: path.clone(), headers });
                        }
                        async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(path)))) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(RecordingBackend { addr, seen, task })
    }

    /// Everything received since the last call.
    pub fn take(&self) -> Vec<Seen> {
        self.seen.lock().map(|mut seen| std::mem::take(&mut *seen)).unwrap_or_default()
    }
}

impl Drop for RecordingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a raw client got back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Status code of the first response and everything read.
    Status(u16, String),
    /// Closed or reset without any response bytes: an L3/L4 drop in gateway mode.
    Closed,
}

impl Reply {
    pub fn status(&self) -> Option<u16> {
        match self {
            Reply::Status(status, _) => Some(*status),
            Reply::Closed => None,
        }
    }

    pub fn body(&self) -> &str {
        match self {
            Reply::Status(_, raw) => raw.split_once("\r\n\r\n").map_or("", |(_, body)| body),
            Reply::Closed => "",
        }
    }
}

/// Connects from `source` (the pod's address: that is the caller's identity) to `target`.
pub async fn connect_from(source: IpAddr, target: SocketAddr) -> Result<TcpStream> {
    let socket = if source.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(socket.connect(target).await?)
}

/// Writes `raw` bytes as they are (no client-side validation) and reads until the server
/// closes or goes quiet; the request should carry `Connection: close`.
pub async fn raw_request(source: IpAddr, target: SocketAddr, raw: &[u8]) -> Result<Reply> {
    let mut stream = connect_from(source, target).await?;
    stream.write_all(raw).await?;
    let mut received = Vec::new();
    let mut buffer = [0u8; 8192];
    loop {
        match tokio::time::timeout(Duration::from_millis(1500), stream.read(&mut buffer)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => received.extend_from_slice(&buffer[..n]),
            Ok(Err(_)) => break,
        }
    }
    if received.is_empty() {
        return Ok(Reply::Closed);
    }
    let text = String::from_utf8_lossy(&received).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no HTTP status in {text:?}"))?;
    Ok(Reply::Status(status, text))
}

/// A well-formed HTTP/1.1 request with `Connection: close`.
pub async fn request(source: IpAddr, target: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(name, _)| name.eq_ignore_ascii_case("host")) {
        raw.push_str("Host: conformance.test\r\n");
    }
    for (name, value) in headers {
        raw.push_str(&format!("{name}: {value}\r\n"));
    }
    raw.push_str("Connection: close\r\n\r\n");
    raw_request(source, target, raw.as_bytes()).await
}
