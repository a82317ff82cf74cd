/* helpers.h: small inline pieces shared by the programs in bpf/progs/.
 *
 * Address handling over the 16-byte form, the per-pod policy decisions (the
 * order is istio-iptables' ISTIO_OUTPUT / ISTIO_INBOUND order, documented in
 * bpf/policy.py) and socket 4-tuples. Pure logic over values and pointers: no
 * map, no helper call but byte-order ones; who is calling (maps, listeners) is
 * pod.h's.
 */
#ifndef MERBRIDGE_HELPERS_H
#define MERBRIDGE_HELPERS_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include "merbridge.h"

#if MB_DEBUG
#define mb_dbg(fmt, ...) bpf_trace_printk(fmt, ##__VA_ARGS__)
#else
#define mb_dbg(fmt, ...) ((void)0)
#endif

/* ---- addresses ----------------------------------------------------------- */

static __always_inline void mb_addr_from_v4(struct mb_addr *a, u32 ip4)
{
	a->ip[0] = 0;
	a->ip[1] = 0;
	a->ip[2] = bpf_htonl(0x0000ffff);
	a->ip[3] = ip4;
}

static __always_inline int mb_addr_is_v4(const struct mb_addr *a)
{
	return a->ip[0] == 0 && a->ip[1] == 0 && a->ip[2] == bpf_htonl(0x0000ffff);
}

static __always_inline int mb_addr_eq(const struct mb_addr *a, const struct mb_addr *b)
{
	return a->ip[0] == b->ip[0] && a->ip[1] == b->ip[1] && a->ip[2] == b->ip[2] &&
	       a->ip[3] == b->ip[3];
}

/* 127.0.0.0/8 (mapped) or ::1 */
static __always_inline int mb_addr_is_loopback(const struct mb_addr *a)
{
	if (mb_addr_is_v4(a))
		return (bpf_ntohl(a->ip[3]) >> 24) == 127;
	return a->ip[0] == 0 && a->ip[1] == 0 && a->ip[2] == 0 && a->ip[3] == bpf_htonl(1);
}

static __always_inline int mb_addr_is_zero(const struct mb_addr *a)
{
	return (a->ip[0] | a->ip[1] | a->ip[2] | a->ip[3]) == 0;
}

/* 127.0.0.1 (mapped) or ::1: the loopback address istio-iptables' proxy
 * rules leave alone (-o lo ! -d 127.0.0.1/32, ! -d ::1/128) */
static __always_inline int mb_addr_is_localhost(const struct mb_addr *a)
{
	if (mb_addr_is_v4(a))
		return a->ip[3] == bpf_htonl(0x7f000001);
	return mb_addr_is_loopback(a);
}

/* The source the proxy binds for inbound passthrough: 127.0.0.6 or ::6.
 * Connections from it are never rewritten (Istio: -o lo -s 127.0.0.6 RETURN). */
static __always_inline int mb_addr_is_passthrough(const struct mb_addr *a)
{
	if (mb_addr_is_v4(a))
		return a->ip[3] == bpf_htonl(0x7f000006);
	return a->ip[0] == 0 && a->ip[1] == 0 && a->ip[2] == 0 && a->ip[3] == bpf_htonl(6);
}

