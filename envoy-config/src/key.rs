//! Object identity in the model: sources -> **model** (which object a document defines).

use std::fmt;

/// The kinds sluice reads. Anything else is carried as [`Kind::Other`] so skipped documents
/// still have a printable identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1 Namespace` (cluster-scoped).
    Namespace,
    /// `v1 Node` (cluster-scoped).
    Node,
    /// `v1 Pod`.
    Pod,
    /// `v1 Service`.
    Service,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice,
    /// `apps/v1 Deployment`.
    Deployment,
    /// `cilium.io/v2 CiliumNetworkPolicy`.
    CiliumNetworkPolicy,
    /// `cilium.io/v2 CiliumClusterwideNetworkPolicy` (cluster-scoped).
    CiliumClusterwideNetworkPolicy,
    /// `cilium.io/v2 CiliumEnvoyConfig`.
    CiliumEnvoyConfig,
    /// `cilium.io/v2 CiliumClusterwideEnvoyConfig` (cluster-scoped).
    CiliumClusterwideEnvoyConfig,
    /// A kind sluice does not read (ConfigMap, Secret, ...), spelled as in the document.
    Other(String),
}

impl Kind {
    /// Maps the `kind` field of a document to a [`Kind`].
    pub fn from_kind_name(name: &str) -> Kind {
        match name {
            "Namespace" => Kind::Namespace,
            "Node" => Kind::Node,
            "Pod" => Kind::Pod,
            "Service" => Kind::Service,
            "EndpointSlice" => Kind::EndpointSlice,
            "Deployment" => Kind::Deployment,
            "CiliumNetworkPolicy" => Kind::CiliumNetworkPolicy,
            "CiliumClusterwideNetworkPolicy" => Kind::CiliumClusterwideNetworkPolicy,
            "CiliumEnvoyConfig" => Kind::CiliumEnvoyConfig,
            "CiliumClusterwideEnvoyConfig" => Kind::CiliumClusterwideEnvoyConfig,
            other => Kind::Other(other.to_string()),
        }
    }

    /// The kind as written in manifests.
    pub fn as_str(&self) -> &str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Node => "Node",
            Kind::Pod => "Pod",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Deployment => "Deployment",
            Kind::CiliumNetworkPolicy => "CiliumNetworkPolicy",
            Kind::CiliumClusterwideNetworkPolicy => "CiliumClusterwideNetworkPolicy",
            Kind::CiliumEnvoyConfig => "CiliumEnvoyConfig",
            Kind::CiliumClusterwideEnvoyConfig => "CiliumClusterwideEnvoyConfig",
            Kind::Other(name) => name,
        }
    }

    /// Whether objects of this kind live in a namespace (`metadata.namespace`, default
    /// `default`). Unknown kinds are treated as namespaced when they carry a namespace.
    pub fn is_namespaced(&self) -> bool {
        !matches!(
            self,
            Kind::Namespace
                | Kind::Node
                | Kind::CiliumClusterwideNetworkPolicy
                | Kind::CiliumClusterwideEnvoyConfig
        )
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Identity of one object: kind, namespace (None for cluster-scoped kinds) and name.
/// Displays as `CiliumNetworkPolicy default/rule1` or `Node node-a`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// The object's kind.
    pub kind: Kind,
    /// `metadata.namespace` (defaulted to `default`) for namespaced kinds, None otherwise.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectKey {
    /// Builds a key from its parts.
    pub fn new(kind: Kind, namespace: Option<&str>, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
        }
    }
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(namespace) => write!(f, "{} {}/{}", self.kind, namespace, self.name),
            None => write!(f, "{} {}", self.kind, self.name),
        }
    }
}
