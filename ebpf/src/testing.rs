//! Test harness (this crate's tests, other crates' through the `testing` feature): the privilege
//! gate, a node network namespace with pod namespaces joined by veth pairs (the shape any routed
//! CNI gives), per-test bpffs pin directories, cgroups and scratch directories, and ([`pods`])
//! servers and clients running inside the pods.
//!
//! Addresses: pods in 198.18.0.0/15 (benchmarking space, never routed), the node [`NODE_IP`] on
//! its loopback; the node namespace has no uplink, so nothing leaves the test's namespaces.
//!
//! Names: everything a test creates is named `sl<tag>-<pid in base 36>[-<suffix>]`, at most 15
//! characters (an interface name's limit), so concurrent runs never collide. It is removed in
//! `Drop` (also on panic), and what runs of the same tag whose process is gone left behind is
//! removed before a new run creates its own.

use std::fs;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};

mod pods;

pub use pods::{
    http_request, pod_connect, pod_udp_exchange, ConnectOutcome, HttpClient, PodHttpServer,
    PodServer, Reply,
};

/// Where the tests mount their bpffs and cgroup2. Not under /sys: `ip netns exec` remounts
/// /sys, so processes started in a namespace would not see them there.
const TEST_ROOT: &str = "/run/sluice-tests";
/// The node's address, on the node namespace's loopback.
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);
/// An interface name's limit (IFNAMSIZ - 1); every name the harness makes fits in it.
const MAX_NAME: usize = 15;
/// `sl` + tag + `-` + pid (at most 5 base-36 digits) + `-NN` stays within [`MAX_NAME`].
const MAX_TAG: usize = 4;
/// Pod suffixes are `-0` to `-99`.
const MAX_PODS: usize = 100;

/// Whether a kernel test can run here (root, `ip`, `python3`, bpffs and cgroup2). When it cannot,
/// it says so loudly; with `CI=true` a skip is a failure.
pub fn privileged(test: &str) -> bool {
    let Some(reason) = missing_privilege() else {
        return true;
    };
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{test}: needs root and BPF but {reason}; CI=true does not allow skipping");
    }
    let line = format!("\n!!!!! SKIPPED {test}: needs root and BPF but {reason} !!!!!\n");
    // Straight to the process's stderr: libtest captures `eprintln!` of a passing test, and a
    // skipped test passes.
    let _ = std::io::stderr().write_all(line.as_bytes());
    // And into the test's own output, shown with --nocapture or when the test fails.
    println!("SKIPPED: {reason}");
    false
}

fn missing_privilege() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("it is not running as root".to_string());
    }
    for (program, what) in [
        ("ip", "`ip` (iproute2)"),
        ("python3", "python3 (the pods' clients and HTTP servers)"),
    ] {
        if Command::new(program).arg("-V").output().is_err() {
            return Some(format!("{what} is not installed"));
        }
    }
    mounts()
        .err()
        .map(|e| format!("bpffs/cgroup2 cannot be mounted: {e:#}"))
}

struct Mounts {
    bpffs: PathBuf,
    cgroup2: PathBuf,
}

/// The bpffs and cgroup2 every test uses, mounted once per process when missing.
fn mounts() -> Result<&'static Mounts> {
    static MOUNTS: OnceLock<std::result::Result<Mounts, String>> = OnceLock::new();
    let mounted = MOUNTS.get_or_init(|| {
        let mounts = Mounts {
            bpffs: Path::new(TEST_ROOT).join("bpffs"),
            cgroup2: Path::new(TEST_ROOT).join("cgroup2"),
        };
        crate::ensure_bpffs(&mounts.bpffs).map_err(|e| e.to_string())?;
        crate::ensure_cgroup2(&mounts.cgroup2).map_err(|e| e.to_string())?;
        Ok(mounts)
    });
    match mounted {
        Ok(mounts) => Ok(mounts),
        Err(e) => bail!("{e}"),
    }
}

