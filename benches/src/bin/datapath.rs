//! `datapath`: the kernel datapath benchmarks of issue #3 in one run (see benches/README.md):
//! connect() rate through sluice's socket LB and through iptables DNAT with 1 to 100k Services,
//! and pod-to-pod HTTP requests/s through `sluice agent --datapath ebpf` with no, an L3/L4 and an
//! L7 policy, inside node and pod namespaces that it creates and removes.

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use sluice_benches::datapath::connect::{
    self, AcceptCloseBackend, ClientResult, BACKEND_PORT, FIRST_VIP, SERVICE_PORT,
};
use sluice_benches::datapath::http::{self, Policy, DENIED_PATH, PATH, SERVER_PORT};
use sluice_benches::datapath::table::{self, Balancer, ConnectRun, HttpRun, Install};
use sluice_benches::measure;
use sluice_benches::procs::{self, Pinned};
use sluice_benches::report::{splice, Context as ReportContext};
use sluice_benches::machine::{machine_rows, now_utc, read_trimmed, revision, workspace};
use sluice_benches::setup;
use sluice_ebpf::testing::{run, NetnsGuard, Node, Pod, TestDir, NODE_IP};
use sluice_ebpf::{BpfState, Datapath};

const BEGIN: &str = "<!-- datapath:begin -->";
const END: &str = "<!-- datapath:end -->";
/// Names the harness's namespaces, pins and cgroup (`slbdp-<pid>…`, see sluice_ebpf::testing).
const TAG: &str = "bdp";
/// Pods: the socket-LB client (in the test cgroup, no iptables), the iptables client (its own
/// namespace holds the rules, not in the cgroup), and the two backends every Service has.
const PODS: [(&str, Ipv4Addr); 4] = [
    ("sluice-client", Ipv4Addr::new(198, 18, 0, 10)),
    ("iptables-client", Ipv4Addr::new(198, 18, 0, 11)),
    ("backend-0", Ipv4Addr::new(198, 18, 0, 20)),
    ("backend-1", Ipv4Addr::new(198, 18, 0, 21)),
];

/// The HTTP bench's pods.
const HTTP_CLIENT: (&str, Ipv4Addr) = ("client", Ipv4Addr::new(198, 18, 0, 10));
const HTTP_SERVER: (&str, Ipv4Addr) = ("server", Ipv4Addr::new(198, 18, 0, 11));
/// The agent (and its proxy) on one core, nginx and wrk on the other, as in `loadtest`.
const AGENT_CORE: usize = 0;
const LOAD_CORE: usize = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Bench {
    Connect,
    Http,
}

#[derive(Parser)]
#[command(about = "Kernel datapath benchmarks: connect() through sluice's socket LB vs iptables DNAT, pod-to-pod HTTP by policy")]
struct Args {
    #[command(subcommand)]
    command: Option<Internal>,
    /// Which benchmarks to run.
    #[arg(long, value_delimiter = ',', default_value = "connect,http")]
    benches: Vec<Bench>,
    /// The sluice binary for the HTTP bench (default: `cargo build --release` of this workspace).
    #[arg(long)]
    sluice: Option<PathBuf>,
    /// Service counts, each measured through both balancers.
    #[arg(long, value_delimiter = ',', default_value = "1,1000,10000,100000")]
    services: Vec<u32>,
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// Seconds per client run.
    #[arg(long, default_value_t = 5)]
    duration: u64,
    /// The iptables-restore to load the rules with (Debian's default is the nf_tables one;
    /// `iptables-legacy-restore` for the classic xtables walk).
    #[arg(long, default_value = "iptables-restore")]
    iptables_restore: String,
    /// Rewrite the section between the datapath markers of this file.
    #[arg(long)]
    readme: Option<PathBuf>,
    /// Also write the section alone to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Do not apt-get install iptables when it is missing.
    #[arg(long)]
    no_install: bool,
}

