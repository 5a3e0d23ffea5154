//! sluice-agent: the node agent's parts (sources -> model -> compile -> datapath), used by the
//! `sluice` binary and by the golden and end-to-end tests.

pub mod agent;
pub mod api;
pub mod cli;
pub mod compile;
pub mod demo;
pub mod flows;
pub mod identity;
pub mod kernel;
pub mod kernel_view;
pub mod metrics;
pub mod reconcile;
pub mod render;
pub mod source;
pub mod store;
pub mod view;
pub mod workload;
