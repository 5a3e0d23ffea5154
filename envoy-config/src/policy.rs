//! CiliumNetworkPolicy / CiliumClusterwideNetworkPolicy: sources -> **model**.
//! Rules come out with Cilium's namespace injection applied and regexes compiled.

mod raw;

use std::fmt;

use ipnet::IpNet;
use regex::Regex;

use crate::labels::Selector;

pub(crate) use raw::{parse_network_policy, selector_from_value};

/// A CNP (namespace Some) or CCNP (namespace None) with all of its rules.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkPolicy {
    /// `metadata.namespace` of a CNP; None for a CCNP.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
    /// Top-level `description` (older manifests put it outside `spec`).
    pub description: Option<String>,
    /// The rules of `spec` then of `specs[i]`, in document order.
    pub rules: Vec<Rule>,
}

impl NetworkPolicy {
    /// Whether this is a CiliumClusterwideNetworkPolicy.
    pub fn is_clusterwide(&self) -> bool {
        self.namespace.is_none()
    }
}

/// What a rule applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// `endpointSelector` (pods), namespace injection already applied for a CNP.
    Endpoints(Selector),
    /// `nodeSelector` (host policy; CCNP only).
    Nodes(Selector),
}

/// One Cilium rule (`spec` or one `specs[i]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Where the rule sits in its document: `spec` or `specs[i]`; prefix for diagnostics.
    pub path: String,
    /// The endpoints or nodes the rule selects.
    pub subject: Subject,
    /// `ingress` allow rules.
    pub ingress: Vec<PeerRule>,
    /// `ingressDeny` rules (their `to_ports` never carry L7 rules).
    pub ingress_deny: Vec<PeerRule>,
    /// `egress` allow rules.
    pub egress: Vec<PeerRule>,
    /// `egressDeny` rules (their `to_ports` never carry L7 rules).
    pub egress_deny: Vec<PeerRule>,
    /// `enableDefaultDeny`; None per direction = Cilium's default (deny once the rule has a
    /// section for that direction).
    pub enable_default_deny: DefaultDeny,
    /// `labels` (metadata only).
    pub labels: Vec<RuleLabel>,
    /// `description`.
    pub description: Option<String>,
    /// `log.value`: a value to tag flow logs of this rule with.
    pub log: Option<String>,
}

/// `enableDefaultDeny`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefaultDeny {
    /// `enableDefaultDeny.ingress`.
    pub ingress: Option<bool>,
    /// `enableDefaultDeny.egress`.
    pub egress: Option<bool>,
}

/// One entry of a rule's `labels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleLabel {
    /// `source` (empty when absent).
    pub source: String,
    /// `key`.
    pub key: String,
    /// `value` (empty when absent).
    pub value: String,
}

/// One ingress/egress (allow or deny) rule: a peer set ANDed with a port set.
/// Peer fields are ORed with each other; all-empty peers mean "any peer" when `to_ports`
/// is set, and nothing at all for an empty rule `{}` (which only flips default deny).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRule {
    /// Where the rule sits, e.g. `spec.ingress[2]`.
    pub path: String,
    /// `fromEndpoints` / `toEndpoints`, namespace injection applied.
    pub endpoints: Vec<Selector>,
    /// `fromRequires` / `toRequires`, namespace injection applied.
    pub requires: Vec<Selector>,
    /// `fromCIDR` + `fromCIDRSet` / `toCIDR` + `toCIDRSet`.
    pub cidrs: Vec<CidrRule>,
    /// `fromEntities` / `toEntities`.
    pub entities: Vec<Entity>,
    /// `fromNodes` / `toNodes` (node labels, no namespace injection).
    pub nodes: Vec<Selector>,
    /// `fromGroups` / `toGroups`, kept as written (cloud provider groups are not resolved).
    pub groups: Vec<serde_json::Value>,
    /// `toServices` (egress only).
    pub services: Vec<ServiceSelector>,
    /// `toFQDNs` (egress allow only).
    pub fqdns: Vec<FqdnSelector>,
    /// `toPorts`.
    pub to_ports: Vec<PortRule>,
    /// `icmps`.
    pub icmps: Vec<IcmpRule>,
    /// `authentication.mode`.
    pub authentication: Option<AuthenticationMode>,
}

impl PeerRule {
    /// Whether the rule names no peer at all (then `to_ports` apply to every peer).
    pub fn has_no_peers(&self) -> bool {
        self.endpoints.is_empty()
            && self.requires.is_empty()
            && self.cidrs.is_empty()
            && self.entities.is_empty()
            && self.nodes.is_empty()
            && self.groups.is_empty()
            && self.services.is_empty()
            && self.fqdns.is_empty()
    }
}

