//! datapath (I/O edge): the eBPF datapath of this node — bpffs/cgroup2 mounts, loading (pinned), TC on local pods' veths found by route lookup, map apply and read-back, cleanup.
//!
//! The decisions (what the maps should hold) are made by `compile::bpf`; this module only finds
//! interfaces, attaches programs and hands the state to `sluice_ebpf::Datapath`.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use sluice_ebpf::{BpfDelta, BpfState, Datapath, DatapathError, FlowEvents, KernelEndpoint, KernelPolicyEntry, KernelService};

/// Where bpffs is mounted on a node unless `--bpffs` says otherwise.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";
/// The proxy's transparent listener (127.0.0.1), where the kernel redirects L7 flows.
pub const DEFAULT_PROXY_PORT: u16 = 15001;

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// `--datapath ebpf` settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelConfig {
    /// Pins of maps and links (`--bpffs`).
    pub pin_dir: PathBuf,
    /// The cgroup v2 directory the socket load-balancing hooks are attached to (`--cgroup`).
    pub cgroup: PathBuf,
    pub proxy_port: u16,
    /// Detach everything and remove the pins when the agent stops (`--cleanup-on-exit`).
    pub cleanup_on_exit: bool,
}

/// The default `--bpffs` of a node: `/sys/fs/bpf/sluice/<node>`.
pub fn default_pin_dir(node: &str) -> PathBuf {
    Path::new(BPFFS_ROOT).join("sluice").join(node)
}

fn filesystem_magic(path: &Path) -> std::io::Result<i64> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c_path.as_ptr(), &mut buf) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(buf.f_type as i64)
}

fn nearest_existing(path: &Path) -> &Path {
    path.ancestors().find(|p| p.exists()).unwrap_or(Path::new("/"))
}

/// Where a bpffs must be mounted for `pin_dir`, or `None` when it already lies on one: the
/// node's `/sys/fs/bpf` for a pin dir under it, else the pin dir itself.
pub fn bpffs_mount_point(pin_dir: &Path, already_on_bpffs: bool) -> Option<PathBuf> {
    if already_on_bpffs {
        return None;
    }
    if pin_dir.starts_with(BPFFS_ROOT) {
        Some(PathBuf::from(BPFFS_ROOT))
    } else {
        Some(pin_dir.to_path_buf())
    }
}

fn prepare_bpffs(pin_dir: &Path) -> anyhow::Result<()> {
    let existing = nearest_existing(pin_dir);
    let on_bpffs = filesystem_magic(existing).with_context(|| format!("statfs {}", existing.display()))? == BPF_FS_MAGIC;
    if let Some(mount_point) = bpffs_mount_point(pin_dir, on_bpffs) {
        sluice_ebpf::ensure_bpffs(&mount_point).with_context(|| format!("--bpffs {}", pin_dir.display()))?;
    }
    Ok(())
}

/// Makes `cgroup` a child cgroup v2 directory: created inside an existing cgroup2 hierarchy, or,
/// when its parent is not on cgroup2, with the hierarchy mounted on that parent (only if it is
/// missing or empty, so nothing the node uses is ever hidden).
fn prepare_cgroup(cgroup: &Path) -> anyhow::Result<()> {
    let on_cgroup2 = |p: &Path| filesystem_magic(p).map(|m| m == CGROUP2_SUPER_MAGIC);
    if cgroup.exists() {
        if !on_cgroup2(cgroup).with_context(|| format!("statfs {}", cgroup.display()))? {
            bail!("--cgroup {}: not a cgroup v2 directory", cgroup.display());
        }
        return Ok(());
    }
    let parent = cgroup
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .with_context(|| format!("--cgroup {}: needs a parent directory", cgroup.display()))?;
    let parent_ready = parent.exists() && on_cgroup2(parent).with_context(|| format!("statfs {}", parent.display()))?;
    if !parent_ready {
        let empty = match std::fs::read_dir(parent) {
            Ok(mut entries) => entries.next().is_none(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
            Err(e) => return Err(e).with_context(|| format!("reading {}", parent.display())),
        };
        if !empty {
            bail!(
                "--cgroup {}: {} is neither on cgroup v2 nor an empty directory to mount it on",
                cgroup.display(),
                parent.display()
            );
        }
        sluice_ebpf::ensure_cgroup2(parent).with_context(|| format!("--cgroup {}", cgroup.display()))?;
    }
    std::fs::create_dir(cgroup).with_context(|| format!("creating cgroup {}", cgroup.display()))?;
    tracing::info!(cgroup = %cgroup.display(), "created cgroup");
    Ok(())
}

/// The host-side interface of a pod address: the device of its host route in the main routing
/// table (`/proc/net/route` text). Only a `/32` device route counts: a pod reached through a
/// wider route or a gateway (the uplink) is not behind a veth of this node.
pub fn pod_route_interface(route_table: &str, pod: Ipv4Addr) -> Option<String> {
    const RTF_UP: u32 = 0x1;
    const RTF_GATEWAY: u32 = 0x2;
    let hex = |field: &str| u32::from_str_radix(field, 16).ok();
    let mut best: Option<(u32, String)> = None;
    for line in route_table.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [iface, destination, _gateway, flags, _, _, _, mask, ..] = fields.as_slice() else { continue };
        let (Some(destination), Some(flags), Some(mask)) = (hex(destination), hex(flags), hex(mask)) else { continue };
        // The kernel prints the network-order words as host-order hex.
        let (destination, mask) = (u32::from_be(destination), u32::from_be(mask));
        if flags & RTF_UP == 0 || u32::from(pod) & mask != destination {
            continue;
        }
        let longer = best.as_ref().is_none_or(|(best_mask, _)| mask.count_ones() > best_mask.count_ones());
        if longer {
            let usable = mask == u32::MAX && flags & RTF_GATEWAY == 0;
            best = Some((mask, if usable { (*iface).to_string() } else { String::new() }));
        }
    }
    best.map(|(_, iface)| iface).filter(|iface| !iface.is_empty())
}

