//! The workloads (datapath under load): the exact wrk / h2load / oha command of each, and the
//! parsers that turn their output into one `Sample` (parsers are pure, unit-tested).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::scenario::{LARGE_PATH, SMALL_PATH};

/// Keep-alive connections of the closed-loop runs (the issue's 32).
pub const CONNECTIONS: usize = 32;
/// Concurrent streams per HTTP/2 connection for h2load.
pub const H2_STREAMS_PER_CONNECTION: usize = 4;

/// One load shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Workload {
    /// wrk, HTTP/1.1 keep-alive, 32 connections, 6-byte body.
    H1Small,
    /// wrk, HTTP/1.1 keep-alive, 32 connections, 16 KiB body.
    H1Large,
    /// h2load, HTTP/2 prior knowledge, 32 connections x 4 streams, 6-byte body.
    H2Small,
    /// h2load, HTTP/2, 16 KiB body.
    H2Large,
    /// oha at a fixed rate with latency correction (no coordinated omission).
    Paced,
    /// oha, a new TCP connection for every request.
    NewConnection,
}

impl Workload {
    pub const ALL: [Workload; 6] = [
        Workload::H1Small,
        Workload::H1Large,
        Workload::H2Small,
        Workload::H2Large,
        Workload::Paced,
        Workload::NewConnection,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Workload::H1Small => "h1-small",
            Workload::H1Large => "h1-16k",
            Workload::H2Small => "h2-small",
            Workload::H2Large => "h2-16k",
            Workload::Paced => "paced",
            Workload::NewConnection => "new-conn",
        }
    }

    pub fn from_name(name: &str) -> Option<Workload> {
        Workload::ALL.into_iter().find(|w| w.name() == name)
    }

    pub fn path(self) -> &'static str {
        match self {
            Workload::H1Large | Workload::H2Large => LARGE_PATH,
            _ => SMALL_PATH,
        }
    }

    pub fn is_http2(self) -> bool {
        matches!(self, Workload::H2Small | Workload::H2Large)
    }

    /// The program it needs on PATH.
    pub fn tool(self) -> &'static str {
        match self {
            Workload::H1Small | Workload::H1Large => "wrk",
            Workload::H2Small | Workload::H2Large => "h2load",
            Workload::Paced | Workload::NewConnection => "oha",
        }
    }
}

impl fmt::Display for Workload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How long and how hard.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub duration: Duration,
    /// Requests per second of the paced run.
    pub paced_rate: u32,
}

/// wrk's Lua hook: one machine-readable line with counts and percentiles (µs).
pub const WRK_SCRIPT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("sluice-bench requests=%d duration_us=%d errors=%d p50=%d p99=%d p999=%d\n",
    summary.requests, summary.duration, e.connect + e.read + e.write + e.status + e.timeout,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

/// The load generator's argv (without the `taskset` prefix). `scratch` holds the wrk script
/// and the h2load per-request log.
pub fn command(workload: Workload, url: &str, settings: Settings, scratch: &Path) -> Vec<String> {
    let seconds = settings.duration.as_secs().max(1).to_string();
    let connections = CONNECTIONS.to_string();
    let mut argv: Vec<String> = match workload {
        Workload::H1Small | Workload::H1Large => vec![
            "wrk".into(),
            "-t1".into(),
            format!("-c{connections}"),
            format!("-d{seconds}s"),
            "-s".into(),
            scratch.join("report.lua").display().to_string(),
        ],
        Workload::H2Small | Workload::H2Large => vec![
            "h2load".into(),
            "-t1".into(),
            format!("-c{connections}"),
            format!("-m{H2_STREAMS_PER_CONNECTION}"),
            "-D".into(),
            seconds,
            format!("--log-file={}", scratch.join("h2load.log").display()),
        ],
        Workload::Paced | Workload::NewConnection => {
            let mut oha: Vec<String> = vec![
                "oha".into(),
                "--no-tui".into(),
                "--output-format".into(),
                "json".into(),
                "-z".into(),
                format!("{seconds}s"),
                "-c".into(),
                connections,
            ];
            match workload {
                Workload::Paced => oha.extend([
                    "-q".into(),
                    settings.paced_rate.to_string(),
                    "--latency-correction".into(),
                ]),
                _ => oha.push("--disable-keepalive".into()),
            }
            oha
        }
    };
    argv.push(url.to_string());
    argv
}

/// What one run of one workload against one target gave.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    pub requests_per_second: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// Failed requests plus non-2xx answers.
    pub errors: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("{tool} output: {reason}")]
