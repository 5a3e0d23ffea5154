//! Kernel tests (tests only): the real programs in the real kernel, through BPF_PROG_TEST_RUN
//! (policy precedence, conntrack, fail-closed redirect, Maglev selection) and through network
//! namespaces (TC policy on veths, socket LB on a test cgroup).

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};

use anyhow::{Context, Result};
use aya::programs::{SchedClassifier, TestRun, TestRunOptions};
use aya::EbpfLoader;

use crate::datapath::PROG_FROM_CONTAINER;
use crate::state::{
    BpfState, Direction, Endpoint, IpcacheEntry, L4Protocol, PolicyAction, PolicyEntry, PortRange,
    Protocol, Service,
};
use crate::testing::{self, pod_connect, ConnectOutcome, Node, PodServer, TestDir};
use crate::{Datapath, DropReason, FlowEvent, FlowEvents, ObservationPoint, Verdict};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 10);
const SERVER: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 11);
const CLIENT_ID: u32 = 1000;
const SERVER_ID: u32 = 2000;
const LOOPBACK_IFINDEX: u32 = 1;

/// An Ethernet + IPv4 + TCP (SYN) or UDP packet.
fn packet(src: SocketAddrV4, dst: SocketAddrV4, protocol: u8) -> Vec<u8> {
    let l4_len = if protocol == 6 { 20 } else { 8 };
    let mut p = vec![0u8; 14];
    p[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let total = (20 + l4_len) as u16;
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&total.to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, 0, 64, protocol, 0, 0]);
    p.extend_from_slice(&src.ip().octets());
    p.extend_from_slice(&dst.ip().octets());
    p.extend_from_slice(&src.port().to_be_bytes());
    p.extend_from_slice(&dst.port().to_be_bytes());
    if protocol == 6 {
        p.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        p.extend_from_slice(&[0, 8, 0, 0]);
    }
    p
}

fn run_packet(program: &SchedClassifier, packet: &[u8]) -> Result<u32> {
    let result = program.test_run(TestRunOptions {
        data_in: Some(packet),
        ..Default::default()
    })?;
    Ok(result.return_value)
}

/// A client pod and a server pod, both "attached" to loopback (test runs see ifindex 1), the
/// server enforcing ingress with `policy`.
fn two_pods(policy: Vec<PolicyEntry>) -> BpfState {
    let endpoint = |ip, identity, enforce_ingress, policy| Endpoint {
        ip,
        identity,
        ifindex: LOOPBACK_IFINDEX,
        enforce_ingress,
        enforce_egress: false,
        policy,
    };
    BpfState {
        endpoints: vec![
            endpoint(CLIENT, CLIENT_ID, false, vec![]),
            endpoint(SERVER, SERVER_ID, true, policy),
        ],
        ipcache: vec![
            IpcacheEntry {
                cidr: "198.18.0.10/32".parse().expect("cidr"),
                identity: CLIENT_ID,
            },
            IpcacheEntry {
                cidr: "198.18.0.11/32".parse().expect("cidr"),
                identity: SERVER_ID,
            },
        ],
        services: vec![],
    }
}

fn rule(
    identity: Option<u32>,
    protocol: Protocol,
    port: Option<u16>,
    action: PolicyAction,
) -> PolicyEntry {
    PolicyEntry {
        direction: Direction::Ingress,
        remote_identity: identity,
        protocol,
        ports: port.map(PortRange::single),
        action,
        auth_required: false,
    }
}

fn redirect(port: u16) -> PolicyAction {
    PolicyAction::Redirect { proxy_port: port }
}

struct Harness {
    datapath: Datapath,
    events: FlowEvents,
    _pins: TestDir,
    next_sport: u16,
}

impl Harness {
    fn new(tag: &str) -> Result<Self> {
        let pins = TestDir::pins(tag)?;
        let mut datapath = Datapath::load(&pins.path)?;
        let events = datapath.flow_events()?;
        Ok(Self {
            datapath,
            events,
            _pins: pins,
            next_sport: 40000,
        })
    }

