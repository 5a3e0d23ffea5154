//! connect() benchmark (datapath side): N ClusterIP Services with two backends each, as sluice
//! socket-LB state or as kube-proxy-style iptables DNAT rules, and the pod-side client (connect
//! then close, to a VIP picked at random per connect) and backends (accept then close).

use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::Rng;
use sluice_ebpf::{L4Protocol, Service};

/// Every Service listens on this port, like most real ones.
pub const SERVICE_PORT: u16 = 80;
/// Every backend pod accepts on this port.
pub const BACKEND_PORT: u16 = 8080;
/// Service `i` has ClusterIP `FIRST_VIP + i`: kube's default 10.96.0.0/12 holds 1M of them.
pub const FIRST_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 0);

/// The ClusterIP of Service `index`.
pub fn vip(index: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(FIRST_VIP).wrapping_add(index))
}

/// The two backends of every Service: `first` and the address after it, so that iptables can
/// name both in one DNAT range (one rule per Service).
pub fn backends(first: Ipv4Addr) -> [SocketAddrV4; 2] {
    let second = Ipv4Addr::from(u32::from(first).wrapping_add(1));
    [
        SocketAddrV4::new(first, BACKEND_PORT),
        SocketAddrV4::new(second, BACKEND_PORT),
    ]
}

/// `count` TCP Services for sluice's socket LB, each balancing over [`backends`]`(first)`.
pub fn services(count: u32, first_backend: Ipv4Addr) -> Vec<Service> {
    let backends = backends(first_backend).to_vec();
    (0..count)
        .map(|index| Service {
            vip: vip(index),
            port: SERVICE_PORT,
            protocol: L4Protocol::Tcp,
            l7_proxy_port: None,
            backends: backends.clone(),
        })
        .collect()
}

/// The same Services as an `iptables-restore` input for the client's own namespace: kube-proxy's
/// shape (nat OUTPUT jumps to a KUBE-SERVICES chain with one match per Service, walked in order
/// for the first packet of every connection), except that each match DNATs straight to the
/// two-address backend range instead of jumping through per-Service and per-endpoint chains.
pub fn iptables_restore(count: u32, first_backend: Ipv4Addr) -> String {
    let [low, high] = backends(first_backend);
    let mut rules = String::from(
        "*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A OUTPUT -j KUBE-SERVICES\n",
    );
    for index in 0..count {
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {}/32 -p tcp -m tcp --dport {SERVICE_PORT} -j DNAT --to-destination {}-{}:{BACKEND_PORT}",
            vip(index),
            low.ip(),
            high.ip(),
        );
    }
    rules.push_str("COMMIT\n");
    rules
}

/// What one client run did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClientResult {
    pub connects: u64,
    pub errors: u64,
    pub seconds: f64,
}

