// SPDX-License-Identifier: GPL-2.0-only OR Apache-2.0
/*
 * The kernel half of sluice's datapath:
 *  - sluice_from_container (TC ingress on a pod's host-side veth, packets leaving the pod): source
 *    check, conntrack, the source's egress policy and, for a local destination, the destination's
 *    ingress policy; L7 flows (policy proxy_port or CEC service) go to the proxy's transparent
 *    listener with bpf_sk_assign, or are dropped when it is missing (fail closed).
 *  - sluice_to_container (TC egress on the veth, packets entering the pod): the pod's ingress
 *    policy for traffic that did not pass sluice_from_container (host, other nodes, the proxy).
 *  - sluice_sock_* (cgroup hooks): socket load balancing VIP -> backend through Maglev, and the
 *    reverse translation so the application sees the VIP as its peer.
 * Every drop and every new flow's verdict goes to the sluice_events ring buffer.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "abi.h"
#include "maps.h"
#include "lb.h"
#include "policy.h"

#define AF_INET 2
#define ECONNREFUSED 111
#define EHOSTUNREACH 113
#define IP_MF 0x2000
#define IP_OFFSET 0x1FFF
#define TCP_FLAGS_OFFSET 13

char LICENSE[] SEC("license") = "Dual BSD/GPL";

struct pkt {
	__u32 saddr;
	__u32 daddr;
	__u16 sport; /* network order */
	__u16 dport; /* network order */
	__u8 protocol;
	__u8 tcp_flags;
};

enum parse_result {
	PARSE_NOT_IPV4 = 0,
	PARSE_OK = 1,
	PARSE_MALFORMED = -1,
};

/* Reads the IPv4 5-tuple with bpf_skb_load_bytes, which also works on non-linear skbs. Non-first
 * fragments carry no ports: they keep port 0 and so only match port-wildcard policy entries. */
static __always_inline int parse_ipv4(struct __sk_buff *skb, struct pkt *p)
{
	struct ethhdr eth;
	struct iphdr iph;
	__u32 l4_off;
	__u16 ports[2];

	if (bpf_skb_load_bytes(skb, 0, &eth, sizeof(eth)) < 0)
		return PARSE_NOT_IPV4;
	if (eth.h_proto != bpf_htons(ETH_P_IP))
		return PARSE_NOT_IPV4;
	if (bpf_skb_load_bytes(skb, sizeof(eth), &iph, sizeof(iph)) < 0)
		return PARSE_MALFORMED;
	if (iph.ihl < 5)
		return PARSE_MALFORMED;
	p->saddr = iph.saddr;
	p->daddr = iph.daddr;
	p->protocol = iph.protocol;
	p->sport = 0;
	p->dport = 0;
	p->tcp_flags = 0;
	if (iph.frag_off & bpf_htons(IP_OFFSET))
		return PARSE_OK;
	l4_off = sizeof(eth) + iph.ihl * 4;
	if (iph.protocol == IPPROTO_TCP || iph.protocol == IPPROTO_UDP) {
		if (bpf_skb_load_bytes(skb, l4_off, ports, sizeof(ports)) < 0)
			return PARSE_MALFORMED;
		p->sport = ports[0];
		p->dport = ports[1];
	}
	if (iph.protocol == IPPROTO_TCP &&
	    bpf_skb_load_bytes(skb, l4_off + TCP_FLAGS_OFFSET, &p->tcp_flags, 1) < 0)
		return PARSE_MALFORMED;
	return PARSE_OK;
}

struct event_ctx {
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u8 observation_point;
};

static __always_inline void emit_event(const struct pkt *p, const struct event_ctx *ec, __u8 verdict,
				       __u16 drop_reason, __u8 direction, __u16 proxy_port)
{
	struct flow_event *e = bpf_ringbuf_reserve(&sluice_events, sizeof(*e), 0);

	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->ktime_ns = bpf_ktime_get_ns();
	e->saddr = p->saddr;
	e->daddr = p->daddr;
	e->src_identity = ec->src_identity;
	e->dst_identity = ec->dst_identity;
	e->ifindex = ec->ifindex;
	e->sport = bpf_ntohs(p->sport);
	e->dport = bpf_ntohs(p->dport);
	e->drop_reason = drop_reason;
	e->proxy_port = proxy_port;
	e->verdict = verdict;
	e->direction = direction;
	e->protocol = p->protocol;
	e->tcp_flags = p->tcp_flags;
	e->observation_point = ec->observation_point;
	bpf_ringbuf_submit(e, 0);
}