    /// Sends one new flow client -> server:dport and returns the TC verdict and its events.
    fn send(&mut self, protocol: u8, dport: u16) -> Result<(u32, Vec<FlowEvent>)> {
        self.next_sport += 1;
        let sport = self.next_sport;
        self.send_tuple(protocol, sport, dport)
    }

    fn send_tuple(
        &mut self,
        protocol: u8,
        sport: u16,
        dport: u16,
    ) -> Result<(u32, Vec<FlowEvent>)> {
        let pkt = packet(
            SocketAddrV4::new(CLIENT, sport),
            SocketAddrV4::new(SERVER, dport),
            protocol,
        );
        let verdict = run_packet(self.datapath.classifier(PROG_FROM_CONTAINER)?, &pkt)?;
        Ok((verdict, self.events.drain()))
    }
}

/// The verdict in short. No proxy listens in these tests, so a flow sent to the proxy ends in
/// SOCKET_LOOKUP_FAILED (fail closed), whose event names the proxy port that won.
fn outcome(result: &(u32, Vec<FlowEvent>)) -> String {
    let (code, events) = result;
    match (code, events.as_slice()) {
        (&TC_ACT_SHOT, [drop]) if drop.drop_reason == Some(DropReason::SocketLookupFailed) => {
            format!("redirect:{}", drop.proxy_port)
        }
        (&TC_ACT_SHOT, [drop]) if drop.verdict == Verdict::Dropped => {
            format!(
                "drop:{}",
                drop.drop_reason.map(|r| r.code()).unwrap_or_default()
            )
        }
        (&TC_ACT_OK, [forward]) if forward.verdict == Verdict::Forwarded => "forward".to_string(),
        _ => format!("unexpected {code} {events:?}"),
    }
}

#[test]
fn policy_lookup_follows_ciliums_precedence() -> Result<()> {
    if !testing::privileged("policy_lookup_follows_ciliums_precedence") {
        return Ok(());
    }
    let mut h = Harness::new("prec")?;
    // Cilium's order: id/proto/port, ANY/proto/port, id/proto/ANY, ANY/proto/ANY, id/ANY, ANY/ANY.
    let levels = [
        rule(Some(CLIENT_ID), Protocol::Tcp, Some(80), redirect(10001)),
        rule(None, Protocol::Tcp, Some(80), redirect(10002)),
        rule(Some(CLIENT_ID), Protocol::Tcp, None, redirect(10003)),
        rule(None, Protocol::Tcp, None, redirect(10004)),
        rule(Some(CLIENT_ID), Protocol::Any, None, redirect(10005)),
        rule(None, Protocol::Any, None, redirect(10006)),
    ];
    for first in 0..levels.len() {
        h.datapath.apply(&two_pods(levels[first..].to_vec()))?;
        assert_eq!(
            outcome(&h.send(6, 80)?),
            format!("redirect:{}", 10001 + first),
            "levels {}..6 installed",
            first + 1
        );
    }
    // Only entries for another identity and another port: nothing matches -> POLICY_DENIED.
    h.datapath.apply(&two_pods(vec![
        rule(Some(4242), Protocol::Tcp, Some(80), PolicyAction::Allow),
        rule(None, Protocol::Tcp, Some(443), PolicyAction::Allow),
    ]))?;
    assert_eq!(outcome(&h.send(6, 80)?), "drop:133");
    // Port/protocol mismatch on UDP falls back to ANY/ANY; a redirect of UDP cannot be proxied.
    h.datapath.apply(&two_pods(vec![
        rule(None, Protocol::Tcp, Some(53), PolicyAction::Allow),
        rule(None, Protocol::Any, None, redirect(10006)),
    ]))?;
    assert_eq!(outcome(&h.send(17, 53)?), "drop:180");
    Ok(())
}

