//! The kernel datapath benchmarks of issue #3 (`datapath` binary): Services through sluice's
//! socket LB or iptables (`connect`), measured in pod namespaces and rendered (`table`).

pub mod connect;
pub mod table;
