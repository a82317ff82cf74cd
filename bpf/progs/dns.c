/* dns.c: DNS capture, a pod's port-53 queries to its sidecar's DNS proxy.
 *
 * Programs (Datapath.attach, the cgroup v2 directory holding the pods):
 *   mb_dnsconn4/6  cgroup/connect4/6: TCP and connected UDP sockets
 *   mb_dnssend4/6  cgroup/sendmsg4/6: unconnected UDP datagrams
 *   mb_dnsrecv4/6  cgroup/recvmsg4/6: the proxy's reply, from the server asked
 * Reads:   mb_netns_pod + mb_mark_pod_ips (CNI mode) or mb_netns_ip (legacy):
 *          the caller's pod; mb_local_pods: its policy (MB_POD_F_DNS_CAPTURE,
 *          proxy UID/GID, excluded ports).
 * Writes:  mb_sock_peer
 *          (socket cookie -> the server the app asked, flag DNS),
 *          mb_counters (MB_C_DNS_CAPTURED).
 * Why: Istio's DNS proxying (ISTIO_META_DNS_CAPTURE="true" in the istio-proxy
 * container's env; the daemon sets MB_POD_F_DNS_CAPTURE from it) is, with
 * istio-cni, istio-iptables' ISTIO_OUTPUT_DNS chain: every TCP and UDP
 * packet to port 53 is REDIRECTed to MB_DNS_PORT, whatever the destination
 * (istio-cni cannot read the pod's resolv.conf), except the proxy's own
 * (UID or GID) and where excludeOutboundPorts names 53 (helpers.h
 * mb_dns_captured). The REDIRECT goes to 127.0.0.1 (IPv6: ::1; an
 * IPv4-mapped destination on a dual-stack socket: ::ffff:127.0.0.1), and
 * conntrack gives replies the server's address back; here recvmsg does
 * that from mb_sock_peer, and peername.c answers getpeername. An
 * unconnected socket's replies are attributed to the server of its latest
 * query (the kernel keeps no per-datagram state for us; resolvers accept a
 * reply from any of their servers).
 * connect4/6 leave a captured pod's TCP port-53 connects to this program,
 * whichever of the two runs first.
 */
#include "connect.h"
#include "sockaddr.h"
#include "maps.h"

static __always_inline void mb_count(u32 idx)
{
	u64 *v = mb_counters.lookup(&idx);

	if (v)
		*v += 1;
}

/* The node's own netns (the initial one, or the one the daemon runs in):
 * never a pod (docs/security.md); as connect4.c's (bcc rewrites map calls
 * only in the main file, so it cannot live in a header). */
static __always_inline int mb_node_netns(u64 netns)
{
	u32 idx = MB_SET_NODE_NETNS;
	u64 *node = mb_settings.lookup(&idx);

	return netns == bpf_get_netns_cookie(0) || (node && *node && netns == *node);
}

/* The caller's pod policy, found as connect4/6 find it (CNI mode: only the
 * daemon's record of the pod's netns, while its mark is enrolled; legacy: the
 * proxy's listener and the learned pod IP; never the node's netns).
 * 0: not a mesh pod, or not known (yet). */
static __always_inline struct mb_pod_config *mb_caller_policy(void *ctx)
{
	u64 netns = bpf_get_netns_cookie(ctx);
	struct mb_pod_ips *ip;

	if (mb_node_netns(netns))
		return 0;
#if MB_CNI_MODE
	struct mb_netns_pod *np = mb_netns_pod.lookup(&netns);

	if (!np)
		return 0;
	u32 mark = np->mark;

	ip = mb_mark_pod_ips.lookup(&mark);
	if (!ip)
		return 0;
#else
	if (!mb_mesh_probe(ctx))
		return 0;
	ip = mb_netns_ip.lookup(&netns);
	if (!ip)
		return 0;
#endif
	struct mb_pod_ips self = *ip;
	struct mb_addr *key = mb_pod_ip_any(&self);

	return key ? mb_local_pods.lookup(key) : 0;
}

static __always_inline int mb_dns_wanted(void *ctx, const struct mb_addr *src)
{
	struct mb_pod_config *pc = mb_caller_policy(ctx);

	return mb_dns_captured(pc, bpf_get_current_uid_gid(), src);
}