#[test]
fn deny_beats_allow_and_auth_requires_the_proxy() -> Result<()> {
    if !testing::privileged("deny_beats_allow_and_auth_requires_the_proxy") {
        return Ok(());
    }
    let mut h = Harness::new("deny")?;
    h.datapath.apply(&two_pods(vec![
        rule(
            Some(CLIENT_ID),
            Protocol::Tcp,
            Some(80),
            PolicyAction::Allow,
        ),
        rule(None, Protocol::Any, None, PolicyAction::Deny),
    ]))?;
    let (verdict, events) = h.send(6, 80)?;
    assert_eq!(verdict, TC_ACT_SHOT);
    let drop = events
        .iter()
        .find(|e| e.verdict == Verdict::Dropped)
        .context("drop event")?;
    assert_eq!(drop.drop_reason, Some(DropReason::PolicyDeny));
    assert_eq!(
        (drop.direction, drop.src_identity, drop.dst_identity),
        (Direction::Ingress, CLIENT_ID, SERVER_ID)
    );
    assert_eq!(
        (drop.tcp_flags, drop.destination),
        (0x02, SocketAddrV4::new(SERVER, 80))
    );

    let mut auth = rule(
        Some(CLIENT_ID),
        Protocol::Tcp,
        Some(80),
        PolicyAction::Allow,
    );
    auth.auth_required = true;
    h.datapath.apply(&two_pods(vec![
        auth,
        rule(
            Some(CLIENT_ID),
            Protocol::Tcp,
            Some(81),
            PolicyAction::Allow,
        ),
    ]))?;
    assert_eq!(outcome(&h.send(6, 80)?), "drop:189");
    assert_eq!(outcome(&h.send(6, 81)?), "forward");

    // Without ingress enforcement the server accepts anything.
    let mut open = two_pods(vec![]);
    open.endpoints[1].enforce_ingress = false;
    h.datapath.apply(&open)?;
    assert_eq!(outcome(&h.send(6, 9999)?), "forward");
    Ok(())
}

#[test]
fn established_flows_survive_a_policy_change_new_flows_do_not() -> Result<()> {
    if !testing::privileged("established_flows_survive_a_policy_change_new_flows_do_not") {
        return Ok(());
    }
    let mut h = Harness::new("ct")?;
    h.datapath.apply(&two_pods(vec![rule(
        Some(CLIENT_ID),
        Protocol::Tcp,
        Some(80),
        PolicyAction::Allow,
    )]))?;
    let (verdict, events) = h.send_tuple(6, 45000, 80)?;
    assert_eq!(verdict, TC_ACT_OK);
    assert!(events.iter().any(|e| e.verdict == Verdict::Forwarded
        && e.observation_point == ObservationPoint::FromEndpoint));

    h.datapath.apply(&two_pods(vec![]))?;
    let (verdict, events) = h.send_tuple(6, 45000, 80)?;
    assert_eq!(verdict, TC_ACT_OK, "the established flow keeps its verdict");
    assert!(
        events.is_empty(),
        "established packets are not reported again: {events:?}"
    );
    assert_eq!(
        outcome(&h.send_tuple(6, 45001, 80)?),
        "drop:133",
        "a new flow meets the new policy"
    );
    Ok(())
}

#[test]
fn a_redirect_without_a_listener_fails_closed_and_with_one_reaches_the_proxy() -> Result<()> {
    if !testing::privileged(
        "a_redirect_without_a_listener_fails_closed_and_with_one_reaches_the_proxy",
    ) {
        return Ok(());
    }
    let mut h = Harness::new("prxy")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let live_port = listener.local_addr()?.port();
    let dead_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    h.datapath.apply(&two_pods(vec![
        rule(
            Some(CLIENT_ID),
            Protocol::Tcp,
            Some(80),
            redirect(dead_port),
        ),
        rule(
            Some(CLIENT_ID),
            Protocol::Tcp,
            Some(81),
            redirect(live_port),
        ),
    ]))?;
    assert_eq!(outcome(&h.send(6, 80)?), format!("redirect:{dead_port}"));
    let (verdict, events) = h.send(6, 81)?;
    let reasons: Vec<_> = events
        .iter()
        .map(|e| (e.drop_reason, e.proxy_port))
        .collect();
    // BPF_PROG_TEST_RUN does not run at a real TC ingress hook, so bpf_sk_assign itself refuses
    // there: the listener was found (no SOCKET_LOOKUP_FAILED), the assign is what fails.
    assert_eq!(
        (verdict, reasons),
        (
            TC_ACT_SHOT,
            vec![(Some(DropReason::SocketAssignFailed), live_port)]
        )
    );
    Ok(())
}