static __always_inline int drop(const struct pkt *p, const struct event_ctx *ec, __u16 reason, __u8 direction)
{
	emit_event(p, ec, VERDICT_DROPPED, reason, direction, 0);
	return TC_ACT_SHOT;
}

/* A flow that should reach the proxy on `proxy_port` but cannot: the event names the port. */
static __always_inline int drop_proxied(const struct pkt *p, const struct event_ctx *ec, __u16 reason,
					__u8 direction, __u16 proxy_port)
{
	emit_event(p, ec, VERDICT_DROPPED, reason, direction, proxy_port);
	return TC_ACT_SHOT;
}

static __always_inline __u32 ipcache_identity(__u32 addr)
{
	struct ipcache_key key = {.prefixlen = 32, .addr = addr};
	struct ipcache_value *v = bpf_map_lookup_elem(&sluice_ipcache, &key);

	return v ? v->identity : IDENTITY_WORLD;
}

static __always_inline struct endpoint_info *endpoint_lookup(__u32 addr)
{
	struct endpoint_key key = {.addr = addr};

	return bpf_map_lookup_elem(&sluice_endpoints, &key);
}

static __always_inline void ct_tuple(struct ct_key *key, const struct pkt *p, int reverse)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->protocol = p->protocol;
	if (reverse) {
		key->saddr = p->daddr;
		key->daddr = p->saddr;
		key->sport = p->dport;
		key->dport = p->sport;
	} else {
		key->saddr = p->saddr;
		key->daddr = p->daddr;
		key->sport = p->sport;
		key->dport = p->dport;
	}
}

static __always_inline void ct_create(const struct pkt *p, __u32 src_identity, __u32 dst_identity, __u16 proxy_port)
{
	struct ct_key key;
	struct ct_value value;

	ct_tuple(&key, p, 0);
	__builtin_memset(&value, 0, sizeof(value));
	value.src_identity = src_identity;
	value.dst_identity = dst_identity;
	value.proxy_port = proxy_port;
	bpf_map_update_elem(&sluice_ct, &key, &value, BPF_ANY);
}

/* Assigns the packet to the proxy: its established socket for this tuple if any (later packets
 * of a redirected flow), else its transparent listener on 127.0.0.1:proxy_port (or a wildcard
 * listener on that port). Returns 0 or the drop reason. */
static __always_inline __u16 assign_to_proxy(struct __sk_buff *skb, const struct pkt *p, __u16 proxy_port)
{
	struct bpf_sock_tuple tuple;
	struct bpf_sock *sk;
	long err;

	__builtin_memset(&tuple, 0, sizeof(tuple));
	tuple.ipv4.saddr = p->saddr;
	tuple.ipv4.daddr = p->daddr;
	tuple.ipv4.sport = p->sport;
	tuple.ipv4.dport = p->dport;
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (sk) {
		if (sk->state != BPF_TCP_LISTEN)
			goto assign;
		bpf_sk_release(sk);
	}
	tuple.ipv4.daddr = bpf_htonl(0x7f000001);
	tuple.ipv4.dport = bpf_htons(proxy_port);
	sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return DROP_PROXY_LOOKUP_FAILED;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return DROP_PROXY_LOOKUP_FAILED;
	}
assign:
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return DROP_PROXY_SET_FAILED;
	skb->mark = MARK_MAGIC_TO_PROXY;
	return 0;
}

/* Sends the packet to the proxy, or drops it when that is impossible (fail closed). A new flow
 * is reported as REDIRECTED once it reached the proxy. */
static __always_inline int redirect(struct __sk_buff *skb, const struct pkt *p, const struct event_ctx *ec,
				    __u16 proxy_port, __u8 direction, int new_flow)
{
	__u16 reason = assign_to_proxy(skb, p, proxy_port);

	if (reason)
		return drop_proxied(p, ec, reason, direction, proxy_port);
	if (new_flow)
		emit_event(p, ec, VERDICT_REDIRECTED, 0, direction, proxy_port);
	return TC_ACT_OK;
}

