//! Envoy Listener and HttpConnectionManager with defaults resolved: sources -> **model**.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use super::duration;
use super::route::{RawTypeOnly, RouteConfiguration};
use crate::error::{from_value, join, FieldError};

/// An Envoy `SocketAddress` (TCP).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "RawSocketAddress")]
pub struct SocketAddress {
    /// `address`.
    pub address: IpAddr,
    /// `port_value`.
    pub port_value: u16,
    /// `ipv4_compat`: an IPv6 wildcard also accepts IPv4.
    pub ipv4_compat: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSocketAddress {
    address: String,
    #[serde(default)]
    port_value: u16,
    #[serde(default)]
    ipv4_compat: bool,
    /// Only TCP exists for sluice listeners and endpoints.
    #[serde(default, rename = "protocol")]
    _protocol: Option<RawSocketProtocol>,
}

#[derive(Deserialize)]
enum RawSocketProtocol {
    #[serde(rename = "TCP")]
    Tcp,
}

impl TryFrom<RawSocketAddress> for SocketAddress {
    type Error = String;

    fn try_from(raw: RawSocketAddress) -> Result<SocketAddress, String> {
        let address = raw.address.parse().map_err(|_| {
            format!(
                "`{}` is not an IP address (DNS names are not resolved)",
                raw.address
            )
        })?;
        Ok(SocketAddress {
            address,
            port_value: raw.port_value,
            ipv4_compat: raw.ipv4_compat,
        })
    }
}

/// An Envoy `Address` holding a `socket_address`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAddress {
    pub(crate) socket_address: SocketAddress,
}

/// An Envoy `Listener`. Its name is qualified `ns/cec/name` (forced).
#[derive(Debug, Clone, PartialEq)]
pub struct Listener {
    /// `name`, qualified.
    pub name: String,
    /// `address`; None = the agent allocates a transparent port (Cilium's behaviour).
    pub address: Option<SocketAddress>,
    /// `filter_chains`, each terminating in an HTTP connection manager.
    pub filter_chains: Vec<FilterChain>,
    /// `per_connection_buffer_limit_bytes` (default 1 MiB).
    pub per_connection_buffer_limit_bytes: u32,
}

/// One filter chain: exactly one `envoy.filters.network.http_connection_manager`.
#[derive(Debug, Clone, PartialEq)]
pub struct FilterChain {
    /// `name` of the chain, if any.
    pub name: Option<String>,
    /// The HTTP connection manager.
    pub http_connection_manager: HttpConnectionManager,
}

/// Where an HCM gets its routes.
#[derive(Debug, Clone, PartialEq)]
pub enum RouteSource {
    /// `rds.route_config_name`, qualified (forced); resolves to a RouteConfiguration of the
    /// same config.
    Rds(String),
    /// `route_config` inline (qualified like a RouteConfiguration resource).
    Inline(RouteConfiguration),
}

/// `codec_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum CodecType {
    /// Detect HTTP/1.1 vs HTTP/2 (the default).
    #[default]
    Auto,
    /// HTTP/1.1 only.
    Http1,
    /// HTTP/2 only.
    Http2,
}

/// `path_with_escaped_slashes_action`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum EscapedSlashesAction {
    /// Envoy's default, which is `KeepUnchanged`.
    #[default]
    ImplementationSpecificDefault,
    /// Leave `%2F`/`%5C` alone.
    KeepUnchanged,
    /// 400.
    RejectRequest,
    /// Redirect to the unescaped path.
    UnescapeAndRedirect,
    /// Unescape and continue.
    UnescapeAndForward,
}

/// `common_http_protocol_options`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommonHttpProtocolOptions {
    /// `idle_timeout` of a connection without streams (default 1 h; zero disables).
    #[serde(
        default = "default_idle_timeout",
        deserialize_with = "duration::required"
    )]
    pub idle_timeout: Duration,
    /// `max_headers_count` (default 100).
    #[serde(default = "default_max_headers_count")]
    pub max_headers_count: u32,
}

