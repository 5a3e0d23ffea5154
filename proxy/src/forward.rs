//! Forwarding (authorize -> **retry/forward** -> respond): attempts, per-try and route timeouts, back-off, mirrors, upgrades.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue, HOST};
use http::{HeaderMap, Method, Request, Response, StatusCode, Uri};
use tokio::time::Instant;

use crate::authorize::HeaderEdit;
use crate::body::{earliest, BodyProgress, Progressed, FillError, ProxyBody, ReplayBuffer, ResponseTimer, UpstreamBody};
use crate::http1::DownstreamUpgrade;
use crate::lb::PickInput;
use crate::retry::{backoff, is_retriable, may_follow, AttemptOutcome};
use crate::stats::bump;
use crate::tables::{MismatchAction, RetryPolicy};
use crate::outlier::OutlierSignal;
use crate::upstream::{ClusterState, HostState, Lease};

static ATTEMPT_COUNT: HeaderName = HeaderName::from_static("x-envoy-attempt-count");
static RATELIMITED: HeaderName = HeaderName::from_static("x-envoy-ratelimited");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// The request as it goes upstream, kept so that attempts can be replayed.
#[derive(Debug)]
pub(crate) struct Outgoing {
    pub method: Method,
    /// Origin form for HTTP/1.1 upstreams, absolute form for HTTP/2 ones.
    pub uri: Uri,
    /// The first attempt's headers, taken by it; a later attempt gets `Plan::retry_headers`.
    /// Without the policy's header edits, which depend on the host of each attempt.
    pub headers: Option<HeaderMap>,
    /// `headerMatches` mismatch edits of the policies that allowed the current host.
    pub edits: Vec<HeaderEdit>,
    pub body: OutgoingBody,
}

#[derive(Debug)]
pub(crate) enum OutgoingBody {
    /// Fully read and within the replay buffer: every attempt (and mirror) gets a copy.
    Replayable(Option<Bytes>),
    /// Streamed through; `None` once an attempt consumed it (no further attempt possible).
    Streaming(Option<ProxyBody>),
    /// Streamed to the attempt and copied for retries while it fits the buffer.
    Teed(Arc<ReplayBuffer>),
}

impl OutgoingBody {
    fn can_replay(&self) -> bool {
        match self {
            Self::Replayable(_) => true,
            Self::Streaming(body) => body.is_some(),
            Self::Teed(buffer) => buffer.can_replay(),
        }
    }

    fn take_for_attempt(&mut self) -> ProxyBody {
        match self {
            Self::Replayable(bytes) => ProxyBody::Full(bytes.clone()),
            Self::Streaming(body) => body.take().unwrap_or_else(ProxyBody::empty),
            Self::Teed(buffer) => ProxyBody::Replay(buffer.reader()),
        }
    }
}

/// An exchange's route timeout and the listener's stream idle timeout, as Envoy runs them:
/// the route timeout (and each per-try timeout) from the end of the request, the idle timeout
/// from its last activity. Zero turns one off.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub route: Option<Duration>,
    pub stream_idle: Option<Duration>,
}

impl Timeouts {
    pub fn new(route: Option<Duration>, stream_idle: Option<Duration>) -> Self {
        Self { route: route.filter(|t| !t.is_zero()), stream_idle: stream_idle.filter(|t| !t.is_zero()) }
    }

    /// The deadlines of a request that arrived whole at `ended`.
    fn deadline_after(&self, ended: Instant) -> Deadline {
        Deadline { route_at: self.route.map(|t| ended + t), idle_at: self.stream_idle.map(|t| ended + t) }
    }
}

/// When a request that has arrived whole must have its response headers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Deadline {
    route_at: Option<Instant>,
    idle_at: Option<Instant>,
}

impl Deadline {
    pub fn at(&self) -> Option<Instant> {
        earliest(self.route_at, self.idle_at)
    }

    /// The stream idle timeout (408) when it ends first, the route timeout (504) otherwise.
    pub fn failure(&self) -> Failure {
        match (self.route_at, self.idle_at) {
            (Some(route), Some(idle)) if idle < route => Failure::StreamIdle,
            (None, Some(_)) => Failure::StreamIdle,
            _ => Failure::Timeout,
        }
    }
}

/// The timeouts of one exchange as its request arrives.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    timeouts: Timeouts,
    arrival: Arrival,
}

#[derive(Debug, Clone)]
enum Arrival {
    /// At this instant, with its head (no body, or a body already whole).
    Whole(Instant),
    /// Its body is still arriving, or was when the exchange began.
    Body(Arc<BodyProgress>),
}

