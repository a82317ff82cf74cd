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

#endif /* MERBRIDGE_SOCKADDR_H */