pub struct ParseError {
    tool: &'static str,
    reason: String,
}

fn parse_error(tool: &'static str, reason: impl Into<String>) -> ParseError {
    ParseError {
        tool,
        reason: reason.into(),
    }
}

/// The `sluice-bench ...` line our wrk script prints.
pub fn parse_wrk(stdout: &str) -> Result<Sample, ParseError> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sluice-bench "))
        .ok_or_else(|| parse_error("wrk", "no `sluice-bench` line (did the Lua script run?)"))?;
    let field = |name: &str| -> Result<f64, ParseError> {
        line.split_whitespace()
            .find_map(|kv| {
                kv.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix('='))
            })
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| parse_error("wrk", format!("no {name} in {line:?}")))
    };
    let duration_us = field("duration_us")?;
    if duration_us <= 0.0 {
        return Err(parse_error("wrk", "zero duration"));
    }
    Ok(Sample {
        requests_per_second: field("requests")? / (duration_us / 1e6),
        p50_us: field("p50")?,
        p99_us: field("p99")?,
        p999_us: field("p999")?,
        errors: field("errors")? as u64,
    })
}

/// h2load's summary (`finished in …, N req/s`, request and status counts) plus its
/// per-request log (`start_us \t status \t duration_us`) for the percentiles.
pub fn parse_h2load(stdout: &str, log: &str) -> Result<Sample, ParseError> {
    let requests_per_second = stdout
        .lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|rest| rest.split(", ").nth(1))
        .and_then(|rps| rps.strip_suffix(" req/s"))
        .and_then(|rps| rps.parse::<f64>().ok())
        .ok_or_else(|| parse_error("h2load", "no `finished in …, N req/s` line"))?;
    let count = |line_prefix: &str, what: &str| -> u64 {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(line_prefix))
            .and_then(|rest| rest.split(", ").find_map(|part| part.strip_suffix(what)))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let not_2xx = count("status codes: ", " 3xx")
        + count("status codes: ", " 4xx")
        + count("status codes: ", " 5xx");
    let errors = count("requests: ", " failed")
        + count("requests: ", " errored")
        + count("requests: ", " timeout")
        + not_2xx;
    let mut durations: Vec<f64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2))
        .filter_map(|d| d.trim().parse::<f64>().ok())
        .collect();
    if durations.is_empty() {
        return Err(parse_error("h2load", "empty per-request log"));
    }
    durations.sort_by(f64::total_cmp);
    Ok(Sample {
        requests_per_second,
        p50_us: percentile(&durations, 50.0),
        p99_us: percentile(&durations, 99.0),
        p999_us: percentile(&durations, 99.9),
        errors,
    })
}

/// Nearest-rank percentile of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    // The epsilon keeps 99.9% of 1000 at rank 999 despite 0.999 * 1000 = 999.0000000000001.
    let rank = ((p / 100.0) * sorted.len() as f64 - 1e-9).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[derive(Deserialize)]
struct OhaReport {
    summary: OhaSummary,
    #[serde(rename = "latencyPercentiles")]
    latency_percentiles: OhaPercentiles,
    #[serde(rename = "statusCodeDistribution", default)]
    status_codes: std::collections::BTreeMap<String, u64>,
    #[serde(rename = "errorDistribution", default)]
    errors: std::collections::BTreeMap<String, u64>,
}

#[derive(Deserialize)]
struct OhaSummary {
    #[serde(rename = "requestsPerSec")]
    requests_per_sec: f64,
}

/// Seconds; null when there were no responses.
#[derive(Deserialize)]
struct OhaPercentiles {
    p50: Option<f64>,
    p99: Option<f64>,
    #[serde(rename = "p99.9")]
    p999: Option<f64>,
}

