//! `sluice`: the node agent and its CLI (sources -> model -> compile -> datapath).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use sluice_agent::agent::{self, AgentConfig, AgentDatapath};
use sluice_agent::cli::{self, ClientCommand};
use sluice_agent::kernel::{self, KernelConfig};

// glibc malloc was ~10% of the proxy core under load (per-request headers, bodies, flow
// events); mimalloc's thread-local free lists cut that (benches/README.md, profile section).
// Its `no_thp` build keeps transparent huge pages off, which otherwise doubled idle RSS.
#[global_allocator]
static ALLOCATOR: sluice_allocator::Allocator = sluice_allocator::Allocator;

#[derive(Debug, Parser)]
#[command(name = "sluice", version, about = "Sidecarless service-mesh data plane and L7 gateway")]
struct Cli {
    /// Where the agent keeps its state and its API socket (`<state-dir>/api.sock`).
    #[arg(long, global = true, env = "SLUICE_STATE_DIR", default_value = "/run/sluice")]
    state_dir: PathBuf,
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a node: watch the config dir, compile, and drive the datapath and the proxy.
    Agent(AgentArgs),
    /// Run the Star Wars demo in gateway mode on loopback and print what happened.
    Demo,
    /// Detach the eBPF programs a stopped agent left attached and remove its pins.
    Cleanup(CleanupArgs),
    #[command(flatten)]
    Client(ClientCommand),
}

#[derive(Debug, Clone, clap::Args)]
pub struct AgentArgs {
    /// Directory of Kubernetes/Cilium manifests (read recursively, watched for changes).
    #[arg(long)]
    pub config_dir: PathBuf,
    /// Name of this node (its Node object, if any, gives its labels and addresses).
    #[arg(long)]
    pub node: String,
    /// `ebpf`: kernel policy, socket load balancing and redirects to the proxy; `none`: gateway
    /// mode, clients connect to the proxy's listeners directly.
    #[arg(long, value_enum, default_value_t = Datapath::Ebpf)]
    pub datapath: Datapath,
    /// The cgroup v2 directory whose sockets get Service load balancing (required with
    /// `--datapath ebpf`; never the root of a hierarchy). Created when missing; cgroup2 is
    /// mounted on its parent when that is not a cgroup2 directory yet (only if it is empty).
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// Where maps and links are pinned (default `/sys/fs/bpf/sluice/<node>`); bpffs is mounted
    /// when missing. Pins survive the agent: a restart reuses them and keeps enforcing.
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// Port of the proxy's transparent listener on 127.0.0.1, where the kernel redirects flows
    /// that need L7 policy or a CiliumEnvoyConfig.
    #[arg(long, default_value_t = kernel::DEFAULT_PROXY_PORT)]
    pub proxy_port: u16,
    /// On exit, detach every program and remove the pins (by default they stay, and the node
    /// keeps enforcing the last state until the next agent starts).
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// Proxy worker threads (default: one per core).
    #[arg(long)]
    pub proxy_workers: Option<usize>,
    /// Prometheus metrics listen address.
    #[arg(long, default_value = "127.0.0.1:9965")]
    pub metrics_address: SocketAddr,
}

#[derive(Debug, Clone, clap::Args)]
pub struct CleanupArgs {
    /// The node whose default pin directory (`/sys/fs/bpf/sluice/<node>`) is cleaned.
    #[arg(long, required_unless_present = "bpffs")]
    pub node: Option<String>,
    /// The agent's `--bpffs`, when it was not the default.
    #[arg(long)]
    pub bpffs: Option<PathBuf>,
    /// The agent's `--cgroup`: its socket hooks are detached too.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Datapath {
    /// Gateway mode: no kernel datapath.
    None,
    /// eBPF socket-LB, TC policy and proxy redirects.
    Ebpf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// `default_level` applies unless `RUST_LOG` says otherwise.
fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo tells its own story on stdout; the agent's info logs would drown it.
    let default_level = if matches!(cli.command, Command::Demo) { "warn" } else { "info" };
    init_logging(cli.log_format, default_level);
    match run(cli) {
        Ok(code) => code,
        Err(error) => {
            // The chain names what failed and where (an address, a path); a backtrace would
            // bury it.
            eprintln!("Error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let runtime = || tokio::runtime::Runtime::new().context("starting the async runtime");
    match cli.command {
        Command::Agent(args) => {
            let datapath = match args.datapath {
                Datapath::None => AgentDatapath::Gateway,
                Datapath::Ebpf => {
                    let Some(cgroup) = args.cgroup else {
                        anyhow::bail!(
                            "--datapath ebpf needs --cgroup PATH: the cgroup v2 directory of the pods' processes (sluice never attaches to a hierarchy's root); or run gateway mode with --datapath none"
                        );
                    };
                    AgentDatapath::Kernel(KernelConfig {
                        pin_dir: args.bpffs.unwrap_or_else(|| kernel::default_pin_dir(&args.node)),
                        cgroup,
                        proxy_port: args.proxy_port,
                        cleanup_on_exit: args.cleanup_on_exit,
                    })
                }
            };
            let workers = args
                .proxy_workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            let config = AgentConfig {
                config_dir: args.config_dir,
                node: args.node,
                state_dir: cli.state_dir,
                proxy_workers: workers,
                metrics_address: Some(args.metrics_address),
                serve_api: true,
            };
            runtime()?.block_on(agent::run(config, datapath))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Cleanup(args) => {
            let pin_dir = match (args.bpffs, args.node) {
                (Some(pin_dir), _) => pin_dir,
                (None, Some(node)) => kernel::default_pin_dir(&node),
                (None, None) => anyhow::bail!("sluice cleanup needs --node or --bpffs"),
            };
            if kernel::cleanup_pinned(&pin_dir, args.cgroup.as_deref())? {
                println!("removed the eBPF datapath pinned under {}", pin_dir.display());
            } else {
                println!("nothing pinned under {}", pin_dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo => {
            // Before the runtime's threads exist: a private namespace is given to one thread only.
            let network = sluice_agent::demo::network::prepare()?;
            let passed = runtime()?.block_on(sluice_agent::demo::run(network))?;
            Ok(if passed { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Client(command) => {
            runtime()?.block_on(cli::run_client(command, &cli.state_dir))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
