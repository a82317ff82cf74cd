/* getsockopt.c: cgroup/getsockopt (BPF_CGROUP_GETSOCKOPT), program mb_getsockopt.
 *
 * Attach point: the cgroup v2 directory holding the pods (Datapath.attach).
 * Reads:   mb_pair_orig_dst (written by sockops and by XDP); the caller's
 *          pod: mb_netns_pod + mb_mark_pod_ips (CNI mode) or mb_netns_ip
 *          (legacy), mb_settings (MB_SET_NODE_NETNS, MB_SET_ZTUNNEL_*).
 * Writes:  mb_counters.
 * Why: the proxy asks its accepted socket for the original destination with
 * getsockopt(SOL_IP, SO_ORIGINAL_DST) (IPv6: SOL_IPV6, IP6T_SO_ORIGINAL_DST,
 * also 80). Without iptables' conntrack the kernel has no answer, so this
 * program answers from the connecting side's 4-tuple, which is the accepted
 * socket's tuple reversed. Where conntrack also answers (istio-iptables
 * still in the pod), a real NAT answer is kept and ours wins otherwise
 * (mb_kernel_nat4/6). Every other getsockopt on the cgroup passes
 * through untouched; a result larger than a page (the program only sees the
 * first page) is handed back as the kernel produced it (optlen = 0), never
 * truncated. The answer goes only to a socket of the pod the connection was
 * redirected for, or the ztunnel it went to (pod.h:mb_pair_mine); never in the
 * node's netns.
 */
#include "pod.h"

/* Coexistence with istio-iptables (docs/datapath.md): when the kernel
 * answered SO_ORIGINAL_DST itself (conntrack, retval 0), is its answer a real
 * NAT, that is, iptables REDIRECTed this connection? Then it is right and an
 * entry of ours under the same tuple can only be stale. For a connection
 * connect4/6 rewrote, conntrack saw the rewritten destination, so its answer
 * is just the socket's own local address (or, if iptables redirected our
 * rewrite once more, a proxy port): ours wins. */
static __always_inline int mb_kernel_nat4(const struct sockaddr_in *sa, struct bpf_sock *sk)
{
	u16 port = bpf_ntohs(sa->sin_port);

	if (sa->sin_family != AF_INET || port == MB_OUT_PORT || port == MB_IN_PORT)
		return 0;
	return sa->sin_addr.s_addr != sk->src_ip4 || port != (u16)sk->src_port;
}

static __always_inline int mb_kernel_nat6(const struct sockaddr_in6 *sa, struct bpf_sock *sk)
{
	u16 port = bpf_ntohs(sa->sin6_port);

	if (sa->sin6_family != AF_INET6 || port == MB_OUT_PORT || port == MB_IN_PORT)
		return 0;
	return port != (u16)sk->src_port ||
	       sa->sin6_addr.in6_u.u6_addr32[0] != mb_ctx_u32(&sk->src_ip6[0]) ||
	       sa->sin6_addr.in6_u.u6_addr32[1] != mb_ctx_u32(&sk->src_ip6[1]) ||
	       sa->sin6_addr.in6_u.u6_addr32[2] != mb_ctx_u32(&sk->src_ip6[2]) ||
	       sa->sin6_addr.in6_u.u6_addr32[3] != mb_ctx_u32(&sk->src_ip6[3]);
}

int mb_getsockopt(struct bpf_sockopt *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	struct mb_pair key = {};
	struct mb_origin *o;
	void *optval, *end;

	if (ctx->optlen > MB_PAGE_SIZE) {
		ctx->optlen = 0;
		mb_count(MB_C_GETSOCKOPT_LARGE);
		return 1;
	}
	if (ctx->optname != MB_SO_ORIGINAL_DST ||
	    (ctx->level != IPPROTO_IP && ctx->level != IPPROTO_IPV6))
		return 1;
	if (!sk || sk->protocol != IPPROTO_TCP)
		return 1;

	/* the connecting side's tuple: our remote -> our local */
	if (sk->family == AF_INET) {
		mb_addr_from_v4(&key.sip, sk->dst_ip4);
		mb_addr_from_v4(&key.dip, sk->src_ip4);
	} else if (sk->family == AF_INET6) {
		key.sip.ip[0] = mb_ctx_u32(&sk->dst_ip6[0]);
		key.sip.ip[1] = mb_ctx_u32(&sk->dst_ip6[1]);
		key.sip.ip[2] = mb_ctx_u32(&sk->dst_ip6[2]);
		key.sip.ip[3] = mb_ctx_u32(&sk->dst_ip6[3]);
		key.dip.ip[0] = mb_ctx_u32(&sk->src_ip6[0]);
		key.dip.ip[1] = mb_ctx_u32(&sk->src_ip6[1]);
		key.dip.ip[2] = mb_ctx_u32(&sk->src_ip6[2]);
		key.dip.ip[3] = mb_ctx_u32(&sk->src_ip6[3]);
	} else {
		return 1;
	}
	key.sport = (u16)sk->dst_port; /* network order already */
	key.dport = bpf_htons((u16)sk->src_port);
	o = mb_pair_orig_dst.lookup(&key);
	if (!o || !mb_pair_mine(bpf_get_netns_cookie(ctx), &key)) {
		mb_count(MB_C_GETSOCKOPT_MISS);
		return 1;
	}

	optval = ctx->optval;
	end = ctx->optval_end;
	if (ctx->level == IPPROTO_IP) {
		struct sockaddr_in *sa = optval;

		if (!mb_addr_is_v4(&o->addr) || (void *)(sa + 1) > end)
			return 1;
		if (ctx->retval == 0 && mb_kernel_nat4(sa, sk)) {
			mb_count(MB_C_GETSOCKOPT_NAT);
			return 1;
		}
		sa->sin_family = AF_INET;
		sa->sin_port = o->port;
		sa->sin_addr.s_addr = o->addr.ip[3];
		__builtin_memset(sa->sin_zero, 0, sizeof(sa->sin_zero));
		ctx->optlen = sizeof(*sa);
	} else {
		struct sockaddr_in6 *sa6 = optval;

		if ((void *)(sa6 + 1) > end)
			return 1;
		if (ctx->retval == 0 && mb_kernel_nat6(sa6, sk)) {
			mb_count(MB_C_GETSOCKOPT_NAT);
			return 1;
		}
		sa6->sin6_family = AF_INET6;
		sa6->sin6_port = o->port;
		sa6->sin6_flowinfo = 0;
		sa6->sin6_addr.in6_u.u6_addr32[0] = o->addr.ip[0];
		sa6->sin6_addr.in6_u.u6_addr32[1] = o->addr.ip[1];
		sa6->sin6_addr.in6_u.u6_addr32[2] = o->addr.ip[2];
		sa6->sin6_addr.in6_u.u6_addr32[3] = o->addr.ip[3];
		sa6->sin6_scope_id = 0;
		ctx->optlen = sizeof(*sa6);
	}
	ctx->retval = 0;
	mb_count(MB_C_GETSOCKOPT_ANSWER);
	return 1;
}
