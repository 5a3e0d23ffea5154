//! compile (pure), Envoy part: the model's Envoy listener/route/cluster subset -> proxy tables.
//!
//! The model already filled in Envoy's defaults and qualified names; this is a field-by-field
//! translation. The few model fields the proxy has no place for are reported as warnings.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_envoy_config::envoy as model;
use sluice_proxy::tables;

/// Envoy's default per-virtual-host request body buffer (1 MiB).
const DEFAULT_REQUEST_BODY_BUFFER: usize = 1024 * 1024;

/// Where a translated object came from, for warnings (`CiliumEnvoyConfig default/x`).
pub struct Context<'a> {
    pub origin: &'a str,
    pub warnings: &'a mut super::policy::Warnings,
}

impl Context<'_> {
    fn warn(&mut self, what: String) {
        self.warnings.insert(format!("{}: {what}", self.origin));
    }
}

pub fn http_connection_manager(
    hcm: &model::HttpConnectionManager,
    route_config: Arc<tables::RouteConfig>,
) -> tables::HttpConnectionManager {
    let idle = hcm.common_http_protocol_options.idle_timeout;
    tables::HttpConnectionManager {
        stat_prefix: hcm.stat_prefix.clone(),
        route_config,
        normalize_path: hcm.normalize_path,
        merge_slashes: hcm.merge_slashes,
        escaped_slashes: match hcm.path_with_escaped_slashes_action {
            model::EscapedSlashesAction::ImplementationSpecificDefault => {
                tables::EscapedSlashesAction::ImplementationSpecificDefault
            }
            model::EscapedSlashesAction::KeepUnchanged => tables::EscapedSlashesAction::KeepUnchanged,
            model::EscapedSlashesAction::RejectRequest => tables::EscapedSlashesAction::RejectRequest,
            model::EscapedSlashesAction::UnescapeAndRedirect => tables::EscapedSlashesAction::UnescapeAndRedirect,
            model::EscapedSlashesAction::UnescapeAndForward => tables::EscapedSlashesAction::UnescapeAndForward,
        },
        stream_idle_timeout: hcm.stream_idle_timeout,
        request_timeout: hcm.request_timeout,
        request_headers_timeout: hcm.request_headers_timeout,
        max_request_headers_bytes: hcm.max_request_headers_kb as usize * 1024,
        max_headers_count: hcm.common_http_protocol_options.max_headers_count as usize,
        idle_timeout: (!idle.is_zero()).then_some(idle),
        use_remote_address: hcm.use_remote_address,
        skip_xff_append: hcm.skip_xff_append,
        upgrades: hcm.upgrade_configs.iter().filter(|u| u.enabled).map(|u| u.upgrade_type.to_ascii_lowercase()).collect(),
    }
}

/// Envoy's HCM defaults, for Service frontends that no CiliumEnvoyConfig redirects; WebSocket
/// upgrades pass (subject to policy), as users of Cilium's L7 proxy expect since 1.18.
pub fn default_http_connection_manager(stat_prefix: &str, route_config: Arc<tables::RouteConfig>) -> tables::HttpConnectionManager {
    tables::HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        route_config,
        normalize_path: false,
        merge_slashes: false,
        escaped_slashes: tables::EscapedSlashesAction::ImplementationSpecificDefault,
        stream_idle_timeout: Some(Duration::from_secs(300)),
        request_timeout: None,
        request_headers_timeout: None,
        max_request_headers_bytes: 60 * 1024,
        max_headers_count: 100,
        idle_timeout: Some(Duration::from_secs(3600)),
        use_remote_address: false,
        skip_xff_append: false,
        upgrades: vec!["websocket".to_string()],
    }
}

/// A route config sending every request to `cluster` (a Service frontend without a CEC).
pub fn forward_all(name: &str, cluster: &str) -> tables::RouteConfig {
    tables::RouteConfig {
        name: name.to_string(),
        virtual_hosts: vec![tables::VirtualHost {
            name: name.to_string(),
            domains: vec!["*".to_string()],
            routes: vec![tables::Route {
                name: String::new(),
                matcher: tables::RouteMatch {
                    path: tables::PathMatch::Prefix("/".to_string()),
                    case_sensitive: true,
                    headers: Vec::new(),
                    query_parameters: Vec::new(),
                },
                action: tables::RouteAction::Forward(Arc::new(tables::ForwardAction {
                    clusters: vec![tables::WeightedCluster { name: cluster.to_string(), weight: 1 }],
                    rewrite: None,
                    host_rewrite_literal: None,
                    timeout: Some(Duration::from_secs(15)),
                    idle_timeout: None,
                    retry_policy: None,
                    mirrors: Vec::new(),
                    cluster_not_found_status: 503,
                })),
            }],
            retry_policy: None,
            request_body_buffer_limit: DEFAULT_REQUEST_BODY_BUFFER,
            include_request_attempt_count: false,
        }],
        request_headers_to_add: Vec::new(),
        request_headers_to_remove: Vec::new(),
        response_headers_to_add: Vec::new(),
        response_headers_to_remove: Vec::new(),
    }
}

