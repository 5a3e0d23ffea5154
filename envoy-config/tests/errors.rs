//! Exact error messages: file, document, object, field path and reason.

mod common;

use anyhow::Result;
use common::{one_config_error, one_error};
use sluice_envoy_config::{parse_file, Kind, ObjectKey};

fn cnp(spec: &str) -> String {
    format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: web\n  namespace: shop\nspec:\n{spec}")
}

fn cec(resources: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata:\n  name: lb\n  namespace: shop\nspec:\n  resources:\n{resources}"
    )
}

const ROUTE_HEAD: &str = "  - \"@type\": type.googleapis.com/envoy.config.route.v3.RouteConfiguration\n    name: r\n    virtual_hosts:\n";

#[test]
fn bad_http_regex_names_the_rule_field() -> Result<()> {
    let text = cnp(
        "  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"80\"}]\n      rules:\n        http:\n        - path: /ok\n        - method: GET\n          path: \"/v1/(unclosed\"\n",
    );
    assert_eq!(
        one_error(&text)?,
        "test.yaml: document 1 (CiliumNetworkPolicy shop/web): spec.ingress[0].toPorts[0].rules.http[1].path: \
         invalid regex `/v1/(unclosed`: unclosed group"
    );
    Ok(())
}

#[test]
fn unknown_field_in_a_cec_resource_lists_the_supported_ones() -> Result<()> {
    let text = cec("  - \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n    name: c\n    dns_lookup_family: V4_ONLY\n");
    assert_eq!(
        one_error(&text)?,
        "test.yaml: document 1 (CiliumEnvoyConfig shop/lb): spec.resources[0].dns_lookup_family: unknown field \
         `dns_lookup_family`, expected one of `name`, `type`, `eds_cluster_config`, `lb_policy`, \
         `least_request_lb_config`, `ring_hash_lb_config`, `maglev_lb_config`, `connect_timeout`, \
         `circuit_breakers`, `outlier_detection`, `http2_protocol_options`, `typed_extension_protocol_options`, \
         `load_assignment`, `per_connection_buffer_limit_bytes`"
    );
    Ok(())
}

#[test]
fn unknown_field_deep_in_a_route_is_reported_at_its_path() -> Result<()> {
    let text = cec(&format!(
        "{ROUTE_HEAD}    - name: v\n      domains: ['*']\n      routes:\n      - match: {{prefix: /}}\n        route: {{cluster: c, hashPolicy: []}}\n"
    ));
    let error = one_config_error(&text)?;
    assert_eq!(
        error.path,
        "spec.resources[0].virtual_hosts[0].routes[0].route.hash_policy"
    );
    assert!(
        error
            .reason
            .starts_with("unknown field `hash_policy`, expected one of `cluster`"),
        "{}",
        error.reason
    );
    Ok(())
}

#[test]
fn unknown_resource_type_is_an_error() -> Result<()> {
    let text =
        cec("  - \"@type\": type.googleapis.com/envoy.config.listener.v3.ListenerX\n    name: l\n");
    assert_eq!(
        one_error(&text)?,
        "test.yaml: document 1 (CiliumEnvoyConfig shop/lb): spec.resources[0].@type: unsupported resource type \
         `type.googleapis.com/envoy.config.listener.v3.ListenerX` (supported: \
         type.googleapis.com/envoy.config.listener.v3.Listener, \
         type.googleapis.com/envoy.config.route.v3.RouteConfiguration, \
         type.googleapis.com/envoy.config.cluster.v3.Cluster, \
         type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment, \
         type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret)"
    );
    Ok(())
}

#[test]
fn unknown_entity_lists_the_known_ones() -> Result<()> {
    let text = cnp("  endpointSelector: {}\n  egress:\n  - toEntities: [world, internet]\n");
    assert_eq!(
        one_error(&text)?,
        "test.yaml: document 1 (CiliumNetworkPolicy shop/web): spec.egress[0].toEntities[1]: unknown entity \
         `internet` (known: all, world, world-ipv4, world-ipv6, cluster, host, init, ingress, unmanaged, \
         remote-node, health, none, kube-apiserver)"
    );
    Ok(())
}

