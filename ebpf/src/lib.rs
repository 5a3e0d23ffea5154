//! The kernel half of the datapath: `BpfState` in, BPF maps and attached programs out.
//!
//! Flow: the agent compiles its model into a [`BpfState`]; [`Datapath::apply`] turns it into map
//! contents ([`plan`], pure) and writes only the difference; the C programs under `bpf/`
//! enforce it; [`FlowEvents`] brings their verdicts back.

pub mod abi;
mod datapath;
pub mod events;
#[cfg(test)]
mod kernel_tests;
pub mod maglev;
mod mounts;
pub mod plan;
pub mod policy;
pub mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use datapath::{
    BpfDelta, Datapath, DatapathError, KernelEndpoint, KernelPolicyEntry, KernelService, MapChanges,
};
pub use events::{DropReason, FlowEvent, FlowEvents, ObservationPoint, Verdict};
pub use mounts::{ensure_bpffs, ensure_cgroup2};
pub use plan::StateError;
pub use state::{
    BpfState, Direction, Endpoint, IpcacheEntry, L4Protocol, PolicyAction, PolicyEntry, PortRange,
    Protocol, Service,
};
