//! The proxy's input: `ProxyTables`, compiled by the agent (pure) and swapped in atomically.
//!
//! Everything here is already resolved: names are qualified, Envoy defaults are filled in,
//! regexes are compiled and anchored, label selectors are expanded to identity sets. The proxy
//! never sees Kubernetes or Cilium objects.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use regex::Regex;

/// Numeric security identity (Cilium's numbering: 1 host, 2 world, ...; pods from 256 up).
pub type Identity = u32;

/// Reserved identity of the node itself.
pub const IDENTITY_HOST: Identity = 1;
/// Reserved identity of any address that is no known pod or node.
pub const IDENTITY_WORLD: Identity = 2;

/// One full, immutable configuration of the proxy.
#[derive(Debug, Clone, Default)]
pub struct ProxyTables {
    /// Monotonic version, shown in flow events and `sluice status`.
    pub generation: u64,
    pub listeners: Vec<Listener>,
    /// Clusters by their (qualified) name, e.g. `default/echo-service` or `default/echo-service:8080`.
    pub clusters: BTreeMap<String, Arc<Cluster>>,
    /// Who is behind an address: pod IPs and node IPs. Anything absent is `IDENTITY_WORLD`.
    pub peers: BTreeMap<IpAddr, Peer>,
    /// CIDR identities (Cilium's local-scope identities): an address that is no peer takes the
    /// identity of the longest prefix here containing it, and `IDENTITY_WORLD` when none does.
    /// Order does not matter; a prefix listed twice keeps its first identity.
    pub cidr_identities: Vec<(IpNet, Identity)>,
    /// L3/L4/L7 policy of each local endpoint, by endpoint IP. An endpoint absent here has no
    /// policy in either direction (everything allowed).
    pub policies: BTreeMap<IpAddr, Arc<EndpointPolicy>>,
    /// eBPF datapath: which listener serves a connection the kernel redirected to a
    /// [`Bind::Transparent`] listener, by the connection's original destination (the accepted
    /// socket's local address). Used for CiliumEnvoyConfig `services[]`, whose `VIP:port` the
    /// kernel does not translate: `VIP:port -> "<CEC listener name>"`. The named listener's HCM,
    /// route config and name (in flow events) are used; its own bind does not matter. A
    /// destination absent here is served by the accepting listener itself. Unknown listener
    /// names are an `ApplyError`. Empty in gateway mode.
    pub frontends: BTreeMap<SocketAddr, String>,
    /// eBPF datapath: the node address every upstream connection is bound to (port chosen by
    /// the kernel). Needed because the proxy does not spoof the client's address: replies to a
    /// pod address would not be routed back to the proxy. `None`: the kernel picks the source
    /// (gateway mode).
    pub upstream_source: Option<IpAddr>,
    /// eBPF datapath: put `SO_MARK` on every upstream socket ([`MARK_PROXY_INGRESS`] or
    /// [`MARK_PROXY_EGRESS`]) so the kernel neither redirects the proxy's own connections into
    /// the proxy again nor re-applies the policy the proxy already enforced. Needs
    /// `CAP_NET_ADMIN`; `false` in gateway mode.
    pub mark_upstream: bool,
}

/// `SO_MARK` of an upstream connection whose destination's ingress policy the proxy enforced
/// (the destination IP has an entry in [`ProxyTables::policies`]). Must equal
/// `MARK_MAGIC_PROXY_INGRESS` in ebpf/bpf/abi.h (checked by a test of this crate).
pub const MARK_PROXY_INGRESS: u32 = 0x0A00;
/// `SO_MARK` of every other upstream connection (the proxy acted for the client: egress
/// policy, CEC load balancing). Must equal `MARK_MAGIC_PROXY_EGRESS` in ebpf/bpf/abi.h.
pub const MARK_PROXY_EGRESS: u32 = 0x0B00;

/// A known workload or node behind an IP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub identity: Identity,
    /// `namespace/name` of the pod, or the node name for node addresses.
    pub name: String,
    /// Security-relevant labels in `source:key=value` form, for flow events.
    pub labels: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// Listeners, routes
