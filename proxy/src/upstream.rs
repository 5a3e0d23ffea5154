//! Upstream clusters (pick endpoint -> **connect** -> forward): hosts, keep-alive pools, circuit breakers, outlier detection.
//!
//! Pools are per host: a lock-free queue of idle HTTP/1.1 connections, or one shared multiplexed
//! HTTP/2 connection. Circuit breakers are per cluster and count with atomics. A host keeps its
//! pool and outlier state across table swaps as long as its cluster keeps it with the same
//! protocol and connect timeout, so a reload neither drops warm connections nor un-ejects hosts.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use crossbeam_queue::ArrayQueue;
use foldhash::{HashMap, HashSet};
use hyper::client::conn::http2;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::body::{ProxyBody, UpstreamBody};
use crate::http1::ClientConn;
use crate::lb::{Balancer, PickInput};
use crate::outlier::{Detector, HostOutlier, OutlierSignal};
use crate::retry::AttemptOutcome;
use crate::stats::{bump, ClusterCounters, ProxyCounters};
use crate::tables::{CircuitBreakers, Cluster, LbPolicy, ProxyTables, UpstreamProtocol, MARK_PROXY_EGRESS, MARK_PROXY_INGRESS};

/// Idle HTTP/1.1 connections kept per host at most.
const MAX_IDLE_PER_HOST: usize = 256;

/// Original destinations an ORIGINAL_DST cluster remembers (with their pools) before it forgets
/// the idle ones. Envoy sweeps unused hosts every `cleanup_interval` (5 s) instead.
const MAX_ORIGINAL_DESTINATIONS: usize = 1024;

/// How upstream sockets are opened, from `ProxyTables::upstream_source` and `mark_upstream`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SocketPlan {
    source: Option<IpAddr>,
    mark: bool,
    /// Endpoints whose ingress policy the proxy enforces (`ProxyTables::policies`).
    ingress_enforced: HashSet<IpAddr>,
}

/// The options of one host's sockets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct UpstreamSocket {
    pub source: Option<IpAddr>,
    pub mark: Option<u32>,
}

impl SocketPlan {
    pub fn new(tables: &ProxyTables) -> Self {
        Self {
            source: tables.upstream_source,
            mark: tables.mark_upstream,
            ingress_enforced: if tables.mark_upstream { tables.policies.keys().copied().collect() } else { HashSet::default() },
        }
    }

    /// The kernel skips its policy for both marks; which one says whose policy the proxy
    /// applied, as Cilium's proxies do. A source of the other address family is left out (the
    /// kernel picks one).
    pub fn for_host(&self, addr: SocketAddr) -> UpstreamSocket {
        let mark = self.mark.then(|| {
            if self.ingress_enforced.contains(&addr.ip()) {
                MARK_PROXY_INGRESS
            } else {
                MARK_PROXY_EGRESS
            }
        });
        UpstreamSocket { source: self.source.filter(|source| source.is_ipv4() == addr.is_ipv4()), mark }
    }
}

/// One cluster of one table generation.
#[derive(Debug)]
pub(crate) struct ClusterState {
    pub config: Arc<Cluster>,
    /// `config.name`, shared by the flow events of the cluster's requests.
    pub name: Arc<str>,
    pub hosts: Box<[Arc<HostState>]>,
    balancer: Balancer,
    pub counters: Arc<ClusterCounters>,
    /// `None` without `outlier_detection` (and for ORIGINAL_DST clusters, which have no
    /// fixed hosts to compare): nothing is ever ejected.
    detector: Option<Detector>,
    sockets: Arc<SocketPlan>,
    /// ORIGINAL_DST hosts, created on first use.
    original_destinations: Mutex<HashMap<SocketAddr, Arc<HostState>>>,
    proxy_counters: Arc<ProxyCounters>,
}

