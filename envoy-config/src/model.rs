//! The set of current objects: sources -> **model** (what the compiler reads).

use std::collections::BTreeMap;

use crate::envoy::EnvoyConfig;
use crate::k8s::{Deployment, EndpointSlice, Namespace, Node, Pod, Service};
use crate::key::{Kind, ObjectKey};
use crate::policy::NetworkPolicy;

/// One parsed document.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    /// A `v1 Namespace`.
    Namespace(Namespace),
    /// A `v1 Node`.
    Node(Node),
    /// A `v1 Pod`.
    Pod(Pod),
    /// A `v1 Service`.
    Service(Service),
    /// A `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice(EndpointSlice),
    /// An `apps/v1 Deployment`.
    Deployment(Deployment),
    /// A CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy.
    NetworkPolicy(NetworkPolicy),
    /// A CiliumEnvoyConfig or CiliumClusterwideEnvoyConfig.
    EnvoyConfig(EnvoyConfig),
    /// A document of a kind sluice does not read (ConfigMap, Secret, ...): reported as
    /// skipped, never an error.
    Ignored {
        /// `kind` as written (with its apiVersion group when that group is not one sluice
        /// reads, e.g. `Service.serving.knative.dev`).
        kind: String,
        /// `metadata.namespace`, if written.
        namespace: Option<String>,
        /// `metadata.name` (empty if absent).
        name: String,
    },
}

impl Object {
    /// The object's identity.
    pub fn key(&self) -> ObjectKey {
        match self {
            Object::Namespace(o) => ObjectKey::new(Kind::Namespace, None, &o.name),
            Object::Node(o) => ObjectKey::new(Kind::Node, None, &o.name),
            Object::Pod(o) => ObjectKey::new(Kind::Pod, Some(&o.namespace), &o.name),
            Object::Service(o) => ObjectKey::new(Kind::Service, Some(&o.namespace), &o.name),
            Object::EndpointSlice(o) => {
                ObjectKey::new(Kind::EndpointSlice, Some(&o.namespace), &o.name)
            }
            Object::Deployment(o) => ObjectKey::new(Kind::Deployment, Some(&o.namespace), &o.name),
            Object::NetworkPolicy(o) => match &o.namespace {
                Some(namespace) => {
                    ObjectKey::new(Kind::CiliumNetworkPolicy, Some(namespace), &o.name)
                }
                None => ObjectKey::new(Kind::CiliumClusterwideNetworkPolicy, None, &o.name),
            },
            Object::EnvoyConfig(o) => match &o.namespace {
                Some(namespace) => {
                    ObjectKey::new(Kind::CiliumEnvoyConfig, Some(namespace), &o.name)
                }
                None => ObjectKey::new(Kind::CiliumClusterwideEnvoyConfig, None, &o.name),
            },
            Object::Ignored {
                kind,
                namespace,
                name,
            } => ObjectKey::new(Kind::Other(kind.clone()), namespace.as_deref(), name),
        }
    }
}

/// The current objects, keyed and ordered by [`ObjectKey`]. Ignored documents are not stored.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Model {
    objects: BTreeMap<ObjectKey, Object>,
}

impl Model {
    /// An empty model.
    pub fn new() -> Model {
        Model::default()
    }

    /// Inserts or replaces an object; returns the previous one with the same key.
    /// [`Object::Ignored`] is not stored (returns None).
    pub fn insert(&mut self, object: Object) -> Option<Object> {
        if matches!(object, Object::Ignored { .. }) {
            return None;
        }
        self.objects.insert(object.key(), object)
    }

    /// Removes an object by key.
    pub fn remove(&mut self, key: &ObjectKey) -> Option<Object> {
        self.objects.remove(key)
    }

    /// Looks an object up by key.
    pub fn get(&self, key: &ObjectKey) -> Option<&Object> {
        self.objects.get(key)
    }

    /// Number of stored objects.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether the model is empty.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Every object in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&ObjectKey, &Object)> {
        self.objects.iter()
    }

    fn of_kind<'a, T: 'a>(
        &'a self,
        pick: fn(&'a Object) -> Option<&'a T>,
    ) -> impl Iterator<Item = &'a T> + 'a {
        self.objects.values().filter_map(pick)
    }

    /// Namespaces.
    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.of_kind(|o| {
            if let Object::Namespace(v) = o {
                Some(v)
            } else {
                None
            }
        })
    }

    /// Nodes.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.of_kind(|o| {
            if let Object::Node(v) = o {
                Some(v)
            } else {
                None
            }
        })
    }

    /// Pods.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.of_kind(|o| {
            if let Object::Pod(v) = o {
                Some(v)
            } else {
                None
            }
        })
    }

    /// Services.
    pub fn services(&self) -> impl Iterator<Item = &Service> {
        self.of_kind(|o| {
            if let Object::Service(v) = o {
                Some(v)
            } else {
                None
            }
        })
    }

    /// EndpointSlices.
    pub fn endpoint_slices(&self) -> impl Iterator<Item = &EndpointSlice> {
        self.of_kind(|o| {
            if let Object::EndpointSlice(v) = o {
                Some(v)
            } else {
                None
            }
        })
    }

    /// Deployments.
    pub fn deployments(&self) -> impl Iterator<Item = &Deployment> {
        self.of_kind(|o| {
            if let Object::Deployment(v) = o {
                Some(v)
            } else {
                None
            }
        })
    }

    /// CNPs and CCNPs.
    pub fn network_policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        self.of_kind(|o| {
            if let Object::NetworkPolicy(v) = o {
                Some(v)
            } else {
                None
            }
        })
    }

    /// CECs and CCECs.
    pub fn envoy_configs(&self) -> impl Iterator<Item = &EnvoyConfig> {
        self.of_kind(|o| {
            if let Object::EnvoyConfig(v) = o {
                Some(v)
            } else {
                None
            }
        })
    }
}

impl FromIterator<Object> for Model {
    fn from_iter<I: IntoIterator<Item = Object>>(objects: I) -> Model {
        let mut model = Model::new();
        for object in objects {
            model.insert(object);
        }
        model
    }
}
