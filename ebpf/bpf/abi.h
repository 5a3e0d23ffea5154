/* SPDX-License-Identifier: Apache-2.0 */
/*
 * The one definition of everything the kernel programs and the Rust loader share: map keys and
 * values, flow events, constants. `src/abi.rs` mirrors it; build.rs checks the mirror field by
 * field (sizes, alignments, offsets) for both the host and the BPF target.
 *
 * Byte order: addresses and ports in keys are in network byte order (as they sit in packets and in
 * `struct bpf_sock_addr`); proxy ports and identities are host order. IPv4 only for now.
 */
#ifndef SLUICE_ABI_H
#define SLUICE_ABI_H

#include <linux/types.h>

/* Reserved security identities (Cilium's numeric values). */
#define IDENTITY_UNKNOWN 0
#define IDENTITY_HOST 1
#define IDENTITY_WORLD 2

/* Hubble verdicts (flow.proto Verdict). */
#define VERDICT_FORWARDED 1
#define VERDICT_DROPPED 2
#define VERDICT_REDIRECTED 5

/* Drop reasons: Cilium's numbers (bpf/lib/common.h, negated). */
#define DROP_INVALID_SIP 132
#define DROP_POLICY 133
#define DROP_INVALID 134
#define DROP_NO_SERVICE 158
#define DROP_PROXY_LOOKUP_FAILED 178
#define DROP_PROXY_SET_FAILED 179
#define DROP_PROXY_UNKNOWN_PROTO 180
#define DROP_POLICY_DENY 181
#define DROP_POLICY_AUTH_REQUIRED 189

/* Policy direction, as the policy key's `egress` byte and the event's `direction`. */
#define DIR_INGRESS 0
#define DIR_EGRESS 1

/* Where an event was observed (subset of Hubble's trace_observation_point). */
#define OBS_FROM_ENDPOINT 1 /* TC ingress on the pod's host-side veth: packets leaving the pod */
#define OBS_TO_ENDPOINT 2   /* TC egress on the pod's host-side veth: packets entering the pod */
#define OBS_SOCK 3          /* cgroup socket hooks (socket load balancing) */

/*
 * skb->mark magic nibble (mask 0x0F00), Cilium's encoding where one exists. A pod cannot forge
 * these: the mark is scrubbed when a packet crosses from the pod's namespace into the node's.
 */
#define MARK_MAGIC_MASK 0x0F00
#define MARK_MAGIC_TO_PROXY 0x0200      /* matched by `ip rule fwmark 0x200/0xf00 lookup 2004` */
#define MARK_MAGIC_PROXY_INGRESS 0x0A00 /* sent by the proxy after ingress L7 policy */
#define MARK_MAGIC_PROXY_EGRESS 0x0B00  /* sent by the proxy after egress L7 policy */
#define MARK_MAGIC_POLICY_DONE 0x0E00   /* from-container already applied the destination's ingress policy */
#define PROXY_ROUTE_TABLE 2004

/* endpoint_info.flags */
#define EP_F_ENFORCE_INGRESS 0x1 /* a policy selects the endpoint for ingress: default deny */
#define EP_F_ENFORCE_EGRESS 0x2  /* a policy selects the endpoint for egress: default deny */

/* service_value.flags */
#define SVC_F_L7 0x1 /* listed in a CiliumEnvoyConfig: keep the VIP, redirect to l7_proxy_port in TC */

/* LPM prefix lengths of a policy key: endpoint address, remote identity and direction always
 * match fully; then 8 protocol bits and up to 16 port bits. */
#define POLICY_PREFIX_BASE 72
#define POLICY_PREFIX_L4_MAX 24

/* ipcache: LPM trie, IPv4 prefix -> security identity. */
struct ipcache_key {
	__u32 prefixlen;
	__u32 addr; /* network order */
};

struct ipcache_value {
	__u32 identity;
	__u32 _pad;
};

/* Local endpoints (pods on this node), keyed by IPv4 address (network order). */
struct endpoint_key {
	__u32 addr;
};

