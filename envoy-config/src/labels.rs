//! Cilium label keys, label sets and selectors: sources -> **model** (who a rule selects).

use std::collections::BTreeMap;
use std::fmt;

/// Label source that matches labels of every source (`any:foo`, or a bare `foo`).
pub const SOURCE_ANY: &str = "any";
/// Source of labels imported from Kubernetes objects.
pub const SOURCE_K8S: &str = "k8s";
/// Source of Cilium's reserved labels (`reserved:host`, `reserved:world`, ...).
pub const SOURCE_RESERVED: &str = "reserved";

/// The pod-namespace label Cilium attaches to every pod (`k8s:io.kubernetes.pod.namespace`).
pub const POD_NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of namespace labels copied onto pods (`k8s:io.cilium.k8s.namespace.labels.<key>`).
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels";
/// The service-account label Cilium attaches to every pod.
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
/// The cluster-name label Cilium attaches to every pod.
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// A label key with its source: `k8s:app` is (k8s, app), a bare `app` is (any, app).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelKey {
    /// `k8s`, `reserved`, `any`, ... (any text before the first `:`).
    pub source: String,
    /// The key without its source prefix.
    pub key: String,
}

impl LabelKey {
    /// Parses `source:key` the way Cilium does: the text before the first `:` is the source,
    /// no `:` means source `any`, a leading `$` means `reserved`.
    pub fn parse(text: &str) -> LabelKey {
        if let Some(rest) = text.strip_prefix('$') {
            return LabelKey::new(SOURCE_RESERVED, rest);
        }
        match text.split_once(':') {
            Some((source, key)) => LabelKey::new(source, key),
            None => LabelKey::new(SOURCE_ANY, text),
        }
    }

    /// Builds a key from source and key.
    pub fn new(source: &str, key: &str) -> LabelKey {
        LabelKey {
            source: source.to_string(),
            key: key.to_string(),
        }
    }

    /// Whether a label of `source` satisfies this key's source (`any` accepts every source).
    pub fn accepts_source(&self, source: &str) -> bool {
        self.source == SOURCE_ANY || self.source == source
    }
}

impl fmt::Display for LabelKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.source, self.key)
    }
}

/// The labels of one endpoint (pod, node, reserved entity): (source, key) -> value.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LabelSet {
    labels: BTreeMap<(String, String), String>,
}

impl LabelSet {
    /// An empty set.
    pub fn new() -> LabelSet {
        LabelSet::default()
    }

    /// Imports Kubernetes object labels with source `k8s`.
    pub fn from_k8s<'a>(labels: impl IntoIterator<Item = (&'a String, &'a String)>) -> LabelSet {
        let mut set = LabelSet::new();
        for (key, value) in labels {
            set.insert(SOURCE_K8S, key, value);
        }
        set
    }

    /// Adds (or replaces) one label.
    pub fn insert(&mut self, source: &str, key: &str, value: &str) {
        self.labels
            .insert((source.to_string(), key.to_string()), value.to_string());
    }

    /// The value of an exact (source, key).
    pub fn get(&self, source: &str, key: &str) -> Option<&str> {
        self.labels
            .get(&(source.to_string(), key.to_string()))
            .map(String::as_str)
    }

    /// Values of every label that `key` accepts (several when the key's source is `any`).
    pub fn values_for<'a>(&'a self, key: &'a LabelKey) -> impl Iterator<Item = &'a str> + 'a {
        self.labels
            .iter()
            .filter(move |((source, name), _)| name == &key.key && key.accepts_source(source))
            .map(|(_, value)| value.as_str())
    }

    /// All labels as (source, key, value), ordered.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &str)> {
        self.labels
            .iter()
            .map(|((source, key), value)| (source.as_str(), key.as_str(), value.as_str()))
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the set has no labels.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

impl fmt::Display for LabelSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for (source, key, value) in self.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            write!(f, "{source}:{key}={value}")?;
        }
        Ok(())
    }
}

/// One selector requirement, with Kubernetes LabelSelector semantics.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operator {
    /// Some accepted label has one of these values (`matchLabels` entries become `In [v]`).
    In(Vec<String>),
    /// No accepted label has one of these values (an absent key matches).
    NotIn(Vec<String>),
    /// Some accepted label exists.
    Exists,
    /// No accepted label exists.
    DoesNotExist,
}

/// `key` constrained by `operator`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Requirement {
    /// The label key, source included.
    pub key: LabelKey,
    /// The constraint.
    pub operator: Operator,
}

impl Requirement {
    /// Whether `labels` satisfy this requirement.
    pub fn matches(&self, labels: &LabelSet) -> bool {
        let mut values = labels.values_for(&self.key);
        match &self.operator {
            Operator::In(allowed) => values.any(|value| allowed.iter().any(|a| a == value)),
            Operator::NotIn(denied) => !values.any(|value| denied.iter().any(|d| d == value)),
            Operator::Exists => values.next().is_some(),
            Operator::DoesNotExist => values.next().is_none(),
        }
    }
}

/// A label selector: all requirements must hold. An empty selector matches everything.
/// Cilium's namespace injection is already applied when it comes out of a policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    /// ANDed requirements, `matchLabels` first (in key order), then `matchExpressions`.
    pub requirements: Vec<Requirement>,
}

impl Selector {
    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.requirements
            .iter()
            .all(|requirement| requirement.matches(labels))
    }

    /// Whether some requirement is about exactly `source:key`.
    pub fn has_key(&self, source: &str, key: &str) -> bool {
        self.requirements
            .iter()
            .any(|r| r.key.source == source && r.key.key == key)
    }

    /// Whether some requirement's key has `source` and its key starts with `prefix`.
    pub fn has_key_prefix(&self, source: &str, prefix: &str) -> bool {
        self.requirements
            .iter()
            .any(|r| r.key.source == source && r.key.key.starts_with(prefix))
    }

    /// Whether some requirement uses a key of `source`.
    pub fn has_source(&self, source: &str) -> bool {
        self.requirements.iter().any(|r| r.key.source == source)
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let mut first = true;
        for requirement in &self.requirements {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            let key = &requirement.key;
            match &requirement.operator {
                Operator::In(values) if values.len() == 1 => write!(f, "{key}={}", values[0])?,
                Operator::In(values) => write!(f, "{key} in ({})", values.join(","))?,
                Operator::NotIn(values) => write!(f, "{key} notin ({})", values.join(","))?,
                Operator::Exists => write!(f, "{key}")?,
                Operator::DoesNotExist => write!(f, "!{key}")?,
            }
        }
        Ok(())
    }
}
