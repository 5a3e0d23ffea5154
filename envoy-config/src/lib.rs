//! Typed, validated model of the Kubernetes, Cilium and Envoy objects sluice reads: sources -> **model**.
//!
//! The caller passes a file name and its text to [`parse_file`] and gets one
//! `Result<Object, ConfigError>` per document. No I/O happens here.
//!
//! What the model guarantees:
//! - Cilium policy selectors carry Cilium's namespace injection (CNP subjects and peers are
//!   pinned to the policy namespace; CCNP peers require a pod-namespace label), label keys
//!   are split into (source, key) with bare keys meaning source `any`.
//! - HTTP rule fields are compiled as anchored (`^(?:…)$`) regexes.
//! - CiliumEnvoyConfig resources are decoded by `@type` into the Envoy subset sluice
//!   implements, lowerCamelCase keys are accepted as their snake_case form, Envoy's defaults
//!   are filled in, and names are qualified as Cilium does ([`envoy::qualify`]): forced
//!   for Listener, RouteConfiguration and VirtualHost names and RDS references; without
//!   force (names containing `/` pass through) for Cluster, ClusterLoadAssignment and
//!   Secret names and every cluster reference in routes. Any field
//!   outside that subset is an error naming its path; nothing is silently dropped.

mod document;
pub mod envoy;
mod error;
pub mod k8s;
mod key;
pub mod labels;
mod model;
pub mod policy;

pub use document::parse_file;
pub use envoy::EnvoyConfig;
pub use error::ConfigError;
pub use k8s::{Deployment, EndpointSlice, Namespace, Node, Pod, Service};
pub use key::{Kind, ObjectKey};
pub use labels::{LabelKey, LabelSet, Selector};
pub use model::{Model, Object};
pub use policy::NetworkPolicy;