SEC("classifier")
int sluice_from_container(struct __sk_buff *skb)
{
	struct event_ctx ec = {.ifindex = skb->ifindex, .observation_point = OBS_FROM_ENDPOINT};
	struct endpoint_info *src_ep, *dst_ep;
	struct service_value *svc;
	struct policy_verdict verdict;
	struct ct_key ct_key;
	struct ct_value *ct;
	struct pkt p;
	__u16 proxy_port = 0;
	__u8 direction = DIR_EGRESS;
	int parsed = parse_ipv4(skb, &p);

	if (parsed == PARSE_NOT_IPV4)
		return TC_ACT_OK;
	if (parsed == PARSE_MALFORMED)
		return drop(&p, &ec, DROP_INVALID, DIR_EGRESS);

	src_ep = endpoint_lookup(p.saddr);
	if (!src_ep || src_ep->ifindex != skb->ifindex)
		return drop(&p, &ec, DROP_INVALID_SIP, DIR_EGRESS);
	ec.src_identity = src_ep->identity;
	dst_ep = endpoint_lookup(p.daddr);
	ec.dst_identity = dst_ep ? dst_ep->identity : ipcache_identity(p.daddr);

	/* Established flows keep the verdict they were admitted with: policy changes affect new
	 * flows only. */
	ct_tuple(&ct_key, &p, 0);
	ct = bpf_map_lookup_elem(&sluice_ct, &ct_key);
	if (ct) {
		if (ct->proxy_port)
			return redirect(skb, &p, &ec, ct->proxy_port, DIR_EGRESS, 0);
		if (dst_ep)
			skb->mark = MARK_MAGIC_POLICY_DONE;
		return TC_ACT_OK;
	}
	ct_tuple(&ct_key, &p, 1);
	if (bpf_map_lookup_elem(&sluice_ct, &ct_key)) {
		if (dst_ep)
			skb->mark = MARK_MAGIC_POLICY_DONE;
		return TC_ACT_OK;
	}

	/* Services in a CiliumEnvoyConfig kept their VIP at connect(): the proxy balances them. */
	svc = lb_lookup_service(p.daddr, p.dport, p.protocol);
	if (svc && (svc->flags & SVC_F_L7)) {
		proxy_port = svc->l7_proxy_port;
		goto admit;
	}

	if (src_ep->flags & EP_F_ENFORCE_EGRESS) {
		verdict = policy_decide(p.saddr, ec.dst_identity, DIR_EGRESS, p.protocol, p.dport);
		if (verdict.drop_reason)
			return drop(&p, &ec, verdict.drop_reason, DIR_EGRESS);
		proxy_port = verdict.proxy_port;
	}
	if (dst_ep && (dst_ep->flags & EP_F_ENFORCE_INGRESS)) {
		verdict = policy_decide(p.daddr, ec.src_identity, DIR_INGRESS, p.protocol, p.dport);
		if (verdict.drop_reason)
			return drop(&p, &ec, verdict.drop_reason, DIR_INGRESS);
		if (!proxy_port && verdict.proxy_port) {
			proxy_port = verdict.proxy_port;
			direction = DIR_INGRESS;
		}
	}

admit:
	if (proxy_port && p.protocol != IPPROTO_TCP)
		return drop_proxied(&p, &ec, DROP_PROXY_UNKNOWN_PROTO, direction, proxy_port);
	ct_create(&p, ec.src_identity, ec.dst_identity, proxy_port);
	if (proxy_port)
		return redirect(skb, &p, &ec, proxy_port, direction, 1);
	emit_event(&p, &ec, VERDICT_FORWARDED, 0, direction, 0);
	if (dst_ep)
		skb->mark = MARK_MAGIC_POLICY_DONE;
	return TC_ACT_OK;
}

