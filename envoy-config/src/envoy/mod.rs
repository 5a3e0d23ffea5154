//! CiliumEnvoyConfig / CiliumClusterwideEnvoyConfig and the Envoy v3 subset sluice
//! implements: sources -> **model**. Names are qualified exactly as Cilium does.

mod cluster;
pub(crate) mod duration;
mod listener;
mod matcher;
mod normalize;
mod route;

use std::collections::BTreeSet;

use serde::Deserialize;

pub use cluster::{
    Cluster, ClusterLoadAssignment, Discovery, LbEndpoint, LbPolicy, LocalityLbEndpoints,
    OutlierDetection, Thresholds,
};
pub use listener::{
    CodecType, CommonHttpProtocolOptions, EscapedSlashesAction, FilterChain, HttpConnectionManager,
    InternalAddressConfig, Listener, RouteSource, SocketAddress, UpgradeConfig,
};
pub use matcher::{
    HeaderMatchRule, HeaderMatcher, QueryMatchRule, QueryParameterMatcher, RegexMatcher,
    StringMatcher, StringPattern,
};
pub use route::{
    Action, AppendAction, ClusterSpecifier, DirectResponse, HeaderValueOption, MirrorPolicy,
    PathMatch, Redirect, RedirectPath, RegexRewrite, RetryOn, RetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
};

use crate::error::{from_value, join, FieldError};
use crate::labels::Selector;

/// A CEC (namespace Some) or CCEC (namespace None), validated and name-qualified.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyConfig {
    /// `metadata.namespace` of a CEC; None for a CCEC.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
    /// `spec.services`: Services whose traffic is redirected to a listener of this config.
    pub services: Vec<ServiceListener>,
    /// `spec.backendServices`: Services whose backends are published as EDS only.
    pub backend_services: Vec<BackendService>,
    /// `spec.nodeSelector`; None = every node.
    pub node_selector: Option<Selector>,
    /// Listener resources, in document order.
    pub listeners: Vec<Listener>,
    /// RouteConfiguration resources.
    pub route_configurations: Vec<RouteConfiguration>,
    /// Cluster resources.
    pub clusters: Vec<Cluster>,
    /// ClusterLoadAssignment resources.
    pub load_assignments: Vec<ClusterLoadAssignment>,
    /// Secret resources (TLS material is not used yet; kept for reference).
    pub secrets: Vec<Secret>,
}

impl EnvoyConfig {
    /// Whether this is a CiliumClusterwideEnvoyConfig.
    pub fn is_clusterwide(&self) -> bool {
        self.namespace.is_none()
    }
}

/// One `spec.services[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceListener {
    /// Service `name`.
    pub name: String,
    /// Service namespace (CEC: always the CEC's namespace; CCEC: default `default`).
    pub namespace: String,
    /// Qualified name of the listener the traffic goes to (`listener`, default: the first
    /// Listener of this config).
    pub listener: String,
    /// `ports`: frontend ports to redirect (empty = all).
    pub ports: Vec<u16>,
}

/// One `spec.backendServices[]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendService {
    /// Service `name`.
    pub name: String,
    /// Namespace (CEC: default its own namespace; CCEC: default `default`).
    pub namespace: String,
    /// `number`: frontend port numbers or names to publish (empty = all ports, as `ns/name`).
    pub ports: Vec<String>,
}

/// An Envoy `Secret` resource. Only the name is used; the rest is kept as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Secret {
    /// `name`, qualified like a cluster name.
    pub name: String,
    /// The other fields, as written.
    pub fields: serde_json::Map<String, serde_json::Value>,
}

/// An xDS `ConfigSource`: sluice is the only source, so only the ADS form is accepted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfigSource {
    #[serde(default, rename = "ads")]
    _ads: Option<RawEmpty>,
    #[serde(default, rename = "resource_api_version")]
    _resource_api_version: Option<RawApiVersion>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmpty {}

