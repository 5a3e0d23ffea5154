//! Core Kubernetes objects and the Model container.

mod common;

use anyhow::{bail, Result};
use common::one;
use sluice_envoy_config::k8s::{ContainerPort, L4Protocol, ServiceType, TargetPort};
use sluice_envoy_config::{parse_file, Kind, Model, Object, ObjectKey};

#[test]
fn pod_reads_identity_placement_addresses_and_named_ports() -> Result<()> {
    let Object::Pod(pod) = one(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web-0, namespace: shop, labels: {app: web}}\n\
         spec:\n  serviceAccountName: web-sa\n  nodeName: node-a\n  containers:\n\
         \x20 - name: app\n    image: x\n    ports: [{name: http, containerPort: 8080}, {containerPort: 53, protocol: UDP}]\n\
         status:\n  podIP: 198.18.0.5\n  podIPs: [{ip: 198.18.0.5}, {ip: 'fd00::5'}]\n",
    )?
    else {
        bail!("not a pod")
    };
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("shop", "web-0")
    );
    assert_eq!(pod.service_account, "web-sa");
    assert_eq!(pod.node_name.as_deref(), Some("node-a"));
    assert_eq!(
        pod.pod_ips,
        vec![
            "198.18.0.5".parse::<std::net::IpAddr>()?,
            "fd00::5".parse()?
        ]
    );
    assert_eq!(
        pod.container_ports,
        vec![
            ContainerPort {
                name: Some("http".into()),
                port: 8080,
                protocol: L4Protocol::Tcp
            },
            ContainerPort {
                name: None,
                port: 53,
                protocol: L4Protocol::Udp
            },
        ]
    );
    Ok(())
}

#[test]
fn service_defaults_target_port_and_treats_none_as_headless() -> Result<()> {
    let Object::Service(service) = one(
        "apiVersion: v1\nkind: Service\nmetadata: {name: api}\nspec:\n  clusterIP: None\n  type: NodePort\n\
         \x20 selector: {app: api}\n  ports:\n  - {name: web, port: 80, targetPort: http}\n  - {port: 443}\n",
    )?
    else {
        bail!("not a service")
    };
    assert_eq!(service.namespace, "default");
    assert_eq!(service.cluster_ip, None);
    assert_eq!(service.service_type, ServiceType::NodePort);
    assert_eq!(
        service.ports[0].target_port,
        TargetPort::Name("http".into())
    );
    assert_eq!(service.ports[1].target_port, TargetPort::Number(443));
    assert_eq!(
        service
            .selector
            .as_ref()
            .and_then(|s| s.get("app"))
            .map(String::as_str),
        Some("api")
    );
    let Object::Service(manual) = one("apiVersion: v1\nkind: Service\nmetadata: {name: ext}\nspec:\n  clusterIP: 198.19.0.10\n  ports: [{port: 80}]\n")?
    else {
        bail!("not a service")
    };
    assert_eq!(manual.selector, None);
    assert_eq!(manual.cluster_ip, Some("198.19.0.10".parse()?));
    Ok(())
}

#[test]
fn endpoint_slice_and_node_and_namespace_parse() -> Result<()> {
    let results = parse_file(
        "cluster.yaml",
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: ext-1\n  labels: {kubernetes.io/service-name: ext}\n\
         addressType: IPv4\nports: [{name: web, port: 8080}]\nendpoints:\n\
         - addresses: [198.18.0.9]\n  targetRef: {kind: Pod, name: web-0}\n\
         - addresses: [198.18.0.10]\n  conditions: {ready: false}\n\
         ---\napiVersion: v1\nkind: Node\nmetadata: {name: node-a, labels: {role: infra}}\n\
         status:\n  addresses: [{type: Hostname, address: node-a}, {type: InternalIP, address: 10.0.0.1}]\n\
         ---\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {team: blue}}\n",
    );
    assert_eq!(results.len(), 3, "empty documents are skipped");
    let model: Model = results
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .collect();
    let slice = model.endpoint_slices().next().expect("slice");
    assert_eq!(slice.service_name.as_deref(), Some("ext"));
    assert_eq!(slice.ports[0].port, Some(8080));
    assert_eq!(slice.endpoints[0].target_pod.as_deref(), Some("web-0"));
    assert!(slice.endpoints[0].ready && !slice.endpoints[1].ready);
    let node = model.nodes().next().expect("node");
    assert_eq!(
        node.addresses,
        vec!["10.0.0.1".parse::<std::net::IpAddr>()?]
    );
    let namespace = model.namespaces().next().expect("namespace");
    assert_eq!(
        namespace.labels.get("team").map(String::as_str),
        Some("blue")
    );
    Ok(())
}

#[test]
fn bad_pod_ip_is_reported_at_its_path() -> Result<()> {
    let error = common::one_error(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 300.1.1.1}\n",
    )?;
    assert_eq!(
        error,
        "test.yaml: document 1 (Pod default/p): status.podIP: `300.1.1.1` is not an IP address"
    );
    Ok(())
}

#[test]
fn model_keys_replace_and_remove_objects() -> Result<()> {
    let mut model = Model::new();
    let first = one("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {v: '1'}}\n")?;
    let second = one("apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {v: '2'}}\n")?;
    let ignored = one("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: cm}\n")?;
    assert_eq!(model.insert(first.clone()), None);
    assert_eq!(model.insert(second), Some(first));
    assert_eq!(model.insert(ignored), None);
    assert_eq!(model.len(), 1);
    let key = ObjectKey::new(Kind::Pod, Some("default"), "a");
    assert_eq!(key.to_string(), "Pod default/a");
    let Some(Object::Pod(pod)) = model.get(&key) else {
        bail!("pod missing")
    };
    assert_eq!(pod.labels.get("v").map(String::as_str), Some("2"));
    assert!(model.remove(&key).is_some());
    assert!(model.is_empty());
    let ccnp = ObjectKey::new(Kind::CiliumClusterwideNetworkPolicy, None, "lockdown");
    assert_eq!(ccnp.to_string(), "CiliumClusterwideNetworkPolicy lockdown");
    Ok(())
}
