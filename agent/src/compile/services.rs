//! compile (pure), services part: Services and CiliumEnvoyConfigs -> listeners and clusters.
//!
//! In gateway mode every Service port is a proxy listener (its frontend) forwarding to the
//! cluster of its backends, unless a CiliumEnvoyConfig lists the Service in `services[]`: then
//! the frontend serves that config's listener routes (cilium.md §2.4). Backends come from the
//! Service's EndpointSlices, else from the ready pods its selector picks (cilium.md §2.5).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use sluice_envoy_config::envoy::{self as model, Discovery, EnvoyConfig, RouteSource};
use sluice_envoy_config::k8s::{L4Protocol, ServicePort, TargetPort};
use sluice_envoy_config::{LabelSet, Model, Service};
use sluice_proxy::tables::{self, Bind, Endpoint};

use super::envoy::{self as convert, Context};
use super::policy::Warnings;
use crate::view::ServiceView;

/// Listeners, clusters and their views.
#[derive(Debug, Default)]
pub struct Frontends {
    pub listeners: Vec<tables::Listener>,
    pub clusters: BTreeMap<String, Arc<tables::Cluster>>,
    pub views: Vec<ServiceView>,
    pub errors: Vec<String>,
    /// Service ports a CiliumEnvoyConfig lists in `services[]`: (namespace, name, port) -> the
    /// CEC listener serving them. The kernel datapath sends their VIP to the proxy untranslated.
    pub l7_service_ports: BTreeMap<(String, String, u16), String>,
}

pub fn frontend_listener_name(service: &Service, port: &ServicePort) -> String {
    format!("svc:{}/{}:{}", service.namespace, service.name, port.port)
}

fn port_cluster_name(service: &Service, port: &str) -> String {
    format!("{}/{}:{}", service.namespace, service.name, port)
}

fn config_name(config: &EnvoyConfig) -> String {
    match &config.namespace {
        Some(namespace) => format!("CiliumEnvoyConfig {namespace}/{}", config.name),
        None => format!("CiliumClusterwideEnvoyConfig {}", config.name),
    }
}

fn config_ref(config: &EnvoyConfig) -> String {
    match &config.namespace {
        Some(namespace) => format!("{namespace}/{}", config.name),
        None => config.name.clone(),
    }
}

/// The backends of one Service port.
pub fn service_port_backends(model: &Model, service: &Service, port: &ServicePort) -> Vec<SocketAddr> {
    let slices: Vec<_> = model
        .endpoint_slices()
        .filter(|s| s.namespace == service.namespace && s.service_name.as_deref() == Some(service.name.as_str()))
        .collect();
    let mut backends = BTreeSet::new();
    if !slices.is_empty() {
        for slice in slices {
            let Some(number) = slice
                .ports
                .iter()
                .find(|p| p.name == port.name && p.protocol == port.protocol)
                .and_then(|p| p.port)
            else {
                continue;
            };
            for endpoint in slice.endpoints.iter().filter(|e| e.ready) {
                backends.extend(endpoint.addresses.iter().map(|ip| SocketAddr::new(*ip, number)));
            }
        }
        return backends.into_iter().collect();
    }
    let Some(selector) = &service.selector else { return Vec::new() };
    for pod in model.pods().filter(|p| p.namespace == service.namespace) {
        if !selector.iter().all(|(k, v)| pod.labels.get(k) == Some(v)) {
            continue;
        }
        let number = match &port.target_port {
            TargetPort::Number(n) => Some(*n),
            TargetPort::Name(name) => pod
                .container_ports
                .iter()
                .find(|c| c.name.as_deref() == Some(name.as_str()) && c.protocol == port.protocol)
                .map(|c| c.port),
        };
        if let (Some(number), Some(ip)) = (number, pod.pod_ips.first()) {
            backends.insert(SocketAddr::new(*ip, number));
        }
    }
    backends.into_iter().collect()
}

fn endpoints(addrs: &[SocketAddr]) -> Vec<Endpoint> {
    addrs.iter().map(|addr| Endpoint { addr: *addr, weight: 1 }).collect()
}

