//! Test harness: real backends, real clients and table builders on loopback (each test its own ports).
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use regex::Regex;
use sluice_proxy::flow::FlowEvent;
use sluice_proxy::tables::*;
use sluice_proxy::{FlowSink, Handle, ProxyConfig, ProxyTables};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

// ---------------------------------------------------------------------------------------------
// Proxy
// ---------------------------------------------------------------------------------------------

pub struct Proxy {
    pub handle: Handle,
    pub flows: tokio::sync::mpsc::Receiver<FlowEvent>,
}

impl Proxy {
    /// The proxy on its own threads, as the agent runs it on a multi-core node.
    pub fn start() -> Proxy {
        Self::start_with_workers(2)
    }

    pub fn start_with_workers(workers: usize) -> Proxy {
        let (sink, flows) = FlowSink::new(100_000);
        let handle = Handle::start(ProxyConfig { workers, flows: sink }).expect("proxy starts");
        Proxy { handle, flows }
    }

    /// The proxy on the test's runtime, so paused time governs its timers too.
    pub fn start_here() -> Proxy {
        let (sink, flows) = FlowSink::new(100_000);
        let handle = Handle::start_on(tokio::runtime::Handle::current(), sink);
        Proxy { handle, flows }
    }

    /// Applies `tables` and returns the address of the listener named `name`.
    pub fn apply(&self, tables: ProxyTables) -> SocketAddr {
        let applied = self.handle.apply(tables).expect("tables apply");
        applied.listeners[0].addr
    }

    /// Flow events recorded so far.
    pub fn drain_flows(&mut self) -> Vec<FlowEvent> {
        let mut events = Vec::new();
        while let Ok(event) = self.flows.try_recv() {
            events.push(event);
        }
        events
    }
}

// ---------------------------------------------------------------------------------------------
// Backends
// ---------------------------------------------------------------------------------------------

pub type Reply = Pin<Box<dyn Future<Output = Response<Full<Bytes>>> + Send>>;
type Handler = Arc<dyn Fn(usize, SeenRequest) -> Reply + Send + Sync>;

/// What a backend saw of one request.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: String,
    pub path: String,
    pub headers: HeaderMap,
    pub version: http::Version,
    pub body: Bytes,
}

/// A real HTTP server (HTTP/1.1 and HTTP/2 prior knowledge) that records what it receives.
pub struct Backend {
    pub addr: SocketAddr,
    pub name: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Backend {
    /// Answers `200` with body `name` and header `x-backend: name`.
    pub async fn echo(name: &str) -> Backend {
        Self::echo_on(name, IpAddr::from([127, 0, 0, 1])).await
    }

    pub async fn echo_on(name: &str, ip: IpAddr) -> Backend {
        let label = name.to_owned();
        Self::start_on(name, ip, move |_, _| {
            let label = label.clone();
            Box::pin(async move { reply(StatusCode::OK, &label) })
        })
        .await
    }

    /// Calls `handler(hit_index, request)` for every request (hit_index counts from 0).
    pub async fn start(name: &str, handler: impl Fn(usize, SeenRequest) -> Reply + Send + Sync + 'static) -> Backend {
        Self::start_on(name, IpAddr::from([127, 0, 0, 1]), handler).await
    }

    pub async fn start_on(
        name: &str,
        ip: IpAddr,
        handler: impl Fn(usize, SeenRequest) -> Reply + Send + Sync + 'static,
    ) -> Backend {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await.expect("backend binds");
        let addr = listener.local_addr().expect("backend addr");
        let seen: Arc<Mutex<Vec<SeenRequest>>> = Arc::default();
        let hits = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);
        let task = {
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else { continue };
                    let seen = Arc::clone(&seen);
                    let hits = Arc::clone(&hits);
                    let handler = Arc::clone(&handler);
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                            let seen = Arc::clone(&seen);
                            let hits = Arc::clone(&hits);
                            let handler = Arc::clone(&handler);
                            async move {
                                let (parts, body) = request.into_parts();
                                let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                                let request = SeenRequest {
                                    method: parts.method.to_string(),
                                    path: parts.uri.path_and_query().map_or("/".into(), |pq| pq.to_string()),
                                    headers: parts.headers,
                                    version: parts.version,
                                    body,
                                };
                                seen.lock().unwrap().push(request.clone());
                                let index = hits.fetch_add(1, Ordering::SeqCst);
                                Ok::<_, Infallible>(handler(index, request).await)
                            }
                        });
                        let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
            })
        };
        Backend { addr, name: name.to_owned(), seen, task }
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

