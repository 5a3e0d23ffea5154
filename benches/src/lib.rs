//! The side-by-side load harness: one CiliumEnvoyConfig, driven directly against the backend,
//! through sluice and through a stock Envoy, measured the same way (see benches/README.md).
//!
//! Flow: `setup` installs the tools -> `scenario` writes the config both proxies read ->
//! `bootstrap` translates it for Envoy -> `backend` and `procs` start pinned processes ->
//! `measure` and `idle` load them (`callgrind` counts instructions meanwhile, when asked) ->
//! `report` renders the markdown table.

pub mod backend;
pub mod bootstrap;
pub mod callgrind;
pub mod datapath;
pub mod idle;
pub mod machine;
pub mod measure;
pub mod procs;
pub mod report;
pub mod scenario;
pub mod setup;
pub mod wakeup;
