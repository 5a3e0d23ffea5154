//! Test harness (root, real kernel): a node network namespace with pod namespaces joined by veth
//! pairs (the shape any routed CNI gives), `sluice agent --datapath ebpf` running in the node
//! namespace, HTTP servers and clients in pods, clients in the test's cgroup.
//!
//! Everything a test creates is named `sla-<tag>-<pid>`: namespaces, pin directory, cgroup. It
//! is removed in `Drop` (also on panic), and leftovers of earlier runs of the same test whose
//! process is gone are removed at start. Nothing leaves the test's namespaces: pods use
//! 198.18.0.0/15 and services 198.19.0.0/16, and the node namespace has no uplink.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;

pub const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");
const TEST_ROOT: &str = "/run/sluice-agent-tests";
pub const NODE: &str = "node-a";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);

/// Whether a kernel test can run here (root, `ip`, `python3`, bpffs). When it cannot it says so
/// loudly; with `CI=true` a skip is a failure.
pub fn privileged(test: &str) -> bool {
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_owned())
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("`ip` (iproute2) is not installed".to_owned())
    } else if Command::new("python3").arg("-V").output().is_err() {
        Some("python3 (the pods' clients and servers) is not installed".to_owned())
    } else if let Err(e) = mounts() {
        Some(format!("cannot mount bpffs/cgroup2: {e:#}"))
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: needs root and BPF but {reason}; CI=true does not allow skipping")
        }
        Some(reason) => {
            // Straight to the terminal: cargo captures a passing test's output.
            let line = format!("\n!!!!! SKIPPED {test}: needs root and BPF but {reason} !!!!!\n");
            match fs::OpenOptions::new().write(true).open("/dev/tty") {
                Ok(mut tty) => drop(tty.write_all(line.as_bytes())),
                Err(_) => eprintln!("{line}"),
            }
            false
        }
    }
}

/// bpffs and cgroup2 under /run, mounted once per process. Not under /sys: `ip netns exec`
/// remounts /sys, so the agent and the pods would not see them there.
fn mounts() -> Result<&'static (PathBuf, PathBuf)> {
    static MOUNTS: OnceLock<std::result::Result<(PathBuf, PathBuf), String>> = OnceLock::new();
    let mounted = MOUNTS.get_or_init(|| {
        let bpffs = Path::new(TEST_ROOT).join("bpffs");
        let cgroup2 = Path::new(TEST_ROOT).join("cgroup2");
        sluice_ebpf::ensure_bpffs(&bpffs).map_err(|e| e.to_string())?;
        sluice_ebpf::ensure_cgroup2(&cgroup2).map_err(|e| e.to_string())?;
        Ok((bpffs, cgroup2))
    });
    match mounted {
        Ok(paths) => Ok(paths),
        Err(e) => bail!("{e}"),
    }
}

pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn pid_alive(pid: &str) -> bool {
    Path::new("/proc").join(pid).exists()
}

/// The pid in `sla-<tag>-<pid>[-...]`, for names of this test's runs.
fn run_pid<'a>(name: &'a str, prefix: &str) -> Option<&'a str> {
    name.strip_prefix(prefix)?.split('-').next()
}

/// Removes namespaces, pins and cgroups of earlier runs of `tag` whose process is gone.
fn remove_leftovers(tag: &str) -> Result<()> {
    let prefix = format!("sla-{tag}-");
    let (bpffs, cgroup2) = mounts()?;
    for line in run("ip", &["netns", "list"])?.lines() {
        let Some(name) = line.split_whitespace().next() else { continue };
        if run_pid(name, &prefix).is_some_and(|pid| !pid_alive(pid)) {
            run("ip", &["netns", "del", name])?;
        }
    }
    for root in [bpffs, cgroup2] {
        for entry in fs::read_dir(root)? {
            let path = entry?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
            if run_pid(&name, &prefix).is_some_and(|pid| !pid_alive(pid)) {
                if root == bpffs {
                    fs::remove_dir_all(&path)?;
                } else {
                    fs::remove_dir(&path)?;
                }
            }
        }
    }
    Ok(())
}

/// A pod: its namespace, address and host-side veth in the node namespace.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
}