/// Query/answer of `bpf/lb_probe.c`.
fn lb_probe(
    program: &SchedClassifier,
    vip: Ipv4Addr,
    port: u16,
    protocol: u8,
    hash: u32,
) -> Result<(u8, SocketAddrV4)> {
    let mut data = vec![0u8; 14];
    data.extend_from_slice(&u32::from(vip).to_be().to_ne_bytes());
    data.extend_from_slice(&port.to_be().to_ne_bytes());
    data.extend_from_slice(&[protocol, 0xff]);
    data.extend_from_slice(&hash.to_ne_bytes());
    data.extend_from_slice(&[0u8; 8]);
    let mut out = vec![0u8; data.len()];
    program.test_run(TestRunOptions {
        data_in: Some(&data),
        data_out: Some(&mut out),
        ..Default::default()
    })?;
    let result = out[21];
    let addr = Ipv4Addr::from(u32::from_be(u32::from_ne_bytes([
        out[26], out[27], out[28], out[29],
    ])));
    let port = u16::from_be(u16::from_ne_bytes([out[30], out[31]]));
    Ok((result, SocketAddrV4::new(addr, port)))
}

#[test]
fn socket_lb_picks_the_maglev_backend_and_refuses_empty_services() -> Result<()> {
    if !testing::privileged("socket_lb_picks_the_maglev_backend_and_refuses_empty_services") {
        return Ok(());
    }
    let pins = TestDir::pins("lb")?;
    let mut datapath = Datapath::load(&pins.path)?;
    let vip = Ipv4Addr::new(198, 19, 0, 10);
    let backends: Vec<SocketAddrV4> = (1..=3)
        .map(|i| SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, i), 8080))
        .collect();
    let service = |vip: Ipv4Addr, backends: Vec<SocketAddrV4>, l7: Option<u16>| Service {
        vip,
        port: 80,
        protocol: L4Protocol::Tcp,
        l7_proxy_port: l7,
        backends,
    };
    let mut state = BpfState {
        services: vec![
            service(vip, backends.clone(), None),
            service(Ipv4Addr::new(198, 19, 0, 11), vec![], None),
            service(Ipv4Addr::new(198, 19, 0, 12), backends.clone(), Some(15001)),
        ],
        ..Default::default()
    };
    datapath.apply(&state)?;
    let mut probe_obj = EbpfLoader::new()
        .default_map_pin_directory(&pins.path)
        .load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/lb_probe.o"
        )))?;
    let probe: &mut SchedClassifier = probe_obj
        .program_mut("sluice_lb_probe")
        .context("probe program")?
        .try_into()?;
    probe.load()?;

    // The table keeps the size it got for three backends when one goes.
    let size = crate::maglev::table_size(backends.len());
    let expect = |list: &[SocketAddrV4], hash: u32| {
        list[crate::maglev::table(list, size)[(hash % size) as usize]]
    };
    let mut seen = std::collections::HashSet::new();
    for hash in (0..2000u32).map(|i| i.wrapping_mul(2_654_435_761)) {
        let (result, backend) = lb_probe(probe, vip, 80, 6, hash)?;
        assert_eq!(
            (result, backend),
            (1, expect(&backends, hash)),
            "hash {hash}"
        );
        seen.insert(backend);
    }
    assert_eq!(seen.len(), 3, "every backend is reachable");
    assert_eq!(
        lb_probe(probe, vip, 80, 17, 7)?.0,
        0,
        "UDP on a TCP service is not translated"
    );
    assert_eq!(
        lb_probe(probe, Ipv4Addr::new(198, 19, 0, 11), 80, 6, 7)?.0,
        2,
        "no backends: refused"
    );
    assert_eq!(
        lb_probe(probe, Ipv4Addr::new(198, 19, 0, 12), 80, 6, 7)?.0,
        0,
        "L7 service keeps its VIP"
    );

    // Removing a backend: slots of the others mostly stay, the removed one is never chosen.
    state.services[0].backends.remove(1);
    let delta = datapath.apply(&state)?;
    assert_eq!(delta.backends.removed, 1);
    let remaining = &state.services[0].backends;
    let (mut survivors, mut kept) = (0, 0);
    for hash in (0..2000u32).map(|i| i.wrapping_mul(2_654_435_761)) {
        let (_, backend) = lb_probe(probe, vip, 80, 6, hash)?;
        assert_eq!(backend, expect(remaining, hash));
        if expect(&backends, hash) != backends[1] {
            survivors += 1;
            kept += usize::from(backend == expect(&backends, hash));
        }
    }
    assert!(
        kept * 100 >= survivors * 90,
        "{kept} of {survivors} kept their backend"
    );
    Ok(())
}

