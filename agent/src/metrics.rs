//! Observe: flow events and agent/proxy state -> Prometheus metrics with Hubble's names, served on `GET /metrics`.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_proxy::flow::{DropReason, FlowEvent, TrafficDirection, Verdict};
use sluice_proxy::{ClusterStats, ProxyStats};

use crate::flows::{drop_reason_name, verdict_name, EventType};

/// Hubble's `lost_events_total{source}` for events the proxy's bounded queue dropped.
pub const LOST_SOURCE_PROXY_QUEUE: &str = "observer_events_queue";
/// Hubble's `lost_events_total{source}` for records a slow follower skipped.
pub const LOST_SOURCE_FOLLOWER: &str = "hubble_ring_buffer";

/// Prometheus' default buckets, which Hubble uses for `http_request_duration_seconds`.
const DURATION_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FlowLabels {
    r#type: &'static str,
    subtype: &'static str,
    verdict: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    reason: &'static str,
    protocol: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpRequestLabels {
    method: Cow<'static, str>,
    protocol: &'static str,
    reporter: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpResponseLabels {
    method: Cow<'static, str>,
    status: u16,
    reporter: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpDurationLabels {
    method: Cow<'static, str>,
    reporter: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LostLabels {
    source: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyVerdictLabels {
    direction: &'static str,
    r#match: &'static str,
    action: &'static str,
}

type Field<T> = fn(&T) -> u64;

/// `sluice_proxy_<name>`: (name, help, value) of the proxy's own counters. Counters get
/// `_total` appended by the encoder.
const PROXY_GAUGES: [(&str, &str, Field<ProxyStats>); 2] = [
    (
        "downstream_cx_active",
        "Downstream connections open now",
        |s| s.downstream_cx_active,
    ),
    (
        "upstream_cx_active",
        "Upstream connections open now, over all clusters",
        |s| s.upstream_cx_active,
    ),
];
const PROXY_COUNTERS: [(&str, &str, Field<ProxyStats>); 2] = [
    ("downstream_cx", "Downstream connections accepted", |s| {
        s.downstream_cx_total
    }),
    ("downstream_rq", "Downstream requests received", |s| {
        s.downstream_rq_total
    }),
];
/// `sluice_proxy_cluster_<name>{cluster}`.
const CLUSTER_GAUGES: [(&str, &str, Field<ClusterStats>); 3] = [
    (
        "upstream_cx_active",
        "Open connections to the cluster's hosts",
        |c| c.upstream_cx_active,
    ),
    (
        "upstream_rq_active",
        "Requests in flight to the cluster",
        |c| c.upstream_rq_active,
    ),
    (
        "ejections_active",
        "Hosts ejected by outlier detection now",
        |c| c.ejections_active,
    ),
];
const CLUSTER_COUNTERS: [(&str, &str, Field<ClusterStats>); 9] = [
    (
        "upstream_cx_overflow",
        "Connections opened past max_connections",
        |c| c.upstream_cx_overflow,
    ),
    (
        "upstream_cx_connect_fail",
        "Connection attempts that failed or timed out",
        |c| c.upstream_cx_connect_fail,
    ),
    (
        "upstream_rq",
        "Upstream attempts (first tries and retries)",
        |c| c.upstream_rq_total,
    ),
    (
        "upstream_rq_pending_overflow",
        "Requests refused by the circuit breaker (503)",
        |c| c.upstream_rq_pending_overflow,
    ),
    ("upstream_rq_retry", "Retries made", |c| c.upstream_rq_retry),
    (
        "upstream_rq_retry_overflow",
        "Retries not made because max_retries were running",
        |c| c.upstream_rq_retry_overflow,
    ),
    (
        "upstream_rq_timeout",
        "Requests that ran out of their route timeout (504)",
        |c| c.upstream_rq_timeout,
    ),
    (
        "upstream_rq_per_try_timeout",
        "Attempts that ran out of their per-try timeout",
        |c| c.upstream_rq_per_try_timeout,
    ),
    ("ejections_enforced", "Outlier ejections enforced", |c| {
        c.ejections_enforced_total
    }),
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabels {
    cluster: String,
}

/// The agent's metrics. Cheap to clone; clones share the registry.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    flows_processed: Family<FlowLabels, Counter>,
    drops: Family<DropLabels, Counter>,
    http_requests: Family<HttpRequestLabels, Counter>,
    http_responses: Family<HttpResponseLabels, Counter>,
    http_duration: Family<HttpDurationLabels, Histogram>,
    policy_verdicts: Family<PolicyVerdictLabels, Counter>,
    lost_proxy_queue: Counter,
    lost_follower: Counter,
    config_errors: Gauge,
    tables_generation: Gauge,
    proxy_workers: Gauge,
    proxy_listeners: Gauge,
    proxy_gauges: Vec<Gauge>,
    proxy_counters: Vec<Counter>,
    cluster_gauges: Vec<Family<ClusterLabels, Gauge>>,
    cluster_counters: Vec<Family<ClusterLabels, Counter>>,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let hubble = registry.sub_registry_with_prefix("hubble");
        let flows_processed = Family::default();
        hubble.register(
            "flows_processed",
            "Total number of flows processed",
            flows_processed.clone(),
        );
        let drops = Family::default();
        hubble.register("drop", "Number of drops", drops.clone());
        let http_requests = Family::default();
        hubble.register(
            "http_requests",
            "Count of HTTP requests",
            http_requests.clone(),
        );
        let http_responses = Family::default();
        hubble.register(
            "http_responses",
            "Count of HTTP responses",
            http_responses.clone(),
        );
        let http_duration = Family::<HttpDurationLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        hubble.register(
            "http_request_duration_seconds",
            "Quantiles of HTTP request duration in seconds",
            http_duration.clone(),
        );
        let policy_verdicts = Family::default();
        hubble.register(
            "policy_verdicts",
            "Number of policy verdicts",
            policy_verdicts.clone(),
        );
        let lost_events = Family::<LostLabels, Counter>::default();
        hubble.register("lost_events", "Number of lost events", lost_events.clone());
        let lost_proxy_queue = lost_events
            .get_or_create(&LostLabels {
                source: LOST_SOURCE_PROXY_QUEUE,
            })
            .clone();
        let lost_follower = lost_events
            .get_or_create(&LostLabels {
                source: LOST_SOURCE_FOLLOWER,
            })
            .clone();

        let sluice = registry.sub_registry_with_prefix("sluice");
        let config_errors: Gauge = register(
            sluice,
            "config_errors",
            "Configuration errors currently reported (the objects keep their last good state)",
        );
        let tables_generation: Gauge = register(
            sluice,
            "tables_generation",
            "Generation of the proxy tables currently applied",
        );
        let proxy = sluice.sub_registry_with_prefix("proxy");
        let proxy_workers: Gauge = register(proxy, "workers", "Proxy worker threads");
        let proxy_listeners: Gauge = register(proxy, "listeners", "Listeners the proxy has bound");
        let proxy_gauges = PROXY_GAUGES
            .iter()
            .map(|(name, help, _)| register(proxy, name, help))
            .collect();
        let proxy_counters = PROXY_COUNTERS
            .iter()
            .map(|(name, help, _)| register(proxy, name, help))
            .collect();
        let cluster = proxy.sub_registry_with_prefix("cluster");
        let cluster_gauges = CLUSTER_GAUGES
            .iter()
            .map(|(name, help, _)| register(cluster, name, help))
            .collect();
        let cluster_counters = CLUSTER_COUNTERS
            .iter()
            .map(|(name, help, _)| register(cluster, name, help))
            .collect();

        Self {
            registry: Arc::new(registry),
            flows_processed,
            drops,
            http_requests,
            http_responses,
            http_duration,
            policy_verdicts,
            lost_proxy_queue,
            lost_follower,
            config_errors,
            tables_generation,
            proxy_workers,
            proxy_listeners,
            proxy_gauges,
            proxy_counters,
            cluster_gauges,
            cluster_counters,
        }
    }

    /// Counts one flow in every Hubble metric it belongs to.
    #[cfg(test)]
    pub(crate) fn observe_flow(&self, event: &FlowEvent) {
        self.observe_flows(std::slice::from_ref(event));
    }

    /// Counts a batch of flows. Each distinct label set is looked up once per batch (a family
    /// lookup hashes the labels under a lock, and a busy proxy sends batches of hundreds of
    /// flows that mostly share their labels).
    pub fn observe_flows(&self, events: &[FlowEvent]) {
        let mut flows = Tally::default();
        let mut drops = Tally::default();
        let mut requests = Tally::default();
        let mut responses = Tally::default();
        let mut verdicts = Tally::default();
        let mut durations: Vec<(HttpDurationLabels, Vec<f64>)> = Vec::new();
        for event in events {
            let (r#type, subtype) = EventType::of(
                event.http.is_some(),
                event.verdict == Verdict::Dropped,
                event.drop_reason.map(drop_reason_name),
            )
            .metric_labels();
            flows.add(FlowLabels { r#type, subtype, verdict: verdict_name(event.verdict) });
            if event.verdict == Verdict::Dropped {
                let reason = event.drop_reason.map_or("UNKNOWN", drop_reason_name);
                drops.add(DropLabels { reason, protocol: "TCP" });
            }
            if let Some(http) = &event.http {
                let reporter = reporter(event.direction);
                let method = method_label(&http.method);
                requests.add(HttpRequestLabels { method: method.clone(), protocol: http.protocol, reporter });
                if let Some(status) = http.status {
                    responses.add(HttpResponseLabels { method: method.clone(), status, reporter });
                    let labels = HttpDurationLabels { method, reporter };
                    let seconds = http.latency.as_secs_f64();
                    match durations.iter_mut().find(|(seen, _)| *seen == labels) {
                        Some((_, values)) => values.push(seconds),
                        None => durations.push((labels, vec![seconds])),
                    }
                }
            }
            if let Some(labels) = policy_verdict(event) {
                verdicts.add(labels);
            }
        }
        flows.apply(&self.flows_processed);
        drops.apply(&self.drops);
        requests.apply(&self.http_requests);
        responses.apply(&self.http_responses);
        verdicts.apply(&self.policy_verdicts);
        for (labels, values) in durations {
            let histogram = self.http_duration.get_or_create(&labels);
            values.into_iter().for_each(|seconds| histogram.observe(seconds));
        }
    }

    /// Counts one kernel datapath event: every flow in `hubble_flows_processed_total`, every
    /// drop in `hubble_drop_total`, policy drops in `hubble_policy_verdicts_total`.
    pub fn observe_kernel_flow(&self, event: &sluice_ebpf::FlowEvent) {
        let dropped = event.verdict == sluice_ebpf::Verdict::Dropped;
        let (r#type, subtype) = match event.verdict {
            sluice_ebpf::Verdict::Dropped => ("Drop", ""),
            sluice_ebpf::Verdict::Redirected => ("Trace", "to-proxy"),
            sluice_ebpf::Verdict::Forwarded => ("Trace", "to-endpoint"),
        };
        self.flows_processed
            .get_or_create(&FlowLabels { r#type, subtype, verdict: event.verdict.hubble_name() })
            .inc();
        let Some(reason) = event.drop_reason.filter(|_| dropped) else { return };
        let protocol = match event.protocol {
            sluice_ebpf::state::IPPROTO_TCP => "TCP",
            sluice_ebpf::state::IPPROTO_UDP => "UDP",
            sluice_ebpf::state::IPPROTO_ICMP => "ICMPv4",
            sluice_ebpf::state::IPPROTO_SCTP => "SCTP",
            _ => "UNKNOWN",
        };
        self.drops.get_or_create(&DropLabels { reason: reason.hubble_name(), protocol }).inc();
        let r#match = match reason {
            sluice_ebpf::DropReason::PolicyDenied => "none",
            sluice_ebpf::DropReason::PolicyDeny | sluice_ebpf::DropReason::AuthRequired => "l3-l4",
            _ => return,
        };
        let direction = match event.direction {
            sluice_ebpf::Direction::Ingress => "ingress",
            sluice_ebpf::Direction::Egress => "egress",
        };
        self.policy_verdicts.get_or_create(&PolicyVerdictLabels { direction, r#match, action: "dropped" }).inc();
    }

    pub fn add_lost_events(&self, source: &'static str, count: u64) {
        match source {
            LOST_SOURCE_PROXY_QUEUE => self.lost_proxy_queue.inc_by(count),
            _ => self.lost_follower.inc_by(count),
        };
    }

    /// All lost events, from every source.
    pub fn lost_events(&self) -> u64 {
        self.lost_proxy_queue.get() + self.lost_follower.get()
    }

    /// The agent's view of its configuration after an apply.
    pub fn set_config_state(&self, errors: usize, tables_generation: u64) {
        self.config_errors
            .set(i64::try_from(errors).unwrap_or(i64::MAX));
        self.tables_generation
            .set(saturating_i64(tables_generation));
    }

    /// Mirrors the proxy's counters; `workers` and `listeners` are what the agent configured
    /// and what the last apply bound.
    pub fn set_proxy_stats(&self, stats: &ProxyStats, workers: usize, listeners: usize) {
        self.proxy_workers.set(saturating_i64(workers as u64));
        self.proxy_listeners.set(saturating_i64(listeners as u64));
        for ((_, _, value), gauge) in PROXY_GAUGES.iter().zip(&self.proxy_gauges) {
            gauge.set(saturating_i64(value(stats)));
        }
        // The proxy keeps cumulative counts: mirror them rather than adding deltas, so a missed
        // or repeated sample never miscounts.
        for ((_, _, value), counter) in PROXY_COUNTERS.iter().zip(&self.proxy_counters) {
            counter.inner().store(value(stats), Ordering::Relaxed);
        }
        self.lost_proxy_queue
            .inner()
            .store(stats.flows_lost, Ordering::Relaxed);
        // A cluster that is gone from the tables loses its series.
        for family in &self.cluster_gauges {
            family.clear();
        }
        for family in &self.cluster_counters {
            family.clear();
        }
        for (name, cluster) in &stats.clusters {
            let labels = ClusterLabels {
                cluster: name.clone(),
            };
            for ((_, _, value), family) in CLUSTER_GAUGES.iter().zip(&self.cluster_gauges) {
                family
                    .get_or_create(&labels)
                    .set(saturating_i64(value(cluster)));
            }
            for ((_, _, value), family) in CLUSTER_COUNTERS.iter().zip(&self.cluster_counters) {
                family
                    .get_or_create(&labels)
                    .inner()
                    .store(value(cluster), Ordering::Relaxed);
            }
        }
    }

    /// The OpenMetrics text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(%err, "encoding metrics failed");
        }
        text
    }
}

fn register<M: prometheus_client::registry::Metric + Clone + Default>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> M {
    let metric = M::default();
    registry.register(name, help, metric.clone());
    metric
}

fn saturating_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// Hubble's `reporter` label: the server's proxy sees ingress, the client's sees egress.
fn reporter(direction: Option<TrafficDirection>) -> &'static str {
    match direction {
        Some(TrafficDirection::Ingress) => "server",
        Some(TrafficDirection::Egress) => "client",
        None => "unknown",
    }
}

/// A policy verdict is counted when the event says whose policy decided.
/// How many times each label set occurred in a batch (a few distinct sets, so a list).
struct Tally<L>(Vec<(L, u64)>);

impl<L> Default for Tally<L> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug + Send + Sync + 'static> Tally<L> {
    fn add(&mut self, labels: L) {
        match self.0.iter_mut().find(|(seen, _)| *seen == labels) {
            Some((_, count)) => *count += 1,
            None => self.0.push((labels, 1)),
        }
    }

    fn apply(self, family: &Family<L, Counter>) {
        for (labels, count) in self.0 {
            family.get_or_create(&labels).inc_by(count);
        }
    }
}

/// The method as a label value, without an allocation for the standard methods (every flow
/// is counted with it).
fn method_label(method: &http::Method) -> Cow<'static, str> {
    static STANDARD: [http::Method; 9] = [
        http::Method::GET,
        http::Method::POST,
        http::Method::PUT,
        http::Method::DELETE,
        http::Method::HEAD,
        http::Method::OPTIONS,
        http::Method::PATCH,
        http::Method::CONNECT,
        http::Method::TRACE,
    ];
    match STANDARD.iter().find(|standard| *standard == method) {
        Some(standard) => Cow::Borrowed(standard.as_str()),
        None => Cow::Owned(method.as_str().to_owned()),
    }
}

fn policy_verdict(event: &FlowEvent) -> Option<PolicyVerdictLabels> {
    let direction = match event.direction? {
        TrafficDirection::Ingress => "ingress",
        TrafficDirection::Egress => "egress",
    };
    let r#match = match event.drop_reason {
        Some(DropReason::PolicyDenied) => "none",
        Some(DropReason::PolicyDeny | DropReason::AuthRequired) => "l3-l4",
        Some(DropReason::L7PolicyDenied) => "l7/http",
        _ if event.policy.is_none() => return None,
        _ if event.http.is_some() => "l7/http",
        _ => "l3-l4",
    };
    // The policy's action, not the request's fate: an upstream failure after an allow was
    // still forwarded by the policy.
    let policy_refused = matches!(
        event.drop_reason,
        Some(DropReason::PolicyDenied | DropReason::PolicyDeny | DropReason::AuthRequired | DropReason::L7PolicyDenied)
    );
    let action = if policy_refused { "dropped" } else { "forwarded" };
    Some(PolicyVerdictLabels {
        direction,
        r#match,
        action,
    })
}

const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn handle(metrics: &Metrics, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (StatusCode::OK, OPENMETRICS_CONTENT_TYPE, metrics.encode()),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".to_owned(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "metrics are at /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    response
}

/// Binds the metrics address; the error names it, so `sluice agent` can stop with it.
pub async fn bind_metrics(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|err| anyhow::anyhow!("binding the metrics address {addr}: {err}"))?;
    Ok(listener)
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve_metrics(listener: tokio::net::TcpListener, metrics: Metrics) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving metrics");
    }
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                tracing::warn!(%err, "accepting a metrics connection failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let response = handle(&metrics, &request);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(err) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!(%err, %peer, "metrics connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::tests::{event, exhaust_denied, http, landing_ok};
    use http_body_util::{BodyExt, Empty};

    fn lines_with<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|line| line.starts_with(prefix))
            .collect()
    }

    #[test]
    fn flows_feed_hubble_metrics() {
        let metrics = Metrics::new();
        let mut ok_ingress = landing_ok();
        ok_ingress.direction = Some(TrafficDirection::Ingress);
        metrics.observe_flow(&ok_ingress);
        metrics.observe_flow(&ok_ingress);
        metrics.observe_flow(&exhaust_denied());
        metrics.observe_flow(&event(
            Verdict::Dropped,
            Some(DropReason::PolicyDenied),
            None,
        ));
        let text = metrics.encode();

        let mut processed = lines_with(&text, "hubble_flows_processed_total{");
        processed.sort_unstable();
        assert_eq!(
            processed,
            [
                r#"hubble_flows_processed_total{type="Drop",subtype="",verdict="DROPPED"} 1"#,
                r#"hubble_flows_processed_total{type="L7",subtype="HTTP",verdict="DROPPED"} 1"#,
                r#"hubble_flows_processed_total{type="L7",subtype="HTTP",verdict="FORWARDED"} 2"#,
            ]
        );
        assert!(
            text.contains(r#"hubble_drop_total{reason="L7_POLICY_DENIED",protocol="TCP"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"hubble_drop_total{reason="POLICY_DENIED",protocol="TCP"} 1"#),
            "{text}"
        );
        assert!(text.contains(r#"hubble_http_requests_total{method="POST",protocol="HTTP/1.1",reporter="server"} 2"#), "{text}");
        assert!(text.contains(r#"hubble_http_requests_total{method="PUT",protocol="HTTP/1.1",reporter="server"} 1"#), "{text}");
        assert!(
            text.contains(
                r#"hubble_http_responses_total{method="POST",status="200",reporter="server"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"hubble_http_responses_total{method="PUT",status="403",reporter="server"} 1"#
            ),
            "{text}"
        );
        // 3 ms lands in the 5 ms bucket and every one above it.
        assert!(text.contains(r#"hubble_http_request_duration_seconds_bucket{le="0.005",method="POST",reporter="server"} 2"#), "{text}");
        assert!(
            text.contains(
                r#"hubble_http_request_duration_seconds_count{method="POST",reporter="server"} 2"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"hubble_policy_verdicts_total{direction="ingress",match="l7/http",action="forwarded"} 2"#), "{text}");
        assert!(text.contains(r#"hubble_policy_verdicts_total{direction="ingress",match="l7/http",action="dropped"} 1"#), "{text}");
        assert!(text.contains(r#"hubble_policy_verdicts_total{direction="ingress",match="none",action="dropped"} 1"#), "{text}");
        assert!(
            text.contains(r#"hubble_lost_events_total{source="observer_events_queue"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn an_l3_l4_policy_drop_is_a_drop_even_when_the_request_was_read() {
        let metrics = Metrics::new();
        metrics.observe_flow(&event(
            Verdict::Dropped,
            Some(DropReason::PolicyDenied),
            Some(http("POST", "/v1/request-landing", None, 0)),
        ));
        let text = metrics.encode();
        assert_eq!(
            lines_with(&text, "hubble_flows_processed_total{"),
            [r#"hubble_flows_processed_total{type="Drop",subtype="",verdict="DROPPED"} 1"#]
        );
    }

    #[test]
    fn an_upstream_failure_after_an_allow_is_a_forwarded_policy_verdict() {
        let metrics = Metrics::new();
        let mut failed = event(Verdict::Error, Some(DropReason::UpstreamFailure), Some(http("GET", "/", Some(503), 1)));
        failed.direction = Some(TrafficDirection::Ingress);
        metrics.observe_flow(&failed);
        let text = metrics.encode();
        assert_eq!(
            lines_with(&text, "hubble_policy_verdicts_total{"),
            [r#"hubble_policy_verdicts_total{direction="ingress",match="l7/http",action="forwarded"} 1"#],
            "{text}"
        );
    }

    #[test]
    fn a_flow_without_a_deciding_policy_is_no_policy_verdict() {
        let metrics = Metrics::new();
        let mut unpoliced = event(
            Verdict::Forwarded,
            None,
            Some(http("GET", "/", Some(200), 1)),
        );
        unpoliced.policy = None;
        metrics.observe_flow(&unpoliced);
        let text = metrics.encode();
        assert!(
            lines_with(&text, "hubble_policy_verdicts_total{").is_empty(),
            "{text}"
        );
        assert!(text.contains(r#"hubble_http_requests_total{method="GET",protocol="HTTP/1.1",reporter="unknown"} 1"#), "{text}");
    }

    fn cluster(name: &str, retries: u64) -> (String, ClusterStats) {
        let stats = ClusterStats {
            upstream_rq_total: 10 + retries,
            upstream_rq_retry: retries,
            upstream_cx_active: 2,
            upstream_rq_per_try_timeout: retries,
            ..Default::default()
        };
        (name.to_owned(), stats)
    }

    #[test]
    fn agent_and_proxy_state_mirror_the_samples() {
        let metrics = Metrics::new();
        metrics.set_config_state(2, 17);
        let mut stats = ProxyStats {
            generation: 17,
            downstream_cx_active: 5,
            downstream_cx_total: 40,
            downstream_rq_total: 100,
            upstream_cx_active: 4,
            flows_lost: 9,
            clusters: [
                cluster("default/envoy-lb/deathstar-v1", 3),
                cluster("default/envoy-lb/deathstar-v2", 0),
            ]
            .into_iter()
            .collect(),
        };
        // Samples are cumulative: setting the same one twice must not double the counters.
        metrics.set_proxy_stats(&stats, 2, 3);
        metrics.set_proxy_stats(&stats, 2, 3);
        metrics.add_lost_events(LOST_SOURCE_FOLLOWER, 4);
        let text = metrics.encode();
        for line in [
            "sluice_config_errors 2",
            "sluice_tables_generation 17",
            "sluice_proxy_workers 2",
            "sluice_proxy_listeners 3",
            "sluice_proxy_downstream_cx_active 5",
            "sluice_proxy_upstream_cx_active 4",
            "sluice_proxy_downstream_cx_total 40",
            "sluice_proxy_downstream_rq_total 100",
            r#"sluice_proxy_cluster_upstream_rq_retry_total{cluster="default/envoy-lb/deathstar-v1"} 3"#,
            r#"sluice_proxy_cluster_upstream_rq_total{cluster="default/envoy-lb/deathstar-v1"} 13"#,
            r#"sluice_proxy_cluster_upstream_rq_per_try_timeout_total{cluster="default/envoy-lb/deathstar-v1"} 3"#,
            r#"sluice_proxy_cluster_upstream_cx_active{cluster="default/envoy-lb/deathstar-v2"} 2"#,
            r#"hubble_lost_events_total{source="observer_events_queue"} 9"#,
            r#"hubble_lost_events_total{source="hubble_ring_buffer"} 4"#,
        ] {
            assert!(
                text.lines().any(|got| got == line),
                "missing {line:?} in\n{text}"
            );
        }
        assert_eq!(metrics.lost_events(), 13);

        stats.clusters.remove("default/envoy-lb/deathstar-v2");
        metrics.set_proxy_stats(&stats, 2, 3);
        let text = metrics.encode();
        assert!(
            !text.contains("deathstar-v2"),
            "a removed cluster keeps its series:\n{text}"
        );
        assert!(text.contains(r#"sluice_proxy_cluster_upstream_rq_retry_total{cluster="default/envoy-lb/deathstar-v1"} 3"#));
    }

    #[tokio::test]
    async fn a_busy_metrics_address_is_an_error_naming_it() -> anyhow::Result<()> {
        let taken = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = taken.local_addr()?;
        let err = bind_metrics(addr).await.expect_err("address in use");
        assert!(
            err.to_string()
                .starts_with(&format!("binding the metrics address {addr}: ")),
            "{err}"
        );
        Ok(())
    }

    #[tokio::test]
    async fn metrics_are_scraped_over_http() -> anyhow::Result<()> {
        let metrics = Metrics::new();
        metrics.observe_flow(&landing_ok());
        let listener = bind_metrics("127.0.0.1:0".parse()?).await?;
        let addr = listener.local_addr()?;
        let server = tokio::spawn(serve_metrics(listener, metrics));

        let stream = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let scrape = |path: &str| {
            Request::get(path)
                .header("host", "localhost")
                .body(Empty::<Bytes>::new())
        };
        let response = sender.send_request(scrape("/metrics")?).await?;
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()[http::header::CONTENT_TYPE],
            OPENMETRICS_CONTENT_TYPE
        );
        let body = String::from_utf8(response.into_body().collect().await?.to_bytes().to_vec())?;
        assert!(
            body.contains(
                r#"hubble_flows_processed_total{type="L7",subtype="HTTP",verdict="FORWARDED"} 1"#
            ),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");

        let missing = sender.send_request(scrape("/")?).await?;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
        server.abort();
        Ok(())
    }
}