/// EDS assignments of every Service: `ns/name:port`, `ns/name:portname` and `ns/name` (all ports).
fn service_assignments(model: &Model) -> BTreeMap<String, Vec<SocketAddr>> {
    let mut out: BTreeMap<String, Vec<SocketAddr>> = BTreeMap::new();
    for service in model.services() {
        let mut all = BTreeSet::new();
        for port in service.ports.iter().filter(|p| p.protocol == L4Protocol::Tcp) {
            let backends = service_port_backends(model, service, port);
            all.extend(backends.iter().copied());
            out.insert(port_cluster_name(service, &port.port.to_string()), backends.clone());
            if let Some(name) = &port.name {
                out.insert(port_cluster_name(service, name), backends);
            }
        }
        out.insert(format!("{}/{}", service.namespace, service.name), all.into_iter().collect());
    }
    out
}

/// In gateway mode a loopback cluster IP is bound as is (tests and the demo put Services on
/// 127.0.0.0/8); any other cluster IP is not an address of this host, so the frontend gets
/// an automatic loopback port instead.
fn frontend_bind(service: &Service, port: &ServicePort) -> Bind {
    match service.cluster_ip {
        Some(ip @ IpAddr::V4(v4)) if v4.is_loopback() => Bind::Addr(SocketAddr::new(ip, port.port)),
        Some(ip @ IpAddr::V6(v6)) if v6.is_loopback() => Bind::Addr(SocketAddr::new(ip, port.port)),
        _ => Bind::LoopbackAuto,
    }
}

/// A CEC listener as the proxy needs it: its HCM with the route config resolved.
struct ResolvedListener {
    listener: tables::Listener,
    config: String,
}

fn resolve_listener(
    listener: &model::Listener,
    config: &EnvoyConfig,
    all_configs: &[&EnvoyConfig],
    cx: &mut Context<'_>,
    errors: &mut Vec<String>,
) -> Option<tables::Listener> {
    let origin = config_name(config);
    let Some(chain) = listener.filter_chains.first() else {
        errors.push(format!("{origin}: listener {}: no filter chain with an http_connection_manager", listener.name));
        return None;
    };
    if listener.filter_chains.len() > 1 {
        cx.warnings.insert(format!(
            "{origin}: listener {}: only the first of {} filter chains is used",
            listener.name,
            listener.filter_chains.len()
        ));
    }
    let hcm = &chain.http_connection_manager;
    let route_config = match &hcm.routes {
        RouteSource::Inline(inline) => convert::route_config(inline, cx),
        RouteSource::Rds(name) => {
            // The config's own routes first, then every config's: RDS names are global in xDS.
            let found = config
                .route_configurations
                .iter()
                .chain(all_configs.iter().flat_map(|c| c.route_configurations.iter()))
                .find(|r| &r.name == name);
            match found {
                Some(found) => convert::route_config(found, cx),
                None => {
                    errors.push(format!(
                        "{origin}: listener {}: rds route_config_name `{name}` names no RouteConfiguration",
                        listener.name
                    ));
                    return None;
                }
            }
        }
    };
    let bind = match &listener.address {
        Some(address) => Bind::Addr(SocketAddr::new(address.address, address.port_value)),
        None => Bind::LoopbackAuto,
    };
    Some(tables::Listener {
        name: listener.name.clone(),
        bind,
        http: Arc::new(convert::http_connection_manager(hcm, Arc::new(route_config))),
    })
}

/// Clusters referenced by a route config.
fn referenced_clusters(route_config: &tables::RouteConfig) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for vhost in &route_config.virtual_hosts {
        for route in &vhost.routes {
            if let tables::RouteAction::Forward(forward) = &route.action {
                names.extend(forward.clusters.iter().map(|c| c.name.clone()));
                names.extend(forward.mirrors.iter().map(|m| m.cluster.clone()));
            }
        }
    }
    names
}