fn header_pairs(options: &[model::HeaderValueOption]) -> Vec<(String, String)> {
    options.iter().map(|o| (o.key.clone(), o.value.clone())).collect()
}

pub fn route_config(config: &model::RouteConfiguration, cx: &mut Context<'_>) -> tables::RouteConfig {
    if config.request_headers_to_add.iter().chain(&config.response_headers_to_add).any(|o| {
        !matches!(o.append_action, model::AppendAction::AppendIfExistsOrAdd | model::AppendAction::OverwriteIfExistsOrAdd)
    }) {
        cx.warn(format!("route config {}: header append actions other than append/overwrite are applied as append", config.name));
    }
    tables::RouteConfig {
        name: config.name.clone(),
        virtual_hosts: config.virtual_hosts.iter().map(|v| virtual_host(v, cx)).collect(),
        request_headers_to_add: header_pairs(&config.request_headers_to_add),
        request_headers_to_remove: config.request_headers_to_remove.clone(),
        response_headers_to_add: header_pairs(&config.response_headers_to_add),
        response_headers_to_remove: config.response_headers_to_remove.clone(),
    }
}

fn virtual_host(vhost: &model::VirtualHost, cx: &mut Context<'_>) -> tables::VirtualHost {
    let has_headers = |add: &[model::HeaderValueOption], remove: &[String]| !add.is_empty() || !remove.is_empty();
    if has_headers(&vhost.request_headers_to_add, &vhost.request_headers_to_remove)
        || has_headers(&vhost.response_headers_to_add, &vhost.response_headers_to_remove)
    {
        cx.warn(format!("virtual host {}: header additions/removals are only supported on the route configuration; these are not applied", vhost.name));
    }
    tables::VirtualHost {
        name: vhost.name.clone(),
        domains: vhost.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        routes: vhost.routes.iter().map(|r| route(r, vhost, cx)).collect(),
        retry_policy: vhost.retry_policy.as_ref().map(retry_policy),
        request_body_buffer_limit: vhost.request_body_buffer_limit.map_or(DEFAULT_REQUEST_BODY_BUFFER, |l| l as usize),
        include_request_attempt_count: vhost.include_request_attempt_count,
    }
}

fn route(route: &model::Route, vhost: &model::VirtualHost, cx: &mut Context<'_>) -> tables::Route {
    let name = route.name.clone().unwrap_or_default();
    if !route.request_headers_to_add.is_empty()
        || !route.request_headers_to_remove.is_empty()
        || !route.response_headers_to_add.is_empty()
        || !route.response_headers_to_remove.is_empty()
    {
        cx.warn(format!("virtual host {} route {name:?}: per-route header changes are not applied", vhost.name));
    }
    tables::Route { name, matcher: route_match(&route.route_match), action: action(&route.action, vhost, cx) }
}

fn route_match(matcher: &model::RouteMatch) -> tables::RouteMatch {
    tables::RouteMatch {
        path: match &matcher.path {
            model::PathMatch::Prefix(p) => tables::PathMatch::Prefix(p.clone()),
            model::PathMatch::Path(p) => tables::PathMatch::Exact(p.clone()),
            model::PathMatch::SafeRegex(r) => tables::PathMatch::Regex(r.anchored.clone()),
            model::PathMatch::PathSeparatedPrefix(p) => tables::PathMatch::PathSeparatedPrefix(p.clone()),
        },
        case_sensitive: matcher.case_sensitive,
        headers: matcher.headers.iter().map(header_matcher).collect(),
        query_parameters: matcher
            .query_parameters
            .iter()
            .map(|q| tables::QueryParameterMatcher {
                name: q.name.clone(),
                value: match &q.rule {
                    model::QueryMatchRule::String(s) => Some(string_matcher(s)),
                    model::QueryMatchRule::Present => None,
                },
            })
            .collect(),
    }
}

fn header_matcher(h: &model::HeaderMatcher) -> tables::HeaderMatcher {
    tables::HeaderMatcher {
        name: h.name.to_ascii_lowercase(),
        rule: match &h.rule {
            model::HeaderMatchRule::String(s) => tables::HeaderMatchRule::String(string_matcher(s)),
            model::HeaderMatchRule::Present(p) => tables::HeaderMatchRule::Present(*p),
            model::HeaderMatchRule::Range { start, end } => tables::HeaderMatchRule::Range { start: *start, end: *end },
        },
        invert: h.invert_match,
        treat_missing_as_empty: h.treat_missing_header_as_empty,
    }
}

