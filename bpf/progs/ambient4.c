/* ambient4.c: cgroup/connect4 (BPF_CGROUP_INET4_CONNECT), program mb_ambient4.
 *
 * Loaded only in ambient mode (loader.Datapath(ambient=True)); attached to the
 * same cgroup as connect4.c, next to it (docs/ambient.md).
 * Reads:   mb_netns_pod (CNI) or the proxy's listener (legacy), MB_SET_NODE_NETNS:
 *          is a caller without cgroup entry a sidecar pod?; mb_cgroup_info
 *          (the caller's cgroup: ambient pod, other pod, ztunnel), mb_settings
 *          (MB_SET_ZTUNNEL_IP4), mb_ambient_ips.
 * Writes:  mb_sock_origin (original destination, for sockops ->
 *          mb_pair_orig_dst -> ztunnel's SO_ORIGINAL_DST).
 * Why: in Istio's ambient mesh a pod has no sidecar; its app's connects go to
 * the node's ztunnel (port 15001, bound to the pod IP so ztunnel knows who
 * is calling), and a host process's connects to an ambient pod go to
 * ztunnel's inbound port 15006. The program is ambient_connect.h's
 * mb_ambient_connect over IPv4 fields; the decision is mb_ambient_decide.
 */
#include "ambient_connect.h"

int mb_ambient4(struct bpf_sock_addr *ctx)
{
	return mb_ambient_connect(ctx, 1);
}
