//! Core Kubernetes objects (Namespace, Node, Pod, Service, EndpointSlice, Deployment):
//! sources -> **model**. Only the fields sluice uses are read; other fields are allowed,
//! since these are ordinary cluster objects, not configuration written for sluice.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::Deserialize;

use crate::error::{from_value, join, FieldError};

/// Transport protocol of a Kubernetes port (`TCP` when absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, Default)]
#[serde(rename_all = "UPPERCASE")]
pub enum L4Protocol {
    /// TCP (the Kubernetes default).
    #[default]
    Tcp,
    /// UDP.
    Udp,
    /// SCTP.
    Sctp,
}

/// A `v1 Namespace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels` (become `k8s:io.cilium.k8s.namespace.labels.<key>` on pods).
    pub labels: BTreeMap<String, String>,
}

/// A `v1 Node`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `status.addresses` of type `InternalIP`, in document order.
    pub addresses: Vec<IpAddr>,
}

/// A port a container declares; named ports are what CNP `port: "http"` and Service
/// `targetPort: http` resolve against.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ContainerPort {
    /// `name`, if any.
    pub name: Option<String>,
    /// `containerPort`.
    pub port: u16,
    /// `protocol` (default TCP).
    pub protocol: L4Protocol,
}

/// A `v1 Pod`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.serviceAccountName` (default `default`).
    pub service_account: String,
    /// `spec.nodeName`.
    pub node_name: Option<String>,
    /// `status.podIPs` (or `status.podIP` when the list is absent), deduplicated, in order.
    pub pod_ips: Vec<IpAddr>,
    /// Ports of every container (`spec.containers[].ports[]`).
    pub container_ports: Vec<ContainerPort>,
}

/// A Service port's `targetPort`: a number or the name of a container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A container port name.
    Name(String),
}

/// One entry of `spec.ports` of a Service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// `name` (required by Kubernetes when there are several ports; optional here).
    pub name: Option<String>,
    /// `port`, the frontend port on the cluster IP.
    pub port: u16,
    /// `targetPort` (default: the same number as `port`).
    pub target_port: TargetPort,
    /// `protocol` (default TCP).
    pub protocol: L4Protocol,
    /// `nodePort`, if any.
    pub node_port: Option<u16>,
}

/// `spec.type` of a Service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum ServiceType {
    /// `ClusterIP` (default).
    #[default]
    ClusterIP,
    /// `NodePort`.
    NodePort,
    /// `LoadBalancer`.
    LoadBalancer,
    /// `ExternalName`.
    ExternalName,
}

/// A `v1 Service`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `spec.selector`; None means endpoints are managed by hand (EndpointSlices).
    pub selector: Option<BTreeMap<String, String>>,
    /// `spec.clusterIP`; None when absent or `None` (headless).
    pub cluster_ip: Option<IpAddr>,
    /// `spec.ports`.
    pub ports: Vec<ServicePort>,
    /// `spec.type`.
    pub service_type: ServiceType,
}

/// One port of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPort {
    /// `name` (matches the Service port name).
    pub name: Option<String>,
    /// `port` (the backend port); None means "all ports".
    pub port: Option<u16>,
    /// `protocol` (default TCP).
    pub protocol: L4Protocol,
}

