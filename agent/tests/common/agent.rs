//! Test harness of the agent on a real kernel: a node from sluice-ebpf's testing harness (node
//! namespace, pods on veths, a pin dir and a test cgroup, all removed on drop) with the agent's
//! config dir, `sluice agent --datapath ebpf` running in the node namespace, and HTTP clients in
//! pods that join the test cgroup (so Service addresses are balanced by the kernel).

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sluice_ebpf::testing::{http_request, run, HttpClient, Node, Pod, Reply, TestDir};

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
pub const NODE: &str = "node-a";

/// A node namespace with pods, and the paths its agent uses.
pub struct TestNode {
    pub net: Node,
    /// `--bpffs` of the agent.
    pub pins: TestDir,
    /// `--cgroup` of the agent; pod clients join it.
    pub cgroup: TestDir,
    /// Config dir, state dir and logs.
    work: TestDir,
}

impl TestNode {
    /// A node with one pod per `(name, ip)`; `tag` names it (see sluice_ebpf::testing).
    pub fn new(tag: &str, pods: &[(String, Ipv4Addr)]) -> Result<Self> {
        let node = TestNode {
            net: Node::with_pods(tag, pods)?,
            pins: TestDir::pins(tag)?,
            cgroup: TestDir::cgroup(tag)?,
            work: TestDir::scratch(tag)?,
        };
        fs::create_dir_all(node.config_dir())?;
        Ok(node)
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.net.pod(name)
    }

    pub fn config_dir(&self) -> PathBuf {
        self.work.path.as_path().join("config")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.work.path.as_path().join("state")
    }

    /// Writes (or replaces) a manifest in the config dir, atomically.
    pub fn write_config(&self, file: &str, text: &str) -> Result<()> {
        let temp = self.work.path.as_path().join(format!(".{file}.tmp"));
        fs::write(&temp, text)?;
        fs::rename(&temp, self.config_dir().join(file))?;
        Ok(())
    }

    /// An HTTP connection from `pod` (in the test cgroup) to `target`, kept open between requests.
    pub fn client(&self, pod: &str, target: SocketAddrV4) -> Result<HttpClient> {
        HttpClient::connect(&self.pod(pod)?.netns, Some(&self.cgroup.path), target, 3)
    }

    /// One request on a new connection from `pod` (in the test cgroup).
    pub fn request(&self, pod: &str, target: SocketAddrV4, method: &str, path: &str) -> Result<Reply> {
        http_request(&self.pod(pod)?.netns, Some(&self.cgroup.path), target, method, path)
    }
}

/// `sluice agent --datapath ebpf` in the node namespace.
pub struct AgentProcess {
    child: Child,
    state_dir: PathBuf,
    log: PathBuf,
}

impl AgentProcess {
    /// Starts the agent and waits until it applied its first generation.
    pub fn start(node: &TestNode, extra: &[&str]) -> Result<Self> {
        let log = node.work.path.as_path().join(format!("agent-{}.log", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos()));
        let config_dir = node.config_dir().display().to_string();
        let state_dir = node.state_dir().display().to_string();
        let pins = node.pins.path.display().to_string();
        let cgroup = node.cgroup.path.display().to_string();
        let mut args = vec![
            "netns", "exec", node.net.netns.as_str(), SLUICE, "--state-dir", &state_dir, "agent", "--config-dir", &config_dir,
            "--node", NODE, "--datapath", "ebpf", "--cgroup", &cgroup, "--bpffs", &pins, "--proxy-workers", "1",
            "--metrics-address", "127.0.0.1:9965",
        ];
        args.extend_from_slice(extra);
        let child = Command::new("ip")
            .args(&args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log)?)
            .spawn()
            .context("starting sluice agent")?;
        let agent = AgentProcess { child, state_dir: node.state_dir(), log };
        agent.wait_for(|status| status["generation"].as_u64().is_some_and(|g| g > 0))?;
        Ok(agent)
    }

    /// `sluice <args> -o json` against this agent's socket.
    pub fn cli_json(&self, args: &[&str]) -> Result<Value> {
        let output = Command::new(SLUICE)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(args)
            .args(["-o", "json"])
            .output()
            .context("running the sluice CLI")?;
        if !output.status.success() {
            bail!("sluice {args:?} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(serde_json::from_slice(&output.stdout)?)
    }

    /// `sluice observe <args> -o json`: one record per line.
    pub fn observe(&self, args: &[&str]) -> Result<Vec<Value>> {
        let output = Command::new(SLUICE)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("observe")
            .args(args)
            .args(["-o", "json"])
            .output()?;
        if !output.status.success() {
            bail!("sluice observe failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        String::from_utf8_lossy(&output.stdout).lines().map(|l| Ok(serde_json::from_str(l)?)).collect()
    }

    /// `observe` until at least `count` flows match (bounded): the proxy's flows reach the log
    /// in batches, up to the agent's `FLOW_LAG_MAX` (20 ms) after their request.
    pub fn observe_at_least(&self, count: usize, args: &[&str]) -> Result<Vec<Value>> {
        let mut flows = Vec::new();
        for _ in 0..100 {
            flows = self.observe(args)?;
            if flows.len() >= count {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(flows)
    }

    /// Polls `sluice status` until `done` holds (bounded).
    pub fn wait_for(&self, done: impl Fn(&Value) -> bool) -> Result<Value> {
        let mut last = Value::Null;
        for _ in 0..300 {
            if let Ok(status) = self.cli_json(&["status"]) {
                if done(&status) {
                    return Ok(status);
                }
                last = status;
            }
            if let Ok(Some(exit)) = self.child_exit() {
                bail!("the agent exited ({exit}):\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent never reached the expected state; last status {last}\nlog:\n{}", self.log_text())
    }

    fn child_exit(&self) -> Result<Option<std::process::ExitStatus>> {
        // `try_wait` needs `&mut`; /proc tells whether it still runs without reaping it.
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let state = stat.rsplit(") ").next().and_then(|rest| rest.chars().next());
        Ok(match state {
            None | Some('Z') => Some(std::process::ExitStatus::default()),
            Some(_) => None,
        })
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for the exit (bounded).
    pub fn terminate(mut self) -> Result<std::process::ExitStatus> {
        run("kill", &["-TERM", &self.child.id().to_string()])?;
        for _ in 0..200 {
            if let Some(exit) = self.child.try_wait()? {
                return Ok(exit);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("the agent did not exit after SIGTERM:\n{}", self.log_text())
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
