//! Observe: proxy and kernel flow events -> a bounded ring of Hubble-shaped records -> API followers and `sluice observe`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use chrono::{DateTime, Utc};
use regex::Regex;
use serde::{Deserialize, Serialize};
use sluice_proxy::flow::{DropReason, FlowEvent, FlowPeer, HttpFlow, TrafficDirection, Verdict};
use sluice_proxy::tables::{IDENTITY_HOST, IDENTITY_WORLD};
use tokio::sync::broadcast;

use crate::metrics::Metrics;

/// How many flows the agent keeps for `sluice observe --last N` when nobody says otherwise.
pub const DEFAULT_FLOW_CAPACITY: usize = 4096;

/// One flow as served by the API and printed by `sluice observe`: Hubble's JSON field names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FlowRecord {
    pub time: DateTime<Utc>,
    /// `FORWARDED`, `DROPPED` or `ERROR`.
    pub verdict: String,
    /// Why it was dropped (`POLICY_DENIED`, `L7_POLICY_DENIED`, ...); absent when it was not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason_desc: Option<String>,
    /// `L7` for HTTP, `L3_L4` for a connection refused before any request was read.
    #[serde(rename = "Type")]
    pub flow_type: String,
    /// `INGRESS` or `EGRESS`: whose policy decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_direction: Option<String>,
    pub source: FlowEndpoint,
    pub destination: FlowEndpoint,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<Layer7>,
    /// Hubble's one-line description, e.g. `http-request DROPPED (HTTP/1.1 PUT http://deathstar/v1/exhaust-port)`.
    pub summary: String,
    pub listener: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Upstream attempts (1 + retries); 0 when no upstream was contacted.
    pub attempts: u32,
    /// The policy rule that decided, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `ProxyTables::generation` that handled the request.
    pub generation: u64,
    /// Kernel events: the packet's L4 header (Hubble's `l4`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<Layer4>,
    /// Kernel events: Cilium's numeric drop reason (`133` for `POLICY_DENIED`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drop_reason: Option<u16>,
    /// Kernel events: where the packet was seen (`FROM_ENDPOINT`, `TO_ENDPOINT`, `TO_PROXY`,
    /// `SOCK` for socket load balancing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_observation_point: Option<String>,
}

/// Hubble's `l4`: exactly one protocol is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer4 {
    #[serde(rename = "TCP", default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpHeader>,
    #[serde(rename = "UDP", default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<UdpHeader>,
    /// Any other IP protocol, by number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip_protocol: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpHeader {
    pub source_port: u16,
    pub destination_port: u16,
    /// The flags that are set, by Hubble's name (`SYN`, `ACK`, ...), each `true`.
    pub flags: std::collections::BTreeMap<String, bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpHeader {
    pub source_port: u16,
    pub destination_port: u16,
}

/// TCP flag bits in the order Hubble prints them.
const TCP_FLAGS: [(u8, &str); 8] = [
    (0x02, "SYN"),
    (0x10, "ACK"),
    (0x01, "FIN"),
    (0x04, "RST"),
    (0x08, "PSH"),
    (0x20, "URG"),
    (0x40, "ECE"),
    (0x80, "CWR"),
];

impl Layer4 {
    fn of(protocol: u8, source_port: u16, destination_port: u16, tcp_flags: u8) -> Self {
        match protocol {
            sluice_ebpf::state::IPPROTO_TCP => Self {
                tcp: Some(TcpHeader {
                    source_port,
                    destination_port,
                    flags: TCP_FLAGS
                        .iter()
                        .filter(|(bit, _)| tcp_flags & bit != 0)
                        .map(|(_, name)| ((*name).to_owned(), true))
                        .collect(),
                }),
                ..Self::default()
            },
            sluice_ebpf::state::IPPROTO_UDP => Self {
                udp: Some(UdpHeader { source_port, destination_port }),
                ..Self::default()
            },
            other => Self { ip_protocol: Some(other), ..Self::default() },
        }
    }

    fn is_tcp(&self) -> bool {
        self.tcp.is_some()
    }

    /// Hubble's summary detail: `TCP Flags: SYN, ACK`, `UDP`, or the protocol number.
    fn summary(&self) -> String {
        match (&self.tcp, &self.udp) {
            (Some(tcp), _) => {
                let names: Vec<&str> = TCP_FLAGS
                    .iter()
                    .filter(|(_, name)| tcp.flags.get(*name).copied().unwrap_or(false))
                    .map(|(_, name)| *name)
                    .collect();
                format!("TCP Flags: {}", names.join(", "))
            }
            (None, Some(_)) => "UDP".to_owned(),
            (None, None) => match self.ip_protocol {
                Some(1) => "ICMPv4".to_owned(),
                Some(other) => format!("IP protocol {other}"),
                None => "TCP".to_owned(),
            },
        }
    }
}

