//! datapath (I/O edge): loads the kernel programs with aya, pins maps and links under bpffs,
//! attaches TC and cgroup hooks, reconciles the maps with a `BpfState` and reads them back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::io;
use std::net::SocketAddrV4;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, RingBuf};
use aya::programs::links::{CgroupAttachMode, FdLink, PinnedLink};
use aya::programs::tc::{self, SchedClassifierLink, TcAttachOptions};
use aya::programs::{CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType};
use aya::{Ebpf, EbpfLoader, Pod};

use crate::abi::{
    BackendKey, BackendValue, EndpointInfo, EndpointKey, IpcacheKeyData, IpcacheValue, MaglevValue,
    PolicyKeyData, PolicyValue, ServiceValue, DIR_EGRESS, EP_F_ENFORCE_EGRESS,
    EP_F_ENFORCE_INGRESS, MARK_MAGIC_MASK, MARK_MAGIC_TO_PROXY, POLICY_PREFIX_BASE,
    PROXY_ROUTE_TABLE, SVC_F_L7,
};
use crate::events::FlowEvents;
use crate::mounts;
use crate::plan::{
    addr_from_be, diff, plan, ExistingIds, LpmKey, MapContents, MapDiff, StateError,
};
use crate::state::{
    Direction, IpcacheEntry, L4Protocol, PolicyAction, PolicyEntry, PortRange, Protocol,
};

pub(crate) static DATAPATH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/datapath.o"));

pub(crate) const PROG_FROM_CONTAINER: &str = "sluice_from_container";
pub(crate) const PROG_TO_CONTAINER: &str = "sluice_to_container";
const SOCK_PROGRAMS: [&str; 4] = [
    "sluice_sock_connect4",
    "sluice_sock_sendmsg4",
    "sluice_sock_recvmsg4",
    "sluice_sock_getpeername4",
];

const MAP_IPCACHE: &str = "sluice_ipcache";
const MAP_ENDPOINTS: &str = "sluice_endpoints";
const MAP_POLICY: &str = "sluice_policy";
const MAP_SERVICES: &str = "sluice_services";
const MAP_BACKENDS: &str = "sluice_backends";
const MAP_MAGLEV: &str = "sluice_maglev";
const MAP_EVENTS: &str = "sluice_events";
const LINKS_DIR: &str = "links";

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{}: not on a bpffs (mount one there first, e.g. with ensure_bpffs)", .0.display())]
    NotBpffs(PathBuf),
    #[error("{}: not a cgroup v2 directory", .0.display())]
    NotCgroup2(PathBuf),
    #[error("{}: the root of a cgroup hierarchy; attach to a child cgroup, never the machine's root", .0.display())]
    RootCgroup(PathBuf),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("{0} is missing from the eBPF object (or was taken already)")]
    Missing(&'static str),
    #[error("link {}: {source}", path.display())]
    Link {
        path: PathBuf,
        #[source]
        source: aya::programs::links::LinkError,
    },
    #[error("pinning {}: {source}", path.display())]
    Pin {
        path: PathBuf,
        #[source]
        source: aya::pin::PinError,
    },
    #[error("interface {name}: {source}")]
    Interface {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("`ip {args}` failed: {stderr}")]
    IpCommand { args: String, stderr: String },
    #[error(transparent)]
    State(#[from] StateError),
}

/// What `apply` changed, per map.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BpfDelta {
    pub ipcache: MapChanges,
    pub endpoints: MapChanges,
    pub policy: MapChanges,
    pub services: MapChanges,
    pub backends: MapChanges,
    pub maglev: MapChanges,
}

impl BpfDelta {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MapChanges {
    pub added: usize,
    pub updated: usize,
    pub removed: usize,
}

impl MapChanges {
    fn of<K, V>(d: &MapDiff<K, V>) -> Self {
        Self {
            added: d.added,
            updated: d.upserts.len() - d.added,
            removed: d.removals.len(),
        }
    }
}

/// An endpoint as the kernel's map holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelEndpoint {
    pub ip: std::net::Ipv4Addr,
    pub identity: u32,
    pub ifindex: u32,
    pub enforce_ingress: bool,
    pub enforce_egress: bool,
}

