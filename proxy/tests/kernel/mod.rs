//! Kernel test harness (tests only): privilege gate, a bpffs pin dir, and a node network
//! namespace with pod namespaces on veth pairs (the shape sluice-ebpf's own tests use), plus an
//! HTTP server and client running inside pods. Everything is named `slp-<tag>-<pid>-…` (so
//! concurrent runs do not collide), removed in `Drop` (also on panic) and, at start, removed if
//! an earlier run whose process is gone left it behind.
#![allow(dead_code)] // not every test binary uses every helper

use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

const TEST_ROOT: &str = "/run/sluice-proxy-tests";
pub const NODE_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 255, 1);

/// Whether this test can run (root, `ip`, a bpffs). When it cannot, says so loudly; with
/// `CI=true` a skip is a failure.
pub fn privileged(test: &str) -> bool {
    let reason = if unsafe { libc::geteuid() } != 0 {
        Some("not running as root".to_string())
    } else if Command::new("ip").arg("-V").output().is_err() {
        Some("`ip` (iproute2) not installed".to_string())
    } else if let Err(error) = bpffs_root() {
        Some(format!("no bpffs: {error:#}"))
    } else {
        None
    };
    match reason {
        None => true,
        Some(reason) if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("{test}: needs root/BPF but {reason}; CI=true does not allow skipping")
        }
        Some(reason) => {
            // Straight to stderr: the test harness captures eprintln! of passing tests.
            let _ = writeln!(std::io::stderr(), "\n!!!!! SKIPPED {test}: needs root/BPF but {reason} !!!!!\n");
            false
        }
    }
}

fn bpffs_root() -> Result<PathBuf> {
    let path = Path::new(TEST_ROOT).join("bpffs");
    sluice_ebpf::ensure_bpffs(&path)?;
    Ok(path)
}

/// A pin directory for one test, removed (detaching its pinned links) on drop.
pub struct TestPins {
    pub path: PathBuf,
}

impl TestPins {
    pub fn new(tag: &str) -> Result<Self> {
        let root = bpffs_root()?;
        let prefix = format!("slp-{tag}-");
        for entry in fs::read_dir(&root).with_context(|| format!("listing {}", root.display()))? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if left_behind(&name, &prefix) {
                remove_tree(&root.join(name))?;
            }
        }
        Ok(Self { path: root.join(format!("{prefix}{}", std::process::id())) })
    }
}

/// `name` is `<prefix><pid>…` of a test process that no longer runs.
fn left_behind(name: &str, prefix: &str) -> bool {
    let Some(rest) = name.strip_prefix(prefix) else { return false };
    let pid: String = rest.chars().take_while(char::is_ascii_digit).collect();
    !pid.is_empty() && !Path::new("/proc").join(&pid).exists()
}

impl Drop for TestPins {
    fn drop(&mut self) {
        if let Err(error) = remove_tree(&self.path) {
            eprintln!("cleanup of {}: {error:#}", self.path.display());
        }
    }
}

fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(error).with_context(|| format!("removing {}", path.display())),
    }
}

/// A pod: its namespace, address, and host-side veth in the node namespace.
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    pub host_if: String,
}

/// A node namespace with pods: pods 198.18.0.10+i/32 behind `lxcI`, the node 198.18.255.1 on lo.
pub struct Node {
    pub netns: String,
    pub pods: Vec<Pod>,
}

