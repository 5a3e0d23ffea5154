//! Every Cilium example manifest parses into the model (templates rendered first).

mod common;

use anyhow::Result;
use common::{corpus, example, render_template};
use sluice_envoy_config::{parse_file, Kind, Model, Object};

#[test]
fn every_example_manifest_parses_without_errors() -> Result<()> {
    let files = corpus()?;
    assert!(files.len() >= 33, "corpus has {} files", files.len());
    let mut failures = Vec::new();
    let mut objects = 0;
    for (name, text) in &files {
        let results = parse_file(name, text);
        assert!(!results.is_empty(), "{name} produced no documents");
        for result in results {
            match result {
                Ok(_) => objects += 1,
                Err(error) => failures.push(error.to_string()),
            }
        }
    }
    assert!(failures.is_empty(), "errors:\n{}", failures.join("\n"));
    assert!(objects >= 50, "only {objects} objects");
    Ok(())
}

#[test]
fn every_cilium_document_is_read_not_skipped() -> Result<()> {
    for (name, text) in corpus()? {
        for object in parse_file(&name, &text).into_iter().flatten() {
            if let Object::Ignored { kind, .. } = &object {
                assert!(!kind.starts_with("Cilium"), "{name}: {kind} was skipped");
            }
        }
    }
    Ok(())
}

#[test]
fn star_wars_app_yields_service_deployment_and_two_pods() -> Result<()> {
    let objects = example("http-sw-app.yaml")?;
    let kinds: Vec<Kind> = objects.iter().map(|o| o.key().kind).collect();
    assert_eq!(
        kinds,
        vec![Kind::Service, Kind::Deployment, Kind::Pod, Kind::Pod]
    );
    let model: Model = objects.into_iter().collect();
    let deathstar = model.deployments().next().expect("deployment");
    assert_eq!(deathstar.replicas, 2);
    assert_eq!(
        deathstar.pod_labels.get("class").map(String::as_str),
        Some("deathstar")
    );
    let service = model.services().next().expect("service");
    assert_eq!(service.ports[0].port, 80);
    assert_eq!(
        service.ports[0].target_port,
        sluice_envoy_config::k8s::TargetPort::Number(80)
    );
    let names: Vec<&str> = model.pods().map(|p| p.name.as_str()).collect();
    assert_eq!(names, vec!["tiefighter", "xwing"]);
    assert!(model
        .pods()
        .all(|p| p.namespace == "default" && p.service_account == "default"));
    Ok(())
}

#[test]
fn configmaps_are_skipped_as_ignored() -> Result<()> {
    let objects = example("test-application.yaml")?;
    let ignored: Vec<String> = objects
        .iter()
        .filter_map(|o| match o {
            Object::Ignored { kind, name, .. } => Some(format!("{kind} {name}")),
            _ => None,
        })
        .collect();
    assert_eq!(ignored, vec!["ConfigMap coredns-configmap".to_string()]);
    Ok(())
}

#[test]
fn templates_render_every_placeholder() -> Result<()> {
    assert_eq!(
        render_template("a {{.ExternalTarget}} b {{ .TestNamespace }}")?,
        "a one.one.one.one. b cilium-test-1"
    );
    assert_eq!(
        render_template("x-{{trimSuffix .ExternalTarget \".\"}}")?,
        "x-one.one.one.one"
    );
    assert!(render_template("{{.Unknown}}").is_err());
    Ok(())
}