/// A service as the kernel's maps hold it; `backends` are those its Maglev table points to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelService {
    pub vip: std::net::Ipv4Addr,
    pub port: u16,
    pub protocol: L4Protocol,
    pub l7_proxy_port: Option<u16>,
    pub backend_count: u16,
    pub maglev_size: u32,
    pub backends: Vec<SocketAddrV4>,
}

/// One policy-map entry as the kernel holds it (after range splitting and deny intersection):
/// `entry.ports` is the port prefix the key covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPolicyEntry {
    pub endpoint: std::net::Ipv4Addr,
    pub entry: PolicyEntry,
}

/// The loaded kernel half. Dropping it leaves everything pinned and attached (an agent restart
/// keeps enforcing); `cleanup` removes it all.
pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
}

impl Datapath {
    /// Loads the programs, creating the maps under `pin_dir` or reusing the ones pinned there
    /// by an earlier run (their contents are kept). `pin_dir` must be on a bpffs.
    pub fn load(pin_dir: &Path) -> Result<Self, DatapathError> {
        let existing_ancestor = pin_dir
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        let on_bpffs = mounts::is_bpffs(existing_ancestor).map_err(|source| DatapathError::Io {
            what: "statfs",
            path: existing_ancestor.to_path_buf(),
            source,
        })?;
        if !on_bpffs {
            return Err(DatapathError::NotBpffs(pin_dir.to_path_buf()));
        }
        let links_dir = pin_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir).map_err(|source| DatapathError::Io {
            what: "creating pin directory",
            path: links_dir,
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(DATAPATH_OBJECT)?;
        for name in [PROG_FROM_CONTAINER, PROG_TO_CONTAINER] {
            classifier_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        for name in SOCK_PROGRAMS {
            sock_program_mut(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        tracing::info!(pin_dir = %pin_dir.display(), "eBPF datapath loaded");
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches the policy programs to a pod's host-side veth (TC ingress: from the pod; TC
    /// egress: to the pod) and installs the routing that delivers proxy-marked packets locally.
    /// Re-attaching (e.g. after a restart) atomically replaces the previous programs. Returns
    /// the interface index.
    pub fn attach_interface(&mut self, ifname: &str) -> Result<u32, DatapathError> {
        install_proxy_routing()?;
        let ifindex = ifindex_of(ifname)?;
        if let Err(error) = tc::qdisc_add_clsact(ifname) {
            // EEXIST: the interface already has its clsact qdisc.
            tracing::debug!(ifname, %error, "clsact not added");
        }
        for (name, attach_type, suffix) in [
            (PROG_FROM_CONTAINER, TcAttachType::Ingress, "ingress"),
            (PROG_TO_CONTAINER, TcAttachType::Egress, "egress"),
        ] {
            let pin = self.link_pin(&format!("tc_{ifindex}_{suffix}"));
            let program = classifier_mut(&mut self.ebpf, name)?;
            attach_tc_pinned(program, name, ifname, attach_type, &pin)?;
        }
        tracing::info!(ifname, ifindex, "TC programs attached");
        Ok(ifindex)
    }

    /// Detaches the policy programs from an interface (a no-op for one that is gone).
    pub fn detach_interface(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        for suffix in ["ingress", "egress"] {
            remove_link_pin(&self.link_pin(&format!("tc_{ifindex}_{suffix}")))?;
        }
        Ok(())
    }

    /// Attaches the socket load-balancing hooks to a cgroup v2 directory. Refuses the root of
    /// a cgroup hierarchy. Re-attaching replaces the previous programs.
    pub fn attach_cgroup(&mut self, cgroup_dir: &Path) -> Result<(), DatapathError> {
        let io_err = |what| {
            move |source| DatapathError::Io {
                what,
                path: cgroup_dir.to_path_buf(),
                source,
            }
        };
        if !mounts::is_cgroup2(cgroup_dir).map_err(io_err("statfs"))? {
            return Err(DatapathError::NotCgroup2(cgroup_dir.to_path_buf()));
        }
        if mounts::is_mount_point(cgroup_dir).map_err(io_err("stat"))? {
            return Err(DatapathError::RootCgroup(cgroup_dir.to_path_buf()));
        }
        let inode = std::fs::metadata(cgroup_dir).map_err(io_err("stat"))?.ino();
        let cgroup = std::fs::File::open(cgroup_dir).map_err(io_err("opening cgroup"))?;
        for name in SOCK_PROGRAMS {
            let pin = self.link_pin(&format!("cgroup_{inode}_{name}"));
            let previous = PinnedLink::from_pin(&pin).ok();
            let program = sock_program_mut(&mut self.ebpf, name)?;
            // bpf_link attachments to a cgroup always coexist with others (the kernel refuses
            // flags on link_create); `Single` is aya's "no flags".
            let link_id = program
                .attach(&cgroup, CgroupAttachMode::Single)
                .map_err(|source| DatapathError::Program { name, source })?;
            let link: FdLink = program
                .take_link(link_id)
                .map_err(|source| DatapathError::Program { name, source })?
                .try_into()
                .map_err(|source| DatapathError::Link {
                    path: pin.clone(),
                    source,
                })?;
            // The new program runs next to the old one until the old link goes; both use the
            // same maps, so a connect() in between is translated once either way.
            if let Some(previous) = previous {
                drop(previous.unpin().map_err(|source| DatapathError::Io {
                    what: "unpinning",
                    path: pin.clone(),
                    source,
                })?);
            }
            link.pin(&pin).map_err(|source| DatapathError::Pin {
                path: pin.clone(),
                source,
            })?;
        }
        tracing::info!(cgroup = %cgroup_dir.display(), "socket LB programs attached");
        Ok(())
    }

    /// Detaches the socket hooks from a cgroup.
    pub fn detach_cgroup(&mut self, cgroup_dir: &Path) -> Result<(), DatapathError> {
        let inode = std::fs::metadata(cgroup_dir)
            .map_err(|source| DatapathError::Io {
                what: "stat",
                path: cgroup_dir.to_path_buf(),
                source,
            })?
            .ino();
        for name in SOCK_PROGRAMS {
            remove_link_pin(&self.link_pin(&format!("cgroup_{inode}_{name}")))?;
        }
        Ok(())
    }

    /// Makes the maps enforce `state`: writes what is new or changed and removes what is gone,
    /// in an order where no lookup meets a dangling reference.
    pub fn apply(&mut self, state: &crate::BpfState) -> Result<BpfDelta, DatapathError> {
        let current = self.read_maps()?;
        let desired = plan(
            state,
            &ExistingIds::from_maps(&current.services, &current.backends),
        )?;
        let d_ipcache = diff(&current.ipcache, &desired.ipcache);
        let d_endpoints = diff(&current.endpoints, &desired.endpoints);
        let d_policy = diff(&current.policy, &desired.policy);
        let d_services = diff(&current.services, &desired.services);
        let d_backends = diff(&current.backends, &desired.backends);
        let d_maglev = diff(&current.maglev, &desired.maglev);

        write_lpm(&mut self.ebpf, MAP_IPCACHE, &d_ipcache.upserts)?;
        write_lpm(&mut self.ebpf, MAP_POLICY, &d_policy.upserts)?;
        write_hash(&mut self.ebpf, MAP_ENDPOINTS, &d_endpoints.upserts)?;
        write_hash(&mut self.ebpf, MAP_BACKENDS, &d_backends.upserts)?;
        write_hash(&mut self.ebpf, MAP_MAGLEV, &d_maglev.upserts)?;
        write_hash(&mut self.ebpf, MAP_SERVICES, &d_services.upserts)?;

        remove_hash::<_, ServiceValue>(&mut self.ebpf, MAP_SERVICES, &d_services.removals)?;
        remove_hash::<_, MaglevValue>(&mut self.ebpf, MAP_MAGLEV, &d_maglev.removals)?;
        remove_hash::<_, BackendValue>(&mut self.ebpf, MAP_BACKENDS, &d_backends.removals)?;
        remove_hash::<_, EndpointInfo>(&mut self.ebpf, MAP_ENDPOINTS, &d_endpoints.removals)?;
        remove_lpm::<_, PolicyValue>(&mut self.ebpf, MAP_POLICY, &d_policy.removals)?;
        remove_lpm::<_, IpcacheValue>(&mut self.ebpf, MAP_IPCACHE, &d_ipcache.removals)?;

        let delta = BpfDelta {
            ipcache: MapChanges::of(&d_ipcache),
            endpoints: MapChanges::of(&d_endpoints),
            policy: MapChanges::of(&d_policy),
            services: MapChanges::of(&d_services),
            backends: MapChanges::of(&d_backends),
            maglev: MapChanges::of(&d_maglev),
        };
        tracing::debug!(?delta, "maps reconciled");
        Ok(delta)
    }

    /// The endpoints map, sorted by address.
    pub fn kernel_endpoints(&self) -> Result<Vec<KernelEndpoint>, DatapathError> {
        let mut endpoints: Vec<KernelEndpoint> =
            read_hash::<EndpointKey, EndpointInfo>(&self.ebpf, MAP_ENDPOINTS)?
                .into_iter()
                .map(|(k, v)| KernelEndpoint {
                    ip: addr_from_be(k.addr),
                    identity: v.identity,
                    ifindex: v.ifindex,
                    enforce_ingress: v.flags & EP_F_ENFORCE_INGRESS != 0,
                    enforce_egress: v.flags & EP_F_ENFORCE_EGRESS != 0,
                })
                .collect();
        endpoints.sort_by_key(|e| e.ip);
        Ok(endpoints)
    }

    /// The ipcache, sorted by prefix.
    pub fn kernel_ipcache(&self) -> Result<Vec<IpcacheEntry>, DatapathError> {
        let mut entries: Vec<IpcacheEntry> =
            read_lpm::<IpcacheKeyData, IpcacheValue>(&self.ebpf, MAP_IPCACHE)?
                .into_iter()
                .filter_map(|((len, k), v)| {
                    ipnet::Ipv4Net::new(addr_from_be(k.addr), len as u8)
                        .ok()
                        .map(|cidr| IpcacheEntry {
                            cidr,
                            identity: v.identity,
                        })
                })
                .collect();
        entries.sort_by_key(|e| (e.cidr.network(), e.cidr.prefix_len()));
        Ok(entries)
    }

    /// The services with the backends their Maglev tables point to, sorted by VIP and port.
    pub fn kernel_services(&self) -> Result<Vec<KernelService>, DatapathError> {
        let maps = self.read_maps()?;
        let mut backends_of: HashMap<u32, BTreeSet<SocketAddrV4>> = HashMap::new();
        for (key, value) in &maps.maglev {
            if let Some(backend) = maps.backends.get(&BackendKey {
                backend_id: value.backend_id,
            }) {
                backends_of
                    .entry(key.service_id)
                    .or_default()
                    .insert(SocketAddrV4::new(
                        addr_from_be(backend.addr),
                        u16::from_be(backend.port),
                    ));
            }
        }
        let mut services: Vec<KernelService> = maps
            .services
            .iter()
            .filter_map(|(k, v)| {
                Some(KernelService {
                    vip: addr_from_be(k.vip),
                    port: u16::from_be(k.dport),
                    protocol: L4Protocol::from_number(k.protocol)?,
                    l7_proxy_port: (v.flags & SVC_F_L7 != 0).then_some(v.l7_proxy_port),
                    backend_count: v.backend_count,
                    maglev_size: v.maglev_size,
                    backends: backends_of
                        .get(&v.service_id)
                        .map(|b| b.iter().copied().collect())
                        .unwrap_or_default(),
                })
            })
            .collect();
        services.sort_by_key(|s| (s.vip, s.port, s.protocol));
        Ok(services)
    }

    /// The policy map, sorted by endpoint, direction and key.
    pub fn kernel_policy(&self) -> Result<Vec<KernelPolicyEntry>, DatapathError> {
        let entries: BTreeMap<_, _> =
            read_lpm::<PolicyKeyData, PolicyValue>(&self.ebpf, MAP_POLICY)?
                .into_iter()
                .filter_map(|((len, k), v)| {
                    let protocol = Protocol::from_number(k.protocol)?;
                    let port_bits = len
                        .checked_sub(POLICY_PREFIX_BASE + 8)
                        .filter(|_| k.protocol != 0);
                    let ports = port_bits.filter(|&bits| bits > 0).map(|bits| {
                        let first = u16::from_be(k.dport);
                        let span = (1u32 << (16 - bits.min(16))) - 1;
                        PortRange {
                            first,
                            last: (u32::from(first) + span) as u16,
                        }
                    });
                    let action = if v.deny != 0 {
                        PolicyAction::Deny
                    } else if v.proxy_port != 0 {
                        PolicyAction::Redirect {
                            proxy_port: v.proxy_port,
                        }
                    } else {
                        PolicyAction::Allow
                    };
                    let entry = KernelPolicyEntry {
                        endpoint: addr_from_be(k.endpoint_addr),
                        entry: PolicyEntry {
                            direction: if k.egress == DIR_EGRESS {
                                Direction::Egress
                            } else {
                                Direction::Ingress
                            },
                            remote_identity: (k.remote_identity != 0).then_some(k.remote_identity),
                            protocol,
                            ports,
                            action,
                            auth_required: v.auth_required != 0,
                        },
                    };
                    let order = (
                        entry.endpoint,
                        entry.entry.direction,
                        k.remote_identity,
                        k.protocol,
                        u16::from_be(k.dport),
                        len,
                    );
                    Some((order, entry))
                })
                .collect();
        Ok(entries.into_values().collect())
    }

    /// The flow-event reader (once per `Datapath`: the ring buffer has one consumer).
    pub fn flow_events(&mut self) -> Result<FlowEvents, DatapathError> {
        let map = self
            .ebpf
            .take_map(MAP_EVENTS)
            .ok_or(DatapathError::Missing(MAP_EVENTS))?;
        let ring = RingBuf::try_from(map).map_err(|source| DatapathError::Map {
            name: MAP_EVENTS,
            source,
        })?;
        Ok(FlowEvents::new(ring))
    }

    /// Detaches every program, removes every pin and the proxy routing: nothing of this
    /// datapath stays in the kernel once the last user of its maps is gone.
    pub fn cleanup(self) -> Result<(), DatapathError> {
        let links_dir = self.pin_dir.join(LINKS_DIR);
        let link_pins = list_dir(&links_dir)?;
        // The proxy routing is installed with the first TC attachment, so only a datapath that
        // attached TC (in this run or an earlier one) owns it.
        let owns_routing = link_pins.iter().any(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("tc_"))
        });
        for pin in link_pins {
            remove_link_pin(&pin)?;
        }
        remove_path(&links_dir, |p: &Path| std::fs::remove_dir(p))?;
        for pin in list_dir(&self.pin_dir)? {
            remove_path(&pin, |p: &Path| std::fs::remove_file(p))?;
        }
        remove_path(&self.pin_dir, |p: &Path| std::fs::remove_dir(p))?;
        if owns_routing {
            remove_proxy_routing()?;
        }
        tracing::info!(pin_dir = %self.pin_dir.display(), "eBPF datapath cleaned up");
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn classifier(&self, name: &'static str) -> Result<&SchedClassifier, DatapathError> {
        self.ebpf
            .program(name)
            .ok_or(DatapathError::Missing(name))?
            .try_into()
            .map_err(|source| DatapathError::Program { name, source })
    }

    fn link_pin(&self, name: &str) -> PathBuf {
        self.pin_dir.join(LINKS_DIR).join(name)
    }

    fn read_maps(&self) -> Result<MapContents, DatapathError> {
        Ok(MapContents {
            ipcache: read_lpm(&self.ebpf, MAP_IPCACHE)?,
            endpoints: read_hash(&self.ebpf, MAP_ENDPOINTS)?,
            policy: read_lpm(&self.ebpf, MAP_POLICY)?,
            services: read_hash(&self.ebpf, MAP_SERVICES)?,
            backends: read_hash(&self.ebpf, MAP_BACKENDS)?,
            maglev: read_hash(&self.ebpf, MAP_MAGLEV)?,
        })
    }
}

fn classifier_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

fn sock_program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

/// Attaches with a TCX link pinned at `pin`; a link pinned by an earlier run is updated in
/// place (atomic program replacement, no window without enforcement).
fn attach_tc_pinned(
    program: &mut SchedClassifier,
    name: &'static str,
    ifname: &str,
    attach_type: TcAttachType,
    pin: &Path,
) -> Result<(), DatapathError> {
    let program_err = |source| DatapathError::Program { name, source };
    let replaced = match PinnedLink::from_pin(pin) {
        Ok(previous) => {
            remove_path(pin, |p: &Path| std::fs::remove_file(p))?;
            let replaced = SchedClassifierLink::try_from(FdLink::from(previous))
                .ok()
                .and_then(|link| program.attach_to_link(link).ok());
            if replaced.is_none() {
                tracing::warn!(
                    ifname,
                    "previous TC link unusable (interface recreated?), attaching anew"
                );
            }
            replaced
        }
        Err(_) => None,
    };
    let link_id = match replaced {
        Some(id) => id,
        None => program
            .attach_with_options(
                ifname,
                attach_type,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(program_err)?,
    };
    let link: FdLink = program
        .take_link(link_id)
        .map_err(program_err)?
        .try_into()
        .map_err(|source| DatapathError::Link {
            path: pin.to_path_buf(),
            source,
        })?;
    link.pin(pin).map_err(|source| DatapathError::Pin {
        path: pin.to_path_buf(),
        source,
    })?;
    Ok(())
}

/// Unpins a link; the kernel detaches it once nothing refers to it.
fn remove_link_pin(pin: &Path) -> Result<(), DatapathError> {
    match PinnedLink::from_pin(pin) {
        Ok(link) => {
            drop(link.unpin().map_err(|source| DatapathError::Io {
                what: "unpinning",
                path: pin.to_path_buf(),
                source,
            })?);
            Ok(())
        }
        Err(_) => remove_path(pin, |p: &Path| std::fs::remove_file(p)),
    }
}

fn remove_path(path: &Path, remove: impl Fn(&Path) -> io::Result<()>) -> Result<(), DatapathError> {
    match remove(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            what: "removing",
            path: path.to_path_buf(),
            source,
        }),
    }
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, DatapathError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(DatapathError::Io {
                what: "listing",
                path: dir.to_path_buf(),
                source,
            })
        }
    };
    entries
        .map(|entry| entry.map(|e| e.path()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(|source| DatapathError::Io {
            what: "listing",
            path: dir.to_path_buf(),
            source,
        })
}

fn ifindex_of(ifname: &str) -> Result<u32, DatapathError> {
    let c_name = std::ffi::CString::new(ifname).map_err(|e| DatapathError::Interface {
        name: ifname.to_string(),
        source: io::Error::new(io::ErrorKind::InvalidInput, e),
    })?;
    // SAFETY: a valid NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index == 0 {
        return Err(DatapathError::Interface {
            name: ifname.to_string(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(index)
}

fn read_hash<K: Pod + Hash + Eq, V: Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<HashMap<K, V>, DatapathError> {
    let map = ebpf.map(name).ok_or(DatapathError::Missing(name))?;
    let map_err = |source| DatapathError::Map { name, source };
    let hash = BpfHashMap::<&MapData, K, V>::try_from(map).map_err(map_err)?;
    hash.iter()
        .collect::<Result<HashMap<K, V>, _>>()
        .map_err(map_err)
}

fn read_lpm<K: Pod + Hash + Eq, V: Pod>(
    ebpf: &Ebpf,
    name: &'static str,
) -> Result<HashMap<LpmKey<K>, V>, DatapathError> {
    let map = ebpf.map(name).ok_or(DatapathError::Missing(name))?;
    let map_err = |source| DatapathError::Map { name, source };
    let trie = LpmTrie::<&MapData, K, V>::try_from(map).map_err(map_err)?;
    trie.iter()
        .map(|entry| entry.map(|(key, value)| ((key.prefix_len(), key.data()), value)))
        .collect::<Result<HashMap<_, _>, _>>()
        .map_err(map_err)
}

fn write_hash<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(K, V)],
) -> Result<(), DatapathError> {
    if entries.is_empty() {
        return Ok(());
    }
    let map = ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?;
    let map_err = |source| DatapathError::Map { name, source };
    let mut hash = BpfHashMap::<&mut MapData, K, V>::try_from(map).map_err(map_err)?;
    for (key, value) in entries {
        hash.insert(key, value, 0).map_err(map_err)?;
    }
    Ok(())
}

fn remove_hash<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: &[K],
) -> Result<(), DatapathError> {
    if keys.is_empty() {
        return Ok(());
    }
    let map = ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?;
    let map_err = |source| DatapathError::Map { name, source };
    let mut hash = BpfHashMap::<&mut MapData, K, V>::try_from(map).map_err(map_err)?;
    for key in keys {
        hash.remove(key).map_err(map_err)?;
    }
    Ok(())
}

fn write_lpm<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(LpmKey<K>, V)],
) -> Result<(), DatapathError> {
    if entries.is_empty() {
        return Ok(());
    }
    let map = ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?;
    let map_err = |source| DatapathError::Map { name, source };
    let mut trie = LpmTrie::<&mut MapData, K, V>::try_from(map).map_err(map_err)?;
    for ((len, data), value) in entries {
        trie.insert(&Key::new(*len, *data), value, 0)
            .map_err(map_err)?;
    }
    Ok(())
}

fn remove_lpm<K: Pod, V: Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    keys: &[LpmKey<K>],
) -> Result<(), DatapathError> {
    if keys.is_empty() {
        return Ok(());
    }
    let map = ebpf.map_mut(name).ok_or(DatapathError::Missing(name))?;
    let map_err = |source| DatapathError::Map { name, source };
    let mut trie = LpmTrie::<&mut MapData, K, V>::try_from(map).map_err(map_err)?;
    for (len, data) in keys {
        trie.remove(&Key::new(*len, *data)).map_err(map_err)?;
    }
    Ok(())
}