pub fn reply(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("x-backend", body)
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

/// A backend whose answers wait until the returned sender is sent `true`.
pub async fn gated(name: &str) -> (Backend, tokio::sync::watch::Sender<bool>) {
    let (release, released) = tokio::sync::watch::channel(false);
    let label = name.to_owned();
    let backend = Backend::start(name, move |_, _| {
        let mut released = released.clone();
        let label = label.clone();
        Box::pin(async move {
            let _ = released.wait_for(|r| *r).await;
            reply(StatusCode::OK, &label)
        })
    })
    .await;
    (backend, release)
}

/// A raw TCP backend: `serve(connection_index, stream)` for every accepted connection;
/// also returns how many connections were accepted.
pub async fn raw_backend<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(usize, TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&accepted);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            tokio::spawn(serve(counter.fetch_add(1, Ordering::SeqCst), stream));
        }
    });
    (addr, accepted)
}

/// An address where nothing listens (connections are refused).
pub async fn refused_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Clients
// ---------------------------------------------------------------------------------------------

/// A response as the client saw it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: String,
}

/// One HTTP/1.1 request on a fresh connection from `source` (any 127/8 address).
pub async fn get_from(source: IpAddr, proxy: SocketAddr, path: &str) -> Result<Got, hyper::Error> {
    let mut sender = http1_connect(source, proxy).await;
    let request = Request::get(path).header("host", "app.test").body(Full::new(Bytes::new())).unwrap();
    send(&mut sender, request).await
}

pub async fn get(proxy: SocketAddr, path: &str) -> Got {
    get_from(IpAddr::from([127, 0, 0, 1]), proxy, path).await.expect("proxy answers")
}

pub async fn http1_connect(source: IpAddr, proxy: SocketAddr) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = connect_from(source, proxy).await;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
    tokio::spawn(connection);
    sender
}

pub async fn connect_from(source: IpAddr, target: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    socket.connect(target).await.unwrap()
}

pub async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    request: Request<Full<Bytes>>,
) -> Result<Got, hyper::Error> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    collect(response).await
}

pub async fn collect(response: Response<Incoming>) -> Result<Got, hyper::Error> {
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok(Got { status: parts.status, headers: parts.headers, body: String::from_utf8_lossy(&body).into_owned() })
}

pub type BodyChunks = tokio::sync::mpsc::Sender<Result<http_body::Frame<Bytes>, Infallible>>;
pub type PendingResponse = tokio::task::JoinHandle<Result<Response<Incoming>, hyper::Error>>;

/// A `POST /upload` (chunked on HTTP/1.1, DATA frames on HTTP/2 prior knowledge) whose body is
/// sent piece by piece through the returned sender; dropping it ends the body.
pub async fn streaming_post(addr: SocketAddr, version: http::Version) -> (BodyChunks, PendingResponse) {
    let (chunks, mut receiver) = tokio::sync::mpsc::channel(4);
    let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| receiver.poll_recv(cx)));
    let stream = TokioIo::new(connect_from(IpAddr::from([127, 0, 0, 1]), addr).await);
    let response = if version == http::Version::HTTP_2 {
        let (mut sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), stream).await.unwrap();
        tokio::spawn(connection);
        let request = Request::post("http://app.test/upload").version(version).body(body).unwrap();
        tokio::spawn(sender.send_request(request))
    } else {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(stream).await.unwrap();
        tokio::spawn(connection);
        let request = Request::post("/upload").header("host", "app.test").body(body).unwrap();
        tokio::spawn(sender.send_request(request))
    };
    (chunks, response)
}

/// A keep-alive client that sends every request from `source`.
pub fn pooled_client(source: IpAddr) -> hyper_util::client::legacy::Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>> {
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_local_address(Some(source));
    connector.set_nodelay(true);
    hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build(connector)
}

// ---------------------------------------------------------------------------------------------
// Tables
// ---------------------------------------------------------------------------------------------

pub fn hcm(routes: Vec<Route>) -> HttpConnectionManager {
    HttpConnectionManager {
        stat_prefix: "test".into(),
        route_config: Arc::new(RouteConfig {
            name: "routes".into(),
            virtual_hosts: vec![virtual_host(routes)],
            request_headers_to_add: vec![],
            request_headers_to_remove: vec![],
            response_headers_to_add: vec![],
            response_headers_to_remove: vec![],
        }),
        normalize_path: true,
        merge_slashes: true,
        escaped_slashes: EscapedSlashesAction::default(),
        stream_idle_timeout: Some(Duration::from_secs(300)),
        request_timeout: None,
        request_headers_timeout: None,
        max_request_headers_bytes: 60 * 1024,
        max_headers_count: 100,
        idle_timeout: Some(Duration::from_secs(3600)),
        use_remote_address: false,
        skip_xff_append: false,
        upgrades: vec![],
    }
}

pub fn virtual_host(routes: Vec<Route>) -> VirtualHost {
    VirtualHost {
        name: "all".into(),
        domains: vec!["*".into()],
        routes,
        retry_policy: None,
        request_body_buffer_limit: 1024 * 1024,
        include_request_attempt_count: true,
    }
}

