/* sockaddr.h: the address of a cgroup sock_addr context as a struct mb_addr.
 *
 * Used by peername.c and dns.c, whose programs read or answer user_ip6 (the
 * address of connect, sendmsg, recvmsg, getpeername, getsockname). Pure: no
 * map access (see helpers.h).
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

/* Does a socket whose real peer port is port (network order) still carry
 * the rewrite its mb_sock_peer entry records? A REDIRECT went to the proxy's
 * outbound or inbound port, a DNS query to the DNS proxy. Guards against a
 * socket connected again elsewhere after its first connect failed. */
static __always_inline int mb_peer_port_ours(const struct mb_origin *o, u32 port)
{
	if (o->flags & MB_ORIGIN_F_DNS)
		return MB_DNS_PORT && port == bpf_htons(MB_DNS_PORT);
	return port == bpf_htons(MB_OUT_PORT) || port == bpf_htons(MB_IN_PORT);
}

#endif /* MERBRIDGE_SOCKADDR_H */
