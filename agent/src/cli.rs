//! CLI client: `sluice status|endpoint|identity|policy|service|observe` -> local API -> rendered output.

use std::io::{ErrorKind, Write as _};
use std::path::Path;

use anyhow::bail;
use clap::{Args, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::api::{self, FlowQuery};
use crate::flows::{FilterArgs, FlowFilter, FlowRecord};
use crate::render;
use crate::view::{EndpointView, IdentityView, PolicyView, ServiceView, StatusView};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// The API's JSON, pretty-printed.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct OutputArgs {
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    pub output: Output,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ObserveOutput {
    /// One line per flow, like `hubble observe`.
    Compact,
    /// One JSON record per line.
    Json,
    /// Aligned columns (needs the whole set, so not with --follow).
    Table,
}

#[derive(Debug, Clone, Args)]
pub struct ObserveArgs {
    #[arg(short = 'o', long = "output", value_enum, default_value_t = ObserveOutput::Compact)]
    pub output: ObserveOutput,
    /// Keep printing new flows as they happen.
    #[arg(short = 'f', long)]
    pub follow: bool,
    /// Start with the newest N matching flows (default 20, or 0 with --follow).
    #[arg(long, value_name = "N")]
    pub last: Option<usize>,
    #[command(flatten)]
    pub filters: FilterArgs,
}

#[derive(Debug, Clone, Subcommand)]
pub enum ListCommand {
    /// List them.
    #[command(visible_alias = "ls")]
    List(OutputArgs),
}

#[derive(Debug, Clone, Subcommand)]
pub enum PolicyCommand {
    /// Show loaded policies, what they select and their rules.
    Get {
        /// Only this policy: `namespace/name`, or `name` for a clusterwide one or any namespace.
        name: Option<String>,
        #[command(flatten)]
        output: OutputArgs,
    },
}

/// The commands that talk to a running agent over `<state-dir>/api.sock`.
#[derive(Debug, Clone, Subcommand)]
pub enum ClientCommand {
    /// Show the agent's node, configuration, proxy and flow counters.
    Status(OutputArgs),
    /// Endpoints (pods) the agent knows, with identity and policy enforcement.
    Endpoint {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Security identities and the labels and endpoints behind them.
    Identity {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Network policies as loaded.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Frontends the proxy serves (Service ports and CiliumEnvoyConfig listeners) and their backends.
    Service {
        #[command(subcommand)]
        command: ListCommand,
    },
    /// Show flows through the proxy, like `hubble observe`.
    Observe(Box<ObserveArgs>),
}

pub async fn run_client(cmd: ClientCommand, state_dir: &Path) -> anyhow::Result<()> {
    let socket = api::socket_path(state_dir);
    match cmd {
        ClientCommand::Status(args) => {
            show::<StatusView>(&socket, "/v1/status", args.output, render::render_status).await
        }
        ClientCommand::Endpoint {
            command: ListCommand::List(args),
        } => {
            show::<Vec<EndpointView>>(&socket, "/v1/endpoints", args.output, |endpoints| {
                render::render_endpoints(endpoints)
            })
            .await
        }
        ClientCommand::Identity {
            command: ListCommand::List(args),
        } => {
            show::<Vec<IdentityView>>(&socket, "/v1/identities", args.output, |identities| {
                render::render_identities(identities)
            })
            .await
        }
        ClientCommand::Service {
            command: ListCommand::List(args),
        } => {
            show::<Vec<ServiceView>>(&socket, "/v1/services", args.output, |services| {
                render::render_services(services)
            })
            .await
        }
        ClientCommand::Policy {
            command: PolicyCommand::Get { name, output },
        } => {
            let policies: Vec<PolicyView> = api::get_json(&socket, "/v1/policies").await?;
            let selected = select_policies(policies, name.as_deref())?;
            print_view(&selected, output.output, |policies| {
                render::render_policies(policies)
            })
        }
        ClientCommand::Observe(args) => observe(&socket, *args).await,
    }
}

async fn show<T: DeserializeOwned + Serialize>(
    socket: &Path,
    path: &str,
    output: Output,
    render: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    let value: T = api::get_json(socket, path).await?;
    print_view(&value, output, render)
}

fn print_view<T: Serialize>(
    value: &T,
    output: Output,
    render: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    let text = match output {
        Output::Table => render(value),
        Output::Json => serde_json::to_string_pretty(value)? + "\n",
    };
    write_stdout(&text)?;
    Ok(())
}

/// `namespace/name` picks one namespaced policy; a bare `name` matches it in any namespace (and
/// clusterwide ones).
fn select_policies(
    policies: Vec<PolicyView>,
    name: Option<&str>,
) -> anyhow::Result<Vec<PolicyView>> {
    let Some(wanted) = name else {
        return Ok(policies);
    };
    let (namespace, policy_name) = match wanted.split_once('/') {
        Some((namespace, policy_name)) => (Some(namespace), policy_name),
        None => (None, wanted),
    };
    let selected: Vec<PolicyView> = policies
        .into_iter()
        .filter(|policy| {
            policy.name == policy_name
                && namespace.is_none_or(|namespace| policy.namespace.as_deref() == Some(namespace))
        })
        .collect();
    if selected.is_empty() {
        bail!("no policy named {wanted:?} is loaded (see `sluice policy get`)");
    }
    Ok(selected)
}

async fn observe(socket: &Path, args: ObserveArgs) -> anyhow::Result<()> {
    // Checked here as well as by the agent so a typo fails before any connection is made.
    FlowFilter::parse(&args.filters)?;
    if args.follow && args.output == ObserveOutput::Table {
        bail!("-o table aligns the whole result and cannot follow; use -o compact or -o json with --follow");
    }
    let query = FlowQuery {
        last: args.last,
        follow: args.follow,
        filters: args.filters,
    };
    let mut stream = api::open_flows(socket, &query).await?;
    let mut table_rows = Vec::new();
    while let Some(record) = stream.next().await? {
        let line = match args.output {
            ObserveOutput::Table => {
                table_rows.push(record);
                continue;
            }
            ObserveOutput::Compact => render::render_flow_compact(&record) + "\n",
            ObserveOutput::Json => flow_json_line(&record)?,
        };
        if let Err(err) = write_stdout(&line) {
            // The reader (`| head`) is gone: that ends observing, it is not a failure.
            if err.kind() == ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(err.into());
        }
    }
    if args.output == ObserveOutput::Table {
        write_stdout(&render::render_flows_table(&table_rows))?;
    }
    Ok(())
}

fn flow_json_line(record: &FlowRecord) -> anyhow::Result<String> {
    Ok(serde_json::to_string(record)? + "\n")
}

fn write_stdout(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    stdout.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    /// The shape main.rs gives the CLI: a global `--state-dir` and these commands flattened in.
    #[derive(Debug, Parser)]
    struct Cli {
        #[arg(long, global = true, default_value = "/run/sluice")]
        state_dir: std::path::PathBuf,
        #[command(subcommand)]
        command: ClientCommand,
    }

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("sluice").chain(args.iter().copied()))
    }

    #[test]
    fn the_documented_commands_parse() -> anyhow::Result<()> {
        assert!(matches!(
            parse(&["status"])?.command,
            ClientCommand::Status(OutputArgs {
                output: Output::Table
            })
        ));
        assert!(matches!(
            parse(&["endpoint", "list", "-o", "json"])?.command,
            ClientCommand::Endpoint {
                command: ListCommand::List(OutputArgs {
                    output: Output::Json
                })
            }
        ));
        assert!(matches!(
            parse(&["identity", "list"])?.command,
            ClientCommand::Identity { .. }
        ));
        assert!(matches!(
            parse(&["service", "ls"])?.command,
            ClientCommand::Service { .. }
        ));
        match parse(&["policy", "get", "default/rule1", "--state-dir", "/tmp/x"])? {
            Cli {
                state_dir,
                command:
                    ClientCommand::Policy {
                        command: PolicyCommand::Get { name, .. },
                    },
            } => {
                assert_eq!(name.as_deref(), Some("default/rule1"));
                assert_eq!(state_dir, Path::new("/tmp/x"));
            }
            other => bail!("parsed as {other:?}"),
        }
        Ok(())
    }

    #[test]
    fn observe_takes_hubbles_flags() -> anyhow::Result<()> {
        let cli = parse(&[
            "observe",
            "--pod",
            "deathstar",
            "--protocol",
            "http",
            "--verdict",
            "DROPPED",
            "--verdict",
            "FORWARDED",
            "--http-status",
            "4+",
            "--http-method",
            "PUT",
            "--http-path",
            "^/v1/",
            "--from-pod",
            "default/tie",
            "--to-pod",
            "default/deathstar",
            "--identity",
            "world",
            "--from-identity",
            "257",
            "--to-identity",
            "258",
            "-n",
            "default",
            "--namespace",
            "kube-system",
            "--port",
            "80",
            "-t",
            "l7",
            "--type",
            "drop",
            "-f",
            "--last",
            "5",
            "-o",
            "json",
        ])?;
        let ClientCommand::Observe(args) = cli.command else {
            bail!("parsed as {:?}", cli.command)
        };
        assert!(args.follow);
        assert_eq!(args.last, Some(5));
        assert_eq!(args.output, ObserveOutput::Json);
        assert_eq!(args.filters.verdict, ["DROPPED", "FORWARDED"]);
        assert_eq!(args.filters.pod, ["deathstar"]);
        assert_eq!(args.filters.from_pod, ["default/tie"]);
        assert_eq!(args.filters.to_pod, ["default/deathstar"]);
        assert_eq!(args.filters.http_status, ["4+"]);
        assert_eq!(args.filters.http_path, ["^/v1/"]);
        assert_eq!(args.filters.identity, ["world"]);
        assert_eq!(args.filters.from_identity, ["257"]);
        assert_eq!(args.filters.to_identity, ["258"]);
        assert_eq!(args.filters.namespace, ["default", "kube-system"]);
        assert_eq!(args.filters.port, ["80"]);
        assert_eq!(args.filters.event_type, ["l7", "drop"]);
        let defaults = parse(&["observe"])?;
        let ClientCommand::Observe(args) = defaults.command else {
            bail!("parsed as {:?}", defaults.command)
        };
        assert_eq!(
            (args.output, args.follow, args.last),
            (ObserveOutput::Compact, false, None)
        );
        assert!(parse(&["observe", "-o", "yaml"]).is_err());
        Ok(())
    }

    fn policy(namespace: Option<&str>, name: &str) -> PolicyView {
        PolicyView {
            kernel: Vec::new(),
            kind: if namespace.is_some() {
                "CiliumNetworkPolicy"
            } else {
                "CiliumClusterwideNetworkPolicy"
            }
            .to_owned(),
            namespace: namespace.map(str::to_owned),
            name: name.to_owned(),
            file: "p.yaml".to_owned(),
            rules: vec![],
            selects: vec![],
        }
    }

    #[test]
    fn policy_get_selects_by_name() -> anyhow::Result<()> {
        let loaded = vec![
            policy(Some("default"), "rule1"),
            policy(Some("other"), "rule1"),
            policy(None, "lockdown"),
        ];
        assert_eq!(select_policies(loaded.clone(), None)?.len(), 3);
        let one = select_policies(loaded.clone(), Some("other/rule1"))?;
        assert_eq!(
            one.iter()
                .map(|p| p.namespace.as_deref())
                .collect::<Vec<_>>(),
            [Some("other")]
        );
        assert_eq!(select_policies(loaded.clone(), Some("rule1"))?.len(), 2);
        assert_eq!(select_policies(loaded.clone(), Some("lockdown"))?.len(), 1);
        let missing = select_policies(loaded, Some("default/nope")).expect_err("absent");
        assert_eq!(
            missing.to_string(),
            "no policy named \"default/nope\" is loaded (see `sluice policy get`)"
        );
        Ok(())
    }

    #[tokio::test]
    async fn observe_rejects_bad_filters_and_table_follow_before_connecting() {
        let nowhere = Path::new("/nonexistent-sluice-state");
        let bad = ObserveArgs {
            output: ObserveOutput::Compact,
            follow: false,
            last: None,
            filters: FilterArgs {
                verdict: vec!["MAYBE".to_owned()],
                ..Default::default()
            },
        };
        let err = observe(&api::socket_path(nowhere), bad)
            .await
            .expect_err("bad verdict");
        assert!(err.to_string().starts_with("--verdict \"MAYBE\""), "{err}");
        let table_follow = ObserveArgs {
            output: ObserveOutput::Table,
            follow: true,
            last: None,
            filters: FilterArgs::default(),
        };
        let err = observe(&api::socket_path(nowhere), table_follow)
            .await
            .expect_err("table follow");
        assert!(err.to_string().starts_with("-o table aligns"), "{err}");
        let missing = run_client(
            ClientCommand::Status(OutputArgs {
                output: Output::Json,
            }),
            nowhere,
        )
        .await
        .expect_err("no agent");
        assert!(
            missing
                .to_string()
                .starts_with("no agent at /nonexistent-sluice-state/api.sock"),
            "{missing}"
        );
    }
}