#[test]
fn apply_reconciles_reads_back_and_survives_a_restart() -> Result<()> {
    if !testing::privileged("apply_reconciles_reads_back_and_survives_a_restart") {
        return Ok(());
    }
    let pins = TestDir::pins("rst")?;
    let mut state = two_pods(vec![
        PolicyEntry {
            ports: Some(PortRange {
                first: 8080,
                last: 8083,
            }),
            ..rule(Some(CLIENT_ID), Protocol::Tcp, None, PolicyAction::Allow)
        },
        rule(None, Protocol::Tcp, Some(8081), PolicyAction::Deny),
    ]);
    state.services.push(Service {
        vip: Ipv4Addr::new(198, 19, 0, 10),
        port: 80,
        protocol: L4Protocol::Tcp,
        l7_proxy_port: None,
        backends: vec![SocketAddrV4::new(SERVER, 8080)],
    });
    let first_in_kernel = {
        let mut datapath = Datapath::load(&pins.path)?;
        let delta = datapath.apply(&state)?;
        assert_eq!(
            (
                delta.endpoints.added,
                delta.services.added,
                delta.maglev.added
            ),
            (2, 1, 1)
        );
        assert!(
            datapath.apply(&state)?.is_empty(),
            "a second apply of the same state changes nothing"
        );
        datapath.kernel_policy()?
    };
    // A new process: the pinned maps are reused with their contents.
    let mut datapath = Datapath::load(&pins.path)?;
    assert_eq!(datapath.kernel_policy()?, first_in_kernel);
    assert!(
        datapath.apply(&state)?.is_empty(),
        "the restarted loader finds everything in place"
    );
    let endpoints = datapath.kernel_endpoints()?;
    assert_eq!(
        endpoints
            .iter()
            .map(|e| (e.ip, e.identity, e.enforce_ingress))
            .collect::<Vec<_>>(),
        vec![(CLIENT, CLIENT_ID, false), (SERVER, SERVER_ID, true)]
    );
    let services = datapath.kernel_services()?;
    assert_eq!(services.len(), 1);
    assert_eq!(services[0].backends, vec![SocketAddrV4::new(SERVER, 8080)]);
    let first: Vec<PolicyEntry> = first_in_kernel.iter().map(|k| k.entry).collect();
    let allow = first
        .iter()
        .find(|e| e.action == PolicyAction::Allow)
        .context("allow entry")?;
    assert_eq!(
        (allow.remote_identity, allow.ports),
        (
            Some(CLIENT_ID),
            Some(PortRange {
                first: 8080,
                last: 8083
            })
        )
    );
    let overlap = Some(PortRange::single(8081));
    assert!(
        first.iter().any(|e| e.action == PolicyAction::Deny
            && e.remote_identity == Some(CLIENT_ID)
            && e.ports == overlap),
        "deny written at the overlap: {first:?}"
    );

    // Removing the server endpoint removes its policy entries too.
    state.endpoints.pop();
    let delta = datapath.apply(&state)?;
    assert_eq!(
        (delta.endpoints.removed, delta.policy.removed),
        (1, first.len())
    );
    assert!(datapath.kernel_policy()?.is_empty());
    let pin_dir = datapath.pin_dir().to_path_buf();
    datapath.cleanup()?;
    assert!(!pin_dir.exists(), "cleanup removes every pin");
    Ok(())
}