/// A node namespace with pods, and the paths its agent uses.
pub struct TestNode {
    pub netns: String,
    pub pods: Vec<Pod>,
    /// `--bpffs` of the agent.
    pub pins: PathBuf,
    /// `--cgroup` of the agent; pod clients join it.
    pub cgroup: PathBuf,
    /// Config dir, state dir and logs.
    pub work: tempfile::TempDir,
}

impl TestNode {
    /// A node with one pod per `(name, ip)`, the node address `NODE_IP` on its loopback.
    pub fn new(tag: &str, pods: &[(String, Ipv4Addr)]) -> Result<Self> {
        remove_leftovers(tag)?;
        let name = format!("sla-{tag}-{}", std::process::id());
        let (bpffs, cgroup2) = mounts()?;
        let mut node = TestNode {
            netns: format!("{name}-node"),
            pods: Vec::new(),
            pins: bpffs.join(&name),
            cgroup: cgroup2.join(&name),
            work: tempfile::tempdir()?,
        };
        fs::create_dir_all(node.config_dir())?;
        let ns = node.netns.clone();
        run("ip", &["netns", "add", &ns])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &ns, "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        run("ip", &["netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for (index, (pod_name, ip)) in pods.iter().enumerate() {
            let pod = Pod {
                name: pod_name.clone(),
                netns: format!("{name}-p{index}"),
                ip: *ip,
                host_if: format!("lxc{index}"),
            };
            run("ip", &["netns", "add", &pod.netns])?;
            // Registered at once so that Drop removes it even if the setup below fails.
            node.pods.push(pod.clone());
            node.wire(&pod)?;
        }
        Ok(node)
    }