/// What ended a wait bounded while the request body was still arriving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Expired {
    /// The attempt's per-try timeout.
    PerTry,
    /// A timeout that ends the whole exchange.
    Exchange(Failure),
}

impl Clock {
    /// A request that arrived whole with its head at `head_at`.
    pub fn whole(timeouts: Timeouts, head_at: Instant) -> Self {
        Self { timeouts, arrival: Arrival::Whole(head_at) }
    }

    /// A request whose body is still arriving.
    pub fn arriving(timeouts: Timeouts, body: Arc<BodyProgress>) -> Self {
        Self { timeouts, arrival: Arrival::Body(body) }
    }

    fn progress(&self) -> Progressed {
        match &self.arrival {
            Arrival::Whole(at) => Progressed { last_frame: *at, ended: Some(*at) },
            Arrival::Body(body) => body.get(),
        }
    }

    async fn body_ended(&self) {
        if let Arrival::Body(body) = &self.arrival {
            body.ended().await;
        }
    }

    /// The fixed deadline once the request has arrived whole; `None` while its body arrives.
    pub fn deadline(&self) -> Option<Deadline> {
        self.progress().ended.map(|ended| self.timeouts.deadline_after(ended))
    }

    /// What the timeout that has ended the exchange answers.
    pub fn failure(&self) -> Failure {
        self.deadline().map_or(Failure::StreamIdle, |deadline| deadline.failure())
    }

    /// The timers that go on running in the response's body; `deadline` when the caller has
    /// just read it.
    pub fn response_timer(&self, deadline: Option<Deadline>) -> ResponseTimer {
        let route_at = deadline.or_else(|| self.deadline()).and_then(|deadline| deadline.route_at);
        ResponseTimer::new(route_at, self.timeouts.stream_idle)
    }

    /// Runs `work` (a cold path's whole exchange: an upgrade, a mirror) within the deadline of
    /// a request that arrived whole; `Err` with the timeout's failure when it ends first.
    pub async fn within_deadline<F: Future>(&self, work: F) -> Result<F::Output, Failure> {
        match self.deadline().and_then(|deadline| deadline.at()) {
            Some(at) => tokio::time::timeout_at(at, work).await.map_err(|_| self.failure()),
            None => Ok(work.await),
        }
    }

    /// Runs `work` (an attempt, or the reading of a body) unless a timeout ends it first: the
    /// stream idle timeout restarted by each frame of the body, or, from the body's end, the
    /// route timeout and `per_try` (counted from the later of the end and when `work` began).
    /// A request that arrived whole has a fixed `deadline`, which is cheaper to wait for.
    pub async fn bound<F: Future>(&self, work: F, per_try: Option<Duration>) -> Result<F::Output, Expired> {
        let began = Instant::now();
        let expired = async {
            loop {
                let progress = self.progress();
                let route_at = progress.ended.and_then(|ended| self.timeouts.route.map(|t| ended + t));
                let per_try_at = progress.ended.zip(per_try).map(|(ended, t)| ended.max(began) + t);
                let idle_at = self.timeouts.stream_idle.map(|t| progress.last_frame + t);
                tokio::select! {
                    () = sleep_until_some(earliest(earliest(route_at, idle_at), per_try_at)) => {}
                    () = self.body_ended(), if progress.ended.is_none() => continue,
                }
                let now = Instant::now();
                if route_at.is_some_and(|at| at <= now) {
                    return Expired::Exchange(Failure::Timeout);
                }
                if per_try_at.is_some_and(|at| at <= now) {
                    return Expired::PerTry;
                }
                // Only when no frame came while the timer ran.
                if self.timeouts.stream_idle.is_some_and(|t| self.progress().last_frame + t <= now) {
                    return Expired::Exchange(Failure::StreamIdle);
                }
            }
        };
        tokio::select! {
            biased;
            output = work => Ok(output),
            expired = expired => Err(expired),
        }
    }
}

async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The listener's `request_timeout` (Envoy's HCM): the whole request must have arrived by
/// `at`, unless the response started first. Armed only for a request whose body is still
/// coming, so a bodiless request reads no clock for it.
#[derive(Debug)]
pub(crate) struct RequestTimer {
    at: Instant,
    body: Arc<BodyProgress>,
}

impl RequestTimer {
    pub fn new(at: Instant, body: Arc<BodyProgress>) -> Self {
        Self { at, body }
    }

