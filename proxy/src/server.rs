//! One downstream request (accept -> identify -> normalize -> route -> split -> authorize -> forward -> respond -> log).
//!
//! Each phase is its own function; `handle` only sequences them and records the flow event.
//! A request reads the tables once (one arc-swap load) and keeps that generation to the end.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, UPGRADE};
use http::{HeaderMap, Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use smallvec::SmallVec;
use tokio::time::Instant;

use crate::authorize::{Decision, HeaderEdit};
use crate::body::{DownstreamBody, ProxyBody, ReplayBuffer};
use crate::http1::codec::connection_tokens;
use crate::http1::DownstreamUpgrade;
use crate::flow::{DropReason, FlowEvent, FlowPeer, FlowSink, HttpFlow, TrafficDirection, Verdict};
use crate::forward::{self, Clock, Expired, Failure, Outgoing, OutgoingBody, Plan, RequestTimer, Timeouts};
use crate::lb::PickInput;
use crate::normalize::{normalize_request, Rejection};
use crate::request::RequestHead;
use crate::retry;
use crate::route::{pick_weighted_cluster, redirect_location, rewrite_path, select_route};
use crate::snapshot::{ListenerEntry, Snapshot};
use crate::stats::{bump, ClusterCounters, ProxyCounters};
use crate::tables::{
    ForwardAction, HttpConnectionManager, Protocol, RouteAction, RouteConfig, UpstreamProtocol,
};
use crate::upstream::{ClusterState, HostState};

static ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");
static FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const ACCESS_DENIED: &[u8] = b"Access denied\r\n";

/// State shared by every connection of the proxy.
pub(crate) struct Shared {
    pub snapshot: ArcSwap<Snapshot>,
    pub flows: FlowSink,
    pub counters: Arc<ProxyCounters>,
}

/// One accepted downstream connection.
pub(crate) struct ConnContext {
    pub shared: Arc<Shared>,
    /// The accepting listener's socket slot in `Snapshot::listeners` (each request is
    /// dispatched from it to its serving listener with the tables of that request).
    pub slot: usize,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    /// Set on connections a transparent listener accepted (eBPF datapath): the `local`
    /// address, which is where the client was going.
    pub original_destination: Option<SocketAddr>,
}

/// The service error: the request gets no response. hyper closes an HTTP/1 connection and
/// resets an HTTP/2 stream, the gateway-mode equivalent of a dropped SYN.
#[derive(Debug, thiserror::Error)]
#[error("request dropped by L3/L4 policy")]
pub(crate) struct DroppedByPolicy;

/// What the flow event needs, filled in as the phases run.
struct Exchange<'a> {
    ctx: &'a ConnContext,
    snapshot: &'a Snapshot,
    listener: &'a ListenerEntry,
    started: Instant,
    source_identity: u32,
    /// The source's name when it is a known pod or node.
    source_name: Option<&'a Arc<str>>,
    head: Option<RequestHead>,
    /// The backend chosen: its address, identity and name (looked up once per host).
    destination: Option<(SocketAddr, u32, Option<&'a Arc<str>>)>,
    cluster: Option<Arc<str>>,
    attempts: u32,
    policy: Option<Arc<str>>,
    /// Whose policy decided (see `flow_direction`).
    direction: Option<TrafficDirection>,
}

/// Serves one request; `upgrade` is set by the HTTP/1 server when the request asks to switch protocols.
pub(crate) async fn handle(
    ctx: Arc<ConnContext>,
    request: Request<DownstreamBody>,
    upgrade: Option<DownstreamUpgrade>,
) -> Result<Response<ProxyBody>, DroppedByPolicy> {
    let snapshot = ctx.shared.snapshot.load_full();
    bump(&ctx.shared.counters.downstream_rq_total);
    let Some(listener) = snapshot.listener(snapshot.dispatch(ctx.slot, ctx.local).slot) else {
        // The listener was removed by a swap while this keep-alive connection was idle.
        let mut response = local_reply(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"listener removed"));
        response.headers_mut().insert(CONNECTION, HeaderValue::from_static("close"));
        return Ok(response);
    };
    let (source_identity, source_peer) = snapshot.peer(ctx.peer.ip());
    let mut exchange = Exchange {
        ctx: &ctx,
        snapshot: &snapshot,
        listener,
        started: Instant::now(),
        source_identity,
        source_name: source_peer.map(|peer| &peer.name),
        head: None,
        destination: None,
        cluster: None,
        attempts: 0,
        policy: None,
        direction: None,
    };
    let outcome = exchange.run(request, upgrade).await;
    let (verdict, reason, status) = match &outcome {
        Ok((response, reason)) => {
            let verdict = match reason {
                None => Verdict::Forwarded,
                Some(
                    DropReason::UpstreamFailure
                    | DropReason::UpstreamTimeout
                    | DropReason::DownstreamTimeout
                    | DropReason::Overflow,
                ) => Verdict::Error,
                Some(_) => Verdict::Dropped,
            };
            (verdict, *reason, Some(response.status().as_u16()))
        }
        Err(reason) => (Verdict::Dropped, Some(*reason), None),
    };
    exchange.emit(verdict, reason, status);
    match outcome {
        Ok((response, _)) => Ok(response),
        Err(_) => Err(DroppedByPolicy),
    }
}

