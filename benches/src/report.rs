//! Results -> markdown (pure): medians with min–max spread per workload, target and policy
//! size, the sluice/Envoy, sluice/pingora and sluice/direct ratios, memory, and the issue's
//! targets.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};

use crate::measure::{Sample, Workload};

/// What a run went through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    Direct,
    Sluice,
    Envoy,
    /// pingora-proxy doing the benchmark's job (benches/pingora-baseline).
    Pingora,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Direct => "direct",
            Target::Sluice => "sluice",
            Target::Envoy => "envoy",
            Target::Pingora => "pingora",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        [Target::Direct, Target::Sluice, Target::Envoy, Target::Pingora]
            .into_iter()
            .find(|t| t.name() == name)
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One measured run. `rules` is the policy size on the proxy (0 for direct);
/// `proxy_cpu` is the proxy's CPU time over the run's wall time (cores busy).
#[derive(Debug, Clone, Copy)]
pub struct Run {
    pub workload: Workload,
    pub target: Target,
    pub rules: usize,
    pub sample: Sample,
    pub proxy_cpu: Option<f64>,
    /// User-space instructions the proxy process executed per request during the load, when
    /// the proxy ran under callgrind (`loadtest --callgrind`).
    pub instructions: Option<f64>,
}

impl Run {
    /// Requests per second per fully busy proxy core.
    pub fn per_core(&self) -> Option<f64> {
        self.proxy_cpu
            .filter(|c| *c > 0.0)
            .map(|c| self.sample.requests_per_second / c)
    }
}

/// RSS of one proxy process, KiB.
#[derive(Debug, Clone, Copy)]
pub struct Memory {
    pub target: Target,
    pub rules: usize,
    pub idle_kib: u64,
    pub after_load_kib: Option<u64>,
    pub idle_connections: usize,
    pub with_connections_kib: Option<u64>,
}

/// Everything around the numbers.
#[derive(Debug, Clone, Default)]
pub struct Context {
    pub date: String,
    pub machine: Vec<(String, String)>,
    pub versions: Vec<(String, String)>,
    pub settings: Vec<String>,
    pub commands: Vec<String>,
}

/// Median and spread of one metric over the repetitions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Stats> {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let middle = values.len() / 2;
        let median = if values.len().is_multiple_of(2) {
            (values[middle - 1] + values[middle]) / 2.0
        } else {
            values[middle]
        };
        Some(Stats {
            median,
            min: values[0],
            max: values[values.len() - 1],
        })
    }
}

/// The runs of one (workload, target, rules) cell.
#[derive(Debug, Clone, Copy)]
struct Cell {
    rps: Option<Stats>,
    p50: Option<Stats>,
    p99: Option<Stats>,
    p999: Option<Stats>,
    cpu: Option<Stats>,
    per_core: Option<Stats>,
    instructions: Option<Stats>,
    errors: u64,
    runs: usize,
}

type Key = (Workload, usize, Target);

fn cells(runs: &[Run]) -> BTreeMap<Key, Cell> {
    let mut grouped: BTreeMap<Key, Vec<&Run>> = BTreeMap::new();
    for run in runs {
        grouped
            .entry((run.workload, run.rules, run.target))
            .or_default()
            .push(run);
    }
    grouped
        .into_iter()
        .map(|(key, runs)| {
            let stats = |f: fn(&Run) -> Option<f64>| Stats::of(runs.iter().filter_map(|r| f(r)));
            let cell = Cell {
                rps: stats(|r| Some(r.sample.requests_per_second)),
                p50: stats(|r| Some(r.sample.p50_us)),
                p99: stats(|r| Some(r.sample.p99_us)),
                p999: stats(|r| Some(r.sample.p999_us)),
                cpu: stats(|r| r.proxy_cpu),
                per_core: stats(Run::per_core),
                instructions: stats(|r| r.instructions),
                errors: runs.iter().map(|r| r.sample.errors).sum(),
                runs: runs.len(),
            };
            (key, cell)
        })
        .collect()
}

/// The callgrind table: instructions per request are repeatable where timing is not, but they
/// count user space only (the kernel's share, the same for every proxy, is left out).
fn render_instructions(out: &mut String, cells: &BTreeMap<Key, Cell>, proxied: &[(Workload, usize)]) {
    let _ = writeln!(out, "\n#### Instructions per request (callgrind, user space)\n");
    let _ = writeln!(out, "Instructions the whole proxy process executed in user space during the load, divided by the requests; the kernel's share is not counted. Median (min–max) over the repetitions.\n");
    let _ = writeln!(out, "| workload | rules | sluice | envoy | pingora | Envoy/sluice | pingora/sluice |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for (workload, rules) in proxied {
        let instructions = |target| cells.get(&(*workload, *rules, target)).and_then(|cell| cell.instructions);
        let (sluice, envoy, pingora) = (instructions(Target::Sluice), instructions(Target::Envoy), instructions(Target::Pingora));
        let _ = writeln!(
            out,
            "| {workload} | {rules} | {} | {} | {} | {} | {} |",
            spread(sluice, 0),
            spread(envoy, 0),
            spread(pingora, 0),
            show_ratio(ratio(envoy, sluice)),
            show_ratio(ratio(pingora, sluice)),
        );
    }
}

