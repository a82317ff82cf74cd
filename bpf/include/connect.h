/* connect.h: the sidecar's connect hook, shared by connect4.c and connect6.c.
 *
 * mb_connect() is the whole program but the choice of family: it looks up
 * what the decision needs (who is calling, the caller's pod policy, the
 * target pod's policy), asks mb_decide() (pure; the order of the checks is
 * istio-iptables' ISTIO_OUTPUT chain), and applies the verdict (counter,
 * the socket's origin record, address rewrite) through sockaddr.h's
 * per-family loads and stores. dns.c and peername.c use the pod-IP helpers.
 */
#ifndef MERBRIDGE_CONNECT_H
#define MERBRIDGE_CONNECT_H

#include "helpers.h"
#include "maps.h"
#include "pod.h"
#include "sockaddr.h"

#define MB_ACT_PASS  0
#define MB_ACT_OUT   1 /* -> loopback : MB_OUT_PORT */
#define MB_ACT_IN    2 /* another local pod -> same address : MB_IN_PORT */
#define MB_ACT_IN_LO 3 /* the proxy through lo -> loopback : MB_IN_PORT */

struct mb_conn {
	const struct mb_addr *dst;
	const struct mb_addr *src; /* the socket's bound source (0s: none) */
	u16 port;                  /* destination port, host order */
	int is_proxy;              /* caller's UID or GID is the proxy's */
	int is_proxy_uid;          /* caller's UID is the proxy's */
	/* the pod IP of the connection's family is known (legacy mode: learned) */
	int ip_known;
	const struct mb_pod_ips *self;      /* the caller's pod IPs (0s: unknown) */
	const struct mb_pod_config *own;    /* caller's pod policy (may be 0) */
	const struct mb_pod_config *target; /* dst's pod policy, proxy only (may be 0) */
};

struct mb_verdict {
	int act;     /* MB_ACT_* */
	u32 counter; /* MB_C_* to bump */
	u16 flags;   /* MB_ORIGIN_F_* to record in mb_sock_origin (0: none) */
};

/* ---- the caller's pod IPs (struct mb_pod_ips) ------------------------------ */

/* The pod's address of one family (v4: IPv4, also for an IPv4-mapped
 * destination on an AF_INET6 socket), 0: the pod has none. This is the
 * source a redirected connect is bound to. */
static __always_inline struct mb_addr *mb_pod_ip(struct mb_pod_ips *ips, int v4)
{
	struct mb_addr *a = v4 ? &ips->ip4 : &ips->ip6;

	return mb_addr_is_zero(a) ? 0 : a;
}

/* Any of the pod's addresses (IPv4 first): the key of its mb_local_pods
 * policy, which the daemon writes under every pod IP. 0: none known. */
static __always_inline struct mb_addr *mb_pod_ip_any(struct mb_pod_ips *ips)
{
	struct mb_addr *a = mb_pod_ip(ips, 1);

	return a ? a : mb_pod_ip(ips, 0);
}

static __always_inline int mb_is_own_ip(const struct mb_conn *c)
{
	return !mb_addr_is_zero(c->dst) &&
	       (mb_addr_eq(c->dst, &c->self->ip4) || mb_addr_eq(c->dst, &c->self->ip6));
}

/* Does the call leave through lo (iptables' "-o lo")? Loopback, the pod's
 * own IPs, and the inbound-passthrough address: istio-iptables puts ::6 on
 * lo (127.0.0.6 is loopback anyway), and Istio's IPv6 validation probe
 * dials [::6]:15002. */
static __always_inline int mb_via_lo(const struct mb_conn *c)
{
	return mb_addr_is_loopback(c->dst) || mb_addr_is_passthrough(c->dst) || mb_is_own_ip(c);
}

/* Is the source the proxy's inbound-passthrough address? Bound to 127.0.0.6
 * / ::6, or about to be: an unbound socket dialing ::6 gets ::6 itself from
 * IPv6 source selection (an IPv4 one dialing 127/8 gets 127.0.0.1). */
static __always_inline int mb_from_passthrough(const struct mb_conn *c)
{
	return mb_addr_is_passthrough(c->src) ||
	       (mb_addr_is_zero(c->src) && !mb_addr_is_v4(c->dst) &&
		mb_addr_is_passthrough(c->dst));
}

/* A bypass that, in legacy mode with the pod IP of the connection's family
 * still unknown, asks sockops to learn it from this connection (so a
 * dual-stack pod learns both of its addresses), unless it leaves through lo
 * (its source would be a loopback address or ::6, not the pod IP). */
static __always_inline void mb_bypass(const struct mb_conn *c, struct mb_verdict *v, u32 counter)
{
	v->act = MB_ACT_PASS;
	v->counter = counter;
#if !MB_CNI_MODE
	if (!c->ip_known && !mb_via_lo(c))
		v->flags = MB_ORIGIN_F_LEARN;
#endif
}

