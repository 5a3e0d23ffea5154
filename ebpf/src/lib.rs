//! The kernel half of the datapath: `BpfState` in, BPF maps and attached programs out.

pub mod abi;