/// A CIDR peer: `cidr` minus `except`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CidrRule {
    /// The prefix (a bare address becomes a host prefix). None for a group reference.
    pub cidr: Option<IpNet>,
    /// `except` prefixes.
    pub except: Vec<IpNet>,
    /// `cidrGroupRef` (a CiliumCIDRGroup name; sluice does not read that kind yet).
    pub group_ref: Option<String>,
    /// `cidrGroupSelector` (CiliumCIDRGroup labels).
    pub group_selector: Option<Selector>,
}

/// Cilium entities (`fromEntities` / `toEntities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Entity {
    /// `all`: every peer.
    All,
    /// `world`: everything outside the cluster.
    World,
    /// `world-ipv4`.
    WorldIpv4,
    /// `world-ipv6`.
    WorldIpv6,
    /// `cluster`: host, remote-node, init, ingress, health, unmanaged, kube-apiserver and
    /// every pod of the local cluster.
    Cluster,
    /// `host`: the local node.
    Host,
    /// `init`: endpoints whose identity is not resolved yet.
    Init,
    /// `ingress`: Cilium's ingress proxy.
    Ingress,
    /// `unmanaged`: pods not managed by Cilium.
    Unmanaged,
    /// `remote-node`: other nodes.
    RemoteNode,
    /// `health`: health-check endpoints.
    Health,
    /// `none`: nothing.
    None,
    /// `kube-apiserver`.
    KubeApiserver,
}

impl Entity {
    /// Parses an entity name as written in policies.
    pub fn from_name(name: &str) -> Option<Entity> {
        Some(match name {
            "all" => Entity::All,
            "world" => Entity::World,
            "world-ipv4" => Entity::WorldIpv4,
            "world-ipv6" => Entity::WorldIpv6,
            "cluster" => Entity::Cluster,
            "host" => Entity::Host,
            "init" => Entity::Init,
            "ingress" => Entity::Ingress,
            "unmanaged" => Entity::Unmanaged,
            "remote-node" => Entity::RemoteNode,
            "health" => Entity::Health,
            "none" => Entity::None,
            "kube-apiserver" => Entity::KubeApiserver,
            _ => return Option::None,
        })
    }

    /// The name as written in policies.
    pub fn name(self) -> &'static str {
        match self {
            Entity::All => "all",
            Entity::World => "world",
            Entity::WorldIpv4 => "world-ipv4",
            Entity::WorldIpv6 => "world-ipv6",
            Entity::Cluster => "cluster",
            Entity::Host => "host",
            Entity::Init => "init",
            Entity::Ingress => "ingress",
            Entity::Unmanaged => "unmanaged",
            Entity::RemoteNode => "remote-node",
            Entity::Health => "health",
            Entity::None => "none",
            Entity::KubeApiserver => "kube-apiserver",
        }
    }

    /// Every entity, in the order Cilium documents them.
    pub const ALL: [Entity; 13] = [
        Entity::All,
        Entity::World,
        Entity::WorldIpv4,
        Entity::WorldIpv6,
        Entity::Cluster,
        Entity::Host,
        Entity::Init,
        Entity::Ingress,
        Entity::Unmanaged,
        Entity::RemoteNode,
        Entity::Health,
        Entity::None,
        Entity::KubeApiserver,
    ];
}

impl fmt::Display for Entity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One `toServices` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServiceSelector {
    /// `k8sService {serviceName, namespace}`; namespace defaults to the CNP's namespace.
    Name {
        /// `serviceName`.
        name: String,
        /// `namespace` (None only in a CCNP without one: any namespace).
        namespace: Option<String>,
    },
    /// `k8sServiceSelector {selector, namespace}` over Service labels.
    Selector {
        /// `selector` (no namespace injection: it selects Services, not pods).
        selector: Selector,
        /// `namespace` (defaulted like `Name`).
        namespace: Option<String>,
    },
}

/// One `toFQDNs` entry (or `rules.dns` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FqdnSelector {
    /// `matchName`: an exact DNS name (lower-cased, trailing dot removed).
    Name(String),
    /// `matchPattern`: `*` = any DNS characters except `.`, `**.` prefix = any subdomain depth.
    Pattern(String),
}

/// Protocol of a policy port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    /// `TCP`.
    Tcp,
    /// `UDP`.
    Udp,
    /// `SCTP`.
    Sctp,
    /// `VRRP` (accepted because Cilium's current CRD lists it).
    Vrrp,
    /// `IGMP` (accepted because Cilium's current CRD lists it).
    Igmp,
    /// `ANY` or absent: TCP, UDP and SCTP.
    Any,
}

