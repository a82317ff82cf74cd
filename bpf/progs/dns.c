/* dns.c: DNS capture, a pod's port-53 queries to its sidecar's DNS proxy.
 *
 * Programs (Datapath.attach, the cgroup v2 directory holding the pods):
 *   mb_dnsconn4/6  cgroup/connect4/6: TCP and connected UDP sockets
 *   mb_dnssend4/6  cgroup/sendmsg4/6: unconnected UDP datagrams
 *   mb_dnsrecv4/6  cgroup/recvmsg4/6: the proxy's reply, from the server asked
 * Reads:   mb_netns_pod + mb_mark_pod_ips (CNI mode) or mb_netns_ip (legacy):
 *          the caller's pod; mb_local_pods: its policy (MB_POD_F_DNS_CAPTURE,
 *          proxy UID/GID, excluded ports).
 * Writes:  mb_sock_origin
 *          (the socket -> the server the app asked, flag DNS),
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
 * that from mb_sock_origin, and peername.c answers getpeername. An
 * unconnected socket's replies are attributed to the server of its latest
 * query (the kernel keeps no per-datagram state for us; resolvers accept a
 * reply from any of their servers).
 * connect4/6 leave a captured pod's TCP port-53 connects to this program,
 * whichever of the two runs first.
 */
#include "connect.h"

/* The caller's pod policy, found as connect4/6 find it (pod.h); 0: not a
 * mesh pod, or not known (yet). */
static __always_inline struct mb_pod_config *mb_caller_policy(void *ctx)
{
	u64 netns = bpf_get_netns_cookie(ctx);
	struct mb_pod_ips *ip = 0;

	if (!mb_sidecar_pod(ctx, netns, &ip) || !ip)
		return 0;
	struct mb_pod_ips self = *ip;
	struct mb_addr *key = mb_pod_ip_any(&self);

	return key ? mb_local_pods.lookup(key) : 0;
}

static __always_inline int mb_dns_wanted(void *ctx, const struct mb_addr *src)
{
	struct mb_pod_config *pc = mb_caller_policy(ctx);

	return mb_dns_captured(pc, bpf_get_current_uid_gid(), src);
}

static __always_inline void mb_dns_record(struct bpf_sock_addr *ctx, const struct mb_addr *dst)
{
	mb_origin_record(ctx->sk, dst, bpf_htons(MB_DNS_SERVER_PORT), MB_ORIGIN_F_DNS);
	mb_count(MB_C_DNS_CAPTURED);
}

/* connect and sendmsg: a captured query goes to the DNS proxy on loopback
 * (IPv6: ::1, an IPv4-mapped destination: ::ffff:127.0.0.1) */
static __always_inline int mb_dns_out(struct bpf_sock_addr *ctx, const int v4)
{
	struct mb_addr dst, src, proxy = {};

	if (!MB_DNS_PORT || ctx->user_port != bpf_htons(MB_DNS_SERVER_PORT))
		return 1;
	if (ctx->protocol != IPPROTO_UDP && ctx->protocol != IPPROTO_TCP)
		return 1;
	mb_sa_dst(ctx, v4, &dst);
	mb_sa_src(ctx, v4, &src);
	if (!mb_dns_wanted(ctx, &src))
		return 1;
	mb_dns_record(ctx, &dst);
	if (mb_addr_is_v4(&dst))
		mb_addr_from_v4(&proxy, bpf_htonl(0x7f000001));
	else
		proxy.ip[3] = bpf_htonl(1);
	mb_sa_set_dst(ctx, v4, &proxy);
	ctx->user_port = bpf_htons(MB_DNS_PORT);
	return 1;
}

/* recvmsg: a reply from the DNS proxy comes from the server the app asked
 * (an IPv4 socket: only an IPv4 server) */
static __always_inline int mb_dns_in(struct bpf_sock_addr *ctx, const int v4)
{
	struct mb_addr from;

	if (!MB_DNS_PORT || ctx->user_port != bpf_htons(MB_DNS_PORT))
		return 1;
	mb_sa_dst(ctx, v4, &from);
	if (!mb_addr_is_localhost(&from))
		return 1;
	struct mb_origin *o = mb_origin_of(ctx->sk);

	if (o && (o->flags & MB_ORIGIN_F_DNS) && (!v4 || mb_addr_is_v4(&o->addr))) {
		mb_sa_set_dst(ctx, v4, &o->addr);
		ctx->user_port = o->port;
	}
	return 1;
}

int mb_dnsconn4(struct bpf_sock_addr *ctx)
{
	return mb_dns_out(ctx, 1);
}

int mb_dnssend4(struct bpf_sock_addr *ctx)
{
	return mb_dns_out(ctx, 1);
}

int mb_dnsrecv4(struct bpf_sock_addr *ctx)
{
	return mb_dns_in(ctx, 1);
}

int mb_dnsconn6(struct bpf_sock_addr *ctx)
{
	return mb_dns_out(ctx, 0);
}

int mb_dnssend6(struct bpf_sock_addr *ctx)
{
	return mb_dns_out(ctx, 0);
}

int mb_dnsrecv6(struct bpf_sock_addr *ctx)
{
	return mb_dns_in(ctx, 0);
}