SEC("classifier")
int sluice_to_container(struct __sk_buff *skb)
{
	struct event_ctx ec = {.ifindex = skb->ifindex, .observation_point = OBS_TO_ENDPOINT};
	struct endpoint_info *dst_ep;
	struct policy_verdict verdict;
	struct ct_key ct_key;
	struct pkt p;
	__u32 magic = skb->mark & MARK_MAGIC_MASK;
	int parsed = parse_ipv4(skb, &p);

	if (parsed == PARSE_NOT_IPV4)
		return TC_ACT_OK;
	if (parsed == PARSE_MALFORMED)
		return drop(&p, &ec, DROP_INVALID, DIR_INGRESS);
	dst_ep = endpoint_lookup(p.daddr);
	if (!dst_ep)
		return TC_ACT_OK;
	if (magic == MARK_MAGIC_POLICY_DONE) {
		skb->mark = 0;
		return TC_ACT_OK;
	}
	ct_tuple(&ct_key, &p, 0);
	if (bpf_map_lookup_elem(&sluice_ct, &ct_key))
		return TC_ACT_OK;
	ct_tuple(&ct_key, &p, 1);
	if (bpf_map_lookup_elem(&sluice_ct, &ct_key))
		return TC_ACT_OK;

	ec.src_identity = ipcache_identity(p.saddr);
	ec.dst_identity = dst_ep->identity;
	/* The proxy already applied this pod's policy (ingress) or the client's (egress); the host
	 * reaches its pods by default, as in Cilium. */
	if (magic != MARK_MAGIC_PROXY_INGRESS && magic != MARK_MAGIC_PROXY_EGRESS &&
	    ec.src_identity != IDENTITY_HOST && (dst_ep->flags & EP_F_ENFORCE_INGRESS)) {
		verdict = policy_decide(p.daddr, ec.src_identity, DIR_INGRESS, p.protocol, p.dport);
		if (verdict.drop_reason)
			return drop(&p, &ec, verdict.drop_reason, DIR_INGRESS);
		/* bpf_sk_assign works only at a TC ingress hook: an L7 flow that did not come
		 * through sluice_from_container cannot reach the proxy here, so it is refused. */
		if (verdict.proxy_port)
			return drop(&p, &ec, DROP_PROXY_SET_FAILED, DIR_INGRESS);
	}
	ct_create(&p, ec.src_identity, ec.dst_identity, 0);
	emit_event(&p, &ec, VERDICT_FORWARDED, 0, DIR_INGRESS, 0);
	return TC_ACT_OK;
}

static __always_inline void sock_refusal_event(const struct bpf_sock_addr *ctx, __u8 protocol)
{
	struct event_ctx ec = {.observation_point = OBS_SOCK};
	struct pkt p;

	__builtin_memset(&p, 0, sizeof(p));
	p.daddr = ctx->user_ip4;
	p.dport = (__u16)ctx->user_port;
	p.protocol = protocol;
	emit_event(&p, &ec, VERDICT_DROPPED, DROP_NO_SERVICE, DIR_EGRESS, 0);
}

/* VIP:port -> backend for connect() and unconnected sendmsg(); a service without backends is
 * refused with `refusal` (errno), visible to the application. */
static __always_inline int sock4_translate(struct bpf_sock_addr *ctx, int refusal)
{
	struct sock_revnat_key rkey;
	struct sock_revnat_value rval;
	struct backend_value be;
	__u8 protocol;
	__u64 cookie;

	if (ctx->user_family != AF_INET)
		return 1;
	protocol = (__u8)ctx->protocol;
	cookie = bpf_get_socket_cookie(ctx);
	switch (lb_translate(ctx->user_ip4, (__u16)ctx->user_port, protocol, lb_hash_cookie(cookie), &be)) {
	case LB_PASS:
		return 1;
	case LB_REFUSED:
		sock_refusal_event(ctx, protocol);
		bpf_set_retval(-refusal);
		return 0;
	case LB_TRANSLATED:
		break;
	}
	__builtin_memset(&rkey, 0, sizeof(rkey));
	__builtin_memset(&rval, 0, sizeof(rval));
	rkey.cookie = cookie;
	rkey.backend_addr = be.addr;
	rkey.backend_port = be.port;
	rval.vip = ctx->user_ip4;
	rval.vport = (__u16)ctx->user_port;
	bpf_map_update_elem(&sluice_sock_revnat, &rkey, &rval, BPF_ANY);
	ctx->user_ip4 = be.addr;
	ctx->user_port = be.port;
	return 1;
}

/* backend -> VIP for getpeername() and recvmsg(), so the application only ever sees the VIP. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	struct sock_revnat_key rkey;
	struct sock_revnat_value *rval;

	if (ctx->user_family != AF_INET)
		return 1;
	__builtin_memset(&rkey, 0, sizeof(rkey));
	rkey.cookie = bpf_get_socket_cookie(ctx);
	rkey.backend_addr = ctx->user_ip4;
	rkey.backend_port = (__u16)ctx->user_port;
	rval = bpf_map_lookup_elem(&sluice_sock_revnat, &rkey);
	if (rval) {
		ctx->user_ip4 = rval->vip;
		ctx->user_port = rval->vport;
	}
	return 1;
}

SEC("cgroup/connect4")
int sluice_sock_connect4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx, ECONNREFUSED);
}

SEC("cgroup/sendmsg4")
int sluice_sock_sendmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx, EHOSTUNREACH);
}

SEC("cgroup/recvmsg4")
int sluice_sock_recvmsg4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/getpeername4")
int sluice_sock_getpeername4(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}
