/* sockaddr.h: the per-family loads and stores of a cgroup sock_addr context
 * (connect, sendmsg, recvmsg, getpeername, getsockname), over struct mb_addr.
 *
 * The IPv4 and IPv6 programs of connect4/6.c, ambient4/6.c, dns.c and
 * peername.c share one worker each and differ only here: v4 (a constant at
 * every call, so the compiler keeps one branch) picks user_ip4 / src_ip4 /
 * sockaddr_in, else user_ip6 / src_ip6 / sockaddr_in6. Pure: no map access.
 */
#ifndef MERBRIDGE_SOCKADDR_H
#define MERBRIDGE_SOCKADDR_H

#include "helpers.h"

static __always_inline void mb_ctx_get6(const struct bpf_sock_addr *ctx, struct mb_addr *a)
{
	a->ip[0] = ctx->user_ip6[0];
	a->ip[1] = ctx->user_ip6[1];
	a->ip[2] = ctx->user_ip6[2];
	a->ip[3] = ctx->user_ip6[3];
}

static __always_inline void mb_ctx_set6(struct bpf_sock_addr *ctx, const struct mb_addr *a)
{
	ctx->user_ip6[0] = a->ip[0];
	ctx->user_ip6[1] = a->ip[1];
	ctx->user_ip6[2] = a->ip[2];
	ctx->user_ip6[3] = a->ip[3];
}

/* The destination the caller asked for (user_ip4 / user_ip6). */
static __always_inline void mb_sa_dst(const struct bpf_sock_addr *ctx, const int v4,
				      struct mb_addr *a)
{
	if (v4)
		mb_addr_from_v4(a, ctx->user_ip4);
	else
		mb_ctx_get6(ctx, a);
}

/* The socket's bound source address (0s: none). */
static __always_inline void mb_sa_src(const struct bpf_sock_addr *ctx, const int v4,
				      struct mb_addr *a)
{
	if (v4) {
		mb_addr_from_v4(a, ctx->sk->src_ip4);
	} else {
		a->ip[0] = ctx->sk->src_ip6[0];
		a->ip[1] = ctx->sk->src_ip6[1];
		a->ip[2] = ctx->sk->src_ip6[2];
		a->ip[3] = ctx->sk->src_ip6[3];
	}
}

/* Rewrite the destination (IPv4: a is IPv4-mapped). */
static __always_inline void mb_sa_set_dst(struct bpf_sock_addr *ctx, const int v4,
					  const struct mb_addr *a)
{
	if (v4)
		ctx->user_ip4 = a->ip[3];
	else
		mb_ctx_set6(ctx, a);
}

/* Bind the socket to a (port 0); bpf_bind's result, 0: bound. */
static __always_inline int mb_sa_bind(struct bpf_sock_addr *ctx, const int v4,
				      const struct mb_addr *a)
{
	if (v4) {
		struct sockaddr_in sa = {};

		sa.sin_family = AF_INET;
		sa.sin_addr.s_addr = a->ip[3];
		return bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa));
	}
	struct sockaddr_in6 sa6 = {};

	sa6.sin6_family = AF_INET6;
	sa6.sin6_addr.in6_u.u6_addr32[0] = a->ip[0];
	sa6.sin6_addr.in6_u.u6_addr32[1] = a->ip[1];
	sa6.sin6_addr.in6_u.u6_addr32[2] = a->ip[2];
	sa6.sin6_addr.in6_u.u6_addr32[3] = a->ip[3];
	return bpf_bind(ctx, (struct sockaddr *)&sa6, sizeof(sa6));
}

/* Does a socket whose real peer port is port (network order) still carry
 * the rewrite its mb_sock_origin entry records? A REDIRECT went to the proxy's
 * outbound or inbound port (ambient's to ztunnel's, the same 15001 and 15006
 * for Istio), a DNS query to the DNS proxy. Guards against a socket
 * connected again elsewhere after its first connect failed. */
static __always_inline int mb_peer_port_ours(const struct mb_origin *o, u32 port)
{
	if (o->flags & MB_ORIGIN_F_DNS)
		return MB_DNS_PORT && port == bpf_htons(MB_DNS_PORT);
	return port == bpf_htons(MB_OUT_PORT) || port == bpf_htons(MB_IN_PORT);
}

#endif /* MERBRIDGE_SOCKADDR_H */
