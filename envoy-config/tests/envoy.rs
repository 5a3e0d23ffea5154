//! CiliumEnvoyConfig semantics: name qualification, key spelling, Envoy defaults.

mod common;

use std::time::Duration;

use anyhow::{bail, Result};
use common::{example, one};
use sluice_envoy_config::envoy::{
    qualify, Action, ClusterSpecifier, Discovery, HeaderMatchRule, LbPolicy, PathMatch,
    QueryMatchRule, RetryOn, RouteSource, StringPattern, Thresholds, WeightedCluster,
};
use sluice_envoy_config::{EnvoyConfig, Object};

fn config(object: Object) -> Result<EnvoyConfig> {
    match object {
        Object::EnvoyConfig(config) => Ok(config),
        other => bail!("expected an envoy config, got {}", other.key()),
    }
}

fn cec(namespace: Option<&str>, resources: &str) -> Result<EnvoyConfig> {
    let (kind, namespace_line) = match namespace {
        Some(ns) => ("CiliumEnvoyConfig", format!("\n  namespace: {ns}")),
        None => ("CiliumClusterwideEnvoyConfig", String::new()),
    };
    config(one(&format!(
        "apiVersion: cilium.io/v2\nkind: {kind}\nmetadata:\n  name: cfg{namespace_line}\nspec:\n  resources:\n{resources}"
    ))?)
}

const LISTENER_AND_ROUTES: &str = r#"  - "@type": type.googleapis.com/envoy.config.listener.v3.Listener
    name: ingress
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          rds: {route_config_name: routes}
          http_filters: [{name: envoy.filters.http.router}]
  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: routes
    virtual_hosts:
    - name: vh
      domains: ["*"]
      routes:
      - match: {prefix: /}
        route: {cluster: default/echo}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: local-cluster
    type: EDS
"#;

#[test]
fn qualify_follows_cilium_resource_qualified_name() {
    assert_eq!(qualify("ns", "cec", "listener", true), "ns/cec/listener");
    assert_eq!(qualify("ns", "cec", "other/x", true), "ns/cec/other/x");
    assert_eq!(qualify("ns", "cec", "ns/x", true), "ns/x");
    assert_eq!(qualify("ns", "cec", "default/echo", false), "default/echo");
    assert_eq!(qualify("ns", "cec", "echo", false), "ns/cec/echo");
    assert_eq!(qualify("", "ccec", "listener", true), "/ccec/listener");
    assert_eq!(qualify("", "ccec", "/envoy-admin", true), "/envoy-admin");
    assert_eq!(qualify("", "ccec", "/envoy-admin", false), "/envoy-admin");
    assert_eq!(qualify("ns", "cec", "", true), "");
}

#[test]
fn cec_names_are_forced_for_listeners_routes_and_virtual_hosts_and_slash_free_elsewhere(
) -> Result<()> {
    let config = cec(Some("team"), LISTENER_AND_ROUTES)?;
    assert_eq!(config.listeners[0].name, "team/cfg/ingress");
    let RouteSource::Rds(rds) = &config.listeners[0].filter_chains[0]
        .http_connection_manager
        .routes
    else {
        bail!("expected rds")
    };
    assert_eq!(rds, "team/cfg/routes");
    assert_eq!(config.route_configurations[0].name, "team/cfg/routes");
    assert_eq!(
        config.route_configurations[0].virtual_hosts[0].name,
        "team/cfg/vh"
    );
    let Action::Route(action) = &config.route_configurations[0].virtual_hosts[0].routes[0].action
    else {
        bail!("expected a route action")
    };
    assert_eq!(
        action.cluster,
        ClusterSpecifier::Cluster("default/echo".into())
    );
    assert_eq!(config.clusters[0].name, "team/cfg/local-cluster");

    let clusterwide = cec(None, LISTENER_AND_ROUTES)?;
    assert_eq!(clusterwide.listeners[0].name, "/cfg/ingress");
    assert_eq!(clusterwide.route_configurations[0].name, "/cfg/routes");
    Ok(())
}