fn ifindex_of(name: &str) -> Option<u32> {
    let c_name = CString::new(name).ok()?;
    // SAFETY: a valid NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    (index != 0).then_some(index)
}

/// A local pod's host-side interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInterface {
    pub name: String,
    pub ifindex: u32,
}

/// Finds the interfaces of local pod addresses now (route lookup + ifindex).
pub fn find_pod_interfaces(pods: &BTreeMap<Ipv4Addr, String>) -> BTreeMap<Ipv4Addr, PodInterface> {
    let table = match std::fs::read_to_string("/proc/net/route") {
        Ok(table) => table,
        Err(error) => {
            tracing::error!(%error, "cannot read /proc/net/route; no pod interface found");
            return BTreeMap::new();
        }
    };
    pods.keys()
        .filter_map(|ip| {
            let name = pod_route_interface(&table, *ip)?;
            let ifindex = ifindex_of(&name)?;
            Some((*ip, PodInterface { name, ifindex }))
        })
        .collect()
}

/// What the kernel's maps hold, read back after an apply.
#[derive(Debug, Clone, Default)]
pub struct KernelReadback {
    pub endpoints: Vec<KernelEndpoint>,
    pub services: Vec<KernelService>,
    pub policy: Vec<KernelPolicyEntry>,
}

/// The loaded datapath of this node.
pub struct Kernel {
    datapath: Datapath,
    config: KernelConfig,
    /// Interfaces whose TC programs this run attached, by ifindex.
    attached: BTreeMap<u32, String>,
    /// Interfaces an earlier run left attached (from the endpoints map), until the first apply
    /// decides which of them are still pods.
    inherited: BTreeSet<u32>,
}

impl Kernel {
    /// Mounts what is missing, loads the programs (reusing the maps an earlier run pinned, so
    /// enforcement never stops), attaches the socket hooks to the cgroup and opens the
    /// flow-event ring.
    pub fn start(config: KernelConfig) -> anyhow::Result<(Kernel, FlowEvents)> {
        prepare_bpffs(&config.pin_dir)?;
        prepare_cgroup(&config.cgroup)?;
        let mut datapath = Datapath::load(&config.pin_dir)
            .with_context(|| format!("loading the eBPF datapath (pins under {})", config.pin_dir.display()))?;
        datapath
            .attach_cgroup(&config.cgroup)
            .with_context(|| format!("attaching socket load balancing to --cgroup {}", config.cgroup.display()))?;
        let events = datapath.flow_events().context("opening the flow-event ring buffer")?;
        let inherited: BTreeSet<u32> = datapath
            .kernel_endpoints()
            .context("reading the pinned endpoints map")?
            .iter()
            .map(|e| e.ifindex)
            .collect();
        if !inherited.is_empty() {
            tracing::info!(endpoints = inherited.len(), "reusing the pinned state of an earlier run");
        }
        Ok((Kernel { datapath, config, attached: BTreeMap::new(), inherited }, events))
    }

    pub fn config(&self) -> &KernelConfig {
        &self.config
    }