    /// Runs `work` (reading the body, the attempts) unless the timer ends while the request
    /// is still incomplete. Once `work` is done the response has started, which disarms it.
    pub async fn bound<F: Future>(&self, work: F) -> Result<F::Output, Failure> {
        let expired = async {
            tokio::time::sleep_until(self.at).await;
            if self.body.get().ended.is_some() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            output = work => Ok(output),
            () = expired => Err(Failure::RequestTimeout),
        }
    }
}

/// Why no upstream response is passed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Circuit breaker (503 + `x-envoy-overloaded`).
    Overflow,
    /// Connect failure or reset before response headers (503).
    Upstream,
    /// Per-try or route timeout (504).
    Timeout,
    /// Stream idle timeout before response headers (408).
    StreamIdle,
    /// The listener's `request_timeout` ended before the whole request arrived (408).
    RequestTimeout,
    /// The request body outgrew the replay buffer while a retry waited for its back-off (507).
    RetryBufferOverflow,
    /// The downstream request body failed while a retry waited for its back-off (400).
    DownstreamBody,
}

/// Where the attempts have got to, kept by the caller: a request timer may end them midway.
pub(crate) struct Progress {
    pub attempts: u32,
    /// The host of the last attempt.
    pub upstream: SocketAddr,
}

/// Everything the retry loop needs besides the request.
pub(crate) struct Plan<'a> {
    /// The headers for an attempt after the first (retries are rare: the first attempt takes
    /// the request's own headers and nothing is copied for attempts that never happen).
    pub retry_headers: &'a (dyn Fn() -> HeaderMap + Sync),
    pub cluster: &'a ClusterState,
    pub retry_policy: Option<&'a RetryPolicy>,
    pub include_attempt_count: bool,
    pub clock: Clock,
    pub source: IpAddr,
    pub original_destination: Option<SocketAddr>,
}

