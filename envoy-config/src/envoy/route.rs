//! Envoy RouteConfiguration / VirtualHost / Route / RetryPolicy with Envoy's defaults
//! resolved: sources -> **model**.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use super::duration;
use super::matcher::{exactly_one, HeaderMatcher, QueryParameterMatcher, RegexMatcher};

/// Envoy `RouteConfiguration`. `name` and virtual host names are qualified (see crate docs).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfiguration {
    /// `name`, qualified as `ns/cec/name` (forced).
    #[serde(default)]
    pub name: String,
    /// `virtual_hosts`; domains are unique across them.
    #[serde(default)]
    pub virtual_hosts: Vec<VirtualHost>,
    /// `validate_clusters`; None = Envoy's default (true for an inline route_config, false
    /// for one loaded by RDS).
    #[serde(default)]
    pub validate_clusters: Option<bool>,
    /// `request_headers_to_add`.
    #[serde(default)]
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// `request_headers_to_remove`.
    #[serde(default)]
    pub request_headers_to_remove: Vec<String>,
    /// `response_headers_to_add`.
    #[serde(default)]
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// `response_headers_to_remove`.
    #[serde(default)]
    pub response_headers_to_remove: Vec<String>,
    /// `max_direct_response_body_size_bytes` (default 4096); bigger direct bodies are errors.
    #[serde(default = "default_max_direct_response_body")]
    pub max_direct_response_body_size_bytes: u32,
}

fn default_max_direct_response_body() -> u32 {
    4096
}

/// Envoy `VirtualHost`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawVirtualHost")]
pub struct VirtualHost {
    /// `name`, qualified as `ns/cec/name` (forced).
    pub name: String,
    /// `domains`, lower-cased; at most one `*`, no duplicates.
    pub domains: Vec<String>,
    /// `routes`, first match wins.
    pub routes: Vec<Route>,
    /// `retry_policy` used by routes that have none.
    pub retry_policy: Option<RetryPolicy>,
    /// `include_request_attempt_count`: send `x-envoy-attempt-count` upstream.
    pub include_request_attempt_count: bool,
    /// `request_body_buffer_limit`: bytes of request body kept for retries/mirrors
    /// (None = the listener's 1 MiB default).
    pub request_body_buffer_limit: Option<u32>,
    /// `request_headers_to_add`.
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// `request_headers_to_remove`.
    pub request_headers_to_remove: Vec<String>,
    /// `response_headers_to_add`.
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// `response_headers_to_remove`.
    pub response_headers_to_remove: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVirtualHost {
    name: String,
    domains: Vec<String>,
    #[serde(default)]
    routes: Vec<Route>,
    #[serde(default)]
    retry_policy: Option<RetryPolicy>,
    #[serde(default)]
    include_request_attempt_count: bool,
    #[serde(default)]
    request_body_buffer_limit: Option<u32>,
    #[serde(default)]
    request_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    request_headers_to_remove: Vec<String>,
    #[serde(default)]
    response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    response_headers_to_remove: Vec<String>,
}

impl TryFrom<RawVirtualHost> for VirtualHost {
    type Error = String;

