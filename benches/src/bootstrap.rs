//! CiliumEnvoyConfig + CiliumNetworkPolicy -> Envoy bootstrap (pure): what Cilium's agent
//! would hand its Envoy over xDS, written as static resources so a stock Envoy runs the same
//! listener, routes, clusters and L7 allow-list as sluice.
//!
//! The CEC's resources go to Envoy as written (minus `@type`): RDS is inlined as `route_config`,
//! EDS clusters become STATIC with the endpoints Cilium would publish, the listener gets the
//! address Cilium's redirect would give it, and the CNP's HTTP rules become an RBAC filter in
//! front of the router, matching `:method`, `:path` and `:authority` with full-string RE2
//! regexes as Cilium's own Envoy filter does.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde_json::{json, Map, Value};
use sluice_envoy_config::policy::{Entity, HttpRule, L7Rules, PeerRule};
use sluice_envoy_config::{parse_file, Object};

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const RBAC_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
const ROUTER_FILTER: &str = "envoy.filters.http.router";

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// sluice rejects it, so Envoy must not get it either.
    #[error("{0}")]
    Invalid(String),
    #[error("{0}: not translated by the harness")]
    Unsupported(String),
    #[error("cluster {0} is EDS but no endpoints were given for it")]
    MissingEndpoints(String),
    #[error("{file}: {source}")]
    Yaml {
        file: &'static str,
        source: serde_yaml::Error,
    },
}

/// What the harness knows beyond the two manifests: where Envoy listens and the endpoints of
/// each EDS cluster (Cilium's `backendServices`).
#[derive(Debug, Clone)]
pub struct Placement {
    pub listen: SocketAddr,
    pub endpoints: BTreeMap<String, Vec<SocketAddr>>,
}

/// The Envoy bootstrap for `cec_yaml` (one CiliumEnvoyConfig with one listener) and
/// `policy_yaml` (CiliumNetworkPolicies whose ingress HTTP rules guard the backends; empty
/// text = no policy).
pub fn envoy_bootstrap(
    cec_yaml: &str,
    policy_yaml: &str,
    placement: &Placement,
) -> Result<Value, BootstrapError> {
    validate_with_sluice("cec.yaml", cec_yaml)?;
    let rbac = rbac_filter(policy_yaml)?;
    let cec: Value = serde_yaml::from_str(cec_yaml).map_err(|source| BootstrapError::Yaml {
        file: "cec.yaml",
        source,
    })?;
    let resources = cec
        .pointer("/spec/resources")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();

    let mut listeners = Vec::new();
    let mut routes = BTreeMap::new();
    let mut clusters = Vec::new();
    for resource in resources {
        let kind = resource
            .get("@type")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let mut body = resource;
        if let Some(map) = body.as_object_mut() {
            map.remove("@type");
        }
        match kind.as_str() {
            LISTENER_TYPE => listeners.push(body),
            ROUTE_TYPE => {
                let name = body
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                routes.insert(name, body);
            }
            CLUSTER_TYPE => clusters.push(static_cluster(body, &placement.endpoints)?),
            other => {
                return Err(BootstrapError::Unsupported(format!(
                    "CEC resource of type {other:?}"
                )))
            }
        }
    }
    let [listener] = <[Value; 1]>::try_from(listeners).map_err(|l| {
        BootstrapError::Unsupported(format!(
            "{} listeners (the harness places exactly one)",
            l.len()
        ))
    })?;
    let listener = placed_listener(listener, placement.listen, &routes, rbac.as_ref())?;
    Ok(json!({
        "node": {"id": "sluice-bench", "cluster": "sluice-bench"},
        "static_resources": {"listeners": [listener], "clusters": clusters},
    }))
}

fn validate_with_sluice(file: &str, text: &str) -> Result<Vec<Object>, BootstrapError> {
    parse_file(file, text)
        .into_iter()
        .map(|r| r.map_err(|e| BootstrapError::Invalid(e.to_string())))
        .collect()
}