/// This process's name for `tag`: `sl<tag>-<pid in base 36>`.
fn run_name(tag: &str, pid: u32) -> Result<String> {
    let valid = (1..=MAX_TAG).contains(&tag.len())
        && tag
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !valid {
        bail!("test tag {tag:?}: 1 to {MAX_TAG} lowercase letters or digits, so that names fit {MAX_NAME} characters");
    }
    Ok(format!("sl{tag}-{}", base36(pid)))
}

fn base36(mut n: u32) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(char::from_digit(n % 36, 36).unwrap_or('0'));
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.iter().rev().collect()
}

/// The pid of the run of `tag` that made `name`, if a run of `tag` made it.
fn run_pid(name: &str, tag: &str) -> Option<u32> {
    let rest = name
        .strip_prefix("sl")?
        .strip_prefix(tag)?
        .strip_prefix('-')?;
    let pid = rest.split('-').next()?;
    if pid.is_empty()
        || !pid
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return None;
    }
    u32::from_str_radix(pid, 36).ok()
}

/// Whether `name` was made by a run of `tag` whose process is gone.
fn left_behind(name: &str, tag: &str) -> bool {
    run_pid(name, tag).is_some_and(|pid| !Path::new("/proc").join(pid.to_string()).exists())
}

/// Removes the entries of `dir` that runs of `tag` left behind.
fn remove_left_behind(dir: &Path, tag: &str, remove: Remove) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if left_behind(name, tag) {
            remove(&path).with_context(|| format!("removing leftover {}", path.display()))?;
        }
    }
    Ok(())
}

/// SIGKILLs what a dead run left running in `netns` (an agent, servers, clients: a killed test
/// process does not stop its children), and waits until they are gone from it, so that its
/// cgroup can be removed next.
fn kill_processes_in(netns: &str) -> Result<()> {
    let pids = || -> Result<Vec<libc::pid_t>> {
        Ok(run("ip", &["netns", "pids", netns])?
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect())
    };
    for pid in pids()? {
        // SAFETY: kill has no memory effects; the pid is a process inside the dead run's netns.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    for _ in 0..250 {
        if pids()?.is_empty() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bail!("processes left in {netns} do not exit: {:?}", pids()?)
}

/// Where tests keep scratch files (config dirs, logs, request records), by run name.
fn work_root() -> Result<PathBuf> {
    let root = Path::new(TEST_ROOT).join("work");
    fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    Ok(root)
}

fn remove_file_or_tree(path: &Path) -> std::io::Result<()> {
    if path.is_dir() {
        fs::remove_dir_all(path)
    } else {
        fs::remove_file(path)
    }
}

type Remove = fn(&Path) -> std::io::Result<()>;

/// A directory named after this run (a pin dir, a cgroup, a scratch dir): what dead runs of the
/// same tag left beside it is removed first, and it is removed on drop (also on panic).
pub struct TestDir {
    pub path: PathBuf,
    remove: Remove,
}

impl TestDir {
    /// A bpffs pin directory (a loader's or agent's `--bpffs`), created by its user. Removing
    /// it also detaches whatever its pinned links hold attached.
    pub fn pins(tag: &str) -> Result<Self> {
        Self::under(&mounts()?.bpffs, tag, false, |path| {
            fs::remove_dir_all(path)
        })
    }

    /// A child cgroup (v2) for a test's client processes: never the hierarchy's root, so socket
    /// programs attached to it affect only the test's own clients.
    pub fn cgroup(tag: &str) -> Result<Self> {
        Self::under(&mounts()?.cgroup2, tag, true, |path| fs::remove_dir(path))
    }

    /// A scratch directory (an agent's config and state dirs, logs).
    pub fn scratch(tag: &str) -> Result<Self> {
        Self::under(&work_root()?, tag, true, remove_file_or_tree)
    }

    fn under(root: &Path, tag: &str, create: bool, remove: Remove) -> Result<Self> {
        remove_left_behind(root, tag, remove)?;
        let path = root.join(run_name(tag, std::process::id())?);
        if create {
            fs::create_dir(&path).with_context(|| format!("creating {}", path.display()))?;
        }
        Ok(Self { path, remove })
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        match (self.remove)(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                eprintln!("cleanup of {}: {e}", self.path.display())
            }
            _ => {}
        }
    }
}

