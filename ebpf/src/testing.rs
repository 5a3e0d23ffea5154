//! Test harness (tests only): privilege gate, per-test bpffs pin dirs and cgroups, and a node
//! network namespace with pod namespaces joined by veth pairs (the shape a routed CNI gives).
//! Everything is named after the test, removed in `Drop` (also on panic) and, at start, removed
//! if an earlier run of the same test left it behind.

use std::fs;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

const TEST_ROOT: &str = "/run/sluice-ebpf-tests";

/// Whether this test can run (root, bpffs, `ip`). When it cannot, says so loudly; with
/// `CI=true` a skip is a failure.
pub fn privileged(test: &str) -> bool {
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else if let Err(e) = bpffs_root() {
        Some(format!("no bpffs: {e}"))
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("`ip` (iproute2) not installed".to_string())
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: needs root/BPF but {reason}; CI=true does not allow skipping")
        }
        Some(reason) => {
            eprintln!("\n!!!!! SKIPPED {test}: needs root/BPF but {reason} !!!!!\n");
            false
        }
    }
}

type MountResult = std::result::Result<PathBuf, String>;

/// Mounts a filesystem under the tests' root once per process (tests run in parallel threads).
fn mount_once(
    cell: &'static OnceLock<MountResult>,
    name: &str,
    ensure: fn(&Path) -> std::result::Result<(), crate::DatapathError>,
) -> Result<&'static Path> {
    let mounted = cell.get_or_init(|| {
        let path = Path::new(TEST_ROOT).join(name);
        ensure(&path).map(|()| path).map_err(|e| e.to_string())
    });
    match mounted {
        Ok(path) => Ok(path.as_path()),
        Err(e) => bail!("{e}"),
    }
}

/// The bpffs all tests pin under.
pub fn bpffs_root() -> Result<&'static Path> {
    static ROOT: OnceLock<MountResult> = OnceLock::new();
    mount_once(&ROOT, "bpffs", crate::ensure_bpffs)
}

/// A pin directory for one test, removed (detaching its pinned links) on drop.
pub struct TestPins {
    pub path: PathBuf,
}

impl TestPins {
    pub fn new(tag: &str) -> Result<Self> {
        let path = bpffs_root()?.join(format!("sle-{tag}"));
        remove_tree(&path)?;
        Ok(Self { path })
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(e) = remove_tree(&self.path) {
            eprintln!("cleanup of {}: {e:#}", self.path.display());
        }
    }
}

fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// A child cgroup (v2) for one test's pod processes; never the hierarchy's root.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Result<Self> {
        let path = cgroup2_mount()?.join(format!("sle-{tag}"));
        if path.exists() {
            fs::remove_dir(&path)
                .with_context(|| format!("removing leftover cgroup {}", path.display()))?;
        }
        fs::create_dir(&path).with_context(|| format!("creating cgroup {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir(&self.path) {
            eprintln!("cleanup of cgroup {}: {e}", self.path.display());
        }
    }
}

/// The cgroup v2 hierarchy, mounted (again) under /run: `ip netns exec` remounts /sys, so a
/// cgroup path under /sys would not be visible to processes started in a pod.
fn cgroup2_mount() -> Result<&'static Path> {
    static MOUNT: OnceLock<MountResult> = OnceLock::new();
    mount_once(&MOUNT, "cgroup2", crate::ensure_cgroup2)
}

/// A pod: its namespace, address, and host-side veth in the node namespace.
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
    pub ifindex: u32,
}

/// A node namespace with pods. Addresses: pods 198.18.0.10+i/32, node 198.18.255.1 on lo.
pub struct Node {
    pub netns: String,
    pub pods: Vec<Pod>,
}

pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);