#[derive(Subcommand)]
enum Internal {
    /// (run by the harness inside a pod) connect+close to random VIPs, print one result line.
    #[command(hide = true)]
    ConnectClient {
        #[arg(long)]
        first: Ipv4Addr,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        port: u16,
        #[arg(long)]
        seconds: f64,
        /// Join this cgroup first (where sluice's socket programs are attached).
        #[arg(long)]
        cgroup: Option<PathBuf>,
    },
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(Internal::ConnectClient {
        first,
        count,
        port,
        seconds,
        cgroup,
    }) = &args.command
    {
        if let Some(cgroup) = cgroup {
            std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
                .with_context(|| format!("joining cgroup {}", cgroup.display()))?;
        }
        let result =
            connect::run_client(*first, *count, *port, Duration::from_secs_f64(*seconds));
        println!("{}", result.line());
        return Ok(());
    }
    bench(&args)
}

fn bench(args: &Args) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the datapath benchmarks create network namespaces and load BPF: run as root");
    }
    let http_tools = if args.benches.contains(&Bench::Http) {
        if !args.no_install {
            setup::ensure_debian_programs(&["nginx", "wrk", "taskset"])?;
        }
        let sluice = match &args.sluice {
            Some(path) => path.clone(),
            None => setup::build_sluice(&workspace())?,
        };
        let nginx = setup::find_program("nginx").context("nginx is missing: apt-get install -y nginx")?;
        Some((sluice, nginx))
    } else {
        None
    };
    if args.benches.contains(&Bench::Connect) {
        ensure_iptables(&args.iptables_restore, args.no_install)?;
    }
    let load_before = read_trimmed("/proc/loadavg");
    let started = Instant::now();
    let (runs, installs) = if args.benches.contains(&Bench::Connect) {
        measure_connect(args)?
    } else {
        Default::default()
    };
    let http_runs = match &http_tools {
        Some((sluice, nginx)) => measure_http(args, sluice, nginx)?,
        None => Vec::new(),
    };
    tracing::info!("measured in {:.0} s", started.elapsed().as_secs_f64());
    let mut section = table::render_context(&context(args, &load_before, http_tools.as_ref()));
    if !runs.is_empty() || !installs.is_empty() {
        section.push_str(&table::render_connect(&runs, &installs));
    }
    if !http_runs.is_empty() {
        section.push_str(&table::render_http(&http_runs));
    }
    section.push_str(&commands(args));
    if let Some(out) = &args.out {
        std::fs::write(out, &section).with_context(|| format!("writing {}", out.display()))?;
    }
    if let Some(readme) = &args.readme {
        let document = std::fs::read_to_string(readme)
            .with_context(|| format!("reading {}", readme.display()))?;
        std::fs::write(readme, splice(&document, &section, BEGIN, END))
            .with_context(|| format!("writing {}", readme.display()))?;
    }
    print!("{section}");
    Ok(())
}

fn ensure_iptables(restore: &str, no_install: bool) -> Result<()> {
    if setup::find_program(restore).is_some() {
        return Ok(());
    }
    if no_install {
        bail!("{restore} is missing: apt-get install -y iptables");
    }
    for apt in [&["update", "-qq"][..], &["install", "-y", "-qq", "iptables"]] {
        let status = Command::new("apt-get")
            .args(apt)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get")?;
        if !status.success() {
            bail!("apt-get {} failed: {status}", apt.join(" "));
        }
    }
    setup::find_program(restore)
        .map(|_| ())
        .with_context(|| format!("no {restore} after installing iptables"))
}

/// The node, its pods, the backends and the loaded datapath; removed in reverse on drop.
struct Bed {
    backends: Vec<AcceptCloseBackend>,
    datapath: Option<Datapath>,
    cgroup: TestDir,
    pins: TestDir,
    node: Node,
}

