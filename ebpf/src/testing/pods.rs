//! Test harness, inside the pods: servers (threads of the test process switched into a
//! namespace, or a python HTTP server) and clients (python processes, so that they can join the
//! test cgroup whose socket programs balance Services: a cgroup holds processes, not threads).

use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use super::{run, work_root, NetnsGuard};

/// A server thread inside a namespace, stopped on drop.
pub struct PodServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PodServer {
    /// A TCP server that answers every connection with `reply` and closes it.
    pub fn start(netns: &str, addr: SocketAddrV4, reply: &str) -> Result<Self> {
        let reply = reply.to_string();
        Self::serve_tcp(
            netns,
            move || TcpListener::bind(addr).context("bind"),
            move |_| reply.clone(),
        )
    }

    /// A transparent proxy listener (IP_TRANSPARENT, 127.0.0.1:port) that answers
    /// "proxy <local address> <peer address>": the local address of an accepted socket is the
    /// original destination when the datapath redirected the flow.
    pub fn transparent_proxy(netns: &str, port: u16) -> Result<Self> {
        Self::serve_tcp(
            netns,
            move || transparent_listener(port),
            |stream| {
                let local = stream.local_addr().map(|a| a.to_string());
                let peer = stream.peer_addr().map(|a| a.to_string());
                format!(
                    "proxy {} {}",
                    local.unwrap_or_default(),
                    peer.unwrap_or_default()
                )
            },
        )
    }

    /// A UDP server that answers every datagram with `reply`.
    pub fn udp(netns: &str, addr: SocketAddrV4, reply: &str) -> Result<Self> {
        let reply = reply.to_string();
        Self::serve(
            netns,
            move || {
                let socket = UdpSocket::bind(addr).context("bind")?;
                socket
                    .set_read_timeout(Some(Duration::from_millis(20)))
                    .context("timeout")?;
                Ok(socket)
            },
            move |socket| {
                let mut buf = [0u8; 64];
                if let Ok((_, peer)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(reply.as_bytes(), peer);
                }
            },
        )
    }

    fn serve_tcp(
        netns: &str,
        bind: impl FnOnce() -> Result<TcpListener> + Send + 'static,
        reply: impl Fn(&TcpStream) -> String + Send + 'static,
    ) -> Result<Self> {
        Self::serve(
            netns,
            move || {
                let listener = bind()?;
                listener.set_nonblocking(true).context("nonblocking")?;
                Ok(listener)
            },
            move |listener| match listener.accept() {
                Ok((mut stream, _)) => {
                    let answer = reply(&stream);
                    let _ = stream.write_all(answer.as_bytes());
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            },
        )
    }

    /// Binds in `netns` (reporting a failure to the caller), then runs `serve_once` until
    /// stopped; `serve_once` must return now and then (non-blocking or with a read timeout).
    fn serve<S: 'static>(
        netns: &str,
        bind: impl FnOnce() -> Result<S> + Send + 'static,
        serve_once: impl Fn(&S) + Send + 'static,
    ) -> Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (netns, stop_flag) = (netns.to_string(), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            let bound = NetnsGuard::enter(&netns).and_then(|guard| Ok((guard, bind()?)));
            let (_guard, socket) = match bound {
                Ok(bound) => {
                    let _ = ready_tx.send(Ok(()));
                    bound
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            while !stop_flag.load(Ordering::Relaxed) {
                serve_once(&socket);
            }
        });
        ready_rx.recv().context("server thread")??;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
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

/// `ip` arguments running `python3 -c script args...` in `netns`.
fn python(netns: &str, script: &str, args: &[String]) -> Vec<String> {
    let head = ["netns", "exec", netns, "python3", "-c", script];
    head.iter()
        .map(|a| a.to_string())
        .chain(args.iter().cloned())
        .collect()
}

/// `ip` arguments running a client script in `netns`: it joins `cgroup` (when given) before
/// anything else, then reads `target` and `timeout_secs`, then `extra`, from its argv.
fn client(
    netns: &str,
    script: &str,
    cgroup: Option<&Path>,
    target: SocketAddrV4,
    timeout_secs: u32,
    extra: &[&str],
) -> Vec<String> {
    let cgroup = cgroup.map(|p| p.display().to_string()).unwrap_or_default();
    let argv = [
        cgroup,
        target.ip().to_string(),
        target.port().to_string(),
        timeout_secs.to_string(),
    ];
    let args: Vec<String> = argv
        .into_iter()
        .chain(extra.iter().map(|a| a.to_string()))
        .collect();
    python(netns, &format!("{JOIN_CGROUP}{script}"), &args)
}

/// A child process, killed and reaped on drop.
struct Process(Child);

impl Process {
    /// `ip args...` with piped stdin and stdout.
    fn spawn(args: &[String]) -> Result<Self> {
        let child = Command::new("ip")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting python3 in a namespace")?;
        Ok(Self(child))
    }

    fn stdin(&mut self) -> Result<ChildStdin> {
        self.0.stdin.take().context("stdin")
    }

    fn stdout(&mut self) -> Result<ChildStdout> {
        self.0.stdout.take().context("stdout")
    }
}

impl Process {
    fn stop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.stop();
    }
}

const HTTP_SERVER: &str = r#"
import http.server, socketserver, sys, threading
name, host, port, log = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
lock = threading.Lock()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def answer(self):
        self.rfile.read(int(self.headers.get("content-length") or 0))
        # Recorded before the answer: a client holding the answer finds its request recorded.
        with lock, open(log, "a") as f:
            f.write("%s %d %s\n" % (self.client_address[0], self.client_address[1], self.requestline))
        body = ("%s %s\n" % (self.command, self.path)).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.send_header("x-served-by", name)
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = answer
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    def server_bind(self):
        # Not HTTPServer's: its getfqdn() would send a DNS query out of the namespace.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
server = Server((host, port), Handler)
print("ready", flush=True)
server.serve_forever()
"#;

/// An HTTP/1.1 server (keep-alive) in a namespace. Every request is answered `200` with the
/// header `x-served-by: <name>` and the body `<METHOD> <path>\n` (what the server received),
/// and recorded with its peer address.
pub struct PodHttpServer {
    process: Process,
    /// Under the tests' work root, named after the namespace (so after the run).
    log: PathBuf,
}

impl PodHttpServer {
    pub fn start(netns: &str, addr: SocketAddrV4, name: &str) -> Result<Self> {
        let log = work_root()?.join(format!("{netns}-{}.requests", addr.port()));
        std::fs::write(&log, "").with_context(|| format!("creating {}", log.display()))?;
        let mut server = Self {
            process: Process::spawn(&python(
                netns,
                HTTP_SERVER,
                &[
                    name.to_string(),
                    addr.ip().to_string(),
                    addr.port().to_string(),
                    log.display().to_string(),
                ],
            ))?,
            log,
        };
        let mut line = String::new();
        BufReader::new(server.process.stdout()?).read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("HTTP server {name} in {netns} did not start: {line:?}");
        }
        Ok(server)
    }

