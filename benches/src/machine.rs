//! Where a results table was measured (report header): the workspace, the CPU, the revision.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository root (the parent of the `benches` crate).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// A small /proc or /sys file, trimmed; `?` when it cannot be read.
pub fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "?".to_string(), |s| s.trim().to_string())
}

/// The `model name` line of /proc/cpuinfo.
pub fn cpu_model() -> String {
    read_trimmed("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "?".to_string())
}

/// `git rev-parse --short HEAD`, marked when the measured code (`paths`) has uncommitted changes.
pub fn revision(paths: &[&str]) -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(workspace())
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let mut status = vec!["status", "--porcelain", "--"];
    status.extend_from_slice(paths);
    // Documentation next to the code does not change what is measured.
    status.push(":(exclude)*.md");
    if git(&status).is_empty() {
        head
    } else {
        format!("{head} + uncommitted changes in {}", paths.join(", "))
    }
}

/// The report's measurement date (UTC, minutes).
pub fn now_utc() -> String {
    chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now()).format("%Y-%m-%d %H:%M UTC").to_string()
}

/// The report's machine rows: cores, CPU, kernel, and the load average before and now.
pub fn machine_rows(load_before: &str) -> Vec<(String, String)> {
    vec![
        ("nproc".into(), std::thread::available_parallelism().map_or(0, |n| n.get()).to_string()),
        ("CPU".into(), cpu_model()),
        ("kernel".into(), read_trimmed("/proc/sys/kernel/osrelease")),
        ("loadavg before".into(), load_before.to_string()),
        ("loadavg after".into(), read_trimmed("/proc/loadavg")),
    ]
}
