//! Processes under test (datapath side): pinned children that die with the harness, their
//! RSS and CPU time from /proc, and a blocking one-shot HTTP client for readiness checks.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A child started as `taskset -c <core> <argv…>` (taskset execs, so the pid is the program's).
/// Killed and reaped on drop.
pub struct Pinned {
    pub name: String,
    pub argv: Vec<String>,
    child: Child,
    log: PathBuf,
}

impl Pinned {
    pub fn spawn(name: &str, core: usize, argv: &[String], log_dir: &Path) -> Result<Pinned> {
        let log = log_dir.join(format!("{name}.log"));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let program = argv.first().context("empty command")?;
        let child = Command::new("taskset")
            .arg("-c")
            .arg(core.to_string())
            .arg(program)
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("starting {name}: taskset -c {core} {}", argv.join(" ")))?;
        Ok(Pinned {
            name: name.to_string(),
            argv: argv.to_vec(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails with the tail of the child's log when it has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(20).collect();
            bail!(
                "{} exited ({status}); last log lines:\n{}",
                self.name,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    pub fn rss_kib(&self) -> Result<u64> {
        rss_kib(self.pid())
    }

    pub fn cpu_seconds(&self) -> Result<f64> {
        cpu_seconds(self.pid())
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `VmRSS` of a process.
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")
}

/// User + system CPU time of a process and all its threads.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name: state is field 3, utime 14, stime 15.
    let after_name = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed stat")?;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index - 3)
            .and_then(|v| v.parse::<u64>().ok())
            .context("malformed stat")
    };
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((ticks(14)? + ticks(15)?) as f64 / per_second)
}

/// One `GET` with `Connection: close`: status and body.
pub fn http_get(target: SocketAddr, path: &str) -> Result<(u16, Vec<u8>)> {
    let (status, _, body) = exchange(target, path)?;
    Ok((status, body))
}

/// One `GET`: the value of response header `name` (lowercase), empty when absent.
pub fn http_get_header(target: SocketAddr, path: &str, name: &str) -> Result<String> {
    let (_, head, _) = exchange(target, path)?;
    Ok(head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(header, _)| header.trim().eq_ignore_ascii_case(name))
        .map(|(_, value)| value.trim().to_string())
        .unwrap_or_default())
}

fn exchange(target: SocketAddr, path: &str) -> Result<(u16, String, Vec<u8>)> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status")?;
    Ok((status, head, raw[split + 4..].to_vec()))
}

/// Polls `GET path` until it answers 200 (a proxy is ready once it forwards).
pub fn wait_ready(
    process: &mut Pinned,
    target: SocketAddr,
    path: &str,
    patience: Duration,
) -> Result<()> {
    let start = Instant::now();
    loop {
        process.ensure_running()?;
        if matches!(http_get(target, path), Ok((200, _))) {
            return Ok(());
        }
        if start.elapsed() > patience {
            bail!(
                "{} did not answer 200 on http://{target}{path} within {patience:?}",
                process.name
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Raises the open-files soft limit to the hard limit (10k idle connections need it).
pub fn raise_open_files_limit() -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of both calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            bail!("getrlimit: {}", std::io::Error::last_os_error());
        }
        limit.rlim_cur = limit.rlim_max;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
            bail!("setrlimit: {}", std::io::Error::last_os_error());
        }
    }
    Ok(limit.rlim_cur)
}
