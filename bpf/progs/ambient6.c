/* ambient6.c: cgroup/connect6 (BPF_CGROUP_INET6_CONNECT), program mb_ambient6.
 *
 * The IPv6 twin of ambient4.c (ambient_connect.h:mb_ambient_connect over IPv6
 * fields).
 * Reads:   mb_netns_pod (CNI) or the proxy's listener (legacy), MB_SET_NODE_NETNS:
 *          is a caller without cgroup entry a sidecar pod?; mb_cgroup_info,
 *          mb_settings (MB_SET_ZTUNNEL_IP4 for IPv4-mapped
 *          destinations of dual-stack sockets, MB_SET_ZTUNNEL_IP6_HI/LO for
 *          IPv6 ones), mb_ambient_ips.
 * Writes:  mb_sock_origin.
 * Why: an IPv6 connect of an ambient pod goes to ztunnel's IPv6 address, an
 * IPv4-mapped one (the connection will really be IPv4) to ztunnel's IPv4 in
 * mapped form. Without a ztunnel address of that family nothing is changed.
 */
#include "ambient_connect.h"

int mb_ambient6(struct bpf_sock_addr *ctx)
{
	return mb_ambient_connect(ctx, 0);
}
