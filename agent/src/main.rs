//! `sluice`: the node agent and its CLI (sources -> model -> compile -> datapath).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Agent(args) => {
            if args.datapath == Datapath::Ebpf {
                anyhow::bail!(
                    "--datapath ebpf: the eBPF datapath is not built yet (issue #3); run with --datapath none (gateway mode)"
                );
            }
            anyhow::bail!("agent runtime lands with the proxy runtime API")
        }
        Command::Demo => anyhow::bail!("demo lands with the agent runtime"),
    }
}
