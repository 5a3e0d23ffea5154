//! Typed, validated model of the Kubernetes, Cilium and Envoy objects sluice reads: sources -> **model**.