    fn wire(&self, pod: &Pod) -> Result<()> {
        let (ns, host_if, pod_ns) = (self.netns.as_str(), pod.host_if.as_str(), pod.netns.as_str());
        run("ip", &["-n", ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns])?;
        run("ip", &["-n", ns, "link", "set", host_if, "up"])?;
        run("ip", &["-n", ns, "route", "add", &format!("{}/32", pod.ip), "dev", host_if])?;
        let link = run("ip", &["-n", ns, "-o", "link", "show", host_if])?;
        let mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .context("host veth MAC")?
            .to_owned();
        run("ip", &["-n", pod_ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", pod_ns, "addr", "add", &format!("{}/32", pod.ip), "dev", "eth0"])?;
        run("ip", &["-n", pod_ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", pod_ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
        run("ip", &["-n", pod_ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
        run("ip", &["-n", pod_ns, "neigh", "add", "169.254.1.1", "lladdr", &mac, "dev", "eth0", "nud", "permanent"])?;
        Ok(())
    }

    /// Removes a pod's veth pair (as when its sandbox goes away).
    pub fn unwire(&self, pod: &str) -> Result<()> {
        run("ip", &["-n", &self.netns, "link", "del", &self.pod(pod)?.host_if])?;
        Ok(())
    }

    /// Gives a pod a new veth pair (as when its sandbox is recreated).
    pub fn rewire(&self, pod: &str) -> Result<()> {
        self.wire(self.pod(pod)?)
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods.iter().find(|p| p.name == name).with_context(|| format!("no pod {name}"))
    }

    pub fn config_dir(&self) -> PathBuf {
        self.work.path().join("config")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.work.path().join("state")
    }

    /// Writes (or replaces) a manifest in the config dir, atomically.
    pub fn write_config(&self, file: &str, text: &str) -> Result<()> {
        let temp = self.work.path().join(format!(".{file}.tmp"));
        fs::write(&temp, text)?;
        fs::rename(&temp, self.config_dir().join(file))?;
        Ok(())
    }

    /// Runs a command in the node namespace.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", self.netns.as_str()];
        full.extend_from_slice(args);
        run("ip", &full)
    }
}

impl Drop for TestNode {
    fn drop(&mut self) {
        for ns in self.pods.iter().map(|p| p.netns.as_str()).chain([self.netns.as_str()]) {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                eprintln!("cleanup of netns {ns}: {e:#}");
            }
        }
        // Unpinning the links detaches whatever the agent left attached.
        if let Err(e) = fs::remove_dir_all(&self.pins) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cleanup of {}: {e}", self.pins.display());
            }
        }
        if let Err(e) = fs::remove_dir(&self.cgroup) {
            if e.kind() != std::io::ErrorKind::NotFound {
                eprintln!("cleanup of cgroup {}: {e}", self.cgroup.display());
            }
        }
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
        let log = node.work.path().join(format!("agent-{}.log", std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos()));
        let config_dir = node.config_dir().display().to_string();
        let state_dir = node.state_dir().display().to_string();
        let pins = node.pins.display().to_string();
        let cgroup = node.cgroup.display().to_string();
        let mut args = vec![
            "netns", "exec", node.netns.as_str(), SLUICE, "--state-dir", &state_dir, "agent", "--config-dir", &config_dir,
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

const SERVER: &str = r#"
import http.server, socketserver, sys
name, port = sys.argv[1], int(sys.argv[2])
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        body = {"/v1/request-landing": "Ship landed\n", "/v1/exhaust-port": "Panic: deathstar exploded\n"}.get(self.path, "Death Star\n").encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served-by", name)
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = answer
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
server = Server(("0.0.0.0", port), Handler)
print("ready", flush=True)
server.serve_forever()
"#;

/// An HTTP server in a pod answering as the Star Wars deathstar does, naming itself in
/// `x-served-by`.
pub struct PodServer {
    child: Child,
}

impl PodServer {
    pub fn start(pod: &Pod, port: u16) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.netns, "python3", "-c", SERVER, &pod.name, &port.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        if line.trim() != "ready" {
            let _ = child.kill();
            bail!("server in {} did not start: {line:?}", pod.name);
        }
        Ok(Self { child })
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const CLIENT: &str = r#"
import http.client, json, os, socket, sys
cgroup, host, port, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
if cgroup:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
conn = http.client.HTTPConnection(host, port, timeout=timeout)
def ask(method, path):
    try:
        conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
        response = conn.getresponse()
        return {"status": response.status, "body": response.read().decode(), "served_by": response.getheader("x-served-by")}
    except (socket.timeout, TimeoutError):
        return {"error": "timeout"}
    except ConnectionRefusedError:
        return {"error": "refused"}
    except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
        return {"error": "reset"}
for line in sys.stdin:
    method, path = line.split()
    print(json.dumps(ask(method, path)), flush=True)
"#;

/// What a client in a pod got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Http { status: u16, body: String, served_by: Option<String> },
    TimedOut,
    Refused,
    Reset,
}

impl Reply {
    fn parse(line: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(line).with_context(|| format!("client said {line:?}"))?;
        Ok(match value["error"].as_str() {
            Some("timeout") => Reply::TimedOut,
            Some("refused") => Reply::Refused,
            Some("reset") => Reply::Reset,
            Some(other) => bail!("client error {other}"),
            None => Reply::Http {
                status: value["status"].as_u64().and_then(|s| u16::try_from(s).ok()).context("status")?,
                body: value["body"].as_str().unwrap_or_default().to_owned(),
                served_by: value["served_by"].as_str().map(str::to_owned),
            },
        })
    }
}

/// One HTTP connection from a pod, kept open between requests (its process is in the test's
/// cgroup, so Service addresses are load-balanced by the kernel).
pub struct PodClient {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl PodClient {
    pub fn connect(node: &TestNode, pod: &str, host: Ipv4Addr, port: u16, timeout_secs: u32) -> Result<Self> {
        let pod = node.pod(pod)?;
        let cgroup = node.cgroup.display().to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.netns, "python3", "-c", CLIENT, &cgroup, &host.to_string(), &port.to_string()])
            .arg(timeout_secs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take();
        let stdout = BufReader::new(child.stdout.take().context("client stdout")?);
        Ok(Self { child, stdin, stdout })
    }

    /// Sends `method path` on the connection (opening it first if needed) and returns the reply.
    pub fn request(&mut self, method: &str, path: &str) -> Result<Reply> {
        let stdin = self.stdin.as_mut().context("client closed")?;
        writeln!(stdin, "{method} {path}")?;
        stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Reply::parse(line.trim())
    }
}

impl Drop for PodClient {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on a new connection from `pod`.
pub fn request(node: &TestNode, pod: &str, host: Ipv4Addr, port: u16, method: &str, path: &str) -> Result<Reply> {
    PodClient::connect(node, pod, host, port, 3)?.request(method, path)
}
