//! Helpers shared by the integration tests: the Cilium example corpus and single-document parsing.

#![allow(dead_code)]

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use sluice_envoy_config::{parse_file, ConfigError, Object};

pub const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../conformance/cilium-examples");

/// Values substituted for the Go-template placeholders of the cilium-cli manifests.
pub const TEMPLATE_VALUES: &[(&str, &str)] = &[
    ("ExternalTarget", "one.one.one.one."),
    ("ExternalOtherTarget", "k8s.io."),
    ("ExternalTargetCANamespace", "kube-system"),
    ("ExternalTargetCAName", "cabundle"),
    ("TestNamespace", "cilium-test-1"),
    ("ClusterName", "kind-kind"),
    ("ClusterNameLocal", "kind-kind"),
    ("ClusterNameRemote", "kind-remote"),
    ("ClusterNameDst", "kind-remote"),
];

/// Renders `{{.X}}`, `{{ .X }}` and `{{trimSuffix .X "."}}` with [`TEMPLATE_VALUES`].
pub fn render_template(text: &str) -> Result<String> {
    let mut out = String::new();
    let mut rest = text;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let end = rest[start..].find("}}").context("unclosed {{")? + start;
        let action = rest[start + 2..end].trim();
        let (trim_dot, field) = match action.strip_prefix("trimSuffix ") {
            Some(args) => {
                let field = args
                    .split_whitespace()
                    .next()
                    .context("trimSuffix without field")?;
                (true, field)
            }
            None => (false, action),
        };
        let field = field
            .strip_prefix('.')
            .context("placeholder without a field")?;
        let Some((_, value)) = TEMPLATE_VALUES.iter().find(|(name, _)| *name == field) else {
            bail!("no value for template field {field}");
        };
        out.push_str(if trim_dot {
            value.trim_end_matches('.')
        } else {
            value
        });
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every example manifest as (file name, rendered text).
pub fn corpus() -> Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(EXAMPLES)? {
        let path: PathBuf = entry?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let name = path
            .file_name()
            .context("file name")?
            .to_string_lossy()
            .to_string();
        let text = std::fs::read_to_string(&path)?;
        files.push((name, render_template(&text)?));
    }
    files.sort();
    Ok(files)
}

/// Parses one example file; fails on any error.
pub fn example(name: &str) -> Result<Vec<Object>> {
    let text = std::fs::read_to_string(format!("{EXAMPLES}/{name}"))?;
    parse_file(name, &render_template(&text)?)
        .into_iter()
        .map(|r| r.map_err(anyhow::Error::from))
        .collect()
}

/// Parses text expected to hold exactly one good document.
pub fn one(text: &str) -> Result<Object> {
    let mut results = parse_file("test.yaml", text);
    if results.len() != 1 {
        bail!("expected one document, got {}", results.len());
    }
    Ok(results.remove(0)?)
}

/// Parses text expected to hold exactly one bad document; returns its rendered error.
pub fn one_error(text: &str) -> Result<String> {
    let mut results = parse_file("test.yaml", text);
    if results.len() != 1 {
        bail!("expected one document, got {}", results.len());
    }
    match results.remove(0) {
        Ok(object) => bail!("expected an error, parsed {}", object.key()),
        Err(error) => Ok(error.to_string()),
    }
}

/// The error itself (for field-level assertions).
pub fn one_config_error(text: &str) -> Result<ConfigError> {
    match parse_file("test.yaml", text).pop() {
        Some(Err(error)) => Ok(error),
        Some(Ok(object)) => bail!("expected an error, parsed {}", object.key()),
        None => bail!("no document"),
    }
}
