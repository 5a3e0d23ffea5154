//! The kernel datapath benchmarks of issue #3 (`datapath` binary): Services through sluice's
//! socket LB or iptables (`connect`), pod-to-pod HTTP under three policies through the agent
//! (`http`), measured in pod namespaces and rendered (`table`).

pub mod connect;
pub mod http;
pub mod table;