#[test]
fn bad_ports_are_rejected() -> Result<()> {
    let port = |spec: &str| {
        one_error(&cnp(&format!(
            "  endpointSelector: {{}}\n  ingress:\n  - toPorts:\n    - ports: [{spec}]\n"
        )))
    };
    assert_eq!(
        port("{port: \"65536\"}")?,
        "test.yaml: document 1 (CiliumNetworkPolicy shop/web): spec.ingress[0].toPorts[0].ports[0].port: \
         port `65536` is outside 0..=65535"
    );
    assert_eq!(
        port("{port: \"http--alt\"}")?,
        "test.yaml: document 1 (CiliumNetworkPolicy shop/web): spec.ingress[0].toPorts[0].ports[0].port: \
         `http--alt` is neither a port number (0-65535) nor a port name (1-15 of a-z, 0-9, '-', with a letter, \
         no leading, trailing or double '-')"
    );
    assert_eq!(
        port("{port: \"80\", protocol: ICMP}")?,
        "test.yaml: document 1 (CiliumNetworkPolicy shop/web): spec.ingress[0].toPorts[0].ports[0].protocol: \
         unknown protocol `ICMP` (known: TCP, UDP, SCTP, VRRP, IGMP, ANY)"
    );
    assert_eq!(
        port("{port: \"8080\", endPort: 8000}")?,
        "test.yaml: document 1 (CiliumNetworkPolicy shop/web): spec.ingress[0].toPorts[0].ports[0].endPort: \
         endPort 8000 is below port 8080"
    );
    assert_eq!(
        port("{port: \"http\", endPort: 8000}")?,
        "test.yaml: document 1 (CiliumNetworkPolicy shop/web): spec.ingress[0].toPorts[0].ports[0].endPort: \
         endPort needs a numeric port"
    );
    Ok(())
}

#[test]
fn l7_rules_in_a_deny_rule_are_rejected() -> Result<()> {
    let text = cnp(
        "  endpointSelector: {}\n  egressDeny:\n  - toPorts:\n    - ports: [{port: \"80\", protocol: TCP}]\n      rules:\n        http: [{method: GET}]\n",
    );
    assert_eq!(
        one_error(&text)?,
        "test.yaml: document 1 (CiliumNetworkPolicy shop/web): spec.egressDeny[0].toPorts[0].rules: deny rules \
         match ports only; L7 rules, TLS and listeners are not allowed in them"
    );
    Ok(())
}

#[test]
fn cnp_with_node_selector_is_rejected() -> Result<()> {
    let text = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: host\nspecs:\n- endpointSelector: {}\n- nodeSelector: {}\n";
    assert_eq!(
        one_error(text)?,
        "test.yaml: document 1 (CiliumNetworkPolicy default/host): specs[1].nodeSelector: a CiliumNetworkPolicy \
         rule cannot have nodeSelector (only CiliumClusterwideNetworkPolicy)"
    );
    Ok(())
}

#[test]
fn mixed_l7_rule_kinds_are_rejected() -> Result<()> {
    let text = cnp(
        "  endpointSelector: {}\n  egress:\n  - toPorts:\n    - rules:\n        http: [{}]\n        dns: [{matchName: a.b}]\n",
    );
    assert_eq!(
        one_error(&text)?,
        "test.yaml: document 1 (CiliumNetworkPolicy shop/web): spec.egress[0].toPorts[0].rules: only one of http, \
         dns, kafka, l7proto may be set"
    );
    Ok(())
}