impl ClientResult {
    pub fn per_second(&self) -> f64 {
        if self.seconds > 0.0 {
            self.connects as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// The one line the client prints for the harness.
    pub fn line(&self) -> String {
        format!(
            "sluice-connect connects={} errors={} seconds={:.6}",
            self.connects, self.errors, self.seconds
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("connect client output: {0}")]
pub struct ClientOutputError(String);

/// The [`ClientResult::line`] in a client's stdout.
pub fn parse_client_output(stdout: &str) -> Result<ClientResult, ClientOutputError> {
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("sluice-connect "))
        .ok_or_else(|| ClientOutputError(format!("no `sluice-connect` line in {stdout:?}")))?;
    let field = |name: &str| -> Result<&str, ClientOutputError> {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
            .ok_or_else(|| ClientOutputError(format!("no {name} in {line:?}")))
    };
    let number = |name: &str| -> Result<f64, ClientOutputError> {
        field(name)?
            .parse()
            .map_err(|_| ClientOutputError(format!("{name} is not a number in {line:?}")))
    };
    Ok(ClientResult {
        connects: number("connects")? as u64,
        errors: number("errors")? as u64,
        seconds: number("seconds")?,
    })
}

/// Connects to `first + random(0..count)` : `port` and closes, for `duration`; one connection
/// at a time. The close is an RST (SO_LINGER 0) so that no TIME_WAIT piles up and runs out the
/// ephemeral ports: what is measured is connection setup, through the kernel's LB.
pub fn run_client(first: Ipv4Addr, count: u32, port: u16, duration: Duration) -> ClientResult {
    let mut rng = rand::rng();
    let (mut connects, mut errors) = (0u64, 0u64);
    let start = Instant::now();
    let first = u32::from(first);
    while start.elapsed() < duration {
        let target = Ipv4Addr::from(first.wrapping_add(rng.random_range(0..count.max(1))));
        match TcpStream::connect(SocketAddrV4::new(target, port)) {
            Ok(stream) => {
                if reset_on_close(&stream).is_err() {
                    errors += 1;
                }
                connects += 1;
            }
            Err(_) => errors += 1,
        }
    }
    ClientResult {
        connects,
        errors,
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn reset_on_close(stream: &TcpStream) -> io::Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A backend that accepts and closes, on a listener already bound (in its pod's namespace).
/// Stopped on drop: shutting the listener down wakes the blocked accept.
pub struct AcceptCloseBackend {
    listener: Arc<TcpListener>,
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<u64>>,
}

impl AcceptCloseBackend {
    pub fn start(listener: TcpListener) -> Self {
        let listener = Arc::new(listener);
        let stopping = Arc::new(AtomicBool::new(false));
        let thread = {
            let (listener, stopping) = (Arc::clone(&listener), Arc::clone(&stopping));
            std::thread::spawn(move || {
                let mut accepted = 0;
                while !stopping.load(Ordering::Relaxed) {
                    // The stream drops (closes) at once; a failed accept (a client's RST
                    // already queued) is the client's business.
                    if listener.accept().is_ok() {
                        accepted += 1;
                    }
                }
                accepted
            })
        };
        Self {
            listener,
            stopping,
            thread: Some(thread),
        }
    }
}

impl Drop for AcceptCloseBackend {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // SAFETY: the listener's fd is valid while `self.listener` lives.
        unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RDWR) };
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_vips_are_consecutive_and_share_two_backends() {
        let services = services(3, Ipv4Addr::new(198, 18, 0, 11));
        let vips: Vec<String> = services.iter().map(|s| s.vip.to_string()).collect();
        assert_eq!(vips, ["10.96.0.0", "10.96.0.1", "10.96.0.2"]);
        assert!(services.iter().all(|s| s.port == 80
            && s.backends
                == [
                    "198.18.0.11:8080".parse().expect("address"),
                    "198.18.0.12:8080".parse().expect("address")
                ]));
        assert_eq!(vip(65_536).to_string(), "10.97.0.0");
    }

    #[test]
    fn iptables_has_one_dnat_rule_per_service_behind_the_output_jump() {
        let rules = iptables_restore(2, Ipv4Addr::new(198, 18, 0, 11));
        assert_eq!(
            rules,
            "*nat\n:OUTPUT ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n-A OUTPUT -j KUBE-SERVICES\n\
             -A KUBE-SERVICES -d 10.96.0.0/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 198.18.0.11-198.18.0.12:8080\n\
             -A KUBE-SERVICES -d 10.96.0.1/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 198.18.0.11-198.18.0.12:8080\n\
             COMMIT\n"
        );
    }

    #[test]
    fn client_line_round_trips_and_garbage_is_refused() {
        let result = ClientResult {
            connects: 12_345,
            errors: 2,
            seconds: 1.5,
        };
        let parsed = parse_client_output(&format!("noise\n{}\n", result.line())).expect("parses");
        assert_eq!(parsed, result);
        assert_eq!(parsed.per_second(), 8230.0);
        assert!(parse_client_output("sluice-connect connects=1 errors=0").is_err());
        assert!(parse_client_output("nothing").is_err());
    }

    #[test]
    fn the_client_counts_refused_connects_as_errors() {
        // Nothing listens on a just-closed port of loopback: every connect is refused.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let result = run_client(Ipv4Addr::LOCALHOST, 1, port, Duration::from_millis(20));
        assert_eq!(result.connects, 0);
        assert!(result.errors > 0);
    }

    #[test]
    fn the_backend_accepts_what_the_client_connects() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("address").port();
        let backend = AcceptCloseBackend::start(listener);
        let result = run_client(Ipv4Addr::LOCALHOST, 1, port, Duration::from_millis(50));
        drop(backend);
        assert!(result.connects > 0);
        assert_eq!(result.errors, 0);
    }
}
