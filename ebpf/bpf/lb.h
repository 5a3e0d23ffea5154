/* SPDX-License-Identifier: Apache-2.0 */
/* Service -> backend selection through the service's Maglev table (shared by the socket hooks and
 * the LB test probe, so the probe exercises exactly the production code). */
#ifndef SLUICE_LB_H
#define SLUICE_LB_H

#include "maps.h"

/* Mixes a socket cookie into a well-spread 32-bit hash (the murmur3 64-bit finalizer): cookies are
 * sequential, a plain modulo would walk the table in order. */
static __always_inline __u32 lb_hash_cookie(__u64 cookie)
{
	cookie ^= cookie >> 33;
	cookie *= 0xff51afd7ed558ccdULL;
	cookie ^= cookie >> 33;
	cookie *= 0xc4ceb9fe1a85ec53ULL;
	cookie ^= cookie >> 33;
	return (__u32)cookie;
}

static __always_inline struct service_value *lb_lookup_service(__u32 vip, __u16 dport, __u8 protocol)
{
	struct service_key key = {.vip = vip, .dport = dport, .protocol = protocol};

	return bpf_map_lookup_elem(&sluice_services, &key);
}

/* The backend for `hash`, or NULL when the service has no (consistent) backend. */
static __always_inline struct backend_value *lb_pick(const struct service_value *svc, __u32 hash)
{
	struct maglev_key mkey;
	struct maglev_value *slot;
	struct backend_key bkey;

	if (svc->backend_count == 0 || svc->maglev_size == 0)
		return NULL;
	mkey.service_id = svc->service_id;
	mkey.slot = hash % svc->maglev_size;
	slot = bpf_map_lookup_elem(&sluice_maglev, &mkey);
	if (!slot)
		return NULL;
	bkey.backend_id = slot->backend_id;
	return bpf_map_lookup_elem(&sluice_backends, &bkey);
}

enum lb_result {
	LB_PASS = 0,       /* not a service, or an L7 service that keeps its VIP */
	LB_TRANSLATED = 1, /* *out holds the backend */
	LB_REFUSED = 2,    /* a service without backends */
};

/* The socket-LB decision for VIP:dport/protocol, `hash` choosing the Maglev slot. */
static __always_inline enum lb_result lb_translate(__u32 vip, __u16 dport, __u8 protocol, __u32 hash,
						   struct backend_value *out)
{
	struct service_value *svc = lb_lookup_service(vip, dport, protocol);
	struct backend_value *be;

	if (!svc || (svc->flags & SVC_F_L7))
		return LB_PASS;
	be = lb_pick(svc, hash);
	if (!be)
		return LB_REFUSED;
	*out = *be;
	return LB_TRANSLATED;
}

#endif /* SLUICE_LB_H */
