//! Envoy Cluster and ClusterLoadAssignment with defaults resolved: sources -> **model**.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::duration;
use super::listener::{RawAddress, SocketAddress};
use super::RawConfigSource;
use crate::error::{from_value, join, FieldError};

/// How a cluster finds its hosts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Discovery {
    /// `STATIC`: hosts from `load_assignment`.
    Static,
    /// `EDS`: hosts from the agent (Cilium-style `ns/svc` or `ns/svc:port` assignments).
    Eds {
        /// `eds_cluster_config.service_name`; None = the cluster's own name.
        service_name: Option<String>,
    },
}

/// `lb_policy` with its policy-specific settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LbPolicy {
    /// `ROUND_ROBIN` (default).
    RoundRobin,
    /// `LEAST_REQUEST` with `least_request_lb_config.choice_count` (default 2).
    LeastRequest {
        /// Hosts sampled per pick.
        choice_count: u32,
    },
    /// `RANDOM`.
    Random,
    /// `RING_HASH` with `ring_hash_lb_config` sizes (defaults 1024 and 8M).
    RingHash {
        /// `minimum_ring_size`.
        minimum_ring_size: u64,
        /// `maximum_ring_size`.
        maximum_ring_size: u64,
    },
    /// `MAGLEV` with `maglev_lb_config.table_size` (default 65537).
    Maglev {
        /// Lookup table size (prime).
        table_size: u64,
    },
}

/// Circuit-breaker thresholds of the DEFAULT priority (Envoy's defaults when absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Thresholds {
    /// `max_connections` (1024).
    pub max_connections: u32,
    /// `max_pending_requests` (1024).
    pub max_pending_requests: u32,
    /// `max_requests` (1024).
    pub max_requests: u32,
    /// `max_retries` concurrent retries (3).
    pub max_retries: u32,
}

impl Default for Thresholds {
    fn default() -> Thresholds {
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// `outlier_detection`, every field with Envoy's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// `consecutive_5xx` (5). Protobuf's JSON name `consecutive5xx` has no case change to undo.
    #[serde(default = "d5", alias = "consecutive5xx")]
    pub consecutive_5xx: u32,
    /// `interval` between ejection sweeps (10 s).
    #[serde(default = "d10s", deserialize_with = "duration::required")]
    pub interval: Duration,
    /// `base_ejection_time` (30 s), multiplied by the times a host was ejected.
    #[serde(default = "d30s", deserialize_with = "duration::required")]
    pub base_ejection_time: Duration,
    /// `max_ejection_time` (300 s).
    #[serde(default = "d300s", deserialize_with = "duration::required")]
    pub max_ejection_time: Duration,
    /// `max_ejection_time_jitter` (0).
    #[serde(default, deserialize_with = "duration::required")]
    pub max_ejection_time_jitter: Duration,
    /// `max_ejection_percent` (10).
    #[serde(default = "d10")]
    pub max_ejection_percent: u32,
    /// `enforcing_consecutive_5xx` (100).
    #[serde(default = "d100", alias = "enforcing_consecutive5xx")]
    pub enforcing_consecutive_5xx: u32,
    /// `enforcing_success_rate` (100).
    #[serde(default = "d100")]
    pub enforcing_success_rate: u32,
    /// `success_rate_minimum_hosts` (5).
    #[serde(default = "d5")]
    pub success_rate_minimum_hosts: u32,
    /// `success_rate_request_volume` (100).
    #[serde(default = "d100")]
    pub success_rate_request_volume: u32,
    /// `success_rate_stdev_factor` (1900 = 1.9 σ).
    #[serde(default = "d1900")]
    pub success_rate_stdev_factor: u32,
    /// `consecutive_gateway_failure` (5).
    #[serde(default = "d5")]
    pub consecutive_gateway_failure: u32,
    /// `enforcing_consecutive_gateway_failure` (0).
    #[serde(default)]
    pub enforcing_consecutive_gateway_failure: u32,
    /// `split_external_local_origin_errors` (false).
    #[serde(default)]
    pub split_external_local_origin_errors: bool,
    /// `consecutive_local_origin_failure` (5).
    #[serde(default = "d5")]
    pub consecutive_local_origin_failure: u32,
    /// `enforcing_consecutive_local_origin_failure` (100).
    #[serde(default = "d100")]
    pub enforcing_consecutive_local_origin_failure: u32,
    /// `enforcing_local_origin_success_rate` (100).
    #[serde(default = "d100")]
    pub enforcing_local_origin_success_rate: u32,
    /// `failure_percentage_threshold` (85).
    #[serde(default = "d85")]
    pub failure_percentage_threshold: u32,
    /// `enforcing_failure_percentage` (0).
    #[serde(default)]
    pub enforcing_failure_percentage: u32,
    /// `enforcing_failure_percentage_local_origin` (0).
    #[serde(default)]
    pub enforcing_failure_percentage_local_origin: u32,
    /// `failure_percentage_minimum_hosts` (5).
    #[serde(default = "d5")]
    pub failure_percentage_minimum_hosts: u32,
    /// `failure_percentage_request_volume` (50).
    #[serde(default = "d50")]
    pub failure_percentage_request_volume: u32,
    /// `successful_active_health_check_uneject_host` (true).
    #[serde(default = "dtrue")]
    pub successful_active_health_check_uneject_host: bool,
    /// `always_eject_one_host` (false).
    #[serde(default)]
    pub always_eject_one_host: bool,
}

fn d5() -> u32 {
    5
}
fn d10() -> u32 {
    10
}
fn d50() -> u32 {
    50
}
fn d85() -> u32 {
    85
}
fn d100() -> u32 {
    100
}
fn d1900() -> u32 {
    1900
}
fn dtrue() -> bool {
    true
}
fn d10s() -> Duration {
    Duration::from_secs(10)
}
fn d30s() -> Duration {
    Duration::from_secs(30)
}
fn d300s() -> Duration {
    Duration::from_secs(300)
}

/// An Envoy `Cluster`. Its name is qualified without force: `echo` becomes `ns/cec/echo`,
/// `default/echo` passes through.
#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    /// `name`.
    pub name: String,
    /// `type` (+ `eds_cluster_config`).
    pub discovery: Discovery,
    /// `lb_policy`.
    pub lb_policy: LbPolicy,
    /// `connect_timeout` (default 5 s).
    pub connect_timeout: Duration,
    /// `circuit_breakers.thresholds` of priority DEFAULT (HIGH-priority thresholds are
    /// accepted but unused: no sluice route has HIGH priority).
    pub circuit_breakers: Thresholds,
    /// `outlier_detection`; None = hosts are never ejected.
    pub outlier_detection: Option<OutlierDetection>,
    /// Upstream speaks HTTP/2 (`http2_protocol_options` or `typed_extension_protocol_options`
    /// HttpProtocolOptions `explicit_http_config.http2_protocol_options`).
    pub http2: bool,
    /// `load_assignment` (STATIC clusters).
    pub load_assignment: Option<ClusterLoadAssignment>,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB).
    pub per_connection_buffer_limit_bytes: u32,
}