/// Envoy's router loop: one attempt, then retries while the policy, the breakers, the replay
/// buffer and the deadline allow; `authorize` vets every host picked for a retry and gives the
/// header edits of the policies that allow it (`None`: denied). `progress` follows the
/// attempts, for a caller whose request timer may end them midway.
pub(crate) async fn forward(
    plan: Plan<'_>,
    first_host: Arc<HostState>,
    mut outgoing: Outgoing,
    mut authorize: impl FnMut(&HostState) -> Option<Vec<HeaderEdit>>,
    progress: &mut Progress,
) -> Result<Response<ProxyBody>, Failure> {
    let cluster = plan.cluster;
    let mut host = first_host;
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut _retry_slot = None;
    loop {
        progress.attempts += 1;
        progress.upstream = host.addr;
        let attempts = progress.attempts;
        let last_try = !may_follow(plan.retry_policy, attempts);
        let per_try = plan.retry_policy.and_then(|p| p.per_try_timeout);
        let request = PendingRequest {
            outgoing: &mut outgoing,
            attempt: attempts,
            include_count: plan.include_attempt_count,
            retry_headers: plan.retry_headers,
        };
        // A timeout that ends the exchange while the request body still arrives.
        let mut expired = None;
        let deadline = plan.clock.deadline();
        let result = {
            // Pinned where it is made: both ways of bounding it below borrow it, so it is never moved.
            let attempt = std::pin::pin!(attempt(cluster, &host, request));
            match deadline {
                Some(deadline) => match earliest(per_try.map(|t| Instant::now() + t), deadline.at()) {
                    Some(at) => tokio::time::timeout_at(at, attempt).await.unwrap_or(Err(AttemptOutcome::PerTryTimeout)),
                    None => attempt.await,
                },
                // Boxed like every cold path: it would otherwise add to each request's future.
                None => match Box::pin(plan.clock.bound(attempt, per_try)).await {
                    Ok(result) => result,
                    Err(Expired::PerTry) => Err(AttemptOutcome::PerTryTimeout),
                    Err(Expired::Exchange(failure)) => {
                        expired = Some(failure);
                        Err(AttemptOutcome::PerTryTimeout)
                    }
                },
            }
        };
        let outcome = match &result {
            Ok((response, _)) => AttemptOutcome::Response {
                status: response.status().as_u16(),
                envoy_ratelimited: response.headers().contains_key(&RATELIMITED),
                // Looked up only when a gRPC condition could use it.
                grpc_status: plan
                    .retry_policy
                    .filter(|policy| policy.retry_on.any_grpc())
                    .and_then(|_| grpc_status(response.headers())),
            },
            Err(outcome) => *outcome,
        };
        let random = rand::random::<u64>();
        match outcome {
            AttemptOutcome::Response { status, .. } => cluster.record(&host, OutlierSignal::Status(status), random),
            AttemptOutcome::Overflow => {}
            _ => cluster.record(&host, OutlierSignal::LocalFailure, random),
        }
        let may_retry = plan.retry_policy.is_some_and(|policy| !last_try && is_retriable(policy, &outcome));
        // The clock is read only when the answer can matter: after a per-try timeout or an
        // outcome that would be retried, not after every answered request.
        let route_expired = expired.is_some()
            || ((may_retry || outcome == AttemptOutcome::PerTryTimeout)
                && plan.clock.deadline().and_then(|deadline| deadline.at()).is_some_and(|at| Instant::now() >= at));
        if outcome == AttemptOutcome::PerTryTimeout {
            let counter = if route_expired {
                &cluster.counters.upstream_rq_timeout
            } else {
                &cluster.counters.upstream_rq_per_try_timeout
            };
            bump(counter);
        }
        let retry_with = plan.retry_policy.filter(|_| may_retry && !route_expired && outgoing.body.can_replay());
        // The next host is vetted (ejection, previous hosts, policy) before the result is
        // given up, so a retry that cannot happen still returns the real last outcome.
        let next = retry_with.and_then(|policy| {
            if policy.avoid_previous_hosts {
                tried.push(host.addr);
            }
            let input = PickInput {
                random: rand::random::<u64>(),
                source: plan.source,
                original_destination: plan.original_destination,
            };
            let next = cluster.pick(input, &tried)?;
            authorize(&next).map(|edits| (next, edits))
        });
        let slot = next.as_ref().and_then(|_| cluster.try_retry());
        let (Some(policy), Some((next, edits)), Some(slot)) = (retry_with, next, slot) else {
            let result = match result {
                Ok((response, lease)) => Ok(into_downstream(response, lease, plan.clock.response_timer(deadline))),
                Err(AttemptOutcome::PerTryTimeout) if route_expired => Err(expired.unwrap_or_else(|| plan.clock.failure())),
                Err(outcome) => Err(failure_of(outcome)),
            };
            return result;
        };
        _retry_slot = Some(slot);
        drop(result);
        if let OutgoingBody::Teed(buffer) = &outgoing.body {
            buffer.supersede();
        }
        outgoing.edits = edits;
        let wake = Instant::now() + backoff(policy, attempts, rand::random::<u64>());
        // While the body still arrives, the next attempt's bound covers the back-off's time.
        let deadline_first = plan.clock.deadline().and_then(|deadline| deadline.at()).filter(|at| *at <= wake);
        // Boxed like every cold path: it would otherwise add to each request's future.
        Box::pin(back_off(deadline_first.unwrap_or(wake), &outgoing.body)).await?;
        if deadline_first.is_some() {
            bump(&cluster.counters.upstream_rq_timeout);
            return Err(plan.clock.failure());
        }
        host = next;
    }
}

/// Waits for a retry's back-off. A teed body keeps being read meanwhile, as Envoy keeps
/// receiving it: if it outgrows the replay buffer before the next attempt starts, the request
/// ends with 507.
async fn back_off(until: Instant, body: &OutgoingBody) -> Result<(), Failure> {
    let OutgoingBody::Teed(buffer) = body else {
        tokio::time::sleep_until(until).await;
        return Ok(());
    };
    tokio::select! {
        () = tokio::time::sleep_until(until) => Ok(()),
        filled = buffer.fill() => match filled {
            Ok(()) => {
                tokio::time::sleep_until(until).await;
                Ok(())
            }
            Err(FillError::Overflow) => Err(Failure::RetryBufferOverflow),
            Err(FillError::Downstream) => Err(Failure::DownstreamBody),
        },
    }
}

/// The `grpc-status` of a response's headers (a trailers-only gRPC response).
fn grpc_status(headers: &HeaderMap) -> Option<u32> {
    headers.get(&GRPC_STATUS)?.to_str().ok()?.trim().parse().ok()
}

/// A request built only once a connection is ready, so a streamed body (and the request's own
/// headers) survive connect failures.
struct PendingRequest<'a> {
    outgoing: &'a mut Outgoing,
    attempt: u32,
    include_count: bool,
    retry_headers: &'a (dyn Fn() -> HeaderMap + Sync),
}

