//! Pod-to-pod HTTP benchmark (sources side): the manifests `sluice agent --datapath ebpf` reads
//! for a client pod and a server pod on one node, the three policies compared (none, L3/L4,
//! L7), and the server pod's nginx.

use std::fmt;
use std::net::Ipv4Addr;
use std::path::Path;

/// The node the agent runs as.
pub const NODE_NAME: &str = "bench-node";
/// The server pod's HTTP port.
pub const SERVER_PORT: u16 = 80;
/// The path the load asks for; the L7 policy allows exactly `GET` on it.
pub const PATH: &str = "/small";
/// A path the L7 policy does not allow: the proxy answers it with 403, which proves the L7
/// policy is in force before its run is measured.
pub const DENIED_PATH: &str = "/denied";

/// What stands between the client and the server pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Policy {
    None,
    /// The server's port allowed to the client's identity, enforced in the kernel.
    L3L4,
    /// Same, plus an HTTP rule: the kernel redirects the flow to the proxy.
    L7,
}

impl Policy {
    pub const ALL: [Policy; 3] = [Policy::None, Policy::L3L4, Policy::L7];

    pub fn name(self) -> &'static str {
        match self {
            Self::None => "no policy",
            Self::L3L4 => "L3/L4 policy",
            Self::L7 => "L7 policy (proxy)",
        }
    }

    /// The CiliumNetworkPolicy for this case (`None`: no file at all).
    pub fn manifest(self) -> Option<String> {
        let rules = match self {
            Self::None => return None,
            Self::L3L4 => String::new(),
            Self::L7 => format!("      rules:\n        http:\n        - method: GET\n          path: \"{PATH}\"\n"),
        };
        Some(format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata:\n  name: bench-server\n  namespace: default\n\
             spec:\n  endpointSelector:\n    matchLabels:\n      app: server\n  ingress:\n  - fromEndpoints:\n    - matchLabels:\n        app: client\n\
             \x20   toPorts:\n    - ports:\n      - port: \"{SERVER_PORT}\"\n        protocol: TCP\n{rules}"
        ))
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A running Pod as a cluster would report it (scheduled on [`NODE_NAME`], with its IP), and
/// this node's Node object.
pub fn running_manifests(pods: &[(&str, Ipv4Addr)], node_ip: Ipv4Addr) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {NODE_NAME}}}\nstatus:\n  addresses: [{{type: InternalIP, address: {node_ip}}}]\n"
    );
    for (app, ip) in pods {
        out.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {app}, namespace: default, labels: {{app: {app}}}}}\n\
             spec: {{nodeName: {NODE_NAME}, containers: [{{name: {app}, image: bench}}]}}\nstatus: {{phase: Running, podIP: {ip}}}\n"
        ));
    }
    out
}

/// nginx.conf for one single-process nginx in the server pod, rooted at `dir`.
pub fn nginx_conf(dir: &Path, listen: Ipv4Addr) -> String {
    crate::backend::single_process_nginx(
        dir,
        &format!(
            "    listen {listen}:{SERVER_PORT};\n\
             \x20   location = {PATH} {{ default_type text/plain; return 200 \"hello\\n\"; }}\n\
             \x20   location / {{ default_type text/plain; return 200 \"not for the load\\n\"; }}\n"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_l7_policy_has_http_rules_and_no_policy_has_no_file() {
        assert_eq!(Policy::None.manifest(), None);
        let l4 = Policy::L3L4.manifest().expect("a policy");
        let l7 = Policy::L7.manifest().expect("a policy");
        assert!(!l4.contains("http:"), "{l4}");
        assert!(l7.starts_with(&l4), "the L7 policy is the L3/L4 one plus rules:\n{l7}");
        assert!(l7.ends_with("      rules:\n        http:\n        - method: GET\n          path: \"/small\"\n"), "{l7}");
    }

    #[test]
    fn policies_parse_as_yaml_with_the_port_and_peer() {
        let text = Policy::L7.manifest().expect("a policy");
        let value: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
        let ingress = &value["spec"]["ingress"][0];
        assert_eq!(ingress["fromEndpoints"][0]["matchLabels"]["app"], "client");
        assert_eq!(ingress["toPorts"][0]["ports"][0]["port"], "80");
        assert_eq!(ingress["toPorts"][0]["rules"]["http"][0]["path"], "/small");
        assert_eq!(value["spec"]["endpointSelector"]["matchLabels"]["app"], "server");
    }

    #[test]
    fn running_pods_are_scheduled_here_with_their_ip() {
        let text = running_manifests(
            &[("client", Ipv4Addr::new(198, 18, 0, 10))],
            Ipv4Addr::new(198, 18, 255, 1),
        );
        let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&text)
            .map(|d| serde::Deserialize::deserialize(d).expect("yaml"))
            .collect();
        assert_eq!(documents[0]["kind"], "Node");
        assert_eq!(documents[1]["metadata"]["labels"]["app"], "client");
        assert_eq!(documents[1]["spec"]["nodeName"], NODE_NAME);
        assert_eq!(documents[1]["status"]["podIP"], "198.18.0.10");
    }
}
