//! The node-local L7 proxy: the userspace half of the datapath (`ProxyTables` in, flows out).

pub mod authorize;
pub mod flow;
pub mod normalize;
pub mod request;
pub mod retry;
pub mod route;
pub mod tables;

pub use flow::{FlowEvent, FlowSink};
pub use tables::ProxyTables;