    fn try_from(raw: RawVirtualHost) -> Result<VirtualHost, String> {
        if raw.domains.is_empty() {
            return Err(format!(
                "virtual host `{}` needs at least one domain",
                raw.name
            ));
        }
        let domains: Vec<String> = raw.domains.iter().map(|d| d.to_ascii_lowercase()).collect();
        let mut seen = BTreeSet::new();
        for domain in &domains {
            if domain.is_empty() {
                return Err(format!("virtual host `{}` has an empty domain", raw.name));
            }
            if !seen.insert(domain.as_str()) {
                return Err(format!(
                    "virtual host `{}` lists domain `{domain}` twice",
                    raw.name
                ));
            }
        }
        Ok(VirtualHost {
            name: raw.name,
            domains,
            routes: raw.routes,
            retry_policy: raw.retry_policy,
            include_request_attempt_count: raw.include_request_attempt_count,
            request_body_buffer_limit: raw.request_body_buffer_limit,
            request_headers_to_add: raw.request_headers_to_add,
            request_headers_to_remove: raw.request_headers_to_remove,
            response_headers_to_add: raw.response_headers_to_add,
            response_headers_to_remove: raw.response_headers_to_remove,
        })
    }
}

/// Envoy `HeaderValueOption` (header mutation).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawHeaderValueOption")]
pub struct HeaderValueOption {
    /// Header name, lower-cased.
    pub key: String,
    /// Value to set.
    pub value: String,
    /// `append_action` (or the deprecated `append` flag).
    pub append_action: AppendAction,
    /// `keep_empty_value`: add the header even when `value` is empty.
    pub keep_empty_value: bool,
}

/// Envoy `HeaderValueOption.HeaderAppendAction`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AppendAction {
    /// Append a value (the default).
    #[default]
    AppendIfExistsOrAdd,
    /// Add only if the header is absent.
    AddIfAbsent,
    /// Replace existing values, or add.
    OverwriteIfExistsOrAdd,
    /// Replace only if the header exists.
    OverwriteIfExists,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderValueOption {
    header: RawHeaderValue,
    #[serde(default)]
    append_action: Option<AppendAction>,
    #[serde(default)]
    append: Option<bool>,
    #[serde(default)]
    keep_empty_value: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderValue {
    key: String,
    #[serde(default)]
    value: String,
}

impl TryFrom<RawHeaderValueOption> for HeaderValueOption {
    type Error = String;

    fn try_from(raw: RawHeaderValueOption) -> Result<HeaderValueOption, String> {
        let append_action = match (raw.append_action, raw.append) {
            (Some(_), Some(_)) => {
                return Err("only one of append_action, append may be set".to_string())
            }
            (Some(action), None) => action,
            (None, Some(false)) => AppendAction::OverwriteIfExistsOrAdd,
            (None, Some(true)) | (None, None) => AppendAction::AppendIfExistsOrAdd,
        };
        if raw.header.key.is_empty() {
            return Err("header `key` must not be empty".to_string());
        }
        Ok(HeaderValueOption {
            key: raw.header.key.to_ascii_lowercase(),
            value: raw.header.value,
            append_action,
            keep_empty_value: raw.keep_empty_value,
        })
    }
}

/// Envoy `Route`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawRoute")]
pub struct Route {
    /// `name` (optional, not qualified).
    pub name: Option<String>,
    /// `match`.
    pub route_match: RouteMatch,
    /// `route` | `direct_response` | `redirect`.
    pub action: Action,
    /// `request_headers_to_add`.
    pub request_headers_to_add: Vec<HeaderValueOption>,
    /// `request_headers_to_remove`.
    pub request_headers_to_remove: Vec<String>,
    /// `response_headers_to_add`.
    pub response_headers_to_add: Vec<HeaderValueOption>,
    /// `response_headers_to_remove`.
    pub response_headers_to_remove: Vec<String>,
}

/// What a matched route does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// `route`: forward upstream.
    Route(RouteAction),
    /// `direct_response`: answer locally.
    DirectResponse(DirectResponse),
    /// `redirect`: answer with a redirect.
    Redirect(Redirect),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    #[serde(default)]
    name: Option<String>,
    #[serde(rename = "match")]
    route_match: RouteMatch,
    #[serde(default)]
    route: Option<RouteAction>,
    #[serde(default)]
    direct_response: Option<DirectResponse>,
    #[serde(default)]
    redirect: Option<Redirect>,
    #[serde(default)]
    request_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    request_headers_to_remove: Vec<String>,
    #[serde(default)]
    response_headers_to_add: Vec<HeaderValueOption>,
    #[serde(default)]
    response_headers_to_remove: Vec<String>,
}

impl TryFrom<RawRoute> for Route {
    type Error = String;

