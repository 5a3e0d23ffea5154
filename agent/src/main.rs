//! `sluice`: the node agent and its CLI (sources -> model -> compile -> datapath).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use sluice_agent::agent::{self, AgentConfig};
use sluice_agent::cli::{self, ClientCommand};

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
    /// `none`: gateway mode, clients connect to the proxy's listeners directly.
    #[arg(long, value_enum, default_value_t = Datapath::None)]
    pub datapath: Datapath,
    /// Proxy worker threads (default: one per core).
    #[arg(long)]
    pub proxy_workers: Option<usize>,
    /// Prometheus metrics listen address.
    #[arg(long, default_value = "127.0.0.1:9965")]
    pub metrics_address: SocketAddr,
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
            if args.datapath == Datapath::Ebpf {
                anyhow::bail!(
                    "--datapath ebpf: the eBPF datapath is not built yet (issue #3); run with --datapath none (gateway mode)"
                );
            }
            let workers = args
                .proxy_workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            runtime()?.block_on(agent::run(AgentConfig {
                config_dir: args.config_dir,
                node: args.node,
                state_dir: cli.state_dir,
                proxy_workers: workers,
                metrics_address: Some(args.metrics_address),
                serve_api: true,
            }))?;
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
