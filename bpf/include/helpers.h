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

/* ---- tests without jumps ------------------------------------------------- *
 *
 * Every connect runs the address tests and the scans of the pod's port and
 * CIDR lists below. BPF has no conditional move: each comparison used as a
 * value, each early return, is a jump, and the verifier walks the rest of
 * the program once for each way it could not prune, so the ways of
 * successive jumps multiply. So these helpers answer 0 or 1 with arithmetic
 * only, and the caller tests the answer once. That took the verifier's walk
 * of mb_connect6 from ~350,000 instructions (~1 s of every daemon start) to
 * ~56,000 (docs/datapath.md, "Loading and attaching";
 * scripts/verifier-stats.py measures it). */

/* Hides x's value from clang, which would otherwise turn the arithmetic
 * around it back into comparisons, and so into jumps. */
#define mb_opaque(x) asm volatile("" : "+r"(x))

/* 1 if x == 0, else 0 */
static __always_inline u32 mb_is_zero32(u32 x)
{
	u32 nz = x | -x; /* top bit set unless x == 0 */

	mb_opaque(nz);
	return (nz >> 31) ^ 1;
}

/* 1 if x < y, else 0, for x, y < 2^31 */
static __always_inline u32 mb_lt31(u32 x, u32 y)
{
	u32 d = x - y;

	mb_opaque(d);
	return d >> 31;
}

/* max(x, 0) */
static __always_inline s32 mb_pos(s32 x)
{
	s32 sign = x >> 31; /* -1 if x < 0, else 0 */

	mb_opaque(sign);
	return x & ~sign;
}

/* ---- addresses ----------------------------------------------------------- */

static __always_inline void mb_addr_from_v4(struct mb_addr *a, u32 ip4)
{
	a->ip[0] = 0;
	a->ip[1] = 0;
	a->ip[2] = bpf_htonl(0x0000ffff);
	a->ip[3] = ip4;
}

static __always_inline u32 mb_addr_is_v4(const struct mb_addr *a)
{
	return mb_is_zero32(a->ip[0] | a->ip[1] | (a->ip[2] ^ bpf_htonl(0x0000ffff)));
}

static __always_inline u32 mb_addr_eq(const struct mb_addr *a, const struct mb_addr *b)
{
	return mb_is_zero32((a->ip[0] ^ b->ip[0]) | (a->ip[1] ^ b->ip[1]) | (a->ip[2] ^ b->ip[2]) |
			    (a->ip[3] ^ b->ip[3]));
}

/* ::x, the last word (network order) given */
static __always_inline u32 mb_addr_is_v6_low(const struct mb_addr *a, u32 low)
{
	return mb_is_zero32(a->ip[0] | a->ip[1] | a->ip[2] | (a->ip[3] ^ low));
}

/* 127.0.0.0/8 (mapped) or ::1 */
static __always_inline u32 mb_addr_is_loopback(const struct mb_addr *a)
{
	u32 lo4 = mb_is_zero32((a->ip[3] & bpf_htonl(0xff000000)) ^ bpf_htonl(0x7f000000));

	return (mb_addr_is_v4(a) & lo4) | mb_addr_is_v6_low(a, bpf_htonl(1));
}

static __always_inline u32 mb_addr_is_zero(const struct mb_addr *a)
{
	return mb_is_zero32(a->ip[0] | a->ip[1] | a->ip[2] | a->ip[3]);
}

/* 127.0.0.1 (mapped) or ::1: the loopback address istio-iptables' proxy
 * rules leave alone (-o lo ! -d 127.0.0.1/32, ! -d ::1/128) */
static __always_inline u32 mb_addr_is_localhost(const struct mb_addr *a)
{
	u32 v4 = mb_addr_is_v4(a) & mb_is_zero32(a->ip[3] ^ bpf_htonl(0x7f000001));

	return v4 | mb_addr_is_v6_low(a, bpf_htonl(1));
}

/* The source the proxy binds for inbound passthrough: 127.0.0.6 or ::6.
 * Connections from it are never rewritten (Istio: -o lo -s 127.0.0.6 RETURN). */