    fn try_from(raw: RawRoute) -> Result<Route, String> {
        let mut actions = Vec::new();
        actions.extend(raw.route.map(Action::Route));
        actions.extend(raw.direct_response.map(Action::DirectResponse));
        actions.extend(raw.redirect.map(Action::Redirect));
        let action = exactly_one(actions, "route, direct_response, redirect")?;
        Ok(Route {
            name: raw.name,
            route_match: raw.route_match,
            action,
            request_headers_to_add: raw.request_headers_to_add,
            request_headers_to_remove: raw.request_headers_to_remove,
            response_headers_to_add: raw.response_headers_to_add,
            response_headers_to_remove: raw.response_headers_to_remove,
        })
    }
}

/// The path part of a [`RouteMatch`].
#[derive(Debug, Clone, PartialEq)]
pub enum PathMatch {
    /// `prefix` of the whole `:path`, query included.
    Prefix(String),
    /// `path`: exact match of the path without its query.
    Path(String),
    /// `safe_regex`: full match of the path without its query (case_sensitive ignored).
    SafeRegex(RegexMatcher),
    /// `path_separated_prefix`: `P`, `P/...` or `P?...`.
    PathSeparatedPrefix(String),
}

/// Envoy `RouteMatch`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawRouteMatch")]
pub struct RouteMatch {
    /// The path test.
    pub path: PathMatch,
    /// `case_sensitive` (default true; prefix/path only).
    pub case_sensitive: bool,
    /// `headers`: all must match.
    pub headers: Vec<HeaderMatcher>,
    /// `query_parameters`: all must match.
    pub query_parameters: Vec<QueryParameterMatcher>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteMatch {
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    safe_regex: Option<RegexMatcher>,
    #[serde(default)]
    path_separated_prefix: Option<String>,
    #[serde(default)]
    case_sensitive: Option<bool>,
    #[serde(default)]
    headers: Vec<HeaderMatcher>,
    #[serde(default)]
    query_parameters: Vec<QueryParameterMatcher>,
}

impl TryFrom<RawRouteMatch> for RouteMatch {
    type Error = String;

    fn try_from(raw: RawRouteMatch) -> Result<RouteMatch, String> {
        let mut paths = Vec::new();
        paths.extend(raw.prefix.map(PathMatch::Prefix));
        paths.extend(raw.path.map(PathMatch::Path));
        paths.extend(raw.safe_regex.map(PathMatch::SafeRegex));
        if let Some(prefix) = raw.path_separated_prefix {
            if prefix.contains(['?', '#']) || prefix.ends_with('/') {
                return Err(format!(
                    "path_separated_prefix `{prefix}` must not contain `?` or `#` nor end with `/`"
                ));
            }
            paths.push(PathMatch::PathSeparatedPrefix(prefix));
        }
        let path = exactly_one(paths, "prefix, path, safe_regex, path_separated_prefix")?;
        Ok(RouteMatch {
            path,
            case_sensitive: raw.case_sensitive.unwrap_or(true),
            headers: raw.headers,
            query_parameters: raw.query_parameters,
        })
    }
}

/// Where a [`RouteAction`] sends the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterSpecifier {
    /// `cluster`, qualified without force (`c` -> `ns/cec/c`; `ns/svc` passes through).
    Cluster(String),
    /// `weighted_clusters.clusters`; weights sum to > 0 (`total_weight` is ignored, as Envoy does).
    Weighted(Vec<WeightedCluster>),
}

/// One `weighted_clusters.clusters[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    /// `name` of the cluster, qualified without force.
    pub name: String,
    /// `weight` (0 = never picked).
    #[serde(default)]
    pub weight: u32,
}

/// Envoy `RouteAction`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawRouteAction")]
pub struct RouteAction {
    /// Target cluster(s).
    pub cluster: ClusterSpecifier,
    /// `prefix_rewrite`.
    pub prefix_rewrite: Option<String>,
    /// `regex_rewrite`.
    pub regex_rewrite: Option<RegexRewrite>,
    /// `host_rewrite_literal`.
    pub host_rewrite_literal: Option<String>,
    /// `timeout`: default 15 s; None when `0s` disables it.
    pub timeout: Option<Duration>,
    /// `idle_timeout`: the stream idle timeout of this route's requests in place of the HCM's
    /// `stream_idle_timeout`; `0s` turns it off for them, the HCM's included. None: unset.
    pub idle_timeout: Option<Duration>,
    /// `retry_policy` (replaces the virtual host's entirely).
    pub retry_policy: Option<RetryPolicy>,
    /// `request_mirror_policies`.
    pub request_mirror_policies: Vec<MirrorPolicy>,
    /// `cluster_not_found_response_code` (default 503).
    pub cluster_not_found_response_code: u16,
}