fn placed_listener(
    mut listener: Value,
    listen: SocketAddr,
    routes: &BTreeMap<String, Value>,
    rbac: Option<&Value>,
) -> Result<Value, BootstrapError> {
    let name = listener
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(map) = listener.as_object_mut() else {
        return Err(BootstrapError::Invalid(format!(
            "listener {name} is not an object"
        )));
    };
    map.insert(
        "address".to_string(),
        json!({"socket_address": {"address": listen.ip().to_string(), "port_value": listen.port()}}),
    );
    let chains = map
        .get_mut("filter_chains")
        .and_then(Value::as_array_mut)
        .map(|c| c.as_mut_slice())
        .unwrap_or_default();
    for chain in chains {
        let filters = chain
            .get_mut("filters")
            .and_then(Value::as_array_mut)
            .map(|f| f.as_mut_slice())
            .unwrap_or_default();
        for filter in filters {
            let Some(hcm) = filter
                .get_mut("typed_config")
                .filter(|c| c.get("@type").and_then(Value::as_str) == Some(HCM_TYPE))
            else {
                continue;
            };
            inline_routes(hcm, routes)?;
            if let Some(rbac) = rbac {
                insert_before_router(hcm, rbac.clone())?;
            }
        }
    }
    Ok(listener)
}

/// Replaces `rds` by the RouteConfiguration it names (static bootstraps have no RDS server).
fn inline_routes(hcm: &mut Value, routes: &BTreeMap<String, Value>) -> Result<(), BootstrapError> {
    let Some(map) = hcm.as_object_mut() else {
        return Ok(());
    };
    let Some(rds) = map.remove("rds") else {
        return Ok(());
    };
    let name = rds
        .get("route_config_name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let route_config = routes.get(name).cloned().ok_or_else(|| {
        BootstrapError::Invalid(format!(
            "rds names route configuration {name:?}, which the CEC does not define"
        ))
    })?;
    map.insert("route_config".to_string(), route_config);
    Ok(())
}

fn insert_before_router(hcm: &mut Value, filter: Value) -> Result<(), BootstrapError> {
    let filters = hcm
        .get_mut("http_filters")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| {
            BootstrapError::Invalid("HTTP connection manager without http_filters".to_string())
        })?;
    let router = filters
        .iter()
        .position(|f| f.get("name").and_then(Value::as_str) == Some(ROUTER_FILTER))
        .ok_or_else(|| {
            BootstrapError::Invalid("HTTP connection manager without a router filter".to_string())
        })?;
    filters.insert(router, filter);
    Ok(())
}

fn static_cluster(
    mut cluster: Value,
    endpoints: &BTreeMap<String, Vec<SocketAddr>>,
) -> Result<Value, BootstrapError> {
    let name = cluster
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let Some(map) = cluster.as_object_mut() else {
        return Err(BootstrapError::Invalid(format!(
            "cluster {name} is not an object"
        )));
    };
    if map.get("type").and_then(Value::as_str) != Some("EDS") {
        return Ok(cluster);
    }
    let hosts = endpoints
        .get(&name)
        .ok_or_else(|| BootstrapError::MissingEndpoints(name.clone()))?;
    let lb_endpoints: Vec<Value> = hosts
        .iter()
        .map(|addr| json!({"endpoint": {"address": {"socket_address": {"address": addr.ip().to_string(), "port_value": addr.port()}}}}))
        .collect();
    map.insert("type".to_string(), json!("STATIC"));
    map.insert(
        "load_assignment".to_string(),
        json!({"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]}),
    );
    Ok(cluster)
}

/// The RBAC filter equivalent to the policies' ingress HTTP rules; `None` without any policy.
fn rbac_filter(policy_yaml: &str) -> Result<Option<Value>, BootstrapError> {
    let mut policies = Map::new();
    for object in validate_with_sluice("cnp.yaml", policy_yaml)? {
        let Object::NetworkPolicy(policy) = object else {
            continue;
        };
        let name = format!(
            "{}/{}",
            policy.namespace.as_deref().unwrap_or_default(),
            policy.name
        );
        for rule in &policy.rules {
            if !rule.egress.is_empty()
                || !rule.ingress_deny.is_empty()
                || !rule.egress_deny.is_empty()
            {
                return Err(BootstrapError::Unsupported(format!(
                    "{name} {}: only ingress allow rules",
                    rule.path
                )));
            }
            for peer_rule in &rule.ingress {
                policies.insert(
                    format!("{name} {}", peer_rule.path),
                    rbac_policy(peer_rule)?,
                );
            }
        }
    }
    if policies.is_empty() {
        return Ok(None);
    }
    Ok(Some(json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {"@type": RBAC_TYPE, "rules": {"action": "ALLOW", "policies": policies}},
    })))
}

