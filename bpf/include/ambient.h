/* ambient.h: the connect-time decision of Istio ambient mode, shared by
 * bpf/progs/ambient4.c and ambient6.c (docs/ambient.md).
 *
 * Pure, like connect.h: no map access here (bcc rewrites map calls only in
 * the main source file). The programs look up the caller's cgroup entry
 * (mb_cgroup_info), the ztunnel address (mb_settings) and whether the
 * destination is an ambient pod (mb_ambient_ips), and apply the verdict.
 *
 * The ambient programs are separate cgroup/connect programs attached next to
 * connect4/connect6 (BPF_F_ALLOW_MULTI). They never act on a sidecar pod and
 * connect4/6 never act on an ambient pod or ztunnel (neither is a recorded
 * sidecar pod nor has the proxy's listener), so the order in which the kernel runs them does not
 * matter.
 */
#ifndef MERBRIDGE_AMBIENT_H
#define MERBRIDGE_AMBIENT_H

#include "helpers.h"

#define MB_AMB_PASS 0   /* leave the connect alone */
#define MB_AMB_OUT  1   /* ambient pod's app -> ztunnel:MB_AMBIENT_OUT_PORT */
#define MB_AMB_IN   2   /* host process -> ambient pod: ztunnel:MB_AMBIENT_IN_PORT */

/* The ztunnel address of dst's family from the three mb_settings values;
 * 0 when the daemon has none for that family. */
static __always_inline int mb_ztunnel_addr(const struct mb_addr *dst, u64 v4, u64 v6hi,
					   u64 v6lo, struct mb_addr *zt)
{
	if (mb_addr_is_v4(dst)) {
		if (!(u32)v4)
			return 0;
		mb_addr_from_v4(zt, (u32)v4);
		return 1;
	}
	if (!v6hi && !v6lo)
		return 0;
	/* the daemon stored the 16 bytes as two u64 in memory order */
	zt->ip[0] = (u32)v6hi;
	zt->ip[1] = (u32)(v6hi >> 32);
	zt->ip[2] = (u32)v6lo;
	zt->ip[3] = (u32)(v6lo >> 32);
	return 1;
}

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
		return MB_AMB_PASS;            /* no ztunnel on this node (yet) */
	if (self) {
		const struct mb_addr *own;

		if (self->flags & MB_CG_F_ZTUNNEL)
			return MB_AMB_PASS;    /* ztunnel itself: never intercepted */
		if (!self->in_mesh)
			return MB_AMB_PASS;    /* a pod outside ambient (sidecar or none) */
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
		return MB_AMB_PASS;            /* a sidecar pod: connect4/6 handle it */
	return MB_AMB_IN;
}

#endif /* MERBRIDGE_AMBIENT_H */
