/* ambient6.c: cgroup/connect6 (BPF_CGROUP_INET6_CONNECT), program mb_ambient6.
 *
 * The IPv6 twin of ambient4.c (same decision, ambient.h:mb_ambient_decide).
 * Reads:   mb_netns_pod (CNI) or the proxy's listener (legacy), MB_SET_NODE_NETNS:
 *          is a caller without cgroup entry a sidecar pod?; mb_cgroup_info,
 *          mb_settings (MB_SET_ZTUNNEL_IP4 for IPv4-mapped
 *          destinations of dual-stack sockets, MB_SET_ZTUNNEL_IP6_HI/LO for
 *          IPv6 ones), mb_ambient_ips.
 * Writes:  mb_cookie_orig_dst.
 * Why: an IPv6 connect of an ambient pod goes to ztunnel's IPv6 address, an
 * IPv4-mapped one (the connection will really be IPv4) to ztunnel's IPv4 in
 * mapped form. Without a ztunnel address of that family nothing is changed.
 */
#include "ambient.h"
#include "maps.h"

static __always_inline u64 mb_setting(u32 idx)
{
	u64 *v = mb_settings.lookup(&idx);

	return v ? *v : 0;
}

/* Is the caller's netns a sidecar pod's, which connect4/6 handle? As they
 * decide it: never the node's netns; CNI mode: the daemon's mb_netns_pod
 * record (no listener is trusted); legacy: the proxy's listener. So nobody
 * on the node turns ztunnel's capture of node processes off by listening
 * on 39807 or 15001 (docs/security.md). */
static __always_inline int mb_sidecar_netns(struct bpf_sock_addr *ctx)
{
	u32 idx = MB_SET_NODE_NETNS;
	u64 *node = mb_settings.lookup(&idx);
	u64 netns = bpf_get_netns_cookie(ctx);

	if (netns == bpf_get_netns_cookie(0) || (node && *node && netns == *node))
		return 0;
#if MB_CNI_MODE
	return mb_netns_pod.lookup(&netns) != 0;
#else
	return mb_mesh_probe(ctx) != 0;
#endif
}

int mb_ambient6(struct bpf_sock_addr *ctx)
{
	struct mb_addr dst, zt = {}, bind = {};
	struct mb_cgroup_info *self;
	struct mb_origin o = {};
	int have_zt, act, dst_ambient = 0;
	u64 cg, cookie;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	dst.ip[0] = ctx->user_ip6[0];
	dst.ip[1] = ctx->user_ip6[1];
	dst.ip[2] = ctx->user_ip6[2];
	dst.ip[3] = ctx->user_ip6[3];
	have_zt = mb_ztunnel_addr(&dst, mb_setting(MB_SET_ZTUNNEL_IP4),
				  mb_setting(MB_SET_ZTUNNEL_IP6_HI),
				  mb_setting(MB_SET_ZTUNNEL_IP6_LO), &zt);
	if (!have_zt)
		return 1;
	cg = bpf_get_current_cgroup_id();
	self = mb_cgroup_info.lookup(&cg);
	if (!self)
		dst_ambient = mb_ambient_ips.lookup(&dst) != 0;
	act = mb_ambient_decide(!self && dst_ambient && mb_sidecar_netns(ctx), self, &dst,
				have_zt, &zt, dst_ambient, &bind);
	if (act == MB_AMB_PASS)
		return 1;

	o.addr = dst;
	o.port = (u16)ctx->user_port;
	o.flags = MB_ORIGIN_F_REDIRECT;
	o.pid = bpf_get_current_pid_tgid() >> 32;
	cookie = bpf_get_socket_cookie(ctx);
	mb_cookie_orig_dst.update(&cookie, &o);
	if (act == MB_AMB_OUT && !mb_addr_is_zero(&bind)) {
		struct sockaddr_in6 sa = {};

		sa.sin6_family = AF_INET6;
		sa.sin6_addr.in6_u.u6_addr32[0] = bind.ip[0];
		sa.sin6_addr.in6_u.u6_addr32[1] = bind.ip[1];
		sa.sin6_addr.in6_u.u6_addr32[2] = bind.ip[2];
		sa.sin6_addr.in6_u.u6_addr32[3] = bind.ip[3];
		bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa));
	}
	ctx->user_ip6[0] = zt.ip[0];
	ctx->user_ip6[1] = zt.ip[1];
	ctx->user_ip6[2] = zt.ip[2];
	ctx->user_ip6[3] = zt.ip[3];
	ctx->user_port = bpf_htons(act == MB_AMB_OUT ? MB_AMBIENT_OUT_PORT : MB_AMBIENT_IN_PORT);
	return 1;
}