impl Node {
    pub fn new(tag: &str, pod_count: u8) -> Result<Self> {
        let prefix = format!("sle-{tag}-");
        for leftover in run("ip", &["netns", "list"])?
            .lines()
            .filter_map(|l| l.split_whitespace().next())
        {
            if leftover.starts_with(&prefix) {
                run("ip", &["netns", "del", leftover])?;
            }
        }
        let mut node = Node {
            netns: format!("{prefix}node"),
            pods: Vec::new(),
        };
        run("ip", &["netns", "add", &node.netns])?;
        let ns = node.netns.clone();
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{NODE_IP}/32"),
                "dev",
                "lo",
            ],
        )?;
        run(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ],
        )?;
        for i in 0..pod_count {
            let pod_ns = format!("{prefix}pod{i}");
            run("ip", &["netns", "add", &pod_ns])?;
            // Registered at once so that Drop removes it even if the setup below fails.
            node.pods.push(Pod {
                netns: pod_ns.clone(),
                ip: Ipv4Addr::new(198, 18, 0, 10 + i),
                host_if: format!("lxc{i}"),
                ifindex: 0,
            });
            let host_if = format!("lxc{i}");
            let ip = Ipv4Addr::new(198, 18, 0, 10 + i);
            run(
                "ip",
                &[
                    "-n", &ns, "link", "add", &host_if, "type", "veth", "peer", "name", "eth0",
                    "netns", &pod_ns,
                ],
            )?;
            run("ip", &["-n", &ns, "link", "set", &host_if, "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &ns,
                    "route",
                    "add",
                    &format!("{ip}/32"),
                    "dev",
                    &host_if,
                ],
            )?;
            let link = run("ip", &["-n", &ns, "-o", "link", "show", &host_if])?;
            let mac = link
                .split_whitespace()
                .skip_while(|w| *w != "link/ether")
                .nth(1)
                .context("host veth MAC")?
                .to_string();
            let ifindex: u32 = link
                .split(':')
                .next()
                .context("ifindex")?
                .trim()
                .parse()
                .context("ifindex")?;
            run("ip", &["-n", &pod_ns, "link", "set", "lo", "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &pod_ns,
                    "addr",
                    "add",
                    &format!("{ip}/32"),
                    "dev",
                    "eth0",
                ],
            )?;
            run("ip", &["-n", &pod_ns, "link", "set", "eth0", "up"])?;
            run(
                "ip",
                &[
                    "-n",
                    &pod_ns,
                    "route",
                    "add",
                    "169.254.1.1",
                    "dev",
                    "eth0",
                    "scope",
                    "link",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &pod_ns,
                    "route",
                    "add",
                    "default",
                    "via",
                    "169.254.1.1",
                    "dev",
                    "eth0",
                ],
            )?;
            run(
                "ip",
                &[
                    "-n",
                    &pod_ns,
                    "neigh",
                    "add",
                    "169.254.1.1",
                    "lladdr",
                    &mac,
                    "dev",
                    "eth0",
                    "nud",
                    "permanent",
                ],
            )?;
            if let Some(pod) = node.pods.last_mut() {
                pod.ifindex = ifindex;
            }
        }
        Ok(node)
    }

    /// Moves the calling thread into the node namespace until the guard drops.
    pub fn enter(&self) -> Result<NetnsGuard> {
        NetnsGuard::enter(&self.netns)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
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

/// A TCP server inside a pod that answers every connection with `reply` and closes.
pub struct PodServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PodServer {
    pub fn start(pod_netns: &str, addr: SocketAddrV4, reply: &str) -> Result<Self> {
        let reply = reply.to_string();
        Self::serve(
            pod_netns,
            move || TcpListener::bind(addr).context("bind"),
            move |_| reply.clone(),
        )
    }

    /// A transparent proxy listener (IP_TRANSPARENT, 127.0.0.1:port) in the node namespace
    /// that answers "proxy <local address> <peer address>": the local address of an accepted
    /// socket is the original destination when the datapath redirected the flow.
    pub fn transparent_proxy(node_netns: &str, port: u16) -> Result<Self> {
        Self::serve(
            node_netns,
            move || transparent_listener(port),
            |stream| {
                let local = stream
                    .local_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                format!("proxy {local} {peer}")
            },
        )
    }

    fn serve(
        netns: &str,
        bind: impl FnOnce() -> Result<TcpListener> + Send + 'static,
        reply: impl Fn(&std::net::TcpStream) -> String + Send + 'static,
    ) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, stop_flag) = (netns.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let listener = NetnsGuard::enter(&netns).and_then(|guard| {
                let listener = bind()?;
                listener.set_nonblocking(true).context("nonblocking")?;
                Ok((guard, listener))
            });
            let (_guard, listener) = match listener {
                Ok(ok) => {
                    let _ = ready_tx.send(Ok(()));
                    ok
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut stream, _)) => {
                        let answer = reply(&stream);
                        let _ = std::io::Write::write_all(&mut stream, answer.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx.recv().context("server thread")??;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

fn transparent_listener(port: u16) -> Result<TcpListener> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket syscalls on a fresh fd owned by the returned listener.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            bail!("socket: {}", std::io::Error::last_os_error());
        }
        let listener = TcpListener::from_raw_fd(fd);
        let one: libc::c_int = 1;
        if libc::setsockopt(
            fd,
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            (&one as *const libc::c_int).cast(),
            4,
        ) != 0
        {
            bail!("IP_TRANSPARENT: {}", std::io::Error::last_os_error());
        }
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        if libc::bind(
            fd,
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            bail!("bind 127.0.0.1:{port}: {}", std::io::Error::last_os_error());
        }
        if libc::listen(fd, 64) != 0 {
            bail!("listen: {}", std::io::Error::last_os_error());
        }
        Ok(listener)
    }
}

/// A UDP server inside a pod that answers every datagram with `reply`.
pub fn udp_pod_server(pod_netns: &str, addr: SocketAddrV4, reply: &str) -> Result<PodServer> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let (netns, reply, stop_flag) = (pod_netns.to_string(), reply.to_string(), stop.clone());
    let thread = std::thread::spawn(move || {
        let socket = NetnsGuard::enter(&netns).and_then(|guard| {
            let socket = std::net::UdpSocket::bind(addr).context("bind")?;
            socket
                .set_read_timeout(Some(Duration::from_millis(20)))
                .context("timeout")?;
            Ok((guard, socket))
        });
        let (_guard, socket) = match socket {
            Ok(ok) => {
                let _ = ready_tx.send(Ok(()));
                ok
            }
            Err(e) => {
                let _ = ready_tx.send(Err(e));
                return;
            }
        };
        let mut buf = [0u8; 64];
        while !stop_flag.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(reply.as_bytes(), peer);
            }
        }
    });
    ready_rx.recv().context("server thread")??;
    Ok(PodServer {
        stop,
        thread: Some(thread),
    })
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What a client process in a pod saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Connected; `peer` is what getpeername() returned, `reply` what the server sent.
    Connected {
        peer: SocketAddrV4,
        reply: String,
    },
    Refused,
    TimedOut,
}