static __always_inline void mb_dns_record(void *ctx, const struct mb_addr *dst)
{
	struct mb_origin o = {};
	u64 cookie = bpf_get_socket_cookie(ctx);

	o.addr = *dst;
	o.port = bpf_htons(MB_DNS_SERVER_PORT);
	o.flags = MB_ORIGIN_F_DNS;
	o.pid = bpf_get_current_pid_tgid() >> 32;
	mb_sock_peer.update(&cookie, &o);
	mb_count(MB_C_DNS_CAPTURED);
}

/* ---- IPv4 ------------------------------------------------------------------ */

static __always_inline int mb_dns_out4(struct bpf_sock_addr *ctx)
{
	struct mb_addr dst, src;

	if (!MB_DNS_PORT || ctx->user_port != bpf_htons(MB_DNS_SERVER_PORT))
		return 1;
	if (ctx->protocol != IPPROTO_UDP && ctx->protocol != IPPROTO_TCP)
		return 1;
	mb_addr_from_v4(&dst, ctx->user_ip4);
	mb_addr_from_v4(&src, ctx->sk->src_ip4);
	if (!mb_dns_wanted(ctx, &src))
		return 1;
	mb_dns_record(ctx, &dst);
	ctx->user_ip4 = bpf_htonl(0x7f000001);
	ctx->user_port = bpf_htons(MB_DNS_PORT);
	return 1;
}

int mb_dnsconn4(struct bpf_sock_addr *ctx)
{
	return mb_dns_out4(ctx);
}

int mb_dnssend4(struct bpf_sock_addr *ctx)
{
	return mb_dns_out4(ctx);
}

int mb_dnsrecv4(struct bpf_sock_addr *ctx)
{
	if (!MB_DNS_PORT || ctx->user_port != bpf_htons(MB_DNS_PORT) ||
	    ctx->user_ip4 != bpf_htonl(0x7f000001))
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct mb_origin *o = mb_sock_peer.lookup(&cookie);

	if (o && (o->flags & MB_ORIGIN_F_DNS) && mb_addr_is_v4(&o->addr)) {
		ctx->user_ip4 = o->addr.ip[3];
		ctx->user_port = o->port;
	}
	return 1;
}

/* ---- IPv6 (and IPv4-mapped on dual-stack sockets) --------------------------- */

static __always_inline int mb_dns_out6(struct bpf_sock_addr *ctx)
{
	struct mb_addr dst, src;

	if (!MB_DNS_PORT || ctx->user_port != bpf_htons(MB_DNS_SERVER_PORT))
		return 1;
	if (ctx->protocol != IPPROTO_UDP && ctx->protocol != IPPROTO_TCP)
		return 1;
	mb_ctx_get6(ctx, &dst);
	src.ip[0] = ctx->sk->src_ip6[0];
	src.ip[1] = ctx->sk->src_ip6[1];
	src.ip[2] = ctx->sk->src_ip6[2];
	src.ip[3] = ctx->sk->src_ip6[3];
	if (!mb_dns_wanted(ctx, &src))
		return 1;
	mb_dns_record(ctx, &dst);
	struct mb_addr proxy = {};

	if (mb_addr_is_v4(&dst))
		mb_addr_from_v4(&proxy, bpf_htonl(0x7f000001));
	else
		proxy.ip[3] = bpf_htonl(1);
	mb_ctx_set6(ctx, &proxy);
	ctx->user_port = bpf_htons(MB_DNS_PORT);
	return 1;
}

int mb_dnsconn6(struct bpf_sock_addr *ctx)
{
	return mb_dns_out6(ctx);
}

int mb_dnssend6(struct bpf_sock_addr *ctx)
{
	return mb_dns_out6(ctx);
}

int mb_dnsrecv6(struct bpf_sock_addr *ctx)
{
	struct mb_addr from;

	if (!MB_DNS_PORT || ctx->user_port != bpf_htons(MB_DNS_PORT))
		return 1;
	mb_ctx_get6(ctx, &from);
	if (!mb_addr_is_localhost(&from))
		return 1;
	u64 cookie = bpf_get_socket_cookie(ctx);
	struct mb_origin *o = mb_sock_peer.lookup(&cookie);

	if (o && (o->flags & MB_ORIGIN_F_DNS)) {
		mb_ctx_set6(ctx, &o->addr);
		ctx->user_port = o->port;
	}
	return 1;
}