/// A pod: its name, namespace, address and host-side veth (in the node namespace).
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
}

/// A node namespace with pods. Each pod has `eth0` with its /32 and a default route through
/// the link-local gateway 169.254.1.1, answered by the host veth's MAC (as Cilium does); the
/// node routes each pod's /32 to its host veth `lxc<index>` and forwards.
pub struct Node {
    pub netns: String,
    pub pods: Vec<Pod>,
}

impl Node {
    /// `count` pods named `pod<i>` at 198.18.0.10+i.
    pub fn new(tag: &str, count: u8) -> Result<Self> {
        let pods: Vec<(String, Ipv4Addr)> = (0..count)
            .map(|i| (format!("pod{i}"), Ipv4Addr::new(198, 18, 0, 10 + i)))
            .collect();
        Self::with_pods(tag, &pods)
    }

    /// One pod per `(name, address)`.
    pub fn with_pods(tag: &str, pods: &[(String, Ipv4Addr)]) -> Result<Self> {
        if pods.len() > MAX_PODS {
            bail!("at most {MAX_PODS} pods per node");
        }
        let name = run_name(tag, std::process::id())?;
        for leftover in run("ip", &["netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
        {
            if left_behind(leftover, tag) {
                kill_processes_in(leftover)?;
                run("ip", &["netns", "del", leftover])?;
            }
        }
        // The request records of the dead run's servers.
        remove_left_behind(&work_root()?, tag, remove_file_or_tree)?;
        let netns = format!("{name}-n");
        run("ip", &["netns", "add", &netns])?;
        let mut node = Node {
            netns,
            pods: Vec::new(),
        };
        node.exec(&["ip", "link", "set", "lo", "up"])?;
        node.exec(&["ip", "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for (index, (pod_name, ip)) in pods.iter().enumerate() {
            let pod = Pod {
                name: pod_name.clone(),
                netns: format!("{name}-{index}"),
                ip: *ip,
                host_if: format!("lxc{index}"),
            };
            run("ip", &["netns", "add", &pod.netns])?;
            // Registered at once so that Drop removes it even if the wiring below fails.
            node.pods.push(pod.clone());
            node.wire(&pod)?;
        }
        Ok(node)
    }

    fn wire(&self, pod: &Pod) -> Result<()> {
        let (ns, host_if, pod_ns) = (
            self.netns.as_str(),
            pod.host_if.as_str(),
            pod.netns.as_str(),
        );
        let address = format!("{}/32", pod.ip);
        run(
            "ip",
            &[
                "-n", ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns",
                pod_ns,
            ],
        )?;
        run("ip", &["-n", ns, "link", "set", host_if, "up"])?;
        run("ip", &["-n", ns, "route", "add", &address, "dev", host_if])?;
        let link = self.link(host_if)?;
        let mac = link
            .split_whitespace()
            .skip_while(|w| *w != "link/ether")
            .nth(1)
            .context("host veth MAC")?;
        let in_pod: [&[&str]; 6] = [
            &["link", "set", "lo", "up"],
            &["addr", "add", &address, "dev", "eth0"],
            &["link", "set", "eth0", "up"],
            &[
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ],
            &[
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ],
            &[
                "neigh",
                "add",
                "169.254.1.1",
                "lladdr",
                mac,
                "dev",
                "eth0",
                "nud",
                "permanent",
            ],
        ];
        for args in in_pod {
            run("ip", &[&["-n", pod_ns], args].concat())?;
        }
        Ok(())
    }

    /// `ip -o link show <interface>` in the node namespace.
    fn link(&self, interface: &str) -> Result<String> {
        run("ip", &["-n", &self.netns, "-o", "link", "show", interface])
    }

    pub fn pod(&self, name: &str) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .with_context(|| format!("no pod {name}"))
    }

    /// The ifindex of `pod`'s host-side veth (it changes when the pod is wired again).
    pub fn ifindex(&self, pod: &Pod) -> Result<u32> {
        let link = self.link(&pod.host_if)?;
        link.split(':')
            .next()
            .and_then(|index| index.trim().parse().ok())
            .with_context(|| format!("ifindex in {link:?}"))
    }

    /// Removes a pod's veth pair (as when its sandbox goes away).
    pub fn unwire(&self, pod: &str) -> Result<()> {
        run(
            "ip",
            &["-n", &self.netns, "link", "del", &self.pod(pod)?.host_if],
        )?;
        Ok(())
    }

    /// Gives a pod a new veth pair (as when its sandbox is recreated).
    pub fn rewire(&self, pod: &str) -> Result<()> {
        self.wire(self.pod(pod)?)
    }

    /// Gives the node namespace `ip` as a second loopback address: an address that is neither
    /// a pod nor the node, so to the datapath it is `world` (outside the cluster), while a
    /// server bound to it in the node namespace still answers. (Not a dummy interface: the
    /// `dummy` driver is not built into every kernel.)
    pub fn add_outside_address(&self, ip: Ipv4Addr) -> Result<()> {
        self.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        Ok(())
    }

    /// Runs a command in the node namespace and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        run(
            "ip",
            &[&["netns", "exec", self.netns.as_str()], args].concat(),
        )
    }

