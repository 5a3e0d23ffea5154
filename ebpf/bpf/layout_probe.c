/* SPDX-License-Identifier: Apache-2.0 */
/* Host program run by build.rs: prints the layout and constants of abi.h as the C compiler sees
 * them, so src/abi.rs is checked against the compiler rather than against a restatement. */
#include <stddef.h>
#include <stdio.h>
#include "abi.h"

#define STRUCT(s) printf("S %s %zu %zu\n", #s, sizeof(struct s), _Alignof(struct s));
#define FIELD(s, f) printf("F %s %s %zu %zu\n", #s, #f, offsetof(struct s, f), sizeof(((struct s *)0)->f));
#define CONST(c) printf("C %s %lld\n", #c, (long long)(c));

int main(void)
{
	STRUCT(ipcache_key) FIELD(ipcache_key, prefixlen) FIELD(ipcache_key, addr)
	STRUCT(ipcache_value) FIELD(ipcache_value, identity) FIELD(ipcache_value, _pad)
	STRUCT(endpoint_key) FIELD(endpoint_key, addr)
	STRUCT(endpoint_info) FIELD(endpoint_info, identity) FIELD(endpoint_info, ifindex)
		FIELD(endpoint_info, flags) FIELD(endpoint_info, _pad)
	STRUCT(policy_key) FIELD(policy_key, prefixlen) FIELD(policy_key, endpoint_addr)
		FIELD(policy_key, remote_identity) FIELD(policy_key, egress) FIELD(policy_key, protocol)
		FIELD(policy_key, dport)
	STRUCT(policy_value) FIELD(policy_value, proxy_port) FIELD(policy_value, deny)
		FIELD(policy_value, auth_required) FIELD(policy_value, l4_prefixlen) FIELD(policy_value, _pad)
	STRUCT(service_key) FIELD(service_key, vip) FIELD(service_key, dport) FIELD(service_key, protocol)
		FIELD(service_key, _pad)
	STRUCT(service_value) FIELD(service_value, service_id) FIELD(service_value, maglev_size)
		FIELD(service_value, backend_count) FIELD(service_value, l7_proxy_port) FIELD(service_value, flags)
	STRUCT(backend_key) FIELD(backend_key, backend_id)
	STRUCT(backend_value) FIELD(backend_value, addr) FIELD(backend_value, port)
		FIELD(backend_value, protocol) FIELD(backend_value, _pad)
	STRUCT(maglev_key) FIELD(maglev_key, service_id) FIELD(maglev_key, slot)
	STRUCT(maglev_value) FIELD(maglev_value, backend_id)
	STRUCT(sock_revnat_key) FIELD(sock_revnat_key, cookie) FIELD(sock_revnat_key, backend_addr)
		FIELD(sock_revnat_key, backend_port) FIELD(sock_revnat_key, _pad)
	STRUCT(sock_revnat_value) FIELD(sock_revnat_value, vip) FIELD(sock_revnat_value, vport)
		FIELD(sock_revnat_value, _pad)
	STRUCT(ct_key) FIELD(ct_key, saddr) FIELD(ct_key, daddr) FIELD(ct_key, sport) FIELD(ct_key, dport)
		FIELD(ct_key, protocol) FIELD(ct_key, _pad)
	STRUCT(ct_value) FIELD(ct_value, src_identity) FIELD(ct_value, dst_identity)
		FIELD(ct_value, proxy_port) FIELD(ct_value, _pad) FIELD(ct_value, _pad2)
	STRUCT(flow_event) FIELD(flow_event, ktime_ns) FIELD(flow_event, saddr) FIELD(flow_event, daddr)
		FIELD(flow_event, src_identity) FIELD(flow_event, dst_identity) FIELD(flow_event, ifindex)
		FIELD(flow_event, sport) FIELD(flow_event, dport) FIELD(flow_event, drop_reason)
		FIELD(flow_event, proxy_port) FIELD(flow_event, verdict) FIELD(flow_event, direction)
		FIELD(flow_event, protocol) FIELD(flow_event, tcp_flags) FIELD(flow_event, observation_point)
		FIELD(flow_event, _pad)

	CONST(IDENTITY_UNKNOWN) CONST(IDENTITY_HOST) CONST(IDENTITY_WORLD)
	CONST(VERDICT_FORWARDED) CONST(VERDICT_DROPPED) CONST(VERDICT_REDIRECTED)
	CONST(DROP_INVALID_SIP) CONST(DROP_POLICY) CONST(DROP_INVALID) CONST(DROP_NO_SERVICE)
	CONST(DROP_PROXY_LOOKUP_FAILED) CONST(DROP_PROXY_SET_FAILED) CONST(DROP_PROXY_UNKNOWN_PROTO)
	CONST(DROP_POLICY_DENY) CONST(DROP_POLICY_AUTH_REQUIRED)
	CONST(DIR_INGRESS) CONST(DIR_EGRESS)
	CONST(OBS_FROM_ENDPOINT) CONST(OBS_TO_ENDPOINT) CONST(OBS_SOCK)
	CONST(MARK_MAGIC_MASK) CONST(MARK_MAGIC_TO_PROXY) CONST(MARK_MAGIC_PROXY_INGRESS)
	CONST(MARK_MAGIC_PROXY_EGRESS) CONST(MARK_MAGIC_POLICY_DONE) CONST(PROXY_ROUTE_TABLE)
	CONST(EP_F_ENFORCE_INGRESS) CONST(EP_F_ENFORCE_EGRESS) CONST(SVC_F_L7)
	CONST(POLICY_PREFIX_BASE) CONST(POLICY_PREFIX_L4_MAX)
	return 0;
}
