//! Identities (model -> compile): security-relevant label set -> numeric identity, stable on disk.
//!
//! Numbers follow Cilium: reserved identities are fixed, pod label sets get numbers from 256 up.
//! A number, once given to a label set, is kept across reloads and (through
//! `<state-dir>/identities.json`) across restarts, and never handed to another label set: flow
//! logs, metrics and a future kernel datapath all key on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sluice_envoy_config::labels::{
    CLUSTER_LABEL, NAMESPACE_LABELS_PREFIX, POD_NAMESPACE_LABEL, SERVICE_ACCOUNT_LABEL, SOURCE_K8S, SOURCE_RESERVED,
};
use sluice_envoy_config::LabelSet;
use sluice_proxy::tables::Identity;

/// Cilium's reserved identities and their (only) label.
pub const RESERVED: [(Identity, &str); 7] = [
    (1, "host"),
    (2, "world"),
    (3, "unmanaged"),
    (4, "health"),
    (5, "init"),
    (6, "remote-node"),
    (7, "kube-apiserver"),
];

pub const IDENTITY_UNMANAGED: Identity = 3;
pub const IDENTITY_HEALTH: Identity = 4;
pub const IDENTITY_INIT: Identity = 5;
pub const IDENTITY_REMOTE_NODE: Identity = 6;
pub const IDENTITY_KUBE_APISERVER: Identity = 7;

/// First number given to a pod label set.
pub const FIRST_ALLOCATED: Identity = 256;

/// The cluster name sluice reports in `io.cilium.k8s.policy.cluster` (Cilium's default).
pub const CLUSTER_NAME: &str = "default";

