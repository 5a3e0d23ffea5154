//! datapath (kernel boundary): the Rust mirror of `bpf/abi.h`, checked field by field against
//! what clang computes for the host and the BPF target (see build.rs and the tests below).
//!
//! Addresses and ports in keys are network byte order (`u32::from(ip).to_be()`,
//! `port.to_be()`); identities and proxy ports are host order. LPM keys leave out the C
//! `prefixlen` field: aya's `lpm_trie::Key<K>` adds it in front.

use aya::Pod;

pub const IDENTITY_UNKNOWN: u32 = 0;
pub const IDENTITY_HOST: u32 = 1;
pub const IDENTITY_WORLD: u32 = 2;

pub const VERDICT_FORWARDED: u8 = 1;
pub const VERDICT_DROPPED: u8 = 2;
pub const VERDICT_REDIRECTED: u8 = 5;

pub const DROP_INVALID_SIP: u16 = 132;
pub const DROP_POLICY: u16 = 133;
pub const DROP_INVALID: u16 = 134;
pub const DROP_NO_SERVICE: u16 = 158;
pub const DROP_PROXY_LOOKUP_FAILED: u16 = 178;
pub const DROP_PROXY_SET_FAILED: u16 = 179;
pub const DROP_PROXY_UNKNOWN_PROTO: u16 = 180;
pub const DROP_POLICY_DENY: u16 = 181;
pub const DROP_POLICY_AUTH_REQUIRED: u16 = 189;

pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

pub const OBS_FROM_ENDPOINT: u8 = 1;
pub const OBS_TO_ENDPOINT: u8 = 2;
pub const OBS_SOCK: u8 = 3;

pub const MARK_MAGIC_MASK: u32 = 0x0F00;
pub const MARK_MAGIC_TO_PROXY: u32 = 0x0200;
pub const MARK_MAGIC_PROXY_INGRESS: u32 = 0x0A00;
pub const MARK_MAGIC_PROXY_EGRESS: u32 = 0x0B00;
pub const MARK_MAGIC_POLICY_DONE: u32 = 0x0E00;
pub const PROXY_ROUTE_TABLE: u32 = 2004;

pub const EP_F_ENFORCE_INGRESS: u32 = 0x1;
pub const EP_F_ENFORCE_EGRESS: u32 = 0x2;
pub const SVC_F_L7: u32 = 0x1;