fn string_matcher(s: &model::StringMatcher) -> tables::StringMatcher {
    let ignore_case = s.ignore_case;
    match &s.pattern {
        model::StringPattern::Exact(v) => tables::StringMatcher::Exact { value: v.clone(), ignore_case },
        model::StringPattern::Prefix(v) => tables::StringMatcher::Prefix { value: v.clone(), ignore_case },
        model::StringPattern::Suffix(v) => tables::StringMatcher::Suffix { value: v.clone(), ignore_case },
        model::StringPattern::Contains(v) => tables::StringMatcher::Contains { value: v.clone(), ignore_case },
        model::StringPattern::SafeRegex(r) => tables::StringMatcher::Regex(r.anchored.clone()),
    }
}

fn action(action: &model::Action, vhost: &model::VirtualHost, cx: &mut Context<'_>) -> tables::RouteAction {
    match action {
        model::Action::Route(forward) => {
            let clusters = match &forward.cluster {
                model::ClusterSpecifier::Cluster(name) => vec![tables::WeightedCluster { name: name.clone(), weight: 1 }],
                model::ClusterSpecifier::Weighted(list) => list
                    .iter()
                    .map(|c| tables::WeightedCluster { name: c.name.clone(), weight: c.weight })
                    .collect(),
            };
            let rewrite = match (&forward.prefix_rewrite, &forward.regex_rewrite) {
                (Some(prefix), _) => Some(tables::PathRewrite::Prefix(prefix.clone())),
                (None, Some(regex)) => Some(tables::PathRewrite::Regex {
                    pattern: regex.pattern.unanchored.clone(),
                    substitution: regex.substitution.clone(),
                }),
                (None, None) => None,
            };
            let retry = forward.retry_policy.as_ref().or(vhost.retry_policy.as_ref()).map(retry_policy);
            tables::RouteAction::Forward(Arc::new(tables::ForwardAction {
                clusters,
                rewrite,
                host_rewrite_literal: forward.host_rewrite_literal.clone(),
                timeout: forward.timeout,
                idle_timeout: forward.idle_timeout,
                retry_policy: retry,
                mirrors: forward
                    .request_mirror_policies
                    .iter()
                    .map(|m| tables::MirrorPolicy { cluster: m.cluster.clone(), fraction_per_million: m.fraction_per_million })
                    .collect(),
                cluster_not_found_status: forward.cluster_not_found_response_code,
            }))
        }
        model::Action::DirectResponse(direct) => tables::RouteAction::DirectResponse {
            status: direct.status,
            body: Bytes::from(direct.body.clone().unwrap_or_default()),
        },
        model::Action::Redirect(redirect) => {
            let (path, prefix_rewrite) = match &redirect.path {
                None => (None, None),
                Some(model::RedirectPath::Path(p)) => (Some(p.clone()), None),
                Some(model::RedirectPath::Prefix(p)) => (None, Some(p.clone())),
                Some(model::RedirectPath::Regex(r)) => {
                    cx.warn(format!(
                        "virtual host {}: redirect regex_rewrite `{}` is not supported; the path is kept",
                        vhost.name, r.pattern.regex
                    ));
                    (None, None)
                }
            };
            tables::RouteAction::Redirect(tables::RedirectAction {
                scheme: redirect.scheme.clone(),
                host: redirect.host.clone(),
                port: redirect.port,
                path,
                prefix_rewrite,
                status: redirect.response_code,
                strip_query: redirect.strip_query,
            })
        }
    }
}

fn retry_policy(policy: &model::RetryPolicy) -> tables::RetryPolicy {
    let mut on = tables::RetryOn::default();
    for condition in &policy.retry_on {
        match condition {
            model::RetryOn::FiveXx => on.server_error_5xx = true,
            model::RetryOn::GatewayError => on.gateway_error = true,
            model::RetryOn::Reset => on.reset = true,
            model::RetryOn::ResetBeforeRequest => on.reset_before_request = true,
            model::RetryOn::ConnectFailure => on.connect_failure = true,
            model::RetryOn::Retriable4xx => on.retriable_4xx = true,
            model::RetryOn::RefusedStream => on.refused_stream = true,
            model::RetryOn::RetriableStatusCodes => on.retriable_status_codes = true,
            model::RetryOn::EnvoyRateLimited => on.envoy_ratelimited = true,
            model::RetryOn::GrpcCancelled => on.grpc_cancelled = true,
            model::RetryOn::GrpcDeadlineExceeded => on.grpc_deadline_exceeded = true,
            model::RetryOn::GrpcResourceExhausted => on.grpc_resource_exhausted = true,
            model::RetryOn::GrpcUnavailable => on.grpc_unavailable = true,
            model::RetryOn::GrpcInternal => on.grpc_internal = true,
        }
    }
    tables::RetryPolicy {
        retry_on: on,
        num_retries: policy.num_retries,
        per_try_timeout: policy.per_try_timeout,
        retriable_status_codes: policy.retriable_status_codes.clone(),
        base_interval: policy.base_interval,
        max_interval: policy.max_interval,
        avoid_previous_hosts: policy.avoid_previous_hosts,
        host_selection_retry_max_attempts: policy.host_selection_retry_max_attempts,
    }
}

