//! The serving form of `ProxyTables` (compile -> **snapshot** -> datapath): built once per apply, read lock-free per request.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use foldhash::HashMap;
use hyper::server::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use ipnet::IpNet;

use crate::authorize::CompiledPolicy;
use crate::http1::Http1Settings;
use crate::tables::{EndpointPolicy, HttpConnectionManager, Identity, Peer, IDENTITY_WORLD};
use crate::upstream::ClusterState;

/// One generation of tables as the request path uses them.
pub(crate) struct Snapshot {
    pub generation: u64,
    /// Listener settings by socket slot (see `listener::Sockets`); `None` for free slots.
    pub listeners: Vec<Option<ListenerEntry>>,
    pub clusters: HashMap<String, Arc<ClusterState>>,
    pub policies: HashMap<IpAddr, Arc<CompiledEndpoint>>,
    /// `ProxyTables::frontends` resolved to listener slots.
    pub frontends: HashMap<SocketAddr, usize>,
    /// `ProxyTables::cidr_identities` for longest-prefix lookups.
    pub prefixes: PrefixTable,
    /// `ProxyTables::peers` as the request path reads them: a hash lookup, and a name every
    /// flow event can share.
    pub peers: HashMap<IpAddr, KnownPeer>,
}

/// A pod or node address of `ProxyTables::peers`.
pub(crate) struct KnownPeer {
    pub identity: Identity,
    pub name: Arc<str>,
}

impl KnownPeer {
    pub fn index(peers: &BTreeMap<IpAddr, Peer>) -> HashMap<IpAddr, KnownPeer> {
        peers.iter().map(|(ip, peer)| (*ip, KnownPeer { identity: peer.identity, name: Arc::from(peer.name.as_str()) })).collect()
    }
}

pub(crate) struct ListenerEntry {
    pub name: Arc<str>,
    /// `Bind::Transparent`: the listener's own address; its accepted sockets carry the flow's
    /// original destination.
    pub transparent: Option<SocketAddr>,
    pub http: Arc<HttpConnectionManager>,
    /// Connection settings derived from the HCM, shared by the listener's connections.
    pub http1: Http1Settings,
    pub http2: Arc<Http2Server>,
}

/// An endpoint's policy compiled for matching, both directions.
pub(crate) struct CompiledEndpoint {
    pub ingress: CompiledPolicy,
    pub egress: CompiledPolicy,
}

impl CompiledEndpoint {
    pub fn new(policy: &EndpointPolicy) -> Self {
        Self { ingress: CompiledPolicy::new(&policy.ingress), egress: CompiledPolicy::new(&policy.egress) }
    }
}

impl Snapshot {
    pub fn empty() -> Self {
        Self {
            generation: 0,
            listeners: Vec::new(),
            clusters: HashMap::default(),
            policies: HashMap::default(),
            frontends: HashMap::default(),
            prefixes: PrefixTable::default(),
            peers: HashMap::default(),
        }
    }

    pub fn listener(&self, slot: usize) -> Option<&ListenerEntry> {
        self.listeners.get(slot).and_then(Option::as_ref)
    }

    /// Who serves a connection accepted on `slot` whose socket's local address is `local`.
    pub fn dispatch(&self, slot: usize, local: SocketAddr) -> Dispatch {
        let transparent = self.listener(slot).and_then(|entry| entry.transparent);
        dispatch(slot, transparent, local, &self.frontends)
    }

    /// Who is behind `ip`: a known pod or node, else the identity of the longest CIDR prefix
    /// containing it, else the world identity (the kernel's ipcache LPM gives the same answer).
    pub fn peer(&self, ip: IpAddr) -> (u32, Option<&KnownPeer>) {
        match self.peers.get(&ip) {
            Some(peer) => (peer.identity, Some(peer)),
            None => (self.prefixes.lookup(ip).unwrap_or(IDENTITY_WORLD), None),
        }
    }
}

/// Longest-prefix match over a few CIDR prefixes: one hash lookup per distinct prefix length,
/// longest first, so a request costs at most 33 (IPv4) or 129 (IPv6) lookups however many
/// prefixes there are, and usually a handful.
#[derive(Debug, Default)]
pub(crate) struct PrefixTable {
    /// (prefix length, truncated prefix -> identity), longest length first.
    by_length: Vec<(u8, HashMap<IpNet, Identity>)>,
}

impl PrefixTable {
    pub fn new(prefixes: &[(IpNet, Identity)]) -> Self {
        let mut by_length: BTreeMap<u8, HashMap<IpNet, Identity>> = BTreeMap::new();
        for (net, identity) in prefixes {
            by_length.entry(net.prefix_len()).or_default().entry(net.trunc()).or_insert(*identity);
        }
        Self { by_length: by_length.into_iter().rev().collect() }
    }

    /// The identity of the longest prefix containing `ip`.
    pub fn lookup(&self, ip: IpAddr) -> Option<Identity> {
        self.by_length.iter().find_map(|(length, nets)| {
            // `IpNet::new` refuses a length longer than the address family has.
            let net = IpNet::new(ip, *length).ok()?.trunc();
            nets.get(&net).copied()
        })
    }
}

/// Where an accepted connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Dispatch {
    /// The listener slot whose HCM, routes and name serve the connection.
    pub slot: usize,
    /// The destination the client connected to before the kernel redirected it; only
    /// connections accepted by a transparent listener have one.
    pub original_destination: Option<SocketAddr>,
}

