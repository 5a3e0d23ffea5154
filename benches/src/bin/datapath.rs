//! `datapath`: the kernel datapath benchmarks of issue #3 in one run (see benches/README.md):
//! connect() rate through sluice's socket LB and through iptables DNAT with 1 to 100k Services,
//! inside a node namespace with pod namespaces that it creates and removes.

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
use sluice_benches::datapath::table::{self, Balancer, ConnectRun, Install};
use sluice_benches::report::{splice, Context as ReportContext};
use sluice_benches::setup;
use sluice_ebpf::testing::{run, NetnsGuard, Node, Pod, TestDir};
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

#[derive(Parser)]
#[command(about = "Kernel datapath benchmarks: connect() through sluice's socket LB vs iptables DNAT")]
struct Args {
    #[command(subcommand)]
    command: Option<Internal>,
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
    ensure_iptables(&args.iptables_restore, args.no_install)?;
    let load_before = read_trimmed("/proc/loadavg");
    let started = Instant::now();
    let (runs, installs) = measure_connect(args)?;
    tracing::info!("measured in {:.0} s", started.elapsed().as_secs_f64());
    let mut section = table::render_context(&context(args, &load_before));
    section.push_str(&table::render_connect(&runs, &installs));
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

fn read_trimmed(path: &str) -> String {
    std::fs::read_to_string(path).map_or_else(|_| "?".to_string(), |s| s.trim().to_string())
}

fn cpu_model() -> String {
    read_trimmed("/proc/cpuinfo")
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')).map(|(_, v)| v.trim().to_string()))
        .unwrap_or_else(|| "?".to_string())
}

fn git_revision() -> String {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let git = |args: &[&str]| {
        Command::new("git")
            .current_dir(&workspace)
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    if git(&["status", "--porcelain", "--", "ebpf"]).is_empty() {
        head
    } else {
        format!("{head} + uncommitted ebpf changes")
    }
}

fn context(args: &Args, load_before: &str) -> ReportContext {
    let iptables = setup::find_program(&args.iptables_restore)
        .map_or_else(|| "not found".to_string(), |p| setup::version_line(&p, &["--version"]));
    ReportContext {
        date: chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now()).format("%Y-%m-%d %H:%M UTC").to_string(),
        machine: vec![
            ("nproc".into(), std::thread::available_parallelism().map_or(0, |n| n.get()).to_string()),
            ("CPU".into(), cpu_model()),
            ("kernel".into(), read_trimmed("/proc/sys/kernel/osrelease")),
            ("loadavg before".into(), load_before.to_string()),
            ("loadavg after".into(), read_trimmed("/proc/loadavg")),
        ],
        versions: vec![
            ("sluice".into(), format!("{} (sluice-ebpf Datapath API, release build)", git_revision())),
            (args.iptables_restore.clone(), iptables),
        ],
        settings: vec![
            format!("{} s per client run, {} repetitions, sluice and iptables interleaved within each repetition", args.duration, args.reps),
            "Services: ClusterIP 10.96.0.0 + i, port 80/TCP, each with the same 2 backends (198.18.0.20-21:8080, one accept+close thread each, in their own pod namespaces)".to_string(),
            "client: one process, one connection at a time, connect() to a VIP picked uniformly at random per connect, then close with SO_LINGER 0 (RST, no TIME_WAIT)".to_string(),
            "sluice: the datapath loaded with sluice-ebpf's `Datapath::load` + `attach_cgroup` + `apply(BpfState { services })` (not through the agent; the agent applies the same BpfState), client in the test cgroup; no iptables rules in its namespace".to_string(),
            "iptables: `*nat` OUTPUT -> KUBE-SERVICES, one `-d VIP -p tcp --dport 80 -j DNAT --to-destination 198.18.0.20-198.18.0.21:8080` rule per Service, loaded with one iptables-restore in the client's own namespace; client not in the cgroup".to_string(),
        ],
        commands: Vec::new(),
    }
}

fn commands(args: &Args) -> String {
    let services: Vec<String> = args.services.iter().map(u32::to_string).collect();
    format!(
        "\n#### Exact commands\n\n```sh\ncargo run --release -p sluice-benches --bin datapath -- --services {} --reps {} --duration {} --iptables-restore {} --readme benches/README.md\n# inside, per run: ip netns exec <client pod> datapath connect-client --first <10.96.0.0 | 198.18.0.20> --count <N | 2> --port <80 | 8080> --seconds {} [--cgroup <test cgroup>]\n```\n",
        services.join(","),
        args.reps,
        args.duration,
        args.iptables_restore,
        args.duration,
    )
}