// ---------------------------------------------------------------------------------------------

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bind {
    /// An explicit address from the Envoy Listener.
    Addr(SocketAddr),
    /// No address in the config: the proxy binds `127.0.0.1:0` once and keeps that port for
    /// as long as a listener of this name exists (reported back in `Applied`).
    LoopbackAuto,
    /// eBPF datapath: an `IP_TRANSPARENT` listener on `127.0.0.1:port`, the socket the kernel
    /// hands redirected flows to with `bpf_sk_assign` (the policy entries' and L7 services'
    /// `proxy_port`). An accepted socket's local address is the flow's ORIGINAL destination
    /// (pod `IP:port` or Service `VIP:port`), which selects the serving listener through
    /// [`ProxyTables::frontends`] and is the upstream of a [`LbPolicy::OriginalDestination`]
    /// cluster. IPv4 only, like the kernel programs. Needs `CAP_NET_ADMIN` (or
    /// `CAP_NET_RAW`).
    Transparent { port: u16 },
}

impl Bind {
    /// The address the listening socket is bound to (port 0: any free port).
    pub fn socket_addr(&self) -> SocketAddr {
        match self {
            Bind::Addr(addr) => *addr,
            Bind::LoopbackAuto => SocketAddr::from(([127, 0, 0, 1], 0)),
            Bind::Transparent { port } => SocketAddr::from(([127, 0, 0, 1], *port)),
        }
    }
}

/// A listener: a bound socket plus the HTTP connection manager settings behind it.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Stable name (qualified Envoy listener name, or `svc:<ns>/<name>:<port>` for a Service
    /// frontend). Sockets are kept across table swaps by `(name, bind)`.
    pub name: String,
    pub bind: Bind,
    pub http: Arc<HttpConnectionManager>,
}