/// What names the addresses of kernel events: the peers of the tables in force, and their
/// generation.
#[derive(Debug, Clone, Default)]
pub struct KernelFlowContext {
    pub peers: std::collections::BTreeMap<std::net::IpAddr, sluice_proxy::tables::Peer>,
    pub generation: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowEndpoint {
    pub ip: std::net::IpAddr,
    pub port: u16,
    pub identity: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// The pod, or the node name for host traffic; absent for `world`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer7 {
    /// `REQUEST` when no response reached the client through the backend, `RESPONSE` otherwise.
    #[serde(rename = "type")]
    pub kind: String,
    pub latency_ns: u64,
    pub http: HttpRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRecord {
    /// The status sent to the client; absent when the connection was closed without one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u16>,
    pub method: String,
    /// `http://<authority><path>`, as Hubble prints it.
    pub url: String,
    pub protocol: String,
}

impl FlowRecord {
    pub fn from_event(event: &FlowEvent) -> Self {
        let l7 = event.http.as_ref().map(|http| layer7(event.verdict, http));
        let mut record = Self {
            time: DateTime::<Utc>::from(event.time),
            verdict: verdict_name(event.verdict).to_owned(),
            drop_reason_desc: event
                .drop_reason
                .map(|reason| drop_reason_name(reason).to_owned()),
            flow_type: if l7.is_some() { "L7" } else { "L3_L4" }.to_owned(),
            traffic_direction: event
                .direction
                .map(|direction| direction_name(direction).to_owned()),
            source: FlowEndpoint::from_peer(&event.source),
            destination: FlowEndpoint::from_peer(&event.destination),
            l7,
            summary: String::new(),
            listener: event.listener.to_string(),
            cluster: event.cluster.as_deref().map(str::to_owned),
            attempts: event.attempts,
            policy: event.policy.as_deref().map(str::to_owned),
            generation: event.generation,
            l4: None,
            drop_reason: None,
            trace_observation_point: None,
        };
        let (kind, detail) = record.summary_parts();
        record.summary = format!("{kind} {} ({detail})", record.verdict);
        record
    }

    /// A verdict of the kernel datapath (L3/L4), seen at `time`.
    pub fn from_kernel_event(event: &sluice_ebpf::FlowEvent, time: DateTime<Utc>, context: &KernelFlowContext) -> Self {
        let endpoint = |addr: std::net::SocketAddrV4, identity: u32| {
            let ip = std::net::IpAddr::V4(*addr.ip());
            let name = context.peers.get(&ip).map(|peer| Arc::from(peer.name.as_str()));
            FlowEndpoint::from_peer(&FlowPeer { ip, port: addr.port(), identity, name })
        };
        let observation_point = match (event.verdict, event.observation_point) {
            (sluice_ebpf::Verdict::Redirected, _) => "TO_PROXY",
            (_, sluice_ebpf::ObservationPoint::FromEndpoint) => "FROM_ENDPOINT",
            (_, sluice_ebpf::ObservationPoint::ToEndpoint) => "TO_ENDPOINT",
            (_, sluice_ebpf::ObservationPoint::Socket) => "SOCK",
        };
        let mut record = Self {
            time,
            verdict: event.verdict.hubble_name().to_owned(),
            drop_reason_desc: event.drop_reason.map(|reason| reason.hubble_name().to_owned()),
            flow_type: "L3_L4".to_owned(),
            traffic_direction: Some(
                match event.direction {
                    sluice_ebpf::Direction::Ingress => "INGRESS",
                    sluice_ebpf::Direction::Egress => "EGRESS",
                }
                .to_owned(),
            ),
            source: endpoint(event.source, event.src_identity),
            destination: endpoint(event.destination, event.dst_identity),
            l7: None,
            summary: String::new(),
            listener: String::new(),
            cluster: None,
            attempts: 0,
            policy: None,
            generation: context.generation,
            l4: Some(Layer4::of(event.protocol, event.source.port(), event.destination.port(), event.tcp_flags)),
            drop_reason: event.drop_reason.map(|reason| reason.code()),
            trace_observation_point: Some(observation_point.to_owned()),
        };
        let (kind, detail) = record.summary_parts();
        record.summary = format!("{kind} {} ({detail})", record.verdict);
        record
    }

    pub fn event_type(&self) -> EventType {
        EventType::of(
            self.l7.is_some(),
            self.verdict == verdict_name(Verdict::Dropped),
            self.drop_reason_desc.as_deref(),
        )
    }

    /// Hubble's event type and details, the two halves of the summary around the verdict:
    /// `("http-request", "HTTP/1.1 PUT http://deathstar/v1/exhaust-port")`.
    pub fn summary_parts(&self) -> (String, String) {
        let l4_drop = self.drop_reason_desc.as_deref().and_then(l4_drop_words);
        let l4_detail = || self.l4.as_ref().map_or_else(|| "TCP".to_owned(), Layer4::summary);
        match (&self.l7, l4_drop) {
            (None, Some(words)) => (words.to_owned(), l4_detail()),
            (None, None) => match (&self.trace_observation_point, &self.drop_reason_desc) {
                // A kernel drop for another reason reads as its reason.
                (Some(_), Some(reason)) => (reason.clone(), l4_detail()),
                (Some(point), None) => (point.to_ascii_lowercase().replace('_', "-"), l4_detail()),
                (None, _) => ("to-endpoint".to_owned(), l4_detail()),
            },
            (Some(l7), Some(words)) => (words.to_owned(), request_line(&l7.http)),
            (Some(l7), None) => match l7.http.code {
                Some(code) if l7.kind == L7_RESPONSE => (
                    "http-response".to_owned(),
                    format!(
                        "{} {code} {}ms ({} {})",
                        l7.http.protocol,
                        l7.latency_ns / 1_000_000,
                        l7.http.method,
                        l7.http.url
                    ),
                ),
                _ => ("http-request".to_owned(), request_line(&l7.http)),
            },
        }
    }
}

fn request_line(http: &HttpRecord) -> String {
    format!("{} {} {}", http.protocol, http.method, http.url)
}

impl FlowEndpoint {
    fn from_peer(peer: &FlowPeer) -> Self {
        let (namespace, pod_name) = match peer.name.as_deref().map(|name| name.split_once('/')) {
            Some(Some((namespace, pod))) => (Some(namespace.to_owned()), Some(pod.to_owned())),
            Some(None) => (None, peer.name.as_deref().map(str::to_owned)),
            None => (None, None),
        };
        Self {
            ip: peer.ip,
            port: peer.port,
            identity: peer.identity,
            namespace,
            pod_name,
        }
    }

    /// `namespace/pod` when known, else the bare name, else nothing.
    pub fn qualified_name(&self) -> Option<String> {
        match (&self.namespace, &self.pod_name) {
            (Some(namespace), Some(pod)) => Some(format!("{namespace}/{pod}")),
            (None, Some(name)) => Some(name.clone()),
            _ => None,
        }
    }
}

pub fn verdict_name(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Forwarded => "FORWARDED",
        Verdict::Dropped => "DROPPED",
        Verdict::Error => "ERROR",
    }
}

pub fn drop_reason_name(reason: DropReason) -> &'static str {
    match reason {
        DropReason::PolicyDenied => "POLICY_DENIED",
        DropReason::PolicyDeny => "POLICY_DENY",
        DropReason::L7PolicyDenied => "L7_POLICY_DENIED",
        DropReason::AuthRequired => "AUTH_REQUIRED",
        DropReason::InvalidRequest => "INVALID_REQUEST",
        DropReason::NoRoute => "NO_ROUTE",
        DropReason::NoHealthyUpstream => "NO_HEALTHY_UPSTREAM",
        DropReason::Overflow => "OVERFLOW",
        DropReason::UpstreamFailure => "UPSTREAM_FAILURE",
        DropReason::UpstreamTimeout => "UPSTREAM_TIMEOUT",
        DropReason::DownstreamTimeout => "DOWNSTREAM_TIMEOUT",
    }
}

pub fn direction_name(direction: TrafficDirection) -> &'static str {
    match direction {
        TrafficDirection::Ingress => "INGRESS",
        TrafficDirection::Egress => "EGRESS",
    }
}

/// The words Hubble puts in front of an L3/L4 drop (`Policy denied DROPPED (TCP Flags: SYN)`).
fn l4_drop_words(drop_reason_desc: &str) -> Option<&'static str> {
    match drop_reason_desc {
        "POLICY_DENIED" => Some("Policy denied"),
        "POLICY_DENY" => Some("Policy denied by denylist"),
        "AUTH_REQUIRED" => Some("Authentication required"),
        _ => None,
    }
}

const L7_REQUEST: &str = "REQUEST";
const L7_RESPONSE: &str = "RESPONSE";

/// A request answered through the proxy (or failed upstream) reads as Hubble's response line;
/// one that policy stopped reads as its request line, even when the proxy sent the 403.
fn layer7(verdict: Verdict, http: &HttpFlow) -> Layer7 {
    let answered = verdict != Verdict::Dropped && http.status.is_some();
    Layer7 {
        kind: if answered { L7_RESPONSE } else { L7_REQUEST }.to_owned(),
        latency_ns: u64::try_from(http.latency.as_nanos()).unwrap_or(u64::MAX),
        http: HttpRecord {
            code: http.status,
            method: http.method.as_str().to_owned(),
            url: format!("http://{}{}", http.authority, http.url),
            protocol: http.protocol.to_owned(),
        },
    }
}

/// Name for a reserved identity, as Hubble prints `(world)` instead of `(ID:2)`.
pub fn reserved_identity_name(identity: u32) -> Option<&'static str> {
    match identity {
        IDENTITY_HOST => Some("host"),
        IDENTITY_WORLD => Some("world"),
        _ => None,
    }
}

