/* pod.h: who is calling? The node, a sidecar pod (and its IPs), or a
 * socket that may read a pair entry. Shared by connect4/6, dns.c, getsockopt.c
 * and sockops.c, which all decide it the same way (docs/security.md): never in
 * the node's netns; in CNI mode only a netns the daemon recorded at CNI ADD,
 * while its mark is enrolled (no listener, no SO_MARK is trusted); in legacy
 * mode the proxy's listener and the pod IPs sockops learned.
 */
#ifndef MERBRIDGE_POD_H
#define MERBRIDGE_POD_H

#include "helpers.h"
#include "maps.h"

/* Is a TCP listener on (v4 addr4 | v6 ::addr6_last):port in the caller's
 * netns? Returns its SO_MARK + 1 (0: none). A v4 lookup also finds
 * dual-stack [::] listeners; the v6 lookup catches v6-only ones. */
static __always_inline u64 mb_listener_mark(void *ctx, u32 addr4, u32 addr6_last, u16 port)
{
	struct bpf_sock_tuple t = {};
	struct bpf_sock *sk;
	u64 mark;

	t.ipv4.daddr = addr4;
	t.ipv4.dport = bpf_htons(port);
	sk = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk) {
		__builtin_memset(&t, 0, sizeof(t));
		t.ipv6.daddr[3] = addr6_last;
		t.ipv6.dport = bpf_htons(port);
		sk = bpf_sk_lookup_tcp(ctx, &t, sizeof(t.ipv6), BPF_F_CURRENT_NETNS, 0);
	}
	if (!sk)
		return 0;
	mark = (u64)sk->mark + 1;
	bpf_sk_release(sk);
	return mark;
}

/* Mesh membership probe: CNI mode looks for the daemon's marker listener on
 * MB_MARK_PORT (its SO_MARK keys mb_mark_pod_ips), legacy mode for the
 * proxy's outbound listener on 127.0.0.1 / ::1. Returns mark + 1, 0: not in
 * a mesh pod. Nothing is cached: a pod whose listener appears later is seen
 * at its next connect (upstream cached a negative answer per cgroup).
 * connect4/6 ask it only in legacy mode and never in the node's netns; in
 * CNI mode they trust no listener, only the daemon's record (mb_netns_pod,
 * docs/security.md). */
static __always_inline u64 mb_mesh_probe(void *ctx)
{
#if MB_CNI_MODE
	return mb_listener_mark(ctx, 0, 0, MB_MARK_PORT);
#else
	return mb_listener_mark(ctx, bpf_htonl(0x7f000001), bpf_htonl(1), MB_OUT_PORT);
#endif
}

/* The node's own netns (the initial one, or the one the daemon runs in):
 * never a pod, whatever listens there (docs/security.md). */
static __always_inline int mb_node_netns(u64 netns)
{
	u64 node = mb_setting(MB_SET_NODE_NETNS);

	return netns == bpf_get_netns_cookie(0) || (node && netns == node);
}

/* The pod IPs of netns as the datapath knows them (0: not a pod). CNI mode:
 * a netns the daemon recorded (mb_netns_pod: the SO_NETNS_COOKIE of the
 * marker socket it opened there at CNI ADD), while the pod's mark is still
 * enrolled in mb_mark_pod_ips. Legacy mode: what sockops learned so far (one
 * address per family, zeros until then). */
static __always_inline struct mb_pod_ips *mb_known_ips(u64 netns)
{
#if MB_CNI_MODE
	struct mb_netns_pod *np = mb_netns_pod.lookup(&netns);

	if (!np)
		return 0;
	u32 mark = np->mark;

	return mb_mark_pod_ips.lookup(&mark);
#else
	return mb_netns_ip.lookup(&netns);
#endif
}

/* Is the caller (in netns) in a sidecar pod? 1: yes, and *ips holds its
 * IPs: CNI mode, always; legacy mode, what sockops learned so far (0 until
 * then, one address per family). */
static __always_inline int mb_sidecar_pod(void *ctx, u64 netns, struct mb_pod_ips **ips)
{
	if (mb_node_netns(netns))
		return 0;
#if !MB_CNI_MODE
	if (!mb_mesh_probe(ctx))
		return 0;
#endif
	*ips = mb_known_ips(netns);
	return !MB_CNI_MODE || *ips != 0;
}

/* May a socket of this netns read (or, closing, delete) the pair entry of
 * the connecting side's tuple k? Never in the node's netns (the initial
 * one, or the one the daemon runs in). The node's ztunnel (ambient mode)
 * receives the connections redirected to its address. Otherwise only a pod
 * -- in CNI mode a netns the daemon recorded, with its mark still enrolled
 * -- and only for a tuple that is the pod's (helpers.h:mb_pair_owned):
 * no netns claims another pod's entry by rebuilding its tuple. */
static __always_inline int mb_pair_mine(u64 netns, const struct mb_pair *k)
{
	struct mb_pod_ips *ips;
	struct mb_addr zt = {};

	if (mb_node_netns(netns))
		return 0;
	if (mb_ztunnel_addr(&k->dip, &zt) && mb_addr_eq(&zt, &k->dip))
		return 1;
	ips = mb_known_ips(netns);
	if (MB_CNI_MODE && !ips)
		return 0;
	return mb_pair_owned(ips, k, MB_CNI_MODE);
}

#endif /* MERBRIDGE_POD_H */
