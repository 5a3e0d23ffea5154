//! The node-local L7 proxy: the userspace half of the datapath (`ProxyTables` in, flows out).

pub mod flow;
pub mod tables;

pub use flow::{FlowEvent, FlowSink};
pub use tables::ProxyTables;