/// One ingress rule: its HTTP rules are ORed permissions. Its peers must include `world`,
/// the identity both proxies give the load generator, so the principal is "any".
fn rbac_policy(rule: &PeerRule) -> Result<Value, BootstrapError> {
    let peers_are_world = rule
        .entities
        .iter()
        .any(|e| matches!(e, Entity::World | Entity::All))
        && rule.endpoints.is_empty()
        && rule.requires.is_empty()
        && rule.cidrs.is_empty()
        && rule.nodes.is_empty();
    if !peers_are_world {
        return Err(BootstrapError::Unsupported(format!(
            "{}: peers other than fromEntities world/all",
            rule.path
        )));
    }
    let mut permissions = Vec::new();
    for port_rule in &rule.to_ports {
        match &port_rule.rules {
            None => permissions.push(json!({"any": true})),
            Some(L7Rules::Http(http)) if http.is_empty() => permissions.push(json!({"any": true})),
            Some(L7Rules::Http(http)) => {
                for (index, http_rule) in http.iter().enumerate() {
                    permissions.push(http_permission(
                        http_rule,
                        &format!("{}.toPorts.rules.http[{index}]", rule.path),
                    )?);
                }
            }
            Some(_) => {
                return Err(BootstrapError::Unsupported(format!(
                    "{}: non-HTTP L7 rules",
                    rule.path
                )))
            }
        }
    }
    Ok(json!({"permissions": permissions, "principals": [{"any": true}]}))
}