    /// Attaches TC to every interface of `wanted` not attached by this run yet (replacing a
    /// previous run's programs in place). Returns the pods whose programs are attached, and
    /// a message for each interface that could not be attached.
    pub fn attach_pods(
        &mut self,
        wanted: &BTreeMap<Ipv4Addr, PodInterface>,
    ) -> (BTreeMap<Ipv4Addr, u32>, Vec<String>) {
        let mut ready = BTreeMap::new();
        let mut problems = Vec::new();
        for (ip, interface) in wanted {
            if self.attached.get(&interface.ifindex) != Some(&interface.name) {
                match self.datapath.attach_interface(&interface.name) {
                    Ok(ifindex) if ifindex == interface.ifindex => {
                        self.attached.insert(ifindex, interface.name.clone());
                    }
                    Ok(ifindex) => {
                        problems.push(format!("{ip}: interface {} changed (now ifindex {ifindex}); retrying", interface.name));
                        continue;
                    }
                    Err(error) => {
                        problems.push(format!("{ip}: attaching to {}: {error}", interface.name));
                        continue;
                    }
                }
            }
            ready.insert(*ip, interface.ifindex);
        }
        (ready, problems)
    }

    /// Makes the maps equal to `state`, then detaches interfaces no endpoint uses any more.
    pub fn apply(&mut self, state: &BpfState) -> Result<BpfDelta, DatapathError> {
        let delta = self.datapath.apply(state)?;
        let in_use: BTreeSet<u32> = state.endpoints.iter().map(|e| e.ifindex).collect();
        let gone: Vec<u32> = self
            .attached
            .keys()
            .chain(self.inherited.iter())
            .filter(|ifindex| !in_use.contains(ifindex))
            .copied()
            .collect();
        for ifindex in gone {
            self.datapath.detach_interface(ifindex)?;
            if let Some(name) = self.attached.remove(&ifindex) {
                tracing::info!(ifname = %name, ifindex, "TC programs detached");
            }
        }
        self.inherited.clear();
        Ok(delta)
    }

    pub fn read_back(&self) -> Result<KernelReadback, DatapathError> {
        Ok(KernelReadback {
            endpoints: self.datapath.kernel_endpoints()?,
            services: self.datapath.kernel_services()?,
            policy: self.datapath.kernel_policy()?,
        })
    }

    /// The interface name of an attached ifindex.
    pub fn interface_name(&self, ifindex: u32) -> Option<&str> {
        self.attached.get(&ifindex).map(String::as_str)
    }

    /// Detaches every program and removes the pins: the node no longer enforces anything.
    pub fn cleanup(mut self) -> anyhow::Result<()> {
        self.datapath
            .detach_cgroup(&self.config.cgroup)
            .with_context(|| format!("detaching from {}", self.config.cgroup.display()))?;
        self.datapath.cleanup().context("removing the eBPF datapath")?;
        Ok(())
    }
}

/// `sluice cleanup`: removes what an agent left pinned and attached under `pin_dir` (and its
/// socket hooks on `cgroup`, when given).
pub fn cleanup_pinned(pin_dir: &Path, cgroup: Option<&Path>) -> anyhow::Result<bool> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    let mut datapath = Datapath::load(pin_dir).with_context(|| format!("opening the pins under {}", pin_dir.display()))?;
    if let Some(cgroup) = cgroup {
        datapath.detach_cgroup(cgroup).with_context(|| format!("detaching from {}", cgroup.display()))?;
    }
    datapath.cleanup().context("removing the eBPF datapath")?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
        lxc0\t0A0012C6\t00000000\t0001\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
        lxc1\t0B0012C6\t00000000\t0001\t0\t0\t0\tFFFFFFFF\t0\t0\t0\n\
        eth0\t000012C6\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";

    #[test]
    fn a_pod_host_route_names_its_veth() {
        assert_eq!(pod_route_interface(ROUTES, Ipv4Addr::new(198, 18, 0, 10)).as_deref(), Some("lxc0"));
        assert_eq!(pod_route_interface(ROUTES, Ipv4Addr::new(198, 18, 0, 11)).as_deref(), Some("lxc1"));
    }

    #[test]
    fn a_pod_behind_a_wider_route_or_the_default_route_has_no_interface() {
        // 198.18.0.12 matches only the /16 on eth0 (the uplink): never attached to.
        assert_eq!(pod_route_interface(ROUTES, Ipv4Addr::new(198, 18, 0, 12)), None);
        assert_eq!(pod_route_interface(ROUTES, Ipv4Addr::new(10, 0, 0, 1)), None);
    }

    #[test]
    fn the_default_pin_dir_needs_the_nodes_bpffs_and_a_custom_one_its_own() {
        let default = default_pin_dir("node-a");
        assert_eq!(default, Path::new("/sys/fs/bpf/sluice/node-a"));
        assert_eq!(bpffs_mount_point(&default, false), Some(PathBuf::from("/sys/fs/bpf")));
        assert_eq!(bpffs_mount_point(Path::new("/run/pins/a"), false), Some(PathBuf::from("/run/pins/a")));
        assert_eq!(bpffs_mount_point(&default, true), None);
    }
}