/// A proxy cluster with the model's settings and the given endpoints.
pub fn cluster(cluster: &model::Cluster, endpoints: Vec<tables::Endpoint>) -> tables::Cluster {
    tables::Cluster {
        name: cluster.name.clone(),
        endpoints,
        lb_policy: match cluster.lb_policy {
            model::LbPolicy::RoundRobin => tables::LbPolicy::RoundRobin,
            model::LbPolicy::LeastRequest { choice_count } => tables::LbPolicy::LeastRequest { choice_count },
            model::LbPolicy::Random => tables::LbPolicy::Random,
            model::LbPolicy::RingHash { minimum_ring_size, maximum_ring_size } => {
                tables::LbPolicy::RingHash { minimum_ring_size, maximum_ring_size }
            }
            model::LbPolicy::Maglev { table_size } => tables::LbPolicy::Maglev { table_size },
        },
        connect_timeout: cluster.connect_timeout,
        circuit_breakers: tables::CircuitBreakers {
            max_connections: cluster.circuit_breakers.max_connections,
            max_pending_requests: cluster.circuit_breakers.max_pending_requests,
            max_requests: cluster.circuit_breakers.max_requests,
            max_retries: cluster.circuit_breakers.max_retries,
        },
        outlier_detection: cluster.outlier_detection.as_ref().map(|o| tables::OutlierDetection {
            consecutive_5xx: o.consecutive_5xx,
            enforcing_consecutive_5xx: o.enforcing_consecutive_5xx,
            consecutive_gateway_failure: o.consecutive_gateway_failure,
            enforcing_consecutive_gateway_failure: o.enforcing_consecutive_gateway_failure,
            split_external_local_origin_errors: o.split_external_local_origin_errors,
            consecutive_local_origin_failure: o.consecutive_local_origin_failure,
            enforcing_consecutive_local_origin_failure: o.enforcing_consecutive_local_origin_failure,
            interval: o.interval,
            base_ejection_time: o.base_ejection_time,
            max_ejection_time: o.max_ejection_time,
            max_ejection_time_jitter: o.max_ejection_time_jitter,
            max_ejection_percent: o.max_ejection_percent,
            always_eject_one_host: o.always_eject_one_host,
            enforcing_success_rate: o.enforcing_success_rate,
            success_rate_minimum_hosts: o.success_rate_minimum_hosts,
            success_rate_request_volume: o.success_rate_request_volume,
            success_rate_stdev_factor: o.success_rate_stdev_factor,
            enforcing_local_origin_success_rate: o.enforcing_local_origin_success_rate,
            failure_percentage_threshold: o.failure_percentage_threshold,
            enforcing_failure_percentage: o.enforcing_failure_percentage,
            enforcing_failure_percentage_local_origin: o.enforcing_failure_percentage_local_origin,
            failure_percentage_minimum_hosts: o.failure_percentage_minimum_hosts,
            failure_percentage_request_volume: o.failure_percentage_request_volume,
        }),
        protocol: if cluster.http2 { tables::UpstreamProtocol::Http2 } else { tables::UpstreamProtocol::Http1 },
    }
}

/// Envoy's cluster defaults, for Service clusters that no CiliumEnvoyConfig defines.
pub fn default_cluster(name: &str, endpoints: Vec<tables::Endpoint>) -> tables::Cluster {
    tables::Cluster {
        name: name.to_string(),
        endpoints,
        lb_policy: tables::LbPolicy::RoundRobin,
        connect_timeout: Duration::from_secs(5),
        circuit_breakers: tables::CircuitBreakers::default(),
        outlier_detection: None,
        protocol: tables::UpstreamProtocol::Http1,
    }
}

/// Endpoints of a load assignment (priority 0 only: the proxy has no priority failover).
pub fn load_assignment_endpoints(cla: &model::ClusterLoadAssignment, cx: &mut Context<'_>) -> Vec<tables::Endpoint> {
    if cla.endpoints.iter().any(|l| l.priority != 0) {
        cx.warn(format!("load assignment {}: endpoints with priority > 0 are not used", cla.cluster_name));
    }
    cla.endpoints
        .iter()
        .filter(|l| l.priority == 0)
        .flat_map(|l| &l.lb_endpoints)
        .map(|e| tables::Endpoint {
            addr: std::net::SocketAddr::new(e.address.address, e.address.port_value),
            weight: e.load_balancing_weight.max(1),
        })
        .collect()
}