fn spread(stats: Option<Stats>, decimals: usize) -> String {
    match stats {
        Some(s) if s.min == s.max => format!("{:.*}", decimals, s.median),
        Some(s) => format!(
            "{:.*} ({:.*}–{:.*})",
            decimals, s.median, decimals, s.min, decimals, s.max
        ),
        None => "—".to_string(),
    }
}

fn ratio(numerator: Option<Stats>, denominator: Option<Stats>) -> Option<f64> {
    match (numerator, denominator) {
        (Some(n), Some(d)) if d.median > 0.0 => Some(n.median / d.median),
        _ => None,
    }
}

fn show_ratio(value: Option<f64>) -> String {
    value.map_or("—".to_string(), |v| format!("{v:.2}x"))
}

fn show_difference(a: Option<Stats>, b: Option<Stats>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:+.0}", a.median - b.median),
        _ => "—".to_string(),
    }
}

fn mib(kib: Option<u64>) -> String {
    kib.map_or("—".to_string(), |k| format!("{:.1}", k as f64 / 1024.0))
}

/// The markdown section: context, throughput/latency, ratios, memory, targets.
pub fn render(context: &Context, runs: &[Run], memory: &[Memory]) -> String {
    let cells = cells(runs);
    let mut out = String::new();
    let _ = writeln!(out, "Run finished {} (`loadtest`).\n", context.date);
    for (title, pairs) in [
        ("Machine", &context.machine),
        ("Versions", &context.versions),
    ] {
        let _ = writeln!(
            out,
            "**{title}:** {}\n",
            pairs
                .iter()
                .map(|(k, v)| format!("{k} `{v}`"))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    if !context.settings.is_empty() {
        let _ = writeln!(out, "**Settings:**\n");
        for setting in &context.settings {
            let _ = writeln!(out, "- {setting}");
        }
        out.push('\n');
    }

    let _ = writeln!(out, "#### Throughput and latency\n");
    let _ = writeln!(out, "Median over the repetitions, (min–max) when they differ; latencies in µs; proxy CPU = proxy CPU seconds / wall seconds.\n");
    let _ = writeln!(out, "| workload | target | rules | req/s | p50 | p99 | p99.9 | proxy CPU | req/s per proxy core | errors | runs |");
    let _ = writeln!(
        out,
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for ((workload, rules, target), cell) in &cells {
        let rules = if *target == Target::Direct {
            "—".to_string()
        } else {
            rules.to_string()
        };
        let _ = writeln!(
            out,
            "| {workload} | {target} | {rules} | {} | {} | {} | {} | {} | {} | {} | {} |",
            spread(cell.rps, 0),
            spread(cell.p50, 0),
            spread(cell.p99, 0),
            spread(cell.p999, 0),
            spread(cell.cpu, 2),
            spread(cell.per_core, 0),
            cell.errors,
            cell.runs
        );
    }

    let _ = writeln!(out, "\n#### Ratios\n");
    let with_pingora = cells.keys().any(|(_, _, t)| *t == Target::Pingora);
    let pingora_header = if with_pingora { " sluice/pingora req/s per core | sluice/pingora p99 |" } else { "" };
    let _ = writeln!(out, "| workload | rules | sluice/Envoy req/s | sluice/Envoy req/s per core | sluice/Envoy p99 | sluice/direct req/s | sluice p50 − direct p50 (µs) | Envoy p50 − direct p50 (µs) |{pingora_header}");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|{}", if with_pingora { "---:|---:|" } else { "" });
    let mut proxied: Vec<(Workload, usize)> = cells
        .keys()
        .filter(|(_, _, t)| *t != Target::Direct)
        .map(|(w, r, _)| (*w, *r))
        .collect();
    proxied.dedup();
    for (workload, rules) in &proxied {
        let cell = |target| {
            cells.get(&(
                *workload,
                if target == Target::Direct { 0 } else { *rules },
                target,
            ))
        };
        let (direct, sluice, envoy, pingora) = (
            cell(Target::Direct),
            cell(Target::Sluice),
            cell(Target::Envoy),
            cell(Target::Pingora),
        );
        let pingora_cells = if with_pingora {
            format!(
                " {} | {} |",
                show_ratio(ratio(sluice.and_then(|c| c.per_core), pingora.and_then(|c| c.per_core))),
                show_ratio(ratio(sluice.and_then(|c| c.p99), pingora.and_then(|c| c.p99))),
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "| {workload} | {rules} | {} | {} | {} | {} | {} | {} |{pingora_cells}",
            show_ratio(ratio(sluice.and_then(|c| c.rps), envoy.and_then(|c| c.rps))),
            show_ratio(ratio(
                sluice.and_then(|c| c.per_core),
                envoy.and_then(|c| c.per_core)
            )),
            show_ratio(ratio(sluice.and_then(|c| c.p99), envoy.and_then(|c| c.p99))),
            show_ratio(ratio(
                sluice.and_then(|c| c.rps),
                direct.and_then(|c| c.rps)
            )),
            show_difference(sluice.and_then(|c| c.p50), direct.and_then(|c| c.p50)),
            show_difference(envoy.and_then(|c| c.p50), direct.and_then(|c| c.p50)),
        );
    }

    if cells.values().any(|cell| cell.instructions.is_some()) {
        render_instructions(&mut out, &cells, &proxied);
    }

    if !memory.is_empty() {
        let _ = writeln!(out, "\n#### Memory (RSS, MiB)\n");
        let connections = memory.iter().map(|m| m.idle_connections).max().unwrap_or(0);
        let _ = writeln!(
            out,
            "| proxy | rules | idle | after the load runs | with {connections} idle connections |"
        );
        let _ = writeln!(out, "|---|---:|---:|---:|---:|");
        for m in memory {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} |",
                m.target,
                m.rules,
                mib(Some(m.idle_kib)),
                mib(m.after_load_kib),
                mib(m.with_connections_kib)
            );
        }
        let find = |target, rules| {
            memory
                .iter()
                .find(|m| m.target == target && m.rules == rules)
        };
        let mut rules: Vec<usize> = memory.iter().map(|m| m.rules).collect();
        rules.sort_unstable();
        rules.dedup();
        for r in rules {
            for other in [Target::Envoy, Target::Pingora] {
                let (Some(s), Some(o)) = (find(Target::Sluice, r), find(other, r)) else {
                    continue;
                };
                let with = match (s.with_connections_kib, o.with_connections_kib) {
                    (Some(s), Some(o)) if o > 0 => format!("{:.2}x", s as f64 / o as f64),
                    _ => "—".to_string(),
                };
                let label = if other == Target::Envoy { "Envoy" } else { "pingora" };
                let _ = writeln!(
                    out,
                    "\nsluice/{label} RSS with {r} rules: idle {:.2}x, with {connections} idle connections {with}.",
                    s.idle_kib as f64 / o.idle_kib.max(1) as f64
                );
            }
        }
    }

    if !context.commands.is_empty() {
        let _ = writeln!(out, "\n#### Exact commands\n\n```sh");
        for command in &context.commands {
            let _ = writeln!(out, "{command}");
        }
        let _ = writeln!(out, "```");
    }
    out
}

/// Replaces the text between `begin` and `end` markers of `document` (appends them if absent).
pub fn splice(document: &str, section: &str, begin: &str, end: &str) -> String {
    match (document.find(begin), document.find(end)) {
        (Some(start), Some(stop)) if stop > start => {
            format!(
                "{}{begin}\n{section}{}",
                &document[..start],
                &document[stop..]
            )
        }
        _ => format!("{document}\n{begin}\n{section}{end}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(
        workload: Workload,
        target: Target,
        rules: usize,
        rps: f64,
        p50: f64,
        cpu: Option<f64>,
    ) -> Run {
        Run {
            workload,
            target,
            rules,
            sample: Sample {
                requests_per_second: rps,
                p50_us: p50,
                p99_us: p50 * 2.0,
                p999_us: p50 * 3.0,
                errors: 0,
            },
            proxy_cpu: cpu,
            instructions: None,
        }
    }

    #[test]
    fn stats_take_the_median_and_the_range() {
        assert_eq!(
            Stats::of([3.0, 1.0, 2.0]),
            Some(Stats {
                median: 2.0,
                min: 1.0,
                max: 3.0
            })
        );
        assert_eq!(Stats::of([4.0, 1.0, 2.0, 3.0]).map(|s| s.median), Some(2.5));
        assert_eq!(Stats::of([f64::NAN]), None);
    }

    #[test]
    fn table_rows_ratios_and_memory() {
        let runs = [
            run(Workload::H1Small, Target::Direct, 0, 60000.0, 300.0, None),
            run(
                Workload::H1Small,
                Target::Sluice,
                2,
                40000.0,
                350.0,
                Some(1.0),
            ),
            run(
                Workload::H1Small,
                Target::Sluice,
                2,
                44000.0,
                360.0,
                Some(1.0),
            ),
            run(
                Workload::H1Small,
                Target::Sluice,
                2,
                42000.0,
                370.0,
                Some(1.0),
            ),
            run(
                Workload::H1Small,
                Target::Envoy,
                2,
                21000.0,
                700.0,
                Some(1.0),
            ),
        ];
        let memory = [
            Memory {
                target: Target::Sluice,
                rules: 2,
                idle_kib: 10240,
                after_load_kib: None,
                idle_connections: 10000,
                with_connections_kib: Some(40960),
            },
            Memory {
                target: Target::Envoy,
                rules: 2,
                idle_kib: 40960,
                after_load_kib: None,
                idle_connections: 10000,
                with_connections_kib: Some(163840),
            },
        ];
        let text = render(&Context::default(), &runs, &memory);
        assert!(
            text.contains("| h1-small | sluice | 2 | 42000 (40000–44000) | 360 (350–370) |"),
            "{text}"
        );
        assert!(text.contains("| h1-small | direct | — | 60000 |"), "{text}");
        assert!(
            text.contains("| h1-small | 2 | 2.00x | 2.00x | 0.51x | 0.70x | +60 | +400 |"),
            "{text}"
        );
        assert!(text.contains("| sluice | 2 | 10.0 | — | 40.0 |"), "{text}");
        assert!(
            text.contains("idle 0.25x, with 10000 idle connections 0.25x"),
            "{text}"
        );
    }

    #[test]
    fn pingora_runs_add_their_ratio_columns_and_rss_line() {
        let runs = [
            run(Workload::H1Small, Target::Sluice, 2, 40000.0, 350.0, Some(1.0)),
            run(Workload::H1Small, Target::Envoy, 2, 20000.0, 700.0, Some(1.0)),
            run(Workload::H1Small, Target::Pingora, 2, 25000.0, 500.0, Some(1.0)),
        ];
        let memory = [Target::Sluice, Target::Pingora].map(|target| Memory {
            target,
            rules: 2,
            idle_kib: if target == Target::Sluice { 10240 } else { 20480 },
            after_load_kib: None,
            idle_connections: 100,
            with_connections_kib: None,
        });
        let text = render(&Context::default(), &runs, &memory);
        assert!(text.contains("| sluice/pingora req/s per core | sluice/pingora p99 |"), "{text}");
        assert!(text.contains("| h1-small | 2 | 2.00x | 2.00x | 0.50x | — | — | — | 1.60x | 0.70x |"), "{text}");
        assert!(text.contains("| h1-small | pingora | 2 | 25000 | 500 |"), "{text}");
        assert!(text.contains("sluice/pingora RSS with 2 rules: idle 0.50x"), "{text}");
    }

    #[test]
    fn callgrind_runs_add_an_instructions_table_and_plain_runs_do_not() {
        let counted = |target, instructions| Run {
            instructions: Some(instructions),
            ..run(Workload::H1Large, target, 2, 1000.0, 9000.0, Some(1.0))
        };
        let runs = [
            counted(Target::Sluice, 36000.0),
            counted(Target::Sluice, 38000.0),
            counted(Target::Sluice, 37000.0),
            counted(Target::Envoy, 148000.0),
            counted(Target::Pingora, 55500.0),
        ];
        let text = render(&Context::default(), &runs, &[]);
        assert!(text.contains("#### Instructions per request (callgrind, user space)"), "{text}");
        assert!(text.contains("| h1-16k | 2 | 37000 (36000–38000) | 148000 | 55500 | 4.00x | 1.50x |"), "{text}");
        let plain = render(&Context::default(), &[run(Workload::H1Large, Target::Sluice, 2, 1000.0, 900.0, Some(1.0))], &[]);
        assert!(!plain.contains("Instructions per request"), "{plain}");
    }

    #[test]
    fn splice_replaces_between_markers_or_appends() {
        let doc = "intro\n<!-- b -->\nold\n<!-- e -->\ntail\n";
        assert_eq!(
            splice(doc, "new\n", "<!-- b -->", "<!-- e -->"),
            "intro\n<!-- b -->\nnew\n<!-- e -->\ntail\n"
        );
        assert_eq!(
            splice("intro\n", "new\n", "<!-- b -->", "<!-- e -->"),
            "intro\n\n<!-- b -->\nnew\n<!-- e -->\n"
        );
    }
}
