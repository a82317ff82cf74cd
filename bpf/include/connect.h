/* connect.h: the connect-time decision shared by connect4.c and connect6.c.
 *
 * mb_decide() is pure: the programs look up what it needs (who is calling,
 * the caller's pod policy, the target pod's policy) and then apply its
 * verdict (counter, cookie record, address rewrite) with their own family's
 * fields. The order of the checks is istio-iptables' ISTIO_OUTPUT chain.
 */
#ifndef MERBRIDGE_CONNECT_H
#define MERBRIDGE_CONNECT_H

#include "helpers.h"

#define MB_ACT_PASS 0
#define MB_ACT_OUT  1   /* -> loopback : MB_OUT_PORT */
#define MB_ACT_IN   2   /* -> same address : MB_IN_PORT */

struct mb_conn {
	const struct mb_addr *dst;
	const struct mb_addr *src;      /* the socket's bound source (0s: none) */
	u16 port;                       /* destination port, host order */
	int is_proxy;                   /* caller's UID or GID is the proxy's */
	int ip_known;
	const struct mb_addr *self_ip;  /* valid when ip_known */
	const struct mb_pod_config *own;     /* caller's pod policy (may be 0) */
	const struct mb_pod_config *target;  /* dst's pod policy, proxy only (may be 0) */
};

struct mb_verdict {
	int act;        /* MB_ACT_* */
	u32 counter;    /* MB_C_* to bump */
	u16 flags;      /* MB_ORIGIN_F_* to record under the cookie (0: none) */
};

/* A bypass that, in legacy mode with the pod IP still unknown, asks sockops
 * to learn the netns' IP from this (non-loopback) connection. */
static __always_inline void mb_bypass(const struct mb_conn *c, struct mb_verdict *v, u32 counter)
{
	v->act = MB_ACT_PASS;
	v->counter = counter;
#if !MB_CNI_MODE
	if (!c->ip_known && !mb_addr_is_loopback(c->dst))
		v->flags = MB_ORIGIN_F_LEARN;
#endif
}

/* Called only for callers inside a mesh pod. */
static __always_inline void mb_decide(const struct mb_conn *c, struct mb_verdict *v)
{
	v->flags = 0;

	/* 1. excludeOutboundPorts: before everything else, the proxy included */
	if (c->own && mb_port_in(c->own->exclude_out_ports, c->own->n_exclude_out_ports, c->port))
		{ mb_bypass(c, v, MB_C_BYPASS_POLICY); return; }

	/* 2. the proxy's inbound-passthrough source, and HBONE */
	if (mb_addr_is_passthrough(c->src) || c->port == MB_HBONE_PORT) {
		v->act = MB_ACT_PASS;
		v->counter = MB_C_BYPASS_PASSTHROUGH;
		return;
	}

	/* 3./4. the proxy (UID or GID): only a connect to a local mesh pod is
	 * captured, by that pod's inbound listener, if its inbound policy
	 * captures the port (iptables: the target's PREROUTING, or lo for the
	 * pod's own IP) */
	if (c->is_proxy) {
		if (!c->target)
			{ mb_bypass(c, v, MB_C_BYPASS_PROXY); return; }
		if (!mb_policy_in(c->target, c->port)) {
			v->act = MB_ACT_PASS;
			v->counter = MB_C_BYPASS_POLICY;
			return;
		}
		v->act = MB_ACT_IN;
		v->counter = MB_C_REDIRECT_IN;
		v->flags = MB_ORIGIN_F_REDIRECT | MB_ORIGIN_F_INBOUND;
		return;
	}

	/* 6. loopback and the pod's own IP (iptables: -o lo ! --uid-owner RETURN) */
	if (mb_addr_is_loopback(c->dst) || (c->ip_known && mb_addr_eq(c->dst, c->self_ip))) {
		v->act = MB_ACT_PASS;
		v->counter = MB_C_BYPASS_LOOPBACK;
		return;
	}

	/* 7.-9. the pod's CIDR and port lists; no policy known: capture all */
	if (c->own && !mb_policy_out(c->own, c->dst, c->port))
		{ mb_bypass(c, v, MB_C_BYPASS_POLICY); return; }

	v->act = MB_ACT_OUT;
	v->counter = MB_C_REDIRECT_OUT;
	v->flags = MB_ORIGIN_F_REDIRECT;
}

/* Legacy IPv4 destination when the source cannot be bound to the pod IP:
 * 127.128.0.1 .. 127.143.255.254 from a sequence number, so that two pods'
 * 127.0.0.1:p -> :15001 tuples do not collide in the node-global maps.
 * Network byte order. */
static __always_inline u32 mb_legacy_dst4(u64 seq)
{
	return bpf_htonl(0x7f800000u | ((u32)(seq % 0xffffeu) + 1));
}

#endif /* MERBRIDGE_CONNECT_H */
