//! Keeps the datapath benchmarks from rotting: the smallest connect() case (1 Service, 1
//! repetition, 1 s) through sluice's socket LB and iptables, and the three-policy HTTP flow
//! through `sluice agent --datapath ebpf`, in namespaces the tool creates. No timing is asserted:
//! every case must produce its row with connections made and zero errors. Needs root, BPF,
//! iptables, nginx and wrk; without them it prints a loud SKIPPED line, and with `CI=true` fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use sluice_ebpf::testing::privileged;

/// The `sluice` binary next to `datapath` in this build, built on demand.
fn sluice_binary() -> Result<PathBuf> {
    let datapath = Path::new(env!("CARGO_BIN_EXE_datapath"));
    let profile_dir = datapath.parent().context("datapath has no parent dir")?;
    let sluice = profile_dir.join("sluice");
    if !sluice.is_file() {
        let target_dir = profile_dir.parent().context("no target dir")?;
        let status = Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(["build", "-p", "sluice-agent", "--bin", "sluice", "--target-dir"])
            .arg(target_dir)
            .status()?;
        ensure!(status.success(), "building sluice failed");
    }
    Ok(sluice)
}

/// The cells of the table row that starts with `| first |`.
fn row<'a>(table: &'a str, first: &str) -> Result<Vec<&'a str>> {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {first} |")))
        .with_context(|| format!("no row {first:?} in:\n{table}"))?;
    Ok(line.trim_matches('|').split('|').map(str::trim).collect())
}

fn positive(cell: &str) -> bool {
    cell.split_whitespace()
        .next()
        .and_then(|n| n.parse::<f64>().ok())
        .is_some_and(|n| n > 0.0)
}

#[test]
fn datapath_bench_produces_connect_and_http_rows() -> Result<()> {
    if !privileged("datapath_bench_produces_connect_and_http_rows") {
        return Ok(());
    }
    for tool in ["iptables-restore", "nginx", "wrk"] {
        ensure!(
            sluice_benches::setup::find_program(tool).is_some(),
            "the smoke test needs {tool}: apt-get install -y iptables nginx wrk"
        );
    }
    let scratch = tempfile::tempdir()?;
    let out = scratch.path().join("datapath.md");
    let output = Command::new(env!("CARGO_BIN_EXE_datapath"))
        .args(["--services", "1", "--reps", "1", "--duration", "1", "--no-install", "--sluice"])
        .arg(sluice_binary()?)
        .arg("--out")
        .arg(&out)
        .output()?;
    ensure!(
        output.status.success(),
        "datapath failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let table = std::fs::read_to_string(&out)?;
    // | Services | sluice | iptables | ratio | vs first | vs first | errors (sluice / iptables) | install |
    let connect = row(&table, "1")?;
    ensure!(positive(connect[1]) && positive(connect[2]), "no connects: {connect:?}");
    assert_eq!(connect[6], "0 / 0", "failed connects: {connect:?}");
    for policy in ["no policy", "L3/L4 policy", "L7 policy (proxy)"] {
        // | policy | req/s | p50 | p99 | vs no policy | proxied per request | errors | runs |
        let http = row(&table, policy)?;
        ensure!(positive(http[1]), "{policy}: no requests: {http:?}");
        assert_eq!(http[6], "0", "{policy}: failed requests: {http:?}");
        // Only the L7 run goes through the proxy.
        assert_eq!(positive(http[5]), policy.starts_with("L7"), "{policy}: {http:?}");
    }
    ensure!(table.contains("Adding the L7 policy to the L3/L4 one loses"), "{table}");
    Ok(())
}