/// Request handling settings of a listener (Envoy's HCM subset).
#[derive(Debug, Clone)]
pub struct HttpConnectionManager {
    pub stat_prefix: String,
    pub route_config: Arc<RouteConfig>,
    /// `normalize_path` (RFC 3986 dot segments). sluice always forwards exactly the path that
    /// policy and routing saw: with this flag a path with dot segments is rewritten to its
    /// resolved form, without it such a path is rejected (400). See proxy/NORMALIZATION.md.
    pub normalize_path: bool,
    pub merge_slashes: bool,
    pub escaped_slashes: EscapedSlashesAction,
    /// How long a stream may go without activity (a request or response body frame, a write
    /// to the client that makes progress): 408 before the response headers, a reset of the
    /// stream after them (default 5 min).
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout`: a request whose body is still arriving this long after its head
    /// gets 408, unless the response has started. None (Envoy's default) arms no timer.
    pub request_timeout: Option<Duration>,
    /// `request_headers_timeout`: an HTTP/1 request head that has started must be complete
    /// within it, or the connection is closed. None (Envoy's default) arms no timer, so the
    /// request path reads no clock for it.
    pub request_headers_timeout: Option<Duration>,
    /// `max_request_headers_kb` in bytes (default 60 KiB); above it the request gets 431.
    pub max_request_headers_bytes: usize,
    /// `common_http_protocol_options.max_headers_count` (default 100).
    pub max_headers_count: usize,
    /// `common_http_protocol_options.idle_timeout` for the downstream connection (default 1 h).
    pub idle_timeout: Option<Duration>,
    /// `use_remote_address` (append the peer to `x-forwarded-for`).
    pub use_remote_address: bool,
    pub skip_xff_append: bool,
    /// Allow HTTP/1.1 `Upgrade` (WebSocket) passthrough (`upgrade_configs`).
    pub upgrades: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EscapedSlashesAction {
    /// `IMPLEMENTATION_SPECIFIC_DEFAULT` or absent. Envoy keeps `%2F`/`%5C` unchanged; sluice
    /// rejects them (400), because a backend that decodes them would see a path policy did not.
    #[default]
    ImplementationSpecificDefault,
    /// Only when configured explicitly: `%2F`/`%5C` are forwarded and matched literally.
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
    /// `max_direct_response_body_size_bytes` was already checked by the compiler.
    pub request_headers_to_add: Vec<(String, String)>,
    pub request_headers_to_remove: Vec<String>,
    pub response_headers_to_add: Vec<(String, String)>,
    pub response_headers_to_remove: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct VirtualHost {
    pub name: String,
    /// Lower-cased domains: exact, `*.suffix`, `prefix.*`, or `*`.
    pub domains: Vec<String>,
    /// In order; the first match wins.
    pub routes: Vec<Route>,
    /// Used by routes that have none of their own (no field merge).
    pub retry_policy: Option<RetryPolicy>,
    /// Bytes of request body kept for retries/mirrors (default 1 MiB).
    pub request_body_buffer_limit: usize,
    pub include_request_attempt_count: bool,
}

#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    pub matcher: RouteMatch,
    pub action: RouteAction,
}

#[derive(Debug, Clone)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// Applies to `Prefix`, `Exact` and `PathSeparatedPrefix`, not to `Regex` (Envoy default true).
    pub case_sensitive: bool,
    /// All must match.
    pub headers: Vec<HeaderMatcher>,
    /// All must match; the first value of a repeated key is used.
    pub query_parameters: Vec<QueryParameterMatcher>,
}

#[derive(Debug, Clone)]
pub enum PathMatch {
    /// Prefix of the whole `:path`, query included.
    Prefix(String),
    /// Exact match of the path without its query.
    Exact(String),
    /// Full (anchored) match of the path without its query.
    Regex(Regex),
    /// `P`, `P/...` or `P?...`.
    PathSeparatedPrefix(String),
}

#[derive(Debug, Clone)]
pub struct HeaderMatcher {
    /// Lower-case header name; `:authority`, `:method`, `:path`, `:scheme` address pseudo-headers.
    pub name: String,
    pub rule: HeaderMatchRule,
    pub invert: bool,
    pub treat_missing_as_empty: bool,
}

#[derive(Debug, Clone)]
pub enum HeaderMatchRule {
    Present(bool),
    String(StringMatcher),
    /// `[start, end)` over a base-10 i64.
    Range { start: i64, end: i64 },
}

#[derive(Debug, Clone)]
pub enum StringMatcher {
    Exact { value: String, ignore_case: bool },
    Prefix { value: String, ignore_case: bool },
    Suffix { value: String, ignore_case: bool },
    Contains { value: String, ignore_case: bool },
    /// Anchored: must match the whole value.
    Regex(Regex),
}

#[derive(Debug, Clone)]
pub struct QueryParameterMatcher {
    pub name: String,
    /// `None` = present match.
    pub value: Option<StringMatcher>,
}

#[derive(Debug, Clone)]
pub enum RouteAction {
    Forward(Arc<ForwardAction>),
    DirectResponse { status: u16, body: bytes::Bytes },
    Redirect(RedirectAction),
}

#[derive(Debug, Clone)]
pub struct ForwardAction {
    /// One entry with weight 1 for a plain `cluster`. Weight-0 entries are never picked; the
    /// selection uses the sum of weights (Envoy ignores `total_weight`).
    pub clusters: Vec<WeightedCluster>,
    pub rewrite: Option<PathRewrite>,
    pub host_rewrite_literal: Option<String>,
    /// From the end of the request to the end of the response, retries included; `None` =
    /// disabled (Envoy's default 15 s is filled in by the compiler).
    pub timeout: Option<Duration>,
    /// The route's `idle_timeout`, in place of the listener's `stream_idle_timeout`; zero turns
    /// idle timing off for the route. `None`: the listener's applies.
    pub idle_timeout: Option<Duration>,
    /// Route-level policy, else the virtual host's (already resolved by the compiler).
    pub retry_policy: Option<RetryPolicy>,
    pub mirrors: Vec<MirrorPolicy>,
    /// Status when the cluster name is unknown (default 503).
    pub cluster_not_found_status: u16,
}

#[derive(Debug, Clone)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
}

#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// Replace the matched prefix (or exact path).
    Prefix(String),
    /// Replace every match of the regex in the path (query excluded).
    Regex { pattern: Regex, substitution: String },
}

#[derive(Debug, Clone)]
pub struct MirrorPolicy {
    pub cluster: String,
    /// Fraction in parts per million (default 1_000_000 = all requests).
    pub fraction_per_million: u32,
}

#[derive(Debug, Clone)]
pub struct RedirectAction {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    /// Default 301.
    pub status: u16,
    pub strip_query: bool,
}

/// Envoy's `retry_policy` with its defaults resolved.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub retry_on: RetryOn,
    /// Default 1.
    pub num_retries: u32,
    pub per_try_timeout: Option<Duration>,
    pub retriable_status_codes: Vec<u16>,
    /// Default 25 ms.
    pub base_interval: Duration,
    /// Default 10 x base.
    pub max_interval: Duration,
    /// `envoy.retry_host_predicates.previous_hosts`.
    pub avoid_previous_hosts: bool,
    /// Default 1.
    pub host_selection_retry_max_attempts: u32,
}

/// The `retry_on` conditions (comma list in Envoy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetryOn {
    pub server_error_5xx: bool,
    pub gateway_error: bool,
    pub reset: bool,
    pub reset_before_request: bool,
    pub connect_failure: bool,
    pub retriable_4xx: bool,
    pub refused_stream: bool,
    pub retriable_status_codes: bool,
    pub envoy_ratelimited: bool,
    /// gRPC conditions: the `grpc-status` of the response **headers** (a trailers-only
    /// response); a status that only arrives in trailers is never retried, as in Envoy.
    /// `cancelled` (1).
    pub grpc_cancelled: bool,
    /// `deadline-exceeded` (4).
    pub grpc_deadline_exceeded: bool,
    /// `resource-exhausted` (8).
    pub grpc_resource_exhausted: bool,
    /// `unavailable` (14).
    pub grpc_unavailable: bool,
    /// `internal` (13).
    pub grpc_internal: bool,
}

impl RetryOn {
    /// Whether any gRPC condition is set (only then is `grpc-status` looked at).
    pub fn any_grpc(&self) -> bool {
        self.grpc_cancelled
            || self.grpc_deadline_exceeded
            || self.grpc_resource_exhausted
            || self.grpc_unavailable
            || self.grpc_internal
    }
}

// ---------------------------------------------------------------------------------------------
// Clusters
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct Cluster {
    pub name: String,
    pub endpoints: Vec<Endpoint>,
    pub lb_policy: LbPolicy,
    /// Default 5 s.
    pub connect_timeout: Duration,
    pub circuit_breakers: CircuitBreakers,
    /// `None`: nothing is ever ejected.
    pub outlier_detection: Option<OutlierDetection>,
    pub protocol: UpstreamProtocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// Default 1.
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Power of two choices on active requests (`choice_count`, default 2).
    LeastRequest { choice_count: u32 },
    Random,
    /// Ketama ring (`ring_hash_lb_config`; Envoy defaults 1024 and 8M entries).
    RingHash { minimum_ring_size: u64, maximum_ring_size: u64 },
    /// Maglev lookup table (`maglev_lb_config.table_size`, a prime; Envoy default 65537).
    Maglev { table_size: u64 },
    /// Envoy's `type: ORIGINAL_DST` (`lb_policy: CLUSTER_PROVIDED`): the one host of a request
    /// is the original destination of its downstream connection, i.e. the pod `IP:port` the
    /// client connected to before the kernel redirected the flow (Cilium's policy-only
    /// listeners). `endpoints` must be empty. A request that did not arrive through a
    /// [`Bind::Transparent`] listener has no original destination and gets 503
    /// `no healthy upstream`. Policy sees the original destination as the destination.
    OriginalDestination,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    Http2,
}

/// Default-priority thresholds (Envoy defaults 1024/1024/1024/3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitBreakers {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for CircuitBreakers {
    fn default() -> Self {
        Self { max_connections: 1024, max_pending_requests: 1024, max_requests: 1024, max_retries: 3 }
    }
}

/// Envoy's outlier detection with defaults resolved (see reference §2.11). Percentages are
/// whole percent (`enforcing_*` is the chance that a detected outlier is really ejected).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub enforcing_consecutive_5xx: u32,
    pub consecutive_gateway_failure: u32,
    pub enforcing_consecutive_gateway_failure: u32,
    pub split_external_local_origin_errors: bool,
    pub consecutive_local_origin_failure: u32,
    pub enforcing_consecutive_local_origin_failure: u32,
    /// Between two sweeps (success rate, failure percentage, un-ejection). Default 10 s.
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_time: Duration,
    /// Up to this much is added, at random, to each ejection (default 0).
    pub max_ejection_time_jitter: Duration,
    pub max_ejection_percent: u32,
    /// Eject one host even when `max_ejection_percent` would allow none (default false).
    pub always_eject_one_host: bool,
    /// Success-rate ejection (default 100).
    pub enforcing_success_rate: u32,
    /// Hosts with enough requests needed for a success-rate sweep (default 5).
    pub success_rate_minimum_hosts: u32,
    /// Requests in one interval for a host to count in a sweep (default 100).
    pub success_rate_request_volume: u32,
    /// Ejected below mean - factor/1000 x stdev (default 1900).
    pub success_rate_stdev_factor: u32,
    /// Local-origin success rate, with `split_external_local_origin_errors` (default 100).
    pub enforcing_local_origin_success_rate: u32,
    /// Ejected at or above this failure percentage (default 85).
    pub failure_percentage_threshold: u32,
    /// Failure-percentage ejection (default 0: detected, never enforced).
    pub enforcing_failure_percentage: u32,
    /// Local-origin failure percentage, with `split_external_local_origin_errors` (default 0).
    pub enforcing_failure_percentage_local_origin: u32,
    /// Default 5.
    pub failure_percentage_minimum_hosts: u32,
    /// Default 50.
    pub failure_percentage_request_volume: u32,
}

/// Envoy's defaults: what an empty `outlier_detection: {}` means.
impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            enforcing_consecutive_5xx: 100,
            consecutive_gateway_failure: 5,
            enforcing_consecutive_gateway_failure: 0,
            split_external_local_origin_errors: false,
            consecutive_local_origin_failure: 5,
            enforcing_consecutive_local_origin_failure: 100,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejection_time_jitter: Duration::ZERO,
            max_ejection_percent: 10,
            always_eject_one_host: false,
            enforcing_success_rate: 100,
            success_rate_minimum_hosts: 5,
            success_rate_request_volume: 100,
            success_rate_stdev_factor: 1900,
            enforcing_local_origin_success_rate: 100,
            failure_percentage_threshold: 85,
            enforcing_failure_percentage: 0,
            enforcing_failure_percentage_local_origin: 0,
            failure_percentage_minimum_hosts: 5,
            failure_percentage_request_volume: 50,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Policy
// ---------------------------------------------------------------------------------------------

/// The policy of one local endpoint, both directions.
#[derive(Debug, Clone, Default)]
pub struct EndpointPolicy {
    pub ingress: DirectionPolicy,
    pub egress: DirectionPolicy,
}

/// One direction of an endpoint's policy, with Cilium's semantics:
/// - any matching `deny` rule denies (deny beats every allow);
/// - otherwise the allow rules that match the remote identity, protocol and port are grouped by
///   port specificity, like the datapath's longest-prefix port lookup: a rule naming the port,
///   then ranges covering it (narrowest first; CVE-2024-52529), then a rule with port 0 for
///   the protocol, then a rule with no ports at all; the most specific non-empty group
///   decides, as the union of its rules: if any of them has no HTTP rules the flow is allowed
///   at L4, otherwise the request must match one of the HTTP rules of the group;
/// - any matching allow rule with `auth_required` makes the flow require authentication;
/// - no allow rule matches: denied if `default_deny`, else allowed.
#[derive(Debug, Clone, Default)]
pub struct DirectionPolicy {
    pub default_deny: bool,
    pub deny: Vec<L4Match>,
    pub allow: Vec<AllowRule>,
}

/// Which remote identities a rule covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Remotes {
    /// Every identity (peer-less rule, or the `all` entity).
    Any,
    Only(BTreeSet<Identity>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Any,
}

/// `port` (and `endPort`): `start == 0` means every port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub protocol: Protocol,
    pub start: u16,
    pub end: u16,
}

/// Remote identities and ports of a rule; an empty `ports` list means all ports and protocols.
#[derive(Debug, Clone)]
pub struct L4Match {
    pub remotes: Remotes,
    pub ports: Vec<PortRange>,
    /// Where the rule came from (`CiliumNetworkPolicy default/deny spec.ingressDeny[0]`), shown
    /// in flow events of deny drops. Allow rules carry the same text in `AllowRule::origin`.
    pub origin: Arc<str>,
}

#[derive(Debug, Clone)]
pub struct AllowRule {
    pub l4: L4Match,
    /// `None`: allowed at L4, no HTTP restriction. `Some(rules)`: one of the rules must match
    /// (an empty rule matches everything: L7 visibility only).
    pub http: Option<Vec<HttpRule>>,
    /// `authentication.mode: required` (enforced once mTLS lands; until then traffic this rule
    /// covers is denied with `AuthRequired`, even when another rule also allows it).
    pub auth_required: bool,
    /// Where the rule came from (`CiliumNetworkPolicy default/rule1 spec.ingress[0]`), for
    /// flow events and `sluice policy get`.
    pub origin: Arc<str>,
}

/// One `rules.http[]` entry; every present field must match.
#[derive(Debug, Clone, Default)]
pub struct HttpRule {
    /// Full-string matches (Cilium/Envoy use RE2 full-match).
    pub method: Option<FieldPattern>,
    pub path: Option<FieldPattern>,
    pub host: Option<FieldPattern>,
    pub headers: Vec<HttpHeaderRule>,
}

/// What one field of an HTTP rule must be, as a whole.
#[derive(Debug, Clone)]
pub enum FieldPattern {
    /// A pattern without regex syntax: the field must equal it (nothing is compiled).
    Literal(String),
    Regex(FullMatch),
}

impl FieldPattern {
    /// Whether the whole of `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        match self {
            FieldPattern::Literal(literal) => literal == text,
            FieldPattern::Regex(regex) => regex.0.is_match(text),
        }
    }
}

