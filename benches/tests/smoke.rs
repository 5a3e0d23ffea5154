//! Keeps the load harness from rotting: a one-second run of `loadtest` against the backend
//! directly and through sluice (no Envoy in CI), which must produce its table rows. No timing
//! is asserted. Needs nginx and wrk (`apt-get install nginx wrk`; `.ci/run` installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

/// The `sluice` binary of this workspace's build (`cargo test --workspace` builds it next to
/// `loadtest`); built on demand when only this package's tests run.
fn sluice_binary() -> Result<PathBuf> {
    let loadtest = Path::new(env!("CARGO_BIN_EXE_loadtest"));
    let profile_dir = loadtest.parent().context("loadtest has no parent dir")?;
    let sluice = profile_dir.join("sluice");
    if !sluice.is_file() {
        let target_dir = profile_dir.parent().context("no target dir")?;
        let status = Command::new(env!("CARGO"))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "-p",
                "sluice-agent",
                "--bin",
                "sluice",
                "--target-dir",
            ])
            .arg(target_dir)
            .status()?;
        ensure!(status.success(), "building sluice failed");
    }
    Ok(sluice)
}

#[test]
fn loadtest_produces_direct_and_sluice_rows() -> Result<()> {
    for tool in ["nginx", "wrk"] {
        if sluice_benches::setup::find_program(tool).is_none() {
            bail!("the smoke test needs {tool}: apt-get install -y nginx wrk");
        }
    }
    let scratch = tempfile::tempdir()?;
    let out = scratch.path().join("results.md");
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "--targets",
            "direct,sluice",
            "--workloads",
            "h1-small",
            "--rules",
            "2",
            "--reps",
            "1",
            "--duration",
            "1",
        ])
        .args(["--idle-connections", "50", "--no-install", "--sluice"])
        .arg(sluice_binary()?)
        .arg("--out")
        .arg(&out)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(
        output.status.success(),
        "loadtest failed: {}\n{stderr}",
        output.status
    );
    let table = std::fs::read_to_string(&out)?;
    for row in [
        "| h1-small | direct | — |",
        "| h1-small | sluice | 2 |",
        "| sluice | 2 |",
    ] {
        ensure!(
            table.contains(row),
            "no row starting {row:?} in:\n{table}\n{stderr}"
        );
    }
    // Every request through sluice was answered 2xx: the error column of its row is 0.
    let sluice_row = table
        .lines()
        .find(|l| l.starts_with("| h1-small | sluice |"))
        .unwrap_or_default();
    let cells: Vec<&str> = sluice_row.split('|').map(str::trim).collect();
    ensure!(
        cells.get(10) == Some(&"0"),
        "sluice row reports errors: {sluice_row}"
    );
    Ok(())
}