/// A policy port: a number (0 = every port) or a container port name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Port {
    /// A port number; 0 means all ports.
    Number(u16),
    /// A named container port (lower-cased), resolved against the selected pods.
    Name(String),
}

/// One `toPorts[].ports[]` entry.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortProtocol {
    /// `port`.
    pub port: Port,
    /// `endPort`: last port of a range starting at `port` (numeric ports only, >= port).
    pub end_port: Option<u16>,
    /// `protocol` (absent = ANY).
    pub protocol: Protocol,
}

/// One `toPorts[]` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct PortRule {
    /// `ports` (empty = all ports).
    pub ports: Vec<PortProtocol>,
    /// `rules`: L7 rules; None = L4 only.
    pub rules: Option<L7Rules>,
    /// `terminatingTLS`.
    pub terminating_tls: Option<TlsContext>,
    /// `originatingTLS`.
    pub originating_tls: Option<TlsContext>,
    /// `serverNames`: allowed SNIs.
    pub server_names: Vec<String>,
    /// `listener`: redirect to a CEC listener instead of the policy proxy.
    pub listener: Option<ListenerRef>,
}

/// `terminatingTLS` / `originatingTLS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsContext {
    /// `secret {namespace, name}`.
    pub secret: Option<SecretRef>,
    /// `trustedCA` key in the secret (Cilium's default `ca.crt` when absent).
    pub trusted_ca: Option<String>,
    /// `certificate` key (default `tls.crt`).
    pub certificate: Option<String>,
    /// `privateKey` key (default `tls.key`).
    pub private_key: Option<String>,
}

/// A reference to a Kubernetes Secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretRef {
    /// `namespace` (None when absent).
    pub namespace: Option<String>,
    /// `name`.
    pub name: String,
}

/// `toPorts[].listener`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerRef {
    /// `envoyConfig.kind` resolved: true for a CiliumClusterwideEnvoyConfig. Defaults to the
    /// policy's own scope.
    pub clusterwide_envoy_config: bool,
    /// `envoyConfig.name`.
    pub envoy_config: String,
    /// `name` of the listener inside that config.
    pub name: String,
    /// `priority` 1-100 (None = Cilium's default).
    pub priority: Option<u8>,
}

/// `toPorts[].rules`: exactly one kind of L7 rules.
#[derive(Debug, Clone, PartialEq)]
pub enum L7Rules {
    /// `http`: ORed list; an empty list or `{}` entry allows everything (still proxied).
    Http(Vec<HttpRule>),
    /// `dns`: allowed names/patterns for the DNS proxy.
    Dns(Vec<FqdnSelector>),
    /// `kafka` (deprecated by Cilium), kept as written.
    Kafka(Vec<KafkaRule>),
    /// `l7proto` + `l7`: generic key/value rules for a named parser.
    Generic {
        /// `l7proto`.
        proto: String,
        /// `l7` entries.
        rules: Vec<std::collections::BTreeMap<String, String>>,
    },
}

/// One `rules.kafka[]` entry.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KafkaRule {
    /// `role` (produce/consume).
    pub role: Option<String>,
    /// `apiKey`.
    pub api_key: Option<String>,
    /// `apiVersion`.
    pub api_version: Option<String>,
    /// `clientID`.
    pub client_id: Option<String>,
    /// `topic`.
    pub topic: Option<String>,
}

/// A policy regex: the source as written and, unless it is a plain string, the compiled
/// anchored `^(?:...)$` form (Cilium's HTTP fields are full-string RE2 matches).
#[derive(Debug, Clone)]
pub struct AnchoredRegex {
    /// The pattern as written in the policy.
    pub source: String,
    /// `None` when `source` has no regex syntax, so a full match is string equality. Most
    /// policy methods and paths are such strings, and a compiled regex costs ~7 KiB: with
    /// 1000 HTTP rules that was 14 MiB per copy of the policy.
    regex: Option<Regex>,
}

/// Characters with a meaning outside a character class (`-`, `&`, `~` and `#` only have one
/// inside a class or with the `x` flag, which needs `(`); `]` and `}` are included to stay
/// conservative.
const REGEX_SYNTAX: &str = "\\.+*?()|[]{}^$";

impl AnchoredRegex {
    /// Compiles `source` anchored at both ends. The pattern must be valid on its own first:
    /// otherwise `a)|(?:.*` would wrap into `^(?:a)|(?:.*)$`, which matches everything.
    pub fn new(source: &str) -> Result<AnchoredRegex, regex::Error> {
        let regex = match source.contains(|c| REGEX_SYNTAX.contains(c)) {
            true => Some(anchored_regex(source)?),
            false => None,
        };
        Ok(AnchoredRegex {
            source: source.to_string(),
            regex,
        })
    }