/// A response plus the drop reason to record; `Err` = drop without any response.
type PhaseResult = Result<(Response<ProxyBody>, Option<DropReason>), DropReason>;

impl<'a> Exchange<'a> {
    async fn run(&mut self, request: Request<DownstreamBody>, upgrade: Option<DownstreamUpgrade>) -> PhaseResult {
        let hcm: &'a HttpConnectionManager = &self.listener.http;
        let (mut parts, body) = request.into_parts();
        let mut head = match normalize_request(&mut parts, hcm) {
            Ok(head) => head,
            Err(rejection) => return Ok(rejected(rejection, &parts.uri)),
        };
        let result = self.route_and_forward(&mut head, parts, body, upgrade).await;
        self.head = Some(head);
        result
    }

    async fn route_and_forward(
        &mut self,
        head: &mut RequestHead,
        mut parts: http::request::Parts,
        mut body: DownstreamBody,
        upgrade: Option<DownstreamUpgrade>,
    ) -> PhaseResult {
        let hcm: &'a HttpConnectionManager = &self.listener.http;
        let snapshot: &'a Snapshot = self.snapshot;
        let ctx: &'a ConnContext = self.ctx;
        let Some(selection) = select_route(&hcm.route_config, head) else {
            return Ok((local_reply(StatusCode::NOT_FOUND, Bytes::new()), Some(DropReason::NoRoute)));
        };
        let action = match &selection.route.action {
            RouteAction::DirectResponse { status, body } => {
                let status = StatusCode::from_u16(*status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return Ok((local_reply(status, body.clone()), None));
            }
            RouteAction::Redirect(redirect) => {
                let status = StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::MOVED_PERMANENTLY);
                let mut response = local_reply(status, Bytes::new());
                if let Ok(location) = HeaderValue::from_str(&redirect_location(selection.route, redirect, head, "http")) {
                    response.headers_mut().insert(http::header::LOCATION, location);
                }
                return Ok((response, None));
            }
            RouteAction::Forward(action) => Arc::clone(action),
        };
        if let Some(upgrade) = &upgrade {
            if !upgrade_allowed(hcm, &upgrade.kind) {
                // Envoy answers an upgrade type without `upgrade_configs` with 403.
                return Ok((local_reply(StatusCode::FORBIDDEN, Bytes::new()), Some(DropReason::InvalidRequest)));
            }
        }
        let cluster = match self.pick_cluster(&action) {
            Ok(cluster) => cluster,
            Err(status) => return Ok((local_reply(status, Bytes::new()), Some(DropReason::NoHealthyUpstream))),
        };
        let original_path = rewrite(selection.route, &action, head);
        let source = self.ctx.peer.ip();
        let pick = PickInput { random: rand::random(), source, original_destination: ctx.original_destination };
        let Some(host) = cluster.pick(pick, &[]) else {
            return Ok((
                local_reply(StatusCode::SERVICE_UNAVAILABLE, Bytes::from_static(b"no healthy upstream")),
                Some(DropReason::NoHealthyUpstream),
            ));
        };
        let destination_identity = self.set_destination(host.addr);
        let edits = match self.authorize(&host, destination_identity, head) {
            Ok(edits) => edits,
            Err(AuthorizeDenial::L7) => return Ok(access_denied()),
            Err(AuthorizeDenial::L4(reason)) => return Err(reason),
        };
        // The first attempt's headers. A retry rebuilds its own from the head and re-authorizes
        // with them, so the first attempt takes them only when no retry can follow it.
        let request_headers = if retry::may_follow(action.retry_policy.as_ref(), 1) {
            head.headers.clone()
        } else {
            std::mem::take(&mut head.headers)
        };
        let protocol = cluster.config.protocol;
        let upstream = UpstreamHeaders {
            hcm,
            peer: self.ctx.peer.ip(),
            original_path: original_path.as_deref(),
            protocol,
            head: &*head,
            host_rewritten: action.host_rewrite_literal.is_some(),
        };
        let mut headers = upstream.build(request_headers);
        let uri = match protocol {
            // Normalization left the canonical origin-form target in `parts.uri`.
            UpstreamProtocol::Http1 if original_path.is_none() => std::mem::take(&mut parts.uri),
            _ => upstream_uri(protocol, head),
        };
        let timeouts = Timeouts::new(action.timeout, action.idle_timeout.or(hcm.stream_idle_timeout));
        let vhost = selection.virtual_host;

        if let Some(upgrade) = upgrade {
            forward::apply_header_edits(&mut headers, &edits);
            headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(UPGRADE, upgrade.kind.clone());
            let mut upstream_request = Request::new(ProxyBody::Downstream(body));
            *upstream_request.method_mut() = parts.method;
            *upstream_request.uri_mut() = uri;
            *upstream_request.headers_mut() = headers;
            self.attempts = 1;
            // An upgrade's request is its head: the rest becomes the tunnel.
            let clock = Clock::whole(timeouts, self.started);
            let result = Box::pin(forward::forward_upgrade(&cluster, &host, upstream_request, upgrade, clock)).await;
            return Ok(self.respond(result, &hcm.route_config));
        }

        let replay = match (action.retry_policy.is_some(), action.mirrors.is_empty()) {
            (_, false) => Replay::Buffered(&cluster.counters),
            (true, true) => Replay::Teed(&cluster.counters),
            (false, true) => Replay::None,
        };
        // A body still arriving moves the timers: the route timeout starts at its end, the
        // stream idle timeout with each frame. Upgrades (returned above) get no request timer:
        // their request never ends, it becomes the tunnel.
        let arriving = (!body.is_end_stream()).then(|| body.watch(self.started));
        let request_timer = hcm
            .request_timeout
            .zip(arriving.as_ref())
            .map(|(timeout, arriving)| RequestTimer::new(self.started + timeout, Arc::clone(arriving)));
        let clock = match arriving {
            None => Clock::whole(timeouts, self.started),
            Some(arriving) => Clock::arriving(timeouts, arriving),
        };
        let reading = read_body(body, replay, vhost.request_body_buffer_limit, &clock);
        // Matched here and below rather than in one helper: a wrapping future (`Either` plus
        // `map`) cost ~1400 instructions per request in moves, timer or not (callgrind).
        let read = match &request_timer {
            None => reading.await,
            // Boxed like every cold path: it would otherwise add to each request's future.
            Some(timer) => match Box::pin(timer.bound(reading)).await {
                Ok(read) => read,
                Err(failure) => return Ok(self.respond(Err(failure), &hcm.route_config)),
            },
        };
        let body = match read {
            Ok(body) => body,
            Err(BodyError::Expired(failure)) => return Ok(self.respond(Err(failure), &hcm.route_config)),
            Err(BodyError::Downstream) => {
                return Ok((local_reply(StatusCode::BAD_REQUEST, Bytes::new()), Some(DropReason::InvalidRequest)));
            }
        };
        if let OutgoingBody::Replayable(bytes) = &body {
            self.mirror(&action, timeouts, &parts.method, &uri, &headers, bytes);
        }
        let outgoing = Outgoing { method: parts.method, uri, headers: Some(headers), edits, body };
        let retry_headers = || upstream.build(head.headers.clone());
        let plan = Plan {
            retry_headers: &retry_headers,
            cluster: &cluster,
            retry_policy: action.retry_policy.as_ref(),
            include_attempt_count: vhost.include_request_attempt_count,
            clock,
            source,
            original_destination: ctx.original_destination,
        };
        let head_for_retries = &*head;
        let source_identity = self.source_identity;
        let mut progress = forward::Progress { attempts: 0, upstream: host.addr };
        let forwarding = forward::forward(
            plan,
            host,
            outgoing,
            |next| {
                let (destination_identity, _) = snapshot.peer(next.addr.ip());
                authorize_pair(snapshot, ctx.peer.ip(), source_identity, next, destination_identity, head_for_retries)
                    .ok()
                    .map(|allowed| allowed.edits)
            },
            &mut progress,
        );
        let result = match &request_timer {
            None => forwarding.await,
            // Boxed like every cold path; it bounds the back-offs too.
            Some(timer) => Box::pin(timer.bound(forwarding)).await.and_then(|result| result),
        };
        self.attempts = progress.attempts;
        self.set_destination(progress.upstream);
        Ok(self.respond(result, &hcm.route_config))
    }