/// The `sluice observe` filters in their user-facing form: flags on the CLI, query parameters on
/// the API. Values of one flag are ORed, different flags are ANDed (Hubble's rule).
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct FilterArgs {
    /// Only flows with this verdict: FORWARDED, DROPPED, REDIRECTED (kernel to proxy), ERROR.
    #[arg(long)]
    pub verdict: Vec<String>,
    /// Only flows of this protocol: http, tcp, udp.
    #[arg(long)]
    pub protocol: Vec<String>,
    /// Only HTTP flows with this status: exact (`404`) or a prefix ending in `+` (`5+`, `40+`).
    #[arg(long)]
    pub http_status: Vec<String>,
    /// Only HTTP flows with this method (case-insensitive).
    #[arg(long)]
    pub http_method: Vec<String>,
    /// Only HTTP flows whose path matches this regex (unanchored, like Hubble).
    #[arg(long)]
    pub http_path: Vec<String>,
    /// Flows from or to this pod: `[namespace/]name-prefix`, or `namespace/` for a whole namespace.
    #[arg(long)]
    pub pod: Vec<String>,
    /// Flows from this pod: `[namespace/]name-prefix`.
    #[arg(long)]
    pub from_pod: Vec<String>,
    /// Flows to this pod: `[namespace/]name-prefix`.
    #[arg(long)]
    pub to_pod: Vec<String>,
    /// Flows from or to this security identity: a number, or `world` / `host`.
    #[arg(long)]
    pub identity: Vec<String>,
    /// Flows from this security identity: a number, or `world` / `host`.
    #[arg(long)]
    pub from_identity: Vec<String>,
    /// Flows to this security identity: a number, or `world` / `host`.
    #[arg(long)]
    pub to_identity: Vec<String>,
    /// Flows from or to pods in this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Vec<String>,
    /// Flows with this source or destination port.
    #[arg(long)]
    pub port: Vec<String>,
    /// Flows of this Hubble event type: `l7` (HTTP), `drop` (refused by L3/L4 policy, or ended
    /// before a request), `trace` (forwarded without HTTP; subtype `trace:to-endpoint`).
    #[arg(short = 't', long = "type", value_name = "TYPE[:SUBTYPE]")]
    pub event_type: Vec<String>,
}

const QUERY_KEYS: [&str; 14] = [
    "verdict",
    "protocol",
    "http_status",
    "http_method",
    "http_path",
    "pod",
    "from_pod",
    "to_pod",
    "identity",
    "from_identity",
    "to_identity",
    "namespace",
    "port",
    "type",
];

impl FilterArgs {
    fn values(&self) -> [&Vec<String>; 14] {
        [
            &self.verdict,
            &self.protocol,
            &self.http_status,
            &self.http_method,
            &self.http_path,
            &self.pod,
            &self.from_pod,
            &self.to_pod,
            &self.identity,
            &self.from_identity,
            &self.to_identity,
            &self.namespace,
            &self.port,
            &self.event_type,
        ]
    }

    fn values_mut(&mut self) -> [&mut Vec<String>; 14] {
        [
            &mut self.verdict,
            &mut self.protocol,
            &mut self.http_status,
            &mut self.http_method,
            &mut self.http_path,
            &mut self.pod,
            &mut self.from_pod,
            &mut self.to_pod,
            &mut self.identity,
            &mut self.from_identity,
            &mut self.to_identity,
            &mut self.namespace,
            &mut self.port,
            &mut self.event_type,
        ]
    }

    /// Query-string pairs, one per value, in the API's parameter names.
    pub fn query_pairs(&self) -> Vec<(&'static str, &str)> {
        QUERY_KEYS
            .iter()
            .zip(self.values())
            .flat_map(|(key, values)| values.iter().map(move |value| (*key, value.as_str())))
            .collect()
    }

    /// Takes a pair that names a filter; returns `false` for any other key.
    pub fn push_query_pair(&mut self, key: &str, value: String) -> bool {
        match QUERY_KEYS.iter().position(|known| *known == key) {
            Some(index) => {
                self.values_mut()[index].push(value);
                true
            }
            None => false,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("--verdict {0:?}: expected FORWARDED, DROPPED, REDIRECTED or ERROR")]
    Verdict(String),
    #[error("--protocol {0:?}: expected http, tcp or udp")]
    Protocol(String),
    #[error("--http-status {0:?}: expected a status like 404 or a prefix like 4+ or 40+")]
    HttpStatus(String),
    #[error("--http-path {pattern:?}: {reason}")]
    HttpPath { pattern: String, reason: String },
    #[error("--{flag} {value:?}: expected [namespace/]name-prefix")]
    Pod { flag: &'static str, value: String },
    #[error("--{flag} {value:?}: expected a numeric identity or a reserved one sluice uses (host, world)")]
    Identity { flag: &'static str, value: String },
    #[error("--namespace {0:?}: expected a namespace name")]
    Namespace(String),
    #[error("--port {0:?}: expected a port number (0-65535)")]
    Port(String),
    #[error("--type {0:?}: sluice records l7, drop and trace (trace:to-endpoint) flows")]
    EventType(String),
}

/// Hubble's event type of a flow. An L3/L4 policy refusal is a drop, as Cilium's datapath would
/// have dropped the connection, even when the proxy read the request to learn its destination
/// (gateway mode); any other flow with a request is L7, and one without is a drop or a trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    L7,
    Drop,
    Trace,
}

impl EventType {
    /// `drop_reason` by its Hubble name (`POLICY_DENIED`).
    pub fn of(has_http: bool, dropped: bool, drop_reason: Option<&str>) -> Self {
        let l3_l4_policy_drop = drop_reason.and_then(l4_drop_words).is_some();
        match (has_http, dropped) {
            _ if l3_l4_policy_drop => Self::Drop,
            (true, _) => Self::L7,
            (false, true) => Self::Drop,
            (false, false) => Self::Trace,
        }
    }

    /// Hubble's `type` and `subtype` labels of `hubble_flows_processed_total`.
    pub fn metric_labels(self) -> (&'static str, &'static str) {
        match self {
            Self::L7 => ("L7", "HTTP"),
            Self::Drop => ("Drop", ""),
            Self::Trace => ("Trace", "to-endpoint"),
        }
    }

    /// `--type` takes Hubble's lower-case names; the only trace sluice sees is to-endpoint.
    fn parse(raw: &str) -> Result<Self, FilterError> {
        match raw.to_ascii_lowercase().as_str() {
            "l7" => Ok(Self::L7),
            "drop" => Ok(Self::Drop),
            "trace" | "trace:to-endpoint" => Ok(Self::Trace),
            _ => Err(FilterError::EventType(raw.to_owned())),
        }
    }
}

/// A numeric identity, or a reserved name (`world`, `reserved:world`) as Hubble accepts it.
fn parse_identity(flag: &'static str, raw: &str) -> Result<u32, FilterError> {
    if let Ok(number) = raw.parse() {
        return Ok(number);
    }
    let name = raw.strip_prefix("reserved:").unwrap_or(raw);
    [IDENTITY_HOST, IDENTITY_WORLD]
        .into_iter()
        .find(|identity| reserved_identity_name(*identity) == Some(name))
        .ok_or_else(|| FilterError::Identity {
            flag,
            value: raw.to_owned(),
        })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProtocolMatch {
    Http,
    /// Every flow the proxy sees is carried by TCP, HTTP ones included (as in Hubble); a
    /// kernel flow by its L4 header.
    Tcp,
    Udp,
}

/// `404` matches exactly; `4+` and `40+` match every code starting with the digits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum StatusMatch {
    Exact(u16),
    Prefix(String),
}

impl StatusMatch {
    fn parse(raw: &str) -> Result<Self, FilterError> {
        let invalid = || FilterError::HttpStatus(raw.to_owned());
        let all_digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        match raw.strip_suffix('+') {
            Some(prefix) if all_digits(prefix) && prefix.len() < 3 => {
                Ok(Self::Prefix(prefix.to_owned()))
            }
            Some(_) => Err(invalid()),
            None if all_digits(raw) && raw.len() == 3 => {
                raw.parse().map(Self::Exact).map_err(|_| invalid())
            }
            None => Err(invalid()),
        }
    }

    fn matches(&self, code: u16) -> bool {
        match self {
            Self::Exact(exact) => code == *exact,
            Self::Prefix(prefix) => code.to_string().starts_with(prefix.as_str()),
        }
    }
}

/// `namespace/name-prefix`, `namespace/` (whole namespace) or `name-prefix` (any namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodMatch {
    namespace: Option<String>,
    name_prefix: String,
}

impl PodMatch {
    fn parse(flag: &'static str, raw: &str) -> Result<Self, FilterError> {
        let (namespace, name_prefix) = match raw.split_once('/') {
            Some((namespace, name)) => (Some(namespace.to_owned()), name.to_owned()),
            None => (None, raw.to_owned()),
        };
        let empty_namespace = namespace.as_deref() == Some("");
        if empty_namespace
            || name_prefix.contains('/')
            || (namespace.is_none() && name_prefix.is_empty())
        {
            return Err(FilterError::Pod {
                flag,
                value: raw.to_owned(),
            });
        }
        Ok(Self {
            namespace,
            name_prefix,
        })
    }

