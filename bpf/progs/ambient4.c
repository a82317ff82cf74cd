/* ambient4.c: cgroup/connect4 (BPF_CGROUP_INET4_CONNECT), program mb_ambient4.
 *
 * Loaded only in ambient mode (loader.Datapath(ambient=True)); attached to the
 * same cgroup as connect4.c, next to it (docs/ambient.md).
 * Reads:   mb_netns_pod (CNI) or the proxy's listener (legacy), MB_SET_NODE_NETNS:
 *          is a caller without cgroup entry a sidecar pod?; mb_cgroup_info
 *          (the caller's cgroup: ambient pod, other pod, ztunnel), mb_settings (MB_SET_ZTUNNEL_IP4), mb_ambient_ips.
 * Writes:  mb_cookie_orig_dst (original destination, for sockops ->
 *          mb_pair_orig_dst -> ztunnel's SO_ORIGINAL_DST).
 * Why: in Istio's ambient mesh a pod has no sidecar; its app's connects go to
 * the node's ztunnel (port 15001, bound to the pod IP so ztunnel knows who
 * is calling), and a host process's connects to an ambient pod go to
 * ztunnel's inbound port 15006. The decision is ambient.h:mb_ambient_decide.
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

int mb_ambient4(struct bpf_sock_addr *ctx)
{
	struct mb_addr dst, zt = {}, bind = {};
	struct mb_cgroup_info *self;
	struct mb_origin o = {};
	int have_zt, act, dst_ambient = 0;
	u64 cg, cookie;

	if (ctx->protocol != IPPROTO_TCP)
		return 1;
	mb_addr_from_v4(&dst, ctx->user_ip4);
	have_zt = mb_ztunnel_addr(&dst, mb_setting(MB_SET_ZTUNNEL_IP4), 0, 0, &zt);
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
		struct sockaddr_in sa = {};

		sa.sin_family = AF_INET;
		sa.sin_addr.s_addr = bind.ip[3];
		bpf_bind(ctx, (struct sockaddr *)&sa, sizeof(sa));
	}
	ctx->user_ip4 = zt.ip[3];
	ctx->user_port = bpf_htons(act == MB_AMB_OUT ? MB_AMBIENT_OUT_PORT : MB_AMBIENT_IN_PORT);
	return 1;
}
