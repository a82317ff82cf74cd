/* ambient_connect.h: the connect hook of Istio ambient mode, shared by
 * bpf/progs/ambient4.c and ambient6.c (docs/ambient.md).
 *
 * mb_ambient_connect() is the whole program but the choice of family: it
 * looks up the caller's cgroup entry (mb_cgroup_info), the ztunnel address
 * (mb_settings) and whether the destination is an ambient pod
 * (mb_ambient_ips), asks mb_ambient_decide() (pure) and applies the verdict.
 *
 * The ambient programs are separate cgroup/connect programs attached next to
 * connect4/connect6 (BPF_F_ALLOW_MULTI). They never act on a sidecar pod and
 * connect4/6 never act on an ambient pod or ztunnel (neither is a recorded
 * sidecar pod nor has the proxy's listener), so the order in which the
 * kernel runs them does not matter.
 */
#ifndef MERBRIDGE_AMBIENT_CONNECT_H
#define MERBRIDGE_AMBIENT_CONNECT_H

#include "helpers.h"
#include "maps.h"
#include "pod.h"
#include "sockaddr.h"

#define MB_AMB_PASS 0 /* leave the connect alone */
#define MB_AMB_OUT  1 /* ambient pod's app -> ztunnel:MB_AMBIENT_OUT_PORT */
#define MB_AMB_IN   2 /* host process -> ambient pod: ztunnel:MB_AMBIENT_IN_PORT */

/* The decision.
 *  self:        the caller's cgroup entry (0: not a known pod, i.e. a host
 *               process, or a pod whose cgroup the daemon has not seen yet)
 *  zt:          ztunnel's address in dst's family (valid when have_zt)
 *  dst_ambient: dst is an ambient pod on this node
 *  sidecar:     a caller without entry is in a sidecar pod (the caller's
 *               mb_sidecar_netns(), asked only then): it keeps its sidecar path
 * On MB_AMB_OUT, *bind is the pod IP of dst's family to bind (0s: none). */
static __always_inline int mb_ambient_decide(int sidecar, const struct mb_cgroup_info *self,
					     const struct mb_addr *dst, int have_zt,
					     const struct mb_addr *zt, int dst_ambient,
					     struct mb_addr *bind)
{
	if (!have_zt)
		return MB_AMB_PASS; /* no ztunnel on this node (yet) */
	if (self) {
		const struct mb_addr *own;

		if (self->flags & MB_CG_F_ZTUNNEL)
			return MB_AMB_PASS; /* ztunnel itself: never intercepted */
		if (!self->in_mesh)
			return MB_AMB_PASS; /* a pod outside ambient (sidecar or none) */
		own = mb_addr_is_v4(dst) ? &self->ip4 : &self->ip6;
		/* loopback, the pod's own IP (both stay in the pod) and ztunnel
		 * itself are not captured (Istio's in-pod rules do the same) */
		if (mb_addr_is_loopback(dst) || mb_addr_eq(dst, own) || mb_addr_eq(dst, zt))
			return MB_AMB_PASS;
		*bind = *own;
		return MB_AMB_OUT;
	}
	if (!dst_ambient)
		return MB_AMB_PASS;
	if (sidecar)
		return MB_AMB_PASS; /* a sidecar pod: connect4/6 handle it */
	return MB_AMB_IN;
}

/* Is the caller's netns a sidecar pod's, which connect4/6 handle? As they
 * decide it: never the node's netns; CNI mode: the daemon's mb_netns_pod
 * record (no listener is trusted); legacy: the proxy's listener. So nobody
 * on the node turns ztunnel's capture of node processes off by listening
 * on 39807 or 15001 (docs/security.md). */
static __always_inline int mb_sidecar_netns(struct bpf_sock_addr *ctx)
{
	u64 netns = bpf_get_netns_cookie(ctx);

	if (mb_node_netns(netns))
		return 0;
#if MB_CNI_MODE
	return mb_netns_pod.lookup(&netns) != 0;
#else
	return mb_mesh_probe(ctx) != 0;
#endif
}

/* The connect hook of a cgroup/connect4 (v4) or connect6 program: an
 * ambient pod's app goes to ztunnel's outbound port (bound to the pod IP of
 * the connection's family, so ztunnel knows who is calling), a host
 * process's connect to an ambient pod to ztunnel's inbound port. An IPv6
 * connect goes to ztunnel's IPv6 address, an IPv4-mapped one (the
 * connection will really be IPv4) to its IPv4 in mapped form; without a
 * ztunnel address of that family nothing is changed. */
static __always_inline int mb_ambient_connect(struct bpf_sock_addr *ctx, const int v4)
{
	struct mb_addr dst, zt = {}, bind = {};
	struct mb_cgroup_info *self;
	int have_zt, act, dst_ambient = 0;
	u64 cg;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	mb_sa_dst(ctx, v4, &dst);
	have_zt = mb_ztunnel_addr(&dst, &zt);
	if (!have_zt)
		return 1;
	cg = bpf_get_current_cgroup_id();
	self = mb_cgroup_info.lookup(&cg);
	if (!self)
		dst_ambient = mb_ambient_ips.lookup(&dst) != 0;
	act = mb_ambient_decide(!self && dst_ambient && mb_sidecar_netns(ctx), self, &dst, have_zt,
				&zt, dst_ambient, &bind);
	if (act == MB_AMB_PASS)
		return 1;

	mb_origin_record(ctx->sk, &dst, (u16)ctx->user_port, MB_ORIGIN_F_REDIRECT);
	if (act == MB_AMB_OUT && !mb_addr_is_zero(&bind))
		mb_sa_bind(ctx, v4, &bind);
	mb_sa_set_dst(ctx, v4, &zt);
	ctx->user_port = bpf_htons(act == MB_AMB_OUT ? MB_AMBIENT_OUT_PORT : MB_AMBIENT_IN_PORT);
	return 1;
}

#endif /* MERBRIDGE_AMBIENT_CONNECT_H */