pub fn prefix_route(prefix: &str, action: ForwardAction) -> Route {
    Route {
        name: format!("route{prefix}"),
        matcher: RouteMatch { path: PathMatch::Prefix(prefix.into()), case_sensitive: true, headers: vec![], query_parameters: vec![] },
        action: RouteAction::Forward(Arc::new(action)),
    }
}

pub fn to_clusters(weights: &[(&str, u32)]) -> ForwardAction {
    ForwardAction {
        clusters: weights.iter().map(|(name, weight)| WeightedCluster { name: (*name).into(), weight: *weight }).collect(),
        rewrite: None,
        host_rewrite_literal: None,
        timeout: Some(Duration::from_secs(15)),
        idle_timeout: None,
        retry_policy: None,
        mirrors: vec![],
        cluster_not_found_status: 503,
    }
}

pub fn to_cluster(name: &str) -> ForwardAction {
    to_clusters(&[(name, 1)])
}

pub fn retry_policy(retry_on: RetryOn, num_retries: u32) -> RetryPolicy {
    RetryPolicy {
        retry_on,
        num_retries,
        per_try_timeout: None,
        retriable_status_codes: vec![],
        base_interval: Duration::from_millis(25),
        max_interval: Duration::from_millis(250),
        avoid_previous_hosts: false,
        host_selection_retry_max_attempts: 1,
    }
}

pub fn cluster(name: &str, endpoints: &[SocketAddr]) -> Cluster {
    Cluster {
        name: name.into(),
        endpoints: endpoints.iter().map(|addr| Endpoint { addr: *addr, weight: 1 }).collect(),
        lb_policy: LbPolicy::RoundRobin,
        connect_timeout: Duration::from_secs(5),
        circuit_breakers: CircuitBreakers::default(),
        outlier_detection: None,
        protocol: UpstreamProtocol::Http1,
    }
}

/// One auto-port listener named `main` plus the given clusters.
pub fn tables(generation: u64, http: HttpConnectionManager, clusters: Vec<Cluster>) -> ProxyTables {
    ProxyTables {
        generation,
        listeners: vec![Listener { name: "main".into(), bind: Bind::LoopbackAuto, http: Arc::new(http) }],
        clusters: clusters.into_iter().map(|c| (c.name.clone(), Arc::new(c))).collect(),
        peers: BTreeMap::new(),
        policies: BTreeMap::new(),
        ..ProxyTables::default()
    }
}

/// Every path to `action`'s cluster, which must be `svc` with `endpoints`.
pub fn svc_tables(action: ForwardAction, endpoints: &[SocketAddr]) -> ProxyTables {
    tables(1, hcm(vec![prefix_route("/", action)]), vec![cluster("svc", endpoints)])
}

/// The client address that `guard` gives identity 400.
pub const CLIENT_400: [u8; 4] = [127, 0, 0, 20];

/// Gives `CLIENT_400` identity 400 and lets it reach `backend` only through `http` rules;
/// every other identity is denied at L3/L4.
pub fn guard(tables: &mut ProxyTables, backend: SocketAddr, http: Vec<HttpRule>) {
    tables.peers.insert(IpAddr::from(CLIENT_400), peer(400, "default/client"));
    tables.policies.insert(backend.ip(), ingress_only(true, vec![allow(&[400], backend.port(), Some(http), "guard")]));
}

pub fn peer(identity: Identity, name: &str) -> Peer {
    Peer { identity, name: name.into(), labels: vec![] }
}

/// An allow rule for `remotes` on TCP `port`, restricted to `http` rules when given.
pub fn allow(remotes: &[Identity], port: u16, http: Option<Vec<HttpRule>>, origin: &str) -> AllowRule {
    AllowRule {
        l4: L4Match {
            remotes: Remotes::Only(remotes.iter().copied().collect::<BTreeSet<_>>()),
            ports: vec![PortRange { protocol: Protocol::Tcp, start: port, end: port }],
            origin: origin.into(),
        },
        http,
        auth_required: false,
        origin: origin.into(),
    }
}

/// A rule for `method` (a plain string, as the agent hands it over) and the `path` regex.
pub fn http_rule(method: &str, path: &str) -> HttpRule {
    HttpRule {
        method: Some(FieldPattern::Literal(method.to_owned())),
        path: Some(FieldPattern::Regex(FullMatch::new(Regex::new(path).unwrap()))),
        host: None,
        headers: vec![],
    }
}

pub fn egress_only(default_deny: bool, allow: Vec<AllowRule>) -> Arc<EndpointPolicy> {
    Arc::new(EndpointPolicy {
        ingress: DirectionPolicy::default(),
        egress: DirectionPolicy { default_deny, deny: vec![], allow },
    })
}

pub fn ingress_only(default_deny: bool, allow: Vec<AllowRule>) -> Arc<EndpointPolicy> {
    Arc::new(EndpointPolicy {
        ingress: DirectionPolicy { default_deny, deny: vec![], allow },
        egress: DirectionPolicy::default(),
    })
}
