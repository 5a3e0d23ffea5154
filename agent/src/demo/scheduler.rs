//! The demo's stand-in for kube-scheduler, kubelet and IPAM (before sources: it writes manifests).
//!
//! A config dir holds objects as an API server would: Pods with `status.podIP`, Services with
//! a `clusterIP`. Example manifests are what a user applies, so the demo turns each one into
//! that running state: every standalone Pod and every Deployment replica gets a loopback pod IP
//! and this node, every Service a loopback cluster IP. The input files stay byte-for-byte as
//! Cilium ships them; the output is a separate, generated file.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde_yaml::{Mapping, Value};

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("{file}: {source}")]
    Yaml { file: String, source: serde_yaml::Error },
    #[error("{file}: document {document}: {reason}")]
    Shape { file: String, document: usize, reason: String },
    #[error("the scheduler ran out of addresses")]
    AddressesExhausted,
}

/// Hands out addresses: by default loopback ones, pods from `127.0.1.1`, services from
/// `127.0.10.1` (gateway mode binds them).
#[derive(Debug)]
pub struct Addresses {
    next_pod: u32,
    last_pod: Ipv4Addr,
    next_service: u32,
    last_service: Ipv4Addr,
}

impl Default for Addresses {
    fn default() -> Self {
        Self {
            next_pod: u32::from(Ipv4Addr::new(127, 0, 1, 1)),
            last_pod: Ipv4Addr::new(127, 0, 9, 254),
            next_service: u32::from(Ipv4Addr::new(127, 0, 10, 1)),
            last_service: Ipv4Addr::new(127, 0, 19, 254),
        }
    }
}

impl Addresses {
    /// Addresses for pods in network namespaces (the kernel datapath): pods from
    /// `198.18.0.10`, services from `198.19.0.10` (198.18.0.0/15 is never routed).
    pub fn for_namespaces() -> Self {
        Self {
            next_pod: u32::from(Ipv4Addr::new(198, 18, 0, 10)),
            last_pod: Ipv4Addr::new(198, 18, 254, 254),
            next_service: u32::from(Ipv4Addr::new(198, 19, 0, 10)),
            last_service: Ipv4Addr::new(198, 19, 255, 254),
        }
    }
}

fn take(next: &mut u32, last: Ipv4Addr) -> Result<Ipv4Addr, ScheduleError> {
    let ip = Ipv4Addr::from(*next);
    if ip > last {
        return Err(ScheduleError::AddressesExhausted);
    }
    *next += 1;
    Ok(ip)
}

impl Addresses {
    fn pod(&mut self) -> Result<Ipv4Addr, ScheduleError> {
        take(&mut self.next_pod, self.last_pod)
    }

    fn service(&mut self) -> Result<Ipv4Addr, ScheduleError> {
        take(&mut self.next_service, self.last_service)
    }
}

/// A pod as placed by the scheduler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledPod {
    pub namespace: String,
    pub name: String,
    pub ip: Ipv4Addr,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledService {
    pub namespace: String,
    pub name: String,
    pub cluster_ip: Ipv4Addr,
}

/// The running state of one manifest file.
#[derive(Debug, Clone)]
pub struct Scheduled {
    pub text: String,
    pub pods: Vec<ScheduledPod>,
    pub services: Vec<ScheduledService>,
}

fn key(name: &str) -> Value {
    Value::String(name.to_string())
}

/// Sets `value.<field>.<name> = new`, creating `<field>` as needed (`value` is a mapping).
fn set_in(value: &mut Value, field: &str, name: &str, new: Value) {
    let mut inner = match value.get(field) {
        Some(Value::Mapping(existing)) => existing.clone(),
        _ => Mapping::new(),
    };
    inner.insert(key(name), new);
    if let Value::Mapping(map) = value {
        map.insert(key(field), Value::Mapping(inner));
    }
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut current = value;
    for field in path {
        current = current.get(*field)?;
    }
    current.as_str()
}