    /// Weighted split, then the cluster by name; unknown → `cluster_not_found_status`.
    fn pick_cluster(&mut self, action: &ForwardAction) -> Result<Arc<ClusterState>, StatusCode> {
        let not_found = StatusCode::from_u16(action.cluster_not_found_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let picked = pick_weighted_cluster(&action.clusters, rand::random()).ok_or(not_found)?;
        let Some(cluster) = self.snapshot.clusters.get(&picked.name) else {
            self.cluster = Some(Arc::from(picked.name.as_str()));
            return Err(not_found);
        };
        self.cluster = Some(Arc::clone(&cluster.name));
        Ok(Arc::clone(cluster))
    }

    /// Records the backend of the flow; returns its identity.
    fn set_destination(&mut self, addr: SocketAddr) -> u32 {
        match self.destination {
            Some((known, identity, _)) if known == addr => identity,
            _ => {
                let (identity, peer) = self.snapshot.peer(addr.ip());
                self.destination = Some((addr, identity, peer.map(|peer| &peer.name)));
                identity
            }
        }
    }

    fn authorize(&mut self, host: &HostState, destination_identity: u32, head: &RequestHead) -> Result<Vec<HeaderEdit>, AuthorizeDenial> {
        match authorize_pair(self.snapshot, self.ctx.peer.ip(), self.source_identity, host, destination_identity, head) {
            Ok(allowed) => {
                self.policy = allowed.origin;
                self.direction = allowed.enforced;
                Ok(allowed.edits)
            }
            Err((denial, direction, origin)) => {
                self.policy = origin;
                self.direction = Some(direction);
                Err(denial)
            }
        }
    }

    fn mirror(&self, action: &ForwardAction, timeouts: Timeouts, method: &http::Method, uri: &Uri, headers: &HeaderMap, body: &Option<Bytes>) {
        for policy in &action.mirrors {
            if rand::random::<u32>() % 1_000_000 >= policy.fraction_per_million {
                continue;
            }
            let Some(cluster) = self.snapshot.clusters.get(&policy.cluster) else { continue };
            let uri = match cluster.config.protocol {
                UpstreamProtocol::Http1 => uri.path_and_query().map_or_else(|| uri.clone(), |pq| Uri::from(pq.clone())),
                UpstreamProtocol::Http2 => uri.clone(),
            };
            let pick = PickInput {
                random: rand::random(),
                source: self.ctx.peer.ip(),
                original_destination: self.ctx.original_destination,
            };
            forward::mirror(Arc::clone(cluster), pick, timeouts, method.clone(), uri, headers.clone(), body.clone());
        }
    }

    fn respond(&self, result: Result<Response<ProxyBody>, Failure>, route_config: &RouteConfig) -> (Response<ProxyBody>, Option<DropReason>) {
        match result {
            Ok(mut response) => {
                prepare_response_headers(&mut response, route_config);
                (response, None)
            }
            Err(failure) => {
                let reason = match failure {
                    Failure::Overflow => DropReason::Overflow,
                    // A 507 ends a retry of a failed attempt: the upstream failure is the cause.
                    Failure::Upstream | Failure::RetryBufferOverflow => DropReason::UpstreamFailure,
                    Failure::Timeout | Failure::StreamIdle => DropReason::UpstreamTimeout,
                    Failure::RequestTimeout => DropReason::DownstreamTimeout,
                    Failure::DownstreamBody => DropReason::InvalidRequest,
                };
                (forward::failure_response(failure), Some(reason))
            }
        }
    }

    fn emit(&mut self, verdict: Verdict, drop_reason: Option<DropReason>, status: Option<u16>) {
        let snapshot = self.snapshot;
        let ctx = self.ctx;
        let source = FlowPeer {
            ip: ctx.peer.ip(),
            port: ctx.peer.port(),
            identity: self.source_identity,
            name: self.source_name.cloned(),
        };
        let destination = match self.destination {
            Some((addr, identity, name)) => FlowPeer { ip: addr.ip(), port: addr.port(), identity, name: name.cloned() },
            None => FlowPeer { ip: ctx.local.ip(), port: ctx.local.port(), identity: snapshot.peer(ctx.local.ip()).0, name: None },
        };
        let http = self.head.take().map(|head| HttpFlow {
            method: head.method,
            url: head.path_and_query,
            authority: head.authority,
            protocol: protocol_name(head.version),
            status,
            latency: self.started.elapsed(),
        });
        ctx.shared.flows.send(FlowEvent {
            time: SystemTime::now(),
            generation: snapshot.generation,
            verdict,
            drop_reason,
            direction: Some(flow_direction(self.direction, self.source_name.is_some())),
            source,
            destination,
            listener: Arc::clone(&self.listener.name),
            http,
            cluster: self.cluster.take(),
            attempts: self.attempts,
            policy: self.policy.take(),
        });
    }
}

enum AuthorizeDenial {
    /// No response: close the connection / reset the stream.
    L4(DropReason),
    /// `403 Access denied`.
    L7,
}

type Denied = (AuthorizeDenial, TrafficDirection, Option<Arc<str>>);

/// Both endpoints' policies let the request through.
struct Allowed {
    /// The deciding rule: the destination's ingress rule, else the source's egress rule.
    origin: Option<Arc<str>>,
    edits: Vec<HeaderEdit>,
    /// `Ingress` when the destination's policy was consulted, else `Egress` when the source's
    /// was, `None` when neither endpoint has a policy.
    enforced: Option<TrafficDirection>,
}

/// The source's egress policy (remote = destination) and the destination's ingress policy
/// (remote = source) must both allow; an endpoint without policy allows everything.
fn authorize_pair(
    snapshot: &Snapshot,
    source_ip: IpAddr,
    source_identity: u32,
    destination: &HostState,
    destination_identity: u32,
    head: &RequestHead,
) -> Result<Allowed, Denied> {
    let port = destination.addr.port();
    let mut allowed = Allowed { origin: None, edits: Vec::new(), enforced: None };
    if let Some(policy) = snapshot.policies.get(&source_ip) {
        let decision = policy.egress.authorize(destination_identity, Protocol::Tcp, port, head);
        allowed.origin = merge_decision(decision, &mut allowed.edits, TrafficDirection::Egress)?;
        allowed.enforced = Some(TrafficDirection::Egress);
    }
    if let Some(policy) = snapshot.policies.get(&destination.addr.ip()) {
        let decision = policy.ingress.authorize(source_identity, Protocol::Tcp, port, head);
        allowed.origin = merge_decision(decision, &mut allowed.edits, TrafficDirection::Ingress)?.or(allowed.origin);
        allowed.enforced = Some(TrafficDirection::Ingress);
    }
    Ok(allowed)
}

/// The side of the flow the proxy stands on, for Hubble's `traffic_direction` and `reporter`
/// (`server` for ingress, `client` for egress). Whose policy decided wins: a policy drop is
/// reported in the direction of the policy that dropped it; an allowed request is `Ingress`
/// when the destination's ingress policy was enforced (the proxy acted for the server), else
/// `Egress` when only the source's egress policy was. A request no policy looked at (no
/// policy on either side, or answered before authorization: no route, bad request) is
/// `Egress` when the client is a known workload or node (the proxy acts for that client) and
/// `Ingress` when it is `world` (the proxy is the server side of a gateway for outsiders).
fn flow_direction(enforced: Option<TrafficDirection>, source_is_known: bool) -> TrafficDirection {
    match enforced {
        Some(direction) => direction,
        None if source_is_known => TrafficDirection::Egress,
        None => TrafficDirection::Ingress,
    }
}

fn merge_decision(decision: Decision, edits: &mut Vec<HeaderEdit>, direction: TrafficDirection) -> Result<Option<Arc<str>>, Denied> {
    match decision {
        Decision::Allow { origin, header_edits } => {
            edits.extend(header_edits);
            Ok(origin)
        }
        Decision::Deny { reason, origin } => {
            let denial = match reason {
                DropReason::PolicyDenied | DropReason::PolicyDeny | DropReason::AuthRequired => AuthorizeDenial::L4(reason),
                _ => AuthorizeDenial::L7,
            };
            Err((denial, direction, origin))
        }
    }
}

fn access_denied() -> (Response<ProxyBody>, Option<DropReason>) {
    (local_reply(StatusCode::FORBIDDEN, Bytes::from_static(ACCESS_DENIED)), Some(DropReason::L7PolicyDenied))
}

fn rejected(rejection: Rejection, canonical_target: &Uri) -> (Response<ProxyBody>, Option<DropReason>) {
    if rejection.status.is_redirection() {
        // UNESCAPE_AND_REDIRECT: the canonical target is where the client should go.
        let mut response = local_reply(rejection.status, Bytes::new());
        if let Ok(location) = HeaderValue::from_str(&canonical_target.to_string()) {
            response.headers_mut().insert(http::header::LOCATION, location);
        }
        return (response, None);
    }
    (local_reply(rejection.status, Bytes::from_static(rejection.reason.as_bytes())), Some(DropReason::InvalidRequest))
}

fn local_reply(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let has_body = !body.is_empty();
    let mut response = Response::new(ProxyBody::full(body));
    *response.status_mut() = status;
    if has_body {
        response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
    response
}

fn upgrade_allowed(hcm: &HttpConnectionManager, kind: &HeaderValue) -> bool {
    let Ok(kind) = kind.to_str() else { return false };
    hcm.upgrades.iter().any(|allowed| allowed.eq_ignore_ascii_case(kind.trim()))
}

/// Applies the route's path and host rewrites to the head (so policy sees what the backend
/// will see); returns the path before the rewrite for `x-envoy-original-path`.
fn rewrite(route: &crate::tables::Route, action: &ForwardAction, head: &mut RequestHead) -> Option<String> {
    if let Some(host) = &action.host_rewrite_literal {
        head.authority.clone_from(host);
    }
    let rewrite = action.rewrite.as_ref()?;
    let rewritten = rewrite_path(route, rewrite, &head.path_and_query);
    Some(std::mem::replace(&mut head.path_and_query, rewritten))
}

/// What turns the request's headers into an upstream attempt's.
struct UpstreamHeaders<'a> {
    hcm: &'a HttpConnectionManager,
    peer: IpAddr,
    /// The path before a rewrite, for `x-envoy-original-path`.
    original_path: Option<&'a str>,
    protocol: UpstreamProtocol,
    head: &'a RequestHead,
    host_rewritten: bool,
}

impl UpstreamHeaders<'_> {
    /// Hop-by-hop removal, the route config's mutations, `x-forwarded-for`,
    /// `x-envoy-original-path` and the upstream's `Host` (the policies' edits depend on the host
    /// and are applied per attempt).
    fn build(&self, mut headers: HeaderMap) -> HeaderMap {
        prepare_request_headers(&mut headers, &self.hcm.route_config, self.hcm, self.peer);
        if let Some(value) = self.original_path.and_then(|original| HeaderValue::from_str(original).ok()) {
            headers.insert(ORIGINAL_PATH.clone(), value);
        }
        set_upstream_host(&mut headers, self.protocol, self.head, self.host_rewritten);
        headers
    }
}