#[test]
fn netns_pods_tc_policy_and_socket_lb_end_to_end() -> Result<()> {
    if !testing::privileged("netns_pods_tc_policy_and_socket_lb_end_to_end") {
        return Ok(());
    }
    let node = Node::new("e2e", 3)?;
    let _in_node = node.enter()?;
    let pins = TestDir::pins("e2e")?;
    let cgroup = TestDir::cgroup("e2e")?;
    let mut datapath = Datapath::load(&pins.path)?;
    let mut events = datapath.flow_events()?;
    let (client, server_a, server_b) = (&node.pods[0], &node.pods[1], &node.pods[2]);
    let vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 10), 80);
    let empty_vip = SocketAddrV4::new(Ipv4Addr::new(198, 19, 0, 11), 80);
    let server_policy = vec![
        rule(
            Some(CLIENT_ID),
            Protocol::Udp,
            Some(53),
            PolicyAction::Allow,
        ),
        rule(
            Some(CLIENT_ID),
            Protocol::Tcp,
            Some(80),
            PolicyAction::Allow,
        ),
        rule(Some(CLIENT_ID), Protocol::Tcp, Some(82), redirect(15001)),
        rule(Some(CLIENT_ID), Protocol::Tcp, Some(83), redirect(15002)),
    ];
    let client_ifindex = node.ifindex(client)?;
    let endpoint = |pod: &testing::Pod,
                    identity,
                    enforce_ingress,
                    policy: Vec<PolicyEntry>|
     -> Result<Endpoint> {
        Ok(Endpoint {
            ip: pod.ip,
            identity,
            ifindex: node.ifindex(pod)?,
            enforce_ingress,
            enforce_egress: false,
            policy,
        })
    };
    let mut state = BpfState {
        endpoints: vec![
            endpoint(client, CLIENT_ID, false, vec![])?,
            endpoint(server_a, SERVER_ID, true, server_policy.clone())?,
            endpoint(server_b, SERVER_ID, true, server_policy)?,
        ],
        ipcache: node
            .pods
            .iter()
            .enumerate()
            .map(|(i, pod)| IpcacheEntry {
                cidr: ipnet::Ipv4Net::new(pod.ip, 32).expect("/32"),
                identity: if i == 0 { CLIENT_ID } else { SERVER_ID },
            })
            .collect(),
        services: vec![
            Service {
                vip: *vip.ip(),
                port: 80,
                protocol: L4Protocol::Tcp,
                l7_proxy_port: None,
                backends: vec![
                    SocketAddrV4::new(server_a.ip, 80),
                    SocketAddrV4::new(server_b.ip, 80),
                ],
            },
            Service {
                vip: *empty_vip.ip(),
                port: 80,
                protocol: L4Protocol::Tcp,
                l7_proxy_port: None,
                backends: vec![],
            },
            Service {
                vip: *vip.ip(),
                port: 53,
                protocol: L4Protocol::Udp,
                l7_proxy_port: None,
                backends: vec![SocketAddrV4::new(server_b.ip, 53)],
            },
            Service {
                vip: *empty_vip.ip(),
                port: 53,
                protocol: L4Protocol::Udp,
                l7_proxy_port: None,
                backends: vec![],
            },
        ],
    };
    datapath.apply(&state)?;
    for pod in &node.pods {
        datapath.attach_interface(&pod.host_if)?;
    }
    datapath.attach_cgroup(&cgroup.path)?;
    let cgroup_root = cgroup.path.parent().context("cgroup parent")?;
    assert!(matches!(
        datapath.attach_cgroup(cgroup_root),
        Err(crate::DatapathError::RootCgroup(_))
    ));
    let _servers = [
        PodServer::start(
            &server_a.netns,
            SocketAddrV4::new(server_a.ip, 80),
            "server-a",
        )?,
        PodServer::start(
            &server_a.netns,
            SocketAddrV4::new(server_a.ip, 81),
            "server-a-81",
        )?,
        PodServer::start(
            &server_b.netns,
            SocketAddrV4::new(server_b.ip, 80),
            "server-b",
        )?,
        PodServer::transparent_proxy(&node.netns, 15001)?,
        PodServer::udp(&server_b.netns, SocketAddrV4::new(server_b.ip, 53), "udp-b")?,
    ];

    // TC policy: the allowed port answers, the other one's SYN is dropped at the client's veth.
    let allowed = pod_connect(&client.netns, None, SocketAddrV4::new(server_a.ip, 80), 5)?;
    assert_eq!(
        allowed,
        ConnectOutcome::Connected {
            peer: SocketAddrV4::new(server_a.ip, 80),
            reply: "server-a".into()
        }
    );
    assert_eq!(
        pod_connect(&client.netns, None, SocketAddrV4::new(server_a.ip, 81), 2)?,
        ConnectOutcome::TimedOut
    );
    let drops: Vec<FlowEvent> = events
        .drain()
        .into_iter()
        .filter(|e| e.verdict == Verdict::Dropped)
        .collect();
    assert!(!drops.is_empty());
    assert!(
        drops
            .iter()
            .all(|e| e.drop_reason == Some(DropReason::PolicyDenied)
                && e.destination == SocketAddrV4::new(server_a.ip, 81)
                && e.tcp_flags & 0x02 != 0
                && e.direction == Direction::Ingress
                && e.ifindex == client_ifindex),
        "{drops:?}"
    );

    // L7 redirect: the flow lands on the proxy's transparent listener, whose accepted socket has
    // the original destination as its local address; with no listener the flow is refused.
    let proxied = pod_connect(&client.netns, None, SocketAddrV4::new(server_a.ip, 82), 5)?;
    let ConnectOutcome::Connected { peer, reply } = proxied else {
        panic!("redirected connect: {proxied:?}")
    };
    assert_eq!(peer, SocketAddrV4::new(server_a.ip, 82));
    assert!(
        reply.starts_with(&format!("proxy {}:82 {}:", server_a.ip, client.ip)),
        "{reply}"
    );
    assert_eq!(
        pod_connect(&client.netns, None, SocketAddrV4::new(server_a.ip, 83), 2)?,
        ConnectOutcome::TimedOut
    );
    let proxy_events = events.drain();
    assert!(proxy_events
        .iter()
        .any(|e| e.verdict == Verdict::Redirected && e.proxy_port == 15001));
    assert!(proxy_events
        .iter()
        .any(|e| e.drop_reason == Some(DropReason::SocketLookupFailed) && e.proxy_port == 15002));

    // Socket LB: the VIP reaches both backends, and the application sees the VIP as its peer.
    let mut answered = std::collections::BTreeSet::new();
    for _ in 0..24 {
        match pod_connect(&client.netns, Some(&cgroup.path), vip, 5)? {
            ConnectOutcome::Connected { peer, reply } => {
                assert_eq!(peer, vip, "getpeername shows the VIP");
                answered.insert(reply);
            }
            other => panic!("connect to the VIP: {other:?}"),
        }
    }
    assert_eq!(
        answered.into_iter().collect::<Vec<_>>(),
        vec!["server-a".to_string(), "server-b".to_string()]
    );
    assert_eq!(
        pod_connect(&client.netns, Some(&cgroup.path), empty_vip, 5)?,
        ConnectOutcome::Refused
    );
    assert!(events.drain().iter().any(|e| e.drop_reason
        == Some(DropReason::ServiceBackendNotFound)
        && e.destination == empty_vip));

    // UDP: sendmsg translates, recvmsg shows the VIP as the datagram's source.
    let udp_vip = SocketAddrV4::new(*vip.ip(), 53);
    assert_eq!(
        testing::pod_udp_exchange(&client.netns, Some(&cgroup.path), udp_vip, 5)?,
        ConnectOutcome::Connected {
            peer: udp_vip,
            reply: "udp-b".into()
        }
    );
    let empty_udp = SocketAddrV4::new(*empty_vip.ip(), 53);
    assert_eq!(
        testing::pod_udp_exchange(&client.netns, Some(&cgroup.path), empty_udp, 5)?,
        ConnectOutcome::Refused
    );

    // A removed backend is no longer chosen.
    state.services[0]
        .backends
        .retain(|b| *b.ip() == server_a.ip);
    datapath.apply(&state)?;
    for _ in 0..6 {
        assert!(
            matches!(pod_connect(&client.netns, Some(&cgroup.path), vip, 5)?, ConnectOutcome::Connected { reply, .. } if reply == "server-a")
        );
    }
    datapath.cleanup()?;
    Ok(())
}