    fn matches(&self, endpoint: &FlowEndpoint) -> bool {
        let Some(pod) = &endpoint.pod_name else {
            return false;
        };
        let namespace_ok = match &self.namespace {
            Some(wanted) => endpoint.namespace.as_deref() == Some(wanted.as_str()),
            None => true,
        };
        namespace_ok && pod.starts_with(&self.name_prefix)
    }
}

/// The validated form of [`FilterArgs`]: a pure predicate over [`FlowRecord`]s.
#[derive(Debug, Clone, Default)]
pub struct FlowFilter {
    verdicts: Vec<String>,
    protocols: Vec<ProtocolMatch>,
    http_statuses: Vec<StatusMatch>,
    http_methods: Vec<String>,
    http_paths: Vec<Regex>,
    pods: Vec<PodMatch>,
    from_pods: Vec<PodMatch>,
    to_pods: Vec<PodMatch>,
    identities: Vec<u32>,
    from_identities: Vec<u32>,
    to_identities: Vec<u32>,
    namespaces: Vec<String>,
    ports: Vec<u16>,
    event_types: Vec<EventType>,
}

impl FlowFilter {
    pub fn parse(args: &FilterArgs) -> Result<Self, FilterError> {
        let verdicts = args
            .verdict
            .iter()
            .map(|raw| {
                let upper = raw.to_ascii_uppercase();
                match upper.as_str() {
                    "FORWARDED" | "DROPPED" | "ERROR" | "REDIRECTED" => Ok(upper),
                    _ => Err(FilterError::Verdict(raw.clone())),
                }
            })
            .collect::<Result<_, _>>()?;
        let protocols = args
            .protocol
            .iter()
            .map(|raw| match raw.to_ascii_lowercase().as_str() {
                "http" => Ok(ProtocolMatch::Http),
                "tcp" => Ok(ProtocolMatch::Tcp),
                "udp" => Ok(ProtocolMatch::Udp),
                _ => Err(FilterError::Protocol(raw.clone())),
            })
            .collect::<Result<_, _>>()?;
        let http_statuses = args
            .http_status
            .iter()
            .map(|raw| StatusMatch::parse(raw))
            .collect::<Result<_, _>>()?;
        let http_paths = args
            .http_path
            .iter()
            .map(|pattern| {
                Regex::new(pattern).map_err(|err| FilterError::HttpPath {
                    pattern: pattern.clone(),
                    reason: err.to_string(),
                })
            })
            .collect::<Result<_, _>>()?;
        let pods = |flag: &'static str, raw: &[String]| -> Result<Vec<PodMatch>, FilterError> {
            raw.iter()
                .map(|value| PodMatch::parse(flag, value))
                .collect()
        };
        let identities = |flag: &'static str, raw: &[String]| -> Result<Vec<u32>, FilterError> {
            raw.iter().map(|value| parse_identity(flag, value)).collect()
        };
        let namespaces = args
            .namespace
            .iter()
            .map(|raw| {
                if raw.is_empty() || raw.contains('/') {
                    Err(FilterError::Namespace(raw.clone()))
                } else {
                    Ok(raw.clone())
                }
            })
            .collect::<Result<_, _>>()?;
        let ports = args
            .port
            .iter()
            .map(|raw| raw.parse().map_err(|_| FilterError::Port(raw.clone())))
            .collect::<Result<_, _>>()?;
        let event_types = args
            .event_type
            .iter()
            .map(|raw| EventType::parse(raw))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            verdicts,
            protocols,
            http_statuses,
            http_methods: args
                .http_method
                .iter()
                .map(|method| method.to_ascii_uppercase())
                .collect(),
            http_paths,
            pods: pods("pod", &args.pod)?,
            from_pods: pods("from-pod", &args.from_pod)?,
            to_pods: pods("to-pod", &args.to_pod)?,
            identities: identities("identity", &args.identity)?,
            from_identities: identities("from-identity", &args.from_identity)?,
            to_identities: identities("to-identity", &args.to_identity)?,
            namespaces,
            ports,
            event_types,
        })
    }

    pub fn matches(&self, record: &FlowRecord) -> bool {
        let http = record.l7.as_ref().map(|l7| &l7.http);
        any_or_empty(&self.verdicts, |verdict| record.verdict == *verdict)
            && any_or_empty(&self.protocols, |protocol| match protocol {
                ProtocolMatch::Http => http.is_some(),
                ProtocolMatch::Tcp => record.l4.as_ref().is_none_or(Layer4::is_tcp),
                ProtocolMatch::Udp => record.l4.as_ref().is_some_and(|l4| l4.udp.is_some()),
            })
            && any_or_empty(&self.http_statuses, |status| {
                http.and_then(|http| http.code)
                    .is_some_and(|code| status.matches(code))
            })
            && any_or_empty(&self.http_methods, |method| {
                http.is_some_and(|http| http.method == *method)
            })
            && any_or_empty(&self.http_paths, |path| {
                http.is_some_and(|http| path.is_match(url_path(&http.url)))
            })
            && any_or_empty(&self.pods, |pod| {
                pod.matches(&record.source) || pod.matches(&record.destination)
            })
            && any_or_empty(&self.from_pods, |pod| pod.matches(&record.source))
            && any_or_empty(&self.to_pods, |pod| pod.matches(&record.destination))
            && any_or_empty(&self.identities, |identity| {
                record.source.identity == *identity || record.destination.identity == *identity
            })
            && any_or_empty(&self.from_identities, |identity| {
                record.source.identity == *identity
            })
            && any_or_empty(&self.to_identities, |identity| {
                record.destination.identity == *identity
            })
            && any_or_empty(&self.namespaces, |namespace| {
                [&record.source, &record.destination]
                    .iter()
                    .any(|endpoint| endpoint.namespace.as_deref() == Some(namespace.as_str()))
            })
            && any_or_empty(&self.ports, |port| {
                record.source.port == *port || record.destination.port == *port
            })
            && any_or_empty(&self.event_types, |event_type| {
                record.event_type() == *event_type
            })
    }
}

fn any_or_empty<T>(wanted: &[T], matches: impl Fn(&T) -> bool) -> bool {
    wanted.is_empty() || wanted.iter().any(matches)
}

/// The path of an `http://authority/path?query` URL, as Hubble's `--http-path` sees it.
fn url_path(url: &str) -> &str {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let path_and_query = after_scheme
        .find('/')
        .map_or("", |start| &after_scheme[start..]);
    path_and_query
        .split_once('?')
        .map_or(path_and_query, |(path, _)| path)
}

/// Recent flows for `--last N` plus a broadcast for `--follow`. Cheap to clone; all clones share
/// one ring. Every recorded event is also counted in the Hubble metrics.
#[derive(Clone)]
pub struct FlowLog {
    inner: Arc<FlowLogInner>,
}

struct FlowLogInner {
    capacity: usize,
    ring: Mutex<VecDeque<Arc<StoredFlow>>>,
    followers: broadcast::Sender<Arc<StoredFlow>>,
    seen: AtomicU64,
    metrics: Metrics,
}

