/* connect6.c: cgroup/connect6 (BPF_CGROUP_INET6_CONNECT), program mb_connect6.
 *
 * Attach point: the cgroup v2 directory holding the pods (Datapath.attach).
 * Reads:   mb_netns_pod + mb_mark_pod_ips (CNI mode) or mb_netns_ip (legacy),
 *          mb_local_pods, mb_settings (legacy destination sequence;
 *          MB_SET_NODE_NETNS).
 * Writes:  mb_sock_origin, mb_counters.
 * Why: the IPv6 twin of connect4.c (connect.h:mb_connect over IPv6 fields):
 * an app's connect goes to [::1]:MB_OUT_PORT, the proxy's call through lo to
 * [::1]:MB_IN_PORT; a dual-stack socket connecting to an IPv4-mapped address
 * goes to ::ffff:127.0.0.1 instead, because the connection will really be
 * IPv4. The source is bound to the pod IP of the same family when known
 * (CNI mode: mb_mark_pod_ips holds a dual-stack pod's IPv4 and IPv6
 * address).
 */
#include "connect.h"

int mb_connect6(struct bpf_sock_addr *ctx)
{
	return mb_connect(ctx, 0);
}
