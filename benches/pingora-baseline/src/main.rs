//! `pingora-baseline`: the load harness's `pingora` target. It does the benchmark's job on
//! pingora-proxy (Cloudflare's proxy framework, on the same tokio) so the harness can measure
//! whether pingora's HTTP/1 and connection pool would beat sluice's own (DESIGN.md: pingora-core
//! "where it measurably beats the alternative"). Same job as the other proxies: the HTTP
//! allow-list from the benchmark's policy (403 otherwise) and the 90/10 split between the two
//! pods; one worker thread without work stealing, as sluice runs with `--proxy-workers 1`.
//! Not done here: the route's `retry_on: 5xx` (pingora retries failed connections on its own;
//! no answer in the benchmark is a 5xx).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{ensure, Context};
use async_trait::async_trait;
use clap::Parser;
use pingora_core::apps::HttpServerOptions;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

// The allocator sluice runs with, so allocation cost is not what the comparison measures.
#[global_allocator]
static ALLOCATOR: sluice_allocator::Allocator = sluice_allocator::Allocator;

#[derive(Debug, Parser)]
struct Args {
    /// Address to serve on (HTTP/1.1 and cleartext HTTP/2).
    #[arg(long)]
    listen: SocketAddr,
    /// The pod that gets 90% of the requests.
    #[arg(long)]
    v1: SocketAddr,
    /// The pod that gets 10%.
    #[arg(long)]
    v2: SocketAddr,
    /// The allow-list: one `METHOD PATH` per line (the benchmark policy's HTTP rules).
    #[arg(long)]
    allow: PathBuf,
}

/// Allowed paths by method: looked up with the request's own `&str`s, no allocation per request.
type AllowList = HashMap<String, HashSet<String>>;

struct Baseline {
    allowed: AllowList,
    v1: SocketAddr,
    v2: SocketAddr,
}

#[async_trait]
impl ProxyHttp for Baseline {
    type CTX = ();

    fn new_ctx(&self) -> Self::CTX {}

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> pingora_core::Result<bool> {
        let head = session.req_header();
        if self.allowed.get(head.method.as_str()).is_some_and(|paths| paths.contains(head.uri.path())) {
            return Ok(false);
        }
        session.respond_error_with_body(403, bytes_of("Access denied\r\n")).await?;
        Ok(true)
    }

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> pingora_core::Result<Box<HttpPeer>> {
        let pod = if rand::random_range(0..100) < 90 { self.v1 } else { self.v2 };
        Ok(Box::new(HttpPeer::new(pod, false, String::new())))
    }
}

fn bytes_of(text: &'static str) -> bytes::Bytes {
    bytes::Bytes::from_static(text.as_bytes())
}

fn read_allow_list(file: &PathBuf) -> anyhow::Result<AllowList> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let mut allowed = AllowList::new();
    for (index, line) in text.lines().filter(|line| !line.trim().is_empty()).enumerate() {
        let (method, request_path) = line
            .split_once(' ')
            .with_context(|| format!("{} line {}: expected `METHOD PATH`", file.display(), index + 1))?;
        allowed.entry(method.to_owned()).or_default().insert(request_path.to_owned());
    }
    Ok(allowed)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let allowed = read_allow_list(&args.allow)?;
    ensure!(!allowed.is_empty(), "{}: the allow-list is empty", args.allow.display());
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut service = pingora_proxy::http_proxy_service(
        &server.configuration,
        Baseline { allowed, v1: args.v1, v2: args.v2 },
    );
    let proxy = service.app_logic_mut().context("the proxy service has no app")?;
    let mut options = HttpServerOptions::default();
    options.h2c = true;
    proxy.server_options = Some(options);
    service.add_tcp(&args.listen.to_string());
    server.add_service(service);
    server.run_forever()
}