impl FlowLog {
    pub fn new(capacity: usize, metrics: Metrics) -> Self {
        let capacity = capacity.max(1);
        let (followers, _) = broadcast::channel(capacity);
        Self {
            inner: Arc::new(FlowLogInner {
                capacity,
                ring: Mutex::new(VecDeque::with_capacity(capacity)),
                followers,
                seen: AtomicU64::new(0),
                metrics,
            }),
        }
    }

    #[cfg(test)]
    pub(crate) fn record(&self, event: FlowEvent) {
        self.record_batch(&mut vec![event]);
    }

    /// Records proxy events in order: counted in one pass, appended under one lock.
    pub fn record_batch(&self, events: &mut Vec<FlowEvent>) {
        self.inner.metrics.observe_flows(events);
        let mut ring = self.inner.ring.lock().unwrap_or_else(PoisonError::into_inner);
        for event in events.drain(..) {
            self.push_locked(&mut ring, Arc::new(StoredFlow::Proxy(event)));
        }
    }

    /// Records a kernel datapath event seen at `time`.
    pub fn record_kernel(&self, event: &sluice_ebpf::FlowEvent, time: DateTime<Utc>, context: &KernelFlowContext) {
        self.inner.metrics.observe_kernel_flow(event);
        self.push(Arc::new(StoredFlow::Kernel(Box::new(FlowRecord::from_kernel_event(event, time, context)))));
    }

    fn push(&self, record: Arc<StoredFlow>) {
        let mut ring = self
            .inner
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.push_locked(&mut ring, record);
    }

    fn push_locked(&self, ring: &mut VecDeque<Arc<StoredFlow>>, record: Arc<StoredFlow>) {
        if ring.len() == self.inner.capacity {
            ring.pop_front();
        }
        ring.push_back(Arc::clone(&record));
        self.inner.seen.fetch_add(1, Ordering::Relaxed);
        // Sent under the ring lock so a follower's backlog and its live feed never overlap or gap.
        // An error only means nobody is following.
        let _ = self.inner.followers.send(record);
    }

    /// The newest `last` records that match, oldest first.
    pub fn recent(&self, filter: &FlowFilter, last: usize) -> Vec<FlowRecord> {
        let ring = self
            .inner
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        newest_matching(&ring, filter, last)
    }

    /// A live feed of every record from now on (filter it yourself).
    pub fn subscribe(&self) -> FlowSubscription {
        FlowSubscription {
            receiver: self.inner.followers.subscribe(),
            log: self.clone(),
        }
    }

    /// The newest `last` matching records and a feed that continues exactly after them.
    pub fn recent_and_subscribe(
        &self,
        filter: &FlowFilter,
        last: usize,
    ) -> (Vec<FlowRecord>, FlowSubscription) {
        let ring = self
            .inner
            .ring
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let backlog = newest_matching(&ring, filter, last);
        let subscription = FlowSubscription {
            receiver: self.inner.followers.subscribe(),
            log: self.clone(),
        };
        (backlog, subscription)
    }

    #[cfg(test)]
    pub(crate) fn follower_count(&self) -> usize {
        self.inner.followers.receiver_count()
    }

    /// Flows recorded since start.
    pub fn seen(&self) -> u64 {
        self.inner.seen.load(Ordering::Relaxed)
    }

    /// Flows that never reached an observer: dropped by the proxy's queue or skipped by a
    /// follower that fell behind.
    pub fn lost(&self) -> u64 {
        self.inner.metrics.lost_events()
    }
}

/// After draining, the recorder lets events gather before it looks again, so the proxy's
/// workers wake the agent once per batch instead of once per request (+26% req/s on one pinned
/// core, see benches/README.md). How long it waits follows the rate: about
/// `FLOW_BATCH_TARGET` events' worth, at least `FLOW_BATCH_WINDOW` (a busy proxy's batches stay
/// small, so recording them never holds the proxy's core for long) and at most
/// `FLOW_LAG_MAX`, which bounds how late `sluice observe` sees a flow. At 5000 req/s that is
/// ~80 wake-ups a second instead of 500, each one a context switch on the proxy's core.
pub const FLOW_BATCH_WINDOW: Duration = Duration::from_millis(2);
pub const FLOW_LAG_MAX: Duration = Duration::from_millis(20);
const FLOW_BATCH_TARGET: u32 = 64;
const FLOW_BATCH_MAX: usize = 1024;

/// How long to let events gather after a batch of `events` that took `gathering` to arrive.
fn next_window(events: usize, gathering: Duration) -> Duration {
    let events = u32::try_from(events).unwrap_or(u32::MAX).max(1);
    (gathering.saturating_mul(FLOW_BATCH_TARGET) / events).clamp(FLOW_BATCH_WINDOW, FLOW_LAG_MAX)
}

/// Moves the proxy's flow events (the receiver of its `FlowSink`) into `log` until every sink
/// is dropped. An idle agent waits in `recv_many` and is not woken at all.
pub async fn record_from(mut events: tokio::sync::mpsc::Receiver<FlowEvent>, log: FlowLog) {
    let mut last_drain = tokio::time::Instant::now();
    // One batch buffer for the recorder's life: up to FLOW_BATCH_MAX events of a few hundred
    // bytes each, not worth allocating per batch.
    let mut batch = Vec::with_capacity(FLOW_BATCH_MAX);
    loop {
        let received = events.recv_many(&mut batch, FLOW_BATCH_MAX).await;
        if received == 0 {
            return;
        }
        log.record_batch(&mut batch);
        let drained = tokio::time::Instant::now();
        let window = next_window(received, drained - last_drain);
        last_drain = drained;
        tokio::time::sleep(window).await;
    }
}

/// What the ring keeps. A proxy event stays as the proxy sent it and takes Hubble's shape only
/// when someone reads it: the shape costs a dozen allocations, and a busy proxy records tens of
/// thousands of flows a second that nobody may ever look at (shaping them all was ~10% of the
/// proxy's core under load). A kernel event is shaped at once: its names come from the tables
/// in force when it was seen.
#[derive(Debug)]
#[allow(clippy::large_enum_variant, reason = "the common variant is stored inline in its Arc; boxing it would add an allocation per request")]
enum StoredFlow {
    Proxy(FlowEvent),
    /// Boxed: a record is twice an event's size, and every proxy event would pay for it.
    Kernel(Box<FlowRecord>),
}

impl StoredFlow {
    fn record(&self) -> FlowRecord {
        match self {
            Self::Proxy(event) => FlowRecord::from_event(event),
            Self::Kernel(record) => (**record).clone(),
        }
    }
}

fn newest_matching(
    ring: &VecDeque<Arc<StoredFlow>>,
    filter: &FlowFilter,
    last: usize,
) -> Vec<FlowRecord> {
    let mut newest: Vec<FlowRecord> = ring
        .iter()
        .rev()
        .map(|stored| stored.record())
        .filter(|record| filter.matches(record))
        .take(last)
        .collect();
    newest.reverse();
    newest
}

/// A follower's feed. Falling behind by more than the ring's capacity skips the oldest records
/// and counts them as lost instead of slowing the proxy down.
pub struct FlowSubscription {
    receiver: broadcast::Receiver<Arc<StoredFlow>>,
    log: FlowLog,
}