impl PendingRequest<'_> {
    fn build(self) -> Request<ProxyBody> {
        let outgoing = self.outgoing;
        let mut request = Request::new(outgoing.body.take_for_attempt());
        *request.method_mut() = outgoing.method.clone();
        *request.uri_mut() = outgoing.uri.clone();
        *request.headers_mut() = outgoing.headers.take().unwrap_or_else(self.retry_headers);
        apply_header_edits(request.headers_mut(), &outgoing.edits);
        if self.include_count {
            request.headers_mut().insert(ATTEMPT_COUNT.clone(), HeaderValue::from(self.attempt));
        }
        request
    }
}

async fn attempt(
    cluster: &ClusterState,
    host: &Arc<HostState>,
    request: PendingRequest<'_>,
) -> Result<(Response<UpstreamBody>, Lease), AttemptOutcome> {
    let breakers = &cluster.config.circuit_breakers;
    let lease = host.begin_request(breakers)?;
    let response = host.send(breakers, || request.build()).await?;
    Ok((response, lease))
}

fn into_downstream(response: Response<UpstreamBody>, mut lease: Lease, timer: ResponseTimer) -> Response<ProxyBody> {
    let (parts, mut body) = response.into_parts();
    if http_body::Body::is_end_stream(&body) {
        // Writers never poll an empty body, so it would never report the end.
        lease.finished(&mut body);
    }
    Response::from_parts(parts, ProxyBody::Upstream { body, lease: Some(lease), timer })
}

/// Cilium's `headerMatches` mismatch actions.
pub(crate) fn apply_header_edits(headers: &mut HeaderMap, edits: &[HeaderEdit]) {
    for edit in edits {
        let Ok(name) = HeaderName::from_bytes(edit.name.as_bytes()) else { continue };
        let value = edit.value.as_deref().and_then(|v| HeaderValue::from_str(v).ok());
        match (edit.action, value) {
            (MismatchAction::Log, _) => tracing::info!(header = %edit.name, "policy header mismatch"),
            (MismatchAction::Add, Some(value)) => {
                headers.append(name, value);
            }
            (MismatchAction::Replace, Some(value)) => {
                headers.insert(name, value);
            }
            (MismatchAction::Delete, _) | (MismatchAction::Replace, None) => {
                headers.remove(name);
            }
            (MismatchAction::Add, None) => {}
        }
    }
}

fn failure_of(outcome: AttemptOutcome) -> Failure {
    match outcome {
        AttemptOutcome::Overflow => Failure::Overflow,
        AttemptOutcome::PerTryTimeout => Failure::Timeout,
        AttemptOutcome::Response { .. }
        | AttemptOutcome::ConnectFailure
        | AttemptOutcome::Reset { .. }
        | AttemptOutcome::RefusedStream => Failure::Upstream,
    }
}

