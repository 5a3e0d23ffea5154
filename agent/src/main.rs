//! `sluice`: the node agent and its CLI (sources -> model -> compile -> datapath).

mod view;

fn main() {
    let _ = view::Snapshot::default();
}