/// One endpoint of an EndpointSlice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `addresses`.
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready` (Kubernetes treats an absent value as ready).
    pub ready: bool,
    /// `targetRef.name` when `targetRef.kind` is `Pod`.
    pub target_pod: Option<String>,
    /// `nodeName`.
    pub node_name: Option<String>,
}

/// A `discovery.k8s.io/v1 EndpointSlice`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// The `kubernetes.io/service-name` label: which Service this slice belongs to.
    pub service_name: Option<String>,
    /// `ports`.
    pub ports: Vec<EndpointPort>,
    /// `endpoints`.
    pub endpoints: Vec<Endpoint>,
}

/// An `apps/v1 Deployment`; the demo and the directory source instantiate pods from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deployment {
    /// `metadata.namespace` (default `default`).
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `spec.replicas` (default 1).
    pub replicas: u32,
    /// `spec.template.metadata.labels`.
    pub pod_labels: BTreeMap<String, String>,
    /// `spec.template.spec.serviceAccountName` (default `default`).
    pub service_account: String,
    /// Ports of every container of the pod template.
    pub container_ports: Vec<ContainerPort>,
}

/// The label naming the Service of an EndpointSlice.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawMetadata {
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawLabelled {
    #[serde(default)]
    metadata: RawMetadata,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNode {
    #[serde(default)]
    status: RawNodeStatus,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawNodeStatus {
    #[serde(default)]
    addresses: Vec<RawNodeAddress>,
}

#[derive(Deserialize)]
struct RawNodeAddress {
    #[serde(rename = "type")]
    kind: String,
    address: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawPodSpec {
    #[serde(default)]
    service_account_name: Option<String>,
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default)]
    containers: Vec<RawContainer>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContainer {
    #[serde(default)]
    ports: Vec<RawContainerPort>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawContainerPort {
    #[serde(default)]
    name: Option<String>,
    container_port: u16,
    #[serde(default)]
    protocol: L4Protocol,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPod {
    #[serde(default)]
    spec: RawPodSpec,
    #[serde(default)]
    status: RawPodStatus,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawPodStatus {
    #[serde(default, rename = "podIP")]
    pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pod_ips: Vec<RawPodIp>,
}

#[derive(Deserialize)]
struct RawPodIp {
    ip: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawService {
    #[serde(default)]
    spec: RawServiceSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct RawServiceSpec {
    #[serde(default)]
    selector: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "clusterIP")]
    cluster_ip: Option<String>,
    #[serde(default)]
    ports: Vec<RawServicePort>,
    #[serde(default, rename = "type")]
    service_type: ServiceType,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawServicePort {
    #[serde(default)]
    name: Option<String>,
    port: u16,
    #[serde(default)]
    target_port: Option<RawIntOrString>,
    #[serde(default)]
    protocol: L4Protocol,
    #[serde(default)]
    node_port: Option<u16>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawIntOrString {
    Int(u16),
    String(String),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEndpointSlice {
    #[serde(default)]
    ports: Vec<RawEndpointPort>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEndpointPort {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    protocol: L4Protocol,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawEndpoint {
    #[serde(default)]
    addresses: Vec<String>,
    #[serde(default)]
    conditions: RawConditions,
    #[serde(default)]
    target_ref: Option<RawTargetRef>,
    #[serde(default)]
    node_name: Option<String>,
}

#[derive(Deserialize, Default)]
struct RawConditions {
    #[serde(default)]
    ready: Option<bool>,
}

#[derive(Deserialize)]
struct RawTargetRef {
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDeployment {
    spec: RawDeploymentSpec,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDeploymentSpec {
    #[serde(default)]
    replicas: Option<u32>,
    template: RawPodTemplate,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawPodTemplate {
    #[serde(default)]
    metadata: RawMetadata,
    #[serde(default)]
    spec: RawPodSpec,
}

const DEFAULT_SERVICE_ACCOUNT: &str = "default";

fn parse_ip(text: &str, path: &str) -> Result<IpAddr, FieldError> {
    text.parse()
        .map_err(|_| FieldError::new(path, format!("`{text}` is not an IP address")))
}

fn labels_of(document: &serde_json::Value) -> Result<BTreeMap<String, String>, FieldError> {
    let raw: RawLabelled = from_value(document.clone(), "")?;
    Ok(raw.metadata.labels)
}

fn container_ports(containers: Vec<RawContainer>) -> Vec<ContainerPort> {
    containers
        .into_iter()
        .flat_map(|container| container.ports)
        .map(|port| ContainerPort {
            name: port.name,
            port: port.container_port,
            protocol: port.protocol,
        })
        .collect()
}

pub(crate) fn parse_namespace(
    document: serde_json::Value,
    name: &str,
) -> Result<Namespace, FieldError> {
    Ok(Namespace {
        name: name.to_string(),
        labels: labels_of(&document)?,
    })
}

pub(crate) fn parse_node(document: serde_json::Value, name: &str) -> Result<Node, FieldError> {
    let labels = labels_of(&document)?;
    let raw: RawNode = from_value(document, "")?;
    let mut addresses = Vec::new();
    for (index, address) in raw.status.addresses.iter().enumerate() {
        if address.kind == "InternalIP" {
            let path = format!("status.addresses[{index}].address");
            addresses.push(parse_ip(&address.address, &path)?);
        }
    }
    Ok(Node {
        name: name.to_string(),
        labels,
        addresses,
    })
}

pub(crate) fn parse_pod(
    document: serde_json::Value,
    namespace: &str,
    name: &str,
) -> Result<Pod, FieldError> {
    let labels = labels_of(&document)?;
    let raw: RawPod = from_value(document, "")?;
    let mut pod_ips = Vec::new();
    if raw.status.pod_ips.is_empty() {
        if let Some(ip) = &raw.status.pod_ip {
            pod_ips.push(parse_ip(ip, "status.podIP")?);
        }
    }
    for (index, entry) in raw.status.pod_ips.iter().enumerate() {
        let ip = parse_ip(&entry.ip, &format!("status.podIPs[{index}].ip"))?;
        if !pod_ips.contains(&ip) {
            pod_ips.push(ip);
        }
    }
    Ok(Pod {
        namespace: namespace.to_string(),
        name: name.to_string(),
        labels,
        service_account: raw
            .spec
            .service_account_name
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string()),
        node_name: raw.spec.node_name,
        pod_ips,
        container_ports: container_ports(raw.spec.containers),
    })
}

pub(crate) fn parse_service(
    document: serde_json::Value,
    namespace: &str,
    name: &str,
) -> Result<Service, FieldError> {
    let labels = labels_of(&document)?;
    let raw: RawService = from_value(document, "")?;
    let cluster_ip = match raw.spec.cluster_ip.as_deref() {
        None | Some("") | Some("None") => None,
        Some(text) => Some(parse_ip(text, "spec.clusterIP")?),
    };
    let mut ports = Vec::new();
    for (index, port) in raw.spec.ports.into_iter().enumerate() {
        let target_port = match port.target_port {
            None => TargetPort::Number(port.port),
            Some(RawIntOrString::Int(number)) => TargetPort::Number(number),
            Some(RawIntOrString::String(text)) => match text.parse::<u16>() {
                Ok(number) => TargetPort::Number(number),
                Err(_) if is_port_name(&text) => TargetPort::Name(text),
                Err(_) => {
                    let path = join(&format!("spec.ports[{index}]"), "targetPort");
                    return Err(FieldError::new(
                        path,
                        format!("`{text}` is neither a port number nor a port name"),
                    ));
                }
            },
        };
        ports.push(ServicePort {
            name: port.name,
            port: port.port,
            target_port,
            protocol: port.protocol,
            node_port: port.node_port,
        });
    }
    Ok(Service {
        namespace: namespace.to_string(),
        name: name.to_string(),
        labels,
        selector: raw.spec.selector,
        cluster_ip,
        ports,
        service_type: raw.spec.service_type,
    })
}

pub(crate) fn parse_endpoint_slice(
    document: serde_json::Value,
    namespace: &str,
    name: &str,
) -> Result<EndpointSlice, FieldError> {
    let labels = labels_of(&document)?;
    let raw: RawEndpointSlice = from_value(document, "")?;
    let ports = raw
        .ports
        .into_iter()
        .map(|port| EndpointPort {
            name: port.name,
            port: port.port,
            protocol: port.protocol,
        })
        .collect();
    let mut endpoints = Vec::new();
    for (index, endpoint) in raw.endpoints.into_iter().enumerate() {
        let mut addresses = Vec::new();
        for (address_index, address) in endpoint.addresses.iter().enumerate() {
            addresses.push(parse_ip(
                address,
                &format!("endpoints[{index}].addresses[{address_index}]"),
            )?);
        }
        let target_pod = endpoint
            .target_ref
            .filter(|target| target.kind.as_deref() == Some("Pod"))
            .and_then(|target| target.name);
        endpoints.push(Endpoint {
            addresses,
            ready: endpoint.conditions.ready.unwrap_or(true),
            target_pod,
            node_name: endpoint.node_name,
        });
    }
    Ok(EndpointSlice {
        namespace: namespace.to_string(),
        name: name.to_string(),
        service_name: labels.get(SERVICE_NAME_LABEL).cloned(),
        ports,
        endpoints,
    })
}

pub(crate) fn parse_deployment(
    document: serde_json::Value,
    namespace: &str,
    name: &str,
) -> Result<Deployment, FieldError> {
    let raw: RawDeployment = from_value(document, "")?;
    Ok(Deployment {
        namespace: namespace.to_string(),
        name: name.to_string(),
        replicas: raw.spec.replicas.unwrap_or(1),
        pod_labels: raw.spec.template.metadata.labels,
        service_account: raw
            .spec
            .template
            .spec
            .service_account_name
            .unwrap_or_else(|| DEFAULT_SERVICE_ACCOUNT.to_string()),
        container_ports: container_ports(raw.spec.template.spec.containers),
    })
}

/// IANA-style service name as Kubernetes validates port names: 1-15 characters of
/// `[a-z0-9-]`, at least one letter, no leading/trailing or doubled hyphen.
pub(crate) fn is_port_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 15
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && text.bytes().any(|b| b.is_ascii_lowercase())
        && !text.starts_with('-')
        && !text.ends_with('-')
        && !text.contains("--")
}