/// Hop-by-hop removal, the route config's header mutations, `x-forwarded-for`.
fn prepare_request_headers(headers: &mut HeaderMap, route_config: &RouteConfig, hcm: &HttpConnectionManager, peer: IpAddr) {
    // `te: trailers` is the one TE value worth keeping (gRPC needs it); it is hop-by-hop
    // otherwise.
    let drops_te = headers.get(http::header::TE).is_some_and(|te| !te.as_bytes().eq_ignore_ascii_case(b"trailers"));
    // Only the fixed names: normalization already removed what the client's `Connection`
    // header nominated, sparing `host` and the framing headers. Nominated again here, a
    // `connection: host` would strip the upstream request's Host after policy saw it.
    strip_hop_by_hop(headers, Nominated::Kept);
    if drops_te {
        headers.remove(http::header::TE);
    }
    for name in &route_config.request_headers_to_remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &route_config.request_headers_to_add {
        append_header(headers, name, value);
    }
    if hcm.use_remote_address && !hcm.skip_xff_append {
        let appended = match headers.get(&FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(existing) => format!("{existing}, {peer}"),
            None => peer.to_string(),
        };
        if let Ok(value) = HeaderValue::from_str(&appended) {
            headers.insert(FORWARDED_FOR.clone(), value);
        }
    }
}

