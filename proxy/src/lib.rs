//! The node-local L7 proxy: the userspace half of the datapath (`ProxyTables` in, flows out).

pub mod authorize;
mod body;
mod downstream_socket;
mod error;
pub mod flow;
mod forward;
mod handle;
mod http1;
mod lb;
mod listener;
pub mod normalize;
mod outlier;
pub mod request;
pub mod retry;
pub mod route;
mod server;
mod snapshot;
mod stats;
pub mod tables;
mod upstream;
mod workers;

pub use error::{ApplyError, ProxyError};
pub use flow::{FlowEvent, FlowSink};
pub use handle::{Applied, BoundListener, Handle, ProxyConfig};
pub use stats::{ClusterStats, ProxyStats};
pub use tables::ProxyTables;
