/* SPDX-License-Identifier: Apache-2.0 */
/*
 * Policy lookup with Cilium's precedence: the most specific L4 match wins (proto+port, then
 * proto only, then any), and on equal L4 specificity the entry for the remote identity beats the
 * entry for any identity. Deny-over-allow is settled by the loader, which writes a deny entry at
 * the intersection of every deny with every allow it overlaps, so the winner here is always right.
 */
#ifndef SLUICE_POLICY_H
#define SLUICE_POLICY_H

#include "maps.h"

#define POLICY_ALLOW 0

struct policy_verdict {
	__u32 drop_reason; /* 0: allowed */
	__u16 proxy_port;  /* with drop_reason 0: redirect to this listener */
};

static __always_inline struct policy_value *policy_lookup_one(__u32 endpoint_addr, __u32 identity,
							       __u8 egress, __u8 protocol, __u16 dport)
{
	struct policy_key key = {
		.prefixlen = POLICY_PREFIX_BASE + POLICY_PREFIX_L4_MAX,
		.endpoint_addr = endpoint_addr,
		.remote_identity = identity,
		.egress = egress,
		.protocol = protocol,
		.dport = dport,
	};

	return bpf_map_lookup_elem(&sluice_policy, &key);
}

static __always_inline struct policy_verdict policy_decide(__u32 endpoint_addr, __u32 remote_identity,
							    __u8 egress, __u8 protocol, __u16 dport)
{
	struct policy_verdict verdict = {.drop_reason = DROP_POLICY, .proxy_port = 0};
	struct policy_value *by_id = policy_lookup_one(endpoint_addr, remote_identity, egress, protocol, dport);
	struct policy_value *by_any = policy_lookup_one(endpoint_addr, 0, egress, protocol, dport);
	struct policy_value *winner;

	if (by_id && by_any)
		winner = by_any->l4_prefixlen > by_id->l4_prefixlen ? by_any : by_id;
	else
		winner = by_id ? by_id : by_any;
	if (!winner)
		return verdict;
	if (winner->deny) {
		verdict.drop_reason = DROP_POLICY_DENY;
		return verdict;
	}
	if (winner->auth_required && winner->proxy_port == 0) {
		verdict.drop_reason = DROP_POLICY_AUTH_REQUIRED;
		return verdict;
	}
	verdict.drop_reason = POLICY_ALLOW;
	verdict.proxy_port = winner->proxy_port;
	return verdict;
}

#endif /* SLUICE_POLICY_H */