impl FlowSubscription {
    /// The next record, or `None` once the log is gone.
    pub async fn next(&mut self) -> Option<FlowRecord> {
        loop {
            match self.receiver.recv().await {
                Ok(stored) => return Some(stored.record()),
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    tracing::debug!(skipped, "flow follower fell behind");
                    self.log
                        .inner
                        .metrics
                        .add_lost_events(crate::metrics::LOST_SOURCE_FOLLOWER, skipped);
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};
    use std::time::{Duration, SystemTime};

    pub(crate) fn peer(name: Option<&str>, last_octet: u8, port: u16, identity: u32) -> FlowPeer {
        FlowPeer {
            ip: IpAddr::V4(Ipv4Addr::new(198, 18, 0, last_octet)),
            port,
            identity,
            name: name.map(Arc::from),
        }
    }

    pub(crate) fn http(method: &str, url: &str, status: Option<u16>, latency_ms: u64) -> HttpFlow {
        HttpFlow {
            method: http::Method::from_bytes(method.as_bytes()).expect("test method"),
            url: url.to_owned(),
            authority: "deathstar.default".to_owned(),
            protocol: "HTTP/1.1",
            status,
            latency: Duration::from_millis(latency_ms),
        }
    }

    /// tiefighter -> deathstar, at 2024-11-22T19:01:02.123Z.
    pub(crate) fn event(
        verdict: Verdict,
        drop_reason: Option<DropReason>,
        http: Option<HttpFlow>,
    ) -> FlowEvent {
        FlowEvent {
            time: SystemTime::UNIX_EPOCH + Duration::from_millis(1_732_302_062_123),
            generation: 3,
            verdict,
            drop_reason,
            direction: drop_reason.map(|_| TrafficDirection::Ingress),
            source: peer(Some("default/tiefighter"), 10, 40000, 257),
            destination: peer(Some("default/deathstar-0"), 20, 80, 258),
            listener: Arc::from("default/deathstar:80"),
            http,
            cluster: Some(Arc::from("default/deathstar:80")),
            attempts: u32::from(verdict == Verdict::Forwarded),
            policy: Some(Arc::from(
                "CiliumNetworkPolicy default/rule1 spec.ingress[0]",
            )),
        }
    }

    pub(crate) fn landing_ok() -> FlowEvent {
        event(
            Verdict::Forwarded,
            None,
            Some(http("POST", "/v1/request-landing", Some(200), 3)),
        )
    }

    pub(crate) fn exhaust_denied() -> FlowEvent {
        event(
            Verdict::Dropped,
            Some(DropReason::L7PolicyDenied),
            Some(http("PUT", "/v1/exhaust-port", Some(403), 0)),
        )
    }

    fn xwing_l4_denied() -> FlowEvent {
        let mut denied = event(Verdict::Dropped, Some(DropReason::PolicyDenied), None);
        denied.source = peer(Some("default/xwing"), 11, 41000, 259);
        denied
    }

    fn record(event: FlowEvent) -> FlowRecord {
        FlowRecord::from_event(&event)
    }

    #[test]
    fn summaries_read_like_hubble() {
        assert_eq!(
            record(exhaust_denied()).summary,
            "http-request DROPPED (HTTP/1.1 PUT http://deathstar.default/v1/exhaust-port)"
        );
        assert_eq!(
            record(landing_ok()).summary,
            "http-response FORWARDED (HTTP/1.1 200 3ms (POST http://deathstar.default/v1/request-landing))"
        );
        assert_eq!(
            record(xwing_l4_denied()).summary,
            "Policy denied DROPPED (TCP)"
        );
        let upstream_failed = event(
            Verdict::Error,
            Some(DropReason::UpstreamFailure),
            Some(http("GET", "/", Some(503), 12)),
        );
        assert_eq!(
            record(upstream_failed).summary,
            "http-response ERROR (HTTP/1.1 503 12ms (GET http://deathstar.default/))"
        );
    }

    #[test]
    fn record_json_uses_hubble_field_names() {
        let json = serde_json::to_value(record(exhaust_denied())).expect("serializes");
        assert_eq!(json["time"], "2024-11-22T19:01:02.123Z");
        assert_eq!(json["verdict"], "DROPPED");
        assert_eq!(json["drop_reason_desc"], "L7_POLICY_DENIED");
        assert_eq!(json["Type"], "L7");
        assert_eq!(json["traffic_direction"], "INGRESS");
        assert_eq!(json["source"]["namespace"], "default");
        assert_eq!(json["source"]["pod_name"], "tiefighter");
        assert_eq!(json["source"]["identity"], 257);
        assert_eq!(json["destination"]["port"], 80);
        assert_eq!(json["l7"]["type"], "REQUEST");
        assert_eq!(json["l7"]["http"]["code"], 403);
        assert_eq!(
            json["l7"]["http"]["url"],
            "http://deathstar.default/v1/exhaust-port"
        );
        let back: FlowRecord = serde_json::from_value(json).expect("deserializes");
        assert_eq!(back, record(exhaust_denied()));
    }

    fn args(fill: impl FnOnce(&mut FilterArgs)) -> FilterArgs {
        let mut args = FilterArgs::default();
        fill(&mut args);
        args
    }

    fn strings(values: &[&str]) -> Vec<String> {
        values.iter().map(|value| (*value).to_owned()).collect()
    }

    #[test]
    fn filters_select_the_flows_hubble_would() {
        let ok = record(landing_ok());
        let denied = record(exhaust_denied());
        let l4 = record(xwing_l4_denied());
        let mut world_source = landing_ok();
        world_source.source = peer(None, 99, 50000, IDENTITY_WORLD);
        let world = record(world_source);
        let table: Vec<(&str, FilterArgs, [bool; 4])> = vec![
            ("no filter", FilterArgs::default(), [true, true, true, true]),
            (
                "verdict",
                args(|a| a.verdict = strings(&["dropped"])),
                [false, true, true, false],
            ),
            (
                "verdict or",
                args(|a| a.verdict = strings(&["FORWARDED", "DROPPED"])),
                [true, true, true, true],
            ),
            (
                "protocol http",
                args(|a| a.protocol = strings(&["http"])),
                [true, true, false, true],
            ),
            (
                "protocol tcp",
                args(|a| a.protocol = strings(&["TCP"])),
                [true, true, true, true],
            ),
            (
                "status exact",
                args(|a| a.http_status = strings(&["403"])),
                [false, true, false, false],
            ),
            (
                "status prefix",
                args(|a| a.http_status = strings(&["2+"])),
                [true, false, false, true],
            ),
            (
                "status two-digit prefix",
                args(|a| a.http_status = strings(&["40+"])),
                [false, true, false, false],
            ),
            (
                "method",
                args(|a| a.http_method = strings(&["put"])),
                [false, true, false, false],
            ),
            (
                "path regex",
                args(|a| a.http_path = strings(&["^/v1/request"])),
                [true, false, false, true],
            ),
            (
                "path ignores authority",
                args(|a| a.http_path = strings(&["deathstar"])),
                [false, false, false, false],
            ),
            (
                "pod either side",
                args(|a| a.pod = strings(&["deathstar"])),
                [true, true, true, true],
            ),
            (
                "pod with namespace",
                args(|a| a.pod = strings(&["default/xwing"])),
                [false, false, true, false],
            ),
            (
                "pod other namespace",
                args(|a| a.pod = strings(&["kube-system/"])),
                [false, false, false, false],
            ),
            (
                "whole namespace",
                args(|a| a.pod = strings(&["default/"])),
                [true, true, true, true],
            ),
            (
                "from pod",
                args(|a| a.from_pod = strings(&["tie"])),
                [true, true, false, false],
            ),
            (
                "to pod is destination only",
                args(|a| a.to_pod = strings(&["tiefighter"])),
                [false, false, false, false],
            ),
            (
                "flags are ANDed",
                args(|a| {
                    a.from_pod = strings(&["tiefighter"]);
                    a.verdict = strings(&["DROPPED"]);
                }),
                [false, true, false, false],
            ),
        ];
        for (name, filter_args, expected) in table {
            let filter = FlowFilter::parse(&filter_args).expect(name);
            let got = [&ok, &denied, &l4, &world].map(|record| filter.matches(record));
            assert_eq!(got, expected, "{name}");
        }
    }

    /// kube-system/probe -> kube-system/metrics-0:9090, forwarded as plain TCP.
    fn probe_trace() -> FlowEvent {
        let mut trace = event(Verdict::Forwarded, None, None);
        trace.source = peer(Some("kube-system/probe"), 12, 53000, 300);
        trace.destination = peer(Some("kube-system/metrics-0"), 13, 9090, 301);
        trace
    }

    #[test]
    fn identity_namespace_port_and_type_filters_select_the_flows_hubble_would() {
        let ok = record(landing_ok());
        let denied = record(exhaust_denied());
        let l4 = record(xwing_l4_denied());
        let mut world_source = landing_ok();
        world_source.source = peer(None, 99, 50000, IDENTITY_WORLD);
        let world = record(world_source);
        let trace = record(probe_trace());
        // Gateway mode: the proxy read the request before the L3/L4 policy refused the caller.
        let mut gateway_l4_denied = xwing_l4_denied();
        gateway_l4_denied.http = Some(http("POST", "/v1/request-landing", None, 0));
        let gateway_l4 = record(gateway_l4_denied);
        let table: Vec<(&str, FilterArgs, [bool; 6])> = vec![
            (
                "identity either side",
                args(|a| a.identity = strings(&["258"])),
                [true, true, true, true, false, true],
            ),
            (
                "identity by reserved name",
                args(|a| a.identity = strings(&["world"])),
                [false, false, false, true, false, false],
            ),
            (
                "identity with the reserved: prefix",
                args(|a| a.identity = strings(&["reserved:world"])),
                [false, false, false, true, false, false],
            ),
            (
                "identities or",
                args(|a| a.identity = strings(&["257", "300"])),
                [true, true, false, false, true, false],
            ),
            (
                "from identity is source only",
                args(|a| a.from_identity = strings(&["258"])),
                [false, false, false, false, false, false],
            ),
            (
                "from identity",
                args(|a| a.from_identity = strings(&["259"])),
                [false, false, true, false, false, true],
            ),
            (
                "to identity",
                args(|a| a.to_identity = strings(&["258"])),
                [true, true, true, true, false, true],
            ),
            (
                "namespace either side",
                args(|a| a.namespace = strings(&["default"])),
                [true, true, true, true, false, true],
            ),
            (
                "namespace other",
                args(|a| a.namespace = strings(&["kube-system"])),
                [false, false, false, false, true, false],
            ),
            (
                "namespaces or",
                args(|a| a.namespace = strings(&["default", "kube-system"])),
                [true, true, true, true, true, true],
            ),
            (
                "destination port",
                args(|a| a.port = strings(&["80"])),
                [true, true, true, true, false, true],
            ),
            (
                "source port",
                args(|a| a.port = strings(&["41000"])),
                [false, false, true, false, false, true],
            ),
            (
                "type l7",
                args(|a| a.event_type = strings(&["l7"])),
                [true, true, false, true, false, false],
            ),
            (
                "type drop is an L3/L4 refusal, not an L7 denial",
                args(|a| a.event_type = strings(&["drop"])),
                [false, false, true, false, false, true],
            ),
            (
                "type trace",
                args(|a| a.event_type = strings(&["trace"])),
                [false, false, false, false, true, false],
            ),
            (
                "type with subtype, any case",
                args(|a| a.event_type = strings(&["TRACE:to-endpoint"])),
                [false, false, false, false, true, false],
            ),
            (
                "types or",
                args(|a| a.event_type = strings(&["drop", "trace"])),
                [false, false, true, false, true, true],
            ),
            (
                "new flags are ANDed with the others",
                args(|a| {
                    a.namespace = strings(&["default"]);
                    a.event_type = strings(&["l7"]);
                    a.to_identity = strings(&["258"]);
                    a.verdict = strings(&["DROPPED"]);
                }),
                [false, true, false, false, false, false],
            ),
        ];
        for (name, filter_args, expected) in table {
            let filter = FlowFilter::parse(&filter_args).expect(name);
            let got = [&ok, &denied, &l4, &world, &trace, &gateway_l4].map(|record| filter.matches(record));
            assert_eq!(got, expected, "{name}");
        }
    }

    #[test]
    fn bad_filters_are_rejected_with_the_flag_named() {
        let cases: Vec<(FilterArgs, &str)> = vec![
            (
                args(|a| a.verdict = strings(&["ALLOWED"])),
                "--verdict \"ALLOWED\"",
            ),
            (
                args(|a| a.protocol = strings(&["icmp"])),
                "--protocol \"icmp\"",
            ),
            (
                args(|a| a.http_status = strings(&["4xx"])),
                "--http-status \"4xx\"",
            ),
            (
                args(|a| a.http_status = strings(&["404+"])),
                "--http-status \"404+\"",
            ),
            (
                args(|a| a.http_status = strings(&["40"])),
                "--http-status \"40\"",
            ),
            (
                args(|a| a.http_path = strings(&["(unclosed"])),
                "--http-path \"(unclosed\"",
            ),
            (
                args(|a| a.to_pod = strings(&["/deathstar"])),
                "--to-pod \"/deathstar\"",
            ),
            (args(|a| a.pod = strings(&["a/b/c"])), "--pod \"a/b/c\""),
            (
                args(|a| a.identity = strings(&["health"])),
                "--identity \"health\": expected a numeric identity",
            ),
            (
                args(|a| a.from_identity = strings(&["-1"])),
                "--from-identity \"-1\"",
            ),
            (
                args(|a| a.to_identity = strings(&["reserved:"])),
                "--to-identity \"reserved:\"",
            ),
            (
                args(|a| a.namespace = strings(&["default/x"])),
                "--namespace \"default/x\"",
            ),
            (args(|a| a.namespace = strings(&[""])), "--namespace \"\""),
            (args(|a| a.port = strings(&["http"])), "--port \"http\""),
            (args(|a| a.port = strings(&["70000"])), "--port \"70000\""),
            (
                args(|a| a.event_type = strings(&["policy-verdict"])),
                "--type \"policy-verdict\": sluice records l7, drop and trace",
            ),
            (
                args(|a| a.event_type = strings(&["trace:to-proxy"])),
                "--type \"trace:to-proxy\"",
            ),
        ];
        for (filter_args, message_start) in cases {
            let err = FlowFilter::parse(&filter_args).expect_err(message_start);
            assert!(
                err.to_string().starts_with(message_start),
                "{err} should start with {message_start}"
            );
        }
    }

    #[test]
    fn query_pairs_round_trip() {
        let original = args(|a| {
            a.verdict = strings(&["DROPPED"]);
            a.http_status = strings(&["4+", "503"]);
            a.to_pod = strings(&["default/deathstar"]);
            a.identity = strings(&["world"]);
            a.from_identity = strings(&["257"]);
            a.to_identity = strings(&["258"]);
            a.namespace = strings(&["default", "kube-system"]);
            a.port = strings(&["80"]);
            a.event_type = strings(&["l7"]);
        });
        let mut parsed = FilterArgs::default();
        for (key, value) in original.query_pairs() {
            assert!(parsed.push_query_pair(key, value.to_owned()), "{key}");
        }
        assert_eq!(parsed, original);
        assert!(!parsed.push_query_pair("last", "3".to_owned()));
    }

    #[test]
    fn ring_keeps_the_newest_and_counts_everything() {
        let log = FlowLog::new(2, Metrics::new());
        log.record(landing_ok());
        log.record(exhaust_denied());
        log.record(xwing_l4_denied());
        assert_eq!(log.seen(), 3);
        let all = log.recent(&FlowFilter::default(), 10);
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].summary, record(exhaust_denied()).summary);
        assert_eq!(all[1].summary, record(xwing_l4_denied()).summary);
        let newest = log.recent(&FlowFilter::default(), 1);
        assert_eq!(newest, vec![record(xwing_l4_denied())]);
        let http_only =
            FlowFilter::parse(&args(|a| a.protocol = strings(&["http"]))).expect("valid");
        assert_eq!(log.recent(&http_only, 10), vec![record(exhaust_denied())]);
    }