const CLIENT: &str = r#"
import errno, os, socket, sys
mode, cgroup, host, port, timeout = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
if cgroup:
    with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM)
s.settimeout(timeout)
try:
    if mode == "tcp":
        s.connect((host, port))
        peer, data = s.getpeername(), s.recv(100)
    else:
        s.sendto(b"ping", (host, port))
        data, peer = s.recvfrom(100)
except ConnectionRefusedError:
    print("REFUSED"); sys.exit(0)
except (socket.timeout, TimeoutError):
    print("TIMEOUT"); sys.exit(0)
except OSError as e:
    if e.errno == errno.EHOSTUNREACH:
        print("REFUSED"); sys.exit(0)
    raise
print("OK %s:%d %s" % (peer[0], peer[1], data.decode().strip()))
"#;

/// Runs a TCP client in `pod` (in `cgroup` when given, joined before the socket exists):
/// connect, getpeername, read the reply.
pub fn pod_connect(
    pod: &Pod,
    cgroup: Option<&Path>,
    target: SocketAddrV4,
    timeout_secs: u32,
) -> Result<ConnectOutcome> {
    pod_client(pod, "tcp", cgroup, target, timeout_secs)
}

/// Runs a UDP client in `pod`: an unconnected sendto, then recvfrom (whose source address is
/// the `peer`); EHOSTUNREACH counts as `Refused`.
pub fn pod_udp_exchange(
    pod: &Pod,
    cgroup: Option<&Path>,
    target: SocketAddrV4,
    timeout_secs: u32,
) -> Result<ConnectOutcome> {
    pod_client(pod, "udp", cgroup, target, timeout_secs)
}

fn pod_client(
    pod: &Pod,
    mode: &str,
    cgroup: Option<&Path>,
    target: SocketAddrV4,
    timeout_secs: u32,
) -> Result<ConnectOutcome> {
    let cgroup_arg = cgroup.map(|p| p.display().to_string()).unwrap_or_default();
    let out = run(
        "ip",
        &[
            "netns",
            "exec",
            &pod.netns,
            "python3",
            "-c",
            CLIENT,
            mode,
            &cgroup_arg,
            &target.ip().to_string(),
            &target.port().to_string(),
            &timeout_secs.to_string(),
        ],
    )?;
    let line = out.trim();
    match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["REFUSED"] => Ok(ConnectOutcome::Refused),
        ["TIMEOUT"] => Ok(ConnectOutcome::TimedOut),
        ["OK", peer, reply @ ..] => Ok(ConnectOutcome::Connected {
            peer: peer.parse().context("peer")?,
            reply: reply.join(" "),
        }),
        _ => bail!("unexpected client output {line:?}"),
    }
}

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