pub fn compile_frontends(model: &Model, own_node_labels: &LabelSet, warnings: &mut Warnings) -> Frontends {
    let mut out = Frontends::default();
    let assignments = service_assignments(model);
    let configs: Vec<&EnvoyConfig> = model
        .envoy_configs()
        .filter(|c| c.node_selector.as_ref().is_none_or(|s| s.matches(own_node_labels)))
        .collect();

    // CEC listeners, by name; the first definition of a name wins.
    let mut cec_listeners: BTreeMap<String, ResolvedListener> = BTreeMap::new();
    let mut eds_services: BTreeSet<String> = BTreeSet::new();
    for config in &configs {
        let origin = config_name(config);
        let mut cx = Context { origin: &origin, warnings };
        for listener in &config.listeners {
            if let Some(existing) = cec_listeners.get(&listener.name) {
                out.errors.push(format!(
                    "{origin}: listener {} is already defined by {}; that definition is used",
                    listener.name, existing.config
                ));
                continue;
            }
            if let Some(resolved) = resolve_listener(listener, config, &configs, &mut cx, &mut out.errors) {
                cec_listeners.insert(listener.name.clone(), ResolvedListener { listener: resolved, config: origin.clone() });
            }
        }
        for service in &config.services {
            eds_services.insert(format!("{}/{}", service.namespace, service.name));
        }
        for backend in &config.backend_services {
            eds_services.insert(format!("{}/{}", backend.namespace, backend.name));
        }
        for service in config.services.iter().map(|s| (&s.namespace, &s.name)).chain(config.backend_services.iter().map(|b| (&b.namespace, &b.name))) {
            if !model.services().any(|s| &s.namespace == service.0 && &s.name == service.1) {
                out.errors.push(format!("{origin}: Service {}/{} does not exist", service.0, service.1));
            }
        }
    }

    // Which Service ports a CEC redirects, and to which of its listeners.
    let mut redirects: BTreeMap<(String, String, u16), (String, String)> = BTreeMap::new();
    for config in &configs {
        let origin = config_name(config);
        for service in &config.services {
            // The model resolved `listener` to a qualified listener of this config.
            let listener_name = service.listener.clone();
            if !cec_listeners.contains_key(&listener_name) {
                out.errors.push(format!(
                    "{origin}: services[] {}/{}: listener {listener_name} could not be set up; the Service keeps its plain frontend",
                    service.namespace, service.name
                ));
                continue;
            }
            let Some(svc) = model.services().find(|s| s.namespace == service.namespace && s.name == service.name) else {
                continue;
            };
            for port in &svc.ports {
                if service.ports.is_empty() || service.ports.contains(&port.port) {
                    let key = (svc.namespace.clone(), svc.name.clone(), port.port);
                    redirects.entry(key).or_insert_with(|| (listener_name.clone(), config_ref(config)));
                }
            }
        }
    }

    out.l7_service_ports = redirects.iter().map(|(key, (listener, _))| (key.clone(), listener.clone())).collect();

    // Service frontends.
    for service in model.services() {
        for port in &service.ports {
            if port.protocol != L4Protocol::Tcp {
                warnings.insert(format!(
                    "Service {}/{} port {}: {:?} is not proxied in gateway mode",
                    service.namespace, service.name, port.port, port.protocol
                ));
                continue;
            }
            let listener_name = frontend_listener_name(service, port);
            let cluster = port_cluster_name(service, &port.port.to_string());
            let backends = assignments.get(&cluster).cloned().unwrap_or_default();
            let redirect = redirects.get(&(service.namespace.clone(), service.name.clone(), port.port));
            let http = match redirect.and_then(|(name, _)| cec_listeners.get(name)) {
                Some(cec) => cec.listener.http.clone(),
                None => Arc::new(convert::default_http_connection_manager(
                    &listener_name,
                    Arc::new(convert::forward_all(&listener_name, &cluster)),
                )),
            };
            out.clusters.insert(cluster.clone(), Arc::new(convert::default_cluster(&cluster, endpoints(&backends))));
            out.views.push(ServiceView {
                name: format!("{}/{}:{}", service.namespace, service.name, port.port),
                kind: format!("{:?}", service.service_type),
                frontend: match frontend_bind(service, port) {
                    Bind::Addr(addr) => Some(addr),
                    _ => None,
                },
                listener: listener_name.clone(),
                envoy_config: redirect.map(|(_, config)| config.clone()),
                backends,
                kernel: None,
            });
            out.listeners.push(tables::Listener { name: listener_name, bind: frontend_bind(service, port), http });
        }
    }

    // EDS clusters of the Services the CECs reference (all-ports and per-port-name forms).
    for service in model.services() {
        let base = format!("{}/{}", service.namespace, service.name);
        if !eds_services.contains(&base) {
            continue;
        }
        let names = std::iter::once(base.clone())
            .chain(service.ports.iter().filter_map(|p| p.name.as_ref().map(|n| port_cluster_name(service, n))));
        for name in names {
            let backends = assignments.get(&name).cloned().unwrap_or_default();
            out.clusters.insert(name.clone(), Arc::new(convert::default_cluster(&name, endpoints(&backends))));
        }
    }

    // CEC clusters override the defaults of the same name.
    let mut cec_clusters: BTreeMap<String, String> = BTreeMap::new();
    for config in &configs {
        let origin = config_name(config);
        let mut cx = Context { origin: &origin, warnings };
        for cluster in &config.clusters {
            if let Some(first) = cec_clusters.get(&cluster.name) {
                out.errors.push(format!("{origin}: cluster {} is already defined by {first}; that definition is used", cluster.name));
                continue;
            }
            let endpoints = match &cluster.discovery {
                Discovery::Static => match &cluster.load_assignment {
                    Some(cla) => convert::load_assignment_endpoints(cla, &mut cx),
                    None => {
                        out.errors.push(format!("{origin}: STATIC cluster {} has no load_assignment", cluster.name));
                        Vec::new()
                    }
                },
                Discovery::Eds { service_name } => {
                    let service_name = service_name.clone().unwrap_or_else(|| cluster.name.clone());
                    let own = config.load_assignments.iter().find(|cla| cla.cluster_name == service_name);
                    match (own, assignments.get(&service_name)) {
                        (Some(cla), _) => convert::load_assignment_endpoints(cla, &mut cx),
                        (None, Some(backends)) => endpoints(backends),
                        (None, None) => {
                            out.errors.push(format!(
                                "{origin}: EDS cluster {}: `{service_name}` is neither a ClusterLoadAssignment of this config nor a Service (`namespace/name` or `namespace/name:port`)",
                                cluster.name
                            ));
                            Vec::new()
                        }
                    }
                }
            };
            cec_clusters.insert(cluster.name.clone(), origin.clone());
            out.clusters.insert(cluster.name.clone(), Arc::new(convert::cluster(cluster, endpoints)));
        }
    }

    // CEC listeners themselves, with their views; unknown cluster references are errors.
    for (name, resolved) in cec_listeners {
        let referenced = referenced_clusters(&resolved.listener.http.route_config);
        let mut backends = BTreeSet::new();
        for cluster in &referenced {
            match out.clusters.get(cluster) {
                Some(c) => backends.extend(c.endpoints.iter().map(|e| e.addr)),
                None => out.errors.push(format!(
                    "{}: listener {name}: route cluster `{cluster}` is not defined (requests to it get the route's cluster_not_found status)",
                    resolved.config
                )),
            }
        }
        out.views.push(ServiceView {
            name: name.clone(),
            kind: "CEC-listener".to_string(),
            frontend: match resolved.listener.bind {
                Bind::Addr(addr) => Some(addr),
                _ => None,
            },
            listener: name,
            envoy_config: Some(resolved.config.split_once(' ').map_or(resolved.config.clone(), |(_, r)| r.to_string())),
            backends: backends.into_iter().collect(),
            kernel: None,
        });
        out.listeners.push(resolved.listener);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(yaml: &str) -> Model {
        sluice_envoy_config::parse_file("test.yaml", yaml).into_iter().filter_map(Result::ok).collect()
    }

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec:\n  clusterIP: 10.96.0.10\n  selector: {app: echo}\n  ports:\n  - {name: web, port: 80, targetPort: http}\n";

    #[test]
    fn selector_backends_resolve_named_target_ports_per_pod() {
        let m = model(&format!(
            "{SERVICE}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: a, labels: {{app: echo}}}}\nspec:\n  containers:\n  - ports: [{{name: http, containerPort: 8080}}]\nstatus: {{podIP: 127.0.0.1}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: b, labels: {{app: echo}}}}\nspec:\n  containers:\n  - ports: [{{name: http, containerPort: 9090}}]\nstatus: {{podIP: 127.0.0.2}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: c, labels: {{app: other}}}}\nstatus: {{podIP: 127.0.0.3}}\n"
        ));
        let service = m.services().next().cloned();
        let service = service.as_ref().map(|s| service_port_backends(&m, s, &s.ports[0]));
        assert_eq!(
            service,
            Some(vec![SocketAddr::from(([127, 0, 0, 1], 8080)), SocketAddr::from(([127, 0, 0, 2], 9090))])
        );
    }

    #[test]
    fn endpoint_slices_win_over_the_selector_and_skip_unready_endpoints() {
        let m = model(&format!(
            "{SERVICE}---\napiVersion: v1\nkind: Pod\nmetadata: {{name: a, labels: {{app: echo}}}}\nstatus: {{podIP: 127.0.0.1}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: echo-abc\n  labels: {{kubernetes.io/service-name: echo}}\naddressType: IPv4\nports: [{{name: web, port: 7070}}]\nendpoints:\n- addresses: [127.0.5.1]\n- addresses: [127.0.5.2]\n  conditions: {{ready: false}}\n"
        ));
        let frontends = compile_frontends(&m, &LabelSet::new(), &mut Warnings::new());
        let view = frontends.views.iter().find(|v| v.name == "default/echo:80");
        assert_eq!(view.map(|v| v.backends.clone()), Some(vec![SocketAddr::from(([127, 0, 5, 1], 7070))]));
        // A cluster IP outside loopback is not this host's: the frontend gets an automatic port.
        assert_eq!(frontends.listeners.iter().map(|l| (l.name.as_str(), l.bind.clone())).collect::<Vec<_>>(), vec![("svc:default/echo:80", Bind::LoopbackAuto)]);
    }

    #[test]
    fn an_hcm_request_timeout_reaches_the_listener_without_a_warning() {
        let cec = |timeout: &str| {
            format!("apiVersion: cilium.io/v2\nkind: CiliumEnvoyConfig\nmetadata: {{name: cfg}}\nspec:\n  resources:\n  - \"@type\": type.googleapis.com/envoy.config.listener.v3.Listener\n    name: l\n    filter_chains:\n    - filters:\n      - name: envoy.filters.network.http_connection_manager\n        typed_config:\n          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager\n          stat_prefix: l\n{timeout}          route_config: {{virtual_hosts: [{{name: v, domains: ['*'], routes: [{{match: {{prefix: /}}, direct_response: {{status: 200}}}}]}}]}}\n          http_filters: [{{name: envoy.filters.http.router}}]\n")
        };
        let compiled = |yaml: &str| {
            let mut warnings = Warnings::new();
            let frontends = compile_frontends(&model(yaml), &LabelSet::new(), &mut warnings);
            assert!(warnings.is_empty(), "{warnings:?}");
            frontends.listeners.iter().map(|l| l.http.request_timeout).collect::<Vec<_>>()
        };
        assert_eq!(compiled(&cec("          request_timeout: 30s\n")), vec![Some(std::time::Duration::from_secs(30))]);
        assert_eq!(compiled(&cec("")), vec![None]);
        assert_eq!(compiled(&cec("          request_timeout: 0s\n")), vec![None]);
    }
}