impl Default for CommonHttpProtocolOptions {
    fn default() -> CommonHttpProtocolOptions {
        CommonHttpProtocolOptions {
            idle_timeout: default_idle_timeout(),
            max_headers_count: default_max_headers_count(),
        }
    }
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_headers_count() -> u32 {
    100
}

/// One `upgrade_configs[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpgradeConfig {
    /// `upgrade_type`, e.g. `websocket` (compared case-insensitively).
    pub upgrade_type: String,
    /// `enabled` (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
}

fn yes() -> bool {
    true
}

/// `internal_address_config`: which peers count as internal (trusted for `x-envoy-*`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternalAddressConfig {
    /// `unix_sockets`.
    #[serde(default)]
    pub unix_sockets: bool,
    /// `cidr_ranges`.
    #[serde(default, deserialize_with = "cidr_ranges")]
    pub cidr_ranges: Vec<IpNet>,
}

fn cidr_ranges<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct CidrRange {
        address_prefix: String,
        #[serde(default)]
        prefix_len: u8,
    }
    let ranges = Vec::<CidrRange>::deserialize(deserializer)?;
    ranges
        .into_iter()
        .map(|range| {
            let address: IpAddr = range.address_prefix.parse().map_err(|_| {
                serde::de::Error::custom(format!("`{}` is not an IP address", range.address_prefix))
            })?;
            IpNet::new(address, range.prefix_len)
                .map_err(|e| serde::de::Error::custom(e.to_string()))
        })
        .collect()
}

/// Envoy `HttpConnectionManager` with defaults resolved. Its `http_filters` must be exactly
/// the router (sluice's policy filter is implicit, like Cilium's injected `cilium.l7policy`).
#[derive(Debug, Clone, PartialEq)]
pub struct HttpConnectionManager {
    /// `stat_prefix`.
    pub stat_prefix: String,
    /// `codec_type`.
    pub codec_type: CodecType,
    /// `rds` or `route_config`.
    pub routes: RouteSource,
    /// `normalize_path` (default false).
    pub normalize_path: bool,
    /// `merge_slashes` (default false).
    pub merge_slashes: bool,
    /// `path_with_escaped_slashes_action`.
    pub path_with_escaped_slashes_action: EscapedSlashesAction,
    /// `use_remote_address` (default false).
    pub use_remote_address: bool,
    /// `skip_xff_append` (default false).
    pub skip_xff_append: bool,
    /// `xff_num_trusted_hops` (default 0).
    pub xff_num_trusted_hops: u32,
    /// `stream_idle_timeout` (default 5 min); None when `0s` disables it.
    pub stream_idle_timeout: Option<Duration>,
    /// `request_timeout`; None = disabled (the default, or `0s`).
    pub request_timeout: Option<Duration>,
    /// `request_headers_timeout`: the whole request head must arrive within it once its first
    /// byte has; None = disabled (the default, or `0s`).
    pub request_headers_timeout: Option<Duration>,
    /// `max_request_headers_kb` (default 60, at most 8192).
    pub max_request_headers_kb: u32,
    /// `common_http_protocol_options`.
    pub common_http_protocol_options: CommonHttpProtocolOptions,
    /// `upgrade_configs`.
    pub upgrade_configs: Vec<UpgradeConfig>,
    /// `internal_address_config`; None = nothing is internal (sluice does not trust RFC1918
    /// peers implicitly; see CVE-2024-45806).
    pub internal_address_config: Option<InternalAddressConfig>,
}

const HCM_NAME: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_NAME: &str = "envoy.filters.http.router";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const ORIGINAL_DST_NAME: &str = "envoy.filters.listener.original_dst";
const ORIGINAL_DST_TYPE: &str =
    "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    #[serde(default)]
    name: String,
    #[serde(default)]
    address: Option<RawAddress>,
    #[serde(default)]
    filter_chains: Vec<RawFilterChain>,
    #[serde(default)]
    listener_filters: Vec<RawExtension>,
    #[serde(default)]
    per_connection_buffer_limit_bytes: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilterChain {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    filters: Vec<RawExtension>,
}