fn prepare_response_headers(response: &mut Response<ProxyBody>, route_config: &RouteConfig) {
    let switching = response.status() == StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    if !switching {
        strip_hop_by_hop(headers, Nominated::Stripped);
    }
    for name in &route_config.response_headers_to_remove {
        headers.remove(name.as_str());
    }
    for (name, value) in &route_config.response_headers_to_add {
        append_header(headers, name, value);
    }
}

fn append_header(headers: &mut HeaderMap, name: &str, value: &str) {
    if let (Ok(name), Ok(value)) = (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value)) {
        headers.append(name, value);
    }
}

/// The headers RFC 9110 §7.6.1 (and Envoy) always treat as connection-specific.
static FIXED_HOP_BY_HOP: [HeaderName; 5] = [
    CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    http::header::TRANSFER_ENCODING,
    UPGRADE,
];

/// What `strip_hop_by_hop` does with the names a `Connection` header lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Nominated {
    Stripped,
    Kept,
}

/// RFC 9110 §7.6.1: connection-specific headers never cross the proxy: the fixed ones and,
/// unless already dealt with, every name a `Connection` header lists.
fn strip_hop_by_hop(headers: &mut HeaderMap, nominated: Nominated) {
    // Names are compared, not parsed, and only what is there is removed: most messages carry
    // nothing of this kind, or just `connection: keep-alive`.
    let mut doomed: SmallVec<[HeaderName; 2]> =
        headers.keys().filter(|name| FIXED_HOP_BY_HOP.contains(name)).cloned().collect();
    if nominated == Nominated::Stripped && doomed.contains(&CONNECTION) {
        let listed: SmallVec<[&[u8]; 4]> = connection_tokens(headers)
            // A fixed name is in `doomed` already when present.
            .filter(|token| !FIXED_HOP_BY_HOP.iter().any(|fixed| token.eq_ignore_ascii_case(fixed.as_str().as_bytes())))
            .collect();
        if !listed.is_empty() {
            let nominated =
                headers.keys().filter(|name| listed.iter().any(|token| token.eq_ignore_ascii_case(name.as_str().as_bytes())));
            doomed.extend(nominated.cloned());
        }
    }
    for name in doomed {
        headers.remove(name);
    }
}