struct endpoint_info {
	__u32 identity;
	__u32 ifindex; /* host-side veth */
	__u32 flags;   /* EP_F_* */
	__u32 _pad;
};

/*
 * Per-endpoint policy (one LPM trie for all endpoints, the endpoint address leading the key):
 * Cilium's key {remote identity (0 = any), direction, protocol (0 = any), dport}, where the LPM
 * prefix wildcards protocol and port (port ranges become several prefixes).
 */
struct policy_key {
	__u32 prefixlen;
	__u32 endpoint_addr;   /* network order */
	__u32 remote_identity; /* 0 = any identity */
	__u8 egress;           /* DIR_INGRESS / DIR_EGRESS */
	__u8 protocol;         /* IPPROTO_*, 0 = any */
	__u16 dport;           /* network order */
};

struct policy_value {
	__u16 proxy_port;    /* host order; non-zero: redirect to the proxy listener on this port */
	__u8 deny;           /* 1: DROP_POLICY_DENY */
	__u8 auth_required;  /* 1: only through the proxy (mTLS); without proxy_port DROP_POLICY_AUTH_REQUIRED */
	__u8 l4_prefixlen;   /* prefixlen - POLICY_PREFIX_BASE: how specific the L4 match is */
	__u8 _pad[3];
};

/* Services for socket load balancing: VIP:port/proto -> Maglev table -> backend. */
struct service_key {
	__u32 vip;      /* network order */
	__u16 dport;    /* network order */
	__u8 protocol;  /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 _pad;
};

struct service_value {
	__u32 service_id;    /* key of this service's Maglev table */
	__u32 maglev_size;   /* M, prime (1 for a single backend) */
	__u16 backend_count; /* 0: refuse (ECONNREFUSED), DROP_NO_SERVICE */
	__u16 l7_proxy_port; /* host order, with SVC_F_L7 */
	__u32 flags;         /* SVC_F_* */
};

struct backend_key {
	__u32 backend_id;
};

struct backend_value {
	__u32 addr;    /* network order */
	__u16 port;    /* network order */
	__u8 protocol;
	__u8 _pad;
};

/* One Maglev slot of one service: {service_id, slot} -> backend_id. */
struct maglev_key {
	__u32 service_id;
	__u32 slot;
};

struct maglev_value {
	__u32 backend_id;
};

/* Reverse translation for getpeername/recvmsg: {socket cookie, backend} -> VIP. */
struct sock_revnat_key {
	__u64 cookie;
	__u32 backend_addr; /* network order */
	__u16 backend_port; /* network order */
	__u16 _pad;
};

struct sock_revnat_value {
	__u32 vip;   /* network order */
	__u16 vport; /* network order */
	__u16 _pad;
};

/* Conntrack, keyed by the tuple of the packet that opened the flow. */
struct ct_key {
	__u32 saddr; /* network order */
	__u32 daddr; /* network order */
	__u16 sport; /* network order */
	__u16 dport; /* network order */
	__u8 protocol;
	__u8 _pad[3];
};

struct ct_value {
	__u32 src_identity;
	__u32 dst_identity;
	__u16 proxy_port; /* host order; non-zero: every packet of the flow goes to the proxy */
	__u16 _pad;
	__u32 _pad2;
};

/* One flow event in the ring buffer (verdicts of new flows, every drop). */
struct flow_event {
	__u64 ktime_ns; /* bpf_ktime_get_ns: CLOCK_MONOTONIC */
	__u32 saddr;    /* network order */
	__u32 daddr;    /* network order */
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u16 sport; /* host order */
	__u16 dport; /* host order */
	__u16 drop_reason; /* 0 unless verdict is VERDICT_DROPPED */
	__u16 proxy_port;  /* host order: the proxy a REDIRECTED flow went to, or could not reach */
	__u8 verdict;
	__u8 direction;   /* DIR_* of the policy that decided */
	__u8 protocol;
	__u8 tcp_flags;   /* FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 URG 0x20 ECE 0x40 CWR 0x80 */
	__u8 observation_point; /* OBS_* */
	__u8 _pad[3];
};

#endif /* SLUICE_ABI_H */
