//! Serde mirror of the Cilium policy CRD and its conversion into the policy model:
//! sources -> **model**. Applies Cilium's namespace injection (ParseToCiliumRule).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use super::*;
use crate::error::{from_value, join, regex_reason, FieldError};
use crate::k8s::is_port_name;
use crate::labels::{
    LabelKey, Operator, Requirement, Selector, NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL,
    SOURCE_ANY, SOURCE_K8S, SOURCE_RESERVED,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPolicyDocument {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    spec: Option<RawRule>,
    #[serde(default)]
    specs: Option<Vec<RawRule>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawSelector {
    #[serde(default, rename = "matchLabels")]
    match_labels: BTreeMap<String, String>,
    #[serde(default, rename = "matchExpressions")]
    match_expressions: Vec<RawExpression>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExpression {
    key: String,
    operator: RawOperator,
    #[serde(default)]
    values: Vec<String>,
}

#[derive(Deserialize)]
enum RawOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawRule {
    #[serde(default)]
    endpoint_selector: Option<RawSelector>,
    #[serde(default)]
    node_selector: Option<RawSelector>,
    #[serde(default)]
    ingress: Vec<RawPeerRule>,
    #[serde(default)]
    ingress_deny: Vec<RawPeerRule>,
    #[serde(default)]
    egress: Vec<RawPeerRule>,
    #[serde(default)]
    egress_deny: Vec<RawPeerRule>,
    #[serde(default)]
    enable_default_deny: Option<RawDefaultDeny>,
    #[serde(default)]
    labels: Vec<RawRuleLabel>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    log: Option<RawLog>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaultDeny {
    #[serde(default)]
    ingress: Option<bool>,
    #[serde(default)]
    egress: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRuleLabel {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    #[serde(default)]
    value: String,
}

/// The union of ingress and egress (allow and deny) fields; which ones a direction may use
/// is checked after decoding so the error can say why.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPeerRule {
    #[serde(default)]
    from_endpoints: Vec<RawSelector>,
    #[serde(default)]
    from_requires: Vec<RawSelector>,
    #[serde(default, rename = "fromCIDR")]
    from_cidr: Vec<String>,
    #[serde(default, rename = "fromCIDRSet")]
    from_cidr_set: Vec<RawCidrSet>,
    #[serde(default)]
    from_entities: Vec<String>,
    #[serde(default)]
    from_groups: Vec<serde_json::Value>,
    #[serde(default)]
    from_nodes: Vec<RawSelector>,
    #[serde(default)]
    to_endpoints: Vec<RawSelector>,
    #[serde(default)]
    to_requires: Vec<RawSelector>,
    #[serde(default, rename = "toCIDR")]
    to_cidr: Vec<String>,
    #[serde(default, rename = "toCIDRSet")]
    to_cidr_set: Vec<RawCidrSet>,
    #[serde(default)]
    to_entities: Vec<String>,
    #[serde(default)]
    to_groups: Vec<serde_json::Value>,
    #[serde(default)]
    to_nodes: Vec<RawSelector>,
    #[serde(default)]
    to_services: Vec<RawService>,
    #[serde(default, rename = "toFQDNs")]
    to_fqdns: Vec<RawFqdn>,
    #[serde(default)]
    to_ports: Vec<RawPortRule>,
    #[serde(default)]
    icmps: Vec<RawIcmp>,
    #[serde(default)]
    authentication: Option<RawAuthentication>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawCidrSet {
    #[serde(default)]
    cidr: Option<String>,
    #[serde(default)]
    except: Vec<String>,
    #[serde(default)]
    cidr_group_ref: Option<String>,
    #[serde(default)]
    cidr_group_selector: Option<RawSelector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawService {
    #[serde(default)]
    k8s_service: Option<RawServiceName>,
    #[serde(default)]
    k8s_service_selector: Option<RawServiceSelector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawServiceName {
    service_name: String,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceSelector {
    selector: RawSelector,
    #[serde(default)]
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawFqdn {
    #[serde(default)]
    match_name: Option<String>,
    #[serde(default)]
    match_pattern: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPortRule {
    #[serde(default)]
    ports: Vec<RawPortProtocol>,
    #[serde(default)]
    rules: Option<RawL7Rules>,
    #[serde(default, rename = "terminatingTLS")]
    terminating_tls: Option<RawTls>,
    #[serde(default, rename = "originatingTLS")]
    originating_tls: Option<RawTls>,
    #[serde(default)]
    server_names: Vec<String>,
    #[serde(default)]
    listener: Option<RawListenerRef>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawPortValue {
    Number(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawPortProtocol {
    #[serde(default)]
    port: Option<RawPortValue>,
    #[serde(default)]
    end_port: Option<i64>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawL7Rules {
    #[serde(default)]
    http: Option<Vec<RawHttpRule>>,
    #[serde(default)]
    dns: Option<Vec<RawFqdn>>,
    #[serde(default)]
    kafka: Option<Vec<RawKafkaRule>>,
    #[serde(default)]
    l7proto: Option<String>,
    #[serde(default)]
    l7: Option<Vec<BTreeMap<String, String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawHttpRule {
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(default)]
    header_matches: Vec<RawHeaderMatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderMatch {
    name: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    secret: Option<RawSecretRef>,
    #[serde(default)]
    mismatch: Option<RawMismatch>,
}

#[derive(Deserialize)]
#[serde(rename_all = "UPPERCASE")]
enum RawMismatch {
    Log,
    Add,
    Delete,
    Replace,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecretRef {
    #[serde(default)]
    namespace: Option<String>,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawKafkaRule {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    api_key: Option<String>,
    #[serde(default)]
    api_version: Option<String>,
    #[serde(default, rename = "clientID")]
    client_id: Option<String>,
    #[serde(default)]
    topic: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTls {
    #[serde(default)]
    secret: Option<RawSecretRef>,
    #[serde(default, rename = "trustedCA")]
    trusted_ca: Option<String>,
    #[serde(default)]
    certificate: Option<String>,
    #[serde(default)]
    private_key: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawListenerRef {
    envoy_config: RawEnvoyConfigRef,
    name: String,
    #[serde(default)]
    priority: Option<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvoyConfigRef {
    #[serde(default)]
    kind: Option<RawEnvoyConfigKind>,
    name: String,
}

#[derive(Deserialize)]
enum RawEnvoyConfigKind {
    CiliumEnvoyConfig,
    CiliumClusterwideEnvoyConfig,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIcmp {
    #[serde(default)]
    fields: Vec<RawIcmpField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIcmpField {
    #[serde(default)]
    family: Option<RawIcmpFamily>,
    #[serde(rename = "type")]
    icmp_type: RawPortValue,
}

#[derive(Deserialize)]
enum RawIcmpFamily {
    IPv4,
    IPv6,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuthentication {
    mode: RawAuthMode,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case")]
enum RawAuthMode {
    Disabled,
    Required,
    TestAlwaysFail,
}

/// Which selector rule of Cilium's `getEndpointSelector` applies.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// CNP in this namespace.
    Namespaced(&'a str),
    /// CCNP; `matches_init` = the subject selects `reserved:init`.
    Clusterwide { matches_init: bool },
}

/// Decodes a whole CNP/CCNP document. `namespace` is None for a CCNP.
pub(crate) fn parse_network_policy(
    document: serde_json::Value,
    namespace: Option<&str>,
    name: &str,
) -> Result<NetworkPolicy, FieldError> {
    let serde_json::Value::Object(mut fields) = document else {
        return Err(FieldError::new("", "a policy must be an object"));
    };
    // The envelope fields are read by the caller; the API server owns `status`.
    for envelope in ["apiVersion", "kind", "metadata", "status"] {
        fields.remove(envelope);
    }
    let raw: RawPolicyDocument = from_value(serde_json::Value::Object(fields), "")?;
    let mut raw_rules = Vec::new();
    if let Some(rule) = raw.spec {
        raw_rules.push(("spec".to_string(), rule));
    }
    for (index, rule) in raw.specs.into_iter().flatten().enumerate() {
        raw_rules.push((format!("specs[{index}]"), rule));
    }
    if raw_rules.is_empty() {
        return Err(FieldError::new("", "a policy needs `spec` or `specs`"));
    }
    let rules = raw_rules
        .into_iter()
        .map(|(path, rule)| convert_rule(rule, path, namespace))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(NetworkPolicy {
        namespace: namespace.map(str::to_string),
        name: name.to_string(),
        description: raw.description,
        rules,
    })
}

/// Decodes a plain label selector (no namespace injection), e.g. a CEC `nodeSelector`.
pub(crate) fn selector_from_value(
    value: serde_json::Value,
    path: &str,
) -> Result<Selector, FieldError> {
    let raw: RawSelector = from_value(value, path)?;
    convert_selector(raw, path)
}

fn convert_selector(raw: RawSelector, path: &str) -> Result<Selector, FieldError> {
    let mut labels: BTreeMap<LabelKey, String> = BTreeMap::new();
    for (key, value) in raw.match_labels {
        labels.insert(LabelKey::parse(&key), value);
    }
    let mut requirements: Vec<Requirement> = labels
        .into_iter()
        .map(|(key, value)| Requirement {
            key,
            operator: Operator::In(vec![value]),
        })
        .collect();
    for (index, expression) in raw.match_expressions.into_iter().enumerate() {
        let expression_path = join(path, &format!("matchExpressions[{index}]"));
        let has_values = !expression.values.is_empty();
        let operator = match expression.operator {
            RawOperator::In if has_values => Operator::In(expression.values),
            RawOperator::NotIn if has_values => Operator::NotIn(expression.values),
            RawOperator::Exists if !has_values => Operator::Exists,
            RawOperator::DoesNotExist if !has_values => Operator::DoesNotExist,
            RawOperator::In | RawOperator::NotIn => {
                return Err(FieldError::new(
                    join(&expression_path, "values"),
                    "In and NotIn need at least one value",
                ))
            }
            RawOperator::Exists | RawOperator::DoesNotExist => {
                return Err(FieldError::new(
                    join(&expression_path, "values"),
                    "Exists and DoesNotExist take no values",
                ))
            }
        };
        requirements.push(Requirement {
            key: LabelKey::parse(&expression.key),
            operator,
        });
    }
    Ok(Selector { requirements })
}

fn pod_namespace_key() -> LabelKey {
    LabelKey::new(SOURCE_K8S, POD_NAMESPACE_LABEL)
}

/// A CNP subject always applies in the policy's namespace: Cilium overrides any
/// `k8s:io.kubernetes.pod.namespace` matchLabels entry with it.
fn subject_selector(raw: RawSelector, path: &str, namespace: &str) -> Result<Selector, FieldError> {
    let mut selector = convert_selector(raw, path)?;
    let key = pod_namespace_key();
    selector
        .requirements
        .retain(|r| !(r.key == key && matches!(&r.operator, Operator::In(v) if v.len() == 1)));
    selector.requirements.insert(
        0,
        Requirement {
            key,
            operator: Operator::In(vec![namespace.to_string()]),
        },
    );
    Ok(selector)
}

/// Cilium's `getEndpointSelector` for fromEndpoints/toEndpoints/fromRequires/toRequires.
fn peer_selector(raw: RawSelector, path: &str, scope: Scope<'_>) -> Result<Selector, FieldError> {
    let mut selector = convert_selector(raw, path)?;
    if selector.has_source(SOURCE_RESERVED) {
        return Ok(selector);
    }
    if selector.has_key(SOURCE_K8S, POD_NAMESPACE_LABEL)
        || selector.has_key(SOURCE_ANY, POD_NAMESPACE_LABEL)
    {
        return Ok(selector);
    }
    match scope {
        Scope::Clusterwide { matches_init: true } => {}
        Scope::Clusterwide {
            matches_init: false,
        } => {
            selector.requirements.push(Requirement {
                key: pod_namespace_key(),
                operator: Operator::Exists,
            });
        }
        Scope::Namespaced(namespace) => {
            let uses_namespace_labels = selector
                .has_key_prefix(SOURCE_K8S, NAMESPACE_LABELS_PREFIX)
                || selector.has_key_prefix(SOURCE_ANY, NAMESPACE_LABELS_PREFIX);
            if !uses_namespace_labels {
                selector.requirements.push(Requirement {
                    key: pod_namespace_key(),
                    operator: Operator::In(vec![namespace.to_string()]),
                });
            }
        }
    }
    Ok(selector)
}

fn convert_rule(raw: RawRule, path: String, namespace: Option<&str>) -> Result<Rule, FieldError> {
    let subject = match (raw.endpoint_selector, raw.node_selector, namespace) {
        (Some(_), Some(_), _) => {
            return Err(FieldError::new(path, "endpointSelector and nodeSelector are mutually exclusive"))
        }
        (None, None, _) => return Err(FieldError::new(path, "one of endpointSelector, nodeSelector is required")),
        (None, Some(_), Some(_)) => {
            return Err(FieldError::new(
                join(&path, "nodeSelector"),
                "a CiliumNetworkPolicy rule cannot have nodeSelector (only CiliumClusterwideNetworkPolicy)",
            ))
        }
        (None, Some(selector), None) => Subject::Nodes(convert_selector(selector, &join(&path, "nodeSelector"))?),
        (Some(selector), None, Some(ns)) => {
            Subject::Endpoints(subject_selector(selector, &join(&path, "endpointSelector"), ns)?)
        }
        (Some(selector), None, None) => {
            Subject::Endpoints(convert_selector(selector, &join(&path, "endpointSelector"))?)
        }
    };
    let scope = match (namespace, &subject) {
        (Some(ns), _) => Scope::Namespaced(ns),
        (None, Subject::Endpoints(selector)) => Scope::Clusterwide {
            matches_init: selector.has_key(SOURCE_RESERVED, "init"),
        },
        (None, Subject::Nodes(_)) => Scope::Clusterwide {
            matches_init: false,
        },
    };
    let host_policy = matches!(subject, Subject::Nodes(_));
    let context = RuleContext {
        scope,
        namespace,
        host_policy,
    };
    let convert_list = |rules: Vec<RawPeerRule>, field: &str, direction: Direction| {
        rules
            .into_iter()
            .enumerate()
            .map(|(index, rule)| {
                context.peer_rule(rule, join(&path, &format!("{field}[{index}]")), direction)
            })
            .collect::<Result<Vec<_>, _>>()
    };
    let ingress = convert_list(raw.ingress, "ingress", Direction::Ingress)?;
    let ingress_deny = convert_list(raw.ingress_deny, "ingressDeny", Direction::IngressDeny)?;
    let egress = convert_list(raw.egress, "egress", Direction::Egress)?;
    let egress_deny = convert_list(raw.egress_deny, "egressDeny", Direction::EgressDeny)?;
    Ok(Rule {
        path,
        subject,
        ingress,
        ingress_deny,
        egress,
        egress_deny,
        enable_default_deny: raw
            .enable_default_deny
            .map(|d| DefaultDeny {
                ingress: d.ingress,
                egress: d.egress,
            })
            .unwrap_or_default(),
        labels: raw
            .labels
            .into_iter()
            .map(|l| RuleLabel {
                source: l.source,
                key: l.key,
                value: l.value,
            })
            .collect(),
        description: raw.description,
        log: raw.log.map(|l| l.value),
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Ingress,
    IngressDeny,
    Egress,
    EgressDeny,
}

impl Direction {
    fn is_ingress(self) -> bool {
        matches!(self, Direction::Ingress | Direction::IngressDeny)
    }

    fn is_deny(self) -> bool {
        matches!(self, Direction::IngressDeny | Direction::EgressDeny)
    }
}

struct RuleContext<'a> {
    scope: Scope<'a>,
    namespace: Option<&'a str>,
    host_policy: bool,
}

fn misplaced(path: &str, field: &str, direction: Direction) -> FieldError {
    let section = match direction {
        Direction::Ingress => "an ingress rule",
        Direction::IngressDeny => "an ingressDeny rule",
        Direction::Egress => "an egress rule",
        Direction::EgressDeny => "an egressDeny rule",
    };
    FieldError::new(join(path, field), format!("not allowed in {section}"))
}

impl RuleContext<'_> {
    fn peer_rule(
        &self,
        raw: RawPeerRule,
        path: String,
        direction: Direction,
    ) -> Result<PeerRule, FieldError> {
        // Reject fields of the other direction (and L7/FQDN/auth in deny rules) by name.
        let wrong_side: &[(&str, bool)] = if direction.is_ingress() {
            &[
                ("toEndpoints", !raw.to_endpoints.is_empty()),
                ("toRequires", !raw.to_requires.is_empty()),
                ("toCIDR", !raw.to_cidr.is_empty()),
                ("toCIDRSet", !raw.to_cidr_set.is_empty()),
                ("toEntities", !raw.to_entities.is_empty()),
                ("toGroups", !raw.to_groups.is_empty()),
                ("toNodes", !raw.to_nodes.is_empty()),
                ("toServices", !raw.to_services.is_empty()),
                ("toFQDNs", !raw.to_fqdns.is_empty()),
            ]
        } else {
            &[
                ("fromEndpoints", !raw.from_endpoints.is_empty()),
                ("fromRequires", !raw.from_requires.is_empty()),
                ("fromCIDR", !raw.from_cidr.is_empty()),
                ("fromCIDRSet", !raw.from_cidr_set.is_empty()),
                ("fromEntities", !raw.from_entities.is_empty()),
                ("fromGroups", !raw.from_groups.is_empty()),
                ("fromNodes", !raw.from_nodes.is_empty()),
            ]
        };
        if let Some((field, _)) = wrong_side.iter().find(|(_, present)| *present) {
            return Err(misplaced(&path, field, direction));
        }
        if direction.is_deny() {
            if raw.authentication.is_some() {
                return Err(misplaced(&path, "authentication", direction));
            }
            if !raw.to_fqdns.is_empty() {
                return Err(misplaced(&path, "toFQDNs", direction));
            }
        }
        let (endpoints, requires, cidr, cidr_set, entities, groups, nodes, prefix) =
            if direction.is_ingress() {
                (
                    raw.from_endpoints,
                    raw.from_requires,
                    raw.from_cidr,
                    raw.from_cidr_set,
                    raw.from_entities,
                    raw.from_groups,
                    raw.from_nodes,
                    "from",
                )
            } else {
                (
                    raw.to_endpoints,
                    raw.to_requires,
                    raw.to_cidr,
                    raw.to_cidr_set,
                    raw.to_entities,
                    raw.to_groups,
                    raw.to_nodes,
                    "to",
                )
            };
        let field = |name: &str, index: usize| join(&path, &format!("{prefix}{name}[{index}]"));
        let endpoints = endpoints
            .into_iter()
            .enumerate()
            .map(|(i, s)| peer_selector(s, &field("Endpoints", i), self.scope))
            .collect::<Result<Vec<_>, _>>()?;
        let requires = requires
            .into_iter()
            .enumerate()
            .map(|(i, s)| peer_selector(s, &field("Requires", i), self.scope))
            .collect::<Result<Vec<_>, _>>()?;
        let nodes = nodes
            .into_iter()
            .enumerate()
            .map(|(i, s)| convert_selector(s, &field("Nodes", i)))
            .collect::<Result<Vec<_>, _>>()?;
        let mut cidrs = Vec::new();
        for (index, text) in cidr.iter().enumerate() {
            let net = parse_cidr(text, &field("CIDR", index))?;
            cidrs.push(CidrRule {
                cidr: Some(net),
                except: Vec::new(),
                group_ref: None,
                group_selector: None,
            });
        }
        for (index, set) in cidr_set.into_iter().enumerate() {
            cidrs.push(cidr_rule(set, &field("CIDRSet", index))?);
        }
        let mut parsed_entities = Vec::new();
        for (index, name) in entities.iter().enumerate() {
            let entity = Entity::from_name(name).ok_or_else(|| {
                let known: Vec<&str> = Entity::ALL.iter().map(|e| e.name()).collect();
                FieldError::new(
                    field("Entities", index),
                    format!("unknown entity `{name}` (known: {})", known.join(", ")),
                )
            })?;
            parsed_entities.push(entity);
        }
        let services = raw
            .to_services
            .into_iter()
            .enumerate()
            .map(|(i, s)| self.service_selector(s, &join(&path, &format!("toServices[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let fqdns = raw
            .to_fqdns
            .into_iter()
            .enumerate()
            .map(|(i, f)| fqdn_selector(f, &join(&path, &format!("toFQDNs[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let to_ports = raw
            .to_ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| self.port_rule(p, join(&path, &format!("toPorts[{i}]")), direction))
            .collect::<Result<Vec<_>, _>>()?;
        let icmps = raw
            .icmps
            .into_iter()
            .enumerate()
            .map(|(i, icmp)| icmp_rule(icmp, &join(&path, &format!("icmps[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let authentication = raw.authentication.map(|a| match a.mode {
            RawAuthMode::Disabled => AuthenticationMode::Disabled,
            RawAuthMode::Required => AuthenticationMode::Required,
            RawAuthMode::TestAlwaysFail => AuthenticationMode::TestAlwaysFail,
        });
        Ok(PeerRule {
            path,
            endpoints,
            requires,
            cidrs,
            entities: parsed_entities,
            nodes,
            groups,
            services,
            fqdns,
            to_ports,
            icmps,
            authentication,
        })
    }

    fn service_selector(&self, raw: RawService, path: &str) -> Result<ServiceSelector, FieldError> {
        let default_namespace =
            |ns: Option<String>| ns.or_else(|| self.namespace.map(str::to_string));
        match (raw.k8s_service, raw.k8s_service_selector) {
            (Some(service), None) => Ok(ServiceSelector::Name {
                name: service.service_name,
                namespace: default_namespace(service.namespace),
            }),
            (None, Some(selector)) => Ok(ServiceSelector::Selector {
                selector: convert_selector(
                    selector.selector,
                    &join(path, "k8sServiceSelector.selector"),
                )?,
                namespace: default_namespace(selector.namespace),
            }),
            _ => Err(FieldError::new(
                path,
                "exactly one of k8sService, k8sServiceSelector is required",
            )),
        }
    }

    fn port_rule(
        &self,
        raw: RawPortRule,
        path: String,
        direction: Direction,
    ) -> Result<PortRule, FieldError> {
        if direction.is_deny() {
            let l7_field = [
                ("rules", raw.rules.is_some()),
                ("terminatingTLS", raw.terminating_tls.is_some()),
                ("originatingTLS", raw.originating_tls.is_some()),
                ("serverNames", !raw.server_names.is_empty()),
                ("listener", raw.listener.is_some()),
            ];
            if let Some((field, _)) = l7_field.iter().find(|(_, present)| *present) {
                return Err(FieldError::new(
                    join(&path, field),
                    "deny rules match ports only; L7 rules, TLS and listeners are not allowed in them",
                ));
            }
        }
        if raw.ports.len() > MAX_PORTS_PER_RULE {
            return Err(FieldError::new(
                join(&path, "ports"),
                format!(
                    "at most {MAX_PORTS_PER_RULE} ports per toPorts entry (Cilium's limit), got {}",
                    raw.ports.len()
                ),
            ));
        }
        let ports = raw
            .ports
            .into_iter()
            .enumerate()
            .map(|(i, p)| port_protocol(p, &join(&path, &format!("ports[{i}]"))))
            .collect::<Result<Vec<_>, _>>()?;
        let rules = match raw.rules {
            None => None,
            Some(rules) => self.l7_rules(rules, &join(&path, "rules"))?,
        };
        let listener = match raw.listener {
            None => None,
            Some(listener) => Some(self.listener_ref(listener, &join(&path, "listener"))?),
        };
        Ok(PortRule {
            ports,
            rules,
            terminating_tls: raw.terminating_tls.map(tls_context),
            originating_tls: raw.originating_tls.map(tls_context),
            server_names: raw.server_names,
            listener,
        })
    }

    fn l7_rules(&self, raw: RawL7Rules, path: &str) -> Result<Option<L7Rules>, FieldError> {
        let kinds = [
            raw.http.is_some(),
            raw.dns.is_some(),
            raw.kafka.is_some(),
            raw.l7proto.is_some() || raw.l7.is_some(),
        ];
        match kinds.iter().filter(|present| **present).count() {
            0 => return Ok(None),
            1 => {}
            _ => {
                return Err(FieldError::new(
                    path,
                    "only one of http, dns, kafka, l7proto may be set",
                ))
            }
        }
        if self.host_policy && raw.dns.is_none() {
            return Err(FieldError::new(
                path,
                "host policies (nodeSelector) only allow dns L7 rules",
            ));
        }
        if let Some(http) = raw.http {
            let rules = http
                .into_iter()
                .enumerate()
                .map(|(i, rule)| http_rule(rule, &join(path, &format!("http[{i}]"))))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Some(L7Rules::Http(rules)));
        }
        if let Some(dns) = raw.dns {
            let rules = dns
                .into_iter()
                .enumerate()
                .map(|(i, rule)| fqdn_selector(rule, &join(path, &format!("dns[{i}]"))))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Some(L7Rules::Dns(rules)));
        }
        if let Some(kafka) = raw.kafka {
            let rules = kafka
                .into_iter()
                .map(|rule| KafkaRule {
                    role: rule.role,
                    api_key: rule.api_key,
                    api_version: rule.api_version,
                    client_id: rule.client_id,
                    topic: rule.topic,
                })
                .collect();
            return Ok(Some(L7Rules::Kafka(rules)));
        }
        let proto = raw
            .l7proto
            .filter(|p| !p.is_empty())
            .ok_or_else(|| FieldError::new(join(path, "l7proto"), "l7 rules need l7proto"))?;
        Ok(Some(L7Rules::Generic {
            proto,
            rules: raw.l7.unwrap_or_default(),
        }))
    }

    fn listener_ref(&self, raw: RawListenerRef, path: &str) -> Result<ListenerRef, FieldError> {
        let clusterwide_envoy_config = match raw.envoy_config.kind {
            Some(RawEnvoyConfigKind::CiliumClusterwideEnvoyConfig) => true,
            Some(RawEnvoyConfigKind::CiliumEnvoyConfig) if self.namespace.is_none() => {
                return Err(FieldError::new(
                    join(path, "envoyConfig.kind"),
                    "a clusterwide policy cannot reference a namespaced CiliumEnvoyConfig",
                ))
            }
            Some(RawEnvoyConfigKind::CiliumEnvoyConfig) => false,
            None => self.namespace.is_none(),
        };
        if let Some(priority) = raw.priority {
            if !(1..=100).contains(&priority) {
                return Err(FieldError::new(
                    join(path, "priority"),
                    "must be within 1..=100",
                ));
            }
        }
        Ok(ListenerRef {
            clusterwide_envoy_config,
            envoy_config: raw.envoy_config.name,
            name: raw.name,
            priority: raw.priority,
        })
    }
}

/// Cilium's CRD caps `toPorts[].ports` at 40 entries.
const MAX_PORTS_PER_RULE: usize = 40;

fn parse_cidr(text: &str, path: &str) -> Result<IpNet, FieldError> {
    if let Ok(net) = text.parse::<IpNet>() {
        return Ok(net);
    }
    text.parse::<IpAddr>()
        .map(IpNet::from)
        .map_err(|_| FieldError::new(path, format!("`{text}` is not a CIDR or an IP address")))
}

fn cidr_rule(raw: RawCidrSet, path: &str) -> Result<CidrRule, FieldError> {
    let sources = [
        raw.cidr.is_some(),
        raw.cidr_group_ref.is_some(),
        raw.cidr_group_selector.is_some(),
    ];
    if sources.iter().filter(|present| **present).count() != 1 {
        return Err(FieldError::new(
            path,
            "exactly one of cidr, cidrGroupRef, cidrGroupSelector is required",
        ));
    }
    let cidr = raw
        .cidr
        .as_deref()
        .map(|text| parse_cidr(text, &join(path, "cidr")))
        .transpose()?;
    let mut except = Vec::new();
    for (index, text) in raw.except.iter().enumerate() {
        let except_path = join(path, &format!("except[{index}]"));
        let net = parse_cidr(text, &except_path)?;
        if let Some(outer) = cidr {
            if !outer.contains(&net) {
                return Err(FieldError::new(
                    except_path,
                    format!("{net} is not inside {outer}"),
                ));
            }
        }
        except.push(net);
    }
    let group_selector = raw
        .cidr_group_selector
        .map(|s| convert_selector(s, &join(path, "cidrGroupSelector")))
        .transpose()?;
    Ok(CidrRule {
        cidr,
        except,
        group_ref: raw.cidr_group_ref,
        group_selector,
    })
}

fn fqdn_selector(raw: RawFqdn, path: &str) -> Result<FqdnSelector, FieldError> {
    match (raw.match_name, raw.match_pattern) {
        (Some(name), None) => {
            validate_dns_text(&name, false, &join(path, "matchName"))?;
            Ok(FqdnSelector::Name(
                name.trim_end_matches('.').to_ascii_lowercase(),
            ))
        }
        (None, Some(pattern)) => {
            validate_dns_text(&pattern, true, &join(path, "matchPattern"))?;
            Ok(FqdnSelector::Pattern(
                pattern.trim_end_matches('.').to_ascii_lowercase(),
            ))
        }
        _ => Err(FieldError::new(
            path,
            "exactly one of matchName, matchPattern is required",
        )),
    }
}

/// Cilium's CRD patterns: `^([-a-zA-Z0-9_]+[.]?)+$`, plus `*` for patterns.
fn validate_dns_text(text: &str, pattern: bool, path: &str) -> Result<(), FieldError> {
    let allowed =
        |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || (pattern && c == '*');
    let labels_ok = text.split('.').enumerate().all(|(index, label)| {
        let last = index == text.split('.').count() - 1;
        (label.is_empty() && last && index > 0) || (!label.is_empty() && label.chars().all(allowed))
    });
    if text.is_empty() || !labels_ok {
        let what = if pattern { "DNS pattern" } else { "DNS name" };
        return Err(FieldError::new(
            path,
            format!("`{text}` is not a valid {what}"),
        ));
    }
    Ok(())
}

fn port_protocol(raw: RawPortProtocol, path: &str) -> Result<PortProtocol, FieldError> {
    let port_path = join(path, "port");
    let port = match raw.port {
        None => Port::Number(0),
        Some(RawPortValue::Number(number)) => {
            Port::Number(u16::try_from(number).map_err(|_| {
                FieldError::new(&port_path, format!("port {number} is outside 0..=65535"))
            })?)
        }
        Some(RawPortValue::Text(text)) if text.is_empty() => Port::Number(0),
        Some(RawPortValue::Text(text)) if text.bytes().all(|b| b.is_ascii_digit()) => {
            Port::Number(text.parse::<u16>().map_err(|_| {
                FieldError::new(&port_path, format!("port `{text}` is outside 0..=65535"))
            })?)
        }
        Some(RawPortValue::Text(text)) => {
            let name = text.to_ascii_lowercase();
            if !is_port_name(&name) {
                return Err(FieldError::new(
                    &port_path,
                    format!(
                        "`{text}` is neither a port number (0-65535) nor a port name \
                         (1-15 of a-z, 0-9, '-', with a letter, no leading, trailing or double '-')"
                    ),
                ));
            }
            Port::Name(name)
        }
    };
    let end_port = match raw.end_port {
        None | Some(0) => None,
        Some(end) => {
            let end_path = join(path, "endPort");
            let end = u16::try_from(end).map_err(|_| {
                FieldError::new(&end_path, format!("endPort {end} is outside 0..=65535"))
            })?;
            match &port {
                Port::Name(_) => {
                    return Err(FieldError::new(end_path, "endPort needs a numeric port"))
                }
                Port::Number(start) if end < *start => {
                    return Err(FieldError::new(
                        end_path,
                        format!("endPort {end} is below port {start}"),
                    ))
                }
                Port::Number(_) => Some(end),
            }
        }
    };
    let protocol = match raw.protocol.as_deref() {
        None | Some("") | Some("ANY") => Protocol::Any,
        Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some("VRRP") => Protocol::Vrrp,
        Some("IGMP") => Protocol::Igmp,
        Some(other) => {
            return Err(FieldError::new(
                join(path, "protocol"),
                format!("unknown protocol `{other}` (known: TCP, UDP, SCTP, VRRP, IGMP, ANY)"),
            ))
        }
    };
    Ok(PortProtocol {
        port,
        end_port,
        protocol,
    })
}

fn compile(field: Option<String>, path: &str) -> Result<Option<AnchoredRegex>, FieldError> {
    field
        .map(|source| {
            AnchoredRegex::new(&source)
                .map_err(|e| FieldError::new(path, regex_reason(&source, &e)))
        })
        .transpose()
}

fn http_rule(raw: RawHttpRule, path: &str) -> Result<HttpRule, FieldError> {
    let method = compile(raw.method, &join(path, "method"))?;
    let request_path = compile(raw.path, &join(path, "path"))?;
    let host = compile(raw.host, &join(path, "host"))?;
    let mut headers = Vec::new();
    for (index, header) in raw.headers.iter().enumerate() {
        // Cilium: split on the first space; "Name: value" is an exact match, "Name" presence.
        let requirement = match header.split_once(' ') {
            Some((name, value)) => HeaderRequirement {
                name: name.trim_end_matches(':').to_string(),
                value: Some(value.to_string()),
            },
            None => HeaderRequirement {
                name: header.clone(),
                value: None,
            },
        };
        if requirement.name.is_empty() {
            return Err(FieldError::new(
                join(path, &format!("headers[{index}]")),
                "header name is empty",
            ));
        }
        headers.push(requirement);
    }
    let mut header_matches = Vec::new();
    for (index, raw_match) in raw.header_matches.into_iter().enumerate() {
        if raw_match.name.is_empty() {
            return Err(FieldError::new(
                join(path, &format!("headerMatches[{index}].name")),
                "must not be empty",
            ));
        }
        header_matches.push(HeaderMatch {
            name: raw_match.name,
            value: raw_match.value,
            secret: raw_match.secret.map(secret_ref),
            mismatch: raw_match.mismatch.map(|m| match m {
                RawMismatch::Log => MismatchAction::Log,
                RawMismatch::Add => MismatchAction::Add,
                RawMismatch::Delete => MismatchAction::Delete,
                RawMismatch::Replace => MismatchAction::Replace,
            }),
        });
    }
    Ok(HttpRule {
        method,
        path: request_path,
        host,
        headers,
        header_matches,
    })
}

fn secret_ref(raw: RawSecretRef) -> SecretRef {
    SecretRef {
        namespace: raw.namespace,
        name: raw.name,
    }
}

fn tls_context(raw: RawTls) -> TlsContext {
    TlsContext {
        secret: raw.secret.map(secret_ref),
        trusted_ca: raw.trusted_ca,
        certificate: raw.certificate,
        private_key: raw.private_key,
    }
}

const ICMP_TYPE_NAMES: &[&str] = &[
    "EchoReply",
    "DestinationUnreachable",
    "Redirect",
    "Echo",
    "RouterAdvertisement",
    "RouterSelection",
    "TimeExceeded",
    "ParameterProblem",
    "Timestamp",
    "TimestampReply",
    "Photuris",
    "ExtendedEchoRequest",
    "ExtendedEcho Reply",
    "PacketTooBig",
    "EchoRequest",
    "MulticastListenerQuery",
    "MulticastListenerReport",
    "MulticastListenerDone",
    "RouterSolicitation",
    "NeighborSolicitation",
    "NeighborAdvertisement",
    "RedirectMessage",
    "RouterRenumbering",
    "ICMPNodeInformationQuery",
    "ICMPNodeInformationResponse",
    "InverseNeighborDiscoverySolicitation",
    "InverseNeighborDiscoveryAdvertisement",
    "HomeAgentAddressDiscoveryRequest",
    "HomeAgentAddressDiscoveryReply",
    "MobilePrefixSolicitation",
    "MobilePrefixAdvertisement",
    "DuplicateAddressRequestCodeSuffix",
    "DuplicateAddressConfirmationCodeSuffix",
];

fn icmp_rule(raw: RawIcmp, path: &str) -> Result<IcmpRule, FieldError> {
    let mut fields = Vec::new();
    for (index, field) in raw.fields.into_iter().enumerate() {
        let type_path = join(path, &format!("fields[{index}].type"));
        let icmp_type = match field.icmp_type {
            RawPortValue::Number(number) => {
                IcmpType::Number(u8::try_from(number).map_err(|_| {
                    FieldError::new(&type_path, format!("{number} is outside 0..=255"))
                })?)
            }
            RawPortValue::Text(text) => match text.parse::<u8>() {
                Ok(number) => IcmpType::Number(number),
                Err(_) if ICMP_TYPE_NAMES.contains(&text.as_str()) => IcmpType::Name(text),
                Err(_) => {
                    return Err(FieldError::new(
                        type_path,
                        format!("unknown ICMP type `{text}`"),
                    ))
                }
            },
        };
        let family = match field.family {
            None | Some(RawIcmpFamily::IPv4) => IcmpFamily::Ipv4,
            Some(RawIcmpFamily::IPv6) => IcmpFamily::Ipv6,
        };
        fields.push(IcmpField { family, icmp_type });
    }
    Ok(IcmpRule { fields })
}