/// Labels Cilium leaves out of identities by default: they differ between replicas of one
/// workload, so keeping them would give every replica its own identity.
const NON_IDENTITY_LABELS: [&str; 3] = ["pod-template-hash", "pod-template-generation", "controller-revision-hash"];

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("identity state {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("identity state {path} is not valid: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

/// The reserved identity named `name` (`reserved:<name>`), if any.
pub fn reserved_by_name(name: &str) -> Option<Identity> {
    RESERVED.iter().find(|(_, n)| *n == name).map(|(id, _)| *id)
}

pub fn reserved_labels(id: Identity) -> Option<LabelSet> {
    RESERVED.iter().find(|(i, _)| *i == id).map(|(_, name)| {
        let mut set = LabelSet::new();
        set.insert(SOURCE_RESERVED, name, "");
        set
    })
}

/// The security-relevant labels of a pod (cilium.md §1.3).
pub fn pod_security_labels(
    pod_labels: &BTreeMap<String, String>,
    namespace: &str,
    service_account: &str,
    namespace_labels: &BTreeMap<String, String>,
) -> LabelSet {
    let mut set = LabelSet::new();
    for (key, value) in pod_labels.iter().filter(|(k, _)| !NON_IDENTITY_LABELS.contains(&k.as_str())) {
        set.insert(SOURCE_K8S, key, value);
    }
    set.insert(SOURCE_K8S, POD_NAMESPACE_LABEL, namespace);
    set.insert(SOURCE_K8S, SERVICE_ACCOUNT_LABEL, service_account);
    set.insert(SOURCE_K8S, CLUSTER_LABEL, CLUSTER_NAME);
    for (key, value) in namespace_labels {
        set.insert(SOURCE_K8S, &format!("{NAMESPACE_LABELS_PREFIX}.{key}"), value);
    }
    set
}

/// `source:key=value` strings, sorted: how labels are shown and persisted.
pub fn label_strings(labels: &LabelSet) -> Vec<String> {
    labels.iter().map(|(source, key, value)| format!("{source}:{key}={value}")).collect()
}

fn parse_label_strings(items: &[String]) -> LabelSet {
    let mut set = LabelSet::new();
    for item in items {
        let (source, rest) = item.split_once(':').unwrap_or(("any", item));
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        set.insert(source, key, value);
    }
    set
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    identities: Vec<StateEntry>,
}

#[derive(Debug, Serialize, Deserialize)]
struct StateEntry {
    id: Identity,
    labels: Vec<String>,
}

/// The allocation table. Reserved identities are implicit and never stored.
#[derive(Debug, Clone, Default)]
pub struct Identities {
    by_labels: BTreeMap<LabelSet, Identity>,
    by_id: BTreeMap<Identity, LabelSet>,
    path: Option<PathBuf>,
}

impl Identities {
    /// An allocation table that lives in memory only (tests, `compile` callers).
    pub fn in_memory() -> Self {
        Self::default()
    }

    /// Loads `path` if it exists; allocations are written back there by `save`.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let mut identities = Self { path: Some(path.to_path_buf()), ..Self::default() };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(identities),
            Err(source) => return Err(IdentityError::Io { path: path.to_path_buf(), source }),
        };
        let state: StateFile =
            serde_json::from_str(&text).map_err(|source| IdentityError::Corrupt { path: path.to_path_buf(), source })?;
        for entry in state.identities {
            if entry.id >= FIRST_ALLOCATED && !identities.by_id.contains_key(&entry.id) {
                identities.insert(entry.id, parse_label_strings(&entry.labels));
            }
        }
        Ok(identities)
    }

    fn insert(&mut self, id: Identity, labels: LabelSet) {
        self.by_labels.insert(labels.clone(), id);
        self.by_id.insert(id, labels);
    }

    /// The identity of `labels`, allocating the next free number for a new label set.
    /// Returns whether a new number was allocated (the table then needs saving).
    pub fn allocate(&mut self, labels: &LabelSet) -> (Identity, bool) {
        if let Some(id) = self.get(labels) {
            return (id, false);
        }
        let id = self.by_id.keys().next_back().map_or(FIRST_ALLOCATED, |last| last + 1);
        self.insert(id, labels.clone());
        (id, true)
    }

    pub fn get(&self, labels: &LabelSet) -> Option<Identity> {
        self.by_labels.get(labels).copied()
    }

    /// Labels of an allocated or reserved identity.
    pub fn labels(&self, id: Identity) -> Option<LabelSet> {
        reserved_labels(id).or_else(|| self.by_id.get(&id).cloned())
    }

    /// Writes the table to its file (atomically: a crash leaves the old or the new table).
    pub fn save(&self) -> Result<(), IdentityError> {
        let Some(path) = &self.path else { return Ok(()) };
        let state = StateFile {
            identities: self.by_id.iter().map(|(id, labels)| StateEntry { id: *id, labels: label_strings(labels) }).collect(),
        };
        let io_error = |source| IdentityError::Io { path: path.clone(), source };
        let text = serde_json::to_string_pretty(&state)
            .map_err(|source| IdentityError::Corrupt { path: path.clone(), source })?;
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(io_error)?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(io_error)?;
        std::fs::rename(&tmp, path).map_err(io_error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(items: &[&str]) -> LabelSet {
        parse_label_strings(&items.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn pod_labels_include_cilium_synthetic_labels() {
        let pod = BTreeMap::from([
            ("org".to_string(), "empire".to_string()),
            ("pod-template-hash".to_string(), "abc".to_string()),
        ]);
        let ns = BTreeMap::from([("team".to_string(), "red".to_string())]);
        assert_eq!(
            label_strings(&pod_security_labels(&pod, "default", "default", &ns)),
            vec![
                "k8s:io.cilium.k8s.namespace.labels.team=red",
                "k8s:io.cilium.k8s.policy.cluster=default",
                "k8s:io.cilium.k8s.policy.serviceaccount=default",
                "k8s:io.kubernetes.pod.namespace=default",
                "k8s:org=empire",
            ]
        );
    }

    #[test]
    fn allocation_is_stable_and_starts_at_256() {
        let mut ids = Identities::in_memory();
        let a = labels(&["k8s:app=a"]);
        let b = labels(&["k8s:app=b"]);
        assert_eq!(ids.allocate(&a), (256, true));
        assert_eq!(ids.allocate(&b), (257, true));
        assert_eq!(ids.allocate(&a), (256, false));
        assert_eq!(ids.labels(257), Some(b));
        assert_eq!(ids.labels(2).map(|l| label_strings(&l)), Some(vec!["reserved:world=".to_string()]));
    }

    #[test]
    fn restart_gives_the_same_numbers() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("state/identities.json");
        let a = labels(&["k8s:app=a"]);
        let b = labels(&["k8s:app=b"]);
        let c = labels(&["k8s:app=c"]);
        let mut ids = Identities::load(&path)?;
        ids.allocate(&a);
        ids.allocate(&b);
        ids.save()?;
        let mut reloaded = Identities::load(&path)?;
        // Asked in the other order, the numbers are still the persisted ones.
        assert_eq!(reloaded.allocate(&b), (257, false));
        assert_eq!(reloaded.allocate(&a), (256, false));
        assert_eq!(reloaded.allocate(&c), (258, true));
        Ok(())
    }

    #[test]
    fn corrupt_state_is_an_error() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("identities.json");
        std::fs::write(&path, "{not json")?;
        assert!(matches!(Identities::load(&path), Err(IdentityError::Corrupt { .. })));
        Ok(())
    }
}