fn upstream_uri(protocol: UpstreamProtocol, head: &RequestHead) -> Uri {
    let uri = match protocol {
        UpstreamProtocol::Http1 => Uri::try_from(head.path_and_query.as_str()),
        UpstreamProtocol::Http2 => Uri::try_from(format!("http://{}{}", head.authority, head.path_and_query)),
    };
    uri.unwrap_or_else(|_| Uri::from_static("/"))
}

/// HTTP/1.1 upstreams get `Host` (normalization already set the canonical one; only a host
/// rewrite changes it); HTTP/2 upstreams carry the authority in the URI instead.
fn set_upstream_host(headers: &mut HeaderMap, protocol: UpstreamProtocol, head: &RequestHead, host_rewritten: bool) {
    match protocol {
        UpstreamProtocol::Http1 => {
            if host_rewritten {
                if let Ok(value) = HeaderValue::from_str(&head.authority) {
                    headers.insert(HOST, value);
                }
            }
        }
        UpstreamProtocol::Http2 => {
            headers.remove(HOST);
        }
    }
}

enum BodyError {
    /// A timeout ended the exchange while the body was read.
    Expired(Failure),
    Downstream,
}

/// How a request body is kept for attempts after the first one.
enum Replay<'a> {
    /// Sent once (no retry policy, no mirror).
    None,
    /// Read completely before the first attempt, so mirrors get the whole body too.
    Buffered(&'a Arc<ClusterCounters>),
    /// Streamed to the first attempt while a copy is kept for retries (Envoy's way).
    Teed(&'a Arc<ClusterCounters>),
}

/// Prepares the request body for the attempts: kept for replay as `replay` says while it fits
/// `limit`, otherwise streamed (then sent once, never retried or mirrored).
async fn read_body(body: DownstreamBody, replay: Replay<'_>, limit: usize, clock: &Clock) -> Result<OutgoingBody, BodyError> {
    if body.is_end_stream() {
        return Ok(OutgoingBody::Replayable(None));
    }
    let counters = match replay {
        Replay::None => return Ok(OutgoingBody::Streaming(Some(ProxyBody::Downstream(body)))),
        Replay::Teed(counters) => return Ok(OutgoingBody::Teed(ReplayBuffer::new(body, limit, Arc::clone(counters)))),
        Replay::Buffered(counters) => counters,
    };
    if body.size_hint().lower() > limit as u64 {
        bump(&counters.retry_or_shadow_abandoned);
        return Ok(OutgoingBody::Streaming(Some(ProxyBody::Downstream(body))));
    }
    let buffered = match Box::pin(clock.bound(buffer_up_to(body, limit), None)).await {
        Ok(buffered) => buffered.map_err(|_| BodyError::Downstream)?,
        Err(Expired::Exchange(failure)) => return Err(BodyError::Expired(failure)),
        // No per-try timeout was given.
        Err(Expired::PerTry) => return Err(BodyError::Expired(Failure::Timeout)),
    };
    if matches!(buffered, OutgoingBody::Streaming(_)) {
        bump(&counters.retry_or_shadow_abandoned);
    }
    Ok(buffered)
}

async fn buffer_up_to(mut body: DownstreamBody, limit: usize) -> Result<OutgoingBody, crate::body::BodyError> {
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        // Trailers are not replayed (Envoy drops them for buffered retries too).
        let Ok(data) = frame?.into_data() else { continue };
        buffer.extend_from_slice(&data);
        if buffer.len() > limit {
            return Ok(OutgoingBody::Streaming(Some(ProxyBody::Streamed { prefix: Some(buffer.freeze()), rest: body })));
        }
    }
    Ok(OutgoingBody::Replayable((!buffer.is_empty()).then(|| buffer.freeze())))
}