impl ClusterState {
    /// Builds the state for `config`, taking over hosts of `previous` that did not change.
    pub fn new(
        config: Arc<Cluster>,
        previous: Option<&ClusterState>,
        counters: Arc<ClusterCounters>,
        proxy_counters: &Arc<ProxyCounters>,
        sockets: Arc<SocketPlan>,
    ) -> Self {
        let hosts: Box<[Arc<HostState>]> = config
            .endpoints
            .iter()
            .map(|endpoint| {
                let socket = sockets.for_host(endpoint.addr);
                let reusable = previous.and_then(|prev| {
                    prev.hosts.iter().find(|host| {
                        host.addr == endpoint.addr
                            && host.protocol == config.protocol
                            && host.connect_timeout == config.connect_timeout
                            && host.socket == socket
                    })
                });
                match reusable {
                    Some(host) => Arc::clone(host),
                    None => Arc::new(HostState::new(
                        endpoint.addr,
                        config.protocol,
                        config.connect_timeout,
                        socket,
                        Arc::clone(&counters),
                        Arc::clone(proxy_counters),
                    )),
                }
            })
            .collect();
        let weighted: Vec<(SocketAddr, u32)> = config.endpoints.iter().map(|e| (e.addr, e.weight)).collect();
        let balancer = Balancer::new(config.lb_policy, &weighted);
        let detector = config.outlier_detection.filter(|_| !hosts.is_empty()).map(Detector::new);
        Self {
            name: Arc::from(config.name.as_str()),
            config,
            hosts,
            balancer,
            counters,
            detector,
            sockets,
            original_destinations: Mutex::new(HashMap::default()),
            proxy_counters: Arc::clone(proxy_counters),
        }
    }

    /// Starts the outlier-detection sweeps (every `interval`) on the current runtime. They end
    /// when the cluster state is dropped or retired (by a table swap or shutdown).
    pub fn start_outlier_sweeps(self: &Arc<Self>) {
        let Some(interval) = self.detector.as_ref().map(|detector| detector.config.interval) else { return };
        let cluster: Weak<Self> = Arc::downgrade(self);
        let interval = interval.max(Duration::from_millis(1));
        tokio::spawn(async move {
            loop {
                // Re-armed after each sweep, as Envoy re-arms its interval timer.
                tokio::time::sleep(interval).await;
                let Some(cluster) = cluster.upgrade() else { return };
                let Some(detector) = cluster.detector.as_ref().filter(|d| !d.is_retired()) else { return };
                detector.sweep(&cluster.hosts, &cluster.counters, Instant::now());
            }
        });
    }

    /// A table swap replaced this state, or the proxy stops: no more sweeps (in-flight
    /// requests may still use the state).
    pub fn retire(&self) {
        if let Some(detector) = &self.detector {
            detector.retire();
        }
    }

    /// Whether a table swap can keep this state as it is for `config` and `sockets`.
    pub fn serves(&self, config: &Cluster, sockets: &SocketPlan) -> bool {
        let current = &*self.config;
        current.endpoints == config.endpoints
            && current.lb_policy == config.lb_policy
            && current.connect_timeout == config.connect_timeout
            && current.circuit_breakers == config.circuit_breakers
            && current.outlier_detection == config.outlier_detection
            && current.protocol == config.protocol
            && self.hosts.iter().all(|host| host.socket == sockets.for_host(host.addr))
            && (current.lb_policy != LbPolicy::OriginalDestination || *self.sockets == *sockets)
    }

    /// The lb_policy's pick, preferring hosts that are neither ejected nor in `avoid`; falls
    /// back to previously tried hosts, then to ejected ones (Envoy's panic mode) rather than
    /// failing while hosts exist. An ORIGINAL_DST cluster's one host is the input's original
    /// destination (none without one).
    pub fn pick(&self, input: PickInput, avoid: &[SocketAddr]) -> Option<Arc<HostState>> {
        if self.config.lb_policy == LbPolicy::OriginalDestination {
            return input.original_destination.map(|addr| self.original_destination_host(addr));
        }
        let hosts = &self.hosts;
        let load = |i: usize| hosts[i].active_requests.load(Ordering::Relaxed);
        let fresh = |i: usize| !hosts[i].outlier.is_ejected() && !avoid.contains(&hosts[i].addr);
        let healthy = |i: usize| !hosts[i].outlier.is_ejected();
        self.balancer
            .pick(hosts.len(), input, fresh, load)
            .or_else(|| self.balancer.pick(hosts.len(), input, healthy, load))
            .or_else(|| self.balancer.pick(hosts.len(), input, |_| true, load))
            .map(|index| Arc::clone(&hosts[index]))
    }

    fn original_destination_host(&self, addr: SocketAddr) -> Arc<HostState> {
        let mut known = self.original_destinations.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(host) = known.get(&addr) {
            return Arc::clone(host);
        }
        if known.len() >= MAX_ORIGINAL_DESTINATIONS {
            // Forgetting a host closes its idle pooled connections; busy ones stay.
            known.retain(|_, host| host.active_requests.load(Ordering::Relaxed) > 0);
        }
        let host = Arc::new(HostState::new(
            addr,
            self.config.protocol,
            self.config.connect_timeout,
            self.sockets.for_host(addr),
            Arc::clone(&self.counters),
            Arc::clone(&self.proxy_counters),
        ));
        known.insert(addr, Arc::clone(&host));
        host
    }