    /// Peer address and request line of every request so far, in order.
    pub fn seen(&self) -> Result<Vec<(SocketAddr, String)>> {
        std::fs::read_to_string(&self.log)?
            .lines()
            .map(|line| {
                let mut fields = line.splitn(3, ' ');
                let (ip, port, request) = (fields.next(), fields.next(), fields.next());
                let peer = format!("{}:{}", ip.unwrap_or_default(), port.unwrap_or_default());
                Ok((
                    peer.parse().with_context(|| format!("peer in {line:?}"))?,
                    request.unwrap_or_default().to_string(),
                ))
            })
            .collect()
    }
}

impl Drop for PodHttpServer {
    fn drop(&mut self) {
        // Stopped first: a request arriving after the removal would create the file again.
        self.process.stop();
        if let Err(e) = std::fs::remove_file(&self.log) {
            eprintln!("cleanup of {}: {e}", self.log.display());
        }
    }
}

/// Joins the cgroup given (before any socket exists), then runs the rest of the script.
const JOIN_CGROUP: &str = r#"
import os, sys
if sys.argv[1]:
    with open(os.path.join(sys.argv[1], "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
"#;

const HTTP_CLIENT: &str = r#"
import http.client, socket
host, port, timeout = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
conn = http.client.HTTPConnection(host, port, timeout=timeout)
def ask(method, path):
    try:
        conn.request(method, path, body=b"" if method in ("POST", "PUT") else None)
        response = conn.getresponse()
        body = response.read()
        return "HTTP %d %s %s" % (response.status, response.getheader("x-served-by") or "-", body.hex() or "-")
    except (socket.timeout, TimeoutError):
        conn.close()
        return "TIMEOUT"
    except ConnectionRefusedError:
        return "REFUSED"
    except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected):
        conn.close()
        return "RESET"
for line in sys.stdin:
    method, path = line.split()
    print(ask(method, path), flush=True)
"#;

/// What an HTTP client got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Http {
        status: u16,
        body: String,
        /// `x-served-by` of the answer: which backend answered (none when the proxy did).
        served_by: Option<String>,
    },
    /// The connection (its SYN) or the answer never came.
    TimedOut,
    Refused,
    Reset,
}