/// Envoy `RegexMatchAndSubstitute`: every match of `pattern` in the path (query excluded)
/// is replaced by `substitution` (`\1` style groups).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    /// `pattern`.
    pub pattern: RegexMatcher,
    /// `substitution`.
    pub substitution: String,
}

/// One `request_mirror_policies[]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawMirrorPolicy")]
pub struct MirrorPolicy {
    /// `cluster` to shadow to, qualified without force.
    pub cluster: String,
    /// Share of requests mirrored, in millionths (`runtime_fraction.default_value`; default all).
    pub fraction_per_million: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMirrorPolicy {
    cluster: String,
    #[serde(default)]
    runtime_fraction: Option<RawRuntimeFraction>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuntimeFraction {
    default_value: RawFractionalPercent,
    /// Names a runtime override; sluice has no runtime layer, so the default value applies.
    #[serde(default, rename = "runtime_key")]
    _runtime_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFractionalPercent {
    #[serde(default)]
    numerator: u32,
    #[serde(default)]
    denominator: Denominator,
}

#[derive(Deserialize, Default, Clone, Copy)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum Denominator {
    #[default]
    Hundred,
    TenThousand,
    Million,
}

impl TryFrom<RawMirrorPolicy> for MirrorPolicy {
    type Error = String;

    fn try_from(raw: RawMirrorPolicy) -> Result<MirrorPolicy, String> {
        let fraction_per_million = match raw.runtime_fraction {
            None => 1_000_000,
            Some(fraction) => {
                let scale = match fraction.default_value.denominator {
                    Denominator::Hundred => 10_000,
                    Denominator::TenThousand => 100,
                    Denominator::Million => 1,
                };
                fraction
                    .default_value
                    .numerator
                    .saturating_mul(scale)
                    .min(1_000_000)
            }
        };
        Ok(MirrorPolicy {
            cluster: raw.cluster,
            fraction_per_million,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRouteAction {
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    weighted_clusters: Option<RawWeightedClusters>,
    #[serde(default)]
    prefix_rewrite: Option<String>,
    #[serde(default)]
    regex_rewrite: Option<RegexRewrite>,
    #[serde(default)]
    host_rewrite_literal: Option<String>,
    #[serde(default, deserialize_with = "duration::optional")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::optional")]
    idle_timeout: Option<Duration>,
    #[serde(default)]
    retry_policy: Option<RetryPolicy>,
    #[serde(default)]
    request_mirror_policies: Vec<MirrorPolicy>,
    #[serde(default)]
    cluster_not_found_response_code: ClusterNotFoundCode,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum ClusterNotFoundCode {
    #[default]
    ServiceUnavailable,
    NotFound,
    InternalServerError,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWeightedClusters {
    clusters: Vec<WeightedCluster>,
    /// Deprecated; Envoy ignores it and uses the sum of the weights.
    #[serde(default, rename = "total_weight")]
    _total_weight: Option<u32>,
}

const DEFAULT_ROUTE_TIMEOUT: Duration = Duration::from_secs(15);

impl TryFrom<RawRouteAction> for RouteAction {
    type Error = String;

    fn try_from(raw: RawRouteAction) -> Result<RouteAction, String> {
        let mut specifiers = Vec::new();
        specifiers.extend(raw.cluster.map(ClusterSpecifier::Cluster));
        if let Some(weighted) = raw.weighted_clusters {
            if weighted.clusters.is_empty() {
                return Err("weighted_clusters.clusters must not be empty".to_string());
            }
            let total: u64 = weighted.clusters.iter().map(|c| u64::from(c.weight)).sum();
            if total == 0 || total > u64::from(u32::MAX) {
                return Err(format!(
                    "weighted_clusters weights must sum to 1..=4294967295, not {total}"
                ));
            }
            specifiers.push(ClusterSpecifier::Weighted(weighted.clusters));
        }
        let cluster = exactly_one(specifiers, "cluster, weighted_clusters")?;
        if raw.prefix_rewrite.is_some() && raw.regex_rewrite.is_some() {
            return Err("only one of prefix_rewrite, regex_rewrite may be set".to_string());
        }
        let timeout = match raw.timeout {
            None => Some(DEFAULT_ROUTE_TIMEOUT),
            Some(zero) if zero.is_zero() => None,
            Some(timeout) => Some(timeout),
        };
        Ok(RouteAction {
            cluster,
            prefix_rewrite: raw.prefix_rewrite,
            regex_rewrite: raw.regex_rewrite,
            host_rewrite_literal: raw.host_rewrite_literal,
            timeout,
            idle_timeout: raw.idle_timeout,
            retry_policy: raw.retry_policy,
            request_mirror_policies: raw.request_mirror_policies,
            cluster_not_found_response_code: match raw.cluster_not_found_response_code {
                ClusterNotFoundCode::ServiceUnavailable => 503,
                ClusterNotFoundCode::NotFound => 404,
                ClusterNotFoundCode::InternalServerError => 500,
            },
        })
    }
}

/// Envoy `DirectResponseAction`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawDirectResponse")]
pub struct DirectResponse {
    /// `status` (200-599).
    pub status: u16,
    /// `body.inline_string`.
    pub body: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectResponse {
    status: u16,
    #[serde(default)]
    body: Option<RawDataSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataSource {
    inline_string: String,
}

impl TryFrom<RawDirectResponse> for DirectResponse {
    type Error = String;

    fn try_from(raw: RawDirectResponse) -> Result<DirectResponse, String> {
        if !(200..=599).contains(&raw.status) {
            return Err(format!(
                "direct_response status {} is outside 200..=599",
                raw.status
            ));
        }
        Ok(DirectResponse {
            status: raw.status,
            body: raw.body.map(|b| b.inline_string),
        })
    }
}

/// How a [`Redirect`] rewrites the path.
#[derive(Debug, Clone, PartialEq)]
pub enum RedirectPath {
    /// `path_redirect`: replace the whole path.
    Path(String),
    /// `prefix_rewrite`: replace the matched prefix.
    Prefix(String),
    /// `regex_rewrite`.
    Regex(RegexRewrite),
}

/// Envoy `RedirectAction`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawRedirect")]
pub struct Redirect {
    /// `scheme_redirect`, or `https` for `https_redirect: true`.
    pub scheme: Option<String>,
    /// `host_redirect`.
    pub host: Option<String>,
    /// `port_redirect`.
    pub port: Option<u16>,
    /// Path rewrite, if any.
    pub path: Option<RedirectPath>,
    /// `response_code` as a status (default 301).
    pub response_code: u16,
    /// `strip_query` (default false).
    pub strip_query: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRedirect {
    #[serde(default)]
    https_redirect: bool,
    #[serde(default)]
    scheme_redirect: Option<String>,
    #[serde(default)]
    host_redirect: Option<String>,
    #[serde(default)]
    port_redirect: Option<u16>,
    #[serde(default)]
    path_redirect: Option<String>,
    #[serde(default)]
    prefix_rewrite: Option<String>,
    #[serde(default)]
    regex_rewrite: Option<RegexRewrite>,
    #[serde(default)]
    response_code: RedirectCode,
    #[serde(default)]
    strip_query: bool,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum RedirectCode {
    #[default]
    MovedPermanently,
    Found,
    SeeOther,
    TemporaryRedirect,
    PermanentRedirect,
}

impl TryFrom<RawRedirect> for Redirect {
    type Error = String;

    fn try_from(raw: RawRedirect) -> Result<Redirect, String> {
        let scheme = match (raw.https_redirect, raw.scheme_redirect) {
            (true, Some(_)) => {
                return Err("only one of https_redirect, scheme_redirect may be set".to_string())
            }
            (true, None) => Some("https".to_string()),
            (false, scheme) => scheme,
        };
        let mut paths = Vec::new();
        paths.extend(raw.path_redirect.map(RedirectPath::Path));
        paths.extend(raw.prefix_rewrite.map(RedirectPath::Prefix));
        paths.extend(raw.regex_rewrite.map(RedirectPath::Regex));
        let path = match paths.len() {
            0 => None,
            _ => Some(exactly_one(
                paths,
                "path_redirect, prefix_rewrite, regex_rewrite",
            )?),
        };
        Ok(Redirect {
            scheme,
            host: raw.host_redirect,
            port: raw.port_redirect,
            path,
            response_code: match raw.response_code {
                RedirectCode::MovedPermanently => 301,
                RedirectCode::Found => 302,
                RedirectCode::SeeOther => 303,
                RedirectCode::TemporaryRedirect => 307,
                RedirectCode::PermanentRedirect => 308,
            },
            strip_query: raw.strip_query,
        })
    }
}

/// One `retry_on` condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RetryOn {
    /// `5xx`: any 5xx response or no response (includes connect-failure, refused-stream).
    FiveXx,
    /// `gateway-error`: 502/503/504 or upstream reset.
    GatewayError,
    /// `reset`: no response at all.
    Reset,
    /// `reset-before-request`: reset before the request was fully sent.
    ResetBeforeRequest,
    /// `connect-failure`.
    ConnectFailure,
    /// `retriable-4xx`: 409.
    Retriable4xx,
    /// `refused-stream`: HTTP/2 REFUSED_STREAM.
    RefusedStream,
    /// `retriable-status-codes`: a status in `retriable_status_codes`.
    RetriableStatusCodes,
    /// `envoy-ratelimited`: the response carries `x-envoy-ratelimited`.
    EnvoyRateLimited,
    /// gRPC `cancelled` (grpc-status 1 in the response headers).
    GrpcCancelled,
    /// gRPC `deadline-exceeded` (4).
    GrpcDeadlineExceeded,
    /// gRPC `resource-exhausted` (8).
    GrpcResourceExhausted,
    /// gRPC `unavailable` (14).
    GrpcUnavailable,
    /// gRPC `internal` (13).
    GrpcInternal,
}

impl RetryOn {
    /// Parses one condition as Envoy spells it.
    pub fn from_name(name: &str) -> Option<RetryOn> {
        Some(match name {
            "5xx" => RetryOn::FiveXx,
            "gateway-error" => RetryOn::GatewayError,
            "reset" => RetryOn::Reset,
            "reset-before-request" => RetryOn::ResetBeforeRequest,
            "connect-failure" => RetryOn::ConnectFailure,
            "retriable-4xx" => RetryOn::Retriable4xx,
            "refused-stream" => RetryOn::RefusedStream,
            "retriable-status-codes" => RetryOn::RetriableStatusCodes,
            "envoy-ratelimited" => RetryOn::EnvoyRateLimited,
            "cancelled" => RetryOn::GrpcCancelled,
            "deadline-exceeded" => RetryOn::GrpcDeadlineExceeded,
            "resource-exhausted" => RetryOn::GrpcResourceExhausted,
            "unavailable" => RetryOn::GrpcUnavailable,
            "internal" => RetryOn::GrpcInternal,
            _ => return None,
        })
    }
}

/// Envoy `RetryPolicy` with defaults resolved.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawRetryPolicy")]
pub struct RetryPolicy {
    /// `retry_on`, parsed from the comma list.
    pub retry_on: BTreeSet<RetryOn>,
    /// `num_retries` (or its alias `max_retries`), default 1.
    pub num_retries: u32,
    /// `per_try_timeout`; None = only the route timeout limits attempts.
    pub per_try_timeout: Option<Duration>,
    /// `retriable_status_codes`.
    pub retriable_status_codes: Vec<u16>,
    /// `retry_back_off.base_interval`, default 25 ms.
    pub base_interval: Duration,
    /// `retry_back_off.max_interval`, default 10 × base.
    pub max_interval: Duration,
    /// `retry_host_predicate` contains `previous_hosts`: avoid hosts already tried.
    pub avoid_previous_hosts: bool,
    /// `host_selection_retry_max_attempts`, default 1.
    pub host_selection_retry_max_attempts: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetryPolicy {
    #[serde(default)]
    retry_on: String,
    #[serde(default)]
    num_retries: Option<u32>,
    #[serde(default)]
    max_retries: Option<u32>,
    #[serde(default, deserialize_with = "duration::optional")]
    per_try_timeout: Option<Duration>,
    #[serde(default)]
    retriable_status_codes: Vec<u16>,
    #[serde(default)]
    retry_back_off: Option<RawBackOff>,
    #[serde(default)]
    retry_host_predicate: Vec<RawRetryHostPredicate>,
    #[serde(default)]
    host_selection_retry_max_attempts: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackOff {
    #[serde(deserialize_with = "duration::required")]
    base_interval: Duration,
    #[serde(default, deserialize_with = "duration::optional")]
    max_interval: Option<Duration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetryHostPredicate {
    name: String,
    #[serde(default)]
    typed_config: Option<RawTypeOnly>,
}

/// An `Any` whose message has no fields sluice reads: only `@type` is allowed.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTypeOnly {
    #[serde(rename = "@type")]
    pub(crate) type_url: String,
}

const PREVIOUS_HOSTS: &str = "envoy.retry_host_predicates.previous_hosts";
const PREVIOUS_HOSTS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate";

impl TryFrom<RawRetryPolicy> for RetryPolicy {
    type Error = String;

    fn try_from(raw: RawRetryPolicy) -> Result<RetryPolicy, String> {
        let mut retry_on = BTreeSet::new();
        for name in raw
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|n| !n.is_empty())
        {
            let condition = RetryOn::from_name(name).ok_or_else(|| {
                format!(
                    "retry_on: unsupported condition `{name}` (supported: 5xx, gateway-error, reset, \
                     reset-before-request, connect-failure, retriable-4xx, refused-stream, \
                     retriable-status-codes, envoy-ratelimited, cancelled, deadline-exceeded, \
                     resource-exhausted, unavailable, internal)"
                )
            })?;
            retry_on.insert(condition);
        }
        let num_retries = match (raw.num_retries, raw.max_retries) {
            (Some(_), Some(_)) => {
                return Err("only one of num_retries, max_retries may be set".to_string())
            }
            (Some(n), None) | (None, Some(n)) => n,
            (None, None) => 1,
        };
        for code in &raw.retriable_status_codes {
            if !(100..=599).contains(code) {
                return Err(format!(
                    "retriable_status_codes: {code} is not an HTTP status"
                ));
            }
        }
        let (base_interval, max_interval) = match raw.retry_back_off {
            None => (Duration::from_millis(25), Duration::from_millis(250)),
            Some(back_off) => {
                // Envoy rounds sub-millisecond bases up to 1 ms.
                let base = back_off.base_interval.max(Duration::from_millis(1));
                let max = match back_off.max_interval {
                    Some(max) => max,
                    None => base
                        .checked_mul(10)
                        .ok_or_else(|| "retry_back_off.base_interval is too large".to_string())?,
                };
                if max < base {
                    return Err(
                        "retry_back_off.max_interval must not be below base_interval".to_string(),
                    );
                }
                (base, max)
            }
        };
        let mut avoid_previous_hosts = false;
        for predicate in raw.retry_host_predicate {
            if predicate.name != PREVIOUS_HOSTS {
                return Err(format!(
                    "retry_host_predicate `{}` is not supported (supported: {PREVIOUS_HOSTS})",
                    predicate.name
                ));
            }
            if let Some(config) = predicate.typed_config {
                if config.type_url != PREVIOUS_HOSTS_TYPE {
                    return Err(format!(
                        "retry_host_predicate typed_config must be {PREVIOUS_HOSTS_TYPE}"
                    ));
                }
            }
            avoid_previous_hosts = true;
        }
        Ok(RetryPolicy {
            retry_on,
            num_retries,
            per_try_timeout: raw.per_try_timeout.filter(|t| !t.is_zero()),
            retriable_status_codes: raw.retriable_status_codes,
            base_interval,
            max_interval,
            avoid_previous_hosts,
            host_selection_retry_max_attempts: raw.host_selection_retry_max_attempts.unwrap_or(1),
        })
    }
}