    /// Claims one of the cluster's `max_retries` concurrent retry slots.
    pub fn try_retry(&self) -> Option<RetrySlot> {
        let active = self.counters.retries_active.fetch_add(1, Ordering::Relaxed);
        if active >= u64::from(self.config.circuit_breakers.max_retries) {
            self.counters.retries_active.fetch_sub(1, Ordering::Relaxed);
            bump(&self.counters.upstream_rq_retry_overflow);
            return None;
        }
        bump(&self.counters.upstream_rq_retry);
        Some(RetrySlot(Arc::clone(&self.counters)))
    }

    /// Feeds an attempt's result to outlier detection (no-op without an `outlier_detection`).
    pub fn record(&self, host: &HostState, signal: OutlierSignal, random: u64) {
        if let Some(detector) = &self.detector {
            detector.record(&self.hosts, host, signal, &self.counters, random);
        }
    }

    pub fn ejections_active(&self) -> u64 {
        self.hosts.iter().filter(|host| host.outlier.is_ejected()).count() as u64
    }
}

/// A running retry, counted against `max_retries` until dropped.
#[derive(Debug)]
pub(crate) struct RetrySlot(Arc<ClusterCounters>);

impl Drop for RetrySlot {
    fn drop(&mut self) {
        self.0.retries_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One endpoint of a cluster: its pool and outlier state.
#[derive(Debug)]
pub(crate) struct HostState {
    pub addr: SocketAddr,
    protocol: UpstreamProtocol,
    connect_timeout: Duration,
    socket: UpstreamSocket,
    pub active_requests: AtomicU64,
    /// Open (or opening) connections to this host.
    connections: AtomicU64,
    idle: ArrayQueue<Box<ClientConn>>,
    multiplexed: ArcSwapOption<http2::SendRequest<ProxyBody>>,
    /// Serializes opening the HTTP/2 connection (slow path only).
    multiplexed_connecting: tokio::sync::Mutex<()>,
    /// Signalled when a connection goes idle or closes, for requests waiting at `max_connections`.
    released: Notify,
    pub outlier: HostOutlier,
    counters: Arc<ClusterCounters>,
    proxy_counters: Arc<ProxyCounters>,
}

impl HostState {
    fn new(
        addr: SocketAddr,
        protocol: UpstreamProtocol,
        connect_timeout: Duration,
        socket: UpstreamSocket,
        counters: Arc<ClusterCounters>,
        proxy_counters: Arc<ProxyCounters>,
    ) -> Self {
        Self {
            addr,
            protocol,
            connect_timeout,
            socket,
            active_requests: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            idle: ArrayQueue::new(MAX_IDLE_PER_HOST),
            multiplexed: ArcSwapOption::empty(),
            multiplexed_connecting: tokio::sync::Mutex::new(()),
            released: Notify::new(),
            outlier: HostOutlier::default(),
            counters,
            proxy_counters,
        }
    }

    /// Starts a request on this host if `max_requests` allows it. The lease keeps the request
    /// counted until its response finishes (or it is dropped unfinished).
    pub fn begin_request(self: &Arc<Self>, breakers: &CircuitBreakers) -> Result<Lease, AttemptOutcome> {
        let active = self.counters.upstream_rq_active.fetch_add(1, Ordering::Relaxed);
        self.active_requests.fetch_add(1, Ordering::Relaxed);
        let lease = Lease { host: Arc::clone(self), active: true };
        if active >= u64::from(breakers.max_requests) {
            bump(&self.counters.upstream_rq_pending_overflow);
            return Err(AttemptOutcome::Overflow);
        }
        bump(&self.counters.upstream_rq_total);
        Ok(lease)
    }

    /// Sends `request` over a pooled connection (opening one if needed).
    pub async fn send(
        self: &Arc<Self>,
        breakers: &CircuitBreakers,
        request: impl FnOnce() -> Request<ProxyBody>,
    ) -> Result<Response<UpstreamBody>, AttemptOutcome> {
        match self.protocol {
            UpstreamProtocol::Http1 => {
                let conn = self.checkout_http1(breakers).await?;
                let response = conn.send(request()).await.map_err(|error| {
                    tracing::debug!(upstream = %self.addr, %error, "upstream exchange failed");
                    AttemptOutcome::Reset { request_sent: error.request_sent }
                })?;
                Ok(response.map(UpstreamBody::Http1))
            }
            UpstreamProtocol::Http2 => {
                let mut sender = self.checkout_http2().await?;
                let response = sender.send_request(request()).await.map_err(|e| classify(&e))?;
                Ok(response.map(UpstreamBody::Http2))
            }
        }
    }

    /// Opens a dedicated HTTP/1.1 connection that may switch protocols (never pooled).
    pub async fn connect_upgradable(self: &Arc<Self>) -> Result<Box<ClientConn>, AttemptOutcome> {
        let guard = self.reserve_connection_unconditionally();
        self.connect_http1(guard).await
    }

    async fn checkout_http1(self: &Arc<Self>, breakers: &CircuitBreakers) -> Result<Box<ClientConn>, AttemptOutcome> {
        let mut pending: Option<PendingSlot> = None;
        loop {
            while let Some(conn) = self.idle.pop() {
                if conn.is_reusable() {
                    return Ok(conn);
                }
            }
            if pending.is_none() {
                pending = Some(PendingSlot::enter(&self.counters, breakers)?);
            }
            if let Some(guard) = self.reserve_connection(breakers) {
                // Boxed: the connect path is rare and large; inline it would enlarge every
                // request's future (which is moved into its box once per request).
                return Box::pin(self.connect_http1(guard)).await;
            }
            // At max_connections: wait for one of this host's connections to come back.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.idle.is_empty() && self.connections.load(Ordering::Relaxed) > 0 {
                notified.await;
            }
        }
    }

    async fn checkout_http2(self: &Arc<Self>) -> Result<http2::SendRequest<ProxyBody>, AttemptOutcome> {
        let mut sender = match self.live_multiplexed() {
            Some(sender) => sender,
            None => {
                let _connecting = self.multiplexed_connecting.lock().await;
                match self.live_multiplexed() {
                    Some(sender) => sender,
                    None => {
                        let guard = self.reserve_connection_unconditionally();
                        let sender = Box::pin(self.connect_http2(guard)).await?;
                        self.multiplexed.store(Some(Arc::new(sender.clone())));
                        sender
                    }
                }
            }
        };
        sender.ready().await.map_err(|_| AttemptOutcome::Reset { request_sent: false })?;
        Ok(sender)
    }

    fn live_multiplexed(&self) -> Option<http2::SendRequest<ProxyBody>> {
        self.multiplexed.load().as_deref().filter(|sender| !sender.is_closed()).cloned()
    }

    /// Claims a connection under the cluster's `max_connections`. A host without any connection
    /// always gets one (as Envoy does), so a full cluster cannot starve a host forever.
    fn reserve_connection(self: &Arc<Self>, breakers: &CircuitBreakers) -> Option<ConnectionGuard> {
        let open = self.counters.upstream_cx_active.fetch_add(1, Ordering::Relaxed);
        if open >= u64::from(breakers.max_connections) {
            if self.connections.load(Ordering::Relaxed) > 0 {
                self.counters.upstream_cx_active.fetch_sub(1, Ordering::Relaxed);
                return None;
            }
            bump(&self.counters.upstream_cx_overflow);
        }
        self.connections.fetch_add(1, Ordering::Relaxed);
        bump(&self.proxy_counters.upstream_cx_active);
        Some(ConnectionGuard::new(self))
    }

    fn reserve_connection_unconditionally(self: &Arc<Self>) -> ConnectionGuard {
        bump(&self.counters.upstream_cx_active);
        self.connections.fetch_add(1, Ordering::Relaxed);
        bump(&self.proxy_counters.upstream_cx_active);
        ConnectionGuard::new(self)
    }

    async fn connect_tcp(&self) -> Result<TcpStream, AttemptOutcome> {
        match tokio::time::timeout(self.connect_timeout, connect(self.addr, self.socket)).await {
            Ok(Ok(stream)) => {
                // Small requests must not wait for Nagle.
                let _ = stream.set_nodelay(true);
                Ok(stream)
            }
            Ok(Err(error)) => {
                tracing::debug!(upstream = %self.addr, %error, "upstream connect failed");
                bump(&self.counters.upstream_cx_connect_fail);
                Err(AttemptOutcome::ConnectFailure)
            }
            Err(_) => {
                tracing::debug!(upstream = %self.addr, "upstream connect timed out");
                bump(&self.counters.upstream_cx_connect_fail);
                Err(AttemptOutcome::ConnectFailure)
            }
        }
    }

    async fn connect_http1(&self, guard: ConnectionGuard) -> Result<Box<ClientConn>, AttemptOutcome> {
        Ok(ClientConn::new(self.connect_tcp().await?, guard))
    }

    async fn connect_http2(&self, guard: ConnectionGuard) -> Result<http2::SendRequest<ProxyBody>, AttemptOutcome> {
        let io = TokioIo::new(self.connect_tcp().await?);
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(|_| AttemptOutcome::ConnectFailure)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(upstream = %addr, %error, "upstream HTTP/2 connection ended with an error");
            }
            drop(guard);
        });
        Ok(sender)
    }

    fn release(&self, conn: Box<ClientConn>) {
        // A full queue drops the connection, which closes it.
        let _ = self.idle.push(conn);
        self.released.notify_one();
    }
}