/// What oha calls the requests still in flight when `-z` runs out: not failures.
const OHA_DEADLINE: &str = "aborted due to deadline";

/// oha's `--output-format json` report (latencies in seconds).
pub fn parse_oha(stdout: &str) -> Result<Sample, ParseError> {
    let report: OhaReport =
        serde_json::from_str(stdout).map_err(|e| parse_error("oha", e.to_string()))?;
    let micros = |s: Option<f64>| s.map_or(f64::NAN, |s| s * 1e6);
    let not_2xx: u64 = report
        .status_codes
        .iter()
        .filter(|(code, _)| !code.starts_with('2'))
        .map(|(_, n)| n)
        .sum();
    Ok(Sample {
        requests_per_second: report.summary.requests_per_sec,
        p50_us: micros(report.latency_percentiles.p50),
        p99_us: micros(report.latency_percentiles.p99),
        p999_us: micros(report.latency_percentiles.p999),
        errors: not_2xx
            + report
                .errors
                .iter()
                .filter(|(what, _)| what.as_str() != OHA_DEADLINE)
                .map(|(_, n)| n)
                .sum::<u64>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_line_gives_rate_and_percentiles() {
        let out = "Running 5s test @ http://x/small\nsluice-bench requests=50000 duration_us=5000000 errors=3 p50=400 p99=900 p999=1500\n";
        let sample = parse_wrk(out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            sample,
            Sample {
                requests_per_second: 10000.0,
                p50_us: 400.0,
                p99_us: 900.0,
                p999_us: 1500.0,
                errors: 3
            }
        );
        assert!(parse_wrk("Running 5s test\n").is_err());
    }

    #[test]
    fn h2load_summary_and_log_give_rate_errors_and_percentiles() {
        let out = "finished in 5.00s, 20000.50 req/s, 2.00MB/s\nrequests: 100 total, 100 started, 98 done, 97 succeeded, 2 failed, 1 errored, 0 timeout\nstatus codes: 96 2xx, 0 3xx, 1 4xx, 0 5xx\n";
        let log: String = (1..=1000)
            .map(|d| format!("1700000000000000\t200\t{d}\n"))
            .collect();
        let sample = parse_h2load(out, &log).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sample.requests_per_second, 20000.5);
        assert_eq!(sample.errors, 4);
        assert_eq!(
            (sample.p50_us, sample.p99_us, sample.p999_us),
            (500.0, 990.0, 999.0)
        );
        assert!(parse_h2load(out, "").is_err());
    }

    #[test]
    fn oha_json_gives_rate_and_microsecond_percentiles() {
        let out = r#"{"summary":{"successRate":1.0,"requestsPerSec":5000.0},"latencyPercentiles":{"p50":0.0002,"p99":0.001,"p99.9":0.003},"statusCodeDistribution":{"200":24990,"403":10},"errorDistribution":{"connection reset":2,"aborted due to deadline":31}}"#;
        let sample = parse_oha(out).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(sample.requests_per_second, 5000.0);
        assert!((sample.p50_us - 200.0).abs() < 1e-6 && (sample.p999_us - 3000.0).abs() < 1e-6);
        assert_eq!(sample.errors, 12);
    }

    #[test]
    fn commands_pin_nothing_themselves_and_end_with_the_url() {
        let settings = Settings {
            duration: Duration::from_secs(5),
            paced_rate: 5000,
        };
        let argv = command(
            Workload::Paced,
            "http://127.0.0.1:1/small",
            settings,
            Path::new("/tmp/x"),
        );
        assert_eq!(argv.join(" "), "oha --no-tui --output-format json -z 5s -c 32 -q 5000 --latency-correction http://127.0.0.1:1/small");
        let argv = command(Workload::H2Large, "http://h/16k", settings, Path::new("/s"));
        assert_eq!(
            argv.join(" "),
            "h2load -t1 -c32 -m4 -D 5 --log-file=/s/h2load.log http://h/16k"
        );
        assert_eq!(
            Workload::from_name("new-conn"),
            Some(Workload::NewConnection)
        );
    }
}