    #[tokio::test]
    async fn follower_gets_new_flows_after_its_backlog() {
        let log = FlowLog::new(8, Metrics::new());
        log.record(landing_ok());
        let (backlog, mut feed) = log.recent_and_subscribe(&FlowFilter::default(), 5);
        assert_eq!(backlog, vec![record(landing_ok())]);
        log.record(exhaust_denied());
        let next = feed.next().await.expect("feed open");
        assert_eq!(next, record(exhaust_denied()));
    }

    #[tokio::test]
    async fn events_from_the_proxy_sink_are_recorded() {
        let (sink, events) = sluice_proxy::FlowSink::new(8);
        let log = FlowLog::new(8, Metrics::new());
        sink.send(landing_ok());
        sink.send(exhaust_denied());
        drop(sink);
        record_from(events, log.clone()).await;
        assert_eq!(
            log.recent(&FlowFilter::default(), 10),
            vec![record(landing_ok()), record(exhaust_denied())]
        );
    }

    #[test]
    fn the_batch_window_follows_the_rate_within_its_bounds() {
        let ms = Duration::from_millis;
        assert_eq!(next_window(128, ms(2)), FLOW_BATCH_WINDOW, "64k events/s: the shortest window");
        assert_eq!(next_window(10, ms(2)), ms(12) + Duration::from_micros(800), "5k events/s: about 64 events' worth");
        assert_eq!(next_window(1, ms(10_000)), FLOW_LAG_MAX, "after an idle spell: the longest window");
        assert_eq!(next_window(0, Duration::ZERO), FLOW_BATCH_WINDOW);
        assert_eq!(next_window(usize::MAX, ms(1)), FLOW_BATCH_WINDOW);
        assert_eq!(next_window(1, Duration::MAX), FLOW_LAG_MAX);
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_of_events_is_recorded_within_the_longest_window() {
        let (sink, events) = sluice_proxy::FlowSink::new(8);
        let log = FlowLog::new(8, Metrics::new());
        let recorder = tokio::spawn(record_from(events, log.clone()));
        let recorded = || log.recent(&FlowFilter::default(), 10).len();
        tokio::time::sleep(Duration::from_secs(1)).await;
        sink.send(landing_ok());
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert_eq!(recorded(), 1, "the first event after an idle spell is taken at once");
        sink.send(exhaust_denied());
        tokio::time::sleep(FLOW_BATCH_WINDOW).await;
        assert_eq!(recorded(), 1, "a trickle waits longer than the shortest window");
        tokio::time::sleep(FLOW_LAG_MAX).await;
        assert_eq!(recorded(), 2, "and no longer than the longest");
        drop(sink);
        recorder.await.expect("recorder finished");
    }

    #[tokio::test(start_paused = true)]
    async fn events_sent_while_the_recorder_waits_land_in_its_next_batch() {
        let (sink, events) = sluice_proxy::FlowSink::new(8);
        let log = FlowLog::new(8, Metrics::new());
        let recorder = tokio::spawn(record_from(events, log.clone()));
        sink.send(landing_ok());
        tokio::time::sleep(FLOW_BATCH_WINDOW / 2).await;
        assert_eq!(log.recent(&FlowFilter::default(), 10), vec![record(landing_ok())]);
        sink.send(exhaust_denied());
        drop(sink);
        recorder.await.expect("recorder finished");
        assert_eq!(
            log.recent(&FlowFilter::default(), 10),
            vec![record(landing_ok()), record(exhaust_denied())]
        );
    }

    #[tokio::test]
    async fn a_follower_that_falls_behind_counts_lost_flows() {
        let log = FlowLog::new(2, Metrics::new());
        let mut feed = log.subscribe();
        for _ in 0..5 {
            log.record(landing_ok());
        }
        assert!(feed.next().await.is_some());
        assert_eq!(log.lost(), 3);
    }

    fn kernel_event(verdict: sluice_ebpf::Verdict, protocol: u8, tcp_flags: u8) -> sluice_ebpf::FlowEvent {
        sluice_ebpf::FlowEvent {
            monotonic_ns: 0,
            verdict,
            drop_reason: (verdict == sluice_ebpf::Verdict::Dropped).then_some(sluice_ebpf::DropReason::PolicyDenied),
            source: "198.18.0.13:40000".parse().expect("addr"),
            destination: "198.18.0.10:80".parse().expect("addr"),
            protocol,
            tcp_flags,
            src_identity: 258,
            dst_identity: 256,
            direction: sluice_ebpf::Direction::Ingress,
            observation_point: sluice_ebpf::ObservationPoint::FromEndpoint,
            ifindex: 5,
            proxy_port: 0,
        }
    }

    fn kernel_context() -> KernelFlowContext {
        let peer = |name: &str, identity| sluice_proxy::tables::Peer { identity, name: name.to_owned(), labels: Vec::new() };
        KernelFlowContext {
            peers: [
                (IpAddr::from([198, 18, 0, 13]), peer("default/xwing", 258)),
                (IpAddr::from([198, 18, 0, 10]), peer("default/deathstar-0", 256)),
            ]
            .into_iter()
            .collect(),
            generation: 3,
        }
    }

    #[test]
    fn a_kernel_policy_drop_reads_as_hubble_prints_it() {
        let time = DateTime::<Utc>::from(SystemTime::UNIX_EPOCH);
        let record = FlowRecord::from_kernel_event(&kernel_event(sluice_ebpf::Verdict::Dropped, 6, 0x02), time, &kernel_context());
        assert_eq!(record.summary, "Policy denied DROPPED (TCP Flags: SYN)");
        assert_eq!((record.drop_reason, record.drop_reason_desc.as_deref()), (Some(133), Some("POLICY_DENIED")));
        assert_eq!(record.source.qualified_name().as_deref(), Some("default/xwing"));
        assert_eq!(record.destination.qualified_name().as_deref(), Some("default/deathstar-0"));
        assert_eq!((record.event_type(), record.generation), (EventType::Drop, 3));
        let json = serde_json::to_value(&record).expect("serializes");
        assert_eq!(json["l4"]["TCP"]["flags"]["SYN"], true);
        assert_eq!(json["trace_observation_point"], "FROM_ENDPOINT");
    }

    #[test]
    fn kernel_redirects_and_udp_flows_match_their_filters() -> Result<(), FilterError> {
        let time = DateTime::<Utc>::from(SystemTime::UNIX_EPOCH);
        let redirected = FlowRecord::from_kernel_event(&kernel_event(sluice_ebpf::Verdict::Redirected, 6, 0x02), time, &kernel_context());
        assert_eq!(redirected.summary, "to-proxy REDIRECTED (TCP Flags: SYN)");
        let udp = FlowRecord::from_kernel_event(&kernel_event(sluice_ebpf::Verdict::Forwarded, 17, 0), time, &kernel_context());
        assert_eq!(udp.summary, "from-endpoint FORWARDED (UDP)");
        let redirects = FlowFilter::parse(&args(|a| a.verdict = strings(&["redirected"])))?;
        assert!(redirects.matches(&redirected) && !redirects.matches(&udp));
        let udp_only = FlowFilter::parse(&args(|a| a.protocol = strings(&["udp"])))?;
        assert!(udp_only.matches(&udp) && !udp_only.matches(&redirected));
        let tcp_only = FlowFilter::parse(&args(|a| a.protocol = strings(&["tcp"])))?;
        assert!(tcp_only.matches(&redirected) && !tcp_only.matches(&udp));
        Ok(())
    }
}
