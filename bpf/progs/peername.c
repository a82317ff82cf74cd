/* peername.c: what an app's redirected socket says about itself, as under
 * iptables' NAT.
 *
 * Programs (Datapath.attach, the cgroup v2 directory holding the pods):
 *   mb_peername4/6  cgroup/getpeername4/6 (BPF_CGROUP_INET{4,6}_GETPEERNAME)
 *   mb_sockname4/6  cgroup/getsockname4/6 (BPF_CGROUP_INET{4,6}_GETSOCKNAME)
 * Reads:   mb_sock_origin (written by connect4/6, ambient4/6 and dns.c; it
 *          goes with the socket); the pod IPs from mb_netns_pod and
 *          mb_mark_pod_ips (CNI mode: an enrolled pod's) or mb_netns_ip
 *          (legacy), as pod.h:mb_known_ips reads them.
 * Why: istio-iptables REDIRECTs in nat OUTPUT and conntrack hides it from
 * the app: a socket that connected to 10.0.1.7:8080 has that peer and the
 * pod IP as its local address. connect4/6 and dns.c rewrite the socket's
 * own destination instead (127.0.0.1:15001, the peer pod's :15006, the DNS
 * proxy), so without these programs getpeername() would answer the proxy's
 * port. A socket without an mb_sock_origin entry that says REDIRECT or DNS
 * (not redirected, or the proxy's accepted sockets, the server app's) is
 * never touched.
 *
 * getsockname: the local port is the one the app got (the ephemeral port, as
 * with iptables); the address is already the pod IP where connect4/6 bound
 * it. Where it could not (legacy mode before the pod IP was learned, a DNS
 * query sent to the loopback DNS proxy) the socket's address is loopback and
 * is answered with the pod IP of the socket's family as known now, which is
 * what the route to the original destination would have chosen. An original
 * destination that is itself loopback keeps its loopback source, as under
 * iptables.
 */
#include "connect.h"

/* The socket's origin if its address was rewritten (0: it was not) */
static __always_inline struct mb_origin *mb_rewritten(struct bpf_sock_addr *ctx)
{
	struct mb_origin *o = mb_origin_of(ctx->sk);

	return o && (o->flags & (MB_ORIGIN_F_REDIRECT | MB_ORIGIN_F_DNS)) ? o : 0;
}

/* getpeername: the original destination (an IPv4 socket: only an IPv4 one) */
static __always_inline int mb_peername(struct bpf_sock_addr *ctx, const int v4)
{
	struct mb_origin *o = mb_rewritten(ctx);

	if (o && (!v4 || mb_addr_is_v4(&o->addr)) && mb_peer_port_ours(o, ctx->user_port)) {
		mb_sa_set_dst(ctx, v4, &o->addr);
		ctx->user_port = o->port;
	}
	return 1;
}

/* getsockname: a loopback local address becomes the pod IP of the
 * connection's family (IPv4-mapped for a mapped destination) */
static __always_inline int mb_sockname(struct bpf_sock_addr *ctx, const int v4)
{
	struct mb_origin *o = mb_rewritten(ctx);
	struct mb_addr local;

	if (!o || mb_addr_is_loopback(&o->addr))
		return 1;
	mb_sa_dst(ctx, v4, &local);
	if (!mb_addr_is_loopback(&local))
		return 1;
	struct mb_pod_ips *ips = mb_known_ips(bpf_get_netns_cookie(ctx));

	if (!ips)
		return 1;
	struct mb_addr *pod = v4 || mb_addr_is_v4(&o->addr) ? &ips->ip4 : &ips->ip6;

	if (mb_addr_is_zero(pod))
		return 1;
	mb_sa_set_dst(ctx, v4, pod);
	return 1;
}

int mb_peername4(struct bpf_sock_addr *ctx)
{
	return mb_peername(ctx, 1);
}

int mb_peername6(struct bpf_sock_addr *ctx)
{
	return mb_peername(ctx, 0);
}

int mb_sockname4(struct bpf_sock_addr *ctx)
{
	return mb_sockname(ctx, 1);
}

int mb_sockname6(struct bpf_sock_addr *ctx)
{
	return mb_sockname(ctx, 0);
}