/// A regex that matches whole fields only. `FullMatch::new` is its only constructor, so a
/// partial match on a path or host (a policy bypass) cannot reach the proxy, whoever builds
/// the tables.
#[derive(Debug, Clone)]
pub struct FullMatch(Regex);

impl FullMatch {
    /// `regex` itself when every match of it must start at the text's start and end at its end
    /// (the agent's `^(?:...)$` patterns, shared with its model), else `^(?:regex)$`. A pattern
    /// that cannot be wrapped (size limits) matches nothing: a rule that cannot be enforced as
    /// written denies rather than allows.
    pub fn new(regex: Regex) -> FullMatch {
        if spans_whole_text(regex.as_str()) {
            return FullMatch(regex);
        }
        let pattern = regex.as_str();
        match Regex::new(&format!("^(?:{pattern})$")) {
            Ok(anchored) => FullMatch(anchored),
            Err(error) => {
                tracing::error!(%pattern, %error, "policy regex cannot be anchored; it will never match");
                // An empty character class matches nothing; this constant pattern compiles.
                FullMatch(Regex::new("[^\\s\\S]").unwrap_or_else(|_| unreachable!("constant pattern")))
            }
        }
    }

    /// The anchored pattern's text.
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

/// Whether every match of `pattern` is anchored at both ends. Decided on the parsed pattern, not
/// its text: `^(?:a)|(?:.*)$` starts with `^(?:` and ends with `)$` but matches any text
/// ending anywhere after an `a`.
fn spans_whole_text(pattern: &str) -> bool {
    use regex_syntax::hir::Look;
    let Ok(hir) = regex_syntax::Parser::new().parse(pattern) else { return false };
    let properties = hir.properties();
    properties.look_set_prefix().contains(Look::Start) && properties.look_set_suffix().contains(Look::End)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn full(pattern: &str) -> FieldPattern {
        FieldPattern::Regex(FullMatch::new(Regex::new(pattern).expect("test pattern")))
    }

    #[test]
    fn a_full_match_never_matches_part_of_a_field() {
        let path = full("/public");
        assert!(path.is_match("/public"));
        assert!(!path.is_match("/public/x") && !path.is_match("/x/public"));
        // Looks anchored by its text, is not: wrapped, so only a whole `a` or a whole anything
        // matches, as the alternation says.
        let tricky = full("^(?:a)|(?:b)$");
        assert!(tricky.is_match("a") && tricky.is_match("b"));
        assert!(!tricky.is_match("ab") && !tricky.is_match("xb") && !tricky.is_match("ax"));
        // Multi-line anchors are not the text's ends.
        assert!(!full("(?m)^a$").is_match("a\nb"));
    }

    #[test]
    fn literals_compare_as_strings_never_as_regexes() {
        let literal = FieldPattern::Literal("/a.b".to_owned());
        assert!(literal.is_match("/a.b") && !literal.is_match("/axb"));
    }

    #[test]
    fn an_anchored_regex_is_kept_as_it_is() {
        let anchored = Regex::new("^(?:/api/.*)$").expect("test pattern");
        assert_eq!(FullMatch::new(anchored).as_str(), "^(?:/api/.*)$");
        assert_eq!(FullMatch::new(Regex::new("/api/.*").expect("test pattern")).as_str(), "^(?:/api/.*)$");
    }
}

/// A header requirement from `headers` ("Name: value" / "Name") or `headerMatches`.
#[derive(Debug, Clone)]
pub struct HttpHeaderRule {
    /// Lower-case.
    pub name: String,
    /// `None`: presence only.
    pub value: Option<String>,
    /// `None`: the header must match for the rule to match. `Some(action)`: the rule matches
    /// anyway and the action is applied to the request on mismatch.
    pub mismatch: Option<MismatchAction>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MismatchAction {
    Log,
    Add,
    Delete,
    Replace,
}