#[test]
fn example_ccec_references_pass_through_and_services_get_namespaces() -> Result<()> {
    let admin = config(example("envoy-admin-listener.yaml")?.remove(0))?;
    let listener = &admin.listeners[0];
    assert_eq!(listener.name, "/envoy-admin-listener/envoy-admin-listener");
    let address = listener.address.as_ref().expect("address");
    assert_eq!(
        (
            address.address.to_string(),
            address.port_value,
            address.ipv4_compat
        ),
        ("::".into(), 9901, true)
    );
    let hcm = &listener.filter_chains[0].http_connection_manager;
    assert!(hcm.use_remote_address && hcm.skip_xff_append);
    let RouteSource::Inline(routes) = &hcm.routes else {
        bail!("expected inline routes")
    };
    assert_eq!(routes.name, "/envoy-admin-listener/admin_route");
    assert_eq!(
        routes.virtual_hosts[0].name,
        "/envoy-admin-listener/admin_route"
    );
    let Action::Route(admin_route) = &routes.virtual_hosts[0].routes[0].action else {
        bail!("expected a route action")
    };
    assert_eq!(
        admin_route.cluster,
        ClusterSpecifier::Cluster("/envoy-admin-listener/envoy-admin".into()),
        "a slash-free cluster reference is qualified (newer examples write `/envoy-admin`)"
    );

    let canary = config(example("envoy-helloworld-v1-90-v2-10.yaml")?.remove(0))?;
    assert_eq!(canary.namespace.as_deref(), Some("default"));
    assert_eq!(canary.services[0].namespace, "default");
    assert_eq!(
        canary.services[0].listener,
        "default/envoy-lb-listener/envoy-lb-listener"
    );
    assert_eq!(canary.backend_services.len(), 2);
    let Action::Route(action) = &canary.route_configurations[0].virtual_hosts[0].routes[0].action
    else {
        bail!("expected a route action")
    };
    assert_eq!(
        action.cluster,
        ClusterSpecifier::Weighted(vec![
            WeightedCluster {
                name: "default/helloworld-v1".into(),
                weight: 90
            },
            WeightedCluster {
                name: "default/helloworld-v2".into(),
                weight: 10
            },
        ])
    );
    let retry = action.retry_policy.as_ref().expect("retry policy");
    assert_eq!(
        retry.retry_on.iter().copied().collect::<Vec<_>>(),
        vec![RetryOn::FiveXx]
    );
    assert_eq!(retry.num_retries, 3);
    assert_eq!(retry.per_try_timeout, Some(Duration::from_secs(1)));
    assert_eq!(canary.clusters[1].connect_timeout, Duration::from_secs(3));
    Ok(())
}

#[test]
fn cec_services_are_forced_into_their_own_namespace() -> Result<()> {
    let config = config(one(&format!(
        "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {{name: cfg, namespace: team}}\nspec:\n  services:\n  - name: web\n    namespace: elsewhere\n  backendServices:\n  - name: api\n    number: ['8080']\n  resources:\n{LISTENER_AND_ROUTES}"
    ))?)?;
    assert_eq!(config.services[0].namespace, "team");
    assert_eq!(config.services[0].listener, "team/cfg/ingress");
    assert_eq!(config.backend_services[0].namespace, "team");
    assert_eq!(config.backend_services[0].ports, vec!["8080".to_string()]);
    let clusterwide = config_from_ccec_services()?;
    assert_eq!(clusterwide.services[0].namespace, "default");
    Ok(())
}

fn config_from_ccec_services() -> Result<EnvoyConfig> {
    config(one(&format!(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideEnvoyConfig\nmetadata: {{name: cfg}}\nspec:\n  services:\n  - name: web\n  resources:\n{LISTENER_AND_ROUTES}"
    ))?)
}