/* fe80::/10: an interface's own link-local address, never a pod IP */
static __always_inline int mb_addr_is_link_local(const struct mb_addr *a)
{
	return (a->ip[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000);
}

/* File a pod address under its family in ips, keeping the other family's
 * slot: legacy mode learns a dual-stack pod's two addresses one at a time
 * (mb_netns_ip). */
static __always_inline void mb_pod_ips_set(struct mb_pod_ips *ips, const struct mb_addr *a)
{
	if (mb_addr_is_v4(a))
		ips->ip4 = *a;
	else
		ips->ip6 = *a;
}

/* Is a (not all zero) one of the pod's addresses? */
static __always_inline int mb_pod_ips_has(const struct mb_pod_ips *ips, const struct mb_addr *a)
{
	return !mb_addr_is_zero(a) && (mb_addr_eq(a, &ips->ip4) || mb_addr_eq(a, &ips->ip6));
}

/* Does the pod know its address of a's family? (legacy mode learns them) */
static __always_inline int mb_pod_ips_family_known(const struct mb_pod_ips *ips,
						   const struct mb_addr *a)
{
	return ips && !mb_addr_is_zero(mb_addr_is_v4(a) ? &ips->ip4 : &ips->ip6);
}

/* Is the connecting side's 4-tuple k one of the calling pod's (ips: its
 * IPs, 0: none known)? The pod's end is the accepting one (dip: the proxy's
 * call to this pod, an XDP flow) unless that is loopback (a redirect inside
 * the pod: then the source, bound to the pod IP, or loopback when unbound).
 * strict (CNI mode, where the pod IPs are always known): the address must
 * be the pod's; legacy mode also accepts an address of a family the pod has
 * not learned yet. So no netns claims another pod's pair entry by
 * rebuilding its tuple (docs/security.md). */
static __always_inline int mb_pair_owned(const struct mb_pod_ips *ips, const struct mb_pair *k,
					 int strict)
{
	const struct mb_addr *a = mb_addr_is_loopback(&k->dip) ? &k->sip : &k->dip;

	if (mb_addr_is_loopback(a) || (ips && mb_pod_ips_has(ips, a)))
		return 1;
	return !strict && !mb_pod_ips_family_known(ips, a);
}

/* An IPv4 CIDR is stored as ::ffff:a.b.c.d/96+n; any other is an IPv6 one,
 * which never matches an IPv4 address, even ::/0: Istio keeps the families
 * apart (IPv6 ranges go to ip6tables only). */
static __always_inline int mb_cidr_match(const struct mb_cidr *c, const struct mb_addr *a)
{
	int bits = c->prefixlen;

	if (mb_addr_is_v4(a) && !(bits >= 96 && mb_addr_is_v4(&c->net)))
		return 0;

#pragma unroll
	for (int i = 0; i < 4; i++) {
		u32 mask;

		if (bits <= 0)
			break;
		mask = bits >= 32 ? 0xffffffffu : bpf_htonl(~0u << (32 - bits));
		if ((a->ip[i] & mask) != c->net.ip[i])
			return 0;
		bits -= 32;
	}
	return 1;
}

/* Is port among the first n entries of list (MB_MAX_PORTS long)?
 * Written for the verifier of every program type (connect, XDP): the trip
 * count is the constant MB_MAX_PORTS and the loop never exits at n. If it
 * did (for (i = 0; i < n; i++)), clang would turn the index into a pointer
 * walk bounded only by the u8 count, which the verifier cannot prove stays
 * inside the map value (seen in XDP, where the old asm barrier did not
 * help). The count is only compared, never used to index. */
static __always_inline int mb_port_in(const u16 *list, u8 n, u16 port)
{
	for (u32 i = 0; i < MB_MAX_PORTS; i++) {
		if (list[i] == port && i < n)
			return 1;
	}
	return 0;
}

/* Is a in one of the first n CIDRs of list (MB_MAX_CIDRS long)? Same loop
 * shape as mb_port_in; the count is checked before the (costlier) match. */
static __always_inline int mb_cidr_in(const struct mb_cidr *list, u8 n, const struct mb_addr *a)
{
	for (u32 i = 0; i < MB_MAX_CIDRS; i++) {
		if (i < n && mb_cidr_match(&list[i], a))
			return 1;
	}
	return 0;
}

/* ---- policy (bpf/policy.py) ----------------------------------------------- */

/* Outbound steps 2-5 (step 1, excluded ports, is checked before the proxy
 * rules by the caller, as ISTIO_OUTPUT does). 1: redirect. */
static __always_inline int mb_policy_out(const struct mb_pod_config *pc, const struct mb_addr *dst,
					 u16 port)
{
	if (mb_cidr_in(pc->exclude_out_cidrs, pc->n_exclude_out_cidrs, dst))
		return 0;
	if (mb_port_in(pc->include_out_ports, pc->n_include_out_ports, port))
		return 1;
	if (pc->flags & MB_POD_F_INCLUDE_OUT_ALL)
		return 1;
	return mb_cidr_in(pc->include_out_cidrs, pc->n_include_out_cidrs, dst);
}

/* Does includeOutboundIPRanges name a loopback address (istio-iptables'
 * HasLoopBackIP, either family)? Then istio-iptables leaves out its
 * "-o lo -m owner ! --uid-owner|--gid-owner P -j RETURN" rules. */
static __always_inline int mb_policy_includes_loopback(const struct mb_pod_config *pc)
{
	for (u32 i = 0; i < MB_MAX_CIDRS; i++) {
		if (i < pc->n_include_out_cidrs &&
		    mb_addr_is_loopback(&pc->include_out_cidrs[i].net))
			return 1;
	}
	return 0;
}

/* Inbound: would a connection to this pod's port be captured? 1: redirect. */
static __always_inline int mb_policy_in(const struct mb_pod_config *pc, u16 port)
{
	if (port == MB_HBONE_PORT)
		return 0;
	if (pc->status_port && port == pc->status_port)
		return 0;
	if (pc->flags & MB_POD_F_INCLUDE_IN_ALL)
		return !mb_port_in(pc->exclude_in_ports, pc->n_exclude_in_ports, port);
	return mb_port_in(pc->include_in_ports, pc->n_include_in_ports, port);
}

/* Is the caller (bpf_get_current_uid_gid()) the pod's proxy? Its UID and
 * GID come from the pod's policy (istio-cni: the istio-proxy container's
 * runAsUser / runAsGroup), the mesh default where the policy has none or the
 * pod is not known (yet). *uid_match: the UID matched (istio-iptables' UID
 * rules come before its GID rules). */
static __always_inline int mb_is_proxy(const struct mb_pod_config *pc, u64 ugid, int *uid_match)
{
	u32 uid = pc && pc->proxy_uid ? pc->proxy_uid : MB_PROXY_UID;
	u32 gid = pc && pc->proxy_gid ? pc->proxy_gid : MB_PROXY_GID;

	*uid_match = (u32)ugid == uid;
	return *uid_match || (u32)(ugid >> 32) == gid;
}

/* DNS capture (bpf/progs/dns.c, istio-iptables' ISTIO_OUTPUT_DNS as istio-cni
 * configures it: every destination, not only resolv.conf's): is a query of
 * this pod's to port 53 sent to the DNS proxy? Not the proxy's own (UID or
 * GID), not when excludeOutboundPorts names 53 (that RETURN comes first),
 * not from the inbound-passthrough source. */
static __always_inline int mb_dns_captured(const struct mb_pod_config *pc, u64 ugid,
					   const struct mb_addr *src)
{
	int uid_match;

	if (!MB_DNS_PORT || !pc || !(pc->flags & MB_POD_F_DNS_CAPTURE))
		return 0;
	if (mb_is_proxy(pc, ugid, &uid_match))
		return 0;
	if (mb_port_in(pc->exclude_out_ports, pc->n_exclude_out_ports, MB_DNS_SERVER_PORT))
		return 0;
	return !mb_addr_is_passthrough(src);
}

/* ---- socket 4-tuples ----------------------------------------------------- */

/* A 4-byte context load clang may not merge with its neighbour (the verifier
 * rejects 8-byte loads of the ip6 fields). */
#define mb_ctx_u32(ptr) (*(volatile u32 *)(ptr))

/* Fill a pair from a context's own view (sock_ops, sk_msg): local -> remote.
 * remote_port is the network-order port in the upper half of the u32 (the
 * kernel shifts it there), local_port is in host order. */
#define mb_pair_from_ctx(p, c)                                            \
	do {                                                              \
		if ((c)->family == AF_INET) {                             \
			mb_addr_from_v4(&(p)->sip, (c)->local_ip4);       \
			mb_addr_from_v4(&(p)->dip, (c)->remote_ip4);      \
		} else {                                                  \
			(p)->sip.ip[0] = mb_ctx_u32(&(c)->local_ip6[0]);  \
			(p)->sip.ip[1] = mb_ctx_u32(&(c)->local_ip6[1]);  \
			(p)->sip.ip[2] = mb_ctx_u32(&(c)->local_ip6[2]);  \
			(p)->sip.ip[3] = mb_ctx_u32(&(c)->local_ip6[3]);  \
			(p)->dip.ip[0] = mb_ctx_u32(&(c)->remote_ip6[0]); \
			(p)->dip.ip[1] = mb_ctx_u32(&(c)->remote_ip6[1]); \
			(p)->dip.ip[2] = mb_ctx_u32(&(c)->remote_ip6[2]); \
			(p)->dip.ip[3] = mb_ctx_u32(&(c)->remote_ip6[3]); \
		}                                                         \
		(p)->sport = bpf_htons((u16)(c)->local_port);             \
		(p)->dport = bpf_htons((u16)bpf_ntohl((c)->remote_port)); \
	} while (0)

static __always_inline void mb_pair_reverse(const struct mb_pair *p, struct mb_pair *r)
{
	r->sip = p->dip;
	r->dip = p->sip;
	r->sport = p->dport;
	r->dport = p->sport;
}

#endif /* MERBRIDGE_HELPERS_H */
