//! Splitting a file into documents and dispatching each by kind: sources -> **model**.

// `Result<Object, ConfigError>` is the public per-document shape; both sides are large, the
// values are produced once per document (not on a request path), so boxing buys nothing.
#![allow(clippy::result_large_err)]

use serde::Deserialize;

use crate::envoy::parse_envoy_config;
use crate::error::{ConfigError, FieldError};
use crate::k8s;
use crate::key::{Kind, ObjectKey};
use crate::model::Object;
use crate::policy::parse_network_policy;

/// Parses one file: multi-document YAML (`---`) or one JSON document. Returns one entry per
/// non-empty document, in order.
///
/// A YAML/JSON syntax error yields exactly one error (naming the file, the document and the
/// line) and nothing else: the file cannot be trusted past that point, so the caller should
/// keep everything it had from this file. Documents of kinds sluice does not read come back
/// as [`Object::Ignored`].
pub fn parse_file(file: &str, text: &str) -> Vec<Result<Object, ConfigError>> {
    let documents = match split_documents(text) {
        Ok(documents) => documents,
        Err((document, reason)) => {
            return vec![Err(ConfigError {
                file: file.to_string(),
                document,
                object: None,
                path: String::new(),
                reason,
            })]
        }
    };
    documents
        .into_iter()
        .enumerate()
        .filter(|(_, value)| !value.is_null())
        .map(|(index, value)| parse_document(file, index + 1, value))
        .collect()
}

/// Returns every document (nulls for empty ones), or the 1-based document number and reason
/// of the first syntax error.
fn split_documents(text: &str) -> Result<Vec<serde_json::Value>, (usize, String)> {
    if text.trim_start().starts_with('{') {
        return serde_json::from_str(text)
            .map(|value| vec![value])
            .map_err(|error| (1, format!("invalid JSON: {error}")));
    }
    let mut documents = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        match serde_json::Value::deserialize(document) {
            Ok(value) => documents.push(value),
            Err(error) => return Err((documents.len() + 1, format!("invalid YAML: {error}"))),
        }
    }
    Ok(documents)
}

/// (apiVersion, kind) pairs sluice reads.
const KNOWN: &[(&str, Kind)] = &[
    ("v1", Kind::Namespace),
    ("v1", Kind::Node),
    ("v1", Kind::Pod),
    ("v1", Kind::Service),
    ("discovery.k8s.io/v1", Kind::EndpointSlice),
    ("apps/v1", Kind::Deployment),
    ("cilium.io/v2", Kind::CiliumNetworkPolicy),
    ("cilium.io/v2", Kind::CiliumClusterwideNetworkPolicy),
    ("cilium.io/v2", Kind::CiliumEnvoyConfig),
    ("cilium.io/v2", Kind::CiliumClusterwideEnvoyConfig),
];

fn text_field<'a>(value: &'a serde_json::Value, pointer: &str) -> Result<Option<&'a str>, String> {
    match value.pointer(pointer) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text)),
        Some(_) => Err("must be a string".to_string()),
    }
}

fn parse_document(
    file: &str,
    document: usize,
    value: serde_json::Value,
) -> Result<Object, ConfigError> {
    let error = |object: Option<ObjectKey>, failure: FieldError| ConfigError {
        file: file.to_string(),
        document,
        object,
        path: failure.path,
        reason: failure.reason,
    };
    if !value.is_object() {
        return Err(error(
            None,
            FieldError::new("", "a document must be a mapping with apiVersion and kind"),
        ));
    }
    let read = |pointer: &str, path: &str| {
        text_field(&value, pointer).map_err(|r| error(None, FieldError::new(path, r)))
    };
    let api_version = read("/apiVersion", "apiVersion")?
        .unwrap_or_default()
        .to_string();
    let Some(kind_name) = read("/kind", "kind")?.map(str::to_string) else {
        return Err(error(None, FieldError::new("kind", "is required")));
    };
    let name = read("/metadata/name", "metadata.name")?.map(str::to_string);
    let written_namespace = read("/metadata/namespace", "metadata.namespace")?.map(str::to_string);

    let kind = Kind::from_kind_name(&kind_name);
    let known = KNOWN
        .iter()
        .any(|(version, known_kind)| *known_kind == kind && *version == api_version);
    if !known {
        if !matches!(kind, Kind::Other(_)) && api_version.starts_with("cilium.io/") {
            return Err(error(
                None,
                FieldError::new(
                    "apiVersion",
                    format!("`{api_version}` is not supported for {kind_name} (use cilium.io/v2)"),
                ),
            ));
        }
        let group = api_version.rsplit_once('/').map(|(group, _)| group);
        let kind = match (group, &kind) {
            (Some(group), k) if !matches!(k, Kind::Other(_)) => format!("{kind_name}.{group}"),
            _ => kind_name,
        };
        return Ok(Object::Ignored {
            kind,
            namespace: written_namespace,
            name: name.unwrap_or_default(),
        });
    }
    let Some(name) = name.filter(|n| !n.is_empty()) else {
        return Err(error(None, FieldError::new("metadata.name", "is required")));
    };
    let namespace = kind
        .is_namespaced()
        .then(|| written_namespace.unwrap_or_else(|| "default".to_string()));
    let key = ObjectKey {
        kind: kind.clone(),
        namespace: namespace.clone(),
        name: name.clone(),
    };
    let ns = namespace.as_deref().unwrap_or_default();
    let parsed = match kind {
        Kind::Namespace => k8s::parse_namespace(value, &name).map(Object::Namespace),
        Kind::Node => k8s::parse_node(value, &name).map(Object::Node),
        Kind::Pod => k8s::parse_pod(value, ns, &name).map(Object::Pod),
        Kind::Service => k8s::parse_service(value, ns, &name).map(Object::Service),
        Kind::EndpointSlice => {
            k8s::parse_endpoint_slice(value, ns, &name).map(Object::EndpointSlice)
        }
        Kind::Deployment => k8s::parse_deployment(value, ns, &name).map(Object::Deployment),
        Kind::CiliumNetworkPolicy | Kind::CiliumClusterwideNetworkPolicy => {
            parse_network_policy(value, namespace.as_deref(), &name).map(Object::NetworkPolicy)
        }
        Kind::CiliumEnvoyConfig | Kind::CiliumClusterwideEnvoyConfig => {
            envoy_config(value, namespace.as_deref(), &name).map(Object::EnvoyConfig)
        }
        Kind::Other(other) => Ok(Object::Ignored {
            kind: other,
            namespace: namespace.clone(),
            name: name.clone(),
        }),
    };
    parsed.map_err(|failure| error(Some(key), failure))
}

fn envoy_config(
    value: serde_json::Value,
    namespace: Option<&str>,
    name: &str,
) -> Result<crate::envoy::EnvoyConfig, FieldError> {
    let serde_json::Value::Object(mut fields) = value else {
        return Err(FieldError::new("", "a document must be a mapping"));
    };
    let spec = fields
        .remove("spec")
        .ok_or_else(|| FieldError::new("spec", "is required"))?;
    for (key, _) in fields {
        if !matches!(key.as_str(), "apiVersion" | "kind" | "metadata" | "status") {
            return Err(FieldError::new(
                key.clone(),
                format!("unknown field `{key}`, expected one of `apiVersion`, `kind`, `metadata`, `spec`"),
            ));
        }
    }
    parse_envoy_config(spec, namespace, name)
}