#[test]
fn camel_case_and_snake_case_spellings_parse_identically() -> Result<()> {
    let snake = cec(
        Some("ns"),
        r#"  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: default/echo
    type: EDS
    connect_timeout: 2s
    lb_policy: LEAST_REQUEST
    eds_cluster_config: {service_name: "default/echo:8080"}
    circuit_breakers: {thresholds: [{priority: DEFAULT, max_requests: 2, max_pending_requests: 1}]}
    outlier_detection: {consecutive_5xx: 3, base_ejection_time: 0.5s}
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
"#,
    )?;
    let camel = cec(
        Some("ns"),
        r#"  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: default/echo
    type: EDS
    connectTimeout: 2s
    lbPolicy: LEAST_REQUEST
    edsClusterConfig: {serviceName: "default/echo:8080"}
    circuitBreakers: {thresholds: [{priority: DEFAULT, maxRequests: 2, maxPendingRequests: 1}]}
    outlierDetection: {consecutive5xx: 3, baseEjectionTime: {seconds: 0, nanos: 500000000}}
    typedExtensionProtocolOptions:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicitHttpConfig: {http2ProtocolOptions: {}}
"#,
    )?;
    assert_eq!(snake, camel);
    let cluster = &snake.clusters[0];
    assert_eq!(
        cluster.discovery,
        Discovery::Eds {
            service_name: Some("default/echo:8080".into())
        }
    );
    assert_eq!(
        cluster.lb_policy,
        LbPolicy::LeastRequest { choice_count: 2 }
    );
    assert!(cluster.http2);
    assert_eq!(
        cluster.circuit_breakers,
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1,
            max_requests: 2,
            max_retries: 3
        }
    );
    let outlier = cluster.outlier_detection.expect("outlier detection");
    assert_eq!(
        (outlier.consecutive_5xx, outlier.base_ejection_time),
        (3, Duration::from_millis(500))
    );
    Ok(())
}

#[test]
fn absent_fields_take_envoy_defaults() -> Result<()> {
    let config = cec(
        None,
        r#"  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: r
    virtual_hosts:
    - name: v
      domains: ["*"]
      routes:
      - match: {prefix: /}
        route: {cluster: c, retry_policy: {retry_on: "5xx"}}
      - match: {prefix: /no-timeout}
        route: {cluster: c, timeout: 0s, idle_timeout: 0s}
      - match: {prefix: /stream}
        route: {cluster: c, idle_timeout: 3600s}
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: c
    outlier_detection: {}
"#,
    )?;
    let routes = &config.route_configurations[0];
    assert_eq!(routes.max_direct_response_body_size_bytes, 4096);
    let Action::Route(action) = &routes.virtual_hosts[0].routes[0].action else {
        bail!("route")
    };
    assert_eq!(action.timeout, Some(Duration::from_secs(15)));
    assert_eq!(action.cluster_not_found_response_code, 503);
    let retry = action.retry_policy.as_ref().expect("retry");
    assert_eq!(retry.num_retries, 1);
    assert_eq!(retry.per_try_timeout, None);
    assert_eq!(
        (retry.base_interval, retry.max_interval),
        (Duration::from_millis(25), Duration::from_millis(250))
    );
    assert_eq!(retry.host_selection_retry_max_attempts, 1);
    assert!(routes.virtual_hosts[0].routes[0].route_match.case_sensitive);
    let Action::Route(no_timeout) = &routes.virtual_hosts[0].routes[1].action else {
        bail!("route")
    };
    assert_eq!(no_timeout.timeout, None);
    // Unset, the HCM's stream idle timeout applies; zero turns it off for the route.
    assert_eq!(action.idle_timeout, None);
    assert_eq!(no_timeout.idle_timeout, Some(Duration::ZERO));
    let Action::Route(stream) = &routes.virtual_hosts[0].routes[2].action else {
        bail!("route")
    };
    assert_eq!(stream.idle_timeout, Some(Duration::from_secs(3600)));

    let cluster = &config.clusters[0];
    assert_eq!(cluster.discovery, Discovery::Static);
    assert_eq!(cluster.lb_policy, LbPolicy::RoundRobin);
    assert_eq!(cluster.connect_timeout, Duration::from_secs(5));
    assert_eq!(
        cluster.circuit_breakers,
        Thresholds {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3
        }
    );
    assert!(!cluster.http2);
    let outlier = cluster.outlier_detection.expect("outlier");
    assert_eq!(outlier.consecutive_5xx, 5);
    assert_eq!(outlier.interval, Duration::from_secs(10));
    assert_eq!(outlier.base_ejection_time, Duration::from_secs(30));
    assert_eq!(outlier.max_ejection_time, Duration::from_secs(300));
    assert_eq!(outlier.max_ejection_percent, 10);
    assert_eq!(outlier.enforcing_consecutive_5xx, 100);
    assert_eq!(outlier.consecutive_gateway_failure, 5);
    assert_eq!(outlier.enforcing_consecutive_gateway_failure, 0);
    assert_eq!(outlier.success_rate_stdev_factor, 1900);
    assert_eq!(outlier.failure_percentage_threshold, 85);
    assert_eq!(outlier.enforcing_failure_percentage, 0);
    assert!(outlier.successful_active_health_check_uneject_host);
    assert!(!outlier.split_external_local_origin_errors);

    let listener = cec(None, LISTENER_AND_ROUTES)?;
    let hcm = &listener.listeners[0].filter_chains[0].http_connection_manager;
    assert_eq!(hcm.stream_idle_timeout, Some(Duration::from_secs(300)));
    assert_eq!(hcm.request_timeout, None);
    assert_eq!(hcm.request_headers_timeout, None);
    assert_eq!(hcm.max_request_headers_kb, 60);
    assert_eq!(
        hcm.common_http_protocol_options.idle_timeout,
        Duration::from_secs(3600)
    );
    assert_eq!(hcm.common_http_protocol_options.max_headers_count, 100);
    assert!(!hcm.normalize_path && !hcm.merge_slashes && !hcm.use_remote_address);
    assert_eq!(listener.listeners[0].address, None);
    Ok(())
}