static __always_inline u32 mb_addr_is_passthrough(const struct mb_addr *a)
{
	u32 v4 = mb_addr_is_v4(a) & mb_is_zero32(a->ip[3] ^ bpf_htonl(0x7f000006));

	return v4 | mb_addr_is_v6_low(a, bpf_htonl(6));
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

/* ---- list scans (no jumps: see above) ------------------------------------
 *
 * The scan loops stay plain loops of short bodies: clang's loop vectorizer,
 * left on, made mb_connect4 spill past the 512-byte BPF stack, and unrolled
 * each would be MB_MAX_* copies of its body. */

/* The network-order mask of the first bits of a 32-bit word, bits clamped
 * to 0..32 (a 64-bit shift: 32 gives all ones, 0 none). */
static __always_inline u32 mb_word_mask(s32 bits)
{
	s32 pos = mb_pos(bits);
	s32 k = pos - mb_pos(pos - 32); /* min(pos, 32) */

	return bpf_htonl((u32)(0xffffffff00000000ull >> k));
}

/* Is a in c? An IPv4 CIDR is stored as ::ffff:a.b.c.d/96+n; any other is an
 * IPv6 one, which never matches an IPv4 address, even ::/0: Istio keeps the
 * families apart (IPv6 ranges go to ip6tables only). An IPv6 address never
 * matches an IPv4 CIDR: its first 96 bits are not ::ffff:0:0. Only the
 * prefix's bits are compared (bpf/maps.py stores the net with its host bits
 * zero anyway). */
static __always_inline u32 mb_cidr_match(const struct mb_cidr *c, const struct mb_addr *a)
{
	s32 bits = c->prefixlen;
	u32 diff = 0;

#pragma unroll
	for (int i = 0; i < 4; i++)
		diff |= (a->ip[i] ^ c->net.ip[i]) & mb_word_mask(bits - 32 * i);
	/* an IPv4 address against a prefix shorter than /96: an IPv6 CIDR */
	return mb_is_zero32(diff) & ~(mb_addr_is_v4(a) & mb_lt31(bits, 96));
}

/* Is port among the first n entries of list (MB_MAX_PORTS long)? The trip
 * count is the constant MB_MAX_PORTS and the count is only compared, never
 * used to index: a loop to n would let clang walk a pointer bounded only by
 * the u8 count, which the verifier cannot prove stays inside the map value
 * (seen in XDP). */
static __always_inline u32 mb_port_in(const u16 *list, u8 n, u16 port)
{
	u32 found = 0;

#pragma clang loop unroll(disable) vectorize(disable) interleave(disable)
	for (u32 i = 0; i < MB_MAX_PORTS; i++)
		found |= mb_lt31(i, n) & mb_is_zero32(list[i] ^ port);
	return found;
}

/* Is a in one of the first n CIDRs of list (MB_MAX_CIDRS long)? Same loop
 * shape as mb_port_in. */
static __always_inline u32 mb_cidr_in(const struct mb_cidr *list, u8 n, const struct mb_addr *a)
{
	u32 found = 0;

#pragma clang loop unroll(disable) vectorize(disable) interleave(disable)
	for (u32 i = 0; i < MB_MAX_CIDRS; i++)
		found |= mb_lt31(i, n) & mb_cidr_match(&list[i], a);
	return found;
}

/* ---- policy (bpf/policy.py) ----------------------------------------------- */

/* The pod's policy if it has an outbound port or CIDR list, else 0. Istio's
 * default (includeOutboundIPRanges "*", nothing excluded) has none: its
 * decisions skip every scan below, which always walk all MB_MAX_* slots. */
static __always_inline const struct mb_pod_config *mb_out_lists(const struct mb_pod_config *pc)
{
	if (!pc)
		return 0;
	u32 n = (u32)pc->n_exclude_out_ports | pc->n_exclude_out_cidrs | pc->n_include_out_ports |
		pc->n_include_out_cidrs;

	return n ? pc : 0;
}

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
 * "-o lo -m owner ! --uid-owner|--gid-owner P -j RETURN" rules. A scan of
 * mb_cidr_in's shape: mb_addr_is_loopback has no jumps. */
static __always_inline u32 mb_policy_includes_loopback(const struct mb_pod_config *pc)
{
	u32 found = 0;

#pragma clang loop unroll(disable) vectorize(disable) interleave(disable)
	for (u32 i = 0; i < MB_MAX_CIDRS; i++)
		found |= mb_lt31(i, pc->n_include_out_cidrs) &
			 mb_addr_is_loopback(&pc->include_out_cidrs[i].net);
	return found;
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