/// The `ip rule` selector and table for proxy-bound packets: ("0x200/0xf00", "2004").
fn proxy_rule() -> (String, String) {
    (
        format!("{MARK_MAGIC_TO_PROXY:#x}/{MARK_MAGIC_MASK:#x}"),
        PROXY_ROUTE_TABLE.to_string(),
    )
}

fn has_proxy_rule(mark: &str, table: &str) -> Result<bool, DatapathError> {
    let wanted = format!("fwmark {mark} lookup {table}");
    Ok(ip(&["rule", "show"])?
        .lines()
        .any(|line| line.contains(&wanted)))
}

/// Packets assigned to the proxy's socket carry MARK_MAGIC_TO_PROXY; this rule and a local
/// default route make the node deliver them locally instead of forwarding them. `ip` is used
/// (iproute2, already required on nodes) rather than hand-written netlink for two objects.
fn install_proxy_routing() -> Result<(), DatapathError> {
    let (mark, table) = proxy_rule();
    if !has_proxy_rule(&mark, &table)? {
        ip(&["rule", "add", "fwmark", &mark, "lookup", &table])?;
    }
    ip(&[
        "route",
        "replace",
        "local",
        "0.0.0.0/0",
        "dev",
        "lo",
        "table",
        &table,
    ])?;
    Ok(())
}

fn remove_proxy_routing() -> Result<(), DatapathError> {
    let (mark, table) = proxy_rule();
    if has_proxy_rule(&mark, &table)? {
        ip(&["rule", "del", "fwmark", &mark, "lookup", &table])?;
    }
    // `show` fails when the table does not exist: then there is nothing to flush.
    if ip(&["route", "show", "table", &table]).is_ok_and(|routes| !routes.trim().is_empty()) {
        ip(&["route", "flush", "table", &table])?;
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<String, DatapathError> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .map_err(|source| DatapathError::Io {
            what: "running",
            path: PathBuf::from("ip"),
            source,
        })?;
    if !output.status.success() {
        return Err(DatapathError::IpCommand {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
