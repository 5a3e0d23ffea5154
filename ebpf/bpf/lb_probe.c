// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * Test-only probe: runs the socket-LB decision (lb_translate, the code cgroup/connect4 runs) under
 * BPF_PROG_TEST_RUN, which cgroup sock_addr programs do not support. It shares the datapath's
 * pinned maps. Packet in: 14 bytes of Ethernet header, then struct lb_probe_io with the query;
 * packet out: the same struct with the answer.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>

#include "lb.h"

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct lb_probe_io {
	__u32 vip;      /* in, network order */
	__u16 dport;    /* in, network order */
	__u8 protocol;  /* in */
	__u8 result;    /* out: enum lb_result */
	__u32 hash;     /* in */
	__u32 backend_addr; /* out, network order */
	__u16 backend_port; /* out, network order */
	__u16 _pad;
};

SEC("classifier")
int sluice_lb_probe(struct __sk_buff *skb)
{
	struct lb_probe_io io;
	struct backend_value be = {};

	if (bpf_skb_load_bytes(skb, ETH_HLEN, &io, sizeof(io)) < 0)
		return TC_ACT_SHOT;
	io.result = lb_translate(io.vip, io.dport, io.protocol, io.hash, &be);
	io.backend_addr = be.addr;
	io.backend_port = be.port;
	if (bpf_skb_store_bytes(skb, ETH_HLEN, &io, sizeof(io), 0) < 0)
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}