pub const POLICY_PREFIX_BASE: u32 = 72;
pub const POLICY_PREFIX_L4_MAX: u32 = 24;

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct IpcacheKeyData {
    pub addr: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IpcacheValue {
    pub identity: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct EndpointKey {
    pub addr: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EndpointInfo {
    pub identity: u32,
    pub ifindex: u32,
    pub flags: u32,
    pub _pad: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct PolicyKeyData {
    pub endpoint_addr: u32,
    pub remote_identity: u32,
    pub egress: u8,
    pub protocol: u8,
    pub dport: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyValue {
    pub proxy_port: u16,
    pub deny: u8,
    pub auth_required: u8,
    pub l4_prefixlen: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ServiceKey {
    pub vip: u32,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceValue {
    pub service_id: u32,
    pub maglev_size: u32,
    pub backend_count: u16,
    pub l7_proxy_port: u16,
    pub flags: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendKey {
    pub backend_id: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct BackendValue {
    pub addr: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MaglevKey {
    pub service_id: u32,
    pub slot: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MaglevValue {
    pub backend_id: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SockRevnatKey {
    pub cookie: u64,
    pub backend_addr: u32,
    pub backend_port: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SockRevnatValue {
    pub vip: u32,
    pub vport: u16,
    pub _pad: u16,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CtValue {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub proxy_port: u16,
    pub _pad: u16,
    pub _pad2: u32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FlowEventRecord {
    pub ktime_ns: u64,
    pub saddr: u32,
    pub daddr: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub ifindex: u32,
    pub sport: u16,
    pub dport: u16,
    pub drop_reason: u16,
    pub proxy_port: u16,
    pub verdict: u8,
    pub direction: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub observation_point: u8,
    pub _pad: [u8; 3],
}

// SAFETY: every type is repr(C), made only of integers, with all padding spelled out as fields,
// so any bit pattern is valid and no byte is uninitialised.
unsafe impl Pod for IpcacheKeyData {}
unsafe impl Pod for IpcacheValue {}
unsafe impl Pod for EndpointKey {}
unsafe impl Pod for EndpointInfo {}
unsafe impl Pod for PolicyKeyData {}
unsafe impl Pod for PolicyValue {}
unsafe impl Pod for ServiceKey {}
unsafe impl Pod for ServiceValue {}
unsafe impl Pod for BackendKey {}
unsafe impl Pod for BackendValue {}
unsafe impl Pod for MaglevKey {}
unsafe impl Pod for MaglevValue {}
unsafe impl Pod for SockRevnatKey {}
unsafe impl Pod for SockRevnatValue {}
unsafe impl Pod for CtKey {}
unsafe impl Pod for CtValue {}
unsafe impl Pod for FlowEventRecord {}

impl FlowEventRecord {
    /// Reads one ring-buffer record; `None` when the record is shorter than the struct.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < std::mem::size_of::<Self>() {
            return None;
        }
        // SAFETY: length checked above; the type is Pod (any bit pattern valid); read_unaligned
        // because ring-buffer records are only 8-byte aligned by the kernel's convention.
        Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<Self>()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{align_of, offset_of, size_of};

    mod c {
        include!(concat!(env!("OUT_DIR"), "/abi_layout.rs"));
    }

    /// (C struct, Rust size, Rust align, fields as (name, offset, size)); `lpm` adds the C
    /// `prefixlen` that aya's `Key<K>` puts in front of the data.
    struct Mirror {
        c_name: &'static str,
        size: usize,
        align: usize,
        lpm: bool,
        fields: Vec<(&'static str, usize, usize)>,
    }

    macro_rules! mirror {
        ($c:literal, $ty:ty, lpm = $lpm:expr, [$($field:ident),* $(,)?]) => {{
            let shift = if $lpm { 4 } else { 0 };
            Mirror {
                c_name: $c,
                size: size_of::<$ty>() + shift,
                align: align_of::<$ty>(),
                lpm: $lpm,
                fields: vec![$((
                    stringify!($field),
                    offset_of!($ty, $field) + shift,
                    size_of_field(|v: &$ty| &v.$field),
                )),*],
            }
        }};
    }

    fn size_of_field<T, F>(_: impl Fn(&T) -> &F) -> usize {
        size_of::<F>()
    }

    fn mirrors() -> Vec<Mirror> {
        vec![
            mirror!("ipcache_key", IpcacheKeyData, lpm = true, [addr]),
            mirror!("ipcache_value", IpcacheValue, lpm = false, [identity, _pad]),
            mirror!("endpoint_key", EndpointKey, lpm = false, [addr]),
            mirror!(
                "endpoint_info",
                EndpointInfo,
                lpm = false,
                [identity, ifindex, flags, _pad]
            ),
            mirror!(
                "policy_key",
                PolicyKeyData,
                lpm = true,
                [endpoint_addr, remote_identity, egress, protocol, dport]
            ),
            mirror!(
                "policy_value",
                PolicyValue,
                lpm = false,
                [proxy_port, deny, auth_required, l4_prefixlen, _pad]
            ),
            mirror!(
                "service_key",
                ServiceKey,
                lpm = false,
                [vip, dport, protocol, _pad]
            ),
            mirror!(
                "service_value",
                ServiceValue,
                lpm = false,
                [service_id, maglev_size, backend_count, l7_proxy_port, flags]
            ),
            mirror!("backend_key", BackendKey, lpm = false, [backend_id]),
            mirror!(
                "backend_value",
                BackendValue,
                lpm = false,
                [addr, port, protocol, _pad]
            ),
            mirror!("maglev_key", MaglevKey, lpm = false, [service_id, slot]),
            mirror!("maglev_value", MaglevValue, lpm = false, [backend_id]),
            mirror!(
                "sock_revnat_key",
                SockRevnatKey,
                lpm = false,
                [cookie, backend_addr, backend_port, _pad]
            ),
            mirror!(
                "sock_revnat_value",
                SockRevnatValue,
                lpm = false,
                [vip, vport, _pad]
            ),
            mirror!(
                "ct_key",
                CtKey,
                lpm = false,
                [saddr, daddr, sport, dport, protocol, _pad]
            ),
            mirror!(
                "ct_value",
                CtValue,
                lpm = false,
                [src_identity, dst_identity, proxy_port, _pad, _pad2]
            ),
            mirror!(
                "flow_event",
                FlowEventRecord,
                lpm = false,
                [
                    ktime_ns,
                    saddr,
                    daddr,
                    src_identity,
                    dst_identity,
                    ifindex,
                    sport,
                    dport,
                    drop_reason,
                    proxy_port,
                    verdict,
                    direction,
                    protocol,
                    tcp_flags,
                    observation_point,
                    _pad
                ]
            ),
        ]
    }

    #[test]
    fn every_c_struct_has_a_rust_mirror_with_the_same_size_and_alignment() {
        let mirrors = mirrors();
        assert_eq!(
            mirrors.len(),
            c::C_STRUCTS.len(),
            "structs in abi.h vs abi.rs"
        );
        for (name, size, align) in c::C_STRUCTS {
            let mirror = mirrors
                .iter()
                .find(|m| m.c_name == *name)
                .unwrap_or_else(|| panic!("struct {name} of abi.h has no mirror in abi.rs"));
            assert_eq!(mirror.size, *size, "sizeof(struct {name})");
            if !mirror.lpm {
                assert_eq!(mirror.align, *align, "_Alignof(struct {name})");
            }
        }
    }

    #[test]
    fn every_field_has_the_c_offset_and_size() {
        for mirror in mirrors() {
            let c_fields: Vec<_> = c::C_FIELDS
                .iter()
                .filter(|f| f.0 == mirror.c_name)
                .collect();
            let expected_fields = mirror.fields.len() + usize::from(mirror.lpm);
            assert_eq!(
                c_fields.len(),
                expected_fields,
                "field count of {}",
                mirror.c_name
            );
            for (field, offset, size) in &mirror.fields {
                let c_field = c_fields
                    .iter()
                    .find(|f| f.1 == *field)
                    .unwrap_or_else(|| panic!("{}.{field} missing on the C side", mirror.c_name));
                assert_eq!(
                    (c_field.2, c_field.3),
                    (*offset, *size),
                    "{}.{field} (offset, size)",
                    mirror.c_name
                );
            }
        }
    }

    #[test]
    fn constants_match_the_header() {
        let rust: &[(&str, i64)] = &[
            ("IDENTITY_UNKNOWN", IDENTITY_UNKNOWN.into()),
            ("IDENTITY_HOST", IDENTITY_HOST.into()),
            ("IDENTITY_WORLD", IDENTITY_WORLD.into()),
            ("VERDICT_FORWARDED", VERDICT_FORWARDED.into()),
            ("VERDICT_DROPPED", VERDICT_DROPPED.into()),
            ("VERDICT_REDIRECTED", VERDICT_REDIRECTED.into()),
            ("DROP_INVALID_SIP", DROP_INVALID_SIP.into()),
            ("DROP_POLICY", DROP_POLICY.into()),
            ("DROP_INVALID", DROP_INVALID.into()),
            ("DROP_NO_SERVICE", DROP_NO_SERVICE.into()),
            ("DROP_PROXY_LOOKUP_FAILED", DROP_PROXY_LOOKUP_FAILED.into()),
            ("DROP_PROXY_SET_FAILED", DROP_PROXY_SET_FAILED.into()),
            ("DROP_PROXY_UNKNOWN_PROTO", DROP_PROXY_UNKNOWN_PROTO.into()),
            ("DROP_POLICY_DENY", DROP_POLICY_DENY.into()),
            (
                "DROP_POLICY_AUTH_REQUIRED",
                DROP_POLICY_AUTH_REQUIRED.into(),
            ),
            ("DIR_INGRESS", DIR_INGRESS.into()),
            ("DIR_EGRESS", DIR_EGRESS.into()),
            ("OBS_FROM_ENDPOINT", OBS_FROM_ENDPOINT.into()),
            ("OBS_TO_ENDPOINT", OBS_TO_ENDPOINT.into()),
            ("OBS_SOCK", OBS_SOCK.into()),
            ("MARK_MAGIC_MASK", MARK_MAGIC_MASK.into()),
            ("MARK_MAGIC_TO_PROXY", MARK_MAGIC_TO_PROXY.into()),
            ("MARK_MAGIC_PROXY_INGRESS", MARK_MAGIC_PROXY_INGRESS.into()),
            ("MARK_MAGIC_PROXY_EGRESS", MARK_MAGIC_PROXY_EGRESS.into()),
            ("MARK_MAGIC_POLICY_DONE", MARK_MAGIC_POLICY_DONE.into()),
            ("PROXY_ROUTE_TABLE", PROXY_ROUTE_TABLE.into()),
            ("EP_F_ENFORCE_INGRESS", EP_F_ENFORCE_INGRESS.into()),
            ("EP_F_ENFORCE_EGRESS", EP_F_ENFORCE_EGRESS.into()),
            ("SVC_F_L7", SVC_F_L7.into()),
            ("POLICY_PREFIX_BASE", POLICY_PREFIX_BASE.into()),
            ("POLICY_PREFIX_L4_MAX", POLICY_PREFIX_L4_MAX.into()),
        ];
        assert_eq!(
            rust.len(),
            c::C_CONSTS.len(),
            "constants in abi.h vs abi.rs"
        );
        for (name, value) in c::C_CONSTS {
            let mirrored = rust
                .iter()
                .find(|(n, _)| n == name)
                .unwrap_or_else(|| panic!("constant {name} of abi.h has no mirror in abi.rs"));
            assert_eq!(mirrored.1, *value, "{name}");
        }
    }

    #[test]
    fn a_flow_event_record_reads_back_from_its_bytes() {
        let record = FlowEventRecord {
            drop_reason: DROP_POLICY_DENY,
            dport: 80,
            verdict: VERDICT_DROPPED,
            ..Default::default()
        };
        // SAFETY: Pod type viewed as bytes for the round trip.
        let bytes = unsafe {
            std::slice::from_raw_parts(
                (&record as *const FlowEventRecord).cast::<u8>(),
                size_of::<FlowEventRecord>(),
            )
        };
        assert_eq!(FlowEventRecord::from_bytes(bytes), Some(record));
        assert_eq!(FlowEventRecord::from_bytes(&bytes[..10]), None);
    }
}