/// Local reply for a forwarding failure (Envoy's router texts).
pub(crate) fn failure_response(failure: Failure) -> Response<ProxyBody> {
    let (status, body) = match failure {
        Failure::Overflow => (StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers. reset reason: overflow"),
        Failure::Upstream => (StatusCode::SERVICE_UNAVAILABLE, "upstream connect error or disconnect/reset before headers"),
        Failure::Timeout => (StatusCode::GATEWAY_TIMEOUT, "upstream request timeout"),
        Failure::StreamIdle => (StatusCode::REQUEST_TIMEOUT, "stream timeout"),
        Failure::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request timeout"),
        Failure::RetryBufferOverflow => {
            (StatusCode::INSUFFICIENT_STORAGE, "exceeded request buffer limit while retrying upstream")
        }
        Failure::DownstreamBody => (StatusCode::BAD_REQUEST, "downstream request body error"),
    };
    let mut response = Response::new(ProxyBody::full(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if failure == Failure::Overflow {
        response.headers_mut().insert(HeaderName::from_static("x-envoy-overloaded"), HeaderValue::from_static("true"));
    }
    response
}

/// Forwards an `Upgrade` request on a dedicated connection. Only a `101` from the upstream
/// switches protocols (CVE-2024-23326); then bytes are copied both ways until either side closes.
pub(crate) async fn forward_upgrade(
    cluster: &ClusterState,
    host: &Arc<HostState>,
    mut request: Request<ProxyBody>,
    downstream: DownstreamUpgrade,
    clock: Clock,
) -> Result<Response<ProxyBody>, Failure> {
    let exchange = async {
        let lease = host.begin_request(&cluster.config.circuit_breakers)?;
        let conn = host.connect_upgradable().await?;
        request.headers_mut().remove(&ATTEMPT_COUNT);
        let response = conn.send(request).await.map_err(|error| AttemptOutcome::Reset { request_sent: error.request_sent })?;
        Ok::<_, AttemptOutcome>((response, lease))
    };
    let (response, lease) = clock.within_deadline(exchange).await?.map_err(failure_of)?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(into_downstream(response.map(UpstreamBody::Http1), lease, clock.response_timer(None)));
    }
    let (parts, body) = response.into_parts();
    let Some(mut upstream) = body.into_upgraded() else {
        return Err(Failure::Upstream);
    };
    let addr = host.addr;
    tokio::spawn(async move {
        let _lease = lease;
        match downstream.await {
            Ok(mut downstream) => {
                if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
                    tracing::debug!(upstream = %addr, %error, "upgraded connection ended with an error");
                }
            }
            Err(error) => tracing::debug!(upstream = %addr, %error, "protocol switch failed"),
        }
    });
    Ok(Response::from_parts(parts, ProxyBody::empty()))
}

/// Envoy's request mirroring: a fire-and-forget copy with `Host: <host>-shadow`; its outcome
/// never reaches the client. It runs under the route's timeouts, so a shadow that stalls does
/// not hold its connection for good.
pub(crate) fn mirror(cluster: Arc<ClusterState>, input: PickInput, timeouts: Timeouts, method: Method, uri: Uri, mut headers: HeaderMap, body: Option<Bytes>) {
    if let Some(shadow) = headers.get(HOST).and_then(|host| host.to_str().ok()).map(shadow_host) {
        if let Ok(value) = HeaderValue::from_str(&shadow) {
            headers.insert(HOST, value);
        }
    }
    tokio::spawn(async move {
        // Mirrored only once the request has arrived whole.
        let clock = Clock::whole(timeouts, Instant::now());
        let Some(host) = cluster.pick(input, &[]) else { return };
        let mut outgoing =
            Outgoing { method, uri, headers: Some(headers), edits: Vec::new(), body: OutgoingBody::Replayable(body) };
        // One attempt, which takes the headers above: there is nothing to rebuild.
        let request = PendingRequest { outgoing: &mut outgoing, attempt: 1, include_count: false, retry_headers: &HeaderMap::new };
        match clock.within_deadline(attempt(&cluster, &host, request)).await {
            Ok(Ok((response, lease))) => {
                // Drain so the connection can be reused.
                let body = into_downstream(response, lease, clock.response_timer(None)).into_body();
                if let Err(error) = http_body_util::BodyExt::collect(body).await {
                    tracing::debug!(upstream = %host.addr, %error, "mirror response failed");
                }
            }
            Ok(Err(outcome)) => tracing::debug!(upstream = %host.addr, ?outcome, "mirror request failed"),
            Err(failure) => tracing::debug!(upstream = %host.addr, ?failure, "mirror request timed out"),
        }
    });
}

/// `foo` → `foo-shadow`, `foo:8080` → `foo-shadow:8080` (the suffix goes on the host name).
fn shadow_host(authority: &str) -> String {
    let (host, port) = match authority.rfind(':') {
        Some(i) if authority[i + 1..].bytes().all(|b| b.is_ascii_digit()) && !authority[..i].contains(':')
            || authority[..i].ends_with(']') =>
        {
            authority.split_at(i)
        }
        _ => (authority, ""),
    };
    format!("{host}-shadow{port}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_suffix_goes_before_the_port() {
        assert_eq!(shadow_host("echo"), "echo-shadow");
        assert_eq!(shadow_host("echo.default:8080"), "echo.default-shadow:8080");
        assert_eq!(shadow_host("[::1]:80"), "[::1]-shadow:80");
    }

    #[test]
    fn stream_idle_wins_only_when_it_ends_first() {
        let now = Instant::now();
        let secs = Duration::from_secs;
        let deadline = Timeouts::new(Some(secs(15)), Some(secs(300))).deadline_after(now);
        assert_eq!((deadline.failure(), deadline.at()), (Failure::Timeout, Some(now + secs(15))));
        let deadline = Timeouts::new(Some(secs(15)), Some(secs(5))).deadline_after(now);
        assert_eq!((deadline.failure(), deadline.at()), (Failure::StreamIdle, Some(now + secs(5))));
        assert_eq!(Timeouts::new(None, None).deadline_after(now).at(), None);
        let deadline = Timeouts::new(Some(Duration::ZERO), Some(secs(5))).deadline_after(now);
        assert_eq!((deadline.failure(), deadline.at()), (Failure::StreamIdle, Some(now + secs(5))));
    }
}