impl Node {
    pub fn new(tag: &str, pod_count: u8) -> Result<Self> {
        let stale_prefix = format!("slp-{tag}-");
        for leftover in run("ip", &["netns", "list"])?.lines().filter_map(|l| l.split_whitespace().next()) {
            if left_behind(leftover, &stale_prefix) {
                run("ip", &["netns", "del", leftover])?;
            }
        }
        let prefix = format!("{stale_prefix}{}-", std::process::id());
        let mut node = Node { netns: format!("{prefix}node"), pods: Vec::new() };
        run("ip", &["netns", "add", &node.netns])?;
        let ns = node.netns.clone();
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run("ip", &["-n", &ns, "addr", "add", &format!("{NODE_IP}/32"), "dev", "lo"])?;
        run("ip", &["netns", "exec", &ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        for i in 0..pod_count {
            let pod = Pod { netns: format!("{prefix}pod{i}"), ip: Ipv4Addr::new(198, 18, 0, 10 + i), host_if: format!("lxc{i}") };
            run("ip", &["netns", "add", &pod.netns])?;
            // Registered at once so that Drop removes it even if the setup below fails.
            node.pods.push(pod);
            let pod = &node.pods[usize::from(i)];
            let (pod_ns, host_if, ip) = (pod.netns.as_str(), pod.host_if.as_str(), pod.ip);
            run("ip", &["-n", &ns, "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", pod_ns])?;
            run("ip", &["-n", &ns, "link", "set", host_if, "up"])?;
            run("ip", &["-n", &ns, "route", "add", &format!("{ip}/32"), "dev", host_if])?;
            let link = run("ip", &["-n", &ns, "-o", "link", "show", host_if])?;
            let mac = link.split_whitespace().skip_while(|w| *w != "link/ether").nth(1).context("host veth MAC")?.to_string();
            run("ip", &["-n", pod_ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", pod_ns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
            run("ip", &["-n", pod_ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", pod_ns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
            run("ip", &["-n", pod_ns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
            run("ip", &["-n", pod_ns, "neigh", "add", "169.254.1.1", "lladdr", &mac, "dev", "eth0", "nud", "permanent"])?;
        }
        Ok(node)
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
        for ns in self.pods.iter().map(|p| p.netns.as_str()).chain([self.netns.as_str()]) {
            if let Err(error) = run("ip", &["netns", "del", ns]) {
                eprintln!("cleanup of netns {ns}: {error:#}");
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
        let target = fs::File::open(format!("/run/netns/{netns}")).with_context(|| format!("netns {netns}"))?;
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

/// An HTTP/1.1 server inside a pod: every request gets `200` with `body`, then the connection
/// closes. Remembers each request's peer address and request line.
pub struct PodHttpServer {
    seen: Arc<Mutex<Vec<(SocketAddr, String)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PodHttpServer {
    pub fn start(pod_netns: &str, addr: SocketAddrV4, body: &str) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, body, seen_by_thread, stop_flag) = (pod_netns.to_string(), body.to_string(), Arc::clone(&seen), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let bound = NetnsGuard::enter(&netns).and_then(|guard| {
                let listener = TcpListener::bind(addr).context("bind")?;
                listener.set_nonblocking(true).context("nonblocking")?;
                Ok((guard, listener))
            });
            let (_guard, listener) = match bound {
                Ok(bound) => {
                    let _ = ready_tx.send(Ok(()));
                    bound
                }
                Err(error) => {
                    let _ = ready_tx.send(Err(error));
                    return;
                }
            };
            while !stop_flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, peer)) => {
                        if let Some(request_line) = answer(stream, &body) {
                            seen_by_thread.lock().unwrap_or_else(|e| e.into_inner()).push((peer, request_line));
                        }
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        ready_rx.recv().context("server thread")??;
        Ok(Self { seen, stop, thread: Some(thread) })
    }

    /// Peer address and request line of every request so far.
    pub fn seen(&self) -> Vec<(SocketAddr, String)> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Reads one request head, answers it; returns the request line.
fn answer(mut stream: TcpStream, body: &str) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let head = read_head(&mut stream)?;
    let response = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
    stream.write_all(response.as_bytes()).ok()?;
    head.lines().next().map(str::to_string)
}

fn read_head(stream: &mut TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).ok()
}

impl Drop for PodHttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// What an HTTP client in a pod got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpOutcome {
    Response { status: u16, body: String },
    /// No connection, or it closed without a response.
    Failed(String),
}

/// `GET path` from inside `pod` to `target`, one connection, `Connection: close`.
pub fn pod_http_get(pod: &Pod, target: SocketAddrV4, path: &str) -> Result<HttpOutcome> {
    let netns = pod.netns.clone();
    let path = path.to_string();
    let exchange = std::thread::spawn(move || -> Result<HttpOutcome> {
        let _in_pod = NetnsGuard::enter(&netns)?;
        http_get(target, &path)
    });
    exchange.join().map_err(|_| anyhow::anyhow!("client thread panicked"))?
}

/// `GET path` to `target` from the calling thread's namespace.
pub fn http_get(target: SocketAddrV4, path: &str) -> Result<HttpOutcome> {
    let mut stream = match TcpStream::connect_timeout(&SocketAddr::V4(target), Duration::from_secs(5)) {
        Ok(stream) => stream,
        Err(error) => return Ok(HttpOutcome::Failed(format!("connect: {error}"))),
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nhost: {target}\r\nconnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    if let Err(error) = stream.read_to_end(&mut response) {
        return Ok(HttpOutcome::Failed(format!("read: {error}")));
    }
    Ok(parse_response(&String::from_utf8_lossy(&response)))
}

fn parse_response(raw: &str) -> HttpOutcome {
    let Some((head, body)) = raw.split_once("\r\n\r\n") else {
        return HttpOutcome::Failed(format!("no response head in {raw:?}"));
    };
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok());
    match status {
        Some(status) => HttpOutcome::Response { status, body: body.to_string() },
        None => HttpOutcome::Failed(format!("bad status line in {head:?}")),
    }
}

pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let output = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !output.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