impl Bed {
    fn new() -> Result<Bed> {
        let pods: Vec<(String, Ipv4Addr)> = PODS.iter().map(|(n, ip)| (n.to_string(), *ip)).collect();
        let node = Node::with_pods(TAG, &pods)?;
        let pins = TestDir::pins(TAG)?;
        let cgroup = TestDir::cgroup(TAG)?;
        let mut backends = Vec::new();
        for name in ["backend-0", "backend-1"] {
            let pod = node.pod(name)?;
            let listener = {
                let _inside = NetnsGuard::enter(&pod.netns)?;
                TcpListener::bind(SocketAddrV4::new(pod.ip, BACKEND_PORT))
                    .with_context(|| format!("binding {}:{BACKEND_PORT} in {name}", pod.ip))?
            };
            backends.push(AcceptCloseBackend::start(listener));
        }
        for client in ["sluice-client", "iptables-client"] {
            // All ephemeral ports: the clients make tens of thousands of connections a second.
            run(
                "ip",
                &["netns", "exec", &node.pod(client)?.netns, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535"],
            )?;
        }
        let mut datapath = Datapath::load(&pins.path).context("loading the sluice datapath")?;
        datapath
            .attach_cgroup(&cgroup.path)
            .context("attaching sluice's socket programs to the test cgroup")?;
        Ok(Bed {
            backends,
            datapath: Some(datapath),
            cgroup,
            pins,
            node,
        })
    }

    fn pod(&self, name: &str) -> Result<&Pod> {
        self.node.pod(name)
    }

    fn install_sluice(&mut self, services: u32) -> Result<Duration> {
        let state = BpfState {
            services: connect::services(services, PODS[2].1),
            ..BpfState::default()
        };
        let datapath = self.datapath.as_mut().context("datapath already cleaned up")?;
        let start = Instant::now();
        datapath.apply(&state)?;
        Ok(start.elapsed())
    }

    fn install_iptables(&self, restore: &str, services: u32) -> Result<Duration> {
        let rules = connect::iptables_restore(services, PODS[2].1);
        let netns = &self.pod("iptables-client")?.netns;
        let start = Instant::now();
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, restore])
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {restore}"))?;
        child
            .stdin
            .take()
            .context("stdin of iptables-restore")?
            .write_all(rules.as_bytes())?;
        let output = child.wait_with_output()?;
        if !output.status.success() {
            bail!("{restore}: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(start.elapsed())
    }

    /// One client run from `pod`, connecting to `count` addresses from `first`.
    fn client(&self, pod: &str, first: Ipv4Addr, count: u32, port: u16, seconds: u64, in_cgroup: bool) -> Result<ClientResult> {
        let me = std::env::current_exe().context("own executable")?;
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.pod(pod)?.netns])
            .arg(me)
            .args(["connect-client", "--first", &first.to_string(), "--count", &count.to_string()])
            .args(["--port", &port.to_string(), "--seconds", &seconds.to_string()]);
        if in_cgroup {
            command.arg("--cgroup").arg(&self.cgroup.path);
        }
        let output = command.output().context("running the connect client")?;
        if !output.status.success() {
            bail!("connect client in {pod}: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(connect::parse_client_output(&String::from_utf8_lossy(&output.stdout))?)
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        self.backends.clear();
        if let Some(datapath) = self.datapath.take() {
            if let Err(e) = datapath.cleanup() {
                tracing::warn!("datapath cleanup: {e}");
            }
        }
        tracing::debug!("removing {} and {}", self.pins.path.display(), self.node.netns);
    }
}

fn measure_connect(args: &Args) -> Result<(Vec<ConnectRun>, Vec<Install>)> {
    let mut bed = Bed::new()?;
    let mut runs = Vec::new();
    let mut installs = Vec::new();
    let backend = PODS[2].1;
    // Not measured: the first connects of a fresh namespace pay for neighbour entries, page
    // faults and a cold cache.
    bed.client("sluice-client", backend, 2, BACKEND_PORT, 1, false)?;
    bed.client("iptables-client", backend, 2, BACKEND_PORT, 1, false)?;
    for rep in 0..args.reps {
        tracing::info!("rep {}: direct", rep + 1);
        let result = bed.client("sluice-client", backend, 2, BACKEND_PORT, args.duration, false)?;
        runs.push(ConnectRun { services: 0, balancer: Balancer::Direct, result });
    }
    for &services in &args.services {
        let sluice = bed.install_sluice(services);
        let iptables = bed.install_iptables(&args.iptables_restore, services);
        for (balancer, outcome) in [(Balancer::Sluice, &sluice), (Balancer::Iptables, &iptables)] {
            match outcome {
                Ok(took) => tracing::info!("{services} Services into {}: {:.2} s", balancer.name(), took.as_secs_f64()),
                Err(e) => tracing::warn!("{services} Services into {}: {e:#}", balancer.name()),
            }
            installs.push(Install {
                services,
                balancer,
                outcome: outcome.as_ref().map(|d| *d).map_err(|e| format!("{e:#}")),
            });
        }
        for rep in 0..args.reps {
            // Interleaved, so that drift on a shared machine hits both alike.
            if sluice.is_ok() {
                tracing::info!("{services} Services, rep {}: sluice", rep + 1);
                let result = bed.client("sluice-client", FIRST_VIP, services, SERVICE_PORT, args.duration, true)?;
                runs.push(ConnectRun { services, balancer: Balancer::Sluice, result });
            }
            if iptables.is_ok() {
                tracing::info!("{services} Services, rep {}: iptables", rep + 1);
                let result = bed.client("iptables-client", FIRST_VIP, services, SERVICE_PORT, args.duration, false)?;
                runs.push(ConnectRun { services, balancer: Balancer::Iptables, result });
            }
        }
    }
    Ok((runs, installs))
}

/// `sluice agent --datapath ebpf` in a node namespace with a client and a server pod.
struct Agent {
    process: Pinned,
    sluice: PathBuf,
    state_dir: PathBuf,
}

impl Agent {
    fn status(&self) -> Result<serde_json::Value> {
        let output = Command::new(&self.sluice)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["status", "-o", "json"])
            .output()
            .context("running `sluice status`")?;
        if !output.status.success() {
            bail!("sluice status: {}", String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// Polls `sluice status` until `done` holds (bounded), failing early if the agent died.
    fn wait_for(&mut self, what: &str, done: impl Fn(&serde_json::Value) -> bool) -> Result<serde_json::Value> {
        let mut last = serde_json::Value::Null;
        for _ in 0..600 {
            self.process.ensure_running()?;
            if let Ok(status) = self.status() {
                if done(&status) {
                    return Ok(status);
                }
                last = status;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent never reached {what}; last status {last}")
    }
}

fn generation(status: &serde_json::Value) -> u64 {
    status["generation"].as_u64().unwrap_or(0)
}

/// An HTTP request from inside `netns` (a socket made there stays there).
fn request_from(netns: &str, target: SocketAddrV4, path: &str) -> Result<u16> {
    let _inside = NetnsGuard::enter(netns)?;
    Ok(procs::http_get(target.into(), path)?.0)
}

/// HTTP requests the proxy forwarded so far, from the agent's Hubble metrics (in the node
/// namespace): shows that the L7 runs really went through the proxy and the others did not.
fn proxied_requests(node_netns: &str) -> Result<f64> {
    const SERIES: &str = r#"hubble_flows_processed_total{type="L7",subtype="HTTP",verdict="FORWARDED"}"#;
    let _inside = NetnsGuard::enter(node_netns)?;
    let (status, body) = procs::http_get("127.0.0.1:9965".parse()?, "/metrics")?;
    if status != 200 {
        bail!("the agent's /metrics answered {status}");
    }
    Ok(String::from_utf8_lossy(&body)
        .lines()
        .find_map(|line| line.strip_prefix(SERIES).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0))
}

fn measure_http(args: &Args, sluice: &Path, nginx: &Path) -> Result<Vec<HttpRun>> {
    const TAG: &str = "bdh";
    let pods: Vec<(String, Ipv4Addr)> =
        [HTTP_CLIENT, HTTP_SERVER].iter().map(|(n, ip)| (n.to_string(), *ip)).collect();
    let node = Node::with_pods(TAG, &pods)?;
    let pins = TestDir::pins(TAG)?;
    let cgroup = TestDir::cgroup(TAG)?;
    let work = TestDir::scratch(TAG)?;
    let (config_dir, state_dir, nginx_dir) =
        (work.path.join("config"), work.path.join("state"), work.path.join("nginx"));
    for dir in [&config_dir, &nginx_dir.join("tmp")] {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(
        config_dir.join("running.yaml"),
        http::running_manifests(&[HTTP_CLIENT, HTTP_SERVER], NODE_IP),
    )?;
    let conf = nginx_dir.join("nginx.conf");
    std::fs::write(&conf, http::nginx_conf(&nginx_dir, HTTP_SERVER.1))?;
    let server_ns = node.pod(HTTP_SERVER.0)?.netns.clone();
    let client_ns = node.pod(HTTP_CLIENT.0)?.netns.clone();
    let in_netns = |netns: &str, argv: &[String]| -> Vec<String> {
        ["ip", "netns", "exec", netns].iter().map(|s| s.to_string()).chain(argv.iter().cloned()).collect()
    };
    let nginx_argv = [nginx.display().to_string(), "-p".into(), nginx_dir.display().to_string(), "-c".into(), conf.display().to_string()];
    let _nginx = Pinned::spawn("nginx", LOAD_CORE, &in_netns(&server_ns, &nginx_argv), &work.path)?;
    let agent_argv: Vec<String> = [
        sluice.display().to_string(),
        "--state-dir".into(), state_dir.display().to_string(),
        "agent".into(),
        "--config-dir".into(), config_dir.display().to_string(),
        "--node".into(), http::NODE_NAME.into(),
        "--datapath".into(), "ebpf".into(),
        "--cgroup".into(), cgroup.path.display().to_string(),
        "--bpffs".into(), pins.path.display().to_string(),
        "--proxy-workers".into(), "1".into(),
        "--metrics-address".into(), "127.0.0.1:9965".into(),
        "--cleanup-on-exit".into(),
    ]
    .into();
    let mut agent = Agent {
        process: Pinned::spawn("sluice-agent", AGENT_CORE, &in_netns(&node.netns, &agent_argv), &work.path)?,
        sluice: sluice.to_path_buf(),
        state_dir,
    };
    agent.wait_for("both pods in the kernel", |s| s["kernel"]["endpoints"].as_u64() == Some(2))?;
    let server = SocketAddrV4::new(HTTP_SERVER.1, SERVER_PORT);
    let script = work.path.join("report.lua");
    std::fs::write(&script, measure::WRK_SCRIPT)?;
    let wrk = |seconds: u64| -> Result<measure::Sample> {
        let settings = measure::Settings { duration: Duration::from_secs(seconds), paced_rate: 0 };
        let argv = measure::command(measure::Workload::H1Small, &format!("http://{server}{PATH}"), settings, &work.path);
        let output = Command::new("ip")
            .args(["netns", "exec", &client_ns, "taskset", "-c", &LOAD_CORE.to_string()])
            .args(&argv)
            .output()
            .context("running wrk")?;
        Ok(measure::parse_wrk(&String::from_utf8_lossy(&output.stdout))?)
    };
    let policy_file = config_dir.join("policy.yaml");
    let mut runs = Vec::new();
    for rep in 0..args.reps {
        for policy in Policy::ALL {
            let before = generation(&agent.status()?);
            match policy.manifest() {
                Some(text) => {
                    let temp = config_dir.join(".policy.yaml.tmp");
                    std::fs::write(&temp, text)?;
                    std::fs::rename(&temp, &policy_file)?;
                }
                None if policy_file.exists() => std::fs::remove_file(&policy_file)?,
                None => {}
            }
            if rep > 0 || policy != Policy::None {
                let status = agent.wait_for("the new policy", |s| generation(s) > before)?;
                if status["errors"].as_array().is_some_and(|e| !e.is_empty()) {
                    bail!("the agent refused the {policy}: {}", status["errors"]);
                }
            }
            // The policy is really in force before it is measured: the load's request passes,
            // and under the L7 policy the proxy refuses another path.
            let status = request_from(&client_ns, server, PATH)?;
            if status != 200 {
                bail!("{policy}: GET {PATH} from the client pod answered {status}");
            }
            let denied = request_from(&client_ns, server, DENIED_PATH)?;
            let expected = if policy == Policy::L7 { 403 } else { 200 };
            if denied != expected {
                bail!("{policy}: GET {DENIED_PATH} answered {denied}, expected {expected}");
            }
            wrk(1)?;
            tracing::info!("rep {}: {policy}", rep + 1);
            let proxied_before = proxied_requests(&node.netns)?;
            let sample = wrk(args.duration)?;
            let proxied = proxied_requests(&node.netns)? - proxied_before;
            runs.push(HttpRun { policy, sample, proxied_per_request: proxied / (sample.requests_per_second * args.duration as f64) });
        }
    }
    agent.process.ensure_running()?;
    Ok(runs)
}

fn context(args: &Args, load_before: &str, http_tools: Option<&(PathBuf, PathBuf)>) -> ReportContext {
    let iptables = setup::find_program(&args.iptables_restore)
        .map_or_else(|| "not found".to_string(), |p| setup::version_line(&p, &["--version"]));
    let mut versions = vec![
        ("sluice".into(), format!("{} (release build)", revision(&["ebpf", "agent", "proxy"]))),
        (args.iptables_restore.clone(), iptables),
    ];
    if let Some((_, nginx)) = http_tools {
        versions.push(("nginx".into(), setup::version_line(nginx, &["-v"])));
        if let Some(wrk) = setup::find_program("wrk") {
            versions.push(("wrk".into(), setup::version_line(&wrk, &["-v"])));
        }
    }
    ReportContext {
        date: now_utc(),
        machine: machine_rows(load_before),
        versions,
        settings: settings(args),
        commands: Vec::new(),
    }
}

/// What was held fixed, for the benches that ran.
fn settings(args: &Args) -> Vec<String> {
    let mut settings = vec![format!("{} s per run, {} repetitions, the compared cases interleaved within each repetition", args.duration, args.reps)];
    if args.benches.contains(&Bench::Connect) {
        settings.extend([
                "Services: ClusterIP 10.96.0.0 + i, port 80/TCP, each with the same 2 backends (198.18.0.20-21:8080, one accept+close thread each, in their own pod namespaces)".to_string(),
                "client: one process, one connection at a time, connect() to a VIP picked uniformly at random per connect, then close with SO_LINGER 0 (RST, no TIME_WAIT)".to_string(),
                "sluice: the datapath loaded with sluice-ebpf's `Datapath::load` + `attach_cgroup` + `apply(BpfState { services })` (not through the agent; the agent applies the same BpfState), client in the test cgroup; no iptables rules in its namespace".to_string(),
                "iptables: `*nat` OUTPUT -> KUBE-SERVICES, one `-d VIP -p tcp --dport 80 -j DNAT --to-destination 198.18.0.20-198.18.0.21:8080` rule per Service, loaded with one iptables-restore in the client's own namespace; client not in the cgroup".to_string(),
        ]);
    }
    if args.benches.contains(&Bench::Http) {
        settings.extend([
                format!("HTTP: `sluice agent --datapath ebpf --proxy-workers 1` in the node namespace pinned to core {AGENT_CORE}; nginx (1 process) in the server pod and wrk (1 thread, {} connections, GET {PATH}) in the client pod on core {LOAD_CORE}; policies none -> L3/L4 -> L7 interleaved within each repetition, each checked first (GET {PATH} 200; GET {DENIED_PATH} 403 only under L7), then a 1 s warm-up", measure::CONNECTIONS),
                "L3/L4 policy: CNP on app=server, ingress from app=client to 80/TCP; L7 policy: the same plus `rules.http: [{method: GET, path: /small}]` (the kernel redirects to the proxy's transparent listener)".to_string(),
        ]);
    }
    settings
}

fn commands(args: &Args) -> String {
    let services: Vec<String> = args.services.iter().map(u32::to_string).collect();
    format!(
        "\n#### Exact commands\n\n```sh\ncargo run --release -p sluice-benches --bin datapath -- --benches {} --services {} --reps {} --duration {} --iptables-restore {} --readme benches/README.md\n# inside, per connect run: ip netns exec <client pod> datapath connect-client --first <10.96.0.0 | 198.18.0.20> --count <N | 2> --port <80 | 8080> --seconds {} [--cgroup <test cgroup>]\n# HTTP: ip netns exec <node> taskset -c {AGENT_CORE} sluice --state-dir $STATE agent --config-dir $CONFIG --node {} --datapath ebpf --cgroup $CGROUP --bpffs $PINS --proxy-workers 1 --metrics-address 127.0.0.1:9965 --cleanup-on-exit\n# HTTP: ip netns exec <server pod> taskset -c {LOAD_CORE} nginx -p $NGINX -c $NGINX/nginx.conf\n# HTTP: ip netns exec <client pod> taskset -c {LOAD_CORE} wrk -t1 -c{} -d{}s -s $SCRATCH/report.lua http://{}:{SERVER_PORT}{PATH}\n```\n",
        args.benches.iter().map(|b| if *b == Bench::Connect { "connect" } else { "http" }).collect::<Vec<_>>().join(","),
        services.join(","),
        args.reps,
        args.duration,
        args.iptables_restore,
        args.duration,
        http::NODE_NAME,
        measure::CONNECTIONS,
        args.duration,
        HTTP_SERVER.1,
    )
}