#[test]
fn route_matchers_rewrites_and_local_replies_parse() -> Result<()> {
    let config = cec(
        Some("ns"),
        r#"  - "@type": type.googleapis.com/envoy.config.route.v3.RouteConfiguration
    name: r
    virtual_hosts:
    - name: v
      domains: ["Example.COM", "*.example.com"]
      retry_policy: {retry_on: "connect-failure,refused-stream,unavailable", retry_host_predicate: [{name: envoy.retry_host_predicates.previous_hosts}]}
      routes:
      - match:
          path_separated_prefix: /api
          case_sensitive: false
          headers:
          - {name: X-Canary, string_match: {exact: "yes", ignore_case: true}}
          - {name: x-legacy, prefix_match: abc, invert_match: true}
          - {name: x-range, range_match: {start: 1, end: "10"}}
          query_parameters: [{name: debug, present_match: true}]
        route:
          cluster: c
          regex_rewrite: {pattern: {google_re2: {}, regex: "^/api/(.*)$"}, substitution: "/\\1"}
          host_rewrite_literal: backend.local
          request_mirror_policies: [{cluster: shadow, runtime_fraction: {default_value: {numerator: 25}}}]
      - match: {safe_regex: {regex: "/v[0-9]+/.*"}}
        direct_response: {status: 418, body: {inline_string: teapot}}
      - match: {path: /old}
        redirect: {path_redirect: /new, response_code: FOUND, strip_query: true}
"#,
    )?;
    let vhost = &config.route_configurations[0].virtual_hosts[0];
    assert_eq!(
        vhost.domains,
        vec!["example.com".to_string(), "*.example.com".to_string()]
    );
    let vhost_retry = vhost.retry_policy.as_ref().expect("vhost retry");
    assert!(vhost_retry.avoid_previous_hosts);
    assert!(vhost_retry.retry_on.contains(&RetryOn::GrpcUnavailable));

    let first = &vhost.routes[0];
    assert_eq!(
        first.route_match.path,
        PathMatch::PathSeparatedPrefix("/api".into())
    );
    assert!(!first.route_match.case_sensitive);
    assert_eq!(first.route_match.headers[0].name, "x-canary");
    let HeaderMatchRule::String(canary) = &first.route_match.headers[0].rule else {
        bail!("string match")
    };
    assert!(canary.matches("YES") && !canary.matches("no"));
    assert!(first.route_match.headers[1].invert_match);
    assert_eq!(
        first.route_match.headers[2].rule,
        HeaderMatchRule::Range { start: 1, end: 10 }
    );
    assert_eq!(
        first.route_match.query_parameters[0].rule,
        QueryMatchRule::Present
    );
    let Action::Route(action) = &first.action else {
        bail!("route")
    };
    assert_eq!(action.cluster, ClusterSpecifier::Cluster("ns/cfg/c".into()));
    assert_eq!(action.request_mirror_policies[0].cluster, "ns/cfg/shadow");
    let rewrite = action.regex_rewrite.as_ref().expect("rewrite");
    assert_eq!(
        rewrite.pattern.unanchored.replace_all(
            "/api/users",
            rewrite.substitution.replace("\\1", "$1").as_str()
        ),
        "/users"
    );
    assert_eq!(
        action.host_rewrite_literal.as_deref(),
        Some("backend.local")
    );
    assert_eq!(
        action.request_mirror_policies[0].fraction_per_million,
        250_000
    );

    let PathMatch::SafeRegex(regex) = &vhost.routes[1].route_match.path else {
        bail!("regex")
    };
    assert!(regex.is_full_match("/v2/users"));
    assert!(
        !regex.is_full_match("/x/v2/users"),
        "safe_regex is a full match"
    );
    let Action::DirectResponse(direct) = &vhost.routes[1].action else {
        bail!("direct")
    };
    assert_eq!(
        (direct.status, direct.body.as_deref()),
        (418, Some("teapot"))
    );
    let Action::Redirect(redirect) = &vhost.routes[2].action else {
        bail!("redirect")
    };
    assert_eq!((redirect.response_code, redirect.strip_query), (302, true));
    let legacy = &first.route_match.headers[1].rule;
    assert!(
        matches!(legacy, HeaderMatchRule::String(m) if m.pattern == StringPattern::Prefix("abc".into()))
    );
    Ok(())
}