/* Called only for callers inside a mesh pod. */
static __always_inline void mb_decide(const struct mb_conn *c, struct mb_verdict *v)
{
	/* the caller's policy where it has outbound lists to scan (0: none) */
	const struct mb_pod_config *lists = mb_out_lists(c->own);

	v->flags = 0;

	/* 1. excludeOutboundPorts: before everything else, the proxy included */
	if (lists && mb_port_in(lists->exclude_out_ports, lists->n_exclude_out_ports, c->port)) {
		mb_bypass(c, v, MB_C_BYPASS_POLICY);
		return;
	}

	/* 2. the proxy's inbound-passthrough source, and HBONE */
	if (mb_from_passthrough(c) || c->port == MB_HBONE_PORT) {
		v->act = MB_ACT_PASS;
		v->counter = MB_C_BYPASS_PASSTHROUGH;
		return;
	}

	/* 3.-6. calls that leave through lo (mb_via_lo) */
	int via_lo = mb_via_lo(c);
	/* "-o lo -m owner ! --uid-owner P -j RETURN" (and the same for the
	 * GID), unless includeOutboundIPRanges names a loopback address */
	int lo_return = !(lists && mb_policy_includes_loopback(lists));

	/* 3./4. the proxy (UID or GID) */
	if (c->is_proxy) {
		/* Through lo to anything but 127.0.0.1 / ::1 -- its own pod IPs,
		 * other 127/8 addresses -- the proxy reaches its own inbound
		 * listener: "-o lo ! -d 127.0.0.1/32 -p tcp ! --dport 15008 -m
		 * owner --uid-owner P -j ISTIO_IN_REDIRECT", which istio-iptables
		 * adds for every proxy UID and GID whatever the pod's inbound
		 * settings. It jumps to ISTIO_IN_REDIRECT directly, not through
		 * ISTIO_INBOUND: the pod's inbound policy (excluded or
		 * non-included ports, the status port) does not apply; only
		 * excludeOutboundPorts (1.), the passthrough source and 15008 (2.)
		 * come first. The GID's rule comes after the UID's lo RETURN, so
		 * a caller with only the proxy's GID gets there only when that
		 * RETURN is left out. Anything else through lo is left alone.
		 * REDIRECT in OUTPUT sends a local packet to 127.0.0.1 (::1), so
		 * that is where the call goes (MB_ACT_IN_LO), bound to the pod IP
		 * like an app's call to 15001: the validation probe's listener is
		 * on 127.0.0.1:15006, and with Istio's rules still in the pod the
		 * proxy's "--uid-owner RETURN" leaves 127.0.0.1 alone (another
		 * address through lo would be REDIRECTed once more, and the
		 * accepted socket's tuple would no longer be the pair entry's). */
		if (via_lo) {
			if (mb_addr_is_localhost(c->dst) || (!c->is_proxy_uid && lo_return)) {
				mb_bypass(c, v, MB_C_BYPASS_PROXY);
				return;
			}
		} else {
			/* another local mesh pod is captured by its inbound listener
			 * if its inbound policy captures the port (iptables: that
			 * pod's PREROUTING -> ISTIO_INBOUND); anything else is left
			 * alone */
			if (!c->target) {
				mb_bypass(c, v, MB_C_BYPASS_PROXY);
				return;
			}
			if (!mb_policy_in(c->target, c->port)) {
				v->act = MB_ACT_PASS;
				v->counter = MB_C_BYPASS_POLICY;
				return;
			}
		}
		v->act = via_lo ? MB_ACT_IN_LO : MB_ACT_IN;
		v->counter = MB_C_REDIRECT_IN;
		v->flags = MB_ORIGIN_F_REDIRECT | MB_ORIGIN_F_INBOUND;
		return;
	}

	/* 5./6. apps through lo: "-o lo ! --uid-owner RETURN", or (when that
	 * rule is left out) "-d 127.0.0.1/32 -j RETURN" before the policy */
	if (via_lo && (lo_return || mb_addr_is_localhost(c->dst))) {
		v->act = MB_ACT_PASS;
		v->counter = MB_C_BYPASS_LOOPBACK;
		return;
	}

	/* 7.-9. the pod's CIDR and port lists (without any, includeOutboundIPRanges
	 * is "*" or empty); no policy known: capture all */
	if (c->own && !(lists ? mb_policy_out(lists, c->dst, c->port)
			      : !!(c->own->flags & MB_POD_F_INCLUDE_OUT_ALL))) {
		mb_bypass(c, v, MB_C_BYPASS_POLICY);
		return;
	}

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

/* The connect hook of a cgroup/connect4 (v4) or connect6 program.
 *
 * IPv4: an app's connect from a mesh pod goes to the sidecar's outbound
 * listener 127.0.0.1:MB_OUT_PORT; the proxy's connect to another local mesh
 * pod goes to that pod's MB_IN_PORT, and its call through lo (its own pod IP,
 * 127/8 but 127.0.0.1) to its own 127.0.0.1:MB_IN_PORT, where iptables'
 * REDIRECT would send it. The source of a call sent to loopback is bound to
 * the pod IP when known, so the rewritten 4-tuple is unique on the node;
 * otherwise an app's destination is spread over 127.128.0.0/12 (the
 * "quadruple conflict" of the node-global pair maps) and the proxy's stays
 * 127.0.0.1: its inbound listener need not be on 0.0.0.0 (the validation
 * probe's is on 127.0.0.1), and iptables would REDIRECT another 127/8
 * address once more.
 *
 * IPv6: the same to [::1]; a dual-stack socket connecting to an
 * IPv4-mapped address goes to ::ffff:127.0.0.1 instead, because the
 * connection will really be IPv4, and is bound to the pod's IPv4. A pure
 * IPv6 destination without an IPv6 pod IP to bind (a pod with no IPv6
 * address, or legacy mode before it learned it) stays unbound: IPv6 has no
 * spare loopback addresses (docs/datapath.md, quadruple conflict). */
static __always_inline int mb_connect(struct bpf_sock_addr *ctx, const int v4)
{
	struct mb_addr dst, src;
	struct mb_conn c = {};
	struct mb_verdict v = {};
	struct mb_pod_ips *ip = 0, self = {};
	u64 ugid;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	u64 netns = bpf_get_netns_cookie(ctx);

	if (!mb_sidecar_pod(ctx, netns, &ip)) {
		mb_count(MB_C_BYPASS_NOT_MESH);
		return 1;
	}
	mb_sa_dst(ctx, v4, &dst);
	mb_sa_src(ctx, v4, &src);
	/* the connection's family: an IPv4-mapped destination on a dual-stack
	 * socket makes an IPv4 connection */
	int mapped = v4 || mb_addr_is_v4(&dst);

	c.dst = &dst;
	c.src = &src;
	c.port = bpf_ntohs((u16)ctx->user_port);
	c.self = &self;
	if (ip) {
		self = *ip;
		struct mb_addr *key = mb_pod_ip_any(&self);

		if (key)
			c.own = mb_local_pods.lookup(key);
	}
	/* the pod IP of the connection's family (legacy mode: while it is
	 * unknown, a connection left alone is marked LEARN); a redirected
	 * connect is bound to it */
	struct mb_addr *bind_ip = mb_pod_ip(&self, mapped);

	c.ip_known = bind_ip != 0;
	ugid = bpf_get_current_uid_gid();
	c.is_proxy = mb_is_proxy(c.own, ugid, &c.is_proxy_uid);
	/* with DNS capture, istio-iptables' proxy-UID rules leave TCP 53 alone,
	 * its own pod's included (the lo rule excludes 53, then RETURN); while
	 * legacy mode still learns the pod IP, mb_decide passes it (LEARN) */
	if (MB_DNS_PORT != 0 && c.port == MB_DNS_SERVER_PORT && c.is_proxy_uid && c.ip_known &&
	    c.own && (c.own->flags & MB_POD_F_DNS_CAPTURE))
		return 1;
	/* the pod's DNS queries are dns.c's (MB_POD_F_DNS_CAPTURE) */
	if (c.port == MB_DNS_SERVER_PORT && mb_dns_captured(c.own, ugid, &src))
		return 1;
	if (c.is_proxy)
		c.target = mb_local_pods.lookup(&dst);

	mb_decide(&c, &v);
	mb_count(v.counter);
	if (v.flags) {
		/* for sockops (the pair entry, LEARN) and getpeername */
		mb_origin_record(ctx->sk, &dst, bpf_htons(c.port), v.flags);
	} else {
		/* a socket connecting again after a failed, rewritten connect
		 * drops that record; dns.c's own (this very connect, when it ran
		 * first) stays, guarded by the DNS proxy's port */
		struct mb_origin *old = mb_origin_of(ctx->sk);

		if (old)
			old->flags &= MB_ORIGIN_F_DNS;
	}
	if (v.act == MB_ACT_PASS)
		return 1;
	if (v.act == MB_ACT_IN) {
		ctx->user_port = bpf_htons(MB_IN_PORT);
		return 1;
	}
	/* MB_ACT_OUT, MB_ACT_IN_LO: to loopback */
	ctx->user_port = bpf_htons(v.act == MB_ACT_OUT ? MB_OUT_PORT : MB_IN_PORT);
	int bound = 0;

	if (bind_ip) {
		bound = mb_sa_bind(ctx, v4, bind_ip) == 0;
		mb_count(bound ? MB_C_BIND_POD_IP : MB_C_BIND_FAILED);
	}
	struct mb_addr to = {};

	if (!mapped) {
		to.ip[3] = bpf_htonl(1); /* ::1 */
	} else if (bound || v.act == MB_ACT_IN_LO) {
		mb_addr_from_v4(&to, bpf_htonl(0x7f000001));
	} else {
		u32 idx = MB_SET_LEGACY_SEQ;
		u64 *seq = mb_settings.lookup(&idx);
		u64 n = 0;

		if (seq)
			n = __sync_fetch_and_add(seq, 1);
		mb_count(MB_C_LEGACY_DST);
		mb_addr_from_v4(&to, mb_legacy_dst4(n));
	}
	mb_sa_set_dst(ctx, v4, &to);
	return 1;
}

#endif /* MERBRIDGE_CONNECT_H */