    /// Moves the calling thread into the node namespace until the guard drops. Threads the
    /// caller starts meanwhile (a proxy runtime's workers) stay in it.
    pub fn enter(&self) -> Result<NetnsGuard> {
        NetnsGuard::enter(&self.netns)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Deleting a namespace removes its veths, TC programs and ip rules with it.
        for ns in self
            .pods
            .iter()
            .map(|p| p.netns.as_str())
            .chain([self.netns.as_str()])
        {
            if let Err(e) = run("ip", &["netns", "del", ns]) {
                eprintln!("cleanup of netns {ns}: {e:#}");
            }
        }
    }
}

/// The calling thread's network namespace, switched until drop.
pub struct NetnsGuard {
    original: fs::File,
}

impl NetnsGuard {
    pub fn enter(netns: &str) -> Result<Self> {
        let original = fs::File::open("/proc/thread-self/ns/net").context("own netns")?;
        let target = fs::File::open(format!("/run/netns/{netns}"))
            .with_context(|| format!("netns {netns}"))?;
        // SAFETY: valid fds; setns only changes this thread's namespace.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns {netns}: {}", std::io::Error::last_os_error());
        }
        Ok(Self { original })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: valid fd of the namespace the thread came from.
        if unsafe { libc::setns(self.original.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!("restoring netns: {}", std::io::Error::last_os_error());
        }
    }
}

/// Runs `program` and returns its stdout; a failure carries its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!(
            "{program} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_an_interface_name_and_carry_the_pid() {
        // The largest pid Linux hands out (PID_MAX_LIMIT).
        let longest = run_name("abcd", 4_194_304).expect("valid tag");
        assert_eq!(longest, "slabcd-2hwcg");
        assert!(format!("{longest}-{}", MAX_PODS - 1).len() <= MAX_NAME);
        assert_eq!(run_pid(&format!("{longest}-n"), "abcd"), Some(4_194_304));
        assert_eq!(run_pid("slabcd-2hwcg", "abcd"), Some(4_194_304));
    }

    #[test]
    fn only_names_of_the_same_tag_count_as_its_runs() {
        assert_eq!(run_pid("slsw7-pa8-3", "sw7"), Some(32768));
        assert_eq!(run_pid("slsw7-pa8-3", "sw"), None);
        assert_eq!(run_pid("slsw-pa8", "sw7"), None);
        assert_eq!(run_pid("slsw7-", "sw7"), None);
        assert_eq!(run_pid("other", "sw7"), None);
    }

    #[test]
    fn tags_that_would_not_fit_are_refused() {
        assert!(run_name("toolong", 1).is_err());
        assert!(run_name("", 1).is_err());
        assert!(run_name("a-b", 1).is_err());
        assert!(run_name("Sw7", 1).is_err());
    }
}
