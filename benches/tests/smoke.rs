//! Keeps the load harness from rotting: a one-second run of `loadtest` against the backend
//! directly, through sluice and through the pingora baseline (no Envoy in CI), which must
//! produce their table rows, and one of sluice under callgrind, which must count its
//! instructions. No timing is asserted. Needs nginx, wrk, cmake (for pingora's zlib-ng) and
//! valgrind; `.ci/run` installs them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

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

/// The `pingora` target's binary, a debug build of benches/pingora-baseline into the same
/// target dir (its own workspace, so `cargo test --workspace` does not build it).
fn pingora_baseline_binary() -> Result<PathBuf> {
    let loadtest = Path::new(env!("CARGO_BIN_EXE_loadtest"));
    let target_dir = loadtest.parent().and_then(Path::parent).context("no target dir")?;
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .current_dir(workspace.join(sluice_benches::setup::PINGORA_BASELINE))
        .args(["build", "--locked", "--target-dir"])
        .arg(target_dir)
        .status()?;
    ensure!(status.success(), "building the pingora baseline failed");
    Ok(target_dir.join("debug/sluice-pingora-baseline"))
}

/// Both runs use the harness's fixed addresses: one at a time.
static HARNESS: Mutex<()> = Mutex::new(());

#[test]
fn loadtest_produces_direct_sluice_and_pingora_rows() -> Result<()> {
    let _one_at_a_time = HARNESS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for tool in ["nginx", "wrk", "cmake"] {
        if sluice_benches::setup::find_program(tool).is_none() {
            bail!("the smoke test needs {tool}: apt-get install -y nginx wrk cmake");
        }
    }
    let scratch = tempfile::tempdir()?;
    let out = scratch.path().join("results.md");
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args([
            "--targets",
            "direct,sluice,pingora",
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
        .arg("--pingora")
        .arg(pingora_baseline_binary()?)
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
        "| h1-small | pingora | 2 |",
        "| sluice | 2 |",
        "| pingora | 2 |",
    ] {
        ensure!(
            table.contains(row),
            "no row starting {row:?} in:\n{table}\n{stderr}"
        );
    }
    // Every request through either proxy was answered 2xx: the error column of its row is 0.
    for target in ["sluice", "pingora"] {
        let row = table
            .lines()
            .find(|l| l.starts_with(&format!("| h1-small | {target} |")))
            .unwrap_or_default();
        let cells: Vec<&str> = row.split('|').map(str::trim).collect();
        ensure!(cells.get(10) == Some(&"0"), "{target} row reports errors: {row}");
    }
    Ok(())
}

#[test]
fn loadtest_counts_sluices_instructions_per_request_under_callgrind() -> Result<()> {
    let _one_at_a_time = HARNESS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    for tool in ["nginx", "wrk", "valgrind", "callgrind_control"] {
        if sluice_benches::setup::find_program(tool).is_none() {
            bail!("the smoke test needs {tool}: apt-get install -y nginx wrk valgrind");
        }
    }
    let scratch = tempfile::tempdir()?;
    let out = scratch.path().join("results.md");
    let output = Command::new(env!("CARGO_BIN_EXE_loadtest"))
        .args(["--targets", "sluice", "--workloads", "h1-small", "--rules", "2", "--reps", "1", "--duration", "1"])
        .args(["--idle-connections", "0", "--no-install", "--callgrind", "--sluice"])
        .arg(sluice_binary()?)
        .arg("--out")
        .arg(&out)
        .output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "loadtest --callgrind failed: {}\n{stderr}", output.status);
    let table = std::fs::read_to_string(&out)?;
    let counted = table
        .split("#### Instructions per request")
        .nth(1)
        .and_then(|section| section.lines().find(|l| l.starts_with("| h1-small | 2 |")))
        .with_context(|| format!("no instructions row for h1-small in:\n{table}\n{stderr}"))?;
    let sluice: f64 = counted.split('|').map(str::trim).nth(3).unwrap_or_default().parse().with_context(|| format!("sluice's cell in {counted:?}"))?;
    ensure!(sluice > 1000.0, "sluice cannot serve a request in {sluice} instructions: {counted}");
    Ok(())
}