#[derive(Deserialize)]
enum RawApiVersion {
    V3,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawSpec {
    #[serde(default)]
    services: Vec<RawServiceListener>,
    #[serde(default)]
    backend_services: Vec<RawBackendService>,
    #[serde(default)]
    node_selector: Option<serde_json::Value>,
    #[serde(default)]
    resources: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServiceListener {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    listener: Option<String>,
    #[serde(default)]
    ports: Vec<u16>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackendService {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    number: Vec<String>,
}

const LISTENER_TYPE: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const ROUTE_TYPE: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const CLUSTER_TYPE: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const CLA_TYPE: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const SECRET_TYPE: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

/// Cilium's `ResourceQualifiedName`: `ns/cec/name`, with `/`-names passing through unless
/// forced, and forced names already under `ns/` left alone. A CCEC has ns = "".
pub fn qualify(namespace: &str, config_name: &str, name: &str, forced: bool) -> String {
    if name.is_empty() {
        return String::new();
    }
    match name.split_once('/') {
        Some(_) if !forced => name.to_string(),
        Some((first, _)) if first == namespace => name.to_string(),
        _ => format!("{namespace}/{config_name}/{name}"),
    }
}

/// Parses `spec` of a CEC/CCEC. `namespace` is None for a CCEC.
pub(crate) fn parse_envoy_config(
    spec: serde_json::Value,
    namespace: Option<&str>,
    name: &str,
) -> Result<EnvoyConfig, FieldError> {
    let raw: RawSpec = from_value(spec, "spec")?;
    let ns = namespace.unwrap_or("");
    let names = Qualifier {
        namespace: ns,
        config: name,
    };

    let node_selector = match raw.node_selector {
        None => None,
        Some(value) => Some(crate::policy::selector_from_value(
            value,
            "spec.nodeSelector",
        )?),
    };

    let mut config = EnvoyConfig {
        namespace: namespace.map(str::to_string),
        name: name.to_string(),
        services: Vec::new(),
        backend_services: Vec::new(),
        node_selector,
        listeners: Vec::new(),
        route_configurations: Vec::new(),
        clusters: Vec::new(),
        load_assignments: Vec::new(),
        secrets: Vec::new(),
    };

    let mut seen = BTreeSet::new();
    let mut rds_references = Vec::new();
    for (index, resource) in raw.resources.into_iter().enumerate() {
        let path = format!("spec.resources[{index}]");
        let resource = normalize::snake_case_keys(resource);
        let serde_json::Value::Object(mut fields) = resource else {
            return Err(FieldError::new(
                path,
                "a resource must be an object with \"@type\"",
            ));
        };
        let type_url = match fields.remove("@type") {
            Some(serde_json::Value::String(type_url)) => type_url,
            Some(_) => return Err(FieldError::new(join(&path, "@type"), "must be a string")),
            None => return Err(FieldError::new(join(&path, "@type"), "is required")),
        };
        let value = serde_json::Value::Object(fields);
        let (kind, resource_name) = match type_url.as_str() {
            LISTENER_TYPE => {
                let mut listener = listener::listener_from_value(value, &path)?;
                listener.name = names.forced(&listener.name);
                for (chain_index, chain) in listener.filter_chains.iter_mut().enumerate() {
                    let hcm_path = format!("{path}.filter_chains[{chain_index}].filters[0].typed_config");
                    match &mut chain.http_connection_manager.routes {
                        RouteSource::Rds(route_name) => {
                            *route_name = names.forced(route_name);
                            rds_references.push((format!("{hcm_path}.rds.route_config_name"), route_name.clone()));
                        }
                        RouteSource::Inline(routes) => {
                            check_route_configuration(routes)
                                .map_err(|reason| FieldError::new(join(&hcm_path, "route_config"), reason))?;
                            names.routes(routes);
                        }
                    }
                }
                let key = listener.name.clone();
                config.listeners.push(listener);
                ("Listener", key)
            }
            ROUTE_TYPE => {
                let mut routes: RouteConfiguration = from_value(value, &path)?;
                check_route_configuration(&routes).map_err(|reason| FieldError::new(path.clone(), reason))?;
                names.routes(&mut routes);
                let key = routes.name.clone();
                config.route_configurations.push(routes);
                ("RouteConfiguration", key)
            }
            CLUSTER_TYPE => {
                let mut cluster = cluster::cluster_from_value(value, &path)?;
                cluster.name = names.reference(&cluster.name);
                if let Some(assignment) = &mut cluster.load_assignment {
                    assignment.cluster_name = names.reference(&assignment.cluster_name);
                }
                let key = cluster.name.clone();
                config.clusters.push(cluster);
                ("Cluster", key)
            }
            CLA_TYPE => {
                let mut assignment: ClusterLoadAssignment = from_value(value, &path)?;
                assignment.cluster_name = names.reference(&assignment.cluster_name);
                let key = assignment.cluster_name.clone();
                config.load_assignments.push(assignment);
                ("ClusterLoadAssignment", key)
            }
            SECRET_TYPE => {
                let serde_json::Value::Object(mut fields) = value else {
                    return Err(FieldError::new(path, "a Secret must be an object"));
                };
                let secret_name = match fields.remove("name") {
                    Some(serde_json::Value::String(secret_name)) => secret_name,
                    _ => return Err(FieldError::new(join(&path, "name"), "a Secret needs a string name")),
                };
                let secret_name = names.reference(&secret_name);
                config.secrets.push(Secret { name: secret_name.clone(), fields });
                ("Secret", secret_name)
            }
            other => {
                return Err(FieldError::new(
                    join(&path, "@type"),
                    format!(
                        "unsupported resource type `{other}` (supported: {LISTENER_TYPE}, {ROUTE_TYPE}, \
                         {CLUSTER_TYPE}, {CLA_TYPE}, {SECRET_TYPE})"
                    ),
                ))
            }
        };
        if resource_name.is_empty() {
            return Err(FieldError::new(
                join(&path, "name"),
                format!("a {kind} needs a name"),
            ));
        }
        if !seen.insert((kind, resource_name.clone())) {
            return Err(FieldError::new(
                join(&path, "name"),
                format!("duplicate {kind} `{resource_name}` (after name qualification)"),
            ));
        }
    }

    for (path, route_name) in rds_references {
        if !config
            .route_configurations
            .iter()
            .any(|r| r.name == route_name)
        {
            return Err(FieldError::new(
                path,
                format!("`{route_name}` names no RouteConfiguration in this config"),
            ));
        }
    }

    for (index, service) in raw.services.into_iter().enumerate() {
        let path = format!("spec.services[{index}]");
        // Cilium forces a CEC's services into its own namespace.
        let service_namespace = match namespace {
            Some(own) => own.to_string(),
            None => service.namespace.unwrap_or_else(|| "default".to_string()),
        };
        let listener = match service.listener {
            Some(listener_name) => {
                let qualified = names.forced(&listener_name);
                if !config.listeners.iter().any(|l| l.name == qualified) {
                    return Err(FieldError::new(
                        join(&path, "listener"),
                        format!("no Listener `{listener_name}` in this config"),
                    ));
                }
                qualified
            }
            None => match config.listeners.first() {
                Some(first) => first.name.clone(),
                None => {
                    return Err(FieldError::new(
                        path,
                        "no Listener in this config to redirect the service to",
                    ))
                }
            },
        };
        config.services.push(ServiceListener {
            name: service.name,
            namespace: service_namespace,
            listener,
            ports: service.ports,
        });
    }
    for service in raw.backend_services {
        let service_namespace = service
            .namespace
            .or_else(|| namespace.map(str::to_string))
            .unwrap_or_else(|| "default".to_string());
        config.backend_services.push(BackendService {
            name: service.name,
            namespace: service_namespace,
            ports: service.number,
        });
    }
    Ok(config)
}

/// Cilium's name qualification for one config (`ns` is "" for a CCEC).
struct Qualifier<'a> {
    namespace: &'a str,
    config: &'a str,
}

impl Qualifier<'_> {
    /// Listener, RouteConfiguration and VirtualHost names, and RDS references.
    fn forced(&self, name: &str) -> String {
        qualify(self.namespace, self.config, name, true)
    }

    /// Cluster, ClusterLoadAssignment and Secret names and every cluster reference:
    /// names with a `/` (such as `default/echo`) pass through.
    fn reference(&self, name: &str) -> String {
        qualify(self.namespace, self.config, name, false)
    }

    fn routes(&self, routes: &mut RouteConfiguration) {
        routes.name = self.forced(&routes.name);
        for virtual_host in &mut routes.virtual_hosts {
            virtual_host.name = self.forced(&virtual_host.name);
            for route in &mut virtual_host.routes {
                let Action::Route(action) = &mut route.action else {
                    continue;
                };
                match &mut action.cluster {
                    ClusterSpecifier::Cluster(cluster) => *cluster = self.reference(cluster),
                    ClusterSpecifier::Weighted(clusters) => {
                        for weighted in clusters {
                            weighted.name = self.reference(&weighted.name);
                        }
                    }
                }
                for mirror in &mut action.request_mirror_policies {
                    mirror.cluster = self.reference(&mirror.cluster);
                }
            }
        }
    }
}

/// Checks what Envoy checks when loading a RouteConfiguration: domains are unique across
/// virtual hosts and direct responses fit the size limit.
fn check_route_configuration(routes: &RouteConfiguration) -> Result<(), String> {
    let mut domains = BTreeSet::new();
    for virtual_host in &routes.virtual_hosts {
        for domain in &virtual_host.domains {
            if !domains.insert(domain.as_str()) {
                return Err(if domain == "*" {
                    "more than one virtual host has the domain `*`".to_string()
                } else {
                    format!("domain `{domain}` is listed by two virtual hosts")
                });
            }
        }
        for route in &virtual_host.routes {
            if let Action::DirectResponse(DirectResponse {
                body: Some(body), ..
            }) = &route.action
            {
                if body.len() > routes.max_direct_response_body_size_bytes as usize {
                    return Err(format!(
                        "virtual host `{}`: direct_response body of {} bytes exceeds \
                         max_direct_response_body_size_bytes {}",
                        virtual_host.name,
                        body.len(),
                        routes.max_direct_response_body_size_bytes
                    ));
                }
            }
        }
    }
    Ok(())
}