#[test]
fn static_cluster_keeps_its_load_assignment() -> Result<()> {
    let config = cec(
        None,
        r#"  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: static
    type: STATIC
    load_assignment:
      cluster_name: static
      endpoints:
      - lb_endpoints:
        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: 8080}}}
        - endpoint: {address: {socket_address: {address: 127.0.0.2, port_value: 8080}}}
          load_balancing_weight: 3
  - "@type": type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment
    clusterName: other
    endpoints: [{lbEndpoints: [{endpoint: {address: {socketAddress: {address: "::1", portValue: 9}}}}], priority: 1}]
"#,
    )?;
    let assignment = config.clusters[0]
        .load_assignment
        .as_ref()
        .expect("assignment");
    let endpoints = &assignment.endpoints[0].lb_endpoints;
    assert_eq!(endpoints[0].address.port_value, 8080);
    assert_eq!(
        (
            endpoints[0].load_balancing_weight,
            endpoints[1].load_balancing_weight
        ),
        (1, 3)
    );
    assert_eq!(config.clusters[0].name, "/cfg/static");
    assert_eq!(assignment.cluster_name, "/cfg/static");
    assert_eq!(config.load_assignments[0].cluster_name, "/cfg/other");
    assert_eq!(config.load_assignments[0].endpoints[0].priority, 1);
    Ok(())
}

#[test]
fn hcm_timeouts_take_durations_and_zero_disables_them() -> Result<()> {
    let timeouts = "          stat_prefix: ingress\n          request_headers_timeout: 10s\n          stream_idle_timeout: 0s\n";
    let listener = cec(None, &LISTENER_AND_ROUTES.replace("          stat_prefix: ingress\n", timeouts))?;
    let hcm = &listener.listeners[0].filter_chains[0].http_connection_manager;
    assert_eq!(hcm.request_headers_timeout, Some(Duration::from_secs(10)));
    assert_eq!(hcm.stream_idle_timeout, None);
    let zero = "          stat_prefix: ingress\n          request_headers_timeout: 0s\n";
    let listener = cec(None, &LISTENER_AND_ROUTES.replace("          stat_prefix: ingress\n", zero))?;
    assert_eq!(listener.listeners[0].filter_chains[0].http_connection_manager.request_headers_timeout, None);
    Ok(())
}