#[test]
fn yaml_syntax_error_is_one_error_with_a_line() -> Result<()> {
    let text = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [b\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: c\n";
    let results = parse_file("pods.yaml", text);
    assert_eq!(
        results.len(),
        1,
        "a syntax error invalidates the whole file"
    );
    let error = results
        .into_iter()
        .next()
        .and_then(Result::err)
        .expect("an error");
    assert_eq!(error.document, 2);
    assert_eq!(error.object, None);
    assert_eq!(
        error.to_string(),
        "pods.yaml: document 2: invalid YAML: did not find expected ',' or ']' at line 10 column 1, while parsing \
         a flow sequence at line 9 column 9"
    );
    Ok(())
}

#[test]
fn json_syntax_error_names_line_and_column() -> Result<()> {
    let results = parse_file("pod.json", "{\"apiVersion\": \"v1\",\n \"kind\": \"Pod\",}");
    let error = results
        .into_iter()
        .next()
        .and_then(Result::err)
        .expect("an error");
    assert_eq!(
        error.to_string(),
        "pod.json: document 1: invalid JSON: trailing comma at line 2 column 16"
    );
    Ok(())
}

#[test]
fn errors_carry_the_object_key_so_the_last_good_version_can_be_kept() -> Result<()> {
    let error = one_config_error(&cnp(
        "  endpointSelector: {}\n  ingress: [{fromEntities: [nope]}]\n",
    ))?;
    assert_eq!(
        error.object,
        Some(ObjectKey::new(
            Kind::CiliumNetworkPolicy,
            Some("shop"),
            "web"
        ))
    );
    assert_eq!(error.document, 1);
    Ok(())
}

#[test]
fn cec_cross_references_and_route_limits_are_checked() -> Result<()> {
    let listener = "  - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n    name: l\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: l\n          rds: {route_config_name: missing}\n          http_filters: [{name: envoy.filters.http.router}]\n";
    assert_eq!(
        one_error(&cec(listener))?,
        "test.yaml: document 1 (CiliumEnvoyConfig shop/lb): \
         spec.resources[0].filter_chains[0].filters[0].typed_config.rds.route_config_name: \
         `shop/lb/missing` names no RouteConfiguration in this config"
    );
    let twice = format!("{ROUTE_HEAD}    - {{name: v}}\n{ROUTE_HEAD}    - {{name: v}}\n")
        .replace("{name: v}", "{name: v, domains: [a]}");
    assert_eq!(
        one_error(&cec(&twice))?,
        "test.yaml: document 1 (CiliumEnvoyConfig shop/lb): spec.resources[1].name: duplicate RouteConfiguration \
         `shop/lb/r` (after name qualification)"
    );
    let stars = format!(
        "{ROUTE_HEAD}    - {{name: a, domains: ['*']}}\n    - {{name: b, domains: ['*']}}\n"
    );
    assert_eq!(
        one_error(&cec(&stars))?,
        "test.yaml: document 1 (CiliumEnvoyConfig shop/lb): spec.resources[0]: more than one virtual host has the \
         domain `*`"
    );
    let big = format!(
        "{ROUTE_HEAD}    - name: v\n      domains: ['*']\n      routes:\n      - match: {{prefix: /}}\n        direct_response: {{status: 200, body: {{inline_string: '{}'}}}}\n    max_direct_response_body_size_bytes: 4\n",
        "hello"
    );
    assert_eq!(
        one_error(&cec(&big))?,
        "test.yaml: document 1 (CiliumEnvoyConfig shop/lb): spec.resources[0]: virtual host `v`: direct_response \
         body of 5 bytes exceeds max_direct_response_body_size_bytes 4"
    );
    let filter = listener.replace(
        "[{name: envoy.filters.http.router}]",
        "[{name: envoy.filters.http.lua}, {name: envoy.filters.http.router}]",
    );
    assert_eq!(
        one_error(&cec(&filter))?,
        "test.yaml: document 1 (CiliumEnvoyConfig shop/lb): \
         spec.resources[0].filter_chains[0].filters[0].typed_config.http_filters[0].name: HTTP filter \
         `envoy.filters.http.lua` is not supported (supported: envoy.filters.http.router, last)"
    );
    Ok(())
}

#[test]
fn unsupported_retry_condition_and_cluster_type_are_rejected() -> Result<()> {
    let retry = cec(&format!(
        "{ROUTE_HEAD}    - name: v\n      domains: ['*']\n      routes:\n      - match: {{prefix: /}}\n        route: {{cluster: c, retry_policy: {{retry_on: '5xx,retriable-headers'}}}}\n"
    ));
    let error = one_config_error(&retry)?;
    assert_eq!(
        error.path,
        "spec.resources[0].virtual_hosts[0].routes[0].route.retry_policy"
    );
    assert!(
        error
            .reason
            .starts_with("retry_on: unsupported condition `retriable-headers`"),
        "{}",
        error.reason
    );
    let dns = cec("  - \"@type\": type.googleapis.com/envoy.config.cluster.v3.Cluster\n    name: c\n    type: STRICT_DNS\n");
    assert_eq!(
        one_error(&dns)?,
        "test.yaml: document 1 (CiliumEnvoyConfig shop/lb): spec.resources[0].type: unsupported cluster type \
         (supported: STATIC, EDS)"
    );
    Ok(())
}

#[test]
fn wrong_cilium_api_version_is_an_error_but_foreign_kinds_are_skipped() -> Result<()> {
    assert_eq!(
        one_error("apiVersion: cilium.io/v2alpha1\nkind: CiliumEnvoyConfig\nmetadata: {name: x}\nspec: {}\n")?,
        "test.yaml: document 1: apiVersion: `cilium.io/v2alpha1` is not supported for CiliumEnvoyConfig (use cilium.io/v2)"
    );
    let knative = common::one(
        "apiVersion: serving.knative.dev/v1\nkind: Service\nmetadata: {name: hello}\n",
    )?;
    assert_eq!(
        knative.key().to_string(),
        "Service.serving.knative.dev hello"
    );
    Ok(())
}