fn protocol_name(version: Version) -> &'static str {
    match version {
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[(&'static str, &'static str)]) -> HeaderMap {
        lines.iter().map(|(name, value)| (HeaderName::from_static(name), HeaderValue::from_static(value))).collect()
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<&str> = headers.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn the_connection_header_and_the_names_it_lists_are_stripped() {
        let mut h = headers(&[
            ("content-type", "text/plain"),
            ("connection", "keep-alive, X-Trace"),
            ("connection", "x-other"),
            ("keep-alive", "timeout=5"),
            ("x-trace", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
        ]);
        strip_hop_by_hop(&mut h, Nominated::Stripped);
        assert_eq!(names(&h), ["content-type", "x-kept"]);
    }

    #[test]
    fn fixed_hop_by_hop_headers_are_stripped_without_a_connection_header() {
        let mut h = headers(&[
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("content-length", "5"),
        ]);
        strip_hop_by_hop(&mut h, Nominated::Stripped);
        assert_eq!(names(&h), ["content-length"]);
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_is_left_as_it_is() {
        let mut h = headers(&[("content-type", "text/plain"), ("x-trace", "1"), ("x-trace", "2")]);
        let before = h.clone();
        strip_hop_by_hop(&mut h, Nominated::Stripped);
        assert_eq!(h, before);
    }

    #[test]
    fn listed_names_can_be_left_to_normalization() {
        let mut h = headers(&[("connection", "x-trace, host"), ("host", "a"), ("x-trace", "1"), ("keep-alive", "timeout=5")]);
        strip_hop_by_hop(&mut h, Nominated::Kept);
        assert_eq!(names(&h), ["host", "x-trace"]);
    }

    #[test]
    fn a_listed_name_that_is_not_a_header_name_is_ignored() {
        let mut h = headers(&[("connection", "close, bad name, , x-trace"), ("x-trace", "1"), ("x-kept", "2")]);
        strip_hop_by_hop(&mut h, Nominated::Stripped);
        assert_eq!(names(&h), ["x-kept"]);
    }
}
