//! datapath input: `BpfState`, what the agent's compile step hands to `Datapath::apply`. Plain
//! data, no kernel types; the crate owns it so it never depends on the config model.

use std::net::{Ipv4Addr, SocketAddrV4};

use ipnet::Ipv4Net;

/// Everything the kernel should enforce on this node. `apply` makes the maps equal to it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BpfState {
    /// Pods on this node, each with its own policy.
    pub endpoints: Vec<Endpoint>,
    /// IP/prefix -> security identity for every peer policy can name (pods anywhere, nodes,
    /// CIDR identities). Unlisted addresses are `world` (2).
    pub ipcache: Vec<IpcacheEntry>,
    /// Services for socket load balancing.
    pub services: Vec<Service>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub identity: u32,
    /// Host-side veth of the pod (in the node namespace).
    pub ifindex: u32,
    /// A policy selects this endpoint for ingress: traffic not allowed is dropped.
    pub enforce_ingress: bool,
    /// A policy selects this endpoint for egress: traffic not allowed is dropped.
    pub enforce_egress: bool,
    pub policy: Vec<PolicyEntry>,
}

/// One L3/L4 rule of an endpoint, after selectors were resolved to identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    pub direction: Direction,
    /// `None`: any peer identity.
    pub remote_identity: Option<u32>,
    pub protocol: Protocol,
    /// `None`: all ports. Ignored (all ports) for protocols without ports.
    pub ports: Option<PortRange>,
    pub action: PolicyAction,
    /// `authentication.mode: required`: only allowed through the proxy (which does mTLS); an
    /// allow without a redirect is dropped with AUTH_REQUIRED (189).
    pub auth_required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    Ingress,
    Egress,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    /// Cilium's `ANY`: with ports it means TCP, UDP and SCTP.
    Any,
    Tcp,
    Udp,
    Sctp,
    Icmp,
}

/// Inclusive port range (`port` .. `endPort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub first: u16,
    pub last: u16,
}

impl PortRange {
    pub fn single(port: u16) -> Self {
        Self {
            first: port,
            last: port,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PolicyAction {
    Allow,
    Deny,
    /// Allow through the L7 proxy listening transparently on this port (node namespace,
    /// 127.0.0.1 or wildcard). If nothing listens there, the flow is dropped.
    Redirect {
        proxy_port: u16,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpcacheEntry {
    pub cidr: Ipv4Net,
    pub identity: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub vip: Ipv4Addr,
    pub port: u16,
    pub protocol: L4Protocol,
    /// Listed in a CiliumEnvoyConfig: connect() keeps the VIP and TC sends the flow to the proxy
    /// on this port, which balances it.
    pub l7_proxy_port: Option<u16>,
    /// Empty: connect() is refused (ECONNREFUSED; sendmsg: EHOSTUNREACH).
    pub backends: Vec<SocketAddrV4>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Protocol {
    Tcp,
    Udp,
}

impl L4Protocol {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => IPPROTO_TCP,
            Self::Udp => IPPROTO_UDP,
        }
    }

    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            _ => None,
        }
    }
}

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_SCTP: u8 = 132;

impl Protocol {
    /// The IP protocol number, `None` for `Any`.
    pub fn number(self) -> Option<u8> {
        match self {
            Self::Any => None,
            Self::Tcp => Some(IPPROTO_TCP),
            Self::Udp => Some(IPPROTO_UDP),
            Self::Sctp => Some(IPPROTO_SCTP),
            Self::Icmp => Some(IPPROTO_ICMP),
        }
    }

    /// The protocol of a policy key's protocol byte (0 is `Any`).
    pub fn from_number(number: u8) -> Option<Self> {
        match number {
            0 => Some(Self::Any),
            IPPROTO_TCP => Some(Self::Tcp),
            IPPROTO_UDP => Some(Self::Udp),
            IPPROTO_SCTP => Some(Self::Sctp),
            IPPROTO_ICMP => Some(Self::Icmp),
            _ => None,
        }
    }

    pub fn has_ports(self) -> bool {
        matches!(self, Self::Tcp | Self::Udp | Self::Sctp)
    }
}