/// A transparent listener's connection is served by the frontend registered for its original
/// destination (a CiliumEnvoyConfig service VIP), else by the accepting listener; any other
/// connection by its accepting listener, without an original destination. So is a connection
/// made to the transparent listener's own address (not redirected): forwarding it to its
/// "original destination" would connect the proxy to itself, without end.
fn dispatch(accepted_on: usize, transparent: Option<SocketAddr>, local: SocketAddr, frontends: &HashMap<SocketAddr, usize>) -> Dispatch {
    if transparent.is_none_or(|own| own == local) {
        return Dispatch { slot: accepted_on, original_destination: None };
    }
    Dispatch { slot: frontends.get(&local).copied().unwrap_or(accepted_on), original_destination: Some(local) }
}

/// The HTTP/1 server's settings for one HCM.
pub(crate) fn http1_settings(hcm: &HttpConnectionManager) -> Http1Settings {
    Http1Settings {
        // Normalization applies the exact `max_request_headers_kb` (names, values and target) and
        // answers 431; the wire limit only has to leave room for the separators around them.
        max_head_bytes: hcm.max_request_headers_bytes.saturating_add(4 * hcm.max_headers_count + 1024),
        // Normalization counts against `max_headers_count` exactly; this only stops the parser.
        max_headers: hcm.max_headers_count + 1,
        headers_timeout: hcm.request_headers_timeout,
        idle_timeout: hcm.idle_timeout.filter(|timeout| !timeout.is_zero()),
    }
}

/// What serves one HCM's HTTP/2 clients (prior knowledge; HTTP/1.1 is `http1`'s).
pub(crate) struct Http2Server {
    pub builder: http2::Builder<TokioExecutor>,
    /// The listener's `stream_idle_timeout`, for the connection's stall check.
    pub stream_idle: Option<std::time::Duration>,
}

impl Http2Server {
    pub fn new(hcm: &HttpConnectionManager) -> Self {
        Self { builder: http2_builder(hcm), stream_idle: hcm.stream_idle_timeout.filter(|timeout| !timeout.is_zero()) }
    }
}

/// hyper's HTTP/2 connection builder for one HCM.
fn http2_builder(hcm: &HttpConnectionManager) -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(hcm.max_request_headers_bytes).unwrap_or(u32::MAX))
        // Envoy's current defaults (envoy-ztunnel.md §2.11); also bounds Rapid Reset work.
        .max_concurrent_streams(1024)
        .max_pending_accept_reset_streams(100);
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_takes_the_identity_of_the_longest_prefix_containing_it() {
        let net = |s: &str| s.parse::<IpNet>().expect("test prefix");
        let ip = |s: &str| s.parse::<IpAddr>().expect("test address");
        let table = PrefixTable::new(&[
            (net("10.0.0.0/8"), 100),
            (net("10.96.0.0/12"), 101),
            (net("10.96.3.4/32"), 102),
            // Host bits are ignored, as the kernel's LPM trie ignores them.
            (net("20.1.1.7/24"), 103),
            (net("fd00::/8"), 104),
        ]);
        assert_eq!(table.lookup(ip("10.1.2.3")), Some(100));
        assert_eq!(table.lookup(ip("10.96.0.5")), Some(101));
        assert_eq!(table.lookup(ip("10.111.255.255")), Some(101));
        assert_eq!(table.lookup(ip("10.112.0.0")), Some(100));
        assert_eq!(table.lookup(ip("10.96.3.4")), Some(102));
        assert_eq!(table.lookup(ip("20.1.1.200")), Some(103));
        assert_eq!(table.lookup(ip("fd12::1")), Some(104));
        assert_eq!(table.lookup(ip("8.8.8.8")), None);
        // An IPv4-mapped IPv6 address is not the IPv4 address's prefix.
        assert_eq!(table.lookup(ip("::ffff:10.1.2.3")), None);
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn a_transparent_connection_to_a_frontend_vip_is_served_by_the_frontend_listener() {
        let frontends = HashMap::from_iter([(addr("10.96.0.10:80"), 3)]);
        assert_eq!(
            dispatch(0, Some(addr("127.0.0.1:15001")), addr("10.96.0.10:80"), &frontends),
            Dispatch { slot: 3, original_destination: Some(addr("10.96.0.10:80")) }
        );
    }

    #[test]
    fn a_transparent_connection_to_anything_else_keeps_its_listener_and_original_destination() {
        let frontends = HashMap::from_iter([(addr("10.96.0.10:80"), 3)]);
        // Same VIP, other port: not the frontend.
        assert_eq!(
            dispatch(0, Some(addr("127.0.0.1:15001")), addr("10.96.0.10:8080"), &frontends),
            Dispatch { slot: 0, original_destination: Some(addr("10.96.0.10:8080")) }
        );
        assert_eq!(
            dispatch(0, Some(addr("127.0.0.1:15001")), addr("10.0.1.7:80"), &frontends),
            Dispatch { slot: 0, original_destination: Some(addr("10.0.1.7:80")) }
        );
    }

    #[test]
    fn a_gateway_connection_has_no_original_destination_even_to_a_frontend_address() {
        // A gateway listener bound on an address that also is a frontend key: its local
        // address is only where it listens, never a redirected destination.
        let frontends = HashMap::from_iter([(addr("127.0.0.1:8080"), 3)]);
        assert_eq!(dispatch(1, None, addr("127.0.0.1:8080"), &frontends), Dispatch { slot: 1, original_destination: None });
    }

    #[test]
    fn a_direct_connection_to_the_transparent_listener_has_no_original_destination() {
        let own = addr("127.0.0.1:15001");
        assert_eq!(dispatch(0, Some(own), own, &HashMap::default()), Dispatch { slot: 0, original_destination: None });
    }
}
