//! The demo's network (before sources): loopback pod addresses on port 80, in a private namespace when port 80 is privileged.
//!
//! Cilium's Star Wars manifests have the deathstar pods listen on port 80 and the policies name
//! port 80, so the demo's pods bind it as the manifests say. Mapping only the Service's frontend
//! to an unprivileged port would not help: the pods themselves need port 80, and renumbering
//! them would change what the unchanged policies mean. A user who may not bind port 80 gets the
//! demo in a user and network namespace of its own instead, where it may, with nothing of the
//! manifests changed.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

/// Where the demo runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// The host's loopback (root, CAP_NET_BIND_SERVICE, or port 80 unprivileged by sysctl).
    Host,
    /// A private user and network namespace: its own loopback, reachable from nothing outside.
    Private,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(
        "the demo's pods listen on port 80, as Cilium's manifests say; that needs root or \
         CAP_NET_BIND_SERVICE, and the private user and network namespace the demo uses \
         without them was refused ({step}: {source}). Run it as root, or allow port 80 with \
         `sysctl net.ipv4.ip_unprivileged_port_start=80`"
    )]
    Namespace { step: &'static str, source: std::io::Error },
}

/// Port 80 on loopback: the kernel checks the privilege before whether the port is taken, so
/// only `PermissionDenied` means "not allowed".
fn may_bind_port_80() -> bool {
    match TcpListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 80))) {
        Err(err) => err.kind() != ErrorKind::PermissionDenied,
        Ok(_) => true,
    }
}

/// Makes port 80 on loopback bindable for the demo, entering a private namespace if needed.
///
/// Call it while the process has a single thread (before the async runtime starts): the kernel
/// gives a new user namespace only to a single-threaded process.
pub fn prepare() -> Result<Network, NetworkError> {
    if may_bind_port_80() {
        return Ok(Network::Host);
    }
    enter_private_namespace()?;
    if !may_bind_port_80() {
        return Err(NetworkError::Namespace {
            step: "binding port 80 inside it",
            source: std::io::Error::from(ErrorKind::PermissionDenied),
        });
    }
    Ok(Network::Private)
}

fn os_step(step: &'static str, result: libc::c_int) -> Result<(), NetworkError> {
    if result < 0 {
        return Err(NetworkError::Namespace { step, source: std::io::Error::last_os_error() });
    }
    Ok(())
}

/// unshare(2) a user and a network namespace, become root inside the user namespace (mapped to
/// the caller, so files stay the caller's), and bring the new loopback up.
fn enter_private_namespace() -> Result<(), NetworkError> {
    // SAFETY: getuid/getgid cannot fail and touch no memory.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    // SAFETY: unshare takes flags only; the caller guarantees a single thread.
    os_step("unshare", unsafe { libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET) })?;
    for (file, content) in [
        ("/proc/self/setgroups", "deny".to_owned()),
        ("/proc/self/uid_map", format!("0 {uid} 1")),
        ("/proc/self/gid_map", format!("0 {gid} 1")),
    ] {
        std::fs::write(file, content).map_err(|source| NetworkError::Namespace { step: file, source })?;
    }
    loopback_up()
}

/// `ip link set lo up`, by the SIOCGIFFLAGS/SIOCSIFFLAGS ioctls.
fn loopback_up() -> Result<(), NetworkError> {
    // SAFETY: a plain socket(2) call; the descriptor is closed below on every path.
    let socket = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    os_step("opening a socket to configure lo", socket)?;
    // SAFETY: ifreq is plain old data; all zeroes is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo") {
        *slot = *byte as libc::c_char;
    }
    // SAFETY: `request` is a valid ifreq naming "lo" (NUL-terminated by the zeroing) and lives
    // across both calls; the flags member is the one these ioctls read and write.
    let result = unsafe {
        let got = libc::ioctl(socket, libc::SIOCGIFFLAGS, &mut request);
        if got < 0 {
            got
        } else {
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            libc::ioctl(socket, libc::SIOCSIFFLAGS, &request)
        }
    };
    let error = std::io::Error::last_os_error();
    // SAFETY: `socket` is the descriptor opened above and not used after this.
    unsafe { libc::close(socket) };
    if result < 0 {
        return Err(NetworkError::Namespace { step: "bringing lo up", source: error });
    }
    Ok(())
}