/// Connects from `socket.source` (any port) with `socket.mark` as `SO_MARK`.
async fn connect(addr: SocketAddr, socket: UpstreamSocket) -> std::io::Result<TcpStream> {
    if socket == UpstreamSocket::default() {
        return TcpStream::connect(addr).await;
    }
    let tcp = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(mark) = socket.mark {
        socket2::SockRef::from(&tcp).set_mark(mark)?;
    }
    if let Some(source) = socket.source {
        tcp.bind(SocketAddr::new(source, 0))?;
    }
    tcp.connect(addr).await
}

fn classify(error: &hyper::Error) -> AttemptOutcome {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if let Some(h2_error) = current.downcast_ref::<h2::Error>() {
            if h2_error.reason() == Some(h2::Reason::REFUSED_STREAM) {
                return AttemptOutcome::RefusedStream;
            }
        }
        source = current.source();
    }
    AttemptOutcome::Reset { request_sent: !error.is_canceled() }
}

/// Counts a request waiting for a connection against `max_pending_requests`.
struct PendingSlot(Arc<ClusterCounters>);

impl PendingSlot {
    fn enter(counters: &Arc<ClusterCounters>, breakers: &CircuitBreakers) -> Result<Self, AttemptOutcome> {
        let pending = counters.pending_active.fetch_add(1, Ordering::Relaxed);
        let slot = Self(Arc::clone(counters));
        if pending >= u64::from(breakers.max_pending_requests) {
            bump(&counters.upstream_rq_pending_overflow);
            return Err(AttemptOutcome::Overflow);
        }
        Ok(slot)
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        self.0.pending_active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Keeps one upstream connection counted while it is open. It refers to its host weakly:
/// pooled HTTP/1.1 connections sit in the host's own queue, and a strong reference from there
/// would keep a host that a table swap removed (and its open connections) alive forever.
#[derive(Debug)]
pub(crate) struct ConnectionGuard {
    host: Weak<HostState>,
    counters: Arc<ClusterCounters>,
    proxy_counters: Arc<ProxyCounters>,
}

impl ConnectionGuard {
    fn new(host: &Arc<HostState>) -> Self {
        Self { host: Arc::downgrade(host), counters: Arc::clone(&host.counters), proxy_counters: Arc::clone(&host.proxy_counters) }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.counters.upstream_cx_active.fetch_sub(1, Ordering::Relaxed);
        self.proxy_counters.upstream_cx_active.fetch_sub(1, Ordering::Relaxed);
        if let Some(host) = self.host.upgrade() {
            host.connections.fetch_sub(1, Ordering::Relaxed);
            host.released.notify_one();
        }
    }
}

/// One request on one host, counted as active (Envoy's `upstream_rq_active`, what
/// `max_requests` limits) until its response has finished or the lease is dropped. A cleanly
/// finished HTTP/1.1 response returns its connection to the pool at once. (An unfinished
/// exchange's connection is dropped with its response body, which closes it.)
#[derive(Debug)]
pub struct Lease {
    host: Arc<HostState>,
    active: bool,
}

impl Lease {
    /// The response body ended cleanly. The request stops counting now, not when the response
    /// has also been written downstream: a client that sends its next request the moment the
    /// last byte arrives must not find this one still counted against `max_requests`.
    pub(crate) fn finished(&mut self, body: &mut UpstreamBody) {
        if let UpstreamBody::Http1(body) = body {
            if let Some(conn) = body.take_finished() {
                self.host.release(conn);
            }
        }
        self.end();
    }

    /// The route timeout ended the response inside its body (Envoy counts it like a 504).
    pub(crate) fn timed_out(&self) {
        bump(&self.host.counters.upstream_rq_timeout);
    }

    fn end(&mut self) {
        if std::mem::take(&mut self.active) {
            self.host.active_requests.fetch_sub(1, Ordering::Relaxed);
            self.host.counters.upstream_rq_active.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.end();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tables::EndpointPolicy;

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    /// Tables in eBPF mode: `10.0.1.5` has a policy (the proxy enforces its ingress).
    fn ebpf_tables(mark_upstream: bool) -> ProxyTables {
        let mut tables = ProxyTables {
            upstream_source: Some(IpAddr::from([192, 168, 0, 1])),
            mark_upstream,
            ..ProxyTables::default()
        };
        tables.policies.insert(IpAddr::from([10, 0, 1, 5]), Arc::new(EndpointPolicy::default()));
        tables
    }

    #[test]
    fn upstream_sockets_carry_the_ingress_mark_to_policed_endpoints_and_the_egress_mark_elsewhere() {
        let plan = SocketPlan::new(&ebpf_tables(true));
        let node = Some(IpAddr::from([192, 168, 0, 1]));
        assert_eq!(plan.for_host(addr("10.0.1.5:80")), UpstreamSocket { source: node, mark: Some(0x0A00) });
        assert_eq!(plan.for_host(addr("10.0.2.9:80")), UpstreamSocket { source: node, mark: Some(0x0B00) });
        // An IPv4 node address cannot be the source of an IPv6 connection.
        assert_eq!(plan.for_host(addr("[fd00::5]:80")), UpstreamSocket { source: None, mark: Some(0x0B00) });
    }

    #[test]
    fn gateway_mode_sockets_are_unmarked() {
        assert_eq!(SocketPlan::new(&ProxyTables::default()).for_host(addr("10.0.1.5:80")), UpstreamSocket::default());
        let unmarked = SocketPlan::new(&ebpf_tables(false)).for_host(addr("10.0.1.5:80"));
        assert_eq!(unmarked.mark, None);
    }

    fn original_destination_cluster(sockets: SocketPlan) -> ClusterState {
        let config = Cluster {
            name: "original-dst".into(),
            endpoints: Vec::new(),
            lb_policy: LbPolicy::OriginalDestination,
            connect_timeout: Duration::from_secs(1),
            circuit_breakers: CircuitBreakers::default(),
            outlier_detection: None,
            protocol: UpstreamProtocol::Http1,
        };
        ClusterState::new(Arc::new(config), None, Arc::default(), &Arc::default(), Arc::new(sockets))
    }

    fn pick_for(original_destination: Option<SocketAddr>) -> PickInput {
        PickInput { random: 7, source: IpAddr::from([10, 0, 2, 9]), original_destination }
    }

    #[test]
    fn an_original_destination_cluster_picks_the_connections_original_destination() {
        let cluster = original_destination_cluster(SocketPlan::new(&ebpf_tables(true)));
        let first = cluster.pick(pick_for(Some(addr("10.0.1.5:8080"))), &[]).expect("a host");
        assert_eq!(first.addr, addr("10.0.1.5:8080"));
        assert_eq!(first.socket.mark, Some(MARK_PROXY_INGRESS));
        let again = cluster.pick(pick_for(Some(addr("10.0.1.5:8080"))), &[]).expect("a host");
        assert!(Arc::ptr_eq(&first, &again), "one host (and pool) per original destination");
        let other = cluster.pick(pick_for(Some(addr("10.0.2.9:80"))), &[]).expect("a host");
        assert_eq!(other.addr, addr("10.0.2.9:80"));
        assert_eq!(other.socket.mark, Some(MARK_PROXY_EGRESS));
    }

    #[test]
    fn an_original_destination_cluster_has_no_host_for_a_gateway_connection() {
        let cluster = original_destination_cluster(SocketPlan::default());
        assert!(cluster.pick(pick_for(None), &[]).is_none());
    }

    #[test]
    fn a_changed_socket_plan_replaces_the_cluster_state() {
        let cluster = original_destination_cluster(SocketPlan::new(&ebpf_tables(true)));
        assert!(cluster.serves(&cluster.config.clone(), &SocketPlan::new(&ebpf_tables(true))));
        assert!(!cluster.serves(&cluster.config.clone(), &SocketPlan::new(&ebpf_tables(false))));
    }
}
