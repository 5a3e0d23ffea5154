//! The benchmark's configuration (sources): the node's manifests, the CiliumEnvoyConfig and a
//! CiliumNetworkPolicy with N HTTP rules, as sluice reads them and as the harness translates them.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// Pods and Services on 127.211.0.0/16 (other suites use other 127.x nets).
pub const WORKLOAD_YAML: &str = include_str!("../config/workload.yaml");
/// The configuration both proxies run.
pub const CEC_YAML: &str = include_str!("../config/cec.yaml");

/// The backend pods (nginx listens on both, HTTP/1.1).
pub const BACKEND_V1: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 211, 0, 1), 8080);
pub const BACKEND_V2: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 211, 0, 2), 8080);
/// nginx's HTTP/2 (prior knowledge) port on pod v1, for the direct HTTP/2 baseline only.
pub const BACKEND_H2C: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 211, 0, 1), 8082);
/// The `bench` Service's cluster IP and port: sluice's frontend for the CEC listener.
pub const SLUICE_FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 211, 1, 1), 8000);
/// Where Envoy's copy of the CEC listener binds.
pub const ENVOY_FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 211, 2, 1), 8000);
/// Where the `pingora` target (benches/pingora-baseline) listens.
pub const PINGORA_FRONTEND: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 211, 4, 1), 8000);
/// sluice's metrics endpoint, away from the default port other agents may hold.
pub const SLUICE_METRICS: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(127, 211, 3, 1), 9965);

/// Paths the backend serves: a 6-byte body and a 16 KiB body.
pub const SMALL_PATH: &str = "/small";
pub const LARGE_PATH: &str = "/16k";
pub const LARGE_BODY_BYTES: usize = 16 * 1024;
/// A path no rule allows: both proxies must answer 403.
pub const DENIED_PATH: &str = "/denied";

/// EDS endpoints of the CEC's backend clusters, as Cilium would publish them for
/// `backendServices` (cluster name `namespace/service`).
pub fn cluster_endpoints() -> BTreeMap<String, Vec<SocketAddr>> {
    BTreeMap::from([
        (
            "default/bench-v1".to_string(),
            vec![SocketAddr::V4(BACKEND_V1)],
        ),
        (
            "default/bench-v2".to_string(),
            vec![SocketAddr::V4(BACKEND_V2)],
        ),
    ])
}

/// The benchmark policy's HTTP rules, `(method, path)`: `rules - 2` that no workload matches,
/// then the workloads' two paths last (the worst place for a first-match walk).
pub fn policy_http_rules(rules: usize) -> Vec<(&'static str, String)> {
    (0..rules.saturating_sub(2))
        .map(|index| format!("/api/v1/items/{index}"))
        .chain([SMALL_PATH, LARGE_PATH].map(str::to_string))
        .map(|path| ("GET", path))
        .collect()
}

/// A CiliumNetworkPolicy on the backend pods allowing `GET` of the two benchmark paths from
/// `world` (the load generator on 127.0.0.1 is no pod), after `rules - 2` HTTP rules that never
/// match the workload, so a policy of `rules` rules is walked to its end on every request.
pub fn policy_yaml(rules: usize) -> String {
    let mut text = String::from(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: bench-l7\n  namespace: default\n\
         spec:\n  endpointSelector:\n    matchLabels: {app: bench}\n  ingress:\n  - fromEntities: [world]\n    \
         toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules:\n        http:\n",
    );
    for (method, path) in policy_http_rules(rules) {
        let _ = writeln!(text, "        - {{method: {method}, path: \"{path}\"}}");
    }
    text
}

/// The same rules as the `pingora` target's allow-list: one `METHOD PATH` per line.
pub fn allow_list(rules: usize) -> String {
    policy_http_rules(rules)
        .into_iter()
        .map(|(method, path)| format!("{method} {path}\n"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_envoy_config::{parse_file, Object};

    #[test]
    fn shipped_manifests_and_generated_policy_parse_without_errors() {
        for (file, text) in [
            ("workload.yaml", WORKLOAD_YAML.to_string()),
            ("cec.yaml", CEC_YAML.to_string()),
            ("cnp.yaml", policy_yaml(1000)),
        ] {
            let objects = parse_file(file, &text);
            assert!(!objects.is_empty(), "{file} has no documents");
            for object in objects {
                if let Err(error) = object {
                    panic!("{file}: {error}");
                }
            }
        }
    }

    #[test]
    fn policy_has_the_requested_number_of_rules_with_the_workload_last() {
        let objects = parse_file("cnp.yaml", &policy_yaml(1000));
        let Some(Ok(Object::NetworkPolicy(policy))) = objects.into_iter().next() else {
            panic!("not a network policy");
        };
        let port_rule = &policy.rules[0].ingress[0].to_ports[0];
        let Some(sluice_envoy_config::policy::L7Rules::Http(http)) = &port_rule.rules else {
            panic!("no HTTP rules");
        };
        assert_eq!(http.len(), 1000);
        assert_eq!(
            http[999].path.as_ref().map(|p| p.source.as_str()),
            Some(LARGE_PATH)
        );
        assert_eq!(policy_yaml(2).matches("method: GET").count(), 2);
    }
}