    /// Whether the WHOLE of `text` matches.
    pub fn is_match(&self, text: &str) -> bool {
        match &self.regex {
            Some(regex) => regex.is_match(text),
            None => self.source == text,
        }
    }

    /// The compiled anchored pattern, when it is not a plain string.
    pub fn regex(&self) -> Option<&Regex> {
        self.regex.as_ref()
    }
}

/// `^(?:source)$`, after checking that `source` compiles by itself (see [`AnchoredRegex::new`]).
pub fn anchored_regex(source: &str) -> Result<Regex, regex::Error> {
    Regex::new(source)?;
    Regex::new(&format!("^(?:{source})$"))
}

impl PartialEq for AnchoredRegex {
    fn eq(&self, other: &AnchoredRegex) -> bool {
        self.source == other.source
    }
}

impl Eq for AnchoredRegex {}

/// One `rules.http[]` entry; all present fields must match (AND).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRule {
    /// `method` regex against the request method.
    pub method: Option<AnchoredRegex>,
    /// `path` regex against the request path including its query.
    pub path: Option<AnchoredRegex>,
    /// `host` regex against the authority.
    pub host: Option<AnchoredRegex>,
    /// `headers`: "Name: value" = exact value, "Name" = presence.
    pub headers: Vec<HeaderRequirement>,
    /// `headerMatches`.
    pub header_matches: Vec<HeaderMatch>,
}

/// One `headers` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderRequirement {
    /// Header name as written.
    pub name: String,
    /// Exact value required; None = the header must be present.
    pub value: Option<String>,
}

/// One `headerMatches` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// `name`.
    pub name: String,
    /// `value` (fallback when the secret cannot be read; empty/None = presence).
    pub value: Option<String>,
    /// `secret`: take the value from this Secret.
    pub secret: Option<SecretRef>,
    /// `mismatch`: what to do instead of denying when the value differs; None = deny.
    pub mismatch: Option<MismatchAction>,
}

/// `headerMatches[].mismatch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MismatchAction {
    /// Allow and log the mismatch.
    Log,
    /// Allow and add the expected value.
    Add,
    /// Allow and delete the header.
    Delete,
    /// Allow and replace (or add) the header with the expected value.
    Replace,
}

/// One `icmps[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpRule {
    /// `fields`.
    pub fields: Vec<IcmpField>,
}

/// One `icmps[].fields[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IcmpField {
    /// `family` (default IPv4).
    pub family: IcmpFamily,
    /// `type`: a number or a Cilium ICMP type name.
    pub icmp_type: IcmpType,
}

/// ICMP family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IcmpFamily {
    /// `IPv4` (default).
    Ipv4,
    /// `IPv6`.
    Ipv6,
}

/// ICMP type as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IcmpType {
    /// A numeric type 0-255.
    Number(u8),
    /// A name such as `EchoRequest`.
    Name(String),
}

/// `authentication.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthenticationMode {
    /// `disabled`.
    Disabled,
    /// `required`: traffic passes only once the identity pair is mutually authenticated.
    Required,
    /// `test-always-fail`: authentication always fails (for tests).
    TestAlwaysFail,
}

#[cfg(test)]
mod tests {
    use super::AnchoredRegex;

    #[test]
    fn a_pattern_that_only_compiles_once_wrapped_is_rejected() {
        assert!(AnchoredRegex::new("a)|(?:.*").is_err());
    }

    #[test]
    fn anchoring_is_whole_value() {
        let path = AnchoredRegex::new("/public|/health").expect("valid pattern");
        assert!(path.is_match("/health"));
        assert!(!path.is_match("/public/x"));
        assert!(!path.is_match("/x/health"));
    }

    #[test]
    fn plain_strings_are_kept_as_literals_and_match_exactly() {
        let literal = AnchoredRegex::new("/api/v1-items").expect("valid pattern");
        assert!(literal.regex().is_none());
        assert!(literal.is_match("/api/v1-items"));
        assert!(!literal.is_match("/api/v1-items/x") && !literal.is_match("x/api/v1-items"));
        for pattern in ["/api/.*", "GET|POST", "/a.b", "/x?", "[a]", "^/x$", "/a\\d"] {
            let regex = AnchoredRegex::new(pattern).expect("valid pattern");
            assert!(regex.regex().is_some(), "{pattern}");
        }
        assert!(!AnchoredRegex::new("/a.b").expect("valid pattern").is_match("/a.b/"));
    }
}