/// An Envoy `ClusterLoadAssignment`. `cluster_name` is qualified like a cluster name.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterLoadAssignment {
    /// `cluster_name`.
    pub cluster_name: String,
    /// `endpoints` (localities).
    #[serde(default)]
    pub endpoints: Vec<LocalityLbEndpoints>,
}

/// One locality of a [`ClusterLoadAssignment`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalityLbEndpoints {
    /// `lb_endpoints`.
    #[serde(default)]
    pub lb_endpoints: Vec<LbEndpoint>,
    /// `load_balancing_weight` of the locality (only used with locality-weighted LB).
    #[serde(default)]
    pub load_balancing_weight: Option<u32>,
    /// `priority` (0 = highest).
    #[serde(default)]
    pub priority: u32,
}

/// One host of a locality.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawLbEndpoint")]
pub struct LbEndpoint {
    /// `endpoint.address.socket_address`.
    pub address: SocketAddress,
    /// `load_balancing_weight` (default 1).
    pub load_balancing_weight: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLbEndpoint {
    endpoint: RawEndpoint,
    #[serde(default)]
    load_balancing_weight: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    address: RawAddress,
}

impl TryFrom<RawLbEndpoint> for LbEndpoint {
    type Error = String;

    fn try_from(raw: RawLbEndpoint) -> Result<LbEndpoint, String> {
        let weight = raw.load_balancing_weight.unwrap_or(1);
        if weight == 0 {
            return Err("load_balancing_weight must be at least 1".to_string());
        }
        Ok(LbEndpoint {
            address: raw.endpoint.address.socket_address,
            load_balancing_weight: weight,
        })
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum RawDiscoveryType {
    Static,
    StrictDns,
    LogicalDns,
    Eds,
    OriginalDst,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
enum RawLbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    RingHash,
    Random,
    Maglev,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    name: String,
    #[serde(default, rename = "type")]
    discovery_type: Option<RawDiscoveryType>,
    #[serde(default)]
    eds_cluster_config: Option<RawEdsClusterConfig>,
    #[serde(default)]
    lb_policy: RawLbPolicy,
    #[serde(default)]
    least_request_lb_config: Option<RawLeastRequest>,
    #[serde(default)]
    ring_hash_lb_config: Option<RawRingHash>,
    #[serde(default)]
    maglev_lb_config: Option<RawMaglev>,
    #[serde(default, deserialize_with = "duration::optional")]
    connect_timeout: Option<Duration>,
    #[serde(default)]
    circuit_breakers: Option<RawCircuitBreakers>,
    #[serde(default)]
    outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    http2_protocol_options: Option<RawHttp2Options>,
    #[serde(default)]
    typed_extension_protocol_options: BTreeMap<String, serde_json::Value>,
    #[serde(default)]
    load_assignment: Option<ClusterLoadAssignment>,
    #[serde(default)]
    per_connection_buffer_limit_bytes: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEdsClusterConfig {
    #[serde(default)]
    service_name: Option<String>,
    /// Accepted in its ADS form only: the agent is the one EDS source.
    #[serde(default, rename = "eds_config")]
    _eds_config: Option<RawConfigSource>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLeastRequest {
    #[serde(default)]
    choice_count: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRingHash {
    #[serde(default)]
    minimum_ring_size: Option<u64>,
    #[serde(default)]
    maximum_ring_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMaglev {
    #[serde(default)]
    table_size: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCircuitBreakers {
    #[serde(default)]
    thresholds: Vec<RawThresholds>,
}

#[derive(Deserialize, Default, PartialEq)]
#[serde(rename_all = "UPPERCASE")]
enum RawPriority {
    #[default]
    Default,
    High,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawThresholds {
    #[serde(default)]
    priority: RawPriority,
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default)]
    max_pending_requests: Option<u32>,
    #[serde(default)]
    max_requests: Option<u32>,
    #[serde(default)]
    max_retries: Option<u32>,
}

/// `Http2ProtocolOptions`: sluice uses its own HTTP/2 settings, so only an empty message is
/// accepted (any tuning field is reported as unsupported).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp2Options {}

const HTTP_PROTOCOL_OPTIONS_KEY: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
const HTTP_PROTOCOL_OPTIONS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttpProtocolOptions {
    #[serde(rename = "@type")]
    type_url: String,
    #[serde(default)]
    explicit_http_config: Option<RawExplicitHttpConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExplicitHttpConfig {
    #[serde(default)]
    http_protocol_options: Option<RawHttp1Options>,
    #[serde(default)]
    http2_protocol_options: Option<RawHttp2Options>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp1Options {}

/// Decodes a Cluster resource at `path` (the caller qualifies its names).
pub(crate) fn cluster_from_value(
    value: serde_json::Value,
    path: &str,
) -> Result<Cluster, FieldError> {
    let mut raw: RawCluster = from_value(value, path)?;
    let discovery = match raw.discovery_type {
        None | Some(RawDiscoveryType::Static) => {
            if raw.eds_cluster_config.is_some() {
                return Err(FieldError::new(
                    join(path, "eds_cluster_config"),
                    "only allowed with type EDS",
                ));
            }
            Discovery::Static
        }
        Some(RawDiscoveryType::Eds) => {
            let service_name = raw
                .eds_cluster_config
                .take()
                .and_then(|config| config.service_name);
            Discovery::Eds { service_name }
        }
        Some(
            RawDiscoveryType::StrictDns
            | RawDiscoveryType::LogicalDns
            | RawDiscoveryType::OriginalDst,
        ) => {
            return Err(FieldError::new(
                join(path, "type"),
                "unsupported cluster type (supported: STATIC, EDS)",
            ));
        }
    };
    let lb_policy = lb_policy(&raw, path)?;
    let mut circuit_breakers = Thresholds::default();
    if let Some(breakers) = raw.circuit_breakers {
        for (index, thresholds) in breakers.thresholds.iter().enumerate() {
            if thresholds.priority != RawPriority::Default {
                continue;
            }
            if index > 0
                && breakers.thresholds[..index]
                    .iter()
                    .any(|t| t.priority == RawPriority::Default)
            {
                return Err(FieldError::new(
                    join(path, &format!("circuit_breakers.thresholds[{index}]")),
                    "priority DEFAULT is listed twice",
                ));
            }
            let defaults = Thresholds::default();
            circuit_breakers = Thresholds {
                max_connections: thresholds
                    .max_connections
                    .unwrap_or(defaults.max_connections),
                max_pending_requests: thresholds
                    .max_pending_requests
                    .unwrap_or(defaults.max_pending_requests),
                max_requests: thresholds.max_requests.unwrap_or(defaults.max_requests),
                max_retries: thresholds.max_retries.unwrap_or(defaults.max_retries),
            };
        }
    }
    let mut http2 = raw.http2_protocol_options.is_some();
    for (key, options) in raw.typed_extension_protocol_options {
        let options_path = join(path, &format!("typed_extension_protocol_options.{key}"));
        if key != HTTP_PROTOCOL_OPTIONS_KEY {
            return Err(FieldError::new(
                options_path,
                format!("unsupported protocol options (supported: {HTTP_PROTOCOL_OPTIONS_KEY})"),
            ));
        }
        let options: RawHttpProtocolOptions = from_value(options, &options_path)?;
        if options.type_url != HTTP_PROTOCOL_OPTIONS_TYPE {
            return Err(FieldError::new(
                join(&options_path, "@type"),
                format!(
                    "expected {HTTP_PROTOCOL_OPTIONS_TYPE}, got {}",
                    options.type_url
                ),
            ));
        }
        if let Some(explicit) = options.explicit_http_config {
            match (
                explicit.http_protocol_options,
                explicit.http2_protocol_options,
            ) {
                (Some(_), None) => http2 = false,
                (None, Some(_)) => http2 = true,
                _ => {
                    return Err(FieldError::new(
                        join(&options_path, "explicit_http_config"),
                        "exactly one of http_protocol_options, http2_protocol_options is required",
                    ))
                }
            }
        }
    }
    let connect_timeout = raw.connect_timeout.unwrap_or(Duration::from_secs(5));
    if connect_timeout.is_zero() {
        return Err(FieldError::new(
            join(path, "connect_timeout"),
            "must be greater than 0s",
        ));
    }
    Ok(Cluster {
        name: raw.name,
        discovery,
        lb_policy,
        connect_timeout,
        circuit_breakers,
        outlier_detection: raw.outlier_detection,
        http2,
        load_assignment: raw.load_assignment,
        per_connection_buffer_limit_bytes: raw
            .per_connection_buffer_limit_bytes
            .unwrap_or(1024 * 1024),
    })
}

fn lb_policy(raw: &RawCluster, path: &str) -> Result<LbPolicy, FieldError> {
    let misplaced = |field: &str, policy: &str| {
        FieldError::new(
            join(path, field),
            format!("only allowed with lb_policy {policy}"),
        )
    };
    if raw.least_request_lb_config.is_some() && !matches!(raw.lb_policy, RawLbPolicy::LeastRequest)
    {
        return Err(misplaced("least_request_lb_config", "LEAST_REQUEST"));
    }
    if raw.ring_hash_lb_config.is_some() && !matches!(raw.lb_policy, RawLbPolicy::RingHash) {
        return Err(misplaced("ring_hash_lb_config", "RING_HASH"));
    }
    if raw.maglev_lb_config.is_some() && !matches!(raw.lb_policy, RawLbPolicy::Maglev) {
        return Err(misplaced("maglev_lb_config", "MAGLEV"));
    }
    Ok(match raw.lb_policy {
        RawLbPolicy::RoundRobin => LbPolicy::RoundRobin,
        RawLbPolicy::Random => LbPolicy::Random,
        RawLbPolicy::LeastRequest => {
            let choice_count = raw
                .least_request_lb_config
                .as_ref()
                .and_then(|c| c.choice_count)
                .unwrap_or(2);
            if choice_count < 2 {
                return Err(FieldError::new(
                    join(path, "least_request_lb_config.choice_count"),
                    "must be at least 2",
                ));
            }
            LbPolicy::LeastRequest { choice_count }
        }
        RawLbPolicy::RingHash => {
            let config = raw.ring_hash_lb_config.as_ref();
            let minimum_ring_size = config.and_then(|c| c.minimum_ring_size).unwrap_or(1024);
            let maximum_ring_size = config
                .and_then(|c| c.maximum_ring_size)
                .unwrap_or(8 * 1024 * 1024);
            if minimum_ring_size == 0
                || minimum_ring_size > maximum_ring_size
                || maximum_ring_size > 8 * 1024 * 1024
            {
                return Err(FieldError::new(
                    join(path, "ring_hash_lb_config"),
                    "ring sizes must satisfy 1 <= minimum_ring_size <= maximum_ring_size <= 8388608",
                ));
            }
            LbPolicy::RingHash {
                minimum_ring_size,
                maximum_ring_size,
            }
        }
        RawLbPolicy::Maglev => {
            let table_size = raw
                .maglev_lb_config
                .as_ref()
                .and_then(|c| c.table_size)
                .unwrap_or(65537);
            if !is_prime(table_size) || table_size > 5_000_011 {
                return Err(FieldError::new(
                    join(path, "maglev_lb_config.table_size"),
                    "must be a prime no larger than 5000011",
                ));
            }
            LbPolicy::Maglev { table_size }
        }
    })
}

fn is_prime(n: u64) -> bool {
    n >= 2 && (2..).take_while(|d| d * d <= n).all(|d| !n.is_multiple_of(d))
}