impl Reply {
    fn parse(line: &str) -> Result<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        Ok(match fields.as_slice() {
            ["TIMEOUT"] => Reply::TimedOut,
            ["REFUSED"] => Reply::Refused,
            ["RESET"] => Reply::Reset,
            ["HTTP", status, served_by, body] => Reply::Http {
                status: status.parse().context("status")?,
                body: if *body == "-" {
                    String::new()
                } else {
                    String::from_utf8_lossy(&unhex(body)?).into_owned()
                },
                served_by: (*served_by != "-").then(|| served_by.to_string()),
            },
            _ => bail!("the HTTP client said {line:?}"),
        })
    }
}

fn unhex(hex: &str) -> Result<Vec<u8>> {
    (0..hex.len())
        .step_by(2)
        .map(|i| {
            hex.get(i..i + 2)
                .and_then(|byte| u8::from_str_radix(byte, 16).ok())
                .with_context(|| format!("hex body {hex:?}"))
        })
        .collect()
}

/// One HTTP/1.1 connection from a namespace, kept open between requests (and opened again
/// after the server closed it). A client in `cgroup` has its Service addresses balanced by the
/// socket programs attached there.
pub struct HttpClient {
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    _process: Process,
}

impl HttpClient {
    pub fn connect(
        netns: &str,
        cgroup: Option<&Path>,
        target: SocketAddrV4,
        timeout_secs: u32,
    ) -> Result<Self> {
        let mut process = Process::spawn(&client(
            netns,
            HTTP_CLIENT,
            cgroup,
            target,
            timeout_secs,
            &[],
        ))?;
        Ok(Self {
            stdin: process.stdin()?,
            stdout: BufReader::new(process.stdout()?),
            _process: process,
        })
    }

    /// Sends `method path` (with an empty body for POST and PUT) and returns the reply.
    pub fn request(&mut self, method: &str, path: &str) -> Result<Reply> {
        writeln!(self.stdin, "{method} {path}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Reply::parse(line.trim())
    }
}

/// One request on a new connection from `netns` (3 s timeout).
pub fn http_request(
    netns: &str,
    cgroup: Option<&Path>,
    target: SocketAddrV4,
    method: &str,
    path: &str,
) -> Result<Reply> {
    HttpClient::connect(netns, cgroup, target, 3)?.request(method, path)
}

/// What a plain TCP or UDP client saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectOutcome {
    /// Connected; `peer` is what getpeername() (TCP) or recvfrom() (UDP) returned, `reply`
    /// what the server sent.
    Connected {
        peer: SocketAddrV4,
        reply: String,
    },
    Refused,
    TimedOut,
}

const CONNECT_CLIENT: &str = r#"
import errno, socket
host, port, timeout, mode = sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
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

/// A TCP client in `netns` (in `cgroup` when given): connect, getpeername, read the reply.
pub fn pod_connect(
    netns: &str,
    cgroup: Option<&Path>,
    target: SocketAddrV4,
    timeout_secs: u32,
) -> Result<ConnectOutcome> {
    connect_client(netns, "tcp", cgroup, target, timeout_secs)
}

/// A UDP client in `netns`: an unconnected sendto, then recvfrom (whose source address is the
/// `peer`); EHOSTUNREACH counts as `Refused`.
pub fn pod_udp_exchange(
    netns: &str,
    cgroup: Option<&Path>,
    target: SocketAddrV4,
    timeout_secs: u32,
) -> Result<ConnectOutcome> {
    connect_client(netns, "udp", cgroup, target, timeout_secs)
}

fn connect_client(
    netns: &str,
    mode: &str,
    cgroup: Option<&Path>,
    target: SocketAddrV4,
    timeout_secs: u32,
) -> Result<ConnectOutcome> {
    let args = client(netns, CONNECT_CLIENT, cgroup, target, timeout_secs, &[mode]);
    let out = run("ip", &args.iter().map(String::as_str).collect::<Vec<_>>())?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_lines_parse_into_replies() {
        assert_eq!(
            Reply::parse("HTTP 403 - 4163636573732064656e6965640d0a").ok(),
            Some(Reply::Http {
                status: 403,
                body: "Access denied\r\n".into(),
                served_by: None
            })
        );
        assert_eq!(
            Reply::parse("HTTP 200 api-0 -").ok(),
            Some(Reply::Http {
                status: 200,
                body: String::new(),
                served_by: Some("api-0".into())
            })
        );
        assert_eq!(Reply::parse("TIMEOUT").ok(), Some(Reply::TimedOut));
        assert!(Reply::parse("HTTP 200 x 4").is_err(), "odd hex");
        assert!(Reply::parse("Traceback").is_err());
    }
}