fn labels_at(value: &Value, path: &[&str]) -> BTreeMap<String, String> {
    let mut current = value;
    for field in path {
        match current.get(*field) {
            Some(next) => current = next,
            None => return BTreeMap::new(),
        }
    }
    current
        .as_mapping()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_string(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

/// Gives `pod` this node and an address, and returns where it landed.
fn place_pod(pod: &mut Value, node: &str, addresses: &mut Addresses) -> Result<ScheduledPod, ScheduleError> {
    let ip = addresses.pod()?;
    set_in(pod, "spec", "nodeName", key(node));
    set_in(pod, "status", "phase", key("Running"));
    set_in(pod, "status", "podIP", key(&ip.to_string()));
    Ok(ScheduledPod {
        namespace: str_at(pod, &["metadata", "namespace"]).unwrap_or("default").to_string(),
        name: str_at(pod, &["metadata", "name"]).unwrap_or_default().to_string(),
        ip,
        labels: labels_at(pod, &["metadata", "labels"]),
    })
}

/// A Pod of `deployment`'s template, named `<deployment>-<index>`.
fn replica(deployment: &Value, index: u64) -> Value {
    let name = str_at(deployment, &["metadata", "name"]).unwrap_or("deployment");
    let template = deployment.get("spec").and_then(|s| s.get("template")).cloned().unwrap_or_default();
    let mut metadata = template.get("metadata").and_then(Value::as_mapping).cloned().unwrap_or_default();
    metadata.insert(key("name"), key(&format!("{name}-{index}")));
    if let Some(namespace) = str_at(deployment, &["metadata", "namespace"]) {
        metadata.insert(key("namespace"), key(namespace));
    }
    let mut pod = Mapping::new();
    pod.insert(key("apiVersion"), key("v1"));
    pod.insert(key("kind"), key("Pod"));
    pod.insert(key("metadata"), Value::Mapping(metadata));
    pod.insert(key("spec"), template.get("spec").cloned().unwrap_or_else(|| Value::Mapping(Mapping::new())));
    Value::Mapping(pod)
}

/// The running state of the manifests in `text` (a multi-document YAML file named `file`).
pub fn schedule(file: &str, text: &str, node: &str, addresses: &mut Addresses) -> Result<Scheduled, ScheduleError> {
    let mut documents = Vec::new();
    let mut pods = Vec::new();
    let mut services = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let mut value: Value = serde::Deserialize::deserialize(document)
            .map_err(|source| ScheduleError::Yaml { file: file.into(), source })?;
        if value.is_null() {
            continue;
        }
        if !value.is_mapping() {
            return Err(ScheduleError::Shape { file: file.into(), document: index + 1, reason: "not a mapping".into() });
        }
        match str_at(&value, &["kind"]) {
            Some("Pod") => {
                pods.push(place_pod(&mut value, node, addresses)?);
                documents.push(value);
            }
            Some("Deployment") => {
                let replicas = value.get("spec").and_then(|s| s.get("replicas")).and_then(Value::as_u64).unwrap_or(1);
                for index in 0..replicas {
                    let mut pod = replica(&value, index);
                    pods.push(place_pod(&mut pod, node, addresses)?);
                    documents.push(pod);
                }
                documents.push(value);
            }
            Some("Service") => {
                let cluster_ip = addresses.service()?;
                set_in(&mut value, "spec", "clusterIP", key(&cluster_ip.to_string()));
                services.push(ScheduledService {
                    namespace: str_at(&value, &["metadata", "namespace"]).unwrap_or("default").to_string(),
                    name: str_at(&value, &["metadata", "name"]).unwrap_or_default().to_string(),
                    cluster_ip,
                });
                documents.push(value);
            }
            _ => documents.push(value),
        }
    }
    let mut out = format!("# generated by `sluice demo` from {file}: the objects as a cluster would run them\n");
    for document in &documents {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(document).map_err(|source| ScheduleError::Yaml { file: file.into(), source })?);
    }
    Ok(Scheduled { text: out, pods, services })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn star_wars_app_gets_pods_for_replicas_and_a_cluster_ip() -> anyhow::Result<()> {
        let mut addresses = Addresses::default();
        let scheduled = schedule("http-sw-app.yaml", include_str!("../../../conformance/cilium-examples/http-sw-app.yaml"), "node-a", &mut addresses)?;
        let names: Vec<_> = scheduled.pods.iter().map(|p| (p.name.as_str(), p.ip.to_string())).collect();
        assert_eq!(
            names,
            vec![
                ("deathstar-0", "127.0.1.1".to_string()),
                ("deathstar-1", "127.0.1.2".to_string()),
                ("tiefighter", "127.0.1.3".to_string()),
                ("xwing", "127.0.1.4".to_string()),
            ]
        );
        assert_eq!(scheduled.services[0].cluster_ip, Ipv4Addr::new(127, 0, 10, 1));
        assert_eq!(scheduled.pods[0].labels.get("class").map(String::as_str), Some("deathstar"));
        let reparsed: Vec<Value> = serde_yaml::Deserializer::from_str(&scheduled.text)
            .map(serde::Deserialize::deserialize)
            .collect::<Result<_, _>>()?;
        let xwing = reparsed.iter().find(|d| str_at(d, &["metadata", "name"]) == Some("xwing"));
        assert_eq!(xwing.and_then(|x| str_at(x, &["status", "podIP"])), Some("127.0.1.4"));
        assert_eq!(xwing.and_then(|x| str_at(x, &["spec", "nodeName"])), Some("node-a"));
        Ok(())
    }
}