/// `{name, typed_config}` where typed_config is an `Any` decoded later, by its `@type`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExtension {
    name: String,
    #[serde(default)]
    typed_config: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHcm {
    /// Checked against HCM_TYPE before decoding.
    #[serde(rename = "@type")]
    _type_url: String,
    stat_prefix: String,
    #[serde(default)]
    codec_type: CodecType,
    #[serde(default)]
    rds: Option<RawRds>,
    #[serde(default)]
    route_config: Option<RouteConfiguration>,
    #[serde(default)]
    http_filters: Vec<RawExtension>,
    #[serde(default)]
    normalize_path: bool,
    #[serde(default)]
    merge_slashes: bool,
    #[serde(default)]
    path_with_escaped_slashes_action: EscapedSlashesAction,
    #[serde(default)]
    use_remote_address: bool,
    #[serde(default)]
    skip_xff_append: bool,
    #[serde(default)]
    xff_num_trusted_hops: u32,
    #[serde(default, deserialize_with = "duration::optional")]
    stream_idle_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::optional")]
    request_timeout: Option<Duration>,
    #[serde(default, deserialize_with = "duration::optional")]
    request_headers_timeout: Option<Duration>,
    #[serde(default)]
    max_request_headers_kb: Option<u32>,
    #[serde(default)]
    common_http_protocol_options: CommonHttpProtocolOptions,
    #[serde(default)]
    upgrade_configs: Vec<UpgradeConfig>,
    #[serde(default)]
    internal_address_config: Option<InternalAddressConfig>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRds {
    route_config_name: String,
    /// Accepted in its ADS form only: routes come from the same config.
    #[serde(default, rename = "config_source")]
    _config_source: Option<super::RawConfigSource>,
}

const DEFAULT_STREAM_IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Decodes a Listener resource at `path` (without qualifying names).
pub(crate) fn listener_from_value(
    value: serde_json::Value,
    path: &str,
) -> Result<Listener, FieldError> {
    let raw: RawListener = from_value(value, path)?;
    for (index, filter) in raw.listener_filters.iter().enumerate() {
        let filter_path = join(path, &format!("listener_filters[{index}]"));
        if filter.name != ORIGINAL_DST_NAME {
            return Err(FieldError::new(
                join(&filter_path, "name"),
                format!(
                    "listener filter `{}` is not supported (supported: {ORIGINAL_DST_NAME})",
                    filter.name
                ),
            ));
        }
        expect_type_only(
            filter.typed_config.clone(),
            ORIGINAL_DST_TYPE,
            &join(&filter_path, "typed_config"),
        )?;
    }
    if raw.filter_chains.is_empty() {
        return Err(FieldError::new(
            join(path, "filter_chains"),
            "a listener needs at least one filter chain",
        ));
    }
    let mut filter_chains = Vec::new();
    for (chain_index, chain) in raw.filter_chains.into_iter().enumerate() {
        let chain_path = join(path, &format!("filter_chains[{chain_index}]"));
        let mut filters = chain.filters.into_iter();
        let (Some(filter), None) = (filters.next(), filters.next()) else {
            return Err(FieldError::new(
                join(&chain_path, "filters"),
                format!("a filter chain must hold exactly one filter, {HCM_NAME}"),
            ));
        };
        let filter_path = join(&chain_path, "filters[0]");
        if filter.name != HCM_NAME {
            return Err(FieldError::new(
                join(&filter_path, "name"),
                format!(
                    "network filter `{}` is not supported (supported: {HCM_NAME})",
                    filter.name
                ),
            ));
        }
        let config_path = join(&filter_path, "typed_config");
        let Some(config) = filter.typed_config else {
            return Err(FieldError::new(
                config_path,
                format!("typed_config ({HCM_TYPE}) is required"),
            ));
        };
        let http_connection_manager = hcm_from_value(config, &config_path)?;
        filter_chains.push(FilterChain {
            name: chain.name,
            http_connection_manager,
        });
    }
    Ok(Listener {
        name: raw.name,
        address: raw.address.map(|a| a.socket_address),
        filter_chains,
        per_connection_buffer_limit_bytes: raw
            .per_connection_buffer_limit_bytes
            .unwrap_or(1024 * 1024),
    })
}

fn expect_type_only(
    config: Option<serde_json::Value>,
    type_url: &str,
    path: &str,
) -> Result<(), FieldError> {
    let Some(config) = config else { return Ok(()) };
    let raw: RawTypeOnly = from_value(config, path)?;
    if raw.type_url != type_url {
        return Err(FieldError::new(
            join(path, "@type"),
            format!("expected {type_url}, got {}", raw.type_url),
        ));
    }
    Ok(())
}

fn hcm_from_value(
    value: serde_json::Value,
    path: &str,
) -> Result<HttpConnectionManager, FieldError> {
    let type_url = value
        .get("@type")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string();
    if type_url != HCM_TYPE {
        return Err(FieldError::new(
            join(path, "@type"),
            format!("expected {HCM_TYPE}, got `{type_url}`"),
        ));
    }
    let raw: RawHcm = from_value(value, path)?;
    let routes = match (raw.rds, raw.route_config) {
        (Some(rds), None) => RouteSource::Rds(rds.route_config_name),
        (None, Some(inline)) => RouteSource::Inline(inline),
        (Some(_), Some(_)) => {
            return Err(FieldError::new(
                path,
                "only one of rds, route_config may be set",
            ))
        }
        (None, None) => {
            return Err(FieldError::new(
                path,
                "one of rds, route_config is required",
            ))
        }
    };
    let filters_path = join(path, "http_filters");
    let router_index = raw.http_filters.len().checked_sub(1);
    for (index, filter) in raw.http_filters.into_iter().enumerate() {
        let filter_path = join(&filters_path, &format!("[{index}]"));
        if filter.name != ROUTER_NAME {
            return Err(FieldError::new(
                join(&filter_path, "name"),
                format!(
                    "HTTP filter `{}` is not supported (supported: {ROUTER_NAME}, last)",
                    filter.name
                ),
            ));
        }
        if Some(index) != router_index {
            return Err(FieldError::new(
                filter_path,
                format!("{ROUTER_NAME} must be the last HTTP filter"),
            ));
        }
        expect_type_only(
            filter.typed_config,
            ROUTER_TYPE,
            &join(&filter_path, "typed_config"),
        )?;
    }
    if router_index.is_none() {
        return Err(FieldError::new(
            filters_path,
            format!("the last HTTP filter must be {ROUTER_NAME}"),
        ));
    }
    if raw.stat_prefix.is_empty() {
        return Err(FieldError::new(
            join(path, "stat_prefix"),
            "must not be empty",
        ));
    }
    let max_request_headers_kb = raw.max_request_headers_kb.unwrap_or(60);
    if !(1..=8192).contains(&max_request_headers_kb) {
        return Err(FieldError::new(
            join(path, "max_request_headers_kb"),
            "must be within 1..=8192",
        ));
    }
    Ok(HttpConnectionManager {
        stat_prefix: raw.stat_prefix,
        codec_type: raw.codec_type,
        routes,
        normalize_path: raw.normalize_path,
        merge_slashes: raw.merge_slashes,
        path_with_escaped_slashes_action: raw.path_with_escaped_slashes_action,
        use_remote_address: raw.use_remote_address,
        skip_xff_append: raw.skip_xff_append,
        xff_num_trusted_hops: raw.xff_num_trusted_hops,
        stream_idle_timeout: match raw.stream_idle_timeout {
            None => Some(DEFAULT_STREAM_IDLE_TIMEOUT),
            Some(timeout) => Some(timeout).filter(|t| !t.is_zero()),
        },
        request_timeout: raw.request_timeout.filter(|t| !t.is_zero()),
        request_headers_timeout: raw.request_headers_timeout.filter(|t| !t.is_zero()),
        max_request_headers_kb,
        common_http_protocol_options: raw.common_http_protocol_options,
        upgrade_configs: raw.upgrade_configs,
        internal_address_config: raw.internal_address_config,
    })
}