/// Fields ANDed; RE2 `safe_regex` matches the whole value, as Cilium's anchored regexes do.
fn http_permission(rule: &HttpRule, path: &str) -> Result<Value, BootstrapError> {
    if !rule.headers.is_empty() || !rule.header_matches.is_empty() {
        return Err(BootstrapError::Unsupported(format!(
            "{path}: headers/headerMatches"
        )));
    }
    let matchers: Vec<Value> = [(":method", &rule.method), (":path", &rule.path), (":authority", &rule.host)]
        .into_iter()
        .filter_map(|(header, regex)| {
            regex.as_ref().map(|r| json!({"header": {"name": header, "string_match": {"safe_regex": {"regex": r.source}}}}))
        })
        .collect();
    Ok(match matchers.len() {
        0 => json!({"any": true}),
        _ => json!({"and_rules": {"rules": matchers}}),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::{cluster_endpoints, policy_yaml, CEC_YAML, ENVOY_FRONTEND};

    fn placement() -> Placement {
        Placement {
            listen: SocketAddr::V4(ENVOY_FRONTEND),
            endpoints: cluster_endpoints(),
        }
    }

    fn bootstrap(rules: usize) -> Value {
        match envoy_bootstrap(CEC_YAML, &policy_yaml(rules), &placement()) {
            Ok(value) => value,
            Err(error) => panic!("{error}"),
        }
    }

    #[test]
    fn listener_gets_the_address_the_inlined_routes_and_rbac_before_the_router() {
        let value = bootstrap(2);
        let listener = &value["static_resources"]["listeners"][0];
        assert_eq!(
            listener["address"]["socket_address"]["address"],
            "127.211.2.1"
        );
        assert_eq!(listener["address"]["socket_address"]["port_value"], 8000);
        assert!(listener.get("@type").is_none());
        let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
        assert!(hcm.get("rds").is_none());
        let route = &hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"];
        assert_eq!(
            route["weighted_clusters"]["clusters"][0]["name"],
            "default/bench-v1"
        );
        assert_eq!(route["weighted_clusters"]["clusters"][1]["weight"], 10);
        assert_eq!(route["retry_policy"]["num_retries"], 2);
        let filters: Vec<&str> = hcm["http_filters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| f["name"].as_str())
            .collect();
        assert_eq!(
            filters,
            ["envoy.filters.http.rbac", "envoy.filters.http.router"]
        );
    }

    #[test]
    fn cnp_http_rules_become_ored_permissions_of_method_and_path_regexes() {
        let value = bootstrap(1000);
        let hcm = &value["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"];
        let policy = &hcm["http_filters"][0]["typed_config"]["rules"]["policies"]
            ["default/bench-l7 spec.ingress[0]"];
        let permissions = policy["permissions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(permissions.len(), 1000);
        let last = &permissions[999]["and_rules"]["rules"];
        assert_eq!(last[0]["header"]["name"], ":method");
        assert_eq!(
            last[0]["header"]["string_match"]["safe_regex"]["regex"],
            "GET"
        );
        assert_eq!(last[1]["header"]["name"], ":path");
        assert_eq!(
            last[1]["header"]["string_match"]["safe_regex"]["regex"],
            "/16k"
        );
        assert_eq!(policy["principals"], json!([{"any": true}]));
    }

    #[test]
    fn eds_clusters_become_static_with_the_backend_service_endpoints() {
        let value = bootstrap(2);
        let clusters = value["static_resources"]["clusters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(clusters.len(), 2);
        assert_eq!(clusters[1]["name"], "default/bench-v2");
        assert_eq!(clusters[1]["type"], "STATIC");
        assert_eq!(clusters[1]["connect_timeout"], "1s");
        let endpoint = &clusters[1]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
            ["endpoint"]["address"]["socket_address"];
        assert_eq!(endpoint["address"], "127.211.0.2");
        assert_eq!(endpoint["port_value"], 8080);
    }

    #[test]
    fn no_policy_means_no_rbac_filter() {
        let value = envoy_bootstrap(CEC_YAML, "", &placement()).unwrap_or_default();
        let filters = &value["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
            ["typed_config"]["http_filters"];
        assert_eq!(filters.as_array().map(Vec::len), Some(1));
    }

    #[test]
    fn missing_endpoints_and_untranslatable_policies_are_errors() {
        let empty = Placement {
            listen: SocketAddr::V4(ENVOY_FRONTEND),
            endpoints: BTreeMap::new(),
        };
        assert!(
            matches!(envoy_bootstrap(CEC_YAML, "", &empty), Err(BootstrapError::MissingEndpoints(name)) if name == "default/bench-v1")
        );
        let from_pods = policy_yaml(2).replace(
            "fromEntities: [world]",
            "fromEndpoints: [{matchLabels: {app: client}}]",
        );
        assert!(matches!(
            envoy_bootstrap(CEC_YAML, &from_pods, &placement()),
            Err(BootstrapError::Unsupported(_))
        ));
        let bad_cec = CEC_YAML.replace(
            "connect_timeout: 1s",
            "connect_timeout: 1s\n      no_such_field: 1",
        );
        assert!(matches!(
            envoy_bootstrap(&bad_cec, "", &placement()),
            Err(BootstrapError::Invalid(_))
        ));
    }
}
