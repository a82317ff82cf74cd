/* connect4.c: cgroup/connect4 (BPF_CGROUP_INET4_CONNECT), program mb_connect4.
 *
 * Attach point: the cgroup v2 directory holding the pods (Datapath.attach).
 * Reads:   mb_netns_pod + mb_mark_pod_ips (CNI mode) or mb_netns_ip
 *          (legacy): the caller's pod IP; mb_local_pods: the caller's and the target's policy;
 *          mb_settings: the legacy destination sequence (atomic add).
 * Writes:  mb_cookie_orig_dst, mb_sock_peer
 *          (socket cookie -> original destination, for sockops),
 *          mb_counters.
 * Why: this replaces istio-iptables' nat OUTPUT chain for IPv4 TCP. An app's
 * connect from a mesh pod goes to the sidecar's outbound listener
 * 127.0.0.1:MB_OUT_PORT; the proxy's connect to another local mesh pod goes
 * to that pod's MB_IN_PORT, and its call through lo (its own pod IP, 127/8
 * but 127.0.0.1) to its own 127.0.0.1:MB_IN_PORT, where iptables' REDIRECT
 * would send it (the decision is connect.h:mb_decide). The source of a call
 * sent to loopback is bound to the pod IP when known, so the rewritten
 * 4-tuple is unique on the node; otherwise an app's destination is spread
 * over 127.128.0.0/12 (the "quadruple conflict" of the node-global pair
 * maps) and the proxy's stays 127.0.0.1.
 */
#include "connect.h"
#include "maps.h"

static __always_inline void mb_count(u32 idx)
{
	u64 *v = mb_counters.lookup(&idx);

	if (v)
		*v += 1;
}

/* The node's own netns (the initial one, or the one the daemon runs in):
 * never a pod, whatever listens there (docs/security.md). */
static __always_inline int mb_node_netns(u64 netns)
{
	u32 idx = MB_SET_NODE_NETNS;
	u64 *node = mb_settings.lookup(&idx);

	return netns == bpf_get_netns_cookie(0) || (node && *node && netns == *node);
}

int mb_connect4(struct bpf_sock_addr *ctx)
{
	struct mb_addr dst, src;
	struct mb_conn c = {};
	struct mb_verdict v = {};
	struct mb_pod_ips *ip, self = {};
	u64 ugid, cookie;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	u64 netns = bpf_get_netns_cookie(ctx);

	if (mb_node_netns(netns)) {
		mb_count(MB_C_BYPASS_NOT_MESH);
		return 1;
	}
#if MB_CNI_MODE
	/* a pod only if the daemon recorded its netns at CNI ADD (mb_netns_pod:
	 * the SO_NETNS_COOKIE of the marker socket it opened there) and the
	 * pod's mark is still enrolled; no listener, no SO_MARK is trusted */
	struct mb_netns_pod *np = mb_netns_pod.lookup(&netns);

	ip = 0;
	if (np) {
		u32 mark = np->mark;

		ip = mb_mark_pod_ips.lookup(&mark);
	}
	if (!ip) {
		mb_count(MB_C_BYPASS_NOT_MESH);
		return 1;
	}
#else
	u64 probe = mb_mesh_probe(ctx);

	if (!probe) {
		mb_count(MB_C_BYPASS_NOT_MESH);
		return 1;
	}
	/* what sockops learned so far, one address per family */
	ip = mb_netns_ip.lookup(&netns);
#endif
	mb_addr_from_v4(&dst, ctx->user_ip4);
	mb_addr_from_v4(&src, ctx->sk->src_ip4);
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
	struct mb_addr *bind_ip = mb_pod_ip(&self, 1);

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
		struct mb_origin o = {};

		o.addr = dst;
		o.port = bpf_htons(c.port);
		o.flags = v.flags;
		o.pid = bpf_get_current_pid_tgid() >> 32;
		cookie = bpf_get_socket_cookie(ctx);
		mb_cookie_orig_dst.update(&cookie, &o);
		/* what the app asked for, for getpeername (peername.c) */
		if (v.flags & MB_ORIGIN_F_REDIRECT)
			mb_sock_peer.update(&cookie, &o);
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
		struct sockaddr_in sa = {};

		sa.sin_family = AF_INET;
		sa.sin_addr.s_addr = bind_ip->ip[3];
		bound = bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa)) == 0;
		mb_count(bound ? MB_C_BIND_POD_IP : MB_C_BIND_FAILED);
	}
	/* unbound, the proxy's call still goes to 127.0.0.1: its inbound
	 * listener need not be on 0.0.0.0 (the validation probe's is on
	 * 127.0.0.1), and iptables would REDIRECT another 127/8 address once
	 * more */
	if (bound || v.act == MB_ACT_IN_LO) {
		ctx->user_ip4 = bpf_htonl(0x7f000001);
		return 1;
	}
	u32 idx = MB_SET_LEGACY_SEQ;
	u64 *seq = mb_settings.lookup(&idx);
	u64 n = 0;

	if (seq)
		n = __sync_fetch_and_add(seq, 1);
	mb_count(MB_C_LEGACY_DST);
	ctx->user_ip4 = mb_legacy_dst4(n);
	return 1;
}
